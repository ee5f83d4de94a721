"""HandlerRunner: event order, eager audio and its resumption, failures, the audio bound, finish."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, cast

import pytest
import structlog
import uvloop
from structlog.testing import capture_logs

from callsock.call.call import AudioFrame, Call, MarkEcho
from callsock.call.handlers import HandlerRunner, Handlers
from callsock.protocol.errors import CallEnded, HandlerFailed
from callsock.protocol.g711 import BYTES_PER_MS

from ..helpers import WAIT_SECONDS, eventually

LIMIT = WAIT_SECONDS
"""finish()'s bound on the handlers where the test does not wait for it to expire: finish()
returns as soon as they are done, so a generous bound costs nothing and a busy machine never
hits it."""


class FakeCall:
    """What the runner needs of a Call: cancel_tasks(), counted."""

    def __init__(self) -> None:
        self.cancel_calls = 0

    def cancel_tasks(self) -> None:
        self.cancel_calls += 1


class Setup:
    """A runner with its handlers, its fake call, and what on_failure was told."""

    def __init__(self, max_audio_ms: float = 10_000.0) -> None:
        self.handlers = Handlers()
        self.call = FakeCall()
        self.failures: list[HandlerFailed] = []
        self.trace: list[str] = []
        self.tasks: list[asyncio.Task[Any] | None] = []
        self.max_audio_ms = max_audio_ms
        self._runner: HandlerRunner | None = None

    @property
    def runner(self) -> HandlerRunner:
        """The runner (created by :meth:`start_runner`)."""
        assert self._runner is not None
        return self._runner

    async def start_runner(self) -> HandlerRunner:
        """Create the runner once the handlers are registered, and let its task go idle."""
        self._runner = HandlerRunner(
            self.handlers,
            cast(Call, self.call),
            max_audio_ms=self.max_audio_ms,
            on_failure=self.failures.append,
            log=structlog.get_logger(),
        )
        runner = self._runner
        await eventually(lambda: runner._idle, interval=0)
        return runner

    def note(self, entry: str) -> None:
        """Record ``entry`` and the task it ran in."""
        self.trace.append(entry)
        self.tasks.append(asyncio.current_task())

    def deliver(self, frame: AudioFrame) -> None:
        """Call runner.audio(frame) from a plain event-loop callback, as the server's protocol does."""

        def callback() -> None:
            self.runner.audio(frame)
            self.trace.append(f"returned {frame.timestamp_ms}")
            self.tasks.append(asyncio.current_task())

        asyncio.get_running_loop().call_soon(callback)


def frame(n: int, ms: int = 20) -> AudioFrame:
    """Audio frame number ``n`` (timestamp n*20 ms) lasting ``ms`` milliseconds."""
    return AudioFrame("inbound", n * 20, bytes([n % 256]) * (BYTES_PER_MS * ms))


async def settle(turns: int = 20) -> None:
    """Let the loop run a few turns, to check that something does NOT happen.

    Only for negative checks, and only where nothing waits on a timer or I/O, so what can run is
    decided by the loop's order alone, not by the machine's speed. To wait for something to
    happen, use :func:`eventually` (``interval=0`` polls at every turn of the loop).
    """
    for _ in range(turns):
        await asyncio.sleep(0)


def returned(s: Setup, n: int) -> Callable[[], bool]:
    """Whether the callback delivering frame ``n`` has returned."""
    return lambda: f"returned {n * 20}" in s.trace


AudioHandler = Callable[[Call, AudioFrame], Awaitable[None]]


def audio_recorder(setup: Setup, name: str) -> AudioHandler:
    """An audio handler that records ``name`` and the frame's timestamp, without waiting."""

    async def handler(call: Call, f: AudioFrame) -> None:
        setup.note(f"{name} {f.timestamp_ms}")

    handler.__qualname__ = name
    return handler


# Order


