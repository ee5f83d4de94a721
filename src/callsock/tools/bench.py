"""``callsock bench``: many concurrent simulated calls against an echo server, measured.

Modes:
    ``echo``: each call streams a 160-byte media frame every 20 ms, as Twilio does, and times
        the echo of each frame (the server must send every media frame back).
    ``flood``: each call keeps ``window`` frames in flight and sends a new one per echo: the
        messages per second the server can process.
    ``idle``: calls connect and start, then send nothing (for memory per idle call).

The load generator is built to be cheap, since it shares the machine with the server it
measures: picows (a Cython WebSocket client) parses frames and calls back per frame without a
coroutine; frames are sent by one timer per millisecond of phase for all the calls in it, not
one timer per call; media frames are framed here and written straight to the socket, a whole
flood batch in one write (picows makes a system call per frame). Its own CPU use is reported,
so a run says whether the generator, rather than the server, was the limit.
"""

from __future__ import annotations

import asyncio
import binascii
import math
import resource
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from .twilio_side import Caller

__all__ = ["BenchConfig", "BenchReport", "run_bench"]

Mode = Literal["echo", "flood", "idle"]

FRAME_SECONDS = 0.02
_PAYLOADS = 50  # distinct frames, so a misrouted or reordered echo is caught


@dataclass(frozen=True)
class BenchConfig:
    """What to run.

    Attributes:
        url: the server's WebSocket URL.
        calls: concurrent calls.
        seconds: how long each call streams once every call has been started.
        mode: ``echo``, ``flood`` or ``idle``.
        ramp_ms: over how long the calls are started, evenly.
        window: frames in flight per call in flood mode.
        headers: extra headers on each upgrade (an ``X-Twilio-Signature``, say).
        grace: seconds to wait for the last echoes after sending stops.
        auth_token: give each ``start`` its call's stream token, as Twilio does with callsock's TwiML.
    """

    url: str
    calls: int = 100
    seconds: float = 10.0
    mode: Mode = "echo"
    ramp_ms: int = 1000
    window: int = 32
    headers: dict[str, str] = field(default_factory=dict)
    grace: float = 1.0
    auth_token: str | None = field(default=None, repr=False)


