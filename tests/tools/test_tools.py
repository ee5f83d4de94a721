"""`callsock simulate` and `callsock bench` against real servers on loopback."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from callsock import App, Call, MarkEcho
from callsock.call.audio import load_wav, pcm_to_mulaw
from callsock.cli.main import main
from callsock.tools.bench import BenchConfig, client_frame, run_bench
from callsock.tools.simulate import SimulationConfig, simulate, write_reply

from ..helpers import read_wav, running_server, ws_url


def tone_wav(path: Path, seconds: float = 0.4, rate: int = 16000, frequency: float = 440.0) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (8000 * np.sin(2 * np.pi * frequency * t)).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def sent_audio(path: Path) -> bytes:
    """What the simulator sends for a WAV: mu-law at 8 kHz, padded to whole 20 ms frames."""
    mulaw = pcm_to_mulaw(load_wav(path))
    return mulaw + b"\xff" * ((-len(mulaw)) % 160)


async def test_simulate_echo_call(tmp_path: Path, record_dir: Path) -> None:
    """A simulated Twilio call against --echo: clean, and the reply is what was said."""
    wav = tone_wav(tmp_path / "hello.wav")
    async with running_server(record_dir, echo=True) as server:
        report = await simulate(SimulationConfig(ws_url(server), wav, dtmf="12", parameters={"who": "test"},
                                                 quiet_seconds=0.3))  # fmt: skip
    assert report.ok, report.to_dict()
    assert report.handshake_status == 101 and report.close_code == 1000 and report.closed_by == "caller"
    assert report.reply.startswith(sent_audio(wav))
    assert report.first_audio_ms is not None and report.first_audio_ms < 200
    assert report.dtmf_sent == "12"
    summary = json.loads((record_dir / report.call_sid / f"{report.stream_sid}.json").read_text())
    assert [d["digit"] for d in summary["dtmf"]] == ["1", "2"]
    assert summary["customParameters"] == {"who": "test"}
    out = tmp_path / "reply.wav"
    write_reply(report, out)
    assert (
        read_wav(out)[: 2 * len(sent_audio(wav))]
        == read_wav(record_dir / report.call_sid / f"{report.stream_sid}.inbound.wav")[
            : 2 * len(sent_audio(wav))
        ]
    )


async def test_simulate_seed_dialect_checks_the_ack(tmp_path: Path, record_dir: Path) -> None:
    """In the seed dialect the simulator expects the exact acknowledgement, and gets it.

    Its --param values reach the recording too (the seed start carries them when given).
    """
    wav = tone_wav(tmp_path / "hello.wav", seconds=0.1)
    async with running_server(record_dir) as server:
        report = await simulate(
            SimulationConfig(
                ws_url(server), wav, dialect="seed", parameters={"tenant": "acme"}, quiet_seconds=0.1
            )
        )
    assert report.ack_received and report.ack_exact and report.ok
    summary = json.loads(
        (record_dir / f"stream.{report.stream_sid}" / f"{report.stream_sid}.json").read_text()
    )
    assert summary["dialect"] == "seed" and summary["customParameters"] == {"tenant": "acme"}
    async with running_server(record_dir, start_ack="never") as server:
        report = await simulate(SimulationConfig(ws_url(server), wav, dialect="seed", quiet_seconds=0.1))
    assert not report.ack_received and not report.ok


async def test_simulate_fork_both_tracks(tmp_path: Path, record_dir: Path) -> None:
    """--fork --track both sends the audio on two tracks, and counts both; the server records both."""
    wav = tone_wav(tmp_path / "hello.wav", seconds=0.2)
    frames = len(sent_audio(wav)) // 160
    async with running_server(record_dir) as server:
        report = await simulate(
            SimulationConfig(ws_url(server), wav, fork=True, track="both", quiet_seconds=0.1)
        )
    assert report.ok and report.media_received == 0
    assert report.frames_by_track == {"inbound": frames, "outbound": frames}
    assert report.frames_sent == 2 * frames
    summary = json.loads((record_dir / report.call_sid / f"{report.stream_sid}.json").read_text())
    assert summary["counters"]["messages"]["media"] == report.frames_sent
    for track in ("inbound", "outbound"):
        pcm = read_wav(record_dir / report.call_sid / f"{report.stream_sid}.{track}.wav")
        assert pcm.startswith(read_wav_bytes(sent_audio(wav)))


async def test_cli_simulate_reports_both_tracks(tmp_path: Path, record_dir: Path) -> None:
    """`callsock simulate --fork --track both`: the JSON report and the table count both tracks."""
    wav = tone_wav(tmp_path / "hello.wav", seconds=0.1)
    frames = len(sent_audio(wav)) // 160
    async with running_server(record_dir) as server:
        args = ("simulate", ws_url(server), "--audio", str(wav), "--fork", "--track", "both")
        as_json, as_table = await asyncio.gather(
            asyncio.to_thread(run_cli, *args, "--json"), asyncio.to_thread(run_cli, *args)
        )
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["frames_sent"] == 2 * frames
    assert report["frames_by_track"] == {"inbound": frames, "outbound": frames}
    assert as_table.returncode == 0, as_table.stderr
    assert f"{2 * frames} frames ({frames} inbound, {frames} outbound)" in as_table.stdout


def read_wav_bytes(mulaw: bytes) -> bytes:
    from callsock.protocol.g711 import ulaw_to_pcm16

    return ulaw_to_pcm16(mulaw)


async def test_simulate_flags_audio_on_a_fork(tmp_path: Path, record_dir: Path) -> None:
    """A server that talks back on a one-way fork is flagged, as Twilio would fail it (31924)."""
    wav = tone_wav(tmp_path / "hello.wav", seconds=0.1)
    async with running_server(record_dir, echo=True) as server:
        report = await simulate(SimulationConfig(ws_url(server), wav, fork=True, quiet_seconds=0.2))
    assert not report.ok
    assert any("one-way fork" in v for v in report.violations)


async def test_simulate_marks_and_clear_like_twilio(tmp_path: Path, record_dir: Path) -> None:
    """Marks are echoed after their audio plays; a clear makes pending marks come back at once."""
    app = App()
    outcomes: list[MarkEcho] = []

    @app.on_start
    async def talk(call: Call) -> None:
        await call.send_mulaw(b"\x30" * 1600)  # 200 ms
        call.create_task(call.mark("after-audio"))

    @app.on_dtmf
    async def stop_talking(call: Call, digit: str) -> None:
        await call.send_mulaw(b"\x31" * 8000)  # 1 s, then cut off
        call.create_task(call.mark("cut"))
        await asyncio.sleep(0.05)
        await call.clear()

    @app.on_mark
    async def echoed(call: Call, mark: MarkEcho) -> None:
        outcomes.append(mark)

    wav = tone_wav(tmp_path / "hello.wav", seconds=0.4)
    async with running_server(record_dir, app) as server:
        report = await simulate(SimulationConfig(ws_url(server), wav, dtmf="5", quiet_seconds=0.3))
    assert report.ok, report.to_dict()
    assert report.marks_received == 2 and report.marks_echoed == 2 and report.clears_received == 1
    assert outcomes == [MarkEcho("after-audio", "played"), MarkEcho("cut", "cleared")]


async def test_simulate_unreachable_server(tmp_path: Path) -> None:
    """A server that is not there gives a report with the error, not an exception."""
    wav = tone_wav(tmp_path / "hello.wav", seconds=0.1)
    report = await simulate(SimulationConfig("ws://127.0.0.1:9/call", wav))
    assert not report.ok and report.error is not None and "cannot connect" in report.error


async def test_bench_echo_mode(record_dir: Path) -> None:
    """bench in echo mode: every frame comes back, and round trips are measured."""
    async with running_server(record_dir, echo=True) as server:
        report = await run_bench(BenchConfig(ws_url(server), calls=5, seconds=1.0, ramp_ms=100))
    assert report.connected == 5 and report.failed == 0
    assert report.missing_echoes == 0 and report.wrong_echoes == 0
    assert report.frames_sent >= 5 * 40 and report.echoes_received == report.frames_sent
    assert report.rtt_p99_ms is not None and report.rtt_p99_ms > 0
    assert report.closes == {"1000": 5}


async def test_bench_flood_and_idle(record_dir: Path) -> None:
    """flood keeps frames in flight and counts echoes per second; idle sends no media."""
    async with running_server(record_dir, echo=True, send_lead_ms=3_600_000) as server:
        flood = await run_bench(BenchConfig(ws_url(server), calls=2, seconds=0.5, mode="flood", ramp_ms=10))
        idle = await run_bench(BenchConfig(ws_url(server), calls=3, seconds=0.3, mode="idle", ramp_ms=10))
    assert flood.messages_per_second > 500 and flood.missing_echoes == 0 and flood.wrong_echoes == 0
    assert idle.connected == 3 and idle.frames_sent == 0 and idle.closes == {"1000": 3}


async def test_bench_counts_missing_echoes(record_dir: Path) -> None:
    """Against a server that does not echo, every frame is reported missing."""
    async with running_server(record_dir) as server:
        report = await run_bench(BenchConfig(ws_url(server), calls=2, seconds=0.3, ramp_ms=10, grace=0.2))
    assert report.echoes_received == 0 and report.missing_echoes == report.frames_sent > 0


def test_client_frame_is_a_masked_text_frame() -> None:
    """The load generator's frames are final, masked text frames of the right length."""
    for size in (5, 200, 70000):
        frame = client_frame(b"x" * size)
        assert frame[0] == 0x81 and frame[1] & 0x80
        assert frame.endswith(b"x" * size)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callsock", *args], capture_output=True, text=True, timeout=60
    )


