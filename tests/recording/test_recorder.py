"""A call's recording: the sinks' partial files while it runs, never-overwriting publication at its end."""

from __future__ import annotations

import io
import json
import wave
from pathlib import Path
from typing import Any

import pytest

from callsock.protocol.g711 import BYTES_PER_MS, ulaw_to_pcm16
from callsock.protocol.stream import StreamInfo
from callsock.recording.diskwriter import DiskWriter
from callsock.recording.layout import PARTIAL_DIR, Part, partial_dir, publish, wav_header
from callsock.recording.recorder import CallRecorder
from callsock.recording.sinks import CallFiles, Sink, SummarySink, WavSink

STREAM = "MZ" + "1" * 32
CALL = "CA" + "2" * 32
ACCOUNT = "AC" + "0" * 32
META: dict[str, Any] = {"streamSid": STREAM, "callSid": CALL, "tracks": ["inbound", "outbound"]}


def stream_info(
    call_sid: str | None = CALL, tracks: tuple[str, ...] = ("inbound", "outbound"), stream_sid: str = STREAM
) -> StreamInfo:
    return StreamInfo(
        stream_sid=stream_sid,
        call_sid=call_sid,
        account_sid=ACCOUNT,
        tracks=tracks,
        custom_parameters={},
        dialect="twilio",
    )


def mulaw(size: int, start: int = 0) -> bytes:
    """``size`` bytes cycling through every mu-law code, from ``start``."""
    return bytes((start + i) % 256 for i in range(size))


def wav_frames(path: Path) -> bytes:
    """The PCM of a WAV file, after checking it is 8 kHz, 16-bit, mono."""
    with wave.open(str(path), "rb") as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (8000, 2, 1)
        return w.readframes(w.getnframes())


def recorder(record_dir: Path, connection: str = "conn-1", *sinks: Sink) -> CallRecorder:
    """A call's recorder with the usual formats (WAVs, summary), writing at once on this thread."""
    chosen = list(sinks) or [WavSink(), SummarySink()]
    return CallRecorder(record_dir, partial_dir(record_dir, connection), chosen, DiskWriter(inline=True))


def opened(record_dir: Path, connection: str = "conn-1", **stream: Any) -> CallRecorder:
    rec = recorder(record_dir, connection)
    rec.open(stream_info(**stream), META, dict)
    return rec


# --- The sinks -----------------------------------------------------------------------------------


def test_sinks_create_partial_files_on_open(tmp_path: Path) -> None:
    """Opening writes an empty WAV per track (WavSink) and what start said (SummarySink)."""
    opened(tmp_path)
    partial = tmp_path / PARTIAL_DIR / "conn-1"
    assert sorted(p.name for p in partial.iterdir()) == [
        f"{STREAM}.inbound.wav",
        f"{STREAM}.json",
        f"{STREAM}.outbound.wav",
    ]
    for track in ("inbound", "outbound"):
        assert (partial / f"{STREAM}.{track}.wav").read_bytes() == wav_header(0)
    assert json.loads((partial / f"{STREAM}.json").read_text(encoding="utf-8")) == META


def test_wav_sink_appends_decoded_pcm(tmp_path: Path) -> None:
    """Each chunk written is decoded and placed after the last, behind the 44-byte header."""
    sink = WavSink()
    files = CallFiles(stream_info(), tmp_path / "p", DiskWriter(inline=True), META)
    sink.open(files)
    first, second = mulaw(160), mulaw(7, 100)
    sink.write("inbound", first)
    sink.write("inbound", bytearray(second))
    data = (tmp_path / "p" / f"{STREAM}.inbound.wav").read_bytes()
    assert data[:4] == b"RIFF" and data[36:40] == b"data"
    assert data[44:] == ulaw_to_pcm16(first + second)
    assert (tmp_path / "p" / f"{STREAM}.outbound.wav").read_bytes() == wav_header(0)


def test_summary_sink_journals_progress(tmp_path: Path) -> None:
    """What the summary would say so far is journaled beside the audio, for recover."""
    sink = SummarySink()
    sink.open(CallFiles(stream_info(), tmp_path / "p", DiskWriter(inline=True), META))
    sink.progress({"dtmf": [{"digit": "5", "sequenceNumber": "3"}]})
    journal = json.loads((tmp_path / "p" / f"{STREAM}.json").read_text(encoding="utf-8"))
    assert journal == {**META, "dtmf": [{"digit": "5", "sequenceNumber": "3"}]}


def test_wav_sink_before_open_raises() -> None:
    with pytest.raises(RuntimeError):
        WavSink().write("inbound", mulaw(8))


