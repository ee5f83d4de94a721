"""Runs one call's application handlers, in order, in a task of their own.

Handlers of one call never run concurrently and never hold up the connection's reading (nor,
since each call has its own task, any other call). Events wait in a queue: ``start``, ``dtmf``,
``mark`` and ``stop`` are never dropped; audio frames are bounded by their duration (10 s by
default). Past the bound the oldest frames are dropped and counted, and the first drop of a call
is logged: the same policy Twilio applies upstream when a server falls behind (warning 31930).

A handler that raises is logged once with its traceback and ends the call (``endReason``
``error``, ``error`` ``handler``); the call's ``on_stop`` handlers still run, so the application
can clean up. A handler that is sending when the call ends simply stops (:class:`CallEnded`).

Eager audio. A frame usually arrives when the call's task is idle, and ``on_audio`` usually
finishes without waiting for anything (an echo, a VAD update, a chunk handed to a speech
service). Waking a task for each of fifty frames a second per call costs more than the handler.
So when the task is idle, the audio handlers are started right away, on the reading path, with
the call's task set as the current task (so ``asyncio.current_task()`` and ``asyncio.timeout``
behave as inside it). A handler that finishes is done; one that has to wait is handed to the
call's task, which resumes it where it stopped and keeps the order of everything after it. This
is what Python 3.12's eager tasks do, without creating a task per frame.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final

import structlog

from ..protocol.errors import CallEnded, HandlerFailed
from ..protocol.g711 import BYTES_PER_MS
from .call import AudioFrame, Call, MarkEcho

__all__ = ["HandlerRunner", "Handlers"]

try:  # the hooks asyncio.Task itself uses to mark the running task (3.11 to 3.14)
    from asyncio.tasks import _enter_task, _leave_task

    EAGER = True
except ImportError:  # pragma: no cover - a Python without them runs every handler in the task
    EAGER = False


MAX_QUEUED_EVENTS: Final = 1000
"""The most events other than audio (start, DTMF, marks) that may wait for a call's handlers."""


class _Kind(enum.Enum):
    START = "start"
    AUDIO = "audio"
    DTMF = "dtmf"
    MARK = "mark"
    STOP = "stop"


@dataclass
class Handlers:
    """The application's handlers for each event, in registration order: the handler table."""

    start: list[Callable[..., Any]] = field(default_factory=list)
    audio: list[Callable[..., Any]] = field(default_factory=list)
    dtmf: list[Callable[..., Any]] = field(default_factory=list)
    mark: list[Callable[..., Any]] = field(default_factory=list)
    stop: list[Callable[..., Any]] = field(default_factory=list)

    def extend(self, other: Handlers) -> None:
        """Add ``other``'s handlers after these, event by event."""
        for event in fields(self):
            getattr(self, event.name).extend(getattr(other, event.name))

    def __bool__(self) -> bool:
        return any(getattr(self, event.name) for event in fields(self))


class _Suspended:
    """A handler that started eagerly and has to wait: the task resumes it."""

    __slots__ = ("args", "coro", "handler", "rest", "thrown", "waiting_on")

    def __init__(
        self,
        coro: Coroutine[Any, Any, Any],
        waiting_on: Any,
        handler: Callable[..., Any],
        rest: Sequence[Callable[..., Any]],
        args: tuple[Any, ...],
    ) -> None:
        self.coro = coro
        self.waiting_on = waiting_on
        self.handler = handler
        self.rest = rest
        self.args = args
        self.thrown: BaseException | None = None  # to throw in when resumed, instead of awaiting


