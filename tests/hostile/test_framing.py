"""WebSocket framing attacks (RFC 6455), from a raw-socket client, beside a good call."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

from ..helpers import FRAME, media, raw_frame, sid, twilio_start
from .harness import MIB, OP_CONT, OP_PING, OP_TEXT, RawSocket, beside_a_good_call, target


async def test_invalid_utf8_anywhere_in_a_text_message_is_1007(tmp_path: Path) -> None:
    """A message whose JSON is fine but carries a byte that is not UTF-8 in a field nobody reads."""
    stream_sid = sid("MZ", 200)
    async with target(tmp_path) as t:

        async def attack() -> None:
            async with RawSocket.open(t.port) as raw:
                await raw.send_text(twilio_start(stream_sid))
                message = media(stream_sid, FRAME, 0)[:-1].encode() + b', "ignored": "\xff\xfe"}'
                await raw.send_text(message)
                assert await raw.close_code() == 1007

        outcome = await beside_a_good_call(t, attack())
        summary = t.summaries()[stream_sid]
    assert (summary["endReason"], summary["error"]) == ("error", "invalid-utf8")
    outcome.assert_health_answered()


async def test_after_a_protocol_error_tcp_closes_at_once(tmp_path: Path) -> None:
    """An unmasked frame: the close frame, then TCP closed without waiting for the peer's reply,
    and what the peer sent after the fault never parsed (section 7.1.7)."""
    stream_sid = sid("MZ", 201)
    async with target(tmp_path, "--close-timeout", "30") as t:

        async def attack() -> None:
            async with RawSocket.open(t.port) as raw:
                await raw.send_text(twilio_start(stream_sid))
                after = raw_frame(OP_TEXT, media(stream_sid, FRAME, 0).encode())
                await raw.send(raw_frame(OP_TEXT, b"{}", key=None) + after)
                assert await raw.close_code() == 1002
                began = time.monotonic()
                assert await raw.eof(seconds=20), "TCP stayed open"
                assert time.monotonic() - began < 10, "waited for the peer's close (--close-timeout is 30 s)"

        await beside_a_good_call(t, attack())
        summary = t.summaries()[stream_sid]
    assert summary["counters"]["messages"] == {"start": 1}  # the media after the fault was not read
    assert summary["error"] == "websocket-framing"


async def test_a_flood_of_empty_fragments_is_closed(tmp_path: Path) -> None:
    """Empty continuation frames cost memory too: past 1024 fragments a message closes with 1008."""
    async with target(tmp_path) as t:

        async def attack() -> None:
            async with RawSocket.open(t.port) as raw:
                flood = raw_frame(OP_TEXT, b"", fin=False) + raw_frame(OP_CONT, b"", fin=False) * 100_000
                with contextlib.suppress(ConnectionError):
                    await raw.send(flood)
                assert await raw.close_code() == 1008

        outcome = await beside_a_good_call(t, attack())
    assert outcome.rss_growth < 8 * MIB, outcome.rss_growth
    outcome.assert_health_answered()


async def test_a_frame_dripped_byte_by_byte_is_parsed_in_linear_time(tmp_path: Path) -> None:
    """A 32 KiB message sent one byte at a time is buffered without re-copying: it still arrives,
    and the server keeps answering meanwhile."""
    stream_sid = sid("MZ", 203)
    async with target(tmp_path) as t:

        async def attack() -> None:
            async with RawSocket.open(t.port) as raw:
                await raw.send_text(twilio_start(stream_sid))
                big = json.loads(media(stream_sid, FRAME, 0))
                big["padding"] = "x" * 32_000
                frame = raw_frame(OP_TEXT, json.dumps(big).encode())
                for i in range(len(frame)):
                    raw.writer.write(frame[i : i + 1])
                    if i % 64 == 0:
                        await raw.writer.drain()
                await raw.send_text(json.dumps({"event": "stop", "streamSid": stream_sid}))
                assert await raw.close_code() == 1000

        outcome = await beside_a_good_call(t, attack())
        summary = t.summaries()[stream_sid]
    assert summary["counters"]["messages"] == {"start": 1, "media": 1, "stop": 1}
    outcome.assert_health_answered()


async def test_a_ping_flood_from_a_client_that_never_reads_stays_bounded(tmp_path: Path) -> None:
    """Pings whose pongs are never read: the server stops reading, its memory stays put."""
    async with target(tmp_path) as t:

        async def attack() -> None:
            async with RawSocket.open(t.port) as raw:
                ping = raw_frame(OP_PING, b"p" * 125)
                batch = ping * 1000
                deadline = time.monotonic() + 1.5
                sent = 0
                with contextlib.suppress(TimeoutError, ConnectionError):
                    while time.monotonic() < deadline:
                        raw.writer.write(batch)
                        sent += len(batch)
                        await asyncio.wait_for(raw.writer.drain(), max(deadline - time.monotonic(), 0.01))
                assert sent > 4 * MIB or raw.writer.transport.get_write_buffer_size() > 0
                raw.abort()

        outcome = await beside_a_good_call(t, attack())
    assert outcome.rss_growth < 16 * MIB, outcome.rss_growth
    outcome.assert_health_answered()


async def test_pings_and_partial_frames_do_not_keep_a_silent_call_alive(tmp_path: Path) -> None:
    """Only whole data messages count against --idle-timeout: pings or a frame dripped slowly do not."""
    async with target(tmp_path, "--idle-timeout", "1") as t:

        async def keep_pinging() -> int | None:
            async with RawSocket.open(t.port) as raw:
                await raw.send_text(twilio_start(sid("MZ", 205)))
                closing = asyncio.create_task(raw.close_code(seconds=8))
                while not closing.done():
                    with contextlib.suppress(ConnectionError):
                        await raw.send(raw_frame(OP_PING, b"alive?"))
                    await asyncio.wait([closing], timeout=0.1)
                return closing.result()

        async def drip() -> int | None:
            async with RawSocket.open(t.port) as raw:
                await raw.send_text(twilio_start(sid("MZ", 206)))
                frame = raw_frame(OP_TEXT, media(sid("MZ", 206), FRAME, 0).encode())
                closing = asyncio.create_task(raw.close_code(seconds=8))
                for i in range(len(frame) - 1):
                    if closing.done():
                        break
                    with contextlib.suppress(ConnectionError):
                        await raw.send(frame[i : i + 1])
                    await asyncio.wait([closing], timeout=0.1)
                return await closing

        codes = await asyncio.gather(keep_pinging(), drip())
        summaries = t.summaries()
    assert list(codes) == [1008, 1008]
    assert {summaries[sid("MZ", n)]["endReason"] for n in (205, 206)} == {"idle-timeout"}
