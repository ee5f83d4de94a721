"""Recording: each track of a call to a WAV file, plus a JSON summary, published atomically.

While a call runs, its files grow under ``<record-dir>/.partial/<connection-id>/``: one WAV per
track (8 kHz, 16-bit PCM, mono) with a provisional header, and a JSON file with what ``start``
said. Audio is appended on every buffer flush and no file stays open between flushes, so a
thousand calls hold no file descriptors and a killed server leaves each call's audio up to its
last flush on disk.

When the call ends, whatever the end, the WAV headers are completed and the files are moved to
``<record-dir>/<callSid or streamSid>/<streamSid>.<track>.wav`` and ``<streamSid>.json``, the
JSON last. Each move is a hard link plus an unlink, which never overwrites: if a file of that
name exists (the same stream recorded by an earlier connection), the stem gets a numbered
suffix (``<streamSid>.1.inbound.wav``) and nothing is lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Final

from .g711 import SAMPLE_RATE, SAMPLE_WIDTH, ulaw_to_pcm16
from .protocol import StreamInfo

__all__ = ["PARTIAL_DIR", "WavRecorder", "wav_header"]

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
    """

    def __init__(self, record_dir: Path, connection_id: str) -> None:
        self.record_dir = record_dir
        self.partial_dir = record_dir / PARTIAL_DIR / connection_id
        self._stream: StreamInfo | None = None
        self._sizes: dict[str, int] = {}

    def open(self, stream: StreamInfo, meta: dict[str, Any]) -> None:
        """Create the call's partial files: an empty WAV per track and the start metadata."""
        _safe_component(stream.stream_sid)
        _safe_component(stream.call_key)
        self._stream = stream
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        for track in stream.tracks:
            self._partial_wav(track).write_bytes(wav_header(0))
            self._sizes[track] = 0
        _write_json(self._partial_json(), meta)

    def write(self, track: str, mulaw: bytes | bytearray) -> None:
        """Append a chunk of ``track``'s mu-law audio, decoded to PCM, to its WAV file.

        A track ``start`` did not announce (the outbound audio of a bidirectional call) gets
        its file on first write.
        """
        if track not in self._sizes:
            self._partial_wav(track).write_bytes(wav_header(0))
            self._sizes[track] = 0
        pcm = ulaw_to_pcm16(mulaw)
        with self._partial_wav(track).open("ab") as f:
            f.write(pcm)
        self._sizes[track] += len(pcm)

    def close(self, summary: dict[str, Any]) -> dict[str, str]:
        """Complete the WAV headers and publish every file, the JSON summary last.

        Returns:
            The published files, by track, plus ``"summary"``, as paths relative to the
            record directory; also recorded in the summary under ``files``.
        """
        stream = self._require_stream()
        for track, size in self._sizes.items():
            with self._partial_wav(track).open("r+b") as f:
                f.write(wav_header(size))
        dest = self.record_dir / _safe_component(stream.call_key)
        dest.mkdir(parents=True, exist_ok=True)
        published = self._publish(dest, summary)
        with contextlib.suppress(OSError):
            self.partial_dir.rmdir()
        return published

    def _publish(self, dest: Path, summary: dict[str, Any]) -> dict[str, str]:
        stream = self._require_stream()
        for attempt in range(1000):
            stem = stream.stream_sid if attempt == 0 else f"{stream.stream_sid}.{attempt}"
            moves = {track: (self._partial_wav(track), dest / f"{stem}.{track}.wav") for track in self._sizes}
            files = {track: str(target.relative_to(self.record_dir)) for track, (_, target) in moves.items()}
            files["summary"] = str((dest / f"{stem}.json").relative_to(self.record_dir))
            if not self._link_all(moves.values()):
                continue
            final_json = self.partial_dir / f"{stem}.final.json"
            _write_json(final_json, {**summary, "files": files})
            if not _link(final_json, dest / f"{stem}.json"):
                self._unlink_targets(moves.values())
                final_json.unlink()
                continue
            for source, _ in moves.values():
                source.unlink()
            final_json.unlink()
            self._partial_json().unlink(missing_ok=True)
            return files
        raise FileExistsError(f"no free file name for stream {stream.stream_sid} in {dest}")

    def _link_all(self, moves: Any) -> bool:
        done: list[tuple[Path, Path]] = []
        for source, target in moves:
            if not _link(source, target):
                self._unlink_targets(done)
                return False
            done.append((source, target))
        return True

    @staticmethod
    def _unlink_targets(moves: Any) -> None:
        for _, target in moves:
            target.unlink(missing_ok=True)

    def _partial_wav(self, track: str) -> Path:
        return self.partial_dir / f"{self._require_stream().stream_sid}.{track}.wav"

    def _partial_json(self) -> Path:
        return self.partial_dir / f"{self._require_stream().stream_sid}.json"

    def _require_stream(self) -> StreamInfo:
        if self._stream is None:
            raise RuntimeError("WavRecorder.open() was not called")
        return self._stream


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
