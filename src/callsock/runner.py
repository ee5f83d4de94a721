"""Runs one call's application handlers, in order, in a task of their own.

Handlers of one call never run concurrently and never hold up the connection's reading (nor,
since each call has its own task, any other call). Events wait in a queue: ``start``, ``dtmf``,
``mark`` and ``stop`` are never dropped; audio frames are bounded by their duration (10 s by
default). Past the bound the oldest frames are dropped and counted, and the first drop of a call
is logged: the same policy Twilio applies upstream when a server falls behind (warning 31930).

A handler that raises is logged once with its traceback and ends the call (``endReason``
``error``, ``error`` ``handler``); the call's ``on_stop`` handlers still run, so the application
can clean up. A handler that is sending when the call ends simply stops (:class:`CallEnded`).
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from .call import AudioFrame, Call, MarkEcho
from .errors import CallEnded, HandlerFailed

__all__ = ["HandlerRunner", "Handlers"]


class _Kind(enum.Enum):
    START = "start"
    AUDIO = "audio"
    DTMF = "dtmf"
    MARK = "mark"
    STOP = "stop"


class Handlers:
    """The application's handlers for each event, in registration order."""

    def __init__(self) -> None:
        self.start: list[Callable[..., Any]] = []
        self.audio: list[Callable[..., Any]] = []
        self.dtmf: list[Callable[..., Any]] = []
        self.mark: list[Callable[..., Any]] = []
        self.stop: list[Callable[..., Any]] = []

    def __bool__(self) -> bool:
        return bool(self.start or self.audio or self.dtmf or self.mark or self.stop)


class HandlerRunner:
    """One call's queue of events and the task that feeds them to the handlers.

    Args:
        handlers: what to run for each event.
        call: the call the handlers are given.
        max_audio_ms: the most audio, in milliseconds, that may wait for ``on_audio`` handlers.
        on_failure: told when a handler raises (the connection then ends the call).
        log: the call's logger.
    """

    def __init__(
        self,
        handlers: Handlers,
        call: Call,
        *,
        max_audio_ms: float,
        on_failure: Callable[[HandlerFailed], None],
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self.handlers = handlers
        self.call = call
        self.wants_audio = bool(handlers.audio)
        self.dropped_frames = 0
        self.failed = False
        self._max_audio_ms = max_audio_ms
        self._on_failure = on_failure
        self._log = log
        self._events: deque[tuple[_Kind, Any]] = deque()
        self._queued_audio_ms = 0.0
        self._wake = asyncio.Event()
        self._stopping = False
        self._task = asyncio.create_task(self._run())

    def start(self) -> None:
        """Queue ``on_start``."""
        self._push(_Kind.START, None)

    def audio(self, frame: AudioFrame) -> None:
        """Queue a frame for ``on_audio``, dropping the oldest frames past the bound."""
        self._events.append((_Kind.AUDIO, frame))
        self._queued_audio_ms += frame.duration_ms
        while self._queued_audio_ms > self._max_audio_ms and self._drop_oldest_audio():
            pass
        self._wake.set()

    def dtmf(self, digit: str) -> None:
        """Queue ``on_dtmf``."""
        self._push(_Kind.DTMF, digit)

    def mark(self, echo: MarkEcho) -> None:
        """Queue ``on_mark``."""
        self._push(_Kind.MARK, echo)

    def stop(self) -> None:
        """Queue ``on_stop``, after everything already queued; later events are ignored."""
        if not self._stopping:
            self._push(_Kind.STOP, None)
            self._stopping = True

    async def finish(self, limit: float) -> None:
        """Queue ``on_stop`` and wait up to ``limit`` seconds for the queue to drain, then cancel."""
        self.stop()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), limit)
        except TimeoutError:
            self._log.warning("handlers still busy after the call ended; cancelled", limitSeconds=limit)
            self._task.cancel()
        finally:
            self.call.cancel_tasks()

    def _push(self, kind: _Kind, arg: Any) -> None:
        if not self._stopping:
            self._events.append((kind, arg))
            self._wake.set()

    def _drop_oldest_audio(self) -> bool:
        for i, (kind, frame) in enumerate(self._events):
            if kind is _Kind.AUDIO:
                del self._events[i]
                self._queued_audio_ms -= frame.duration_ms
                self.dropped_frames += 1
                if self.dropped_frames == 1:
                    self._log.warning(
                        "on_audio handlers fall behind; dropping the oldest audio",
                        maxQueuedMs=self._max_audio_ms,
                    )
                return True
        return False

    async def _run(self) -> None:
        events = self._events
        while True:
            if not events:
                self._wake.clear()
                await self._wake.wait()
                continue
            kind, arg = events.popleft()
            if kind is _Kind.AUDIO:
                self._queued_audio_ms -= arg.duration_ms
                if not self.failed:
                    await self._call_each(self.handlers.audio, (self.call, arg))
            elif kind is _Kind.STOP:
                await self._call_each(self.handlers.stop, (self.call,))
                return
            elif not self.failed:
                handlers = getattr(self.handlers, kind.value)
                await self._call_each(handlers, (self.call,) if arg is None else (self.call, arg))

    async def _call_each(self, handlers: Sequence[Callable[..., Any]], args: tuple[Any, ...]) -> None:
        for handler in handlers:
            try:
                await handler(*args)
            except CallEnded:
                return
            except Exception:
                name = getattr(handler, "__qualname__", repr(handler))
                self._log.exception("handler failed; ending the call", handler=name)
                if not self.failed:
                    self.failed = True
                    self._on_failure(HandlerFailed(name))
                return
