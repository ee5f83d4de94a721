"""Soak: thousands of calls against a real `callsock serve --echo`, then nothing may be left behind."""

# `make soak` runs it (`pytest -m slow`); `make test` leaves it out. Environment:
#   CALLSOCK_SOAK_CALLS       sequential calls in phase 1 (default 2000, at least 10)
#   CALLSOCK_SOAK_CONCURRENT  concurrent real-time calls in phase 2 (default 300)
#   CALLSOCK_SOAK_SECONDS     how long phase 2 streams once every call has started (default 10)
#   CALLSOCK_SOAK_REPORT      also write the figures as JSON to this path (for BENCHMARKS.md)

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest
import uvloop

from callsock.protocol.frames import accept_key
from callsock.protocol.g711 import ulaw_to_pcm16
from callsock.tools.bench import BenchConfig, run_bench
from callsock.tools.twilio_side import Caller

from ..processes import free_port

HOST: Final = "127.0.0.1"
FRAME_BYTES: Final = 160  # 20 ms of 8 kHz mu-law
FRAMES_PER_CALL: Final = 5  # phase 1 and warm-up calls: 100 ms of audio each
WARMUP_CALLS: Final = 20
CALL_TIMEOUT: Final = 10.0  # one sequential call, upgrade to close; a healthy one takes milliseconds
SETTLE_TIMEOUT: Final = 20.0  # > close_timeout (5 s) + handler_drain_timeout (10 s) of the server
# Echoes are paced to real-time playback (README, "Outbound audio"), so a stall of either process
# longer than the server's send lead (100 ms) stays as delay for the rest of the call: an echo
# can come back seconds late on a busy machine without being lost. bench counts as missing what
# has not come back when it hangs up, so it waits this long after sending, for late echoes to
# arrive: then a missing echo is a lost one. The server keeps at most 10 s of audio waiting for
# a call's handlers (--handler-queue-ms) and logs any it drops, which log_problems() catches.
PHASE2_GRACE: Final = 10.0
STARTUP_WARNING: Final = "no Twilio auth token"  # the one warning a clean run logs (at startup)

# Memory tolerances. RSS after the soak is compared with RSS after the warm-up. It stays above it
# without any leak, because freed memory is not all handed back to the OS: pymalloc returns an
# arena only when every object in it is dead, and glibc malloc trims its heap only from the top.
# What stays resident is what the busiest moment fragmented, so it scales with the peak number of
# concurrent calls, never with the number of calls placed: each concurrent call holds up to
# --flush-seconds (5 s) of mu-law per track in growing bytearrays, decoded to PCM (twice the
# size) for the disk writer when flushed, i.e. around 100 KiB at its peak. Measured on 2 cores:
# 100 concurrent calls left +10 MiB, 300 left +27 to +32 MiB, and three more rounds of 300
# added under 5 MiB in all, with the count of live objects back to its baseline after each
# (so: retention, not a leak; a gdb `malloc_trim(0)` gives most of it back). Hence the allowance:
# the usual interpreter slack (20 MiB, or 15 % of the baseline if more) plus 128 KiB per
# concurrent call of phase 2. The number of calls placed is covered by RSS_SECOND_HALF_GROWTH_MIB.
RSS_SLACK_MIB: Final = 20.0
RSS_SLACK_SHARE: Final = 0.15
RSS_PER_CONCURRENT_CALL_KIB: Final = 128
# Between 50 % and 100 % of phase 1 the server handles half the sequential calls (1000 by
# default) with an unchanged working set, one call at a time, so RSS must stay flat: a leak of
# a few KiB per call (a Connection with its session, runner and call never freed) adds MiBs.
# Flat is not constant, though: Python 3.11's pathlib interns every path component it parses
# (connection ids, SIDs, file names), and the interned-string table, whose size is bounded by
# the strings alive, is reallocated every few thousand calls (1.9 MiB here); that step, once or
# twice in a long soak, is all the growth measured (+2.1 MiB over 10,000 calls).
RSS_SECOND_HALF_GROWTH_MIB: Final = 4.0


def _env_int(name: str, default: int, minimum: int) -> int:
    """An integer setting from the environment, at least ``minimum``."""
    value = int(os.environ.get(name, str(default)))
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class Served:
    """A `callsock serve --echo` process under test."""

    process: subprocess.Popen[bytes]
    port: int
    record_dir: Path
    log: Path

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.process.pid