@dataclass
class BenchReport:
    """What a run measured (times in milliseconds)."""

    mode: str
    calls: int
    connected: int
    failed: int
    seconds: float
    frames_sent: int
    echoes_received: int
    missing_echoes: int
    wrong_echoes: int
    messages_per_second: float
    rtt_p50_ms: float | None
    rtt_p90_ms: float | None
    rtt_p99_ms: float | None
    rtt_max_ms: float | None
    closes: dict[str, int]
    loadgen_cpu_percent: float

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (``--json``)."""
        return asdict(self)


def _payloads() -> list[bytes]:
    """The base64 of distinct 160-byte mu-law frames of noise (a fixed seed).

    Codes 0x7F and 0xFF both mean zero and a decode-encode round trip turns 0x7F into 0xFF,
    so 0x7F is left out: an echo server that transcodes must return the very same bytes.
    """
    rng = np.random.default_rng(20261129)
    frames = []
    for _ in range(_PAYLOADS):
        codes = rng.integers(0, 256, 160, dtype=np.uint8)
        codes[codes == 0x7F] = 0xFF
        frames.append(binascii.b2a_base64(codes.tobytes(), newline=False))
    return frames


def client_frame(text: bytes) -> bytes:
    """A final, masked WebSocket text frame around ``text``, with the all-zero masking key.

    RFC 6455 section 5.3 asks clients for unpredictable keys to stop browser scripts from
    poisoning proxy caches; a load generator on a test network has no such attacker, and a zero
    key leaves the payload as it is, so no per-byte work is needed.
    """
    size = len(text)
    if 126 <= size < 1 << 16:  # every media message
        return _HEADER_16.pack(0x81, 0x80 | 126, size, 0) + text
    if size < 126:
        return _HEADER_7.pack(0x81, 0x80 | size, 0) + text
    return _HEADER_64.pack(0x81, 0x80 | 127, size, 0) + text


# FIN + text opcode, MASK + payload length (7, 16 or 64 bits), then the masking key.
_HEADER_7 = struct.Struct(">BBI")
_HEADER_16 = struct.Struct(">BBHI")
_HEADER_64 = struct.Struct(">BBQI")


class _Call(WSListener):
    """One simulated call: sends frames when told, times their echoes."""

    def __init__(self, bench: _Bench) -> None:
        super().__init__()
        self.bench = bench
        self.caller = Caller(auth_token=bench.config.auth_token)
        self.transport: WSTransport | None = None
        self.write: Callable[[bytes], None] | None = None
        self.in_flight: deque[tuple[float, int]] = deque()
        self.next_payload = 0
        self.sequence = 0
        self.owed = 0
        self.closed_with: int | None = None
        self.done = asyncio.get_running_loop().create_future()
        # Every media message of this call is this template with its counters and payload.
        self.template = (
            b'{"event":"media","sequenceNumber":"%d","media":{"track":"inbound","chunk":"%d",'
            b'"timestamp":"%d","payload":"%s"},"streamSid":"' + self.caller.stream_sid.encode() + b'"}'
        )

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.write = transport.underlying_transport.write
        transport.send(WSMsgType.TEXT, self.caller.connected())
        transport.send(WSMsgType.TEXT, self.caller.start())
        self.sequence = self.caller.sequence

    def media_frame(self) -> bytes:
        """The next media message, framed, and its echo registered as awaited."""
        index = self.next_payload
        self.next_payload = (index + 1) % _PAYLOADS
        self.sequence += 1
        chunk = self.sequence - 1
        self.in_flight.append((time.perf_counter(), index))
        return client_frame(
            self.template % (self.sequence, chunk, 20 * (chunk - 1), self.bench.payloads[index])
        )

    def send_frames(self, count: int) -> None:
        if self.write is None or self.closed_with is not None:
            return
        if count == 1:
            self.write(self.media_frame())
        else:
            self.write(b"".join([self.media_frame() for _ in range(count)]))
        self.bench.frames_sent += count

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        data = frame.get_payload_as_bytes()
        # The hot path, with no enum lookup before it; JSON with or without spaces (json.dumps).
        if data.startswith(b'{"event":"media"') or data.startswith(b'{"event": "media"'):
            if not self.in_flight:
                return
            sent_at, index = self.in_flight.popleft()
            bench = self.bench
            bench.echoes += 1
            if bench.needles[index] not in data:
                bench.wrong += 1
            if bench.measuring:
                bench.rtts.append(time.perf_counter() - sent_at)
            if bench.flooding:
                self.owed += 1
                if frame.last_in_buffer:
                    self.send_frames(self.owed)
                    self.owed = 0
        elif frame.msg_type is WSMsgType.CLOSE:
            self.closed_with = int(frame.get_close_code().value)
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.closed_with is None:
            self.closed_with = 1006
        if not self.done.done():
            self.done.set_result(None)

    def stop(self) -> None:
        if self.transport is not None and self.closed_with is None:
            self.caller.sequence = self.sequence
            self.transport.send(WSMsgType.TEXT, self.caller.stop())


class _Bench:
    def __init__(
        self,
        config: BenchConfig,
        progress: Callable[[dict[str, Any]], None] | None,
        window: Callable[[str], None] | None,
    ) -> None:
        self.config = config
        self.progress = progress
        self.window = window
        self.payloads = _payloads()
        # Enough of each payload's base64 to tell the frames apart: a short needle is fast.
        self.needles = [p[:24] for p in self.payloads]
        self.calls: list[_Call] = []
        self.failed = 0
        self.frames_sent = 0
        self.echoes = 0
        self.wrong = 0
        self.rtts: list[float] = []
        self.measuring = False
        self.sending = True
        self.flooding = False
        self._buckets: list[list[_Call]] = [[] for _ in range(20)]

    async def run(self) -> BenchReport:
        config = self.config
        loop = asyncio.get_running_loop()
        if config.mode == "echo":
            ticker = loop.create_task(self._tick_buckets())
        await self._ramp()
        self.measuring = True
        if self.window is not None:
            self.window("start")
        start_echoes, started, cpu_before = self.echoes, time.perf_counter(), time.process_time()
        if config.mode == "flood":
            self.flooding = True
            for call in self._connected():
                call.send_frames(config.window)
        await self._wait(config.seconds)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_before
        if self.window is not None:
            self.window("end")
        echoes_in_window = self.echoes - start_echoes
        self.sending = self.flooding = False
        if config.mode == "echo":
            ticker.cancel()
        await asyncio.sleep(config.grace)
        await self._hang_up()
        return self._report(elapsed, echoes_in_window, cpu / elapsed)

    async def _ramp(self) -> None:
        config = self.config
        gap = config.ramp_ms / 1000 / max(config.calls, 1)
        tasks = []
        for i in range(config.calls):
            tasks.append(asyncio.create_task(self._connect(i)))
            await asyncio.sleep(gap)
        await asyncio.gather(*tasks)

    async def _connect(self, index: int) -> None:
        try:
            _, call = await ws_connect(
                lambda: _Call(self), self.config.url, extra_headers=self.config.headers or None
            )
        except Exception:
            self.failed += 1
            return
        assert isinstance(call, _Call)
        self.calls.append(call)
        self._buckets[index % len(self._buckets)].append(call)

    async def _tick_buckets(self) -> None:
        """Every 20 ms, send one frame per call; bucket ``b`` ticks ``b`` ms into each period."""
        loop = asyncio.get_running_loop()
        period = FRAME_SECONDS
        step = period / len(self._buckets)
        next_tick = loop.time()
        bucket = 0
        while self.sending:
            for call in self._buckets[bucket]:
                call.send_frames(1)
            bucket = (bucket + 1) % len(self._buckets)
            next_tick += step
            await asyncio.sleep(max(0.0, next_tick - loop.time()))

    async def _wait(self, seconds: float) -> None:
        deadline = time.perf_counter() + seconds
        last = (time.perf_counter(), self.echoes)
        while (remaining := deadline - time.perf_counter()) > 0:
            await asyncio.sleep(min(0.5, remaining))
            if self.progress is not None:
                now = time.perf_counter()
                rate = (self.echoes - last[1]) / max(now - last[0], 1e-9)
                last = (now, self.echoes)
                self.progress(self._snapshot(rate))

    def _snapshot(self, rate: float) -> dict[str, Any]:
        recent = self.rtts[-5000:]
        return {
            "connected": len(self._connected()),
            "failed": self.failed,
            "sent": self.frames_sent,
            "echoes": self.echoes,
            "rate": rate,
            "p99": float(np.percentile(recent, 99)) * 1000 if recent else None,
        }

    def _connected(self) -> list[_Call]:
        return [c for c in self.calls if c.transport is not None and c.closed_with is None]

    async def _hang_up(self) -> None:
        for call in self.calls:
            call.stop()
        pending = [c.done for c in self.calls if not c.done.done()]
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        for call in self.calls:
            if call.transport is not None and not call.done.done():
                call.transport.disconnect()

    def _report(self, elapsed: float, echoes_in_window: int, cpu_share: float) -> BenchReport:
        rtts = np.array(self.rtts) * 1000 if self.rtts else None
        closes: dict[str, int] = {}
        for call in self.calls:
            key = str(call.closed_with)
            closes[key] = closes.get(key, 0) + 1

        def pct(q: float) -> float | None:
            return None if rtts is None else round(float(np.percentile(rtts, q)), 3)

        missing = sum(len(c.in_flight) for c in self.calls)
        return BenchReport(
            mode=self.config.mode,
            calls=self.config.calls,
            connected=len(self.calls),
            failed=self.failed,
            seconds=round(elapsed, 3),
            frames_sent=self.frames_sent,
            echoes_received=self.echoes,
            missing_echoes=missing,
            wrong_echoes=self.wrong,
            messages_per_second=round(echoes_in_window / elapsed, 1) if elapsed > 0 else 0.0,
            rtt_p50_ms=pct(50),
            rtt_p90_ms=pct(90),
            rtt_p99_ms=pct(99),
            rtt_max_ms=None if rtts is None else round(float(rtts.max()), 3),
            closes=closes,
            loadgen_cpu_percent=round(100 * cpu_share, 1),
        )


async def run_bench(
    config: BenchConfig,
    progress: Callable[[dict[str, Any]], None] | None = None,
    window: Callable[[str], None] | None = None,
) -> BenchReport:
    """Run a benchmark.

    Args:
        config: what to run.
        progress: called about twice a second with live figures.
        window: called with ``"start"`` when every call has been started and measuring begins,
            and with ``"end"`` when it stops (a harness samples the server's CPU there).
    """
    if config.calls < 1 or config.seconds <= 0 or not math.isfinite(config.seconds):
        raise ValueError("calls must be at least 1 and seconds positive")
    _raise_file_limit()
    return await _Bench(config, progress, window).run()


def _raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
