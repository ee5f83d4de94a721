"""A server's claim on its record directory: a per-start instance id, held with a lock file.

Each start of a server picks a new instance id; its calls' partial files are named after it
(``.partial/<instance>-<n>/``), and it holds ``.instances/<instance>.lock`` locked (``flock``)
for as long as it runs. The kernel drops the lock when the process ends, however it ends, so
``callsock recover`` tells a dead server's leftovers from a live one's by trying the lock: not by
a process id, which in a container may be 1 for every server, may be a zombie's, or may have
been reused by another process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Final

__all__ = ["INSTANCES_DIR", "Instance", "instance_of", "is_held"]

INSTANCES_DIR: Final = ".instances"
"""The directory, inside the record directory, of the running servers' lock files."""

_PREFIX: Final = "i"  # not a hexadecimal digit: tells these ids from the older pid-based ones


class Instance:
    """One start of a server: its id, and (when it records) its held lock file.

    Use :meth:`claim` for a recording server, :meth:`unrecorded` for one that records nothing.
    """

    def __init__(self, instance_id: str, lock_path: Path | None = None, fd: int | None = None) -> None:
        self.id = instance_id
        self.lock_path = lock_path
        self._fd = fd

    @classmethod
    def claim(cls, record_dir: Path) -> Instance:
        """Pick a new id and hold its lock file in ``record_dir`` until :meth:`release`.

        Raises:
            OSError: the lock file cannot be created.
        """
        instance_id = _new_id()
        directory = record_dir / INSTANCES_DIR
        directory.mkdir(parents=True, exist_ok=True)
        lock_path = directory / f"{instance_id}.lock"
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new name: nobody else can hold it
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())  # for people only
        return cls(instance_id, lock_path, fd)

    @classmethod
    def unrecorded(cls) -> Instance:
        """An id for a server that records nothing (no lock file)."""
        return cls(_new_id())

    def release(self) -> None:
        """The server stops: remove the lock file and let the lock go."""
        if self._fd is None or self.lock_path is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.lock_path.unlink()
        os.close(self._fd)  # closing drops the lock
        self._fd = None


def instance_of(partial_name: str) -> str | None:
    """The instance id in a partial directory's name (``<instance>-<n>``), or ``None`` for an older one."""
    if not partial_name.startswith(_PREFIX):
        return None
    instance_id, _, number = partial_name.rpartition("-")
    return instance_id if instance_id and number.isdigit() else None


def is_held(record_dir: Path, instance_id: str) -> bool:
    """Whether a running process holds the instance's lock file (a missing one is not held)."""
    try:
        fd = os.open(record_dir / INSTANCES_DIR / f"{instance_id}.lock", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock, if this took it
    return False


def _new_id() -> str:
    return f"{_PREFIX}{int(time.time() * 1000):x}{secrets.token_hex(3)}"