async def test_events_in_order_and_handlers_in_registration_order() -> None:
    """Events run in arrival order, each event's handlers in registration order, stop last."""
    s = Setup()

    def recorder(name: str) -> Callable[..., Awaitable[None]]:
        async def handler(call: Call, *args: Any) -> None:
            assert call is cast(Call, s.call)
            await asyncio.sleep(0)
            arg = args[0] if args else None
            detail = arg.timestamp_ms if isinstance(arg, AudioFrame) else arg
            s.note(f"{name} {detail}")

        return handler

    s.handlers.start += [recorder("start1"), recorder("start2")]
    s.handlers.audio += [recorder("audio1"), recorder("audio2")]
    s.handlers.dtmf.append(recorder("dtmf"))
    s.handlers.mark.append(recorder("mark"))
    s.handlers.stop += [recorder("stop1"), recorder("stop2")]
    runner = await s.start_runner()
    echo = MarkEcho("m1", "played")
    runner.start()
    runner.audio(frame(0))
    runner.dtmf("5")
    runner.mark(echo)
    runner.audio(frame(1))
    runner.stop()
    runner.stop()
    runner.dtmf("9")
    runner.mark(echo)
    runner.start()
    runner.audio(frame(2))
    await runner.finish(LIMIT)
    assert s.trace == [
        "start1 None",
        "start2 None",
        "audio1 0",
        "audio2 0",
        "dtmf 5",
        f"mark {echo}",
        "audio1 20",
        "audio2 20",
        "stop1 None",
        "stop2 None",
    ]
    assert set(s.tasks) == {runner._task}
    assert runner._task.done() and not runner._task.cancelled()
    assert s.call.cancel_calls == 1
    assert s.failures == []


async def test_start_runs_before_audio_delivered_from_a_callback() -> None:
    """Audio delivered while on_start is queued (task still idle) waits behind it: no eager run."""
    s = Setup()

    async def on_start(call: Call) -> None:
        s.note("start begins")
        await asyncio.sleep(0.005)
        s.note("start ends")

    s.handlers.start.append(on_start)
    s.handlers.audio.append(audio_recorder(s, "audio"))
    runner = await s.start_runner()

    def start_then_audio() -> None:
        runner.start()
        assert runner._idle
        runner.audio(frame(0))
        s.note("returned")

    asyncio.get_running_loop().call_soon(start_then_audio)
    await eventually(lambda: "returned" in s.trace, interval=0)
    assert s.trace == ["returned"]
    s.deliver(frame(1))
    await eventually(lambda: len(s.trace) == 6)
    assert s.trace == ["returned", "start begins", "returned 20", "start ends", "audio 0", "audio 20"]
    await runner.finish(LIMIT)


async def test_events_after_a_finished_stop_are_ignored() -> None:
    """Once on_stop has run, later events of any kind, from a callback or a task, run nothing."""
    s = Setup()
    s.handlers.audio.append(audio_recorder(s, "audio"))

    async def on_other(call: Call, *args: Any) -> None:
        s.note("other")

    s.handlers.start.append(on_other)
    s.handlers.dtmf.append(on_other)
    s.handlers.stop.append(on_other)
    runner = await s.start_runner()
    await runner.finish(LIMIT)
    assert s.trace == ["other"]
    s.deliver(frame(0))
    runner.audio(frame(1))
    runner.dtmf("1")
    runner.start()
    runner.stop()
    await runner.finish(LIMIT)
    await eventually(returned(s, 0))
    await settle()  # and nothing more
    assert s.trace == ["other", "returned 0"]
    assert s.failures == []


# Eager audio


async def test_eager_handlers_run_inside_the_callback_as_the_runner_task() -> None:
    """From a callback with the task idle, audio handlers run before audio() returns, as runner._task."""
    s = Setup()
    s.handlers.audio += [audio_recorder(s, "a1"), audio_recorder(s, "a2")]
    runner = await s.start_runner()
    s.deliver(frame(0))
    await eventually(returned(s, 0), interval=0)
    assert s.trace == ["a1 0", "a2 0", "returned 0"]
    assert s.tasks == [runner._task, runner._task, None]  # the task is left again after the call
    s.deliver(frame(1))
    s.deliver(frame(2))
    await eventually(returned(s, 2), interval=0)
    assert s.trace[3:] == ["a1 20", "a2 20", "returned 20", "a1 40", "a2 40", "returned 40"]
    await runner.finish(LIMIT)
    assert s.failures == []


