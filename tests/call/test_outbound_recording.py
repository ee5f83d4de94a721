"""The outbound recording is what the caller heard: back to back, silence only at real underruns.

Outbound audio is recorded once it has played, on a virtual clock here, so the jitter of each
case is exact: what is sent less than a frame after the playback ran dry plays (and is
recorded) back to back; a longer pause is silence of its length; a clear cuts what had not
played yet.
"""

from __future__ import annotations

import asyncio
import json

from callsock.call.outbound import FRAME_BYTES, Outbound
from callsock.protocol.stream import StreamProtocol

from ..helpers import sid, twilio_start

FRAME_SECONDS = 0.02


class Clock:
    """A monotonic clock the test moves by hand; sleeping moves it too."""

    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


class Line:
    """The transport (collects media sent) and the recorder (collects what is recorded)."""

    def __init__(self) -> None:
        self.closing = False
        self.media_sent = 0
        self.recorded: list[tuple[bytes, float | None]] = []

    def write(self, data: bytes) -> bool:
        self.media_sent += json.loads(data)["event"] == "media"
        return False

    async def drain(self) -> None:
        pass

    def close(self, code: int, reason: str) -> None:
        self.closing = True

    def record(self, mulaw: bytes, at: float | None) -> None:
        self.recorded.append((mulaw, at))


def make(lead: float = 0.1) -> tuple[Outbound, Line, Clock]:
    protocol = StreamProtocol()
    protocol.receive_text(twilio_start(sid("MZ", 1)))
    clock, line = Clock(), Line()
    outbound = Outbound(protocol, line, line.record, lead=lead, clock=clock, sleep=clock.sleep)
    return outbound, line, clock


def frame(n: int) -> bytes:
    return bytes([n % 256]) * FRAME_BYTES


async def test_echo_with_sub_frame_jitter_is_recorded_back_to_back() -> None:
    """Frames arriving up to a few ms late, as an echo's do, play and are recorded back to back."""
    outbound, line, clock = make()
    start = clock.now
    jitter = [0.0, 0.0007, -0.0004, 0.0019, 0.0003, 0.0011, -0.0008, 0.0]
    for n, late in enumerate(jitter):
        clock.now = start + n * FRAME_SECONDS + late
        assert await outbound.audio(frame(n))
    outbound.close()
    assert line.recorded == [(frame(0), start)] + [(frame(n), None) for n in range(1, len(jitter))]


async def test_a_real_underrun_is_recorded_as_silence_of_its_length() -> None:
    """Nothing queued for longer than a frame: the next audio is placed where it started to play."""
    outbound, line, clock = make()
    start = clock.now
    await outbound.audio(frame(0))
    clock.now = start + FRAME_SECONDS + 0.0199  # 19.9 ms after it ran dry: still back to back
    await outbound.audio(frame(1))
    resumed = start + 2 * FRAME_SECONDS + 0.035  # 35 ms of nothing
    clock.now = resumed
    await outbound.audio(frame(2))
    outbound.close()
    assert line.recorded == [(frame(0), start), (frame(1), None), (frame(2), resumed)]


async def test_clear_cuts_what_had_not_played() -> None:
    """A clear 30 ms into 100 ms of queued audio: 20 ms whole, 10 ms of the next, nothing after."""
    outbound, line, clock = make(lead=0.12)
    start = clock.now
    audio = b"".join(frame(n) for n in range(5))
    assert await outbound.audio(audio)  # 120 ms of lead: all five frames go at once
    assert line.media_sent == 5 and clock.now == start
    clock.now = start + 0.03
    await outbound.clear()
    assert line.recorded == [(frame(0), start), (frame(1)[:80], None)]
    clock.now = start + 0.035  # new audio right after the clear plays right after the cut
    await outbound.audio(frame(9))
    outbound.close()
    assert line.recorded[2:] == [(frame(9), None)]


async def test_clear_after_silence_does_not_join_what_follows_to_old_audio() -> None:
    """A clear with nothing playing leaves the clock alone: audio after it is placed by time."""
    outbound, line, clock = make()
    start = clock.now
    await outbound.audio(frame(0))
    clock.now = start + 5.0
    await outbound.clear()
    clock.now = start + 5.01
    await outbound.audio(frame(1))
    outbound.close()
    assert line.recorded == [(frame(0), start), (frame(1), start + 5.01)]


async def test_paced_audio_is_recorded_as_it_plays() -> None:
    """One second of audio, paced: recorded in order, back to back, only once it has played."""
    outbound, line, clock = make(lead=0.1)
    start = clock.now
    audio = b"".join(frame(n) for n in range(50))
    assert await outbound.audio(audio)
    played = clock.now - start
    assert len(line.recorded) == round(played / FRAME_SECONDS)  # the rest is still queued
    outbound.close()  # the call ends: what was sent is kept
    assert line.recorded == [(frame(0), start)] + [(frame(n), None) for n in range(1, 50)]
