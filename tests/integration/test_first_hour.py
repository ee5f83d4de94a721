"""A new user's first hour: the close waits for the files, counters only go up, and what a person sees.

Each test drives a real server on 127.0.0.1 with a real WebSocket client (aiohttp's, or the
independent Twilio simulator streamdouble), and reads real files.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from streamdouble import api as sd_api
from streamdouble import audio as sd_audio
from streamdouble.session import SessionConfig

from callsock.call.call import Call
from callsock.observability.logs import configure_logging
from callsock.protocol.g711 import ulaw_to_pcm16
from callsock.recording.recorder import CallRecorder
from callsock.server.app import App

from ..helpers import (
    FRAME,
    REPO,
    TwilioPeer,
    dtmf,
    eventually,
    http_url,
    media,
    published,
    read_wav,
    receive_close,
    running_server,
    sid,
    stop,
    twilio_start,
    ws_url,
)
from ..processes import free_port, run_callsock, serve_process, wait_healthy, wait_port

RATE = 8000


def chirp(seconds: float, f0: float = 300.0, f1: float = 3000.0, amplitude: float = 12_000.0) -> np.ndarray:
    """A linear sine sweep as int16 samples at 8 kHz."""
    t = np.arange(int(seconds * RATE), dtype=np.float64) / RATE
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * seconds))
    return np.round(amplitude * np.sin(phase)).astype(np.int16)


def write_wav(path: Path, pcm: np.ndarray) -> Path:
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.astype("<i2").tobytes())
    return path


@pytest.fixture(params=["idle", "busy"])
def machine(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test as it is, and again with another process keeping one core busy."""
    if request.param == "idle":
        yield "idle"
        return
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield "busy"
    finally:
        hog.kill()
        hog.wait()


# --- The close waits for the files, whoever closes first ----------------------------------------


def recording_exists(record_dir: Path, stream_sid: str, tracks: tuple[str, ...] = ("inbound",)) -> bool:
    call_dir = record_dir / ("CA" + stream_sid[2:])
    return (call_dir / f"{stream_sid}.json").is_file() and all(
        (call_dir / f"{stream_sid}.{track}.wav").is_file() for track in tracks
    )


async def close_right_after_stop(
    client: aiohttp.ClientSession, url: str, stream_sid: str, *, send_stop: bool
) -> None:
    """Start, two frames, stop (or not), and the client's own close frame at once, as Twilio does."""
    ws = await client.ws_connect(url)
    await ws.send_str(twilio_start(stream_sid))
    await ws.send_str(media(stream_sid, FRAME, 0))
    await ws.send_str(media(stream_sid, FRAME, 20, seq=3))
    if send_stop:
        await ws.send_str(stop(stream_sid))
    await ws.close()  # returns once the server's close frame is in: the handshake is complete


@pytest.mark.parametrize("send_stop", [True, False], ids=["stop-then-close", "close-only"])
async def test_client_that_closes_first_sees_the_files(
    client: aiohttp.ClientSession, record_dir: Path, send_stop: bool
) -> None:
    """200 calls whose client closes right after stop: the files exist when its close completes."""
    async with running_server(record_dir) as server:
        for n in range(200):
            stream_sid = sid("MZ", 10_000 + n)
            await close_right_after_stop(client, ws_url(server), stream_sid, send_stop=send_stop)
            assert recording_exists(record_dir, stream_sid), f"call {n}: closed before its files existed"
    summaries = published(record_dir)
    assert len(summaries) == 200
    assert {s["endReason"] for s in summaries.values()} == {"stop" if send_stop else "closed"}


