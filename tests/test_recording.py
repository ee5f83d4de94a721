"""WavRecorder: partial files while a call runs, atomic never-overwriting publication at its end."""

from __future__ import annotations

import io
import json
import wave
from pathlib import Path
from typing import Any

import pytest

from callsock.protocol.g711 import ulaw_to_pcm16
from callsock.protocol.stream import StreamInfo
from callsock.recording.sinks import PARTIAL_DIR, WavRecorder, wav_header

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


def test_open_creates_partial_files(tmp_path: Path) -> None:
    """open() writes an empty WAV per track and the metadata JSON under .partial/<connection_id>/."""
    recorder = WavRecorder(tmp_path, "conn-1")
    recorder.open(stream_info(), META)
    partial = tmp_path / PARTIAL_DIR / "conn-1"
    assert recorder.partial_dir == partial
    assert sorted(p.name for p in partial.iterdir()) == [
        f"{STREAM}.inbound.wav",
        f"{STREAM}.json",
        f"{STREAM}.outbound.wav",
    ]
    for track in ("inbound", "outbound"):
        path = partial / f"{STREAM}.{track}.wav"
        assert path.read_bytes() == wav_header(0)
        assert wav_frames(path) == b""
    assert json.loads((partial / f"{STREAM}.json").read_text(encoding="utf-8")) == META


def test_write_appends_decoded_pcm(tmp_path: Path) -> None:
    """write() appends the decoded PCM of each chunk to its track's partial WAV."""
    recorder = WavRecorder(tmp_path, "conn-1")
    recorder.open(stream_info(), META)
    first, second = mulaw(160), mulaw(7, 100)
    recorder.write("inbound", first)
    recorder.write("inbound", bytearray(second))
    path = recorder.partial_dir / f"{STREAM}.inbound.wav"
    assert path.read_bytes()[44:] == ulaw_to_pcm16(first + second)
    assert (recorder.partial_dir / f"{STREAM}.outbound.wav").read_bytes() == wav_header(0)


def test_partial_wav_mid_call_holds_audio_after_header(tmp_path: Path) -> None:
    """Before close(), the partial WAV is a 44-byte header followed by all the audio written so far."""
    recorder = WavRecorder(tmp_path, "conn-1")
    recorder.open(stream_info(), META)
    chunks = [mulaw(160, i) for i in range(5)]
    for chunk in chunks:
        recorder.write("inbound", chunk)
    data = (tmp_path / PARTIAL_DIR / "conn-1" / f"{STREAM}.inbound.wav").read_bytes()
    assert data[:4] == b"RIFF"
    assert data[36:40] == b"data"
    assert len(data) == 44 + 2 * 800
    assert data[44:] == ulaw_to_pcm16(b"".join(chunks))


def test_close_publishes_wavs_and_summary(tmp_path: Path) -> None:
    """close() moves the WAVs and a JSON (summary plus files) to <record_dir>/<callSid>/."""
    recorder = WavRecorder(tmp_path, "conn-1")
    recorder.open(stream_info(), META)
    recorder.write("inbound", mulaw(320))
    recorder.write("outbound", mulaw(160, 50))
    summary = {"streamSid": STREAM, "endReason": "stop", "counters": {"errors": 0}}
    files = recorder.close(summary).result()
    assert files == {
        "inbound": f"{CALL}/{STREAM}.inbound.wav",
        "outbound": f"{CALL}/{STREAM}.outbound.wav",
        "summary": f"{CALL}/{STREAM}.json",
    }
    dest = tmp_path / CALL
    assert sorted(p.name for p in dest.iterdir()) == [
        f"{STREAM}.inbound.wav",
        f"{STREAM}.json",
        f"{STREAM}.outbound.wav",
    ]
    assert wav_frames(dest / f"{STREAM}.inbound.wav") == ulaw_to_pcm16(mulaw(320))
    assert wav_frames(dest / f"{STREAM}.outbound.wav") == ulaw_to_pcm16(mulaw(160, 50))
    published = json.loads((dest / f"{STREAM}.json").read_text(encoding="utf-8"))
    assert published == {**summary, "files": files}


def test_close_removes_partial_files(tmp_path: Path) -> None:
    """After close(), the connection's partial directory is gone."""
    recorder = WavRecorder(tmp_path, "conn-1")
    recorder.open(stream_info(), META)
    recorder.write("inbound", mulaw(160))
    recorder.close({})
    assert not (tmp_path / PARTIAL_DIR / "conn-1").exists()
    assert list((tmp_path / PARTIAL_DIR).iterdir()) == []


def test_published_header_matches_data_length(tmp_path: Path) -> None:
    """The published WAV's header is wav_header() of the exact PCM size written."""
    recorder = WavRecorder(tmp_path, "conn-1")
    recorder.open(stream_info(tracks=("inbound",)), META)
    recorder.write("inbound", mulaw(161))
    recorder.close({})
    data = (tmp_path / CALL / f"{STREAM}.inbound.wav").read_bytes()
    assert data == wav_header(322) + ulaw_to_pcm16(mulaw(161))


def test_track_without_audio_publishes_empty_wav(tmp_path: Path) -> None:
    """A track that got no audio is published as a valid WAV with zero frames."""
    recorder = WavRecorder(tmp_path, "conn-1")
    recorder.open(stream_info(), META)
    recorder.write("inbound", mulaw(8))
    recorder.close({})
    assert wav_frames(tmp_path / CALL / f"{STREAM}.outbound.wav") == b""


