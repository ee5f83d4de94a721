"""Audio back to the caller: coalesced, paced against playback, with marks and clear.

Twilio plays outbound ``media`` in the order received and buffers whatever arrives early
(WebSocket Messages, "Send a media message"). Sending faster than real time makes ``clear``
useless (the caller keeps hearing what was already queued) and makes "finished sending" mean
nothing. So :class:`Outbound` keeps its own playback clock: it sends 20 ms frames and never
lets the audio queued at Twilio run more than ``lead`` ahead of what the caller hears. A
``send`` returns when its audio was handed over in time to play, not seconds early.

Tiny fragments make choppy audio, so audio is sent in whole 20 ms frames; a remainder waits for
more audio and is flushed alone only when playback would otherwise run dry, or before a mark.

Marks (section "Send a mark message"): Twilio echoes a mark when the audio before it has
played, and also echoes every pending mark when a ``clear`` empties its buffer. So an echo is
"played" only if no ``clear`` was sent since the mark; after a ``clear`` the mark's outcome is
"cleared", settled at once (a simulator may never echo it; Twilio will, and that later echo is
reported as cleared too).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from ..protocol.errors import CallEnded
from ..protocol.g711 import BYTES_PER_MS, SAMPLE_RATE
from ..protocol.stream import StreamProtocol

__all__ = ["FRAME_BYTES", "MarkOutcome", "Outbound", "Sender"]

MarkOutcome = Literal["played", "cleared"]

FRAME_BYTES: Final = 20 * BYTES_PER_MS
"""One 20 ms frame of mu-law: the unit outbound audio is sent in."""

_FRAME_SECONDS: Final = FRAME_BYTES / SAMPLE_RATE
_CLEARED_ECHOES_KEPT: Final = 256


class Sender(Protocol):
    """Where a call's messages go: ordered writes, with backpressure (a server's transport)."""

    def write(self, data: bytes) -> bool:
        """Queue one text message (UTF-8), in order; True when the peer is not keeping up.

        Raises:
            CallEnded: the connection is closing or closed.
        """

    async def drain(self) -> None:
        """Wait until the peer has read enough of what was written."""


@dataclass(slots=True)
class _Playing:
    """Audio sent and not yet played out.

    ``at`` is where the recording places it: its start time, or ``None`` for right after the
    previous audio.
    """

    chunk: bytes
    start: float
    at: float | None


@dataclass(slots=True)
class _PendingMark:
    name: str
    epoch: int
    outcome: asyncio.Future[MarkOutcome]


class Outbound:
    """One call's outbound audio, marks and clears.

    Args:
        protocol: encodes messages with the stream's SID.
        transport: where messages are written.
        record: called with ``(mulaw, play_time)`` for the audio the caller heard, once it has
            played: ``play_time`` is the monotonic time it started, or ``None`` when it played
            right after the previous audio. Audio a :meth:`clear` cut off is not recorded.
        lead: how far, in seconds, queued audio may run ahead of playback.
        clock: the monotonic clock; ``sleep`` waits on it (tests pass a virtual pair).
    """

    def __init__(
        self,
        protocol: StreamProtocol,
        transport: Sender,
        record: Callable[[bytes, float | None], None],
        *,
        lead: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._protocol = protocol
        self._transport = transport
        self._record = record
        self.lead = lead
        self._clock = clock
        self._sleep = sleep
        self._pending = bytearray()
        self._lock = asyncio.Lock()
        self._waiting = 0  # sends waiting for, or holding, the lock (only the lock-free path reads it)
        self._play_end = float("-inf")  # the first audio starts when it is sent
        self._unplayed: deque[_Playing] = deque()
        self._epoch = 0
        self._marks: deque[_PendingMark] = deque()
        self._cleared_echoes: deque[str] = deque(maxlen=_CLEARED_ECHOES_KEPT)
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self.closed = False
        self.media_sent = 0
        self.bytes_sent = 0
        self.marks_sent = 0
        self.clears_sent = 0

    @property
    def playing_until(self) -> float:
        """The monotonic time at which everything sent so far will have played."""
        return self._play_end

    @property
    def pending_marks(self) -> int:
        """Marks sent and not yet echoed or cleared."""
        return len(self._marks)

    async def audio(self, mulaw: bytes) -> bool:
        """Queue mu-law audio and send its whole frames, paced; returns when they are handed over.

        Returns:
            True, or False if a :meth:`clear` dropped part of it. If the awaiting task is
            cancelled, what it had not sent yet is dropped too.

        Raises:
            CallEnded: the call's connection has closed.
        """
        if self.closed:
            raise CallEnded()
        if len(mulaw) == FRAME_BYTES and not self._pending and not self._waiting:
            # The streaming case (an echo, a TTS frame by frame): one whole frame, nothing
            # queued before it. If playback leaves room for it, send it now, without the lock.
            now = self._clock()
            if self._play_end + _FRAME_SECONDS - self.lead <= now:
                self._play(mulaw, now)
                self.media_sent += 1
                self.bytes_sent += FRAME_BYTES
                if self._transport.write(self._protocol.media_message(mulaw)):
                    await self._transport.drain()
                return True
        self._waiting += 1
        async with self._lock:
            self._waiting -= 1
            self._cancel_flush()
            self._pending += mulaw
            try:
                completed = await self._drain(whole_frames=True)
            except asyncio.CancelledError:
                self._pending.clear()
                raise
            if self._pending:
                self._arm_flush()
            return completed

    async def mark(self, name: str) -> MarkOutcome:
        """Send a mark after all audio queued so far; return its outcome once known.

        Raises:
            CallEnded: the call ended before the mark was echoed.
        """
        self._check_open()
        async with self._lock:
            self._cancel_flush()
            await self._drain(whole_frames=False)
            outcome: asyncio.Future[MarkOutcome] = asyncio.get_running_loop().create_future()
            self._marks.append(_PendingMark(name, self._epoch, outcome))
            self.marks_sent += 1
            await self._send(self._protocol.mark_message(name))
        return await outcome

    async def clear(self) -> None:
        """Drop audio not yet sent, send ``clear``, and settle pending marks as cleared.

        Does not wait for a ``send`` in progress: that one stops at its next frame.
        """
        self._check_open()
        self._cancel_flush()
        self._epoch += 1
        self._pending.clear()
        now = self._clock()
        self._record_played(now, cut=True)
        self._play_end = min(self._play_end, now)
        while self._marks:
            pending = self._marks.popleft()
            self._cleared_echoes.append(pending.name)
            if not pending.outcome.done():
                pending.outcome.set_result("cleared")
        self.clears_sent += 1
        await self._send(self._protocol.clear_message())

    async def flush(self) -> None:
        """Send any remainder shorter than a frame now."""
        async with self._lock:
            self._cancel_flush()
            await self._drain(whole_frames=False)

    def mark_echoed(self, name: str) -> MarkOutcome:
        """Settle the oldest pending mark of that name; return whether its audio played or was cleared."""
        for pending in self._marks:
            if pending.name == name:
                self._marks.remove(pending)
                outcome: MarkOutcome = "played" if pending.epoch == self._epoch else "cleared"
                if not pending.outcome.done():
                    pending.outcome.set_result(outcome)
                return outcome
        if name in self._cleared_echoes:
            self._cleared_echoes.remove(name)
            return "cleared"
        return "played"

    async def _send(self, data: bytes) -> None:
        if self._transport.write(data):
            await self._transport.drain()

    def close(self) -> None:
        """The connection is gone: record what was sent, fail pending marks, refuse further sends."""
        self.closed = True
        self._cancel_flush()
        self._record_played(float("inf"), cut=False)
        while self._marks:
            pending = self._marks.popleft()
            if not pending.outcome.done():
                pending.outcome.set_exception(CallEnded())

    async def _drain(self, *, whole_frames: bool) -> bool:
        """Send what is pending, paced; False if a clear interrupted."""
        epoch = self._epoch
        while len(self._pending) >= FRAME_BYTES or (not whole_frames and self._pending):
            chunk = bytes(self._pending[:FRAME_BYTES])
            duration = len(chunk) / SAMPLE_RATE
            wait = self._play_end + duration - self.lead - self._clock()
            if wait > 0:
                await self._sleep(wait)
                if epoch != self._epoch:  # a clear arrived while we slept
                    return False
            self._check_open()
            del self._pending[: len(chunk)]
            self._play(chunk, self._clock())
            self.media_sent += 1
            self.bytes_sent += len(chunk)
            await self._send(self._protocol.media_message(chunk))
        return epoch == self._epoch

    def _play(self, chunk: bytes, now: float) -> None:
        """Put ``chunk`` on the playback clock after what is queued, and keep it until it has played.

        Audio that follows queued audio plays back to back with it. So does audio sent less than
        a frame after the queue ran dry: that is scheduling jitter (the reading and the writing
        of one call wait on the same event loop), not a pause the caller would notice, and
        placing such audio by the clock would put a click in the recording at every frame. Only
        a real underrun, nothing queued for longer than a frame, starts the audio at ``now``.
        """
        self._record_played(now, cut=False)
        if now - self._play_end > _FRAME_SECONDS:
            self._unplayed.append(_Playing(chunk, now, now))
            self._play_end = now + len(chunk) / SAMPLE_RATE
        else:
            self._unplayed.append(_Playing(chunk, self._play_end, None))
            self._play_end += len(chunk) / SAMPLE_RATE

    def _record_played(self, now: float, *, cut: bool) -> None:
        """Record the audio that has finished playing by ``now``.

        With ``cut`` (a clear), also record the part heard of the chunk playing now, and forget
        the rest: the caller never hears it.
        """
        unplayed = self._unplayed
        while unplayed:
            playing = unplayed[0]
            end = playing.start + len(playing.chunk) / SAMPLE_RATE
            if end > now:
                if cut:
                    heard = round((now - playing.start) * SAMPLE_RATE)
                    if heard > 0:
                        self._record(playing.chunk[:heard], playing.at)
                    unplayed.clear()
                return
            unplayed.popleft()
            self._record(playing.chunk, playing.at)

    def _arm_flush(self) -> None:
        # Flush the remainder just before playback would run dry.
        loop = asyncio.get_running_loop()
        when = max(self._play_end - 0.005, self._clock())
        self._flush_timer = loop.call_at(loop.time() + (when - self._clock()), self._start_flush)

    def _start_flush(self) -> None:
        self._flush_timer = None
        if not self.closed:
            self._flush_task = asyncio.ensure_future(self._flush_quietly())

    async def _flush_quietly(self) -> None:
        try:
            await self.flush()
        except CallEnded:
            pass

    def _cancel_flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None

    def _check_open(self) -> None:
        if self.closed:
            raise CallEnded()