async def test_audio_from_a_task_is_queued_for_the_runner_task() -> None:
    """audio() called from inside a task cannot run eagerly: it queues, and the runner's task runs it."""
    s = Setup()
    s.handlers.audio += [audio_recorder(s, "a1"), audio_recorder(s, "a2")]
    runner = await s.start_runner()
    runner.audio(frame(0))
    assert s.trace == []
    assert asyncio.current_task() is not runner._task
    await eventually(lambda: len(s.trace) == 2)
    assert s.trace == ["a1 0", "a2 0"]
    assert s.tasks == [runner._task, runner._task]
    await runner.finish(LIMIT)


async def test_eager_handler_suspended_on_a_lock() -> None:
    """A handler blocked on a lock held by another task is resumed by the runner's task when released."""
    s = Setup()
    lock = asyncio.Lock()

    async def locked(call: Call, f: AudioFrame) -> None:
        s.note(f"wait {f.timestamp_ms}")
        async with lock:
            s.note(f"locked {f.timestamp_ms}")
        s.note(f"unlocked {f.timestamp_ms}")

    s.handlers.audio += [locked, audio_recorder(s, "after")]
    runner = await s.start_runner()
    await lock.acquire()
    s.deliver(frame(0))
    s.deliver(frame(1))
    await eventually(returned(s, 1))
    await settle()  # and the handler stays suspended
    assert s.trace == ["wait 0", "returned 0", "returned 20"]
    assert s.tasks == [runner._task, None, None]
    lock.release()
    await eventually(lambda: len(s.trace) == 10)
    assert s.trace[3:] == [
        "locked 0",
        "unlocked 0",
        "after 0",
        "wait 20",
        "locked 20",
        "unlocked 20",
        "after 20",
    ]
    assert set(s.tasks[3:]) == {runner._task}
    assert not lock.locked()
    await runner.finish(LIMIT)
    assert s.failures == []


async def test_eager_handler_resumed_with_a_future_result() -> None:
    """A handler awaiting a future sees the value it is later given, in the runner's task."""
    s = Setup()
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def waits(call: Call, f: AudioFrame) -> None:
        s.note("before")
        value = await future
        s.note(f"got {value}")

    s.handlers.audio += [waits, audio_recorder(s, "after")]
    runner = await s.start_runner()
    s.deliver(frame(0))
    await eventually(returned(s, 0))
    await settle()  # and the handler stays suspended
    assert s.trace == ["before", "returned 0"]
    future.set_result(42)
    await eventually(lambda: len(s.trace) == 4)
    assert s.trace == ["before", "returned 0", "got 42", "after 0"]
    assert s.tasks[2:] == [runner._task, runner._task]
    await runner.finish(LIMIT)
    assert s.failures == [] and not runner.failed


async def test_eager_handler_resumed_with_a_future_exception() -> None:
    """A handler awaiting a future that fails sees the exception, may catch it, and goes on."""
    s = Setup()
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def waits(call: Call, f: AudioFrame) -> None:
        try:
            await future
        except LookupError as exc:
            s.note(f"caught {exc!r}")

    s.handlers.audio += [waits, audio_recorder(s, "after")]
    runner = await s.start_runner()
    s.deliver(frame(0))
    await eventually(returned(s, 0))
    future.set_exception(KeyError("gone"))
    await eventually(lambda: len(s.trace) == 3)
    assert s.trace == ["returned 0", "caught KeyError('gone')", "after 0"]
    await runner.finish(LIMIT)
    assert s.failures == [] and not runner.failed


