"""The examples in examples/, each served for real and called by the Twilio simulator streamdouble.

Each test starts a real server on 127.0.0.1 (a CallServer, or uvicorn for the FastAPI example)
with the example's ``app`` and places a call with streamdouble's Python API: a plain call, or
a scenario file written to ``tmp_path``. streamdouble paces in real time, so the clips are short.

What the simulator does that matters here (streamdouble 0.3.0, session.py): it streams caller
audio, then silence during scenario ``wait``/``wait_for`` steps; it echoes a mark when the audio
sent before it would have finished playing; on ``clear`` it drops pending marks without echoing
them (Twilio echoes them); and it hangs up once the agent has been quiet for ``quiet_period_s``
with no mark pending. ``report.audio_received`` is every media payload the agent sent, in order.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import textwrap
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import pytest
import uvicorn
from streamdouble import api as sd_api
from streamdouble import audio as sd_audio
from streamdouble.session import SessionConfig

from callsock import App, Call, CallServer, Settings
from callsock.protocol.g711 import ulaw_to_pcm16

from ..helpers import REPO, WAIT_SECONDS, connected, eventually, media, read_wav, sid, twilio_start

# The examples are a directory of scripts run from the repository root (`callsock serve
# examples.echo_bot:app`, `uvicorn examples.fastapi_app:api`), imported here the same way.
# pytest already puts the root on sys.path (tests/ is a package); this makes sure of it.
ROOT = REPO
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples import dtmf_menu, echo_bot, fastapi_app, greeting  # noqa: E402

RATE = 8000
FRAME = 160  # samples in a 20 ms frame
Samples = npt.NDArray[np.float64]

# A call ends quiet_period_s after the agent's last audio (a short wait: every example speaks at
# once, and nothing here pauses longer). The other two are only limits for an agent that never
# speaks or never stops: reaching them fails the test, so they are generous (a passing call never
# waits for them).
CONFIG = SessionConfig(response_timeout_s=WAIT_SECONDS, quiet_period_s=0.4, max_drain_s=2 * WAIT_SECONDS)


# ---------------------------------------------------------------------------------------------
# Audio helpers
# ---------------------------------------------------------------------------------------------


def write_wav(path: Path, pcm: npt.NDArray[np.int16]) -> Path:
    """Write int16 samples as an 8 kHz 16-bit mono WAV."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.astype("<i2").tobytes())
    return path


def sweep(seconds: float, f0: float, f1: float, amplitude: float) -> npt.NDArray[np.int16]:
    """A linear sine sweep: its autocorrelation has one sharp peak, so alignment is unambiguous."""
    t = np.arange(int(seconds * RATE)) / RATE
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * seconds))
    return np.round(amplitude * np.sin(phase)).astype(np.int16)


def decode(mulaw: bytes) -> Samples:
    """Mu-law bytes as float samples."""
    return np.frombuffer(ulaw_to_pcm16(mulaw), dtype="<i2").astype(np.float64)


def dominant_hz(samples: Samples) -> float:
    """The frequency of the strongest FFT bin (Hann window)."""
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.argmax(spectrum)) * RATE / samples.size


def best_correlation(reference: Samples, delayed: Samples, max_lag: int) -> tuple[float, int]:
    """The highest normalized cross-correlation of ``delayed`` against ``reference``, and its lag.

    ``delayed[lag + i]`` is compared with ``reference[i]`` for lags in ``[-max_lag, max_lag]``,
    over the samples the two share at that lag.
    """
    best = (-1.0, 0)
    for lag in range(-max_lag, max_lag + 1):
        a = reference[max(0, -lag) :]
        b = delayed[max(0, lag) :]
        n = min(a.size, b.size)
        a, b = a[:n], b[:n]
        norm = float(np.sqrt(np.dot(a, a) * np.dot(b, b)))
        if norm > 0:
            best = max(best, (float(np.dot(a, b)) / norm, lag))
    return best


