"""Real processes for tests: callsock servers, redis-server and nginx on free loopback ports.

The system packages (redis-server, nginx) are installed with apt-get when missing, as the project's
contract says: the test setup installs what it needs instead of assuming it.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp

from .helpers import eventually

SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


_PORTS_GIVEN: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel picks from for outgoing connections (and for binding port 0)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a process to listen on in a moment.

    Chosen below the kernel's ephemeral range: a port the kernel hands out (binding port 0) is
    free again once returned, and any outgoing connection of the test (hundreds: health polls,
    clients, a server reconnecting to Redis) may take it as its local port before the process
    binds it, or while Redis is stopped and about to start again on it. Never the same port twice
    in one test session, either.
    """
    low = min(_ephemeral_range()[0], 32768)
    for _ in range(1000):
        port = random.randrange(10_000, low)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port between 10000 and {low}")


def system_binary(name: str, package: str) -> str:
    """The path of a system program, installed with apt-get first if it is missing."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    found = shutil.which(name, path=search)
    if found is None:
        if shutil.which("apt-get") is None:
            raise RuntimeError(f"{name} is missing and apt-get is not available to install {package}")
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", package], check=True, env=env)
        found = shutil.which(name, path=search)
        if found is None:
            raise RuntimeError(f"apt-get installed {package} but {name} is still not on the PATH")
    return found


def wait_port(port: int, timeout: float = 20.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class LoggedProcess(subprocess.Popen[str]):
    """A process whose output (stdout and stderr) goes to a file, not to a pipe.

    Nobody reads a pipe while the test runs, and once the 64 KiB it holds is full, the server
    blocks in its next log line: a test that makes it log a lot would hang. ``communicate()``
    waits for the process and returns the file's text, as it would have returned the pipe's.
    """

    def __init__(self, command: list[str], log: Path) -> None:
        self.log = log
        self._log_file = log.open("w", encoding="utf-8")
        super().__init__(command, stdout=self._log_file, stderr=subprocess.STDOUT, text=True)

    def output(self) -> str:
        """What the process has written so far."""
        return self.log.read_text(encoding="utf-8", errors="replace")

    def communicate(self, input: str | None = None, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the process (at most ``timeout`` seconds); return its output (stderr is in it)."""
        self.wait(timeout)
        self._log_file.close()
        return self.output(), ""


@contextmanager
def serve_process(record_dir: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`callsock serve` as a real process on a free port; killed at the end if still running.

    Its output goes to ``serve-<port>.log`` beside ``record_dir``; ``communicate()`` returns it.
    """
    port = free_port()
    command = [sys.executable, "-m", "callsock", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--record-dir", str(record_dir), "--log-format", "json", *args]  # fmt: skip
    record_dir.parent.mkdir(parents=True, exist_ok=True)
    process = LoggedProcess(command, record_dir.parent / f"serve-{port}.log")
    try:
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=20)


async def wait_healthy(port: int, scheme: str = "http", process: subprocess.Popen[str] | None = None) -> None:
    """Wait (at most 30 s: a process starting on a busy machine) until ``GET /health`` answers 200.

    With ``process`` (the server), fail at once, with its output, if it exits instead.
    """
    async with aiohttp.ClientSession() as client:

        async def healthy() -> bool:
            if process is not None and process.poll() is not None:
                output = process.output() if isinstance(process, LoggedProcess) else ""
                raise AssertionError(f"the server on port {port} exited ({process.returncode}):\n{output}")
            try:
                async with client.get(f"{scheme}://127.0.0.1:{port}/health") as response:
                    return response.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await eventually(healthy, within=30.0, interval=0.05, what=f"GET /health answered 200 on port {port}")


async def run_callsock(*args: str) -> tuple[int, str, str]:
    """Run ``callsock ARGS`` to completion (a minute at most): (exit status, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "callsock", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60.0)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


class RedisServer:
    """A throwaway redis-server on a free loopback port that can be stopped and started again."""

    def __init__(self, directory: Path) -> None:
        self.binary = system_binary("redis-server", "redis-server")
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL callsock takes with ``--redis-url``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or start again) on the same port, with nothing persisted."""
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                   "--appendonly", "no", "--dir", str(self.directory)]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        """Stop the server (its data goes with it)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


class Nginx:
    """nginx in the foreground with a given configuration, its files kept under ``directory``."""

    def __init__(self, directory: Path, config: str) -> None:
        self.binary = system_binary("nginx", "nginx")
        self.directory = directory
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, port: int) -> None:
        """Start, and wait until it listens on ``port``."""
        (self.directory / "logs").mkdir(parents=True, exist_ok=True)
        path = self.directory / "nginx.conf"
        path.write_text(self.config)
        command = [self.binary, "-p", str(self.directory), "-c", str(path), "-e", "stderr",
                   "-g", f"daemon off; pid {self.directory / 'nginx.pid'};"]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_port(port)
        except OSError:
            self.process.kill()
            _, errors = self.process.communicate(timeout=10)
            raise RuntimeError(f"nginx did not start: {errors.decode(errors='replace')}") from None

    def stop(self) -> None:
        """Stop nginx."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.communicate(timeout=10)
        self.process = None