async def test_eager_handler_resumed_after_sleep() -> None:
    """A handler sleeping is resumed after the delay, not before, then the next handler runs."""
    s = Setup()
    loop = asyncio.get_running_loop()
    slept: list[float] = []

    async def sleeps(call: Call, f: AudioFrame) -> None:
        started = loop.time()
        await asyncio.sleep(0.01)
        slept.append(loop.time() - started)
        s.note("woke")

    s.handlers.audio += [sleeps, audio_recorder(s, "after")]
    runner = await s.start_runner()
    s.deliver(frame(0))
    await eventually(lambda: len(s.trace) == 3)
    assert s.trace == ["returned 0", "woke", "after 0"]
    # Not a timing figure: a timer never fires before its delay, so this holds on any machine
    # (and the callback returned before the handler woke: "returned 0" comes first).
    assert slept[0] >= 0.009
    assert s.tasks[1:] == [runner._task, runner._task]
    await runner.finish(LIMIT)


async def test_eager_handler_resumed_through_several_waits() -> None:
    """A handler waiting several times (a bare yield, a future, a sleep) is driven to its end."""
    s = Setup()
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()
    loop.call_later(0.002, future.set_result, "ready")

    async def many(call: Call, f: AudioFrame) -> None:
        await asyncio.sleep(0)
        s.note("yielded")
        s.note(await future)
        await asyncio.sleep(0.001)
        s.note("slept")

    s.handlers.audio += [many, audio_recorder(s, "after")]
    runner = await s.start_runner()
    s.deliver(frame(0))
    await eventually(lambda: len(s.trace) == 5)
    assert s.trace == ["returned 0", "yielded", "ready", "slept", "after 0"]
    assert set(s.tasks[1:]) == {runner._task}
    await runner.finish(LIMIT)


async def test_order_kept_behind_a_suspended_handler() -> None:
    """Frames and events arriving while an eager handler waits run after it and its followers, in order."""
    s = Setup()
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def first(call: Call, f: AudioFrame) -> None:
        s.note(f"first {f.timestamp_ms}")
        if f.timestamp_ms == 0:
            await future
            s.note("first 0 resumed")

    async def on_dtmf(call: Call, digit: str) -> None:
        s.note(f"dtmf {digit}")

    s.handlers.audio += [first, audio_recorder(s, "second"), audio_recorder(s, "third")]
    s.handlers.dtmf.append(on_dtmf)
    runner = await s.start_runner()
    s.deliver(frame(0))
    s.deliver(frame(1))
    await eventually(returned(s, 1))
    runner.dtmf("7")
    s.deliver(frame(2))
    await eventually(returned(s, 2))
    await settle()  # and the handler stays suspended
    assert s.trace == ["first 0", "returned 0", "returned 20", "returned 40"]
    future.set_result(None)
    await eventually(lambda: len(s.trace) == 14)
    assert s.trace[4:] == [
        "first 0 resumed",
        "second 0",
        "third 0",
        "first 20",
        "second 20",
        "third 20",
        "dtmf 7",
        "first 40",
        "second 40",
        "third 40",
    ]
    # idle again: the next frame is eager once more
    s.deliver(frame(3))
    await eventually(returned(s, 3), interval=0)
    assert s.trace[-4:] == ["first 60", "second 60", "third 60", "returned 60"]
    await runner.finish(LIMIT)


# asyncio.timeout inside an eager handler


async def test_eager_timeout_that_does_not_expire() -> None:
    """asyncio.timeout works in the eager part (it needs a current task) and leaves no cancellation."""
    s = Setup()

    async def timed(call: Call, f: AudioFrame) -> None:
        async with asyncio.timeout(WAIT_SECONDS):  # never reached, even on a busy machine
            s.note("inside")
            if f.timestamp_ms == 20:
                await asyncio.sleep(0.001)
        s.note("done")

    s.handlers.audio += [timed, audio_recorder(s, "after")]
    runner = await s.start_runner()
    s.deliver(frame(0))  # completes without waiting
    await eventually(returned(s, 0), interval=0)
    s.deliver(frame(1))  # waits inside the timeout
    await eventually(lambda: len(s.trace) == 8)
    assert s.trace == ["inside", "done", "after 0", "returned 0", "inside", "returned 20", "done", "after 20"]
    assert runner._task.cancelling() == 0
    await runner.finish(LIMIT)
    assert s.failures == []
    assert not runner._task.cancelled()