# ---------------------------------------------------------------------------------------------
# Servers and calls
# ---------------------------------------------------------------------------------------------


@asynccontextmanager
async def serving(app: App, record_dir: Path) -> AsyncIterator[CallServer]:
    """A real CallServer on 127.0.0.1 and a free port, serving ``app``."""
    server = CallServer(Settings(host="127.0.0.1", port=0, record_dir=record_dir), app)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def url(server: CallServer) -> str:
    return f"ws://127.0.0.1:{server.port}{server.settings.path}"


def keeping_state(app: App, states: list[dict[str, Any]]) -> App:
    """``app`` plus an ``on_stop`` handler that keeps a copy of each call's ``call.state``."""
    combined = App()
    combined.include(app)

    @combined.on_stop
    async def keep(call: Call) -> None:
        states.append(dict(call.state))

    return combined


async def run_scenario(target: str, tmp_path: Path, yaml_text: str) -> sd_api.CallReport:
    """Write a scenario file and run it against ``target``."""
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml_text, encoding="utf-8")
    report: sd_api.CallReport = await sd_api.run_scenario(target, path, config=CONFIG)
    return report


def assert_clean(report: sd_api.CallReport) -> None:
    """Exit code 0: no violation, the agent spoke, every expect passed; and nobody hung up early."""
    result = report.result
    assert report.exit_code == 0, report.to_dict()
    assert report.violations == [] and result.unknown_events == [] and result.warnings == []
    assert result.failed_expectations == []
    assert (result.closed_early, result.closed_by, result.timed_out) == (False, None, False)


# ---------------------------------------------------------------------------------------------
# echo_bot
# ---------------------------------------------------------------------------------------------


async def test_echo_bot_sends_the_caller_back(tmp_path: Path) -> None:
    """echo_bot: the reply is the caller's audio, and callsock records both sides."""
    caller_wav = write_wav(tmp_path / "caller.wav", sweep(1.0, 300, 3000, 8000))
    sent = b"".join(sd_audio.wav_to_ulaw_frames(caller_wav))
    record_dir = tmp_path / "recordings"

    async with serving(echo_bot.app, record_dir) as server:
        report = await sd_api.call(url(server), audio_path=caller_wav, config=CONFIG)

    assert_clean(report)
    # The echo streams back while the caller talks, not after: the first reply comes before the
    # caller's 1 s of audio is over (in a few ms; the bound is only that generous so a busy
    # machine never fails it, while a bot that answered at the end would).
    assert report.time_to_first_audio_ms is not None and report.time_to_first_audio_ms < 1000
    reply = report.audio_received
    assert len(reply) == len(sent)  # every frame came back, nothing more
    correlation, lag = best_correlation(decode(sent), decode(reply), max_lag=800)
    assert correlation > 0.9 and lag == 0, (correlation, lag)

    # callsock's recording has the caller (inbound) and the bot (outbound), a few ms apart.
    call_dir = record_dir / report.result.identity.call_sid
    stream_sid = report.stream_sid
    summary = json.loads((call_dir / f"{stream_sid}.json").read_text(encoding="utf-8"))
    assert summary["endReason"] == "stop" and summary["error"] is None
    assert set(summary["files"]) == {"inbound", "outbound", "summary"}
    inbound = np.frombuffer(read_wav(call_dir / f"{stream_sid}.inbound.wav"), dtype="<i2")
    outbound = np.frombuffer(read_wav(call_dir / f"{stream_sid}.outbound.wav"), dtype="<i2")
    assert inbound.size == outbound.size  # padded to the same length
    assert np.array_equal(inbound[: len(sent)], decode(sent))  # the caller, exactly
    # Outbound audio is placed by when it plays, so jitter leaves a few samples of silence here
    # and there: the whole track is not one shifted copy, but each echoed frame is whole in it,
    # in order. Inbound audio is placed by its timestamps and outbound by the clock, so an echo
    # the server handled late (a stall, a garbage collection: tens of ms, or more on a busy
    # machine) lands that much later: a few ms on an idle machine, searched up to a second.
    windows = np.lib.stride_tricks.sliding_window_view(outbound.astype(np.float64), FRAME)
    found: list[int] = []
    for start in range(0, len(sent), FRAME):
        frame = inbound[start : start + FRAME].astype(np.float64)
        nearby = windows[start : start + RATE + 1]
        scores = nearby @ frame / (np.linalg.norm(nearby, axis=1) * np.linalg.norm(frame) + 1e-9)
        assert scores.max() > 0.99, f"frame at {start / RATE:.2f} s not in the outbound track"
        found.append(start + int(scores.argmax()))
    assert found == sorted(set(found)), "echoed frames out of order in the outbound track"


