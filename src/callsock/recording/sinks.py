"""Recording formats as sinks: what a call's flushed audio is written as, and what gets published.

A :class:`Sink` is one format. It is opened when the stream starts, takes each track's audio as
the call's buffer flushes it, hears what the summary would say so far (to journal it for a
crash), and when the call ends hands over the :class:`~callsock.recording.layout.Part` s to
publish. File operations go to the call's :class:`~callsock.recording.diskwriter.DiskWriter` (a
thread, in a server), so a slow disk never stalls calls. Adding a format is a module with one
class like these, given to ``App.add_sink``.

- :class:`WavSink`: one WAV per track (8 kHz, 16-bit PCM, mono), written at each chunk's place,
  so a chunk the writer had to drop is silence and the timeline holds.
- :class:`SummarySink`: the call's JSON summary, published last; while the call runs it journals
  what ``start`` said and the DTMF and counters so far, for ``callsock recover``.

A disk that refuses (full, or the record directory deleted) costs audio, counted in the summary
(``recordingLostMs``, ``recordingError``), never the call.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from ..protocol.g711 import SAMPLE_WIDTH, ulaw_to_pcm16
from ..protocol.stream import StreamInfo
from .diskwriter import DiskWriter
from .layout import HEADER_BYTES, MAX_DATA_BYTES, Part, partial_file, wav_header, write_json

__all__ = ["CallFiles", "Sink", "SummarySink", "WavSink"]

_log = structlog.get_logger("callsock")


@dataclass(frozen=True, slots=True)
class CallFiles:
    """What a sink needs to know of the call it records."""

    stream: StreamInfo
    partial_dir: Path
    """Where the call's files grow while it runs (the sink creates it if it writes)."""
    writer: DiskWriter
    """Where file operations run, in order."""
    meta: dict[str, Any]
    """What ``start`` said, as the summary will say it."""


class Sink(Protocol):
    """One recording format."""

    def open(self, call: CallFiles) -> None:
        """The stream started: prepare its files."""

    def write(self, track: str, mulaw: bytes | bytearray) -> None:
        """Take a flushed chunk of ``track``'s audio, right after the last.

        The bytes are only valid during the call: copy what must be kept.
        """

    def progress(self, data: dict[str, Any]) -> None:
        """What the summary would say so far (``dtmf``, ``counters``); keep no reference to change."""

    def finish(self, summary: dict[str, Any]) -> list[Part]:
        """On the writer thread, after every write: complete the files; return what to publish.

        A sink may add fields to ``summary`` (what it lost, say); the summary sink, last, renders it.
        """

    def abandon(self, summary: dict[str, Any], exc: OSError) -> None:
        """Its files cannot be published (``exc``): say in ``summary`` what this format lost."""


