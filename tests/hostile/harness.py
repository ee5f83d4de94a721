"""Attacks on a real ``callsock serve`` process, each beside a well-behaved call, against stated budgets.

A :class:`Target` is a server process on a free loopback port whose resident memory and record
directory can be read. :func:`beside_a_good_call` runs an attack while a good call streams
real-time audio and ``/health`` is polled; it checks that the good call comes out recorded sample
for sample and returns what the budgets are asserted on: the server's memory and disk before
and after, and how long ``/health`` took.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Any, Final

import aiohttp

from ..helpers import StreamingCall, assert_valid_wav, eventually, raw_frame
from ..processes import serve_process, wait_healthy

MIB: Final = 1 << 20
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
KEY: Final = base64.b64encode(b"callsock-hostile").decode()
HEALTH_BUDGET_MS: Final = 50.0
"""/health answers within this while any single attack runs (the issue's budget)."""


@dataclass
class Target:
    """A ``callsock serve`` process under attack."""

    process: Popen[str]
    port: int
    record_dir: Path

    @property
    def ws_url(self) -> str:
        """The stream's URL."""
        return f"ws://127.0.0.1:{self.port}/call"

    def http_url(self, path: str) -> str:
        """An HTTP route's URL."""
        return f"http://127.0.0.1:{self.port}{path}"

    def rss(self) -> int:
        """The server's resident memory, in bytes."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
        return int(kib) * 1024

    def disk(self) -> int:
        """Bytes under the record directory."""
        return sum(p.stat().st_size for p in self.record_dir.rglob("*") if p.is_file())

    def summaries(self) -> dict[str, dict[str, Any]]:
        """The published summaries, by streamSid."""
        found = {}
        for path in self.record_dir.glob("*/*.json"):
            summary = json.loads(path.read_text())
            found[summary["streamSid"]] = summary
        return found


@asynccontextmanager
async def target(tmp_path: Path, *args: str) -> AsyncIterator[Target]:
    """A ``callsock serve`` process with ``args``, healthy, killed at the end."""
    record_dir = tmp_path / "recordings"
    with serve_process(record_dir, *args) as (process, port):
        await wait_healthy(port)
        yield Target(process, port, record_dir)


@dataclass
class Outcome:
    """What an attack cost the server, measured beside a good call."""

    rss_before: int
    rss_after: int = 0
    disk_before: int = 0
    disk_after: int = 0
    health_ms: list[float] = field(default_factory=list)

    @property
    def rss_growth(self) -> int:
        """Resident memory the attack added, in bytes."""
        return self.rss_after - self.rss_before

    def assert_health_answered(self) -> None:
        """``/health`` kept answering within its budget.

        Most polls must be under the budget and none may stall: one slow answer on a busy
        two-core machine is the scheduler, a run of them is the server blocked.
        """
        assert self.health_ms, "/health was never polled"
        ordered = sorted(self.health_ms)
        p90 = ordered[int(0.9 * (len(ordered) - 1))]
        assert p90 < HEALTH_BUDGET_MS, f"/health p90 {p90:.1f} ms over {len(ordered)} polls"
        assert ordered[-1] < 20 * HEALTH_BUDGET_MS, f"/health stalled for {ordered[-1]:.0f} ms"


async def _poll_health(
    client: aiohttp.ClientSession, t: Target, outcome: Outcome, done: asyncio.Event
) -> None:
    while not done.is_set():
        began = time.perf_counter()
        async with client.get(t.http_url("/health")) as response:
            await response.read()
        outcome.health_ms.append((time.perf_counter() - began) * 1000)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 0.02)


async def beside_a_good_call(
    t: Target,
    attack: Awaitable[Any] | Callable[[StreamingCall], Awaitable[Any]],
    *,
    seconds: float = 1.5,
    n: int = 1,
    recorded: bool = True,
    params: dict[str, str] | None = None,
    **connect: Any,
) -> Outcome:
    """Run ``attack`` while a good call streams for ``seconds``; check the call, and its recording.

    Args:
        t: the server.
        attack: a coroutine, or a function of the good call that returns one (to aim at it).
        seconds: how long the good call streams.
        n: the good call's number (its SIDs are ``sid("MZ", n)``, ``sid("CA", n)``).
        recorded: check the good call's recording sample for sample (not when the attack is on
            the disk itself).
        params: the good call's ``customParameters`` (a stream token, say).
        connect: how the good call connects (``headers=`` of a signed upgrade, say).
    """
    outcome = Outcome(rss_before=t.rss(), disk_before=t.disk())
    done = asyncio.Event()
    async with aiohttp.ClientSession() as client:
        poller = asyncio.create_task(_poll_health(client, t, outcome, done))
        good = StreamingCall(client, t.ws_url, n, params=params, **connect)
        try:
            await asyncio.gather(good.run(seconds), attack if inspect.isawaitable(attack) else attack(good))
        finally:
            done.set()
            await poller
    assert good.close_code == 1000, f"the good call closed with {good.close_code} {good.close_reason}"
    if recorded:
        await eventually(lambda: good.stream_sid in t.summaries(), what="the good call's summary")
        pcm = assert_valid_wav(t.record_dir / good.call_sid / f"{good.stream_sid}.inbound.wav")
        assert pcm == good.audio(), "the good call's recording is not what it sent"
    outcome.rss_after, outcome.disk_after = t.rss(), t.disk()
    return outcome


# --- A raw WebSocket client, for what a well-behaved library will not send ------------------------


def upgrade_request(port: int, path: str = "/call") -> bytes:
    """A valid WebSocket upgrade request (RFC 6455 section 4.1)."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


class RawSocket:
    """A TCP connection that has done the WebSocket handshake, then sends whatever it is told."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.received = b""

    @classmethod
    @asynccontextmanager
    async def open(cls, port: int) -> AsyncIterator[RawSocket]:
        """Connect and upgrade (fail unless the server answers 101); close the socket at the end."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(upgrade_request(port))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 101"), head[:40]
            yield cls(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def send(self, data: bytes) -> None:
        """Write and drain."""
        self.writer.write(data)
        await self.writer.drain()

    async def send_text(self, text: str | bytes) -> None:
        """One masked text frame."""
        await self.send(raw_frame(OP_TEXT, text.encode() if isinstance(text, str) else text))

    async def close_code(self, seconds: float = 10.0) -> int | None:
        """Read until the server's close frame: its code (None at EOF first, or after ``seconds``)."""
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(seconds):
                while chunk := await self.reader.read(65536):
                    self.received += chunk
                    for opcode, payload in server_frames(self.received):
                        if opcode == OP_CLOSE:
                            return int(struct.unpack(">H", payload[:2])[0]) if len(payload) >= 2 else 1005
        return None

    async def eof(self, seconds: float = 10.0) -> bool:
        """Whether the server closes TCP within ``seconds`` (reading, and dropping, what comes)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                with contextlib.suppress(ConnectionError):
                    while await self.reader.read(65536):
                        pass
                return True
        return False

    def abort(self) -> None:
        """Drop the connection."""
        self.writer.transport.abort()


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The whole frames the server sent (unmasked), in order."""
    frames, position = [], 0
    while len(data) - position >= 2:
        opcode, length = data[position] & 0x0F, data[position + 1] & 0x7F
        header = 2
        if length == 126:
            length, header = struct.unpack_from(">H", data, position + 2)[0], 4
        elif length == 127:
            length, header = struct.unpack_from(">Q", data, position + 2)[0], 10
        if len(data) - position < header + length:
            break
        frames.append((opcode, data[position + header : position + header + length]))
        position += header + length
    return frames
