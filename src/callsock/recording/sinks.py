"""Recording: each track of a call to a WAV file, plus a JSON summary, published atomically.

While a call runs, its files grow under ``<record-dir>/.partial/<connection-id>/``: one WAV per
track (8 kHz, 16-bit PCM, mono) with a provisional header, and a JSON file with what ``start``
said. Audio is written on every buffer flush, at its place in the file, and no file stays open
between flushes, so a thousand calls hold no file descriptors and a killed server leaves each
call's audio up to its last flush on disk (``callsock recover`` publishes it).

The file operations run on a :class:`~callsock.diskwriter.DiskWriter` (a thread, in a server), so
a slow disk never stalls calls; if the disk falls so far behind that the writer's budget is
spent, a chunk of audio is dropped, and since every chunk is written at its own offset the
recording keeps its timeline, with silence where the chunk was.

When the call ends, whatever the end, the WAV headers are completed and the files are moved to
``<record-dir>/<call key>/<streamSid>.<track>.wav`` and ``<streamSid>.json``, the
JSON last. Each move is a hard link plus an unlink, which never overwrites: if a file of that
name exists (the same stream recorded by an earlier connection), the stem gets a numbered
suffix (``<streamSid>.1.inbound.wav``) and nothing is lost.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Final

import structlog

from ..protocol.g711 import SAMPLE_RATE, SAMPLE_WIDTH, ulaw_to_pcm16
from ..protocol.stream import StreamInfo
from .diskwriter import DiskWriter

__all__ = ["PARTIAL_DIR", "WavRecorder", "discard_partial", "publish", "publish_summary", "wav_header"]

_log = structlog.get_logger("callsock")

PARTIAL_DIR: Final = ".partial"
"""The directory, inside the record directory, where calls in progress are written."""

_HEADER_BYTES: Final = 44
_MAX_DATA_BYTES: Final = 0xFFFFFFFF - 36


def wav_header(data_bytes: int) -> bytes:
    """Return the 44-byte RIFF header of a mono 16-bit 8 kHz PCM WAV with ``data_bytes`` of audio."""
    data_bytes = min(data_bytes, _MAX_DATA_BYTES)
    byte_rate = SAMPLE_RATE * SAMPLE_WIDTH
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + data_bytes,
        b"WAVE",
        b"fmt ",
        16,  # fmt chunk size
        1,  # PCM
        1,  # channels
        SAMPLE_RATE,
        byte_rate,
        SAMPLE_WIDTH,  # block align
        8 * SAMPLE_WIDTH,  # bits per sample
        b"data",
        data_bytes,
    )


class WavRecorder:
    """Writes one call's tracks to WAV files and publishes them with its summary.

    Args:
        record_dir: the root directory of recordings.
        connection_id: unique per connection; names the directory of files in progress.
        writer: where the file operations run; by default at once, on the caller's thread.
    """

    def __init__(self, record_dir: Path, connection_id: str, writer: DiskWriter | None = None) -> None:
        self.record_dir = record_dir
        self.partial_dir = record_dir / PARTIAL_DIR / connection_id
        self.dropped_bytes = 0
        """PCM bytes refused before the disk: the writer had fallen too far behind."""
        self.lost_bytes = 0
        """PCM bytes the disk refused (full, or the directory gone); written on the writer thread."""
        self.loss: str | None = None
        """Why the disk refused, the first time."""
        self._writer = writer or DiskWriter(inline=True)
        self._stream: StreamInfo | None = None
        self._sizes: dict[str, int] = {}  # PCM bytes per track, as placed (written or not)
        self._meta: dict[str, Any] = {}
        self._progress: dict[str, Any] = {}
        self._progress_queued = False
        self._closed = False

    def open(self, stream: StreamInfo, meta: dict[str, Any]) -> None:
        """Create the call's partial files: an empty WAV per track and the start metadata."""
        _safe_component(stream.stream_sid)
        _safe_component(stream.call_key)
        self._stream = stream
        self._sizes = dict.fromkeys(stream.tracks, 0)
        self._meta = meta
        self._writer.submit(self._create, list(stream.tracks), meta)

    def progress(self, data: dict[str, Any]) -> None:
        """Journal what the call has told so far (DTMF, counters) beside its audio.

        ``callsock recover`` puts it in the summary of a call a crash cut short. Writes are
        coalesced: however often this is called, at most one waits for the writer at a time,
        and it writes the latest ``data`` (which must not be changed afterwards).
        """
        if self._closed:
            return
        self._progress = data
        if not self._progress_queued:
            self._progress_queued = True
            self._writer.submit(self._write_progress)

    def write(self, track: str, mulaw: bytes | bytearray) -> None:
        """Write a chunk of ``track``'s mu-law audio, decoded to PCM, after what came before.

        A track ``start`` did not announce (the outbound audio of a bidirectional call) gets
        its file on first write.
        """
        self._require_stream()
        if track not in self._sizes:
            self._sizes[track] = 0
            self._writer.submit(self._create, [track], None)
        offset = self._sizes[track]
        if offset + 2 * len(mulaw) > _MAX_DATA_BYTES:  # never past the RIFF format's 4 GiB
            self.dropped_bytes += 2 * len(mulaw)
            return
        pcm = ulaw_to_pcm16(mulaw)
        self._sizes[track] = offset + len(pcm)
        if self._writer.submit(self._write_at, track, offset, pcm, size=len(pcm), droppable=True) is None:
            self.dropped_bytes += len(pcm)

    def close(self, summary: dict[str, Any]) -> Future[dict[str, str]]:
        """Complete the WAV headers and publish every file, the JSON summary last.

        Returns:
            A future of the published files, by track, plus ``"summary"``, as paths relative to
            the record directory (also recorded in the summary under ``files``).
        """
        self._require_stream()
        self._closed = True
        future = self._writer.submit(self._finalize, dict(self._sizes), summary)
        assert future is not None  # only droppable writes are refused
        return future

    # What follows runs on the writer thread. A disk that refuses (full, or the record directory
    # deleted) loses the audio, counted, and never the call; the summary says how much and why.

    def _create(self, tracks: list[str], meta: dict[str, Any] | None) -> None:
        try:
            self.partial_dir.mkdir(parents=True, exist_ok=True)
            for track in tracks:
                self._partial_wav(track).write_bytes(wav_header(0))
            if meta is not None:
                _write_json(self._partial_json(), meta)
        except OSError as exc:
            self._lose(0, exc)  # the writes that follow will fail and count

    def _write_progress(self) -> None:
        self._progress_queued = False  # before reading: a newer progress queues another write
        try:
            _write_json(self._partial_json(), {**self._meta, **self._progress})
        except OSError as exc:
            self._lose(0, exc)

    def _write_at(self, track: str, offset: int, pcm: bytes) -> None:
        try:
            fd = os.open(self._partial_wav(track), os.O_WRONLY)
            try:
                written = os.pwrite(fd, pcm, _HEADER_BYTES + offset)
            finally:
                os.close(fd)
        except OSError as exc:
            self._lose(len(pcm), exc)
            return
        if written < len(pcm):  # the disk filled up in the middle
            self._lose(len(pcm) - written, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    def _lose(self, pcm_bytes: int, exc: OSError) -> None:
        self.lost_bytes += pcm_bytes
        if self.loss is None:
            self.loss = exc.strerror or str(exc)
            _log.error(
                "recording is losing audio; the call goes on", path=str(self.partial_dir), exc=self.loss
            )

    def _finalize(self, sizes: dict[str, int], summary: dict[str, Any]) -> dict[str, str]:
        stream = self._require_stream()
        sid, key = stream.stream_sid, stream.call_key
        try:  # what the disk refused is silence in the WAVs: their timeline is whole
            return publish(self.record_dir, self.partial_dir, sid, key, sizes, summary, self._extra())
        except OSError as exc:  # the audio cannot be published: the summary still is, saying why
            self.lost_bytes = sum(sizes.values())
            self._lose(0, exc)
            discard_partial(self.partial_dir)
            return publish_summary(self.record_dir, sid, key, summary, self._extra())

    def _extra(self) -> dict[str, Any]:
        """The summary's account of audio not recorded, if any."""
        extra: dict[str, Any] = {}
        if self.dropped_bytes:
            extra["recordingDroppedMs"] = round(self.dropped_bytes / SAMPLE_WIDTH / 8)
        if self.lost_bytes or self.loss:
            extra["recordingLostMs"] = round(self.lost_bytes / SAMPLE_WIDTH / 8)
            extra["recordingError"] = self.loss
        return extra

    def _partial_wav(self, track: str) -> Path:
        return self.partial_dir / f"{self._require_stream().stream_sid}.{track}.wav"

    def _partial_json(self) -> Path:
        return self.partial_dir / f"{self._require_stream().stream_sid}.json"

    def _require_stream(self) -> StreamInfo:
        if self._stream is None:
            raise RuntimeError("WavRecorder.open() was not called")
        return self._stream


def publish(
    record_dir: Path,
    partial_dir: Path,
    stream_sid: str,
    call_key: str,
    sizes: dict[str, int],
    summary: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Complete the WAV headers of a call's partial files and move them into place.

    The files become ``<record_dir>/<call_key>/<stem>.<track>.wav`` and ``<stem>.json`` (last),
    the stem being the streamSid, or the streamSid and the next free number when those names
    are taken (numbers never run out).

    Args:
        record_dir: the root of recordings.
        partial_dir: the directory the call's files were written in.
        stream_sid: the stream's SID (the partial files' stem).
        call_key: the call's directory name (:attr:`~callsock.protocol.StreamInfo.call_key`).
        sizes: the PCM bytes of each track's WAV.
        summary: the JSON to publish beside them (read only when it is written, last).
        extra: more fields for the JSON.

    Returns:
        The published files, by track, plus ``"summary"``, relative to ``record_dir``.

    Raises:
        OSError: the disk refused; nothing is left published (the partial files stay).
    """
    partial_wav = {track: partial_dir / f"{stream_sid}.{track}.wav" for track in sizes}
    for track, size in sizes.items():
        with partial_wav[track].open("r+b") as f:
            f.truncate(_HEADER_BYTES + size)  # audio that never reached the disk becomes silence
            f.write(wav_header(size))
    dest = record_dir / _safe_component(call_key)
    dest.mkdir(parents=True, exist_ok=True)
    for stem in _stems(dest, stream_sid):
        moves = [(partial_wav[track], dest / f"{stem}.{track}.wav") for track in sizes]
        files = {
            track: str(target.relative_to(record_dir))
            for track, (_, target) in zip(sizes, moves, strict=True)
        }
        if not _link_all(moves):
            continue
        try:
            final_json = partial_dir / f"{stem}.final.json"
            files["summary"] = str((dest / f"{stem}.json").relative_to(record_dir))
            _write_json(final_json, {**summary, **(extra or {}), "files": files})
            linked = _link(final_json, dest / f"{stem}.json")
            final_json.unlink()
        except OSError:
            _unlink_targets(moves)
            raise
        if not linked:
            _unlink_targets(moves)
            continue
        for source, _ in moves:
            source.unlink()
        discard_partial(partial_dir)
        return files
    raise AssertionError("unreachable: stems never run out")


def publish_summary(
    record_dir: Path, stream_sid: str, call_key: str, summary: dict[str, Any], extra: dict[str, Any]
) -> dict[str, str]:
    """Publish a call's JSON summary alone, when its audio could not be.

    That is a full disk, or a deleted record directory (made again here if need be).

    Returns:
        ``{"summary": path}``, relative to ``record_dir``.
    """
    dest = record_dir / _safe_component(call_key)
    dest.mkdir(parents=True, exist_ok=True)
    for stem in _stems(dest, stream_sid):
        files = {"summary": str((dest / f"{stem}.json").relative_to(record_dir))}
        draft = dest / f".{stem}.json.tmp"
        _write_json(draft, {**summary, **extra, "files": files})
        try:
            if _link(draft, dest / f"{stem}.json"):
                return files
        finally:
            draft.unlink()
    raise AssertionError("unreachable: stems never run out")


def discard_partial(partial_dir: Path) -> None:
    """Remove a call's partial directory and whatever is left in it."""
    shutil.rmtree(partial_dir, ignore_errors=True)


def _stems(dest: Path, stream_sid: str) -> Iterator[str]:
    """The streamSid, then ``<streamSid>.<n>`` from the first number past those taken, without end."""
    yield stream_sid
    numbered = re.compile(re.escape(stream_sid) + r"\.(\d+)\.")
    taken = (numbered.match(name) for name in os.listdir(dest))
    number = max((int(m.group(1)) for m in taken if m), default=0) + 1
    while True:  # a name taken meanwhile (by another server on the same disk) moves on to the next
        yield f"{stream_sid}.{number}"
        number += 1


def _link_all(moves: list[tuple[Path, Path]]) -> bool:
    done: list[tuple[Path, Path]] = []
    for source, target in moves:
        if not _link(source, target):
            _unlink_targets(done)
            return False
        done.append((source, target))
    return True


def _unlink_targets(moves: list[tuple[Path, Path]]) -> None:
    for _, target in moves:
        target.unlink(missing_ok=True)


def _link(source: Path, target: Path) -> bool:
    """Give ``source`` the name ``target`` without overwriting; False if ``target`` exists.

    A hard link is the one atomic no-overwrite rename POSIX offers, so the record directory
    must be on a file system with hard links (any local Linux one).
    """
    try:
        os.link(source, target)
    except FileExistsError:
        return False
    return True


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _safe_component(name: str) -> str:
    # SIDs are validated by the protocol; this guards the recorder used on its own.
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"unsafe directory name: {name!r}")
    return name
