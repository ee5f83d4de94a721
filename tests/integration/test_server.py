"""The real server on 127.0.0.1 with a real WebSocket client: calls, rejections, monitoring."""

from __future__ import annotations

import asyncio
import io
import json
import random
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from callsock.observability.logs import configure_logging
from callsock.server.routes import CallServer
from callsock.server.settings import Settings

from ..helpers import (
    connected,
    decoded,
    dtmf,
    eventually,
    files_under,
    frames,
    http_url,
    mark,
    media,
    read_wav,
    receive_close,
    running_server,
    seed_start,
    sid,
    stop,
    twilio_start,
    ws_url,
)


def audio(seed: int, seconds: float = 0.4) -> bytes:
    """Deterministic pseudo-random mu-law audio (any byte value is a valid code)."""
    return random.Random(seed).randbytes(int(8000 * seconds))


async def send_call(
    ws: aiohttp.ClientWebSocketResponse, stream_sid: str, mulaw: bytes, track: str = "inbound"
) -> None:
    for i, frame in enumerate(frames(mulaw)):
        await ws.send_str(media(stream_sid, frame, i * 20, track=track, seq=i + 2))


def recording(record_dir: Path, call_key: str, stream_sid: str) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads((record_dir / call_key / f"{stream_sid}.json").read_text())
    return summary


async def metrics_text(client: aiohttp.ClientSession, server: CallServer) -> str:
    async with client.get(http_url(server, "/metrics")) as response:
        assert response.status == 200
        return await response.text()


async def calls_with_messages(client: aiohttp.ClientSession, server: CallServer, messages: int) -> bool:
    """Whether ``GET /calls`` shows one call that has processed ``messages`` messages."""
    async with client.get(http_url(server, "/calls")) as response:
        calls = await response.json()
    return len(calls) == 1 and calls[0]["messages"] == messages


async def test_twilio_call_recorded_exactly(
    server: CallServer, client: aiohttp.ClientSession, record_dir: Path
) -> None:
    """A Twilio-dialect call ends with 1000 and its WAV equals the decoded audio sent."""
    stream_sid, call_sid = sid("MZ", 1), sid("CA", 1)
    sent = audio(1)
    async with client.ws_connect(ws_url(server)) as ws:
        await ws.send_str(connected())
        await ws.send_str(twilio_start(stream_sid, call_sid, params={"tenant": "t1"}))
        await send_call(ws, stream_sid, sent)
        await ws.send_str(dtmf(stream_sid, "5", seq=100))
        await ws.send_str(mark(stream_sid, "m1", seq=101))
        await ws.send_str(stop(stream_sid))
        assert await receive_close(ws) == (1000, "stream stopped")
    assert read_wav(record_dir / call_sid / f"{stream_sid}.inbound.wav") == decoded(sent)
    summary = recording(record_dir, call_sid, stream_sid)
    assert summary["endReason"] == "stop" and summary["error"] is None
    assert summary["dialect"] == "twilio"
    assert summary["customParameters"] == {"tenant": "t1"}
    assert summary["dtmf"] == [{"digit": "5", "sequenceNumber": "100"}]
    assert summary["counters"]["messages"] == {
        "connected": 1,
        "start": 1,
        "media": 20,
        "dtmf": 1,
        "mark": 1,
        "stop": 1,
    }
    assert summary["counters"]["mediaBytes"] == len(sent)
    assert summary["durationMs"] == 400
    assert summary["files"] == {
        "inbound": f"{call_sid}/{stream_sid}.inbound.wav",
        "summary": f"{call_sid}/{stream_sid}.json",
    }
    assert files_under(record_dir / ".partial") == []


