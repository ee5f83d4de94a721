"""What an application's handlers are given: the :class:`Call`, its audio frames and mark echoes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from ..protocol.errors import CallEnded, OneWayStream
from ..protocol.g711 import BYTES_PER_MS, SAMPLE_RATE
from ..protocol.messages import MAX_MARK_CHARS
from ..protocol.stream import StreamInfo
from .audio import PCM, mulaw_to_pcm, pcm_to_mulaw
from .outbound import MarkOutcome, Outbound
from .session import CallSession, EndReason

__all__ = ["AudioFrame", "Call", "CallStats", "MarkEcho"]


class AudioFrame:
    """One chunk of a track's audio, as Twilio sent it (usually 20 ms).

    Attributes:
        track: ``inbound`` (the caller) or ``outbound`` (the callee, on a two-track fork).
        timestamp_ms: where the chunk starts on the stream's timeline, in milliseconds.
        mulaw: the raw mu-law bytes.
    """

    __slots__ = ("_pcm", "mulaw", "timestamp_ms", "track")

    def __init__(self, track: str, timestamp_ms: int | None, mulaw: bytes) -> None:
        self.track = track
        self.timestamp_ms = timestamp_ms
        self.mulaw = mulaw
        self._pcm: PCM | None = None

    @property
    def pcm(self) -> PCM:
        """The audio as 16-bit PCM samples at 8 kHz (decoded on first use)."""
        if self._pcm is None:
            self._pcm = mulaw_to_pcm(self.mulaw)
        return self._pcm

    @property
    def duration_ms(self) -> float:
        """The chunk's length in milliseconds."""
        return len(self.mulaw) / BYTES_PER_MS

    def __repr__(self) -> str:
        return f"AudioFrame(track={self.track!r}, timestamp_ms={self.timestamp_ms}, bytes={len(self.mulaw)})"


@dataclass(frozen=True, slots=True)
class MarkEcho:
    """Twilio echoed a mark: its audio ``played``, or was ``cleared`` before it could."""

    name: str
    outcome: MarkOutcome


@dataclass(frozen=True, slots=True)
class CallStats:
    """A snapshot of what has happened on a call so far."""

    messages: int
    media_bytes: int
    audio_frames_dropped: int
    media_sent: int
    bytes_sent: int
    marks_sent: int
    clears_sent: int


