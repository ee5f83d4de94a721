"""One call's recording: its bounded buffer, on the stream's timeline, feeding its sinks.

A :class:`CallRecorder` is opened when the stream starts. Inbound audio is placed by
``media.timestamp`` (:meth:`CallRecorder.place` is the buffer's own method, so the per-message
path pays no extra call), outbound audio by when it played; the buffer flushes to the sinks when
full and at least every ``flush_seconds``, each time journaling what the summary would say so
far. When the call ends, :meth:`CallRecorder.close` pads the tracks to one length, flushes, and
publishes every sink's files, the summary last, on the disk writer's thread.

A recorder with no sinks (``--no-record``) still keeps the timeline, so a summary still says how
long the call was.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Final

import structlog

from ..protocol.g711 import BYTES_PER_MS, SAMPLE_RATE
from ..protocol.stream import StreamInfo
from .buffer import AudioBuffer
from .diskwriter import DiskWriter
from .layout import Part, discard_partial, publish
from .sinks import CallFiles, Sink

__all__ = ["MAX_AHEAD_SECONDS", "CallRecorder"]

MAX_AHEAD_SECONDS: Final = 5.0
"""How far a track's timeline may run ahead of the call's wall-clock time: audio past it is
dropped (``aheadDroppedMs``), so disk and memory per call follow the call's real duration."""


class CallRecorder:
    """The recording of one call.

    Args:
        record_dir: the root of recordings.
        partial_dir: where this call's files grow while it runs.
        sinks: the formats to write (a summary sink last); none records nothing.
        writer: where file operations run.
        buffer_bytes: the capacity of the call's audio buffer.
        flush_seconds: the longest audio waits in memory before it goes to the sinks.
        log: the call's logger.
    """

    def __init__(
        self,
        record_dir: Path,
        partial_dir: Path,
        sinks: Sequence[Sink],
        writer: DiskWriter,
        *,
        buffer_bytes: int = 1 << 20,
        flush_seconds: float | None = None,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.record_dir = record_dir
        self.partial_dir = partial_dir
        self._sinks = list(sinks)
        self._writer = writer
        self._buffer_bytes = buffer_bytes
        self._flush_seconds = flush_seconds
        self._log = log or structlog.get_logger("callsock")
        self._buffer: AudioBuffer | None = None
        self._stream: StreamInfo | None = None
        self._progress: Callable[[], dict[str, Any]] = dict
        self._outbound = False
        self.started = 0.0
        """The monotonic time the stream started: where outbound audio is placed from."""
        self.place: Callable[[str, int | None, bytes], None] = _not_open
        """``place(track, offset, mulaw)``: inbound audio at ``offset`` samples (``None``: next)."""

    def open(self, stream: StreamInfo, meta: dict[str, Any], progress: Callable[[], dict[str, Any]]) -> None:
        """The stream started: make the buffer and open the sinks.

        Args:
            stream: what ``start`` said.
            meta: the same, as the summary says it.
            progress: returns what the summary would say so far, journaled at each flush.
        """
        self._stream = stream
        self._progress = progress
        self.started = time.monotonic()
        self._buffer = AudioBuffer(
            stream.tracks,
            self._buffer_bytes,
            self._deliver,
            flush_after=self._flush_seconds,
            max_ahead=MAX_AHEAD_SECONDS,
        )
        self.place = self._buffer.add_at
        files = CallFiles(stream, self.partial_dir, self._writer, meta)
        for sink in list(self._sinks):
            try:
                sink.open(files)
            except OSError as exc:
                self._drop(sink, "open", exc)

    def outbound(self, mulaw: bytes, play_time: float | None) -> None:
        """Record audio the caller heard: from ``play_time`` (monotonic), or right after the last."""
        buffer = self._buffer
        if buffer is None:
            return
        if not self._outbound:
            buffer.add_track("outbound")
            self._outbound = True
        offset = None if play_time is None else max(round((play_time - self.started) * SAMPLE_RATE), 0)
        buffer.add_at("outbound", offset, mulaw)

    def journal(self) -> None:
        """Something the summary would say changed (a DTMF digit): tell the sinks now."""
        progress = self._progress()
        for sink in self._sinks:
            sink.progress(progress)

    def figures(self) -> dict[str, int]:
        """What the timeline says: ``durationMs``, and the ``silenceMs`` and ``aheadDroppedMs`` in it."""
        buffer = self._buffer
        if buffer is None:
            return {"durationMs": 0, "silenceMs": 0, "aheadDroppedMs": 0}
        return {
            "durationMs": round(max(buffer.position_ms(t) for t in buffer.tracks)),
            "silenceMs": round(buffer.silence_bytes / BYTES_PER_MS),
            "aheadDroppedMs": round(buffer.ahead_bytes / BYTES_PER_MS),
        }

    def end(self) -> None:
        """The call ended: pad every track to the longest and flush what is buffered."""
        if self._buffer is not None:
            self._buffer.align()
            self._buffer.flush()

    def close(self, summary: dict[str, Any]) -> Future[dict[str, str]] | None:
        """Publish the call (on the writer thread); ``None`` if it records nothing.

        ``summary`` is read when it is written, last.

        Returns:
            A future of the published files by name, relative to the record directory.
        """
        if self._stream is None or not self._sinks:
            return None
        sinks, self._sinks = self._sinks, []
        future = self._writer.submit(self._publish, sinks, summary)
        assert future is not None  # only droppable writes are refused
        return future

    def discard(self) -> None:
        """The start was refused: nothing of the call is kept."""
        self._sinks.clear()

    def _publish(self, sinks: list[Sink], summary: dict[str, Any]) -> dict[str, str]:
        """Finish every sink and publish their files; if the disk refuses, the summary alone.

        Whatever happens, nothing of the call stays under ``.partial``.
        """
        stream = self._stream
        assert stream is not None
        parts: list[Part] = []
        for sink in sinks:
            try:
                parts += sink.finish(summary)
            except OSError as exc:  # its files are gone or cannot be completed
                sink.abandon(summary, exc)
        try:
            return publish(self.record_dir, stream.call_key, stream.stream_sid, parts)
        except OSError as exc:  # the audio cannot be published: the summary still is, saying why
            for sink in sinks:
                sink.abandon(summary, exc)
            discard_partial(self.partial_dir)  # room on a full disk for what follows
            rendered = [part for part in parts if part.render is not None]
            return publish(self.record_dir, stream.call_key, stream.stream_sid, rendered)
        finally:
            discard_partial(self.partial_dir)

    def _deliver(self, track: str, mulaw: bytearray) -> None:
        for sink in list(self._sinks):
            try:
                sink.write(track, mulaw)
            except OSError as exc:
                self._drop(sink, "write", exc)
        self.journal()

    def _drop(self, sink: Sink, op: str, exc: OSError) -> None:
        self._log.error("sink failed; the call goes on", sink=type(sink).__name__, op=op, exc=str(exc))
        self._sinks.remove(sink)


def _not_open(track: str, offset: int | None, mulaw: bytes) -> None:
    raise RuntimeError("CallRecorder.open() was not called")