async def test_cli_simulate_and_bench(tmp_path: Path, record_dir: Path) -> None:
    """The commands print JSON reports and exit 0 on a clean run."""
    wav = tone_wav(tmp_path / "hello.wav", seconds=0.1)
    async with running_server(record_dir, echo=True) as server:
        url = ws_url(server)
        results = await asyncio.gather(
            asyncio.to_thread(
                run_cli, "simulate", url, "--audio", str(wav), "--json", "--out", str(tmp_path / "r.wav")
            ),
            asyncio.to_thread(run_cli, "bench", url, "--calls", "3", "--seconds", "0.5", "--json"),
        )
    simulated, benched = results
    assert simulated.returncode == 0, simulated.stderr
    report: dict[str, Any] = json.loads(simulated.stdout)
    assert report["ok"] and report["close_code"] == 1000
    assert (tmp_path / "r.wav").exists()
    assert benched.returncode == 0, benched.stderr
    assert json.loads(benched.stdout)["connected"] == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--dtmf", "12x"), "--dtmf takes 0-9, *, #, A-D, got '12x'"),
        (("--param", "novalue"), "--param takes KEY=VALUE, got 'novalue'"),
        (
            ("--track", "both"),
            "--track both needs --fork: a bidirectional stream carries only the inbound track",
        ),
    ],
)
def test_cli_simulate_bad_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    """Bad options exit 2 with one line naming the option (in-process: nothing is dialled)."""
    wav = tone_wav(tmp_path / "hello.wav", seconds=0.1)
    assert main(["simulate", "ws://127.0.0.1:9/call", "--audio", str(wav), *args]) == 2
    assert capsys.readouterr().err == f"callsock simulate: error: {message}\n"