async def test_eager_timeout_that_expires_while_waiting() -> None:
    """A timeout expiring while an eager handler waits raises TimeoutError in it; the runner goes on."""
    s = Setup()
    waited: list[asyncio.Future[None]] = []

    async def timed(call: Call, f: AudioFrame) -> None:
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waited.append(never)
        try:
            async with asyncio.timeout(0.01):
                s.note(f"waiting {f.timestamp_ms}")
                await never
        except TimeoutError:
            s.note(f"timed out {f.timestamp_ms}")

    async def on_stop(call: Call) -> None:
        s.note("stop")

    s.handlers.audio += [timed, audio_recorder(s, "after")]
    s.handlers.stop.append(on_stop)
    runner = await s.start_runner()
    s.deliver(frame(0))
    await eventually(lambda: len(s.trace) == 4)
    assert s.trace == ["waiting 0", "returned 0", "timed out 0", "after 0"]
    assert runner._task.cancelling() == 0
    s.deliver(frame(1))
    await eventually(lambda: len(s.trace) == 8)
    assert s.trace[4:] == ["waiting 20", "returned 20", "timed out 20", "after 20"]
    await runner.finish(LIMIT)
    assert s.trace[-1] == "stop"
    assert s.failures == []
    assert [never.cancelled() for never in waited] == [True, True]


async def test_eager_timeout_already_expired_at_the_first_wait() -> None:
    """asyncio.timeout(0) in an eager handler raises TimeoutError at its first wait, as in a task."""
    s = Setup()

    async def timed(call: Call, f: AudioFrame) -> None:
        try:
            async with asyncio.timeout(0):
                await asyncio.get_running_loop().create_future()
        except TimeoutError:
            s.note("timed out")

    async def on_stop(call: Call) -> None:
        s.note("stop")

    s.handlers.audio += [timed, audio_recorder(s, "after")]
    s.handlers.stop.append(on_stop)
    runner = await s.start_runner()
    s.deliver(frame(0))
    await eventually(lambda: len(s.trace) == 3 or runner._task.done())
    assert not runner._task.done(), "the runner's task was cancelled by the handler's timeout"
    assert s.trace == ["returned 0", "timed out", "after 0"]
    await runner.finish(LIMIT)
    assert s.trace[-1] == "stop"


# Failures


async def test_eager_handler_raises() -> None:
    """A raising eager handler: on_failure once (rule "handler"), later audio skipped, on_stop runs."""
    s = Setup()

    async def broken(call: Call, f: AudioFrame) -> None:
        s.note(f"broken {f.timestamp_ms}")
        raise ValueError("bug in the application")

    async def on_stop(call: Call) -> None:
        s.note("stop")

    s.handlers.audio += [audio_recorder(s, "before"), broken, audio_recorder(s, "after")]
    s.handlers.stop.append(on_stop)
    runner = await s.start_runner()
    with capture_logs() as logs:
        s.deliver(frame(0))
        await eventually(returned(s, 0), interval=0)
        assert runner.failed
        s.deliver(frame(1))
        runner.audio(frame(2))
        await eventually(returned(s, 1))
        await settle()  # and nothing runs for them
    assert s.trace == ["before 0", "broken 0", "returned 0", "returned 20"]
    assert len(s.failures) == 1
    failure = s.failures[0]
    assert isinstance(failure, HandlerFailed)
    assert failure.rule == "handler"
    assert failure.handler.endswith("broken")
    errors = [entry for entry in logs if entry["log_level"] == "error"]
    assert len(errors) == 1 and isinstance(errors[0]["exc_info"], ValueError)
    await runner.finish(LIMIT)
    assert s.trace[-1] == "stop"
    assert len(s.failures) == 1


