"""Budgets per connection: what a client sends cannot grow the server's memory or disk past them.

Each attack runs against a real ``callsock serve`` beside a good call, which must come out
recorded sample for sample, while ``/health`` keeps answering.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from callsock.call.call import Call
from callsock.call.handlers import MAX_QUEUED_EVENTS
from callsock.call.session import MAX_DTMF_KEPT
from callsock.protocol.messages import MAX_COUNTER_CHARS, MAX_MARK_CHARS, MAX_PARAMETERS
from callsock.recording.recorder import MAX_AHEAD_SECONDS
from callsock.server.app import App

from ..helpers import (
    FRAME,
    StreamingCall,
    dtmf,
    mark,
    media,
    raw_frame,
    receive_close,
    running_server,
    sid,
    stop,
    twilio_start,
    ws_url,
)
from .harness import MIB, OP_TEXT, RawSocket, beside_a_good_call, target

PCM_BYTES_PER_SECOND = 16_000


async def test_dtmf_flood_is_counted_not_kept(tmp_path: Path) -> None:
    """5,000 DTMF messages: the summary keeps 256 digits and counts the rest; memory stays put."""
    stream_sid = sid("MZ", 100)
    async with target(tmp_path) as t:

        async def attack() -> None:
            async with aiohttp.ClientSession() as client, client.ws_connect(t.ws_url) as ws:
                await ws.send_str(twilio_start(stream_sid))
                for n in range(5000):
                    await ws.send_str(dtmf(stream_sid, "5", seq=2 + n))
                await ws.send_str(stop(stream_sid))
                assert (await receive_close(ws))[0] == 1000

        outcome = await beside_a_good_call(t, attack())
        summary = t.summaries()[stream_sid]
    assert len(summary["dtmf"]) == MAX_DTMF_KEPT
    assert summary["counters"]["dtmfDropped"] == 5000 - MAX_DTMF_KEPT
    assert summary["counters"]["messages"]["dtmf"] == 5000
    assert outcome.rss_growth < 8 * MIB, outcome.rss_growth
    outcome.assert_health_answered()


def start_with(stream_sid: str, **start: object) -> str:
    message = json.loads(twilio_start(stream_sid))
    message["start"].update(start)
    return json.dumps(message)


@pytest.mark.parametrize(
    ("name", "messages", "rule"),
    [
        ("sequence-number", lambda s: [twilio_start(s), dtmf(s, "1").replace('"3"', '"' + "9" * 60_000 + '"')], "too-long"),
        ("timestamp", lambda s: [twilio_start(s), media(s, FRAME, 0).replace('"0"', '"' + "1" * (MAX_COUNTER_CHARS + 1) + '"')], "too-long"),
        ("mark-name", lambda s: [twilio_start(s), mark(s, "m" * (MAX_MARK_CHARS + 1))], "too-long"),
        ("parameters", lambda s: [start_with(s, customParameters={f"p{i}": "v" for i in range(MAX_PARAMETERS + 1)})], "too-long"),
        ("parameter-length", lambda s: [start_with(s, customParameters={"name": "v" * 497})], "custom-parameter"),
        ("account-sid", lambda s: [start_with(s, accountSid="AC" + "0" * 40_000)], "too-long"),
        ("track", lambda s: [twilio_start(s), media(s, FRAME, 0, track="t" * 1000)], "too-long"),
    ],
)  # fmt: skip
async def test_long_fields_are_refused(tmp_path: Path, name: str, messages: object, rule: str) -> None:
    """Every string a client sends has a length limit: over it, the connection closes with 1007."""
    stream_sid = sid("MZ", 101)
    async with target(tmp_path) as t:

        async def attack() -> None:
            async with aiohttp.ClientSession() as client, client.ws_connect(t.ws_url) as ws:
                for message in messages(stream_sid):  # type: ignore[operator]
                    await ws.send_str(message)
                assert (await receive_close(ws))[0] == 1007

        await beside_a_good_call(t, attack())
        metrics = await metrics_text(t.http_url("/metrics"))
    assert f'callsock_errors_total{{rule="{rule}"}} 1.0' in metrics, name


async def metrics_text(url: str) -> str:
    async with aiohttp.ClientSession() as client, client.get(url) as response:
        return await response.text()


def wav_bytes(t_dir: Path, stream_sid: str) -> int:
    return (t_dir / ("CA" + stream_sid[2:]) / f"{stream_sid}.inbound.wav").stat().st_size


@pytest.mark.parametrize("jump_ms", [59_000, 20], ids=["timestamps-jump", "faster-than-real-time"])
async def test_the_timeline_cannot_outrun_the_clock(tmp_path: Path, jump_ms: int) -> None:
    """Jumps under the single-jump cap, or audio sent faster than real time: the recording stays
    within the call's wall-clock time plus MAX_AHEAD_SECONDS, so disk follows the real duration."""
    stream_sid = sid("MZ", 102)
    async with target(tmp_path) as t:
        began = asyncio.get_running_loop().time()

        async def attack() -> None:
            async with aiohttp.ClientSession() as client, client.ws_connect(t.ws_url) as ws:
                await ws.send_str(twilio_start(stream_sid))
                for n in range(3000):  # 2 days of timeline, or a minute of audio, in a moment
                    await ws.send_str(media(stream_sid, FRAME, n * jump_ms, seq=2 + n))
                await ws.send_str(stop(stream_sid))
                assert (await receive_close(ws))[0] == 1000

        outcome = await beside_a_good_call(t, attack())
        lasted = asyncio.get_running_loop().time() - began
        summary = t.summaries()[stream_sid]
    allowed = (lasted + MAX_AHEAD_SECONDS) * PCM_BYTES_PER_SECOND + 44
    assert wav_bytes(t.record_dir, stream_sid) <= allowed
    assert summary["counters"]["aheadDroppedMs"] > 0
    assert outcome.disk_after - outcome.disk_before <= allowed + 2 * lasted * PCM_BYTES_PER_SECOND + 8192
    outcome.assert_health_answered()


