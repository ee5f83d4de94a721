"""Conformance: the real callsock server, driven by the independent Twilio simulator streamdouble.

streamdouble (0.3.0) plays Twilio's side of the socket in real time. These tests place calls with
its Python API against a running CallServer and check, sample for sample, that the WAV files
callsock publishes hold exactly the mu-law frames streamdouble put on the wire.

What streamdouble sends, read from its source and re-checked here against its own frame trace:

* Caller audio comes from a WAV through ``streamdouble.audio.wav_to_ulaw_frames``: G.711 mu-law
  (``streamdouble.g711.encode``) cut into 160-byte frames by ``audio.frame_ulaw``, the last one
  padded with 0xFF (mu-law silence). The tests compute the expected frames with that same
  function, so they compare against exactly what went out.
* ``MediaStreamEncoder.media`` (protocol.py) keeps presentation time per track: each track's
  ``media.timestamp`` starts at 0 and advances 20 ms per frame sent on it, with no gaps (no
  impairments are configured, so no frame is skipped).
* On a two-track fork, ``Session._stream_frames`` (session.py) sends, on each 20 ms pacer tick,
  the agent's next frame on ``outbound`` and then the caller's frame on ``inbound``; both carry
  the same timestamp, so the agent's audio starts at t=0 alongside the caller's. When the caller
  runs out first, ``Session._drain_outbound_track`` sends the rest of the agent's frames, one per
  tick, continuing the outbound clock. A track that runs out is not padded by streamdouble
  (``Session._next_outbound_frame``), and it never sends extra silence frames outside scenarios.

So each track arrives as one contiguous run of frames from t=0. callsock places a chunk at
``timestamp * 8`` bytes (buffer.AudioBuffer.add: no gap, so nothing is inserted) and on ``stop``
pads every track with 0xFF to the longest track (AudioBuffer.align). The expected recording of a
track is therefore its frames, joined, then 0xFF up to the longer track's length, decoded with
callsock.g711.ulaw_to_pcm16 (0xFF decodes to PCM 0).
"""

from __future__ import annotations

import base64
import json
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from streamdouble import api as sd_api
from streamdouble import audio as sd_audio
from streamdouble.session import SessionConfig
from streamdouble.trace import TraceConfig

from callsock.protocol.g711 import ulaw_to_pcm16
from callsock.server.routes import CallServer

from ..helpers import read_wav, running_server, ws_url

RATE = 8000
FRAME = 160  # bytes of mu-law, and samples, in one 20 ms frame
SILENCE = b"\xff"


def write_sweep(path: Path, samples: int, f0: float, f1: float, amplitude: float) -> Path:
    """Write a linear sine sweep from ``f0`` to ``f1`` Hz as an 8 kHz 16-bit mono WAV."""
    t = np.arange(samples, dtype=np.float64) / RATE
    duration = samples / RATE
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * duration))
    pcm = np.round(amplitude * np.sin(phase)).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.tobytes())
    return path


def expected_pcm(frames: list[bytes], total_bytes: int) -> bytes:
    """A track's frames in order, padded with mu-law silence to ``total_bytes``, decoded."""
    mulaw = b"".join(frames)
    assert len(mulaw) <= total_bytes
    return ulaw_to_pcm16(mulaw + SILENCE * (total_bytes - len(mulaw)))


def assert_same_pcm(actual: bytes, expected: bytes, what: str) -> None:
    """Exact equality, failing with the first differing sample instead of a huge bytes diff."""
    a = np.frombuffer(actual, dtype="<i2")
    e = np.frombuffer(expected, dtype="<i2")
    assert a.size == e.size, f"{what}: {a.size} samples recorded, {e.size} expected"
    diff = np.flatnonzero(a != e)
    if diff.size:
        i = int(diff[0])
        raise AssertionError(
            f"{what}: {diff.size} samples differ, first at sample {i} "
            f"(t={i / RATE:.4f}s, frame {i // FRAME}): recorded {int(a[i])}, expected {int(e[i])}"
        )


def sent_media(trace_path: Path) -> list[dict[str, Any]]:
    """The media frames streamdouble sent, in wire order, from its JSONL trace (with payloads)."""
    records = [json.loads(line) for line in trace_path.read_text(encoding="utf-8").splitlines()]
    return [r for r in records if r.get("dir") == "out" and r.get("event") == "media"]


def check_wire(media: list[dict[str, Any]], expected: dict[str, list[bytes]]) -> None:
    """Each track went out as its expected frames, stamped 0, 20, 40, ... ms with no gap."""
    for track, frames in expected.items():
        on_track = [r for r in media if r["track"] == track]
        assert [int(r["timestamp_ms"]) for r in on_track] == [20 * i for i in range(len(frames))], track
        assert [base64.b64decode(r["payload"]) for r in on_track] == frames, track
    assert len(media) == sum(len(f) for f in expected.values())