@dataclass(frozen=True)
class Sample:
    """The server's resources at one moment."""

    calls_done: int
    rss_kib: int
    hwm_kib: int
    threads: int
    fds: int
    tasks: int
    connections: int
    active_calls: int

    @property
    def rss_mib(self) -> float:
        """Resident memory in MiB."""
        return self.rss_kib / 1024


@dataclass
class CallResult:
    """What one sequential call saw."""

    stream_sid: str
    call_sid: str
    audio: bytes
    close_code: int
    echoed: bytes = b""
    echoes: int = 0


@dataclass
class Figures:
    """What a soak measured, for the summary and CALLSOCK_SOAK_REPORT."""

    warmup_calls: int
    sequential_calls: int
    concurrent_calls: int
    total_calls: int = 0
    phase1_seconds: float = 0.0
    phase1_calls_per_second: float = 0.0
    phase1_echoes: int = 0
    phase1_rss_mib: list[float] = field(default_factory=list)
    phase1_fds: list[int] = field(default_factory=list)
    phase1_tasks: list[int] = field(default_factory=list)
    phase2_seconds: float = 0.0
    phase2_report: dict[str, Any] = field(default_factory=dict)
    phase2_rss_mib: list[float] = field(default_factory=list)
    rss_baseline_mib: float = 0.0
    rss_peak_mib: float = 0.0
    rss_final_mib: float = 0.0
    fds_baseline: int = 0
    fds_final: int = 0
    tasks_baseline: int = 0
    tasks_final: int = 0
    threads_baseline: int = 0
    threads_final: int = 0
    recordings: int = 0
    wav_files: int = 0
    total_seconds: float = 0.0


# --- the server process -------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """`python -m callsock serve --echo` on a free port, its log in a file, stopped afterwards."""
    port = free_port()
    record_dir = tmp_path / "recordings"
    log = tmp_path / "server.log"
    # The CLI reads CALLSOCK_<OPTION> variables: a stray one in the caller's environment
    # (CALLSOCK_NO_RECORD, TWILIO_AUTH_TOKEN, ...) must not change the server under test.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLSOCK_") and k != "TWILIO_AUTH_TOKEN"}
    command = [
        sys.executable, "-m", "callsock", "serve", "--echo", "--host", HOST, "--port", str(port),
        "--record-dir", str(record_dir), "--log-level", "warning", "--log-format", "json",
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield Served(process, port, record_dir, log)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


async def get_health(port: int) -> dict[str, Any]:
    """GET /health on a connection of its own, read to EOF: the server has then closed its socket."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(10):
            response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    health: dict[str, Any] = json.loads(body)
    return health


async def wait_healthy(served: Served) -> None:
    """Wait (at most 30 s) until the server answers /health."""
    async with asyncio.timeout(30):
        while True:
            assert served.process.poll() is None, f"server exited early:\n{served.log.read_text()}"
            try:
                await get_health(served.port)
                return
            except (OSError, AssertionError):
                await asyncio.sleep(0.05)


def proc_status(pid: int) -> dict[str, str]:
    """The fields of /proc/<pid>/status."""
    fields: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


async def sample(served: Served, calls_done: int) -> Sample:
    """The server's RSS, peak RSS, threads and descriptors, and what /health says."""
    # Descriptors first, while no request of ours is open; /health then adds its own task,
    # which every sample counts alike.
    fds = len(os.listdir(f"/proc/{served.pid}/fd"))
    health = await get_health(served.port)
    status = proc_status(served.pid)
    return Sample(
        calls_done=calls_done,
        rss_kib=int(status["VmRSS"].split()[0]),
        hwm_kib=int(status["VmHWM"].split()[0]),
        threads=int(status["Threads"]),
        fds=fds,
        tasks=int(health["tasks"]),
        connections=int(health["connections"]),
        active_calls=int(health["activeCalls"]),
    )


async def settled(served: Served, calls_done: int, baseline: Sample | None) -> Sample:
    """Sample until no call is open and fds and tasks are down to ``baseline`` (or time is up)."""
    # A call's last steps on the server (its handler task running on_stop, the request task
    # returning) end just after the client has seen the close, so a sample taken at once may
    # still count them: this waits for them rather than allowing a margin.
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        now = await sample(served, calls_done)
        quiet = now.connections == 0 and now.active_calls == 0
        if baseline is not None:
            quiet = quiet and now.fds <= baseline.fds and now.tasks <= baseline.tasks
        if quiet or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.1)