class Call:
    """One phone call, as an application sees it.

    Created by the server when ``start`` arrives; handlers receive it. Sending (audio, marks,
    clear) is only possible on a bidirectional ``<Connect><Stream>``.
    """

    def __init__(
        self,
        session: CallSession,
        outbound: Outbound,
        *,
        bidirectional: bool,
        hangup: Callable[[], Awaitable[None]],
        dropped_frames: Callable[[], int],
    ) -> None:
        stream = session.stream
        assert stream is not None
        self._stream: StreamInfo = stream
        self._session = session
        self._outbound = outbound
        self._hangup = hangup
        self._dropped_frames = dropped_frames
        self._tasks: set[asyncio.Task[Any]] = set()
        self.bidirectional = bidirectional
        """Whether the application may send audio, marks and clears (a ``<Connect>`` stream)."""
        self.state: dict[str, Any] = {}
        """A place for the application's own per-call data."""

    @property
    def call_sid(self) -> str | None:
        """The call's SID (``None`` in the seed dialect when not given)."""
        return self._stream.call_sid

    @property
    def stream_sid(self) -> str:
        """The stream's SID."""
        return self._stream.stream_sid

    @property
    def account_sid(self) -> str | None:
        """The Twilio account's SID, when given."""
        return self._stream.account_sid

    @property
    def custom_parameters(self) -> dict[str, str]:
        """The ``<Parameter>`` values of the TwiML ``<Stream>``."""
        return self._stream.custom_parameters

    @property
    def tracks(self) -> tuple[str, ...]:
        """The tracks the stream carries (``inbound``, and ``outbound`` on a two-track fork)."""
        return self._stream.tracks

    @property
    def end_reason(self) -> EndReason | None:
        """Why the call ended, once it has (``stop``, ``closed``, ``hangup``...)."""
        return self._session.end_reason

    @property
    def stats(self) -> CallStats:
        """Counters of the call so far."""
        counters = self._session.counters
        out = self._outbound
        return CallStats(
            messages=counters.total,
            media_bytes=counters.media_bytes,
            audio_frames_dropped=self._dropped_frames(),
            media_sent=out.media_sent,
            bytes_sent=out.bytes_sent,
            marks_sent=out.marks_sent,
            clears_sent=out.clears_sent,
        )

    async def send_audio(self, pcm: PCM | bytes, sample_rate: int = SAMPLE_RATE) -> bool:
        """Play 16-bit PCM (a numpy int16 array or little-endian bytes) at any rate to the caller.

        It is resampled to 8 kHz with soxr, encoded to mu-law and sent in 20 ms frames paced
        against playback; returns when the audio has been handed over in time to play.

        Returns:
            True, or False when a :meth:`clear` cut it short (the rest was dropped). Cancelling
            the task that awaits it drops the rest too.

        Raises:
            OneWayStream: the stream is a one-way ``<Start>`` fork.
            CallEnded: the call has ended.
        """
        if not self.bidirectional:
            raise OneWayStream()
        return await self._outbound.audio(pcm_to_mulaw(pcm, sample_rate))

    async def send_mulaw(self, data: bytes) -> bool:
        """Play raw 8 kHz mu-law bytes (no file header) to the caller; see :meth:`send_audio`."""
        if not self.bidirectional:
            raise OneWayStream()
        return await self._outbound.audio(data)

    def play(self, pcm: PCM | bytes, sample_rate: int = SAMPLE_RATE) -> asyncio.Task[bool]:
        """Start :meth:`send_audio` in the background and return its task.

        Handlers of a call run one at a time, so a handler that awaits a long ``send_audio``
        holds up the next ones (and barge-in); ``play`` lets them go on. The task is cancelled
        when the call ends.
        """
        self._check_bidirectional()
        return self.create_task(self.send_audio(pcm, sample_rate))

    def create_task(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` beside the handlers; it is cancelled when the call ends.

        If it fails, the traceback is logged (a :class:`CallEnded` is not a failure: the call
        simply ended while it was sending).
        """
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    async def mark(self, name: str) -> MarkOutcome:
        """Send a mark after the audio sent so far; return ``played`` or ``cleared`` once Twilio echoes it.

        Raises:
            ValueError: ``name`` is longer than ``MAX_MARK_CHARS`` (256): its echo would be refused.
        """
        if len(name) > MAX_MARK_CHARS:
            raise ValueError(f"a mark name may have at most {MAX_MARK_CHARS} characters")
        self._check_bidirectional()
        return await self._outbound.mark(name)

    async def clear(self) -> None:
        """Stop what the caller hears now: drop queued audio and tell Twilio to empty its buffer."""
        self._check_bidirectional()
        await self._outbound.clear()

    async def hangup(self) -> None:
        """End the stream: let the audio sent so far finish playing, then close the WebSocket.

        On a bare ``<Connect><Stream>`` Twilio then hangs up the call; TwiML after ``</Connect>``
        runs otherwise.
        """
        await self._hangup()

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, CallEnded):
            self._session.log.error("background task failed", task=task.get_name(), exc_info=exc)

    def cancel_tasks(self) -> None:
        """Cancel the background tasks of :meth:`play` and :meth:`create_task`."""
        for task in list(self._tasks):
            task.cancel()

    def _check_bidirectional(self) -> None:
        if not self.bidirectional:
            raise OneWayStream()

    def __repr__(self) -> str:
        return f"Call(call_sid={self.call_sid!r}, stream_sid={self.stream_sid!r})"