class RawSink:
    """A recording format of the test's own: the raw mu-law of the inbound track."""

    def __init__(self) -> None:
        self.path: Path | None = None

    def open(self, call: CallFiles) -> None:
        call.partial_dir.mkdir(parents=True, exist_ok=True)
        self.path = call.partial_dir / f"{call.stream.stream_sid}.inbound.ulaw"
        self.path.write_bytes(b"")

    def write(self, track: str, mulaw: bytes | bytearray) -> None:
        if track == "inbound" and self.path is not None:
            with self.path.open("ab") as f:
                f.write(mulaw)

    def progress(self, data: dict[str, Any]) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> list[Part]:
        assert self.path is not None
        return [Part("raw", "inbound.ulaw", path=self.path)]

    def abandon(self, summary: dict[str, Any], exc: OSError) -> None:
        pass


def test_a_format_of_ones_own_is_published_beside_the_wavs(tmp_path: Path) -> None:
    """Adding a recording format is one class with the Sink's methods: its files are published
    under the same stem, before the summary, which names them."""
    rec = recorder(tmp_path, "conn-1", WavSink(), RawSink(), SummarySink())
    rec.open(stream_info(tracks=("inbound",)), META, dict)
    rec.place("inbound", 0, mulaw(320))
    rec.end()
    future = rec.close({"endReason": "stop"})
    assert future is not None
    files = future.result()
    assert files == {
        "inbound": f"{CALL}/{STREAM}.inbound.wav",
        "raw": f"{CALL}/{STREAM}.inbound.ulaw",
        "summary": f"{CALL}/{STREAM}.json",
    }
    assert (tmp_path / files["raw"]).read_bytes() == mulaw(320)


# --- Publication ---------------------------------------------------------------------------------


def published(rec: CallRecorder, summary: dict[str, Any] | None = None) -> dict[str, str]:
    rec.end()
    future = rec.close(summary or {})
    assert future is not None
    return future.result()


def test_close_publishes_wavs_and_summary(tmp_path: Path) -> None:
    """Closing moves the WAVs and a JSON (summary plus files) to <record_dir>/<callSid>/."""
    rec = opened(tmp_path)
    rec.place("inbound", 0, mulaw(320))
    rec.outbound(mulaw(160, 50), None)
    summary = {"streamSid": STREAM, "endReason": "stop", "counters": {"errors": 0}}
    files = published(rec, summary)
    assert files == {
        "inbound": f"{CALL}/{STREAM}.inbound.wav",
        "outbound": f"{CALL}/{STREAM}.outbound.wav",
        "summary": f"{CALL}/{STREAM}.json",
    }
    dest = tmp_path / CALL
    assert sorted(p.name for p in dest.iterdir()) == sorted(Path(f).name for f in files.values())
    assert wav_frames(dest / f"{STREAM}.inbound.wav") == ulaw_to_pcm16(mulaw(320))
    # Padded to the inbound track's length with silence (mu-law 0xFF decodes to 0).
    assert wav_frames(dest / f"{STREAM}.outbound.wav") == ulaw_to_pcm16(mulaw(160, 50) + b"\xff" * 160)
    assert json.loads((dest / f"{STREAM}.json").read_text(encoding="utf-8")) == {**summary, "files": files}
    assert list((tmp_path / PARTIAL_DIR).iterdir()) == []


def test_published_header_matches_data_length(tmp_path: Path) -> None:
    rec = opened(tmp_path, tracks=("inbound",))
    rec.place("inbound", None, mulaw(161))
    published(rec)
    data = (tmp_path / CALL / f"{STREAM}.inbound.wav").read_bytes()
    assert data == wav_header(322) + ulaw_to_pcm16(mulaw(161))


def test_figures_follow_the_timeline(tmp_path: Path) -> None:
    """A gap is silence, counted; the duration is the longest track's."""
    rec = opened(tmp_path, tracks=("inbound",))
    rec.place("inbound", 0, mulaw(160))
    rec.place("inbound", 60 * BYTES_PER_MS, mulaw(160))  # 40 ms lost
    assert rec.figures() == {"durationMs": 80, "silenceMs": 40, "aheadDroppedMs": 0}


def test_call_key_falls_back_to_stream_sid(tmp_path: Path) -> None:
    """Without a callSid, the files are published under stream.<streamSid> (README, "Recordings")."""
    rec = opened(tmp_path, call_sid=None, tracks=("inbound",))
    rec.place("inbound", None, mulaw(16))
    files = published(rec)
    key = f"stream.{STREAM}"
    assert files == {"inbound": f"{key}/{STREAM}.inbound.wav", "summary": f"{key}/{STREAM}.json"}