async def test_seed_call_acknowledged_and_recorded(
    server: CallServer, client: aiohttp.ClientSession, record_dir: Path
) -> None:
    """A seed-dialect call gets the exact ack, then is recorded under its streamSid."""
    stream_sid = "MTxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
    sent = audio(2)
    async with client.ws_connect(ws_url(server)) as ws:
        await ws.send_str(seed_start(stream_sid))
        ack = await ws.receive(timeout=5)
        assert ack.data == (
            '{"event":"start","protocol":"wss","version":"1.0.0",'
            '"streamSid":"MTxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx","tracks":[{"id":"inbound"}]}'
        )
        await send_call(ws, stream_sid, sent)
        await ws.send_str(json.dumps({"event": "stop", "streamSid": stream_sid}))
        assert (await receive_close(ws))[0] == 1000
    call_key = f"stream.{stream_sid}"  # no callSid (README, "Recordings")
    assert read_wav(record_dir / call_key / f"{stream_sid}.inbound.wav") == decoded(sent)
    summary = recording(record_dir, call_key, stream_sid)
    assert (summary["dialect"], summary["callSid"], summary["endReason"]) == ("seed", None, "stop")


async def test_small_buffer_flushes_without_loss(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """With a tiny buffer the audio is flushed many times, and still recorded exactly."""
    stream_sid = sid("MZ", 3)
    sent = audio(3, seconds=1.0)
    async with running_server(record_dir, buffer_bytes=500) as srv, client.ws_connect(ws_url(srv)) as ws:
        await ws.send_str(twilio_start(stream_sid))
        await send_call(ws, stream_sid, sent)
        await ws.send_str(stop(stream_sid))
        assert (await receive_close(ws))[0] == 1000
    assert read_wav(record_dir / ("CA" + stream_sid[2:]) / f"{stream_sid}.inbound.wav") == decoded(sent)


async def test_timestamp_gap_filled_with_silence(
    server: CallServer, client: aiohttp.ClientSession, record_dir: Path
) -> None:
    """A lost frame (timestamp jumps 40 ms) becomes 20 ms of silence, not a shift."""
    stream_sid = sid("MZ", 4)
    one, two = b"\x10" * 160, b"\x20" * 160
    async with client.ws_connect(ws_url(server)) as ws:
        await ws.send_str(twilio_start(stream_sid))
        await ws.send_str(media(stream_sid, one, 0))
        await ws.send_str(media(stream_sid, two, 40))
        await ws.send_str(stop(stream_sid))
        await receive_close(ws)
    pcm = read_wav(record_dir / ("CA" + stream_sid[2:]) / f"{stream_sid}.inbound.wav")
    assert pcm == decoded(one) + b"\x00\x00" * 160 + decoded(two)
    assert recording(record_dir, "CA" + stream_sid[2:], stream_sid)["counters"]["silenceMs"] == 20


async def test_fifty_concurrent_calls(
    server: CallServer, client: aiohttp.ClientSession, record_dir: Path
) -> None:
    """50 calls at once: each recording equals, sample for sample, what its caller sent."""

    async def one_call(n: int) -> None:
        stream_sid = sid("MZ", 1000 + n)
        async with client.ws_connect(ws_url(server)) as ws:
            await ws.send_str(twilio_start(stream_sid))
            for i, frame in enumerate(frames(audio(n))):
                await ws.send_str(media(stream_sid, frame, i * 20))
                if i % 5 == 0:
                    await asyncio.sleep(0)  # interleave the calls
            await ws.send_str(stop(stream_sid))
            assert (await receive_close(ws))[0] == 1000

    await asyncio.gather(*(one_call(n) for n in range(50)))
    for n in range(50):
        stream_sid = sid("MZ", 1000 + n)
        path = record_dir / ("CA" + stream_sid[2:]) / f"{stream_sid}.inbound.wav"
        assert read_wav(path) == decoded(audio(n)), n
    assert 'callsock_calls_ended_total{reason="stop"} 50.0' in await metrics_text(client, server)


async def test_dropped_connection_is_finalized(
    server: CallServer, client: aiohttp.ClientSession, record_dir: Path
) -> None:
    """A connection that drops without stop is still published, endReason "closed"."""
    stream_sid = sid("MZ", 5)
    sent = audio(5)
    async with client.ws_connect(ws_url(server)) as ws:
        await ws.send_str(twilio_start(stream_sid))
        await send_call(ws, stream_sid, sent)
    summary_path = record_dir / ("CA" + stream_sid[2:]) / f"{stream_sid}.json"
    await eventually(summary_path.exists, what=f"{summary_path} published")  # the client did not wait
    assert json.loads(summary_path.read_text())["endReason"] == "closed"
    assert read_wav(summary_path.with_name(f"{stream_sid}.inbound.wav")) == decoded(sent)


BAD_INPUTS = [
    ("not json", 1007, "json", "not json"),
    ("invalid track", 1007, "track-rate", seed_start(sid("MZ", 9), rate=16000)),
    ("media before start", 1008, "before-start", media(sid("MZ", 9), b"\xff" * 160, 0)),
    ("stop before start", 1008, "before-start", stop(sid("MZ", 9))),
]


@pytest.mark.parametrize(("name", "code", "rule", "text"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
async def test_bad_first_message_closes_with_code(
    server: CallServer, client: aiohttp.ClientSession, name: str, code: int, rule: str, text: str
) -> None:
    """A bad message closes with its documented code and is counted by rule."""
    with structlog.testing.capture_logs() as logs:
        async with client.ws_connect(ws_url(server)) as ws:
            await ws.send_str(text)
            close_code, reason = await receive_close(ws)
    assert close_code == code and reason
    rejected = [line for line in logs if line["event"] == "message rejected"]
    assert len(rejected) == 1 and rejected[0]["rule"] == rule
    assert f'callsock_errors_total{{rule="{rule}"}} 1.0' in await metrics_text(client, server)
    await eventually(lambda: server.connections == {})  # forgotten once the closing handshake is done


STREAMING_BAD = [
    ("second start", 1008, "second-start", "start", "media"),
    ("wrong streamSid", 1008, "stream-sid-mismatch", "other-sid", "media"),
    ("bad base64", 1007, "base64", "bad-base64", "media.payload"),
    ("binary frame", 1003, "binary-frame", "binary", ""),
]


@pytest.mark.parametrize(
    ("name", "code", "rule", "kind", "field"), STREAMING_BAD, ids=[b[0] for b in STREAMING_BAD]
)
async def test_bad_message_mid_call(
    server: CallServer,
    client: aiohttp.ClientSession,
    record_dir: Path,
    name: str,
    code: int,
    rule: str,
    kind: str,
    field: str,
) -> None:
    """A bad message mid-call closes it with its code; the recording is kept, endReason "error"."""
    stream_sid = sid("MZ", 6)
    sent = audio(6, seconds=0.2)
    payload = "AAEC" * 60
    with structlog.testing.capture_logs() as logs:
        async with client.ws_connect(ws_url(server)) as ws:
            await ws.send_str(twilio_start(stream_sid))
            await send_call(ws, stream_sid, sent)
            if kind == "start":
                await ws.send_str(twilio_start(stream_sid))
            elif kind == "other-sid":
                await ws.send_str(media(sid("MZ", 7), b"\xff" * 160, 400))
            elif kind == "bad-base64":
                await ws.send_str(
                    media(stream_sid, b"", 400).replace('"payload": ""', f'"payload": "{payload}!"')
                )
            else:
                await ws.send_bytes(b"\x00" * 160)
            close_code, _ = await receive_close(ws)
    assert close_code == code
    [line] = [line for line in logs if line["event"] == "message rejected"]
    assert line["rule"] == rule and line["streamSid"] == stream_sid
    assert payload not in json.dumps(logs)
    summary = recording(record_dir, "CA" + stream_sid[2:], stream_sid)
    assert (summary["endReason"], summary["error"]) == ("error", rule)
    assert read_wav(record_dir / ("CA" + stream_sid[2:]) / f"{stream_sid}.inbound.wav") == decoded(sent)


async def test_bad_call_leaves_good_call_untouched(
    server: CallServer, client: aiohttp.ClientSession, record_dir: Path
) -> None:
    """Rejecting one connection does not disturb another running beside it."""
    good = sid("MZ", 8)
    sent = audio(8)
    async with client.ws_connect(ws_url(server)) as ws:
        await ws.send_str(twilio_start(good))
        half = len(frames(sent)) // 2
        for i, frame in enumerate(frames(sent)):
            if i == half:
                async with client.ws_connect(ws_url(server)) as bad:
                    await bad.send_str("garbage")
                    assert (await receive_close(bad))[0] == 1007
            await ws.send_str(media(good, frame, i * 20))
        await ws.send_str(stop(good))
        assert (await receive_close(ws))[0] == 1000
    assert read_wav(record_dir / ("CA" + good[2:]) / f"{good}.inbound.wav") == decoded(sent)


async def test_newer_connection_replaces_older(
    server: CallServer, client: aiohttp.ClientSession, record_dir: Path
) -> None:
    """A second connection for the same call closes the first with 4000 "replaced"."""
    stream_sid, call_sid = sid("MZ", 10), sid("CA", 10)
    first_audio, second_audio = audio(10), audio(11)
    async with client.ws_connect(ws_url(server)) as first:
        await first.send_str(twilio_start(stream_sid, call_sid))
        await send_call(first, stream_sid, first_audio)
        async with client.ws_connect(ws_url(server)) as second:
            await second.send_str(twilio_start(stream_sid, call_sid))
            code, reason = await receive_close(first)
            assert code == 4000 and "replaced" in reason
            await send_call(second, stream_sid, second_audio)
            await second.send_str(stop(stream_sid))
            assert (await receive_close(second))[0] == 1000
    first_summary = recording(record_dir, call_sid, stream_sid)
    second_summary = recording(record_dir, call_sid, f"{stream_sid}.1")
    assert first_summary["endReason"] == "replaced"
    assert second_summary["endReason"] == "stop"
    assert read_wav(record_dir / call_sid / f"{stream_sid}.inbound.wav") == decoded(first_audio)
    assert read_wav(record_dir / call_sid / f"{stream_sid}.1.inbound.wav") == decoded(second_audio)
    assert "callsock_connections_replaced_total 1.0" in await metrics_text(client, server)


async def test_max_calls_refuses_with_1013(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """Past --max-calls a new connection is closed with 1013; the others go on."""
    async with running_server(record_dir, max_calls=2) as srv:
        async with client.ws_connect(ws_url(srv)) as a, client.ws_connect(ws_url(srv)) as b:
            await a.send_str(twilio_start(sid("MZ", 20)))
            await b.send_str(twilio_start(sid("MZ", 21)))
            async with client.ws_connect(ws_url(srv)) as c:
                code, reason = await receive_close(c)
                assert code == 1013 and "capacity" in reason
            await a.send_str(stop(sid("MZ", 20)))
            assert (await receive_close(a))[0] == 1000
        assert "callsock_connections_refused_total 1.0" in await metrics_text(client, srv)


async def test_plain_get_is_426_and_unknown_path_404(
    server: CallServer, client: aiohttp.ClientSession
) -> None:
    """A plain GET on the WebSocket path explains itself; other paths are 404."""
    async with client.get(http_url(server, "/call")) as response:
        assert response.status == 426
        assert response.headers["Upgrade"] == "websocket"
        assert "WebSocket" in await response.text()
    async with client.get(http_url(server, "/nope")) as response:
        assert response.status == 404


async def test_custom_path(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """--path moves the WebSocket; the default path is then 404."""
    async with running_server(record_dir, path="/media") as srv:
        async with client.ws_connect(ws_url(srv, "/media")) as ws:
            await ws.send_str(twilio_start(sid("MZ", 30)))
            await ws.send_str(stop(sid("MZ", 30)))
            assert (await receive_close(ws))[0] == 1000
        async with client.get(http_url(srv, "/call")) as response:
            assert response.status == 404


async def test_no_record(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """--no-record writes nothing."""
    async with running_server(record_dir, record=False) as srv, client.ws_connect(ws_url(srv)) as ws:
        await ws.send_str(twilio_start(sid("MZ", 31)))
        await send_call(ws, sid("MZ", 31), audio(31))
        await ws.send_str(stop(sid("MZ", 31)))
        assert (await receive_close(ws))[0] == 1000
    assert not record_dir.exists()


async def test_health_calls_and_metrics(server: CallServer, client: aiohttp.ClientSession) -> None:
    """/health, /calls and /metrics describe the calls that are running."""
    stream_sid, call_sid = sid("MZ", 40), sid("CA", 40)
    async with client.ws_connect(ws_url(server)) as ws:
        await ws.send_str(twilio_start(stream_sid, call_sid))
        await send_call(ws, stream_sid, audio(40, seconds=0.1))
        await ws.send_str(mark(stream_sid, "x"))
        await eventually(lambda: calls_with_messages(client, server, 7))  # start, 5 media, mark
        async with client.get(http_url(server, "/health")) as response:
            health = await response.json()
        assert health["status"] == "ok" and health["activeCalls"] == 1 and health["uptimeSeconds"] >= 0
        async with client.get(http_url(server, "/calls")) as response:
            [call] = await response.json()
        assert (call["callSid"], call["streamSid"], call["messages"], call["errors"], call["lastError"]) == (
            call_sid,
            stream_sid,
            7,
            0,
            None,
        )
        assert call["connectedAt"].endswith("Z") and call["state"] == "streaming"
        text = await metrics_text(client, server)
        assert 'callsock_messages_total{event="media"} 5.0' in text
        assert "callsock_media_bytes_total 800.0" in text
        assert "callsock_calls_active 1.0" in text
        assert "callsock_connections_active 1.0" in text
        assert "callsock_message_processing_seconds_count 7.0" in text
        await ws.send_str(stop(stream_sid))
        await receive_close(ws)
    async with client.get(http_url(server, "/health")) as response:
        assert (await response.json())["activeCalls"] == 0
    text = await metrics_text(client, server)
    assert 'callsock_messages_total{event="media"} 5.0' in text
    assert "callsock_connections_opened_total 1.0" in text


async def test_debug_message_log(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """At debug level each message is logged with event, streamSid and size, never its audio."""
    out = io.StringIO()
    configure_logging("debug", "json", stream=out)
    stream_sid = sid("MZ", 50)
    try:
        async with running_server(record_dir, log_level="debug") as srv, client.ws_connect(ws_url(srv)) as ws:
            await ws.send_str(twilio_start(stream_sid))
            await ws.send_str(media(stream_sid, b"\x42" * 160, 0))
            await ws.send_str(stop(stream_sid))
            await receive_close(ws)
    finally:
        configure_logging("warning", "json")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    messages = [line for line in lines if line["event"] == "message"]
    assert [m["kind"] for m in messages] == ["start", "media", "stop"]
    assert all(m["streamSid"] == stream_sid and m["size"] > 0 and "timestamp" in m for m in messages)
    upgrade = next(line for line in lines if line["event"] == "upgrade")
    assert upgrade["upgrade"] == "websocket" and "userAgent" in upgrade
    assert "QkJC" not in out.getvalue()  # base64 of the audio bytes 0x42
    ended = next(line for line in lines if line["event"] == "call ended")
    assert ended["callSid"] == "CA" + stream_sid[2:] and ended["streamSid"] == stream_sid


async def test_shutdown_closes_1001_and_publishes(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """Stopping the server closes live calls with 1001 and publishes them, endReason "shutdown"."""
    stream_sid = sid("MZ", 70)
    sent = audio(70)
    srv = CallServer(Settings(host="127.0.0.1", port=0, record_dir=record_dir))
    await srv.start()
    async with client.ws_connect(ws_url(srv)) as ws:
        await ws.send_str(twilio_start(stream_sid))
        await send_call(ws, stream_sid, sent)
        await eventually(lambda: calls_with_messages(client, srv, 1 + len(frames(sent))))  # all received
        stopping = asyncio.create_task(srv.stop())
        code, _ = await receive_close(ws)
        await stopping
    assert code == 1001
    summary = recording(record_dir, "CA" + stream_sid[2:], stream_sid)
    assert summary["endReason"] == "shutdown"
    assert read_wav(record_dir / ("CA" + stream_sid[2:]) / f"{stream_sid}.inbound.wav") == decoded(sent)
