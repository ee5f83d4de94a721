"""Where recordings go and what they are called, and their publication: the one place for names.

While a call runs, its files grow under ``<record-dir>/.partial/<connection-id>/`` as
``<streamSid>.<suffix>`` (``MZ….inbound.wav``, ``MZ….json``). When it ends, whatever the end, each
sink's finished files become ``<record-dir>/<call>/<stem>.<suffix>``, the summary last, so its
presence means the call is complete. ``<call>`` is the call's key (its callSid, or
``stream.<streamSid>``) and the stem is the streamSid, or ``<streamSid>.<n>`` with the next free
number when those names are taken: every move is a hard link, the one rename that never
overwrites, so the record directory must be on a local file system with hard links.

``callsock recover`` uses these names too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ..protocol.g711 import SAMPLE_RATE, SAMPLE_WIDTH

__all__ = [
    "HEADER_BYTES",
    "MAX_DATA_BYTES",
    "PARTIAL_DIR",
    "Part",
    "discard_partial",
    "partial_dir",
    "partial_file",
    "publish",
    "wav_header",
    "write_json",
]

PARTIAL_DIR: Final = ".partial"
"""The directory, inside the record directory, where calls in progress are written."""

HEADER_BYTES: Final = 44
"""The size of the RIFF header of callsock's WAV files (PCM, one ``fmt`` and one ``data`` chunk)."""

MAX_DATA_BYTES: Final = 0xFFFFFFFF - 36
"""The most audio a RIFF file can hold (its sizes are 32-bit): 4 GiB less the header."""


def wav_header(data_bytes: int) -> bytes:
    """The 44-byte RIFF header of a mono 16-bit 8 kHz PCM WAV with ``data_bytes`` of audio."""
    data_bytes = min(data_bytes, MAX_DATA_BYTES)
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


def partial_dir(record_dir: Path, connection_id: str) -> Path:
    """Where a connection's call is written while it runs."""
    return record_dir / PARTIAL_DIR / safe_component(connection_id)


def partial_file(directory: Path, stream_sid: str, suffix: str) -> Path:
    """A call's file in progress: ``<streamSid>.<suffix>``."""
    return directory / f"{safe_component(stream_sid)}.{suffix}"


@dataclass(frozen=True, slots=True)
class Part:
    """One file a sink publishes, by the name the summary's ``files`` gives it.

    Either a finished partial file (``path``), moved into place as it is, or content made once
    the names of the others are known (``render``, given ``files``): the summary is one.
    """

    name: str
    suffix: str
    path: Path | None = None
    render: Callable[[dict[str, str]], dict[str, Any]] | None = None


def publish(record_dir: Path, call_key: str, stream_sid: str, parts: list[Part]) -> dict[str, str]:
    """Move a call's files into place under the first free stem, the rendered ones last.

    Returns:
        The published files by name, relative to ``record_dir``.

    Raises:
        OSError: the disk refused; nothing stays published (the partial files are left).
    """
    dest = record_dir / safe_component(call_key)
    safe_component(stream_sid)
    dest.mkdir(parents=True, exist_ok=True)
    moved = [part for part in parts if part.path is not None]
    rendered = [part for part in parts if part.render is not None]
    for stem in _stems(dest, stream_sid):
        targets = {part.name: dest / f"{stem}.{part.suffix}" for part in parts}
        files = {name: str(target.relative_to(record_dir)) for name, target in targets.items()}
        done: list[Path] = []
        try:
            if _link_each([(part.path, targets[part.name]) for part in moved if part.path], done) and all(
                _write_new(targets[part.name], part.render(files), done) for part in rendered if part.render
            ):
                for part in moved:
                    if part.path is not None:
                        part.path.unlink()
                return files
        except OSError:
            _unlink(done)
            raise
        _unlink(done)  # a name was taken meanwhile (another server on this disk): the next stem
    raise AssertionError("unreachable: stems never run out")


def discard_partial(directory: Path) -> None:
    """Remove a call's partial directory and whatever is left in it."""
    shutil.rmtree(directory, ignore_errors=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def safe_component(name: str) -> str:
    """``name``, checked to be one path component (SIDs are validated; this guards direct use)."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"unsafe directory name: {name!r}")
    return name


def _stems(dest: Path, stream_sid: str) -> Iterator[str]:
    """The streamSid, then ``<streamSid>.<n>`` from the first number past those taken, without end."""
    yield stream_sid
    numbered = re.compile(re.escape(stream_sid) + r"\.(\d+)\.")
    taken = (numbered.match(name) for name in os.listdir(dest))
    number = max((int(m.group(1)) for m in taken if m), default=0) + 1
    while True:
        yield f"{stream_sid}.{number}"
        number += 1


def _link_each(moves: list[tuple[Path, Path]], done: list[Path]) -> bool:
    """Hard-link each source to its target; False at the first target that exists."""
    for source, target in moves:
        try:
            os.link(source, target)
        except FileExistsError:
            return False
        done.append(target)
    return True


def _write_new(target: Path, data: dict[str, Any], done: list[Path]) -> bool:
    """Write ``data`` as JSON under a name that must not exist yet; False if it does."""
    draft = target.with_name(f".{target.name}.tmp")
    write_json(draft, data)
    try:
        os.link(draft, target)
    except FileExistsError:
        return False
    finally:
        draft.unlink()
    done.append(target)
    return True


def _unlink(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
