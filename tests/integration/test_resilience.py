"""Staying up and losing nothing: graceful shutdown, crash recovery, slow handlers, slow disks."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from callsock import App, AudioFrame, Call
from callsock.recording.sinks import WavSink
from callsock.tools.bench import BenchConfig, run_bench

from ..helpers import (
    FRAME,
    StreamingCall,
    assert_valid_wav,
    eventually,
    files_under,
    media,
    published,
    running_server,
    sid,
    stop,
    twilio_start,
    ws_url,
)
from ..processes import run_callsock, serve_process, wait_healthy


async def test_sigterm_drains_then_publishes_every_call(tmp_path: Path) -> None:
    """SIGTERM during 20 calls: new upgrades get 503, then every call is published, complete."""
    record_dir = tmp_path / "rec"
    # The drain is the window in which an upgrade is answered 503 (after it the server is gone):
    # 2 s, against the few milliseconds the test needs once /health says "draining".
    with serve_process(record_dir, "--drain-timeout", "2") as (process, port):
        await wait_healthy(port, process=process)
        url = f"ws://127.0.0.1:{port}/call"
        async with aiohttp.ClientSession() as client:
            calls = [StreamingCall(client, url, n) for n in range(20)]
            running = [asyncio.create_task(call.run()) for call in calls]
            # A second of audio from each call before the signal (what the check below needs).
            await eventually(lambda: all(call.sent >= 50 for call in calls) or any(t.done() for t in running))
            assert not any(t.done() for t in running), [call.close_code for call in calls]
            process.send_signal(signal.SIGTERM)

            async def draining() -> bool:
                async with client.get(f"http://127.0.0.1:{port}/health") as response:
                    status: str = (await response.json())["status"]
                    return status == "draining"

            await eventually(draining)
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await client.ws_connect(url)
            assert refused.value.status == 503
            await asyncio.wait_for(asyncio.gather(*running), 15)
        output, _ = process.communicate(timeout=20)
    assert process.returncode == 0, output
    assert [call.close_code for call in calls] == [1001] * 20
    summaries = published(record_dir)
    assert len(summaries) == 20
    for call in calls:
        summary = summaries[call.stream_sid]
        assert summary["endReason"] == "shutdown"
        pcm = assert_valid_wav(record_dir / call.call_sid / f"{call.stream_sid}.inbound.wav")
        assert len(pcm) >= 2 * 8000 and call.audio().startswith(pcm)  # all the server had, >= 1 s
    assert not list((record_dir / ".partial").rglob("*.wav"))


async def test_sigkill_then_recover(tmp_path: Path) -> None:
    """After SIGKILL, `callsock recover` publishes what each call had flushed, endReason crashed."""
    record_dir = tmp_path / "rec"

    def flushed(stream_sid: str) -> int:
        """Bytes of the call's inbound WAV that reached .partial/ on disk (0 before it exists)."""
        paths = [p for p in files_under(record_dir / ".partial") if p.name == f"{stream_sid}.inbound.wav"]
        return max((path.stat().st_size for path in paths), default=0)

    with serve_process(record_dir, "--flush-seconds", "0.2") as (process, port):
        await wait_healthy(port, process=process)
        async with aiohttp.ClientSession() as client:
            calls = [StreamingCall(client, f"ws://127.0.0.1:{port}/call", n) for n in range(5)]
            running = [asyncio.create_task(call.run()) for call in calls]
            # Killed once over a second of each call is on disk (a flush every 0.2 s puts it there).
            await eventually(
                lambda: all(flushed(call.stream_sid) >= 44 + 2 * 8000 for call in calls),
                what="over 1 s of each call flushed to .partial/",
            )
            process.kill()
            await asyncio.gather(*running, return_exceptions=True)
    assert published(record_dir) == {}
    status, out, err = await run_callsock("recover", str(record_dir), "--json")
    assert status == 0, err
    recovered = json.loads(out)
    assert sorted(r["streamSid"] for r in recovered) == sorted(call.stream_sid for call in calls)
    summaries = published(record_dir)
    for call in calls:
        assert summaries[call.stream_sid]["endReason"] == "crashed"
        pcm = assert_valid_wav(record_dir / call.call_sid / f"{call.stream_sid}.inbound.wav")
        # Everything up to the last flush: at least the second that was on disk before the kill.
        assert len(pcm) >= 2 * 8000 and call.audio().startswith(pcm)
    status, out, _ = await run_callsock("recover", str(record_dir))
    assert status == 0 and "nothing to recover" in out


