"""``callsock recover``: publish the recordings a killed server left half-written.

A server writes each call's audio as it goes, under ``<record-dir>/.partial/<connection-id>/``
(see :mod:`callsock.recording`). If it dies without finishing (SIGKILL, an OOM kill, a power
cut), those files stay: WAVs whose headers still say "empty", and the JSON of what ``start``
said. Recovery completes each WAV header from the file's size, and publishes the WAVs and a
summary with ``endReason`` ``crashed``, exactly where the call would have been published.

A partial directory is named after the server instance that wrote it (:mod:`callsock.instance`):
the directories of an instance whose lock file is still held, a server still running, are left
alone. One leftover that cannot be recovered is reported and the others still are.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..protocol.g711 import SAMPLE_RATE, SAMPLE_WIDTH
from ..protocol.stream import call_key
from .instance import INSTANCES_DIR, instance_of, is_held
from .layout import HEADER_BYTES, PARTIAL_DIR, Part, discard_partial, publish, wav_header

__all__ = ["Recovered", "leftovers", "recover"]


@dataclass
class Recovered:
    """One call recovered (or skipped, with the reason)."""

    connection_id: str
    stream_sid: str | None = None
    call_sid: str | None = None
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)
    skipped: str | None = None
    failed: str | None = None
    """Why the leftover could not be recovered (it is left where it is)."""

    def to_dict(self) -> dict[str, Any]:
        """As plain data (``--json``), with the camelCase names of the recordings' JSON."""
        return {
            "connectionId": self.connection_id,
            "streamSid": self.stream_sid,
            "callSid": self.call_sid,
            "seconds": self.seconds,
            "files": self.files,
            "skipped": self.skipped,
            "failed": self.failed,
        }


def leftovers(record_dir: Path) -> list[Path]:
    """The partial directories left by servers that are no longer running."""
    root = record_dir / PARTIAL_DIR
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and not _writer_alive(record_dir, d.name))


def recover(record_dir: Path) -> list[Recovered]:
    """Publish every call a dead server left in ``record_dir``; report each."""
    root = record_dir / PARTIAL_DIR
    if not root.is_dir():
        return []
    results = []
    for directory in sorted(d for d in root.iterdir() if d.is_dir()):
        if _writer_alive(record_dir, directory.name):
            results.append(Recovered(directory.name, skipped="its server is still running"))
            continue
        try:
            results.append(_recover_one(record_dir, directory))
        except (OSError, ValueError) as exc:  # one bad leftover does not stop the others
            results.append(Recovered(directory.name, failed=f"{type(exc).__name__}: {exc}"))
    _forget_dead_instances(record_dir)
    return results


def _forget_dead_instances(record_dir: Path) -> None:
    """Remove the lock files of instances that are gone and left nothing to recover."""
    remaining = {instance_of(d.name) for d in (record_dir / PARTIAL_DIR).iterdir() if d.is_dir()}
    for lock in (record_dir / INSTANCES_DIR).glob("*.lock"):
        if lock.stem not in remaining and not is_held(record_dir, lock.stem):
            lock.unlink(missing_ok=True)


def _recover_one(record_dir: Path, directory: Path) -> Recovered:
    result = Recovered(directory.name)
    meta = _meta(directory)
    wavs = sorted(p for p in directory.glob("*.wav"))
    if not wavs:
        shutil.rmtree(directory, ignore_errors=True)
        result.skipped = "no audio had been written"
        return result
    stream_sid = meta.get("streamSid") or wavs[0].name.split(".")[0]
    tracks = {
        p.name[len(stream_sid) + 1 : -len(".wav")]: p for p in wavs if p.name.startswith(stream_sid + ".")
    }
    # A write cut short by the kill may end mid-sample: keep whole samples only.
    sizes = {track: max(path.stat().st_size - HEADER_BYTES, 0) // SAMPLE_WIDTH * SAMPLE_WIDTH
             for track, path in tracks.items()}  # fmt: skip
    ended = max(path.stat().st_mtime for path in tracks.values())
    seconds = max(sizes.values()) / SAMPLE_WIDTH / SAMPLE_RATE
    summary = {
        **meta,
        "streamSid": stream_sid,
        "endedAt": datetime.fromtimestamp(ended, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "endReason": "crashed",
        "error": None,
        "durationMs": round(seconds * 1000),
        "recovered": True,
    }
    result.stream_sid, result.call_sid = stream_sid, meta.get("callSid")
    result.seconds = round(seconds, 3)
    for track, path in tracks.items():
        with path.open("r+b") as f:
            f.truncate(HEADER_BYTES + sizes[track])
            f.write(wav_header(sizes[track]))
    parts = [Part(track, f"{track}.wav", path=path) for track, path in tracks.items()]
    parts.append(Part("summary", "json", render=lambda files: {**summary, "files": files}))
    result.files = publish(record_dir, call_key(meta.get("callSid"), stream_sid), stream_sid, parts)
    discard_partial(directory)  # the journal
    return result


def _meta(directory: Path) -> dict[str, Any]:
    for path in directory.glob("*.json"):
        if not path.name.startswith("."):
            try:
                data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            return data
    return {}


def _writer_alive(record_dir: Path, partial_name: str) -> bool:
    """Whether the server that writes a partial directory still runs."""
    instance = instance_of(partial_name)
    if instance is not None:
        return is_held(record_dir, instance)
    return _pid_alive(partial_name)


def _pid_alive(connection_id: str) -> bool:
    """Whether the process an older connection id names (``<pid>-<ms>-<n>``, hex) still runs."""
    try:
        pid = int(connection_id.split("-", 1)[0], 16)
    except ValueError:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