def test_call_key_falls_back_to_stream_sid(tmp_path: Path) -> None:
    """Without a callSid, the files are published under stream.<streamSid> (README, "Recordings")."""
    recorder = WavRecorder(tmp_path, "conn-1")
    recorder.open(stream_info(call_sid=None, tracks=("inbound",)), META)
    recorder.write("inbound", mulaw(16))
    files = recorder.close({}).result()
    key = f"stream.{STREAM}"
    assert files == {"inbound": f"{key}/{STREAM}.inbound.wav", "summary": f"{key}/{STREAM}.json"}
    assert wav_frames(tmp_path / key / f"{STREAM}.inbound.wav") == ulaw_to_pcm16(mulaw(16))


def test_second_recording_of_same_stream_gets_numbered_stem(tmp_path: Path) -> None:
    """A second connection for the same stream publishes <streamSid>.1.* and leaves the first intact."""
    first = WavRecorder(tmp_path, "conn-1")
    first.open(stream_info(), META)
    first.write("inbound", mulaw(160))
    first_files = first.close({"n": 1}).result()

    second = WavRecorder(tmp_path, "conn-2")
    second.open(stream_info(), META)
    second.write("inbound", mulaw(80, 7))
    second_files = second.close({"n": 2}).result()

    assert second_files == {
        "inbound": f"{CALL}/{STREAM}.1.inbound.wav",
        "outbound": f"{CALL}/{STREAM}.1.outbound.wav",
        "summary": f"{CALL}/{STREAM}.1.json",
    }
    dest = tmp_path / CALL
    assert wav_frames(dest / f"{STREAM}.inbound.wav") == ulaw_to_pcm16(mulaw(160))
    assert wav_frames(dest / f"{STREAM}.1.inbound.wav") == ulaw_to_pcm16(mulaw(80, 7))
    assert json.loads((dest / f"{STREAM}.json").read_text(encoding="utf-8")) == {"n": 1, "files": first_files}
    assert json.loads((dest / f"{STREAM}.1.json").read_text(encoding="utf-8")) == {
        "n": 2,
        "files": second_files,
    }
    assert len(list(dest.iterdir())) == 6


def test_third_recording_of_same_stream_gets_next_number(tmp_path: Path) -> None:
    """A third connection for the same stream publishes <streamSid>.2.*."""
    for n in range(3):
        recorder = WavRecorder(tmp_path, f"conn-{n}")
        recorder.open(stream_info(tracks=("inbound",)), META)
        recorder.write("inbound", mulaw(8, n))
        files = recorder.close({}).result()
    assert files["inbound"] == f"{CALL}/{STREAM}.2.inbound.wav"
    for n, stem in enumerate([STREAM, f"{STREAM}.1", f"{STREAM}.2"]):
        assert wav_frames(tmp_path / CALL / f"{stem}.inbound.wav") == ulaw_to_pcm16(mulaw(8, n))


def test_concurrent_recordings_of_same_stream_keep_separate_partials(tmp_path: Path) -> None:
    """Two open recorders for one stream write to separate partial directories."""
    first = WavRecorder(tmp_path, "conn-1")
    second = WavRecorder(tmp_path, "conn-2")
    first.open(stream_info(tracks=("inbound",)), META)
    second.open(stream_info(tracks=("inbound",)), META)
    first.write("inbound", mulaw(8, 1))
    second.write("inbound", mulaw(8, 2))
    assert (first.partial_dir / f"{STREAM}.inbound.wav").read_bytes()[44:] == ulaw_to_pcm16(mulaw(8, 1))
    assert (second.partial_dir / f"{STREAM}.inbound.wav").read_bytes()[44:] == ulaw_to_pcm16(mulaw(8, 2))
    second_files = second.close({}).result()
    first_files = first.close({}).result()
    assert second_files["inbound"] == f"{CALL}/{STREAM}.inbound.wav"
    assert first_files["inbound"] == f"{CALL}/{STREAM}.1.inbound.wav"
    assert wav_frames(tmp_path / second_files["inbound"]) == ulaw_to_pcm16(mulaw(8, 2))
    assert wav_frames(tmp_path / first_files["inbound"]) == ulaw_to_pcm16(mulaw(8, 1))


def test_close_before_open_raises(tmp_path: Path) -> None:
    """close() and write() without open() raise RuntimeError."""
    recorder = WavRecorder(tmp_path, "conn-1")
    with pytest.raises(RuntimeError):
        recorder.write("inbound", mulaw(8))
    with pytest.raises(RuntimeError):
        recorder.close({})


@pytest.mark.parametrize(("call_sid", "stream_sid"), [("..", "MZ1"), ("CA1", "../x"), ("CA1", "a/b")])
def test_unsafe_sid_is_refused(tmp_path: Path, call_sid: str, stream_sid: str) -> None:
    """A SID that is not a safe file name is refused at open(), before anything is written."""
    recorder = WavRecorder(tmp_path, "conn-1")
    with pytest.raises(ValueError, match="unsafe"):
        recorder.open(stream_info(call_sid=call_sid, stream_sid=stream_sid, tracks=("inbound",)), META)
    assert list(tmp_path.iterdir()) == []


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