async def test_leftovers_are_reported_at_start(tmp_path: Path) -> None:
    """A server that finds another's unfinished recordings says how to recover them."""
    record_dir = tmp_path / "rec"
    leftover = record_dir / ".partial" / "7fffffff-1-1"  # a process id no process has
    leftover.mkdir(parents=True)
    (leftover / "MZ1.inbound.wav").write_bytes(bytes(44))
    with serve_process(record_dir) as (process, port):
        await wait_healthy(port, process=process)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
    assert f"callsock recover {record_dir}" in output


@asynccontextmanager
async def serving(record_dir: Path, app: App, **settings: Any) -> AsyncIterator[str]:
    async with running_server(record_dir, app, **settings) as server:
        yield ws_url(server)


async def test_slow_handler_does_not_slow_other_calls(record_dir: Path) -> None:
    """One call whose handler takes 200 ms a frame: its queue is bounded, other calls echo promptly."""
    app = App()
    slow_calls: list[Call] = []

    @app.on_start
    async def note(call: Call) -> None:
        if call.custom_parameters.get("slow"):
            slow_calls.append(call)

    @app.on_audio
    async def echo(call: Call, frame: AudioFrame) -> None:
        if call.custom_parameters.get("slow"):
            await asyncio.sleep(0.2)
        else:
            await call.send_mulaw(frame.mulaw)

    async with serving(record_dir, app, handler_queue_ms=400) as url, aiohttp.ClientSession() as client:
        async with client.ws_connect(url) as slow:
            await slow.send_str(twilio_start(sid("MZ", 99), params={"slow": "yes"}))

            async def flood_slow_call() -> None:
                for i in range(200):
                    await slow.send_str(media(sid("MZ", 99), FRAME, 20 * i))
                    await asyncio.sleep(0.005)

            flooding = asyncio.create_task(flood_slow_call())
            report = await run_bench(BenchConfig(url, calls=10, seconds=2.0, ramp_ms=100))
            await flooding
            await eventually(lambda: slow_calls[0].stats.media_bytes == 200 * len(FRAME))  # all received
            dropped = slow_calls[0].stats.audio_frames_dropped
            await slow.send_str(stop(sid("MZ", 99)))
    assert report.failed == 0 and report.missing_echoes == 0
    # Not a performance figure (a few ms on an idle machine): a handler that blocked its
    # neighbours would add 200 ms for each of the slow call's 200 frames, seconds in all, so a
    # bound this generous still catches it and a busy machine never trips it.
    assert report.rtt_p99_ms is not None and report.rtt_p99_ms < 1000
    # 200 frames in about a second against a 400 ms queue handled at 5 frames/s: over 150 dropped
    # (and still over 100 if sending them took ten times as long).
    assert dropped > 100


async def test_slow_disk_drops_audio_not_calls(record_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk slower than the calls: writes past the writer's budget are dropped as silence,
    the timeline holds, the drop is reported, and echoes stay prompt."""
    original = WavSink._write_at

    def slow_write(self: WavSink, track: str, offset: int, pcm: bytes) -> None:
        time.sleep(0.05)
        original(self, track, offset, pcm)

    monkeypatch.setattr(WavSink, "_write_at", slow_write)
    async with running_server(record_dir, echo=True, flush_seconds=0.05, buffer_bytes=1600) as server:
        server.hub.writer.max_pending_bytes = 8000
        report = await run_bench(BenchConfig(ws_url(server), calls=5, seconds=2.0, ramp_ms=50))
        assert server.hub.writer.dropped_bytes > 0
    assert report.failed == 0 and report.missing_echoes == 0
    # Not a performance figure: a disk write on the event loop would stall every call 50 ms per
    # write, seconds in all over this run; a busy machine never comes near the bound.
    assert report.rtt_p99_ms is not None and report.rtt_p99_ms < 1000
    summaries = list(published(record_dir).values())
    assert len(summaries) == 5
    for summary in summaries:
        files = summary["files"]
        pcm = assert_valid_wav(record_dir / files["inbound"])
        assert abs(len(pcm) - 16 * summary["durationMs"]) <= 16  # the timeline is whole (ms rounded)
    assert any(s.get("recordingDroppedMs", 0) > 0 for s in summaries)


def test_recover_leaves_a_running_servers_calls(tmp_path: Path) -> None:
    """recover() skips directories whose server process is alive (this one, here)."""
    from callsock.recording.recover import recover

    partial = tmp_path / ".partial" / f"{os.getpid():x}-1-1"
    partial.mkdir(parents=True)
    (partial / "MZ1.inbound.wav").write_bytes(bytes(44 + 320))
    [result] = recover(tmp_path)
    assert result.skipped == "its server is still running" and partial.exists()