# ---------------------------------------------------------------------------------------------
# greeting
# ---------------------------------------------------------------------------------------------


async def test_greeting_plays_the_whole_tune_to_a_quiet_caller(tmp_path: Path) -> None:
    """greeting: a silent caller hears the whole 16 kHz tune, resampled to 8 kHz at the right pitch."""
    states: list[dict[str, Any]] = []
    silence = [sd_audio.silence_frame()] * 10
    async with serving(keeping_state(greeting.app, states), tmp_path / "recordings") as server:
        report = await sd_api.call(url(server), frames=silence, config=CONFIG)
        await eventually(lambda: bool(states))

    assert_clean(report)
    result = report.result
    assert (result.clears_received, result.marks_received) == (0, [])
    reply = decode(report.audio_received)
    total_s = sum(seconds for _, seconds in greeting.MELODY)
    assert reply.size == round(total_s * RATE)  # 3 s at 16 kHz is 3 s at 8 kHz
    start = 0
    for freq, seconds in greeting.MELODY:
        n = round(seconds * RATE)
        note = reply[start + n // 5 : start + n - n // 5]  # the middle of the note
        assert dominant_hz(note) == pytest.approx(freq, rel=0.02), (freq, start / RATE)
        start += n
    assert "barged_in" not in states[0]


async def test_greeting_stops_when_the_caller_talks(tmp_path: Path) -> None:
    """greeting: loud caller audio during the tune clears it at once and sends one mark."""
    write_wav(tmp_path / "hello.wav", sweep(0.4, 400, 1200, 10_000))
    states: list[dict[str, Any]] = []
    async with serving(keeping_state(greeting.app, states), tmp_path / "recordings") as server:
        report = await run_scenario(
            url(server),
            tmp_path,
            textwrap.dedent("""\
            name: barge in on the greeting
            steps:
              - wait: 0.5               # the tune is playing; the caller is quiet
              - expect: no clear
              - say: hello.wav          # 0.4 s of loud audio
              - wait_for: {event: clear, timeout: 10}
              - expect: clear
              - expect: no_violations
            """),
        )
        await eventually(lambda: bool(states))

    assert_clean(report)
    result = report.result
    assert result.clears_received == 1
    # The mark went after the clear, so streamdouble echoed it (a mark pending at a clear it drops).
    assert (result.marks_received, result.marks_echoed) == (["barged-in"], ["barged-in"])
    assert states[0]["barged_in"] == "played"
    # Three loud frames (60 ms) after the caller starts at 0.5 s, the clear arrives: never before
    # the caller talked, and (on an idle machine about 0.56 s in) before the tune would have ended.
    (clear,) = result.events_of("clear_received")
    cleared_after = clear.at - result.started_at
    total_s = sum(seconds for _, seconds in greeting.MELODY)
    assert 0.5 < cleared_after < total_s
    # The tune stopped at the clear: what was sent is what played until then plus callsock's
    # 100 ms lead, far from the whole 3 s. Measured against the clear's own time, so a busy
    # machine that delays the clear cannot fail it.
    assert result.audio_duration_s < cleared_after + 0.1 + 0.1


# ---------------------------------------------------------------------------------------------
# dtmf_menu
# ---------------------------------------------------------------------------------------------

MENU_SCENARIO = """\
name: keypad menu
steps:
  - wait_for: {event: mark, timeout: 10}   # the prompt beep has played: its mark came back
  - dtmf: "KEYS"
"""


@pytest.mark.parametrize(("digit", "hz"), [("1", 440.0), ("2", 880.0), ("7", 150.0)])
async def test_dtmf_menu_plays_the_clip_of_the_key(tmp_path: Path, digit: str, hz: float) -> None:
    """dtmf_menu: after the beep, key 1 plays 440 Hz, key 2 880 Hz, another key the error tone; then a mark."""
    states: list[dict[str, Any]] = []
    async with serving(keeping_state(dtmf_menu.app, states), tmp_path / "recordings") as server:
        report = await run_scenario(url(server), tmp_path, MENU_SCENARIO.replace("KEYS", digit))
        await eventually(lambda: bool(states))

    assert_clean(report)
    result = report.result
    name = f"menu-{digit}"
    assert result.marks_received == result.marks_echoed == ["prompt", name]
    assert result.clears_received == 0
    assert states[0]["heard"] == [("prompt", "played"), (name, "played")]

    reply = decode(report.audio_received)
    clip = dtmf_menu.CLIPS.get(digit, dtmf_menu.ERROR)
    prompt_size = dtmf_menu.PROMPT.size
    assert reply.size == prompt_size + clip.size
    assert dominant_hz(reply[:prompt_size]) == pytest.approx(1000, rel=0.03)
    assert dominant_hz(reply[prompt_size:]) == pytest.approx(hz, rel=0.03)


async def test_dtmf_menu_key_during_a_clip_cuts_it_short(tmp_path: Path) -> None:
    """dtmf_menu: key 2 pressed while clip 1 plays clears clip 1 (never marked) and plays clip 2."""
    states: list[dict[str, Any]] = []
    async with serving(keeping_state(dtmf_menu.app, states), tmp_path / "recordings") as server:
        scenario = MENU_SCENARIO.replace("KEYS", "1") + '  - wait: 0.3\n  - dtmf: "2"\n'
        report = await run_scenario(url(server), tmp_path, scenario)
        await eventually(lambda: bool(states))

    assert_clean(report)
    result = report.result
    assert result.clears_received == 1
    assert result.marks_received == result.marks_echoed == ["prompt", "menu-2"]
    assert states[0]["heard"] == [("prompt", "played"), ("menu-1", "cleared"), ("menu-2", "played")]

    reply = decode(report.audio_received)
    prompt_size, clip_size = dtmf_menu.PROMPT.size, dtmf_menu.CLIPS["1"].size
    cut = reply[prompt_size : reply.size - clip_size]  # what was sent of clip 1
    # Key 2 comes ~0.3 s into the 0.8 s clip: part of it was sent, not all (when key 2 arrives
    # depends on the machine's load, so the cut is only bounded by the clip).
    assert 0 < cut.size < clip_size, cut.size / RATE
    assert dominant_hz(cut) == pytest.approx(440, rel=0.03)
    assert dominant_hz(reply[-clip_size:]) == pytest.approx(880, rel=0.03)


# ---------------------------------------------------------------------------------------------
# fastapi_app
# ---------------------------------------------------------------------------------------------


@asynccontextmanager
async def uvicorn_serving(app: Any) -> AsyncIterator[tuple[uvicorn.Server, int]]:
    """Run ``app`` with uvicorn on 127.0.0.1 and a free port; yield the server and the port."""
    # log_config=None: leave the logging that conftest set up alone.
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_config=None)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started or task.done(), within=10.0)
        assert server.started, "uvicorn did not start"
        sock: socket.socket = server.servers[0].sockets[0]
        yield server, sock.getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10.0)