class HandlerRunner:
    """One call's queue of events and the task that feeds them to the handlers.

    Args:
        handlers: what to run for each event.
        call: the call the handlers are given.
        max_audio_ms: the most audio, in milliseconds, that may wait for ``on_audio`` handlers.
        on_failure: told when a handler raises (the connection then ends the call).
        on_backlog: told, once, when ``MAX_QUEUED_EVENTS`` events other than audio wait for
            the handlers (a peer flooding DTMF or marks faster than they can be handled); the
            event that overflows, and any after it, are not queued.
        log: the call's logger.
    """

    def __init__(
        self,
        handlers: Handlers,
        call: Call,
        *,
        max_audio_ms: float,
        on_failure: Callable[[HandlerFailed], None],
        on_backlog: Callable[[], None] = lambda: None,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self.handlers = handlers
        self.call = call
        self.wants_audio = bool(handlers.audio)
        self.dropped_frames = 0
        self.failed = False
        self._max_audio_ms = max_audio_ms
        self._on_failure = on_failure
        self._on_backlog = on_backlog
        self._queued_events = 0  # events other than audio waiting in the queue
        self.backlogged = False
        self._log = log
        self._events: deque[tuple[_Kind, Any]] = deque()
        self._queued_audio_ms = 0.0
        self._wake = asyncio.Event()
        self._stopping = False
        self._idle = False
        self._suspended: _Suspended | None = None
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run())

    def start(self) -> None:
        """Queue ``on_start``."""
        self._push(_Kind.START, None)

    def audio(self, frame: AudioFrame) -> None:
        """Run ``on_audio`` for a frame now if the call's task is idle, else queue it.

        A queued frame waits behind the others; past the bound the oldest frames are dropped.
        """
        if self._idle and not self._events and EAGER and not self.failed:
            if self._run_eagerly(self.handlers.audio, (self.call, frame)):
                return
        self._events.append((_Kind.AUDIO, frame))
        self._queued_audio_ms += len(frame.mulaw) / BYTES_PER_MS
        if self._queued_audio_ms > self._max_audio_ms:
            while self._queued_audio_ms > self._max_audio_ms and self._drop_oldest_audio():
                pass
        self._wake.set()

    def dtmf(self, digit: str) -> None:
        """Queue ``on_dtmf`` (unless ``MAX_QUEUED_EVENTS`` wait already)."""
        self._push_limited(_Kind.DTMF, digit)

    def mark(self, echo: MarkEcho) -> None:
        """Queue ``on_mark`` (unless ``MAX_QUEUED_EVENTS`` wait already)."""
        self._push_limited(_Kind.MARK, echo)

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

    def _push_limited(self, kind: _Kind, arg: Any) -> None:
        if self._queued_events < MAX_QUEUED_EVENTS:
            self._queued_events += 1
            self._push(kind, arg)
        elif not self.backlogged:
            self.backlogged = True
            self._on_backlog()

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

    def _run_eagerly(self, handlers: Sequence[Callable[..., Any]], args: tuple[Any, ...]) -> bool:
        """Run the handlers now as the call's task; False if another task is running (then queue)."""
        try:
            _enter_task(self._loop, self._task)
        except RuntimeError:  # called from a task (the ASGI driver reads in one), not a callback
            return False
        try:
            for index, handler in enumerate(handlers):
                coro = handler(*args)
                try:
                    waiting_on = coro.send(None)
                except StopIteration:
                    continue
                except CallEnded:
                    return True
                except (Exception, asyncio.CancelledError) as exc:
                    self._fail(handler, exc)
                    return True
                self._suspended = _Suspended(coro, waiting_on, handler, handlers[index + 1 :], args)
                self._idle = False
                self._wake.set()
                return True
            return True
        finally:
            _leave_task(self._loop, self._task)

    async def _run(self) -> None:
        events = self._events
        while True:
            suspended = self._suspended
            if suspended is not None:
                self._suspended = None
                if await self._resume(suspended):
                    await self._call_each(suspended.rest, suspended.args)
                continue
            if not events:
                self._wake.clear()
                self._idle = True
                try:
                    await self._wake.wait()
                except asyncio.CancelledError as exc:
                    if self._suspended is None:
                        raise
                    # A handler that started eagerly cancelled this task before the task took it
                    # over (asyncio.timeout does that when its deadline passes): the
                    # cancellation is the handler's, so it is thrown into the handler.
                    self._suspended.thrown = exc
                finally:
                    self._idle = False
                continue
            kind, arg = events.popleft()
            if kind is _Kind.AUDIO:
                self._queued_audio_ms -= len(arg.mulaw) / BYTES_PER_MS
                if not self.failed:
                    await self._call_each(self.handlers.audio, (self.call, arg))
                continue
            if kind is _Kind.STOP:
                await self._call_each(self.handlers.stop, (self.call,))
                return
            if kind is not _Kind.START:
                self._queued_events -= 1
            if not self.failed:
                handlers = getattr(self.handlers, kind.value)
                await self._call_each(handlers, (self.call,) if arg is None else (self.call, arg))

    async def _resume(self, suspended: _Suspended) -> bool:
        """Drive an eagerly started handler to its end, as its task would; True if it succeeded.

        The coroutine yielded the future it waits on. Once that future is done (or this task is
        cancelled, which cancels it), the coroutine is resumed and sees the outcome itself.
        """
        coro, waiting_on = suspended.coro, suspended.waiting_on
        thrown = suspended.thrown
        while True:
            if thrown is None:
                thrown = await _settle(waiting_on)
            try:
                waiting_on = coro.send(None) if thrown is None else coro.throw(thrown)
            except StopIteration:
                return True
            except CallEnded:
                return False
            except (Exception, asyncio.CancelledError) as exc:
                self._fail(suspended.handler, exc)
                return False
            finally:
                thrown = None

    async def _call_each(self, handlers: Sequence[Callable[..., Any]], args: tuple[Any, ...]) -> None:
        for handler in handlers:
            try:
                await handler(*args)
            except CallEnded:
                return
            except (Exception, asyncio.CancelledError) as exc:
                self._fail(handler, exc)
                return

    def _fail(self, handler: Callable[..., Any], exc: BaseException) -> None:
        """A handler raised: log it and end the call (a cancellation of this task propagates).

        A handler can raise CancelledError without this task being cancelled (it awaited a
        future someone else cancelled); that is the handler failing, like any exception.
        """
        if isinstance(exc, asyncio.CancelledError) and self._task.cancelling():
            raise exc
        name = getattr(handler, "__qualname__", repr(handler))
        self._log.error("handler failed; ending the call", handler=name, exc_info=exc)
        if not self.failed:
            self.failed = True
            self._on_failure(HandlerFailed(name))


async def _settle(waiting_on: Any) -> BaseException | None:
    """Wait, as a task would, for what a suspended coroutine yielded; return what to throw in.

    Returns ``None`` when the coroutine should simply be resumed: it then reads the outcome
    (result, exception or cancellation) from the future itself.
    """
    if waiting_on is not None and not asyncio.isfuture(waiting_on):
        return RuntimeError(f"handler yielded {waiting_on!r}, not a future")
    if waiting_on is not None:
        # The coroutine's await marked the future as blocking on it; a task clears that mark
        # when it takes the future over, and so does this one.
        waiting_on._asyncio_future_blocking = False
    try:
        await (asyncio.sleep(0) if waiting_on is None else waiting_on)
    except asyncio.CancelledError as exc:
        # This task was cancelled: if the future took the cancellation the coroutine sees it
        # there; otherwise it is thrown in.
        if waiting_on is None or not waiting_on.cancelled():
            return exc
    except BaseException:  # the coroutine reads the failure from the future itself
        pass
    return None