def load_summary(path: Path) -> dict[str, Any]:
    """Read callsock's JSON summary of a call."""
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


@pytest.mark.parametrize(
    ("caller_samples", "agent_samples"),
    [
        # Neither length is a whole number of frames, so both last frames carry 0xFF padding.
        pytest.param(8_037, 12_101, id="agent-longer"),
        pytest.param(12_101, 8_037, id="caller-longer"),
    ],
)
async def test_fork_both_tracks_recorded_sample_exact(
    server: CallServer, record_dir: Path, tmp_path: Path, caller_samples: int, agent_samples: int
) -> None:
    """A two-track <Start><Stream> fork is recorded per track exactly as streamdouble sent it."""
    caller_wav = write_sweep(tmp_path / "caller.wav", caller_samples, 300.0, 1_200.0, 9_000.0)
    agent_wav = write_sweep(tmp_path / "agent.wav", agent_samples, 2_400.0, 1_500.0, 14_000.0)
    caller_frames: list[bytes] = sd_audio.wav_to_ulaw_frames(caller_wav)
    agent_frames: list[bytes] = sd_audio.wav_to_ulaw_frames(agent_wav)
    n_in, n_out = len(caller_frames), len(agent_frames)
    assert (n_in, n_out) == (-(-caller_samples // FRAME), -(-agent_samples // FRAME))
    assert caller_frames[-1].endswith(SILENCE * (n_in * FRAME - caller_samples))

    config = SessionConfig(
        fork=True,
        tracks=["inbound", "outbound"],  # what <Stream track="both_tracks"> announces
        agent_frames=agent_frames,
        strict_fork=True,  # anything callsock sent back would be a violation, not a warning
        quiet_period_s=0.1,  # a fork has no reply to wait for; stop soon after the last frame
        max_drain_s=2.0,
        custom_parameters={"case": "fork"},
    )
    trace = TraceConfig(path=tmp_path / "trace.jsonl", payloads=True)
    report = await sd_api.call(ws_url(server), audio_path=caller_wav, config=config, trace=trace)

    # streamdouble's verdict: a clean call, nothing sent back, nothing dropped, not cut short.
    result = report.result
    assert report.exit_code == 0, report.to_dict()
    assert report.violations == []
    assert result.warnings == []
    assert result.unknown_events == []
    assert result.media_frames_received == 0 and not report.spoke
    assert (result.timed_out, result.closed_early, result.closed_before_audio) == (False, False, False)
    assert result.closed_by is None
    assert (result.frames_sent, result.outbound_frames_sent, result.frames_dropped) == (
        n_in + n_out,
        n_out,
        0,
    )
    assert [e.kind for e in result.events_of("sent_stop")] == ["sent_stop"]

    # What went on the wire (streamdouble's own trace), including the interleave: on every tick
    # both tracks carry a frame, the agent's goes first and both share one timestamp.
    media = sent_media(tmp_path / "trace.jsonl")
    check_wire(media, {"inbound": caller_frames, "outbound": agent_frames})
    paired = min(n_in, n_out)
    assert [(r["track"], int(r["timestamp_ms"])) for r in media[: 2 * paired]] == [
        (track, 20 * i) for i in range(paired) for track in ("outbound", "inbound")
    ]

    # callsock's recording.
    call_sid, stream_sid = result.identity.call_sid, result.identity.stream_sid
    call_dir = record_dir / call_sid
    # No waiting: callsock publishes on `stop` before it closes, and api.call returns only after
    # the close handshake, so the files must already be there.
    summary = load_summary(call_dir / f"{stream_sid}.json")
    assert summary["endReason"] == "stop"
    assert summary["error"] is None
    assert summary["dialect"] == "twilio"
    assert summary["tracks"] == ["inbound", "outbound"]
    assert (summary["callSid"], summary["streamSid"]) == (call_sid, stream_sid)
    assert summary["accountSid"] == result.identity.account_sid
    assert summary["customParameters"] == {"case": "fork"}
    assert summary["mediaFormat"] == {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
    longest = max(n_in, n_out) * FRAME
    assert summary["durationMs"] == longest // 8
    counters = summary["counters"]
    assert counters["messages"] == {"connected": 1, "start": 1, "media": n_in + n_out, "stop": 1}
    assert counters["mediaBytes"] == (n_in + n_out) * FRAME
    assert counters["receivedBytes"] > counters["mediaBytes"]  # JSON and base64 around the audio
    assert counters["silenceMs"] == abs(n_in - n_out) * FRAME // 8  # only the shorter track's end pad
    assert counters["errors"] == 0
    assert summary["files"] == {
        "inbound": f"{call_sid}/{stream_sid}.inbound.wav",
        "outbound": f"{call_sid}/{stream_sid}.outbound.wav",
        "summary": f"{call_sid}/{stream_sid}.json",
    }
    assert sorted(p.name for p in call_dir.iterdir()) == sorted(
        f"{stream_sid}.{name}" for name in ("inbound.wav", "json", "outbound.wav")
    )
    assert not any((record_dir / ".partial").glob("*/*")), "partial files left behind"

    inbound = read_wav(call_dir / f"{stream_sid}.inbound.wav")
    outbound = read_wav(call_dir / f"{stream_sid}.outbound.wav")
    expected_in = expected_pcm(caller_frames, longest)
    expected_out = expected_pcm(agent_frames, longest)
    assert expected_in != expected_out and any(expected_in) and any(expected_out)
    assert_same_pcm(inbound, expected_in, "inbound track")
    assert_same_pcm(outbound, expected_out, "outbound track")


async def test_bidirectional_call_recorded_sample_exact(
    server: CallServer, record_dir: Path, tmp_path: Path
) -> None:
    """A plain <Connect><Stream> call: no violations, "never spoke" (2), inbound recorded exactly."""
    caller_samples = 9_000  # 56.25 frames: the last frame is a quarter audio, the rest 0xFF
    caller_wav = write_sweep(tmp_path / "caller.wav", caller_samples, 200.0, 3_000.0, 12_000.0)
    caller_frames: list[bytes] = sd_audio.wav_to_ulaw_frames(caller_wav)
    n_in = len(caller_frames)
    assert n_in == 57

    # Defaults otherwise: bidirectional, inbound track only, marks echoed.
    config = SessionConfig(response_timeout_s=0.5, quiet_period_s=0.2, max_drain_s=2.0)
    trace = TraceConfig(path=tmp_path / "trace.jsonl", payloads=True)
    report = await sd_api.call(ws_url(server), audio_path=caller_wav, config=config, trace=trace)

    # callsock sends no audio back in this version, so the call times out waiting for a reply:
    # exit code 2 ("never spoke"), which is below 3, so there was no protocol violation either.
    result = report.result
    assert report.exit_code == 2, report.to_dict()
    assert report.violations == [] and result.violation_count == 0
    assert result.warnings == []
    assert result.unknown_events == []
    assert result.timed_out is True
    assert (result.closed_early, result.closed_before_audio, result.closed_by) == (False, False, None)
    assert report.time_to_first_audio_ms is None and not report.spoke
    assert (result.frames_sent, result.outbound_frames_sent, result.frames_dropped) == (n_in, 0, 0)
    assert [e.kind for e in result.events_of("sent_stop")] == ["sent_stop"]

    check_wire(sent_media(tmp_path / "trace.jsonl"), {"inbound": caller_frames})

    call_sid, stream_sid = result.identity.call_sid, result.identity.stream_sid
    call_dir = record_dir / call_sid
    # No waiting: callsock publishes on `stop` before it closes, and api.call returns only after
    # the close handshake, so the files must already be there.
    summary = load_summary(call_dir / f"{stream_sid}.json")
    assert summary["endReason"] == "stop"
    assert summary["error"] is None
    assert summary["dialect"] == "twilio"
    assert summary["tracks"] == ["inbound"]
    assert summary["durationMs"] == n_in * 20
    assert summary["counters"]["messages"] == {"connected": 1, "start": 1, "media": n_in, "stop": 1}
    assert summary["counters"]["silenceMs"] == 0
    assert summary["files"] == {
        "inbound": f"{call_sid}/{stream_sid}.inbound.wav",
        "summary": f"{call_sid}/{stream_sid}.json",
    }
    assert sorted(p.name for p in call_dir.iterdir()) == [f"{stream_sid}.inbound.wav", f"{stream_sid}.json"]

    inbound = read_wav(call_dir / f"{stream_sid}.inbound.wav")
    assert_same_pcm(inbound, expected_pcm(caller_frames, n_in * FRAME), "inbound track")


async def test_builtin_echo_bidirectional(tmp_path: Path, record_dir: Path) -> None:
    """`serve --echo` under streamdouble: exit 0, no violations, the reply is the caller's audio."""
    caller = write_sweep(tmp_path / "caller.wav", 6400, 250.0, 2500.0, 9000.0)
    sent = b"".join(sd_audio.wav_to_ulaw_frames(caller))
    config = SessionConfig(response_timeout_s=2.0, quiet_period_s=0.3, max_drain_s=5.0)
    async with running_server(record_dir, echo=True) as server:
        report = await sd_api.call(ws_url(server), audio_path=str(caller), config=config)
    assert report.exit_code == 0 and report.violations == []
    assert report.audio_received == sent
    a = np.frombuffer(ulaw_to_pcm16(sent), dtype="<i2").astype(np.float64)
    b = np.frombuffer(ulaw_to_pcm16(report.audio_received), dtype="<i2").astype(np.float64)
    assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) > 0.9
