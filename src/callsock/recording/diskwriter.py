"""Recording I/O on a thread of its own, so a slow disk never stalls a call.

Writing a flushed second of audio to the page cache takes microseconds; to a disk that has
stalled (a full NFS mount, a saturated volume) it can take seconds, and the event loop would
stall every call with it. So a server's recorders hand their file operations to one
:class:`DiskWriter` thread, which runs them in order.

The writer holds at most ``max_pending_bytes`` of audio waiting for the disk. Past that, audio
writes are refused (:meth:`DiskWriter.submit` returns ``None``) and counted: the recording gets a
stretch of silence there, memory stays bounded, and calls go on. Operations that must happen
(creating a call's files, publishing them) are always accepted.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Final

import structlog

__all__ = ["DiskWriter"]

_STOP: Final = None


class DiskWriter:
    """Runs file operations on one background thread, in the order they were submitted.

    Args:
        max_pending_bytes: the most audio bytes waiting to be written before writes are dropped.
        inline: run every operation at once on the caller's thread (tests, tools, no server).
    """

    def __init__(self, max_pending_bytes: int = 64 << 20, *, inline: bool = False) -> None:
        self.max_pending_bytes = max_pending_bytes
        self.inline = inline
        self.pending_bytes = 0
        self.dropped_bytes = 0
        self.failures = 0
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Future[Any], int] | None]
        self._queue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._log = structlog.get_logger("callsock")

    def submit(
        self, fn: Callable[..., Any], *args: Any, size: int = 0, droppable: bool = False
    ) -> Future[Any] | None:
        """Queue ``fn(*args)``; return its future, or ``None`` if it was a droppable write over budget.

        Args:
            fn: the operation.
            args: its arguments.
            size: the bytes it writes (counted against the budget until written).
            droppable: whether it may be refused when the budget is spent (audio appends).
        """
        future: Future[Any] = Future()
        if self.inline:
            self._run_one(fn, args, future)
            return future
        with self._lock:
            if droppable and self.pending_bytes + size > self.max_pending_bytes:
                self.dropped_bytes += size
                return None
            self.pending_bytes += size
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="callsock-disk", daemon=True)
            self._thread.start()
        self._queue.put((fn, args, future, size))
        return future

    def close(self, timeout: float = 30.0) -> bool:
        """Finish what is queued (at most ``timeout`` seconds) and stop; True if all was written."""
        if self._thread is None:
            return True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        finished = not self._thread.is_alive()
        self._thread = None
        return finished

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            fn, args, future, size = item
            try:
                self._run_one(fn, args, future)
            finally:
                with self._lock:
                    self.pending_bytes -= size

    def _run_one(self, fn: Callable[..., Any], args: tuple[Any, ...], future: Future[Any]) -> None:
        # The operation runs even if nobody waits for it any more (a recording must be
        # published whatever happened to the connection); only its result is then dropped.
        waited = future.set_running_or_notify_cancel()
        try:
            result = fn(*args)
        except Exception as exc:
            self.failures += 1
            self._log.error("recording I/O failed", op=getattr(fn, "__name__", "?"), exc=str(exc))
            if waited:
                future.set_exception(exc)
        else:
            if waited:
                future.set_result(result)