async def resting(served: Served, calls_done: int, baseline: Sample | None) -> Sample:
    """Sample, as settled() does, until three samples in a row agree (or time is up).

    The baseline cannot wait for a known count of tasks and descriptors: it is what sets it. So
    it waits for them to hold still instead, rather than for a fixed time after the last call.
    """
    deadline = time.monotonic() + SETTLE_TIMEOUT
    recent: list[tuple[int, int, int, int]] = []
    while True:
        now = await settled(served, calls_done, baseline)
        recent = [*recent[-2:], (now.tasks, now.fds, now.connections, now.active_calls)]
        if (len(recent) == 3 and len(set(recent)) == 1) or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.1)


# --- a lean Twilio-side client: raw WebSocket frames over asyncio streams -----------------------


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """A final client frame with the all-zero masking key (the payload is then sent as it is)."""
    size = len(payload)
    if size < 126:
        return struct.pack(">BBI", 0x80 | opcode, 0x80 | size, 0) + payload
    if size < 1 << 16:
        return struct.pack(">BBHI", 0x80 | opcode, 0x80 | 126, size, 0) + payload
    return struct.pack(">BBQI", 0x80 | opcode, 0x80 | 127, size, 0) + payload


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next server frame as (opcode, payload); the server never masks nor fragments."""
    first, second = await reader.readexactly(2)
    assert first & 0x80 and not second & 0x80, f"unexpected frame header {first:#x} {second:#x}"
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack(">H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack(">Q", await reader.readexactly(8))
    return first & 0x0F, await reader.readexactly(length)


def call_audio(index: int) -> bytes:
    """Distinct mu-law noise for each call, so a recording that got another call's audio is caught."""
    return random.Random(index).randbytes(FRAMES_PER_CALL * FRAME_BYTES)


async def sequential_call(port: int, index: int) -> CallResult:
    """One short call: connected, start, 100 ms of media (unpaced), its echo, stop; the close handshake."""
    caller = Caller()
    audio = call_audio(index)
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET /call HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), f"call {index}: upgrade refused: {head!r}"
        headers = dict(
            (name.strip().lower(), value.strip())
            for name, _, value in (line.partition(":") for line in head.decode().split("\r\n")[1:])
        )
        assert headers.get("sec-websocket-accept") == accept_key(key), f"call {index}: {head!r}"
        messages = [caller.connected(), caller.start()]
        messages += [caller.media(audio[i : i + FRAME_BYTES]) for i in range(0, len(audio), FRAME_BYTES)]
        writer.write(b"".join(masked_frame(0x1, m) for m in messages))
        result = CallResult(caller.stream_sid, caller.call_sid, audio, close_code=0)
        echoed: list[bytes] = []
        while True:
            opcode, payload = await read_frame(reader)
            if opcode == 0x1:
                message = json.loads(payload)
                assert message["event"] == "media", f"call {index}: unexpected message {message}"
                assert message["streamSid"] == caller.stream_sid, f"call {index}: another call's echo"
                echoed.append(binascii.a2b_base64(message["media"]["payload"]))
                # 100 ms fits in the server's 100 ms send lead, so every frame comes back at once;
                # stop is sent then (a stop in the same burst would end the call before its echo).
                if len(echoed) == FRAMES_PER_CALL:
                    writer.write(masked_frame(0x1, caller.stop()))
            elif opcode == 0x8:
                (result.close_code,) = struct.unpack(">H", payload[:2])
                break
            else:
                raise AssertionError(f"call {index}: unexpected opcode {opcode}")
        writer.write(masked_frame(0x8, payload[:2]))  # answer the close with its code
        assert await reader.read() == b"", f"call {index}: data after the close"  # EOF: socket closed
    finally:
        writer.close()
        await writer.wait_closed()
    result.echoed = b"".join(echoed)
    result.echoes = len(echoed)
    return result


