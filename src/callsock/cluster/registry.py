"""Which connection holds each call: one active connection per call, the newest wins.

The seed guide's rule ("Only one active WebSocket connection per call; new connections replace
existing ones"), keyed by callSid, or by streamSid when the start has no callSid.
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["CallRegistry"]

T = TypeVar("T")


class CallRegistry(Generic[T]):
    """An in-memory map from call key to the connection that holds the call."""

    def __init__(self) -> None:
        self._holders: dict[str, T] = {}

    def claim(self, key: str, holder: T) -> T | None:
        """Make ``holder`` the call's connection; return the one it replaces, if any."""
        previous = self._holders.get(key)
        self._holders[key] = holder
        return previous if previous is not holder else None

    def release(self, key: str, holder: T) -> None:
        """Forget ``holder`` as the call's connection, unless a newer one took over."""
        if self._holders.get(key) is holder:
            del self._holders[key]

    def holder(self, key: str) -> T | None:
        """The connection holding the call, if any."""
        return self._holders.get(key)

    def __len__(self) -> int:
        return len(self._holders)