async def test_fastapi_app_serves_calls_and_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fastapi_app: GET /status answers, the echo bot answers at /call, and shutdown ends open calls."""
    monkeypatch.chdir(tmp_path)  # the example records to ./recordings
    caller_wav = write_wav(tmp_path / "caller.wav", sweep(0.6, 300, 3000, 8000))
    sent = b"".join(sd_audio.wav_to_ulaw_frames(caller_wav))
    stream_sid = sid("MZ", 1)

    async with aiohttp.ClientSession() as client:
        async with uvicorn_serving(fastapi_app.api) as (server, port):
            base = f"127.0.0.1:{port}"

            async def status() -> dict[str, Any]:
                async with client.get(f"http://{base}/status") as response:
                    assert response.status == 200
                    body: dict[str, Any] = await response.json()
                    return body

            assert (await status())["status"] == "ok"

            report = await sd_api.call(f"ws://{base}/call", audio_path=caller_wav, config=CONFIG)
            assert_clean(report)
            assert report.audio_received == sent

            # A call still open when the server shuts down.
            ws = await client.ws_connect(f"ws://{base}/call")
            await ws.send_str(connected())
            await ws.send_str(twilio_start(stream_sid))
            await ws.send_str(media(stream_sid, sent[:160], 0))
            open_calls = fastapi_app.calls.hub.calls
            await eventually(lambda: [c["streamSid"] for c in open_calls()] == [stream_sid])
            assert (await status())["activeCalls"] == 1
            server.should_exit = True
            while (await ws.receive(timeout=WAIT_SECONDS)).type is aiohttp.WSMsgType.TEXT:
                pass  # the echo of our frame
            # uvicorn closes its WebSockets itself (1012) before the lifespan shutdown runs;
            # callsock takes that close as the server stopping.
            assert ws.close_code in (1001, 1012)
            await ws.close()

    summaries = [json.loads(p.read_text()) for p in (tmp_path / "recordings").glob("*/*.json")]
    assert sorted(s["endReason"] for s in summaries) == ["shutdown", "stop"]
    assert not any((tmp_path / "recordings" / ".partial").glob("*/*"))


CLIP_SECONDS = 5


async def test_cancelled_play_task_drops_the_rest_of_its_audio(tmp_path: Path) -> None:
    """Cancelling call.play's task drops its unsent audio; the next send plays at once.

    This used to send the rest of the cancelled clip first: its unsent audio stayed queued.
    """
    app = App()

    @app.on_start
    async def start(call: Call) -> None:
        call.state["clip"] = call.play(np.full(CLIP_SECONDS * RATE, 1000, dtype=np.int16))  # positive

    @app.on_dtmf
    async def switch(call: Call, digit: str) -> None:
        clip: asyncio.Task[bool] = call.state["clip"]
        clip.cancel()  # stop the first clip (no clear: let what is queued finish)
        await asyncio.wait([clip])  # the cancellation has landed
        await call.send_audio(np.full(RATE // 10, -1000, dtype=np.int16))  # 0.1 s, negative

    async with serving(app, tmp_path / "recordings") as server:
        report = await run_scenario(
            url(server), tmp_path, "name: switch clips\nsteps:\n  - wait: 0.3\n  - dtmf: '1'\n"
        )

    assert_clean(report)
    reply = decode(report.audio_received)
    first, second = int(np.sum(reply > 0)), int(np.sum(reply < 0))
    assert second == RATE // 10
    # Cancelled ~0.3 s in, with at most callsock's 100 ms lead already sent: about 0.4 s of it.
    # The clip is long so that a busy machine, delaying the key press, still sends far less than
    # all of it, while the bug (the whole clip) fails at once.
    assert first < RATE * CLIP_SECONDS / 2, f"{first / RATE:.2f} s of the cancelled clip was sent"