class WavSink:
    """One WAV file per track, each chunk written at its place on the track's timeline."""

    def __init__(self) -> None:
        self.dropped_bytes = 0
        """PCM bytes refused before the disk: the writer had fallen too far behind."""
        self.lost_bytes = 0
        """PCM bytes the disk refused; counted on the writer thread."""
        self.loss: str | None = None
        """Why the disk refused, the first time."""
        self._call: CallFiles | None = None
        self._sizes: dict[str, int] = {}  # PCM bytes per track, as placed (written or not)

    def open(self, call: CallFiles) -> None:
        """Create an empty WAV per announced track."""
        self._call = call
        self._sizes = dict.fromkeys(call.stream.tracks, 0)
        call.writer.submit(self._create, list(call.stream.tracks))

    def write(self, track: str, mulaw: bytes | bytearray) -> None:
        """Write a chunk, decoded to PCM, after what came before; a new track gets its file."""
        call = self._require()
        if track not in self._sizes:  # the outbound audio of a bidirectional call
            self._sizes[track] = 0
            call.writer.submit(self._create, [track])
        offset = self._sizes[track]
        if offset + 2 * len(mulaw) > MAX_DATA_BYTES:  # never past the RIFF format's 4 GiB
            self.dropped_bytes += 2 * len(mulaw)
            return
        pcm = ulaw_to_pcm16(mulaw)
        self._sizes[track] = offset + len(pcm)
        if call.writer.submit(self._write_at, track, offset, pcm, size=len(pcm), droppable=True) is None:
            self.dropped_bytes += len(pcm)

    def progress(self, data: dict[str, Any]) -> None:
        """Nothing to journal: the WAVs are their own journal (their size is their length)."""

    def finish(self, summary: dict[str, Any]) -> list[Part]:
        """Complete each WAV's header (audio that never reached the disk becomes silence)."""
        for track, size in self._sizes.items():
            path = self._path(track)
            with path.open("r+b") as f:
                f.truncate(HEADER_BYTES + size)
                f.write(wav_header(size))
        if self.dropped_bytes:
            summary["recordingDroppedMs"] = _ms(self.dropped_bytes)
        self.account(summary)
        return [Part(track, f"{track}.wav", path=self._path(track)) for track in self._sizes]

    def abandon(self, summary: dict[str, Any], exc: OSError) -> None:
        """The WAVs cannot be published: all their audio is lost, and the summary says why."""
        self.lose(0, exc)
        self.lost_bytes = sum(self._sizes.values())
        self.account(summary)

    def account(self, summary: dict[str, Any]) -> None:
        """Say in ``summary`` what audio the disk refused, if any."""
        if self.lost_bytes or self.loss:
            summary["recordingLostMs"] = _ms(self.lost_bytes)
            summary["recordingError"] = self.loss

    def lose(self, pcm_bytes: int, exc: OSError) -> None:
        """Count audio the disk refused (on the writer thread); log the first refusal."""
        self.lost_bytes += pcm_bytes
        if self.loss is None:
            self.loss = exc.strerror or str(exc)
            call = self._require()
            _log.error("recording loses audio; the call goes on", path=str(call.partial_dir), exc=self.loss)

    def _create(self, tracks: list[str]) -> None:
        try:
            self._require().partial_dir.mkdir(parents=True, exist_ok=True)
            for track in tracks:
                self._path(track).write_bytes(wav_header(0))
        except OSError as exc:
            self.lose(0, exc)  # the writes that follow fail and count

    def _write_at(self, track: str, offset: int, pcm: bytes) -> None:
        try:
            fd = os.open(self._path(track), os.O_WRONLY)
            try:
                written = os.pwrite(fd, pcm, HEADER_BYTES + offset)
            finally:
                os.close(fd)
        except OSError as exc:
            self.lose(len(pcm), exc)
            return
        if written < len(pcm):  # the disk filled up in the middle
            self.lose(len(pcm) - written, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    def _path(self, track: str) -> Path:
        call = self._require()
        return partial_file(call.partial_dir, call.stream.stream_sid, f"{track}.wav")

    def _require(self) -> CallFiles:
        if self._call is None:
            raise RuntimeError("WavSink.open() was not called")
        return self._call


class SummarySink:
    """The call's JSON summary: journaled while the call runs, published last when it ends."""

    def __init__(self) -> None:
        self._call: CallFiles | None = None
        self._progress: dict[str, Any] = {}
        self._queued = False
        self._closed = False

    def open(self, call: CallFiles) -> None:
        """Journal what ``start`` said."""
        self._call = call
        call.writer.submit(self._journal)

    def write(self, track: str, mulaw: bytes | bytearray) -> None:
        """The summary holds no audio."""

    def progress(self, data: dict[str, Any]) -> None:
        """Journal the DTMF and counters so far, for a crash.

        Writes are coalesced: however often this is called, at most one waits for the writer,
        and it writes the latest ``data``.
        """
        if self._closed or self._call is None:
            return
        self._progress = data
        if not self._queued:
            self._queued = True
            self._call.writer.submit(self._journal)

    def abandon(self, summary: dict[str, Any], exc: OSError) -> None:
        """Nothing to give up: the summary is rendered anew wherever it can be written."""

    def finish(self, summary: dict[str, Any]) -> list[Part]:
        """The summary, rendered with the names of every published file, published last."""
        self._closed = True
        return [Part("summary", "json", render=lambda files: {**summary, "files": files})]

    def _journal(self) -> None:
        self._queued = False  # before reading: a newer progress queues another write
        call = self._call
        assert call is not None
        try:
            call.partial_dir.mkdir(parents=True, exist_ok=True)
            journal = partial_file(call.partial_dir, call.stream.stream_sid, "json")
            write_json(journal, {**call.meta, **self._progress})
        except OSError:
            pass  # the journal is best effort; what the disk refuses of the audio is counted


def _ms(pcm_bytes: int) -> int:
    return round(pcm_bytes / SAMPLE_WIDTH / 8)