async def test_client_that_closes_first_sees_the_files_on_a_slow_disk(
    client: aiohttp.ClientSession, record_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same with a disk that takes 30 ms to publish each call: the close waits for it."""
    finalize = CallRecorder._publish

    def slow_finalize(self: CallRecorder, *args: Any) -> dict[str, str]:
        time.sleep(0.03)  # on the recording thread: a disk that is slow to publish
        return finalize(self, *args)

    monkeypatch.setattr(CallRecorder, "_publish", slow_finalize)
    async with running_server(record_dir) as server:
        for n in range(40):
            stream_sid = sid("MZ", 20_000 + n)
            await close_right_after_stop(client, ws_url(server), stream_sid, send_stop=True)
            assert recording_exists(record_dir, stream_sid), f"call {n}: closed before its files existed"


async def test_a_disk_slower_than_the_close_timeout_is_named_in_the_summary(
    client: aiohttp.ClientSession, record_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publishing that outlasts --close-timeout: the close goes, the summary's error says why."""
    finalize = CallRecorder._publish
    release = threading.Event()

    def stuck_finalize(self: CallRecorder, *args: Any) -> dict[str, str]:
        release.wait(10)  # the disk hangs until the close has happened
        return finalize(self, *args)

    monkeypatch.setattr(CallRecorder, "_publish", stuck_finalize)
    stream_sid = sid("MZ", 25_000)
    async with running_server(record_dir, close_timeout=0.2) as server:
        await close_right_after_stop(client, ws_url(server), stream_sid, send_stop=True)
        assert not recording_exists(record_dir, stream_sid)
        release.set()
        await eventually(lambda: recording_exists(record_dir, stream_sid), what="the late recording")
    summary = published(record_dir)[stream_sid]
    assert (summary["endReason"], summary["error"]) == ("stop", "recording-late")


async def test_streamdouble_sees_the_files_when_its_call_returns(record_dir: Path, tmp_path: Path) -> None:
    """streamdouble sends stop and closes at once; when api.call returns, the files are there."""
    caller = write_wav(tmp_path / "caller.wav", chirp(0.4))
    config = SessionConfig(response_timeout_s=0.2, quiet_period_s=0.1, max_drain_s=1.0)
    async with running_server(record_dir) as server:
        for _ in range(5):
            report = await sd_api.call(ws_url(server), audio_path=str(caller), config=config)
            identity = report.result.identity
            call_dir = record_dir / identity.call_sid
            assert (call_dir / f"{identity.stream_sid}.json").is_file()
            assert (call_dir / f"{identity.stream_sid}.inbound.wav").is_file()


# --- The outbound recording is what the caller heard ---------------------------------------------


def find_exact(track: np.ndarray, piece: np.ndarray) -> int:
    """The sample offset at which ``piece`` appears whole in ``track``, or fail."""
    correlation = np.correlate(track.astype(np.float64), piece.astype(np.float64), mode="valid")
    offset = int(np.argmax(correlation))
    assert np.array_equal(track[offset : offset + piece.size], piece), "not found sample for sample"
    return offset


def frames_in_order(track: np.ndarray, sent: np.ndarray) -> list[int]:
    """Where each 20 ms frame of ``sent`` is in ``track``, checking each whole and in order.

    Between two frames there may only be nothing (back to back) or the silence of a real
    underrun, at least a frame long; returns the gaps found, in samples.
    """
    frames = [sent[i : i + 160] for i in range(0, sent.size, 160)]
    position = find_exact(track, frames[0]) + frames[0].size
    gaps = []
    for frame in frames[1:]:
        if np.array_equal(track[position : position + frame.size], frame):
            position += frame.size
            continue
        rest = track[position:]
        silent = int(np.argmax(rest != 0)) if np.any(rest != 0) else rest.size
        assert silent >= 160, f"a gap of {silent} samples: jitter recorded as a click"
        assert np.array_equal(track[position + silent : position + silent + frame.size], frame)
        gaps.append(silent)
        position += silent + frame.size
    return gaps


async def test_echo_recording_is_what_the_caller_heard(
    record_dir: Path, tmp_path: Path, machine: str
) -> None:
    """serve --echo, streamdouble playing a 2 s chirp: outbound.wav holds it back to back, exactly."""
    caller = write_wav(tmp_path / "caller.wav", chirp(2.0))
    sent = np.frombuffer(ulaw_to_pcm16(b"".join(sd_audio.wav_to_ulaw_frames(caller))), dtype="<i2")
    config = SessionConfig(response_timeout_s=2.0, quiet_period_s=0.3, max_drain_s=5.0)
    async with running_server(record_dir, echo=True) as server:
        report = await sd_api.call(ws_url(server), audio_path=str(caller), config=config)
    assert report.exit_code == 0, report.to_dict()
    heard = np.frombuffer(ulaw_to_pcm16(report.audio_received), dtype="<i2")
    assert np.array_equal(heard, sent)  # the caller got every frame back
    identity = report.result.identity
    call_dir = record_dir / identity.call_sid
    outbound = np.frombuffer(read_wav(call_dir / f"{identity.stream_sid}.outbound.wav"), dtype="<i2")
    inbound = np.frombuffer(read_wav(call_dir / f"{identity.stream_sid}.inbound.wav"), dtype="<i2")
    gaps = frames_in_order(outbound, sent)
    if not gaps:  # no underrun (the usual case): one shifted copy of the caller, sample for sample
        offset = find_exact(outbound, sent)
        assert not outbound[:offset].any() and not outbound[offset + sent.size :].any()
        assert np.array_equal(inbound[: sent.size], sent)


async def test_send_audio_recording_is_sample_exact(
    client: aiohttp.ClientSession, record_dir: Path, machine: str
) -> None:
    """send_audio of a 2 s chirp: the outbound track holds exactly its mu-law, in one piece."""
    pcm = chirp(2.0, 400.0, 2500.0)
    app = App()

    @app.on_start
    async def speak(call: Call) -> None:
        await call.send_audio(pcm)
        await call.hangup()

    async with running_server(record_dir, app) as server, client.ws_connect(ws_url(server)) as ws:
        peer = TwilioPeer(ws, sid("MZ", 7))
        await peer.start()
        received = []
        while (message := await peer.receive()) is not None:
            received.append(message)
            if message["event"] == "mark":  # hangup's mark: its audio has played
                await peer.mark(message["mark"]["name"])
    expected = np.frombuffer(ulaw_to_pcm16(b"".join(_payloads(received))), dtype="<i2")
    assert expected.size == pcm.size
    outbound = np.frombuffer(read_wav(record_dir / peer.call_sid / f"{peer.stream_sid}.outbound.wav"), "<i2")
    offset = find_exact(outbound, expected)
    assert not outbound[:offset].any() and not outbound[offset + expected.size :].any()


def _payloads(messages: list[dict[str, Any]]) -> list[bytes]:
    import base64

    return [base64.b64decode(m["media"]["payload"]) for m in messages if m["event"] == "media"]


# --- Counters never go backwards -----------------------------------------------------------------


def counter_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of every counter and histogram in a scrape, by name and labels."""
    samples = {}
    for family in text_string_to_metric_families(text):
        if family.type not in ("counter", "histogram"):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_counters_never_go_backwards(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """/metrics scraped in a tight loop while calls start and end: no counter ever decreases."""
    async with running_server(record_dir, echo=True) as server:
        done = asyncio.Event()
        scrapes: list[dict[tuple[str, tuple[tuple[str, str], ...]], float]] = []

        async def scrape() -> None:
            while not done.is_set():
                async with client.get(http_url(server, "/metrics")) as response:
                    scrapes.append(counter_samples(await response.text()))

        async def call(n: int) -> None:
            async with client.ws_connect(ws_url(server)) as ws:
                peer = TwilioPeer(ws, sid("MZ", 30_000 + n))
                await peer.start()
                await peer.media(FRAME * 5)
                await peer.dtmf("5")
                await peer.stop()
                await receive_close(ws)

        scraper = asyncio.create_task(scrape())
        for wave_of_calls in range(10):
            await asyncio.gather(*(call(10 * wave_of_calls + n) for n in range(10)))
        await eventually(lambda: len(scrapes) > 50, what="50 scrapes")
        done.set()
        await scraper
    previous: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for number, samples in enumerate(scrapes):
        for key, value in samples.items():
            assert value >= previous.get(key, 0.0), f"scrape {number}: {key} went {previous[key]} -> {value}"
        previous.update(samples)
    messages = previous[("callsock_messages_total", (("event", "media"),))]
    assert messages == 100 * 5


# --- What a person sees --------------------------------------------------------------------------


async def test_health_is_503_while_draining(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """Load balancers read the status code: /health answers 503, "draining", during a drain."""
    async with running_server(record_dir) as server, client.ws_connect(ws_url(server)) as ws:
        async with client.get(http_url(server, "/health")) as response:
            assert response.status == 200 and (await response.json())["status"] == "ok"
        stream_sid = sid("MZ", 40)
        await ws.send_str(twilio_start(stream_sid))
        stopping = asyncio.create_task(server.stop(drain=30.0))

        async def draining() -> bool:
            async with client.get(http_url(server, "/health")) as response:
                return response.status == 503 and (await response.json())["status"] == "draining"

        await eventually(draining, what="/health to say draining")
        await ws.send_str(stop(stream_sid))
        assert (await receive_close(ws))[0] == 1000
        await stopping


async def test_call_ended_is_logged_with_its_files(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """The `call ended` line comes once the recording is published, and names its files."""
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    try:
        async with running_server(record_dir) as server, client.ws_connect(ws_url(server)) as ws:
            peer = TwilioPeer(ws, sid("MZ", 41))
            await peer.start()
            await peer.media(FRAME * 3)
            await peer.stop()
            await receive_close(ws)
    finally:
        configure_logging("warning", "json")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    ended = [line for line in lines if line["event"] == "call ended"]
    assert len(ended) == 1
    summary = published(record_dir)[peer.stream_sid]
    assert ended[0]["files"] == summary["files"] and ended[0]["endReason"] == "stop"
    assert ended[0]["callSid"] == peer.call_sid


async def test_recovered_summary_keeps_dtmf_and_counters(tmp_path: Path) -> None:
    """After SIGKILL, the recovered summary has the DTMF digits and counters journaled before it."""
    record_dir = tmp_path / "rec"
    stream_sid = sid("MZ", 42)
    with serve_process(record_dir, "--flush-seconds", "0.2") as (process, port):
        await wait_healthy(port)
        async with aiohttp.ClientSession() as client, client.ws_connect(f"ws://127.0.0.1:{port}/call") as ws:
            await ws.send_str(twilio_start(stream_sid))
            for i in range(10):
                await ws.send_str(media(stream_sid, FRAME, 20 * i, seq=2 + i))
            for digit, seq in (("1", 20), ("#", 21)):
                await ws.send_str(dtmf(stream_sid, digit, seq=seq))

            def journaled() -> bool:
                for path in (record_dir / ".partial").glob("*/*.json"):
                    journal = json.loads(path.read_text())
                    media_seen = journal.get("counters", {}).get("messages", {}).get("media")
                    return len(journal.get("dtmf", [])) == 2 and media_seen == 10
                return False

            await eventually(journaled, what="the journal to hold the digits and the media count")
            process.kill()
    status, _, err = await run_callsock("recover", str(record_dir), "--json")
    assert status == 0, err
    summary = published(record_dir)[stream_sid]
    assert summary["endReason"] == "crashed" and summary["recovered"] is True
    assert summary["dtmf"] == [{"digit": "1", "sequenceNumber": "20"}, {"digit": "#", "sequenceNumber": "21"}]
    assert summary["counters"]["messages"] == {"start": 1, "media": 10, "dtmf": 2}
    assert summary["counters"]["mediaBytes"] == 10 * len(FRAME)


def test_asgi_logs_json_and_warns_without_a_token(tmp_path: Path) -> None:
    """Under uvicorn, with standard output not a terminal, callsock's lines are JSON, with the warning."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "examples.fastapi_app:api", "--host", "127.0.0.1",
               "--port", str(port)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env
    )
    try:
        wait_port(port)
    finally:
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=20)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    warning = [line for line in lines if line["event"].startswith("no Twilio auth token")]
    assert len(warning) == 1 and warning[0]["level"] == "warning"
    assert all(line.startswith("{") for line in out.splitlines() if line.strip())
