"""A call's bounded audio buffer, which also places each track on the stream's timeline.

Audio is kept as mu-law (one byte a sample, half the memory of PCM) until it is flushed. The
buffer holds at most ``capacity`` bytes across all tracks (the seed guide's 1 MiB by default):
when a chunk would overflow it, everything buffered is handed to the ``deliver`` callback first,
so memory per call stays bounded however long the call lasts. Delivered bytes are overwritten
with zeros before the memory is released, since call audio is personal data.

Timeline: ``media.timestamp`` is the presentation time in milliseconds from the start of the
stream (WebSocket Messages, "media.timestamp"). A chunk that starts later than the audio so far
ends leaves a gap, filled with mu-law silence, so a lost frame is silence, not a shift of
everything after it. A chunk that starts earlier (an overlap, or a clock that steps back) is
appended as it is: no audio is dropped. Frame size is never assumed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Final

from ..protocol.g711 import BYTES_PER_MS, MULAW_SILENCE, SAMPLE_RATE

__all__ = ["AudioBuffer", "Deliver"]

Deliver = Callable[[str, bytearray], None]
"""Receives ``(track, mulaw)``; the bytearray is only valid during the call: keep no view of it."""

_SILENCE_CHUNK: Final = bytes([MULAW_SILENCE]) * 8000


class _Track:
    __slots__ = ("buffer", "position", "skipped")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.position = 0  # bytes of this track on the timeline so far, buffered or delivered
        # Timeline bytes a clamped jump skipped: later timestamps are read relative to the
        # audio actually kept, so one jump is clamped once, not refilled by the next chunk.
        self.skipped = 0


class AudioBuffer:
    """Buffers mu-law audio per track, on the stream's timeline, up to ``capacity`` bytes.

    Args:
        tracks: the track ids that may be added.
        capacity: the most bytes held across all tracks before a flush.
        deliver: called with each track's buffered bytes on a flush.
        max_gap_ms: the longest silence one timestamp jump may insert; a longer jump is
            clamped, which bounds what a single message can make the server write.
        flush_after: also flush once the oldest buffered audio is this many seconds old, so a
            crash loses at most that much (``None``: only when full).
        max_ahead: how many seconds a track may run ahead of the time since the buffer was made
            (``None``: no limit). Audio past that is dropped and counted (:attr:`ahead_bytes`):
            however its timestamps jump, a stream cannot make the server keep or write more
            audio than the call has lasted.
        clock: the monotonic clock ``flush_after`` and ``max_ahead`` are measured on.
    """

    def __init__(
        self,
        tracks: Iterable[str],
        capacity: int,
        deliver: Deliver,
        *,
        max_gap_ms: int = 60_000,
        flush_after: float | None = None,
        max_ahead: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least one byte")
        self._flush_after = flush_after
        self._clock = clock
        self._started = clock()
        self._max_ahead = None if max_ahead is None else round(max_ahead * SAMPLE_RATE)
        self._horizon = self._max_ahead if self._max_ahead is not None else 1 << 62
        self.ahead_bytes = 0
        self._oldest = 0.0
        self.capacity = capacity
        self.size = 0
        self.silence_bytes = 0
        self.clamped_gaps = 0
        self._deliver = deliver
        self._max_gap = max_gap_ms * BYTES_PER_MS
        self._tracks = {track: _Track() for track in tracks}

    @property
    def tracks(self) -> tuple[str, ...]:
        """The tracks this buffer holds."""
        return tuple(self._tracks)

    def add_track(self, track: str) -> None:
        """Start a new, empty track (the outbound audio of a bidirectional call, say)."""
        if track not in self._tracks:
            self._tracks[track] = _Track()

    def add(self, track: str, timestamp_ms: int | None, data: bytes) -> None:
        """Add a chunk of ``track`` that starts at ``timestamp_ms`` (``None``: right after the last)."""
        self.add_at(track, None if timestamp_ms is None else timestamp_ms * BYTES_PER_MS, data)

    def add_at(self, track: str, offset: int | None, data: bytes) -> None:
        """Add a chunk of ``track`` that starts ``offset`` samples into the stream (``None``: next)."""
        state = self._tracks[track]
        gap = 0 if offset is None else offset - state.skipped - state.position
        if gap > self._max_gap:
            state.skipped += gap - self._max_gap
            gap = self._max_gap
            self.clamped_gaps += 1
        end = state.position + len(data) + (gap if gap > 0 else 0)
        if end > self._horizon:
            fitted = self._fit(state, gap, data)
            if fitted is None:
                return
            gap = fitted
        if gap > 0:
            self.add_silence(track, gap)
        self._append(state, data)

    def _fit(self, state: _Track, gap: int, data: bytes) -> int | None:
        """The gap that puts ``data`` before the horizon (read again from the clock), or ``None``.

        A gap that would cross the horizon shrinks (the timeline skips the rest, as for a clamped
        jump); audio that still cannot fit is dropped and its place skipped too, so the next
        chunk is read relative to what was kept.
        """
        assert self._max_ahead is not None
        self._horizon = round((self._clock() - self._started) * SAMPLE_RATE) + self._max_ahead
        room = self._horizon - state.position - len(data)
        if gap > 0 and gap > room:
            cut = gap - max(room, 0)
            state.skipped += cut
            gap -= cut
        if room >= 0:
            return gap
        state.skipped += len(data)
        self.ahead_bytes += len(data)
        return None

    def add_silence(self, track: str, count: int) -> None:
        """Append ``count`` bytes of mu-law silence to ``track``."""
        self.silence_bytes += count
        state = self._tracks[track]
        while count > 0:
            chunk = min(count, len(_SILENCE_CHUNK), self.capacity)
            self._append(state, _SILENCE_CHUNK[:chunk])
            count -= chunk

    def align(self) -> None:
        """Pad every track with silence to the end of the longest, so all last as long as the stream."""
        end = max((t.position for t in self._tracks.values()), default=0)
        for track, state in self._tracks.items():
            if state.position < end:
                self.add_silence(track, end - state.position)

    def position_ms(self, track: str) -> float:
        """How far ``track`` reaches on the timeline, in milliseconds."""
        return self._tracks[track].position / BYTES_PER_MS

    def flush(self) -> None:
        """Deliver everything buffered, then wipe and release it.

        ``deliver`` should not raise (the session catches its sinks' errors); if it does, the
        buffer is wiped all the same and the error propagates.
        """
        try:
            for track, state in self._tracks.items():
                if state.buffer:
                    self._deliver(track, state.buffer)
        finally:
            for state in self._tracks.values():
                state.buffer[:] = bytes(len(state.buffer))
                state.buffer.clear()
            self.size = 0

    def _append(self, state: _Track, data: bytes) -> None:
        size = len(data)
        if self.size + size > self.capacity:
            self.flush()
        if not self.size and self._flush_after is not None:
            self._oldest = self._clock()
        state.buffer += data
        state.position += size
        self.size += size
        if self.size >= self.capacity:
            self.flush()
        elif self._flush_after is not None and self._clock() - self._oldest >= self._flush_after:
            self.flush()