async def test_a_call_over_max_call_seconds_is_ended(tmp_path: Path) -> None:
    """--max-call-seconds: a call that goes on is closed with 1008, endReason max-duration."""
    async with target(tmp_path, "--max-call-seconds", "1") as t, aiohttp.ClientSession() as client:
        call = StreamingCall(client, t.ws_url, 103)
        await asyncio.wait_for(call.run(), 10)
        assert call.close_code == 1008 and call.close_reason is not None
        assert "longer than 1 s" in call.close_reason
        summary = t.summaries()[call.stream_sid]
    assert (summary["endReason"], summary["error"]) == ("max-duration", None)
    # The timeline the client sent before the close, however slowly a busy machine let it send.
    assert 0 < summary["durationMs"] <= 20 * call.sent


async def test_an_event_flood_beyond_slow_handlers_is_closed(tmp_path: Path) -> None:
    """DTMF faster than a slow on_dtmf handles it: past MAX_QUEUED_EVENTS waiting, 1008."""
    app = App()
    release = asyncio.Event()

    @app.on_dtmf
    async def slow(call: Call, digit: str) -> None:
        await release.wait()

    stream_sid = sid("MZ", 104)
    record_dir = tmp_path / "recordings"
    async with running_server(record_dir, app) as server, aiohttp.ClientSession() as client:
        async with client.ws_connect(ws_url(server)) as ws:
            await ws.send_str(twilio_start(stream_sid))
            for n in range(MAX_QUEUED_EVENTS + 10):
                await ws.send_str(dtmf(stream_sid, "7", seq=2 + n))
            code, reason = await receive_close(ws)
        release.set()
    assert code == 1008 and "events wait" in reason
    summary = json.loads((record_dir / ("CA" + stream_sid[2:]) / f"{stream_sid}.json").read_text())
    assert (summary["endReason"], summary["error"]) == ("error", "event-backlog")


async def test_a_message_flood_does_not_stall_the_server(tmp_path: Path) -> None:
    """Media as fast as a raw socket can write it, for as long as the good call: /health answers."""
    stream_sid = sid("MZ", 105)
    async with target(tmp_path) as t:

        async def attack() -> None:
            async with RawSocket.open(t.port) as raw:
                await raw.send_text(twilio_start(stream_sid))
                batch = b"".join(
                    raw_frame(OP_TEXT, media(stream_sid, FRAME, 20 * n, seq=2 + n).encode())
                    for n in range(2000)
                )
                deadline = asyncio.get_running_loop().time() + 1.5
                while asyncio.get_running_loop().time() < deadline:
                    await raw.send(batch)  # the same timestamps again: appended, not placed anew
                await raw.send_text(stop(stream_sid))
                assert await raw.close_code() == 1000

        outcome = await beside_a_good_call(t, attack())
    outcome.assert_health_answered()


async def test_a_mark_name_the_echo_would_break_is_refused_before_sending(tmp_path: Path) -> None:
    """callsock never sends a mark whose echo its own limit would refuse."""
    app = App()
    refused: list[str] = []

    @app.on_start
    async def long_mark(call: Call) -> None:
        try:
            await call.mark("m" * (MAX_MARK_CHARS + 1))
        except ValueError as exc:
            refused.append(str(exc))
        await call.hangup()

    async with running_server(tmp_path / "recordings", app) as server, aiohttp.ClientSession() as client:
        async with client.ws_connect(ws_url(server)) as ws:
            await ws.send_str(twilio_start(sid("MZ", 106)))
            assert (await receive_close(ws))[0] == 1000
    assert refused == [f"a mark name may have at most {MAX_MARK_CHARS} characters"]
