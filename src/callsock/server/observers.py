"""The life of a call, observed: what metrics, the cluster, the event streams and views subscribe to.

A :class:`~callsock.server.connection.Connection` tells its hub's observers what happens to its
call, in order, each at most once per call (``call_event`` aside):

``call_started``
    ``start`` was accepted: the call has its stream.
``call_event``
    something happened during the call: ``dtmf`` (``digit``), ``mark`` (``name``, ``outcome``),
    ``error`` (``rule``: a rejected message, a failed handler, a late recording), ``replaced``.
``call_finished``
    the call ended, with its summary (its recording is being published).
``call_published``
    the recording is on disk: its files, relative to the record directory.
``connection_forgotten``
    the connection is gone (also one that never started a call).

Observers never reach into a connection beyond what :class:`ObservedCall` offers, and never
raise: they run on the per-call path.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from ..call.session import CallCounters
from ..protocol.stream import StreamInfo

__all__ = ["CallObserver", "ObservedCall", "Observers"]


class ObservedCall(Protocol):
    """What an observer may read of a connection and its call."""

    @property
    def id(self) -> str:
        """The connection's id."""

    @property
    def stream(self) -> StreamInfo | None:
        """What ``start`` said, once it arrived."""

    @property
    def counters(self) -> CallCounters:
        """What the call received."""

    @property
    def proven(self) -> bool:
        """Whether its ``start`` carried its call's stream token (so it may claim the call anywhere)."""

    def sent(self) -> dict[str, int]:
        """What the call sent: messages by event (``media``, ``mark``, ``clear``) and ``bytes``."""

    def dropped_frames(self) -> int:
        """Audio frames dropped because its ``on_audio`` handlers fell behind."""


class CallObserver(Protocol):
    """Something that follows calls (metrics, the cluster, a view)."""

    def call_started(self, call: ObservedCall) -> None:
        """``start`` was accepted."""

    def call_event(self, call: ObservedCall, kind: str, data: dict[str, Any]) -> None:
        """Something happened during the call."""

    def call_finished(self, call: ObservedCall, summary: dict[str, Any]) -> None:
        """The call ended."""

    def call_published(self, call: ObservedCall, summary: dict[str, Any], files: dict[str, str]) -> None:
        """The call's recording is on disk."""

    def connection_forgotten(self, call: ObservedCall) -> None:
        """The connection is gone."""


class Observers:
    """Several observers as one, told in the order they were added."""

    def __init__(self, observers: Iterable[CallObserver] = ()) -> None:
        self._observers = list(observers)

    def add(self, observer: CallObserver) -> None:
        """Follow calls from now on."""
        self._observers.append(observer)

    def call_started(self, call: ObservedCall) -> None:
        """Tell each observer."""
        for observer in self._observers:
            observer.call_started(call)

    def call_event(self, call: ObservedCall, kind: str, data: dict[str, Any]) -> None:
        """Tell each observer."""
        for observer in self._observers:
            observer.call_event(call, kind, data)

    def call_finished(self, call: ObservedCall, summary: dict[str, Any]) -> None:
        """Tell each observer."""
        for observer in self._observers:
            observer.call_finished(call, summary)

    def call_published(self, call: ObservedCall, summary: dict[str, Any], files: dict[str, str]) -> None:
        """Tell each observer."""
        for observer in self._observers:
            observer.call_published(call, summary, files)

    def connection_forgotten(self, call: ObservedCall) -> None:
        """Tell each observer."""
        for observer in self._observers:
            observer.connection_forgotten(call)