async def test_queued_handler_raises() -> None:
    """A raising handler run by the task: on_failure once, later events skipped, on_stop runs."""
    s = Setup()

    async def broken(call: Call, f: AudioFrame) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("boom")

    async def on_dtmf(call: Call, digit: str) -> None:
        s.note(f"dtmf {digit}")

    async def on_stop(call: Call) -> None:
        s.note("stop")

    s.handlers.audio += [broken, audio_recorder(s, "after")]
    s.handlers.dtmf.append(on_dtmf)
    s.handlers.stop.append(on_stop)
    runner = await s.start_runner()
    runner.audio(frame(0))
    runner.audio(frame(1))
    runner.dtmf("3")
    await runner.finish(LIMIT)
    assert s.trace == ["stop"]
    assert [f.rule for f in s.failures] == ["handler"]
    assert runner.failed


async def test_handler_raises_in_its_resumed_part() -> None:
    """An eager handler raising after it was resumed fails the call once; its followers do not run."""
    s = Setup()
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def broken_later(call: Call, f: AudioFrame) -> None:
        s.note("started")
        await future
        s.note("resumed")
        raise ValueError("late bug")

    async def on_stop(call: Call) -> None:
        s.note("stop")

    s.handlers.audio += [broken_later, audio_recorder(s, "after")]
    s.handlers.stop.append(on_stop)
    runner = await s.start_runner()
    s.deliver(frame(0))
    s.deliver(frame(1))
    await eventually(returned(s, 1))
    await settle()  # and the handler stays suspended
    assert not runner.failed
    future.set_result(None)
    await eventually(lambda: runner.failed)
    s.deliver(frame(2))
    await eventually(returned(s, 2))
    await runner.finish(LIMIT)
    assert s.trace == ["started", "returned 0", "returned 20", "resumed", "returned 40", "stop"]
    assert len(s.failures) == 1 and s.failures[0].rule == "handler"
    assert s.failures[0].handler.endswith("broken_later")


async def test_start_handler_raises() -> None:
    """A raising on_start fails the call: audio is then skipped, not run eagerly; on_stop still runs."""
    s = Setup()

    async def on_start(call: Call) -> None:
        raise KeyError("start")

    async def on_stop(call: Call) -> None:
        s.note("stop")

    s.handlers.start.append(on_start)
    s.handlers.audio.append(audio_recorder(s, "audio"))
    s.handlers.stop.append(on_stop)
    runner = await s.start_runner()
    runner.start()
    await eventually(lambda: runner.failed)
    s.deliver(frame(0))
    await eventually(returned(s, 0))
    await runner.finish(LIMIT)
    assert s.trace == ["returned 0", "stop"]
    assert len(s.failures) == 1


class BadAwaitable:
    """Yields something that is not a future, which no asyncio task accepts."""

    def __await__(self) -> Generator[str, None, None]:
        yield "not a future"


async def test_eager_handler_yielding_a_non_future_fails() -> None:
    """An eager handler yielding a non-future gets a RuntimeError thrown in, as a task would do."""
    s = Setup()
    caught: list[BaseException] = []

    async def bad(call: Call, f: AudioFrame) -> None:
        try:
            await BadAwaitable()
        except RuntimeError as exc:
            caught.append(exc)
            raise

    s.handlers.audio += [bad, audio_recorder(s, "after")]
    runner = await s.start_runner()
    s.deliver(frame(0))
    await eventually(lambda: caught)
    await runner.finish(LIMIT)
    assert len(caught) == 1
    assert runner.failed and len(s.failures) == 1
    assert s.trace == ["returned 0"]


@pytest.mark.parametrize("where", ["eager", "resumed", "queued"])
async def test_call_ended_is_not_a_failure(where: str) -> None:
    """A handler raising CallEnded stops that frame's handlers but does not fail the call."""
    s = Setup()

    async def sender(call: Call, f: AudioFrame) -> None:
        if f.timestamp_ms == 0:
            if where == "resumed":
                await asyncio.sleep(0)
            raise CallEnded()
        s.note(f"sender {f.timestamp_ms}")

    async def on_stop(call: Call) -> None:
        s.note("stop")

    s.handlers.audio += [sender, audio_recorder(s, "after")]
    s.handlers.stop.append(on_stop)
    runner = await s.start_runner()
    if where == "queued":
        runner.audio(frame(0))
        runner.audio(frame(1))
    else:
        s.deliver(frame(0))
        s.deliver(frame(1))
        await eventually(returned(s, 1))  # delivered before finish() stops the runner
    await runner.finish(LIMIT)
    assert s.failures == []
    assert not runner.failed
    assert [entry for entry in s.trace if not entry.startswith("returned")] == [
        "sender 20",
        "after 20",
        "stop",
    ]