def test_recordings_of_the_same_stream_get_numbered_stems(tmp_path: Path) -> None:
    """Later connections for the same stream publish <streamSid>.1.*, .2.*; nothing is overwritten."""
    for n in range(3):
        rec = opened(tmp_path, f"conn-{n}", tracks=("inbound",))
        rec.place("inbound", None, mulaw(8, n))
        files = published(rec, {"n": n})
    assert files["inbound"] == f"{CALL}/{STREAM}.2.inbound.wav"
    for n, stem in enumerate([STREAM, f"{STREAM}.1", f"{STREAM}.2"]):
        assert wav_frames(tmp_path / CALL / f"{stem}.inbound.wav") == ulaw_to_pcm16(mulaw(8, n))
        assert json.loads((tmp_path / CALL / f"{stem}.json").read_text(encoding="utf-8"))["n"] == n


def test_concurrent_recordings_of_same_stream_keep_separate_partials(tmp_path: Path) -> None:
    first = opened(tmp_path, "conn-1", tracks=("inbound",))
    second = opened(tmp_path, "conn-2", tracks=("inbound",))
    first.place("inbound", None, mulaw(8, 1))
    second.place("inbound", None, mulaw(8, 2))
    second_files = published(second)
    first_files = published(first)
    assert second_files["inbound"] == f"{CALL}/{STREAM}.inbound.wav"
    assert first_files["inbound"] == f"{CALL}/{STREAM}.1.inbound.wav"
    assert wav_frames(tmp_path / first_files["inbound"]) == ulaw_to_pcm16(mulaw(8, 1))


def test_a_refused_call_leaves_nothing(tmp_path: Path) -> None:
    """discard(): the start was refused; closing publishes nothing and says so."""
    rec = opened(tmp_path, tracks=("inbound",))
    rec.discard()
    assert rec.close({}) is None
    assert not (tmp_path / CALL).exists()


def test_a_recorder_with_no_sinks_keeps_the_timeline_only(tmp_path: Path) -> None:
    """--no-record: nothing is written, but the summary still knows the call's length."""
    rec = CallRecorder(tmp_path, tmp_path / PARTIAL_DIR / "c", [], DiskWriter(inline=True))
    rec.open(stream_info(tracks=("inbound",)), META, dict)
    rec.place("inbound", 0, mulaw(800))
    assert rec.close({}) is None and rec.figures()["durationMs"] == 100
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("call_sid", "stream_sid"), [("..", "MZ1"), ("CA1", "../x"), ("CA1", "a/b")])
def test_unsafe_sid_is_refused(tmp_path: Path, call_sid: str, stream_sid: str) -> None:
    """A SID that is not a safe file name is refused before anything is published."""
    with pytest.raises(ValueError, match="unsafe"):
        publish(tmp_path, call_sid, stream_sid, [Part("summary", "json", render=lambda files: {})])


# --- The WAV header ------------------------------------------------------------------------------


def test_wav_header_matches_wave_module() -> None:
    """wav_header(n) equals the header the wave module writes for n bytes of 8 kHz mono 16-bit audio."""
    for n in (0, 2, 320, 16_000, 1_000_000):
        out = io.BytesIO()
        with wave.open(out, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(8000)
            w.writeframes(bytes(n))
        assert wav_header(n) == out.getvalue()[:44]
        assert len(out.getvalue()) == 44 + n


def test_wav_header_fields() -> None:
    """wav_header is 44 bytes: RIFF size 36 + n, PCM, 1 channel, 8000 Hz, 16000 B/s, 16 bits, data n."""
    header = wav_header(320)
    assert len(header) == 44
    assert header == (
        b"RIFF"
        + (356).to_bytes(4, "little")
        + b"WAVEfmt "
        + (16).to_bytes(4, "little")
        + bytes([1, 0, 1, 0])
        + (8000).to_bytes(4, "little")
        + (16000).to_bytes(4, "little")
        + bytes([2, 0, 16, 0])
        + b"data"
        + (320).to_bytes(4, "little")
    )


def test_wav_header_clamps_sizes_beyond_riff_limit() -> None:
    """A data size too large for RIFF's 32-bit fields is clamped so the RIFF size is 0xFFFFFFFF."""
    header = wav_header(2**33)
    assert int.from_bytes(header[4:8], "little") == 0xFFFFFFFF
    assert int.from_bytes(header[40:44], "little") == 0xFFFFFFFF - 36
