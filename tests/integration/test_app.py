"""The application API against a real server: handlers, talking back, marks, clear, failures."""

from __future__ import annotations

import asyncio
import json
import time
import wave
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import structlog

from callsock import App, AudioFrame, Call, MarkEcho, OneWayStream
from callsock.call.audio import load_wav, pcm_to_mulaw
from callsock.server.routes import CallServer

from ..helpers import (
    TwilioPeer,
    decoded,
    eventually,
    http_url,
    payload_audio,
    read_wav,
    receive_close,
    running_server,
    sid,
    ws_url,
)

SPEECH = bytes(range(0, 256, 2)) * 25  # 3200 bytes: 400 ms of varied mu-law


def summary(record_dir: Path, peer: TwilioPeer) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((record_dir / peer.call_sid / f"{peer.stream_sid}.json").read_text())
    return data


async def test_handlers_get_every_event_in_order(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """start, audio, dtmf, mark and stop reach their handlers, several per event, in order."""
    app = App()
    seen: list[tuple[str, Any]] = []

    @app.on_start
    async def first(call: Call) -> None:
        seen.append(("start1", (call.call_sid, call.stream_sid, call.custom_parameters, call.tracks)))

    @app.on_start
    async def second(call: Call) -> None:
        seen.append(("start2", call.bidirectional))

    @app.on_audio
    async def audio(call: Call, frame: AudioFrame) -> None:
        seen.append(("audio", (frame.track, frame.timestamp_ms, frame.mulaw, frame.pcm.tobytes())))

    @app.on_dtmf
    async def dtmf(call: Call, digit: str) -> None:
        seen.append(("dtmf", digit))

    @app.on_mark
    async def mark(call: Call, echo: MarkEcho) -> None:
        seen.append(("mark", echo))

    @app.on_stop
    async def stop(call: Call) -> None:
        seen.append(("stop", (call.end_reason, call.stats.messages)))

    stream_sid = sid("MZ", 1)
    async with running_server(record_dir, app) as server, client.ws_connect(ws_url(server)) as ws:
        peer = TwilioPeer(ws, stream_sid)
        await peer.start(params={"k": "v"})
        await peer.media(b"\x10" * 160 + b"\x20" * 160)
        await peer.dtmf("7")
        await peer.mark("hello")
        await peer.stop()
        assert (await receive_close(ws))[0] == 1000
        await eventually(lambda: seen and seen[-1][0] == "stop")  # on_stop runs after the close
    assert seen == [
        ("start1", (peer.call_sid, stream_sid, {"k": "v"}, ("inbound",))),
        ("start2", True),
        ("audio", ("inbound", 0, b"\x10" * 160, decoded(b"\x10" * 160))),
        ("audio", ("inbound", 20, b"\x20" * 160, decoded(b"\x20" * 160))),
        ("dtmf", "7"),
        ("mark", MarkEcho("hello", "played")),
        ("stop", ("stop", 7)),
    ]


def test_handlers_must_be_async() -> None:
    """Registering a plain function is a TypeError, at import time, not mid-call."""
    app = App()

    def not_async(call: Call) -> None:
        pass

    with pytest.raises(TypeError, match="async def"):
        app.on_start(not_async)  # type: ignore[type-var]


async def test_echo_sends_each_frame_back(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """--echo: every inbound frame comes back as outbound media, and both sides are recorded."""
    async with running_server(record_dir, echo=True) as server, client.ws_connect(ws_url(server)) as ws:
        peer = TwilioPeer(ws, sid("MZ", 2))
        await peer.start()
        await peer.media(SPEECH)
        replies: list[dict[str, Any]] = []
        while len(payload_audio(replies)) < len(SPEECH):
            message = await peer.receive()
            assert message is not None
            replies.append(message)
        await peer.stop()
        assert (await receive_close(ws))[0] == 1000
    assert payload_audio(replies) == SPEECH
    assert all(m == {"event": "media", "streamSid": peer.stream_sid, "media": m["media"]} for m in replies)
    outbound = read_wav(record_dir / peer.call_sid / f"{peer.stream_sid}.outbound.wav")
    inbound = read_wav(record_dir / peer.call_sid / f"{peer.stream_sid}.inbound.wav")
    # Outbound audio is recorded where it played: an echo the server sent late (a stall on a busy
    # machine) leaves silence before it, as the caller would have heard. So the check is that
    # the track is the echo, every sample in order, with nothing but silence around or between.
    speech = np.frombuffer(decoded(SPEECH), dtype="<i2")
    assert np.all(speech != 0)  # so silence can be told from it
    played = np.frombuffer(outbound, dtype="<i2")
    assert np.array_equal(played[played != 0], speech)
    assert len(outbound) == len(inbound)
    assert summary(record_dir, peer)["files"]["outbound"].endswith(".outbound.wav")


async def test_send_audio_is_paced(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """send_audio of 1 s hands the audio over in real time (about 0.9 s), not all at once.

    Only lower bounds, and only causal ones: frame n cannot leave before (n + 1) x 20 ms minus the
    100 ms lead after the first was sent, however slow the machine (a busy machine only makes
    everything later). So each is measured from an instant before that first frame, never from
    when the client happened to read it (a late first read would shorten the span).
    """
    app = App()
    took: list[float] = []

    @app.on_start
    async def speak(call: Call) -> None:
        began = time.monotonic()
        await call.send_audio(np.zeros(8000, dtype=np.int16))
        took.append(time.monotonic() - began)

    async with running_server(record_dir, app) as server, client.ws_connect(ws_url(server)) as ws:
        peer = TwilioPeer(ws, sid("MZ", 3))
        before_start = time.monotonic()
        await peer.start()
        arrivals: list[float] = []
        while len(arrivals) < 50:
            message = await peer.receive()
            assert message is not None and message["event"] == "media"
            arrivals.append(time.monotonic())
        await peer.stop()
        await eventually(lambda: took)
    assert took[0] >= 0.9 - 0.01  # the last frame goes 100 ms before the 1 s of audio has played
    assert arrivals[-1] - before_start >= 0.9 - 0.01


async def test_send_audio_resamples(client: aiohttp.ClientSession, record_dir: Path, tmp_path: Path) -> None:
    """--greeting plays a 16 kHz WAV resampled to 8 kHz mu-law, exactly as the codec makes it."""
    t = np.arange(16000 // 2) / 16000
    tone = (6000 * np.sin(2 * np.pi * 500 * t)).astype(np.int16)
    path = tmp_path / "greeting.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(tone.tobytes())
    expected = pcm_to_mulaw(load_wav(path))
    assert len(expected) == 4000
    async with running_server(record_dir, greeting=path) as server, client.ws_connect(ws_url(server)) as ws:
        peer = TwilioPeer(ws, sid("MZ", 4))
        await peer.start()
        messages: list[dict[str, Any]] = []
        while len(payload_audio(messages)) < len(expected):
            message = await peer.receive()
            assert message is not None
            messages.append(message)
        await peer.stop()
    assert payload_audio(messages) == expected
    assert all(len(payload_audio([m])) == 160 for m in messages)


async def test_mark_played_and_cleared_with_twilio_echoes(
    client: aiohttp.ClientSession, record_dir: Path
) -> None:
    """A mark echoed normally is played; one pending at clear, echoed after it (as Twilio does), is cleared."""
    app = App()
    outcomes: list[str] = []
    echoes: list[MarkEcho] = []

    @app.on_start
    async def talk(call: Call) -> None:
        await call.send_mulaw(b"\x30" * 160)
        outcomes.append(await call.mark("first"))
        call.create_task(_mark_later(call, outcomes))

    @app.on_dtmf
    async def interrupt(call: Call, digit: str) -> None:
        await call.clear()

    @app.on_mark
    async def echoed(call: Call, echo: MarkEcho) -> None:
        echoes.append(echo)

    async with running_server(record_dir, app) as server, client.ws_connect(ws_url(server)) as ws:
        peer = TwilioPeer(ws, sid("MZ", 5))
        await peer.start()
        received = await peer.receive_until("mark")
        assert [m["event"] for m in received] == ["media", "mark"]
        assert received[-1]["mark"] == {"name": "first"}
        await peer.mark("first")
        received = await peer.receive_until("mark")
        assert received[-1]["mark"] == {"name": "second"}
        await peer.dtmf("1")
        assert (await peer.receive_until("clear"))[-1] == {"event": "clear", "streamSid": peer.stream_sid}
        await peer.mark("second")  # Twilio echoes pending marks after a clear
        await eventually(lambda: len(echoes) == 2 and len(outcomes) == 2)
        await peer.stop()
    assert outcomes == ["played", "cleared"]
    assert echoes == [MarkEcho("first", "played"), MarkEcho("second", "cleared")]


async def _mark_later(call: Call, outcomes: list[str], audio_bytes: int = 8000) -> None:
    await call.send_mulaw(b"\x31" * audio_bytes)
    outcomes.append(await call.mark("second"))


async def test_clear_without_echo_does_not_hang(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """A simulator that drops pending marks on clear (streamdouble) still settles them as cleared."""
    app = App()
    outcomes: list[str] = []

    @app.on_start
    async def talk(call: Call) -> None:
        call.create_task(_mark_later(call, outcomes, audio_bytes=160))

    @app.on_dtmf
    async def interrupt(call: Call, digit: str) -> None:
        await call.clear()

    async with running_server(record_dir, app) as server, client.ws_connect(ws_url(server)) as ws:
        peer = TwilioPeer(ws, sid("MZ", 6))
        await peer.start()
        await peer.receive_until("mark")
        await peer.dtmf("1")
        await peer.receive_until("clear")
        await eventually(lambda: outcomes)
        await peer.stop()
    assert outcomes == ["cleared"]


async def test_hangup_lets_audio_play_then_closes(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """hangup waits for the audio sent to play (a mark echo), then closes with 1000, endReason hangup."""
    app = App()

    @app.on_start
    async def goodbye(call: Call) -> None:
        await call.send_mulaw(b"\x40" * 1600)
        await call.hangup()

    async with running_server(record_dir, app) as server, client.ws_connect(ws_url(server)) as ws:
        peer = TwilioPeer(ws, sid("MZ", 7))
        await peer.start()
        received = await peer.receive_until("mark")
        assert payload_audio(received) == b"\x40" * 1600
        assert received[-1]["mark"] == {"name": "callsock-hangup"}
        await peer.mark("callsock-hangup")
        assert await receive_close(ws) == (1000, "hangup")
    assert summary(record_dir, peer)["endReason"] == "hangup"


async def test_one_way_stream_refuses_to_send(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """On a <Start> fork (stream mode start, or a two-track stream) sending raises OneWayStream."""
    app = App()
    results: list[tuple[bool, str]] = []

    @app.on_start
    async def try_to_talk(call: Call) -> None:
        try:
            await call.send_audio(np.zeros(160, dtype=np.int16))
        except OneWayStream as exc:
            results.append((call.bidirectional, str(exc)))

    for overrides, tracks in (({"stream_mode": "start"}, ("inbound",)), ({}, ("inbound", "outbound"))):
        async with (
            running_server(record_dir, app, **overrides) as server,
            client.ws_connect(ws_url(server)) as ws,
        ):
            peer = TwilioPeer(ws, sid("MZ", 8))
            await peer.start(tracks=tracks)
            await peer.stop()
            assert (await receive_close(ws))[0] == 1000
    assert [bidirectional for bidirectional, _ in results] == [False, False]
    assert all("<Connect><Stream>" in text for _, text in results)


async def test_failing_handler_ends_only_its_call(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """A handler that raises is logged once, its call closes 1011 (endReason error, error handler),
    on_stop still runs, and another call goes on untouched."""
    app = App()
    stopped: list[str] = []

    @app.on_audio
    async def fragile(call: Call, frame: AudioFrame) -> None:
        if call.custom_parameters.get("fail") and frame.timestamp_ms == 40:
            raise RuntimeError("boom")

    @app.on_stop
    async def cleanup(call: Call) -> None:
        stopped.append(call.stream_sid)

    with structlog.testing.capture_logs() as logs:
        async with running_server(record_dir, app) as server:
            async with (
                client.ws_connect(ws_url(server)) as good_ws,
                client.ws_connect(ws_url(server)) as bad_ws,
            ):
                good, bad = TwilioPeer(good_ws, sid("MZ", 9)), TwilioPeer(bad_ws, sid("MZ", 10))
                await good.start()
                await bad.start(params={"fail": "yes"})
                await bad.media(SPEECH)
                code, _ = await receive_close(bad_ws)
                await good.media(SPEECH)
                await good.stop()
                assert (await receive_close(good_ws))[0] == 1000
            async with client.get(http_url(server, "/metrics")) as response:
                metrics = await response.text()
    assert code == 1011
    assert summary(record_dir, bad)["endReason"] == "error"
    assert summary(record_dir, bad)["error"] == "handler"
    assert summary(record_dir, good)["endReason"] == "stop"
    assert sorted(stopped) == sorted([good.stream_sid, bad.stream_sid])
    failures = [line for line in logs if line["event"] == "handler failed; ending the call"]
    assert len(failures) == 1 and failures[0]["handler"].endswith("fragile")
    assert 'callsock_errors_total{rule="handler"} 1.0' in metrics


async def test_slow_handler_drops_oldest_audio(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """A slow on_audio handler gets a bounded queue: the oldest frames are dropped, counted, logged once.

    The handler is held busy on its first frame until the server has received all fifty, so what
    is kept does not depend on how fast the machine is: that first frame, then the newest 200 ms.
    And the audio goes once on_start has run: before that, the call's handlers have not started
    at all, and frames arriving then would all be queued (the first one too).
    """
    app = App()
    heard: list[int | None] = []
    started, busy = asyncio.Event(), asyncio.Event()

    @app.on_start
    async def ready(call: Call) -> None:
        started.set()

    @app.on_audio
    async def slow(call: Call, frame: AudioFrame) -> None:
        heard.append(frame.timestamp_ms)
        await busy.wait()

    async def metrics_text(server: CallServer) -> str:
        async with client.get(http_url(server, "/metrics")) as response:
            return await response.text()

    with structlog.testing.capture_logs() as logs:
        async with running_server(record_dir, app, handler_queue_ms=200) as server:
            async with client.ws_connect(ws_url(server)) as ws:
                peer = TwilioPeer(ws, sid("MZ", 11))
                await peer.start()
                await eventually(started.is_set)
                await peer.media(b"\x50" * 160 * 50)  # one second, sent at once

                async def all_received() -> bool:
                    return 'callsock_messages_total{event="media"} 50.0' in await metrics_text(server)

                await eventually(all_received)
                busy.set()
                await peer.stop()
                assert (await receive_close(ws))[0] == 1000
            await eventually(lambda: len(heard) >= 11)  # the queue drains after the close too
            metrics = await metrics_text(server)
    assert heard == [0, *range(800, 1000, 20)]  # the newest frames are kept, never dropped
    assert "callsock_audio_frames_dropped_total 39.0" in metrics
    warnings = [line for line in logs if line["event"].startswith("on_audio handlers fall behind")]
    assert len(warnings) == 1
    assert read_wav(record_dir / peer.call_sid / f"{peer.stream_sid}.inbound.wav") == decoded(b"\x50" * 8000)


async def test_sent_messages_are_counted(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """Outbound media, marks and clears show in /metrics."""
    async with running_server(record_dir, echo=True) as server, client.ws_connect(ws_url(server)) as ws:
        peer = TwilioPeer(ws, sid("MZ", 12))
        await peer.start()
        await peer.media(b"\x60" * 480)
        for _ in range(3):
            assert await peer.receive() is not None

        async def counted() -> bool:
            async with client.get(http_url(server, "/metrics")) as response:
                metrics = await response.text()
            return (
                'callsock_sent_messages_total{event="media"} 3.0' in metrics
                and "callsock_sent_media_bytes_total 480.0" in metrics
            )

        await eventually(counted)
        await peer.stop()