async def place_call(port: int, index: int) -> CallResult:
    """One sequential call, which must close with 1000 after its audio came back frame for frame."""
    try:
        async with asyncio.timeout(CALL_TIMEOUT):
            result = await sequential_call(port, index)
    except TimeoutError:
        raise AssertionError(f"call {index} was not over within {CALL_TIMEOUT:g} s") from None
    assert result.close_code == 1000, f"call {index} ({result.stream_sid}) closed with {result.close_code}"
    assert result.echoes == FRAMES_PER_CALL, f"call {index}: {result.echoes} echoes"
    assert result.echoed == result.audio, f"call {index}: the echo is not the audio it sent"
    return result


# --- the recordings ----------------------------------------------------------------------------


def check_recordings(
    record_dir: Path, expected_calls: int, sequential: dict[str, CallResult]
) -> tuple[int, int]:
    """Every call published once, ended by stop, valid WAVs, nothing half-written: (summaries, WAVs)."""
    call_dirs = [d for d in record_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
    summaries = sorted(p for d in call_dirs for p in d.glob("*.json"))
    assert len(summaries) == expected_calls, f"{len(summaries)} recordings for {expected_calls} calls"
    listed: set[Path] = set()
    stream_sids: set[str] = set()
    bad_reasons: list[str] = []
    for path in summaries:
        summary = json.loads(path.read_text())
        stream_sid = summary["streamSid"]
        stream_sids.add(stream_sid)
        if summary["endReason"] != "stop" or summary["error"] is not None:
            bad_reasons.append(f"{path.name}: endReason={summary['endReason']} error={summary['error']}")
        files = summary["files"]
        assert files["summary"] == str(path.relative_to(record_dir)), path
        wavs = {track: record_dir / name for track, name in files.items() if track != "summary"}
        assert "inbound" in wavs, f"{path.name}: no inbound recording: {files}"
        listed.update(wavs.values())
        frames = {track: check_wav(wav) for track, wav in wavs.items()}
        assert len(set(frames.values())) == 1, f"{path.name}: tracks of unequal length {frames}"
        call = sequential.get(stream_sid)
        if call is not None:
            assert summary["counters"]["messages"].get("media") == FRAMES_PER_CALL, summary["counters"]
            pcm = ulaw_to_pcm16(call.audio)
            assert read_pcm(wavs["inbound"]).startswith(pcm), f"{path.name}: inbound audio differs"
            # The echo is recorded where it played: after a few ms of silence, all of it.
            assert "outbound" in wavs, f"{path.name}: the echo was not recorded: {files}"
            assert pcm in read_pcm(wavs["outbound"]), f"{path.name}: outbound audio is not the echo"
    assert not bad_reasons, f"{len(bad_reasons)} calls did not end with stop: {bad_reasons[:5]}"
    assert len(stream_sids) == expected_calls, "a stream was published twice"
    assert sequential.keys() <= stream_sids, "a sequential call has no recording"
    on_disk = {p for d in call_dirs for p in d.glob("*.wav")}
    assert on_disk == listed, f"WAV files no summary names: {sorted(on_disk - listed)[:5]}"
    partial = record_dir / ".partial"
    leftovers = sorted(partial.rglob("*")) if partial.exists() else []
    assert not leftovers, f"left in {partial}: {leftovers[:5]}"
    temporary = sorted(record_dir.rglob("*.tmp"))
    assert not temporary, f"temporary files left: {temporary[:5]}"
    return len(summaries), len(on_disk)


def read_pcm(path: Path) -> bytes:
    """The PCM frames of a WAV file."""
    with wave.open(str(path), "rb") as w:
        return w.readframes(w.getnframes())


def check_wav(path: Path) -> int:
    """A published WAV: 8 kHz, 16-bit, mono, its header agreeing with its size; returns its frames."""
    with wave.open(str(path), "rb") as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (8000, 2, 1), path
        frames = w.getnframes()
    assert frames * 2 + 44 == path.stat().st_size, f"{path}: header says {frames} frames"
    return frames


def log_problems(log: Path) -> list[str]:
    """Server log lines at warning or above, except the expected startup warning."""
    problems = []
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            problems.append(line)  # not a log line: a traceback, say
            continue
        if entry.get("level") in ("warning", "error", "critical") and STARTUP_WARNING not in str(
            entry.get("event")
        ):
            problems.append(line)
    return problems


# --- the soak ----------------------------------------------------------------------------------


def report(figures: Figures) -> None:
    """Print the figures, and write them as JSON to CALLSOCK_SOAK_REPORT if it is set."""
    f = figures
    p2 = f.phase2_report
    print(
        f"\nsoak: {f.total_calls} calls in {f.total_seconds:.1f} s"
        f"\n  phase 1: {f.sequential_calls} sequential calls in {f.phase1_seconds:.1f} s "
        f"({f.phase1_calls_per_second:.0f} calls/s), {f.phase1_echoes} echoes"
        f"\n  phase 2: {f.concurrent_calls} concurrent calls for {f.phase2_seconds:.1f} s: "
        f"connected {p2.get('connected')}, failed {p2.get('failed')}, echoes {p2.get('echoes_received')}, "
        f"missing {p2.get('missing_echoes')}, wrong {p2.get('wrong_echoes')}, "
        f"rtt p50/p99 {p2.get('rtt_p50_ms')}/{p2.get('rtt_p99_ms')} ms, closes {p2.get('closes')}"
        f"\n  RSS MiB: baseline {f.rss_baseline_mib:.1f}, peak {f.rss_peak_mib:.1f}, "
        f"final {f.rss_final_mib:.1f}"
        f"\n  RSS MiB in phase 1: {', '.join(f'{r:.1f}' for r in f.phase1_rss_mib)}"
        f"\n  fds: baseline {f.fds_baseline}, final {f.fds_final}; tasks: baseline {f.tasks_baseline}, "
        f"final {f.tasks_final}; threads: baseline {f.threads_baseline}, final {f.threads_final}"
        f"\n  recordings: {f.recordings} calls, {f.wav_files} WAV files"
    )
    path = os.environ.get("CALLSOCK_SOAK_REPORT")
    if path:
        Path(path).write_text(json.dumps(asdict(f), indent=2) + "\n")


@pytest.mark.slow
async def test_soak(served: Served) -> None:
    """Thousands of sequential calls, then hundreds at once: no leak, every call recorded."""
    sequential_calls = _env_int("CALLSOCK_SOAK_CALLS", 2000, 10)
    concurrent_calls = _env_int("CALLSOCK_SOAK_CONCURRENT", 300, 1)
    phase2_seconds = float(os.environ.get("CALLSOCK_SOAK_SECONDS", "10"))
    figures = Figures(WARMUP_CALLS, sequential_calls, concurrent_calls)
    figures.total_calls = WARMUP_CALLS + sequential_calls + concurrent_calls
    began = time.perf_counter()
    await wait_healthy(served)

    # Warm-up: imports, the disk writer thread, allocator pools; then the baseline.
    placed = [await place_call(served.port, index) for index in range(WARMUP_CALLS)]
    # The last call's on_stop and request task end just after its close: they are no baseline.
    baseline = await resting(served, 0, None)
    assert baseline.connections == 0 and baseline.active_calls == 0, baseline

    # Phase 1: sequential short calls, sampled every tenth of the way.
    checkpoints = {round(sequential_calls * k / 10): k for k in range(1, 11)}
    series: dict[int, Sample] = {}
    phase1_began = time.perf_counter()
    phase1_busy = 0.0
    for index in range(sequential_calls):
        placed.append(await place_call(served.port, WARMUP_CALLS + index))
        done = index + 1
        if done in checkpoints:
            paused = time.perf_counter()
            series[checkpoints[done]] = await settled(served, done, baseline)
            phase1_busy += paused - phase1_began
            phase1_began = time.perf_counter()
    phase1_busy += time.perf_counter() - phase1_began  # sampling pauses excluded
    figures.phase1_seconds = round(phase1_busy, 2)
    figures.phase1_calls_per_second = round(sequential_calls / phase1_busy, 1)
    figures.phase1_echoes = sum(r.echoes for r in placed[WARMUP_CALLS:])
    figures.phase1_rss_mib = [round(series[k].rss_mib, 2) for k in sorted(series)]
    figures.phase1_fds = [series[k].fds for k in sorted(series)]
    figures.phase1_tasks = [series[k].tasks for k in sorted(series)]

    # Phase 2: hundreds of concurrent calls streaming real-time audio, echoed.
    phase2_rss: list[float] = []

    def progress(_: dict[str, Any]) -> None:
        """Sample the server's RSS (bench calls this twice a second, on its own thread)."""
        phase2_rss.append(round(int(proc_status(served.pid)["VmRSS"].split()[0]) / 1024, 2))

    config = BenchConfig(
        f"ws://{HOST}:{served.port}/call",
        calls=concurrent_calls,
        seconds=phase2_seconds,
        mode="echo",
        ramp_ms=3000,
        grace=PHASE2_GRACE,
    )
    phase2_began = time.perf_counter()
    # On a loop of its own, uvloop as `callsock bench` runs it: the load generator shares the
    # machine with the server, and on asyncio's default loop it costs the server CPU it needs.
    bench = await asyncio.to_thread(lambda: uvloop.run(run_bench(config, progress)))
    figures.phase2_seconds = round(time.perf_counter() - phase2_began, 2)
    figures.phase2_report = bench.to_dict()
    figures.phase2_rss_mib = phase2_rss

    # Afterwards: every call closed; wait for the server to return to rest.
    final = await resting(served, sequential_calls, baseline)
    figures.rss_baseline_mib = round(baseline.rss_mib, 2)
    figures.rss_peak_mib = round(final.hwm_kib / 1024, 2)
    figures.rss_final_mib = round(final.rss_mib, 2)
    figures.fds_baseline, figures.fds_final = baseline.fds, final.fds
    figures.tasks_baseline, figures.tasks_final = baseline.tasks, final.tasks
    figures.threads_baseline, figures.threads_final = baseline.threads, final.threads
    try:
        figures.recordings, figures.wav_files = check_recordings(
            served.record_dir, figures.total_calls, {r.stream_sid: r for r in placed}
        )
    finally:
        figures.total_seconds = round(time.perf_counter() - began, 1)
        report(figures)

    # First, as it tells why anything below failed: a server that falls behind says so (dropped
    # audio, a recording still being written at close); a clean run logs nothing at warning.
    problems = log_problems(served.log)
    assert not problems, f"{len(problems)} server log lines at warning or above: {problems[:5]}"
    assert bench.connected == concurrent_calls and bench.failed == 0, figures.phase2_report
    assert bench.missing_echoes == 0 and bench.wrong_echoes == 0, figures.phase2_report
    assert bench.closes == {"1000": concurrent_calls}, figures.phase2_report
    assert bench.echoes_received == bench.frames_sent > 0, figures.phase2_report

    assert (final.connections, final.active_calls) == (0, 0), final
    # Descriptors come back exactly: every sample is taken with no connection of ours open (the
    # previous /health was read to EOF, so the server had closed that socket), and settled()
    # waits for calls' last steps; what remains is the listening socket, the event loop's own
    # descriptors and the log file, all there at the baseline already.
    assert final.fds == baseline.fds, f"descriptors: {baseline.fds} at baseline, {final.fds} after"
    # /health counts its own request's task in both; anything more is a task that outlived its call.
    assert final.tasks == baseline.tasks, f"tasks: {baseline.tasks} at baseline, {final.tasks} after"

    half, full = series[5].rss_mib, series[10].rss_mib
    assert full - half < RSS_SECOND_HALF_GROWTH_MIB, (
        f"RSS grew {full - half:.1f} MiB over the second half of phase 1 "
        f"({sequential_calls - series[5].calls_done} calls): a per-call leak"
    )
    allowed = max(RSS_SLACK_MIB, RSS_SLACK_SHARE * baseline.rss_mib)
    allowed += RSS_PER_CONCURRENT_CALL_KIB * concurrent_calls / 1024
    assert final.rss_mib <= baseline.rss_mib + allowed, (
        f"RSS {final.rss_mib:.1f} MiB after the soak, {baseline.rss_mib:.1f} MiB at baseline "
        f"(allowed +{allowed:.1f} MiB)"
    )

    served.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(served.process.wait, 30) == 0, served.log.read_text()[-2000:]
    shutil.rmtree(served.record_dir)  # hundreds of MB of audio; a failed run keeps them to look at