# The bound on queued audio


async def test_oldest_audio_dropped_past_the_bound() -> None:
    """With max_audio_ms=100, twenty 20 ms frames queued behind a busy handler keep the newest five."""
    s = Setup(max_audio_ms=100)
    handled: list[int] = []

    async def slow(call: Call, f: AudioFrame) -> None:
        assert f.timestamp_ms is not None
        handled.append(f.timestamp_ms // 20)
        await asyncio.sleep(0.002)

    s.handlers.audio.append(slow)
    runner = await s.start_runner()
    with capture_logs() as logs:
        s.deliver(frame(0))  # eager, then busy sleeping
        # Polled at every turn: the frames below are queued in the same turn as the delivery ran,
        # before any timer can end the handler's sleep, so it is still busy however slow the machine.
        await eventually(returned(s, 0), interval=0)
        for n in range(1, 21):
            runner.audio(frame(n))
        assert runner.dropped_frames == 15
        await eventually(lambda: len(handled) == 6 and runner._idle)
    assert handled == [0, 16, 17, 18, 19, 20]
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["maxQueuedMs"] == 100
    # the queued duration was accounted back: five more frames fit without a drop
    s.deliver(frame(21))
    await eventually(returned(s, 21), interval=0)
    for n in range(22, 27):
        runner.audio(frame(n))
    await eventually(lambda: len(handled) == 12)
    assert runner.dropped_frames == 15
    assert handled[6:] == [21, 22, 23, 24, 25, 26]
    await runner.finish(LIMIT)


async def test_bound_counts_duration_not_frames() -> None:
    """The bound is in milliseconds: frames of 50 ms count for two and a half of 20 ms."""
    s = Setup(max_audio_ms=100)
    handled: list[int] = []

    async def record(call: Call, f: AudioFrame) -> None:
        assert f.timestamp_ms is not None
        handled.append(f.timestamp_ms // 20)

    s.handlers.audio.append(record)
    runner = await s.start_runner()
    for n in range(5):
        runner.audio(frame(n, ms=50))
    assert runner.dropped_frames == 3
    await runner.finish(LIMIT)
    assert handled == [3, 4]


async def test_other_events_are_never_dropped() -> None:
    """start, dtmf, mark and stop survive an audio overflow, in their places among the kept frames."""
    s = Setup(max_audio_ms=40)

    async def note_event(call: Call, *args: Any) -> None:
        arg = args[0] if args else None
        s.note(f"audio {arg.timestamp_ms}" if isinstance(arg, AudioFrame) else f"event {arg}")

    s.handlers.start.append(note_event)
    s.handlers.audio.append(note_event)
    s.handlers.dtmf.append(note_event)
    s.handlers.mark.append(note_event)
    s.handlers.stop.append(note_event)
    runner = await s.start_runner()
    runner.start()
    for n in range(10):
        runner.audio(frame(n))
        runner.dtmf(str(n))
    runner.mark(MarkEcho("m", "cleared"))
    runner.audio(frame(10))
    await runner.finish(LIMIT)
    assert runner.dropped_frames == 9
    assert s.trace == [
        "event None",
        *[f"event {n}" for n in range(9)],
        "audio 180",
        "event 9",
        f"event {MarkEcho('m', 'cleared')}",
        "audio 200",
        "event None",
    ]


# finish()


async def test_finish_waits_for_the_queue_and_on_stop() -> None:
    """finish() lets queued work and on_stop complete, then cancels the call's tasks."""
    s = Setup()

    async def slow(call: Call, f: AudioFrame) -> None:
        await asyncio.sleep(0.005)
        s.note(f"audio {f.timestamp_ms}")

    async def on_stop(call: Call) -> None:
        await asyncio.sleep(0.005)
        s.note("stop")

    s.handlers.audio.append(slow)
    s.handlers.stop.append(on_stop)
    runner = await s.start_runner()
    s.deliver(frame(0))
    await eventually(returned(s, 0), interval=0)
    runner.audio(frame(1))
    runner.audio(frame(2))
    with capture_logs() as logs:
        await runner.finish(LIMIT)
    assert s.trace == ["returned 0", "audio 0", "audio 20", "audio 40", "stop"]
    assert logs == []  # not "handlers still busy ...; cancelled"
    assert runner._task.done() and not runner._task.cancelled()
    assert s.call.cancel_calls == 1


@pytest.mark.parametrize("eager", [True, False])
async def test_finish_cancels_a_stuck_handler(eager: bool) -> None:
    """finish(0.2) with a handler stuck forever returns after about 0.2 s; the handler is cancelled."""
    s = Setup()

    async def stuck(call: Call, f: AudioFrame) -> None:
        s.note("stuck")
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            s.note("cancelled")
            raise
        finally:
            s.note("finally")

    async def on_stop(call: Call) -> None:
        s.note("stop")

    s.handlers.audio.append(stuck)
    s.handlers.stop.append(on_stop)
    runner = await s.start_runner()
    if eager:
        s.deliver(frame(0))
    else:
        runner.audio(frame(0))
    await eventually(lambda: "stuck" in s.trace)
    started = time.monotonic()
    await runner.finish(0.2)
    # Not a timing figure: the limit's timer never fires early, so this holds on any machine; no
    # upper bound, since a busy machine only makes it later.
    assert time.monotonic() - started >= 0.19
    assert s.call.cancel_calls == 1
    with contextlib.suppress(asyncio.CancelledError):
        await runner._task
    assert runner._task.cancelled()
    assert s.trace[-2:] == ["cancelled", "finally"]
    assert "stop" not in s.trace
    assert s.failures == []


# The same scenarios under uvloop


UVLOOP_SCENARIOS = [
    test_events_in_order_and_handlers_in_registration_order,
    test_eager_handlers_run_inside_the_callback_as_the_runner_task,
    test_eager_handler_suspended_on_a_lock,
    test_eager_handler_resumed_with_a_future_exception,
    test_order_kept_behind_a_suspended_handler,
    test_eager_timeout_that_does_not_expire,
    test_eager_timeout_that_expires_while_waiting,
    test_handler_raises_in_its_resumed_part,
    test_oldest_audio_dropped_past_the_bound,
]


@pytest.mark.parametrize("scenario", UVLOOP_SCENARIOS, ids=lambda f: f.__name__.removeprefix("test_"))
def test_under_uvloop(scenario: Callable[[], Awaitable[None]]) -> None:
    """The eager path behaves the same on uvloop's event loop."""

    async def main() -> None:
        await scenario()

    uvloop.run(main())


async def _timeout_expiring_before_resumption() -> None:
    s = Setup()

    async def timed(call: Call, f: AudioFrame) -> None:
        try:
            async with asyncio.timeout(0.005):
                time.sleep(0.01)  # noqa: ASYNC251 - busy past the deadline before its first wait
                await asyncio.get_running_loop().create_future()
        except TimeoutError:
            s.note("timed out")

    async def on_stop(call: Call) -> None:
        s.note("stop")

    s.handlers.audio.append(timed)
    s.handlers.stop.append(on_stop)
    runner = await s.start_runner()
    s.deliver(frame(0))
    await eventually(lambda: "timed out" in s.trace or runner._task.done())
    assert not runner._task.done(), "the runner's task was cancelled by the handler's timeout"
    assert s.trace == ["returned 0", "timed out"]
    await runner.finish(LIMIT)
    assert s.trace[-1] == "stop"


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_timeout_expiring_before_the_task_resumes_the_handler(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    """A deadline passed while an eager handler was busy raises TimeoutError at its wait, on any loop."""
    run(_timeout_expiring_before_resumption())
