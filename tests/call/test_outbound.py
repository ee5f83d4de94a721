"""Outbound audio: pacing against playback, coalescing, marks and clear, on a virtual clock."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from callsock.call.outbound import FRAME_BYTES, Outbound
from callsock.protocol.errors import CallEnded
from callsock.protocol.stream import StreamProtocol

from ..helpers import eventually, sid, twilio_start

STREAM = sid("MZ", 1)


class VirtualTime:
    """A monotonic clock that sleeping advances at once."""

    def __init__(self) -> None:
        self.now = 100.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


class Peer:
    """A Transport that collects what the Outbound sends, with the virtual time of each send."""

    def __init__(self, time: VirtualTime) -> None:
        self.time = time
        self.sent: list[tuple[float, dict[str, object]]] = []
        self.recorded: list[tuple[bytes, float | None]] = []
        self.closing = False

    def write(self, data: bytes) -> bool:
        self.sent.append((self.time.now, json.loads(data)))
        return False

    async def drain(self) -> None:
        pass

    def close(self, code: int, reason: str) -> None:
        self.closing = True

    def record(self, mulaw: bytes, play_time: float | None) -> None:
        self.recorded.append((mulaw, play_time))

    def events(self) -> list[str]:
        return [str(message["event"]) for _, message in self.sent]

    def payloads(self) -> list[bytes]:
        return [
            base64.b64decode(message["media"]["payload"])  # type: ignore[index]
            for _, message in self.sent
            if message["event"] == "media"
        ]


def make(lead: float = 0.1) -> tuple[Outbound, Peer, VirtualTime]:
    protocol = StreamProtocol()
    protocol.receive_text(twilio_start(STREAM))
    time = VirtualTime()
    peer = Peer(time)
    outbound = Outbound(protocol, peer, peer.record, lead=lead, clock=time.clock, sleep=time.sleep)
    return outbound, peer, time


async def test_paced_to_playback_with_lead() -> None:
    """1 s of audio goes out in 20 ms frames, never more than the lead ahead; returns 0.1 s early."""
    outbound, peer, time = make(lead=0.1)
    audio = bytes(range(256)) * 31 + bytes(64)  # 8000 bytes: one second
    start = time.now
    await outbound.audio(audio)
    assert peer.payloads() == [audio[i : i + FRAME_BYTES] for i in range(0, len(audio), FRAME_BYTES)]
    assert time.now - start == pytest.approx(0.9)
    for n, (when, _) in enumerate(peer.sent):
        played_by_then = (n + 1) * 0.02
        assert played_by_then - (when - start) <= 0.1 + 1e-9
    assert outbound.playing_until - start == pytest.approx(1.0)


async def test_messages_carry_the_stream_sid_and_no_header() -> None:
    """Every outbound media message is {event, streamSid, media: {payload}} with raw mu-law."""
    outbound, peer, _ = make()
    await outbound.audio(b"\x11" * FRAME_BYTES)
    [(_, message)] = peer.sent
    assert message == {
        "event": "media",
        "streamSid": STREAM,
        "media": {"payload": base64.b64encode(b"\x11" * 160).decode()},
    }


async def test_recorded_at_play_time() -> None:
    """Each chunk is recorded where it plays: the first at the time it started, the rest back to back."""
    outbound, peer, time = make()
    start = time.now
    await outbound.audio(b"\x22" * FRAME_BYTES * 10)
    outbound.close()  # what was sent and had not played yet is recorded too
    assert peer.recorded == [(b"\x22" * FRAME_BYTES, start)] + [(b"\x22" * FRAME_BYTES, None)] * 9


async def test_remainder_waits_for_more_audio() -> None:
    """A fragment shorter than a frame is coalesced with the next audio, not sent alone."""
    outbound, peer, _ = make()
    await outbound.audio(b"\x01" * 100)
    assert peer.sent == []
    await outbound.audio(b"\x02" * 100)
    assert peer.payloads() == [b"\x01" * 100 + b"\x02" * 60]


async def test_remainder_flushed_when_playback_runs_dry() -> None:
    """A trailing fragment is sent on its own once the audio before it has (nearly) played."""
    protocol = StreamProtocol()
    protocol.receive_text(twilio_start(STREAM))
    peer = Peer(VirtualTime())
    outbound = Outbound(protocol, peer, lambda t, b: None)
    await outbound.audio(b"\x05" * (FRAME_BYTES + 10))
    assert peer.payloads() == [b"\x05" * FRAME_BYTES]
    await eventually(lambda: len(peer.payloads()) == 2)  # a timer on the real clock sends it
    assert peer.payloads()[1] == b"\x05" * 10


async def test_mark_follows_audio_and_reports_played() -> None:
    """A mark is sent after the queued audio (remainder included) and resolves on its echo."""
    outbound, peer, _ = make()
    await outbound.audio(b"\x03" * 170)
    task = asyncio.create_task(outbound.mark("m1"))
    await eventually(lambda: "mark" in peer.events(), interval=0)
    assert peer.events() == ["media", "media", "mark"]
    assert peer.sent[-1][1] == {"event": "mark", "streamSid": STREAM, "mark": {"name": "m1"}}
    assert outbound.mark_echoed("m1") == "played"
    assert await task == "played"


async def test_clear_settles_pending_marks_as_cleared() -> None:
    """clear sends clear, and marks not yet echoed resolve as cleared at once (no echo needed)."""
    outbound, peer, _ = make()
    await outbound.audio(b"\x04" * FRAME_BYTES)
    task = asyncio.create_task(outbound.mark("m1"))
    await eventually(lambda: outbound.pending_marks == 1, interval=0)  # sent: the clear comes after it
    await outbound.clear()
    assert await task == "cleared"
    assert peer.events() == ["media", "mark", "clear"]
    assert peer.sent[-1][1] == {"event": "clear", "streamSid": STREAM}


async def test_echo_after_clear_means_cleared() -> None:
    """Twilio echoes pending marks on clear; such an echo is reported as cleared, not played."""
    outbound, _, _ = make()
    task = asyncio.create_task(outbound.mark("m1"))
    await eventually(lambda: outbound.pending_marks == 1, interval=0)  # sent: the clear comes after it
    await outbound.clear()
    assert outbound.mark_echoed("m1") == "cleared"
    assert await task == "cleared"
    assert outbound.pending_marks == 0


async def test_mark_sent_after_clear_plays() -> None:
    """A mark sent after a clear is in the new epoch: its echo means played."""
    outbound, _, _ = make()
    await outbound.clear()
    task = asyncio.create_task(outbound.mark("m2"))
    await eventually(lambda: outbound.pending_marks == 1, interval=0)
    assert outbound.mark_echoed("m2") == "played"
    assert await task == "played"


async def test_clear_stops_a_send_in_progress() -> None:
    """A clear during a long send drops what was not sent; the send returns early."""
    outbound, peer, time = make(lead=0.1)
    sending = asyncio.create_task(outbound.audio(b"\x06" * 8000))
    # Polled at every turn of the loop (interval=0): the virtual clock lets the send go on at each
    # turn, so any real-time pause here would let it finish before the clear.
    await eventually(lambda: len(peer.payloads()) >= 10, interval=0)
    await outbound.clear()
    await sending
    assert peer.events()[-1] == "clear"
    assert len(peer.payloads()) < 50
    assert outbound.playing_until == pytest.approx(time.now)


async def test_closed_outbound_refuses_and_fails_marks() -> None:
    """After the connection closes, sends raise CallEnded and pending marks fail with it."""
    outbound, _, _ = make()
    task = asyncio.create_task(outbound.mark("m1"))
    await eventually(lambda: outbound.pending_marks == 1, interval=0)
    outbound.close()
    with pytest.raises(CallEnded):
        await task
    with pytest.raises(CallEnded):
        await outbound.audio(b"\x00" * 160)
    with pytest.raises(CallEnded):
        await outbound.clear()


async def test_unknown_echo_is_played() -> None:
    """An echo of a mark this side never sent is passed on as played."""
    outbound, _, _ = make()
    assert outbound.mark_echoed("stranger") == "played"


def test_nothing_sent_before_start() -> None:
    """The protocol refuses to encode outbound messages before start gives the streamSid."""
    protocol = StreamProtocol()
    with pytest.raises(CallEnded):
        protocol.media_message(b"\xff")
    with pytest.raises(CallEnded):
        protocol.mark_message("x")
    with pytest.raises(CallEnded):
        protocol.clear_message()
