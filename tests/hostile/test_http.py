"""Attacks over plain HTTP: slow requests, too many connections, large and junk bodies, label floods.

Each runs against a real ``callsock serve`` beside a good call, which must come out recorded sample
for sample, while ``/health`` keeps answering within its budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

from callsock.server.httpguard import MAX_HEAD_BYTES

from ..helpers import eventually, sid, stop, twilio_start
from .harness import MIB, Outcome, Target, beside_a_good_call, target

FORM = "application/x-www-form-urlencoded"


@asynccontextmanager
async def raw_http(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A TCP connection to the server, for requests no HTTP library would send; closed at the end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def dropped_while_trickling(port: int, head: bytes, drip: bytes, *, within: float = 30.0) -> bytes:
    """Send ``head``, then ``drip`` every 0.2 s (the attack), until the server closes the connection.

    Returns what the server sent before closing; fails if it is still open after ``within`` s.
    """
    received = b""
    async with raw_http(port) as (reader, writer):
        writer.write(head)
        async with asyncio.timeout(within):
            while True:
                try:
                    writer.write(drip)
                    await writer.drain()
                    chunk = await asyncio.wait_for(reader.read(65536), 0.2)
                except TimeoutError:
                    continue  # still open: drip again
                except ConnectionError:
                    return received
                if not chunk:
                    return received
                received += chunk


async def raw_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` whole and read until the server closes the connection (at most 10 s)."""
    async with raw_http(port) as (reader, writer):
        writer.write(request)
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(10):
                return await reader.read(-1)
    return b""


async def metrics(t: Target) -> str:
    async with aiohttp.ClientSession() as client, client.get(t.http_url("/metrics")) as response:
        return await response.text()


def metric(text: str, name: str) -> float:
    """A sample's value in Prometheus text (0 when absent)."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def p90(outcome: Outcome) -> float:
    ordered = sorted(outcome.health_ms)
    return ordered[int(0.9 * (len(ordered) - 1))]


def report(name: str, outcome: Outcome) -> None:
    """The attack's cost, shown with ``pytest -s`` (the figures the README and reviews quote)."""
    print(f"\n{name}: rss {outcome.rss_growth / MIB:+.1f} MiB, /health p90 {p90(outcome):.1f} ms "
          f"max {max(outcome.health_ms):.1f} ms over {len(outcome.health_ms)} polls")  # fmt: skip


def server_log(t: Target) -> list[str]:
    output: str = t.process.output()  # type: ignore[attr-defined]
    return output.splitlines()


async def test_slowloris_headers_are_dropped(tmp_path: Path) -> None:
    """200 connections send a request line and then one header line every 0.2 s, never ending the
    headers: each is closed, unanswered, at --request-timeout."""
    answers: list[bytes] = []
    async with target(tmp_path, "--request-timeout", "1") as t:
        head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"

        async def attack() -> None:
            drips = (dropped_while_trickling(t.port, head, f"X-Slow-{n}: 1\r\n".encode()) for n in range(200))
            answers.extend(await asyncio.gather(*drips))

        outcome = await beside_a_good_call(t, attack(), seconds=2.0)
        text = await metrics(t)
    report("slowloris", outcome)
    assert answers == [b""] * 200
    assert metric(text, 'callsock_http_rejections_total{reason="request-timeout"}') >= 200
    assert outcome.rss_growth < 16 * MIB, outcome.rss_growth
    outcome.assert_health_answered()


async def test_a_trickled_body_is_dropped(tmp_path: Path) -> None:
    """50 webhook posts announce a 4 KiB form and send a byte every 0.2 s: each connection is
    closed at --request-timeout without an answer, and the route never runs."""
    answers: list[bytes] = []
    async with target(tmp_path, "--request-timeout", "1") as t:
        head = (
            f"POST /stream-status HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {FORM}\r\n"
            "Content-Length: 4096\r\n\r\nStreamEvent="
        ).encode()

        async def attack() -> None:
            answers.extend(
                await asyncio.gather(*(dropped_while_trickling(t.port, head, b"a") for _ in range(50)))
            )

        outcome = await beside_a_good_call(t, attack(), seconds=2.0)
        text = await metrics(t)
    report("trickled body", outcome)
    assert answers == [b""] * 50
    assert metric(text, 'callsock_http_rejections_total{reason="request-timeout"}') >= 50
    assert "callsock_stream_status_total{" not in text
    outcome.assert_health_answered()


async def test_idle_connections_never_starve_calls(tmp_path: Path) -> None:
    """600 connections that send nothing, against --max-http-connections 64: the oldest silent ones
    are closed to make room, never more than 64 stay open, and new calls still get in."""
    async with target(tmp_path, "--max-http-connections", "64") as t:
        idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

        async def attack() -> None:
            for _ in range(600):
                idle.append(await asyncio.open_connection("127.0.0.1", t.port))
            text = await metrics(t)
            assert metric(text, "callsock_http_connections") <= 64
            assert metric(text, 'callsock_http_rejections_total{reason="connection-budget"}') >= 600 - 64
            # With the budget spent by silent sockets, another call connects and goes through.
            async with aiohttp.ClientSession() as client, client.ws_connect(t.ws_url) as ws:
                await ws.send_str(twilio_start(sid("MZ", 7)))
                await ws.send_str(stop(sid("MZ", 7)))
                assert (await ws.receive(timeout=10)).type is aiohttp.WSMsgType.CLOSE
                assert ws.close_code == 1000

        try:
            outcome = await beside_a_good_call(t, attack())
        finally:
            for _, writer in idle:
                writer.close()
    report("idle connections", outcome)
    assert outcome.rss_growth < 16 * MIB, outcome.rss_growth
    outcome.assert_health_answered()


async def test_large_bodies_are_refused_unread(tmp_path: Path) -> None:
    """A 1 MiB form, announced or chunked, 40 at once: 413, and memory stays put."""
    statuses: list[int] = []
    async with target(tmp_path) as t:

        async def post(client: aiohttp.ClientSession, chunked: bool) -> None:
            body = b"a=" + b"x" * MIB

            async def chunks() -> AsyncIterator[bytes]:
                for start in range(0, len(body), 65536):
                    yield body[start : start + 65536]

            data = chunks() if chunked else io.BytesIO(body)
            with contextlib.suppress(aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                async with client.post(t.http_url("/twiml"), data=data, headers={"Content-Type": FORM}) as r:
                    statuses.append(r.status)

        async def attack() -> None:
            async with aiohttp.ClientSession() as client:
                await asyncio.gather(*(post(client, chunked=n % 2 == 1) for n in range(40)))

        outcome = await beside_a_good_call(t, attack())
        text = await metrics(t)
    report("large bodies", outcome)
    # A client still writing when the 413 and the close come may see the reset instead.
    assert statuses and set(statuses) == {413}, statuses
    assert metric(text, 'callsock_http_rejections_total{reason="body-too-large"}') == 40
    assert outcome.rss_growth < 16 * MIB, outcome.rss_growth
    outcome.assert_health_answered()


JUNK = [
    ("not utf-8", FORM, b"CallSid=\xff\xfe\xfd"),
    ("escaped not utf-8", FORM, b"CallSid=%ff%fe"),
    ("broken multipart", "multipart/form-data; boundary=xyz", b"--xyz\r\nContent-Disposition: form-data\r\n\r\nno end"),
    ("valid multipart", "multipart/form-data; boundary=xyz", b'--xyz\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--xyz--\r\n'),
    ("json", "application/json", b'{"CallSid": "CA1"}'),
    ("octet-stream", "application/octet-stream", bytes(range(256))),
    ("latin-1 charset", f"{FORM}; charset=latin-1", b"CallSid=CA1"),
    ("too many fields", FORM, b"&".join(b"f%d=1" % n for n in range(1000))),
]  # fmt: skip


async def test_junk_bodies_get_400_and_no_traceback(tmp_path: Path) -> None:
    """Bodies that are not Twilio's form, to both webhooks, and requests aiohttp cannot even parse:
    400 each, never 500, and not one traceback in the server's log."""
    seen: dict[str, int] = {}
    async with target(tmp_path) as t:

        async def attack() -> None:
            async with aiohttp.ClientSession() as client:
                for route in ("/twiml", "/stream-status"):
                    for name, content_type, body in JUNK:
                        headers = {"Content-Type": content_type}
                        async with client.post(t.http_url(route), data=body, headers=headers) as response:
                            seen[f"{route} {name}"] = response.status
                gzipped = {"Content-Type": FORM, "Content-Encoding": "gzip"}
                async with client.post(
                    t.http_url("/twiml"), data=b"\x1f\x8bjunk", headers=gzipped
                ) as response:
                    seen["/twiml gzip junk"] = response.status
            for name, request in (
                ("garbage request line", b"\x00\x01\x02 / HTTP/1.1\r\n\r\n"),
                ("bad header", b"GET /health HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n"),
                ("bad chunk", b"POST /twiml HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
                ("bad length", b"POST /twiml HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"),
            ):
                answer = await raw_exchange(t.port, request)
                seen[name] = int(answer.split()[1]) if answer.startswith(b"HTTP/1.") else 0

        outcome = await beside_a_good_call(t, attack())
        log = server_log(t)
    assert seen == dict.fromkeys(seen, 400), seen
    assert len(seen) == 2 * len(JUNK) + 5
    assert not [line for line in log if "Traceback" in line or '"exception"' in line]
    outcome.assert_health_answered()


async def test_client_strings_cannot_grow_metrics_or_logs(tmp_path: Path) -> None:
    """2,000 status callbacks, each with its own StreamEvent and a 6,000-character StreamError
    and CallSid: one `other` series, and every log line short."""
    async with target(tmp_path) as t:

        async def attack() -> None:
            async with aiohttp.ClientSession() as client:
                for n in range(2000):
                    form = {"StreamEvent": f"event-{n}\n", "StreamError": "E" * 6000, "CallSid": "C" * 6000}
                    async with client.post(t.http_url("/stream-status"), data=form) as response:
                        assert response.status == 204

        outcome = await beside_a_good_call(t, attack(), seconds=2.0)
        text = await metrics(t)
        await eventually(
            lambda: sum('"stream status"' in line for line in server_log(t)) >= 2000, what="logs"
        )
        lines = [json.loads(line) for line in server_log(t) if '"stream status"' in line]
    report("label flood", outcome)
    series = re.findall(r"^callsock_stream_status_total\{.*$", text, re.MULTILINE)
    assert series == ['callsock_stream_status_total{event="other"} 2000.0']
    assert max(len(line["streamError"]) for line in lines) < 250
    assert max(len(line["callSid"]) for line in lines) < 250
    assert all("\n" not in line["streamEvent"] for line in lines)
    assert outcome.rss_growth < 16 * MIB, outcome.rss_growth
    outcome.assert_health_answered()


async def test_header_floods_are_bounded(tmp_path: Path) -> None:
    """256 connections each send headers just under what a request head may hold and never end
    them, while 32 others send more: those are closed at once, the rest at --request-timeout, and
    memory stays within its budget meanwhile."""
    async with target(tmp_path, "--request-timeout", "2") as t:
        header = b"X-Filler: " + b"f" * 4000 + b"\r\n"
        request_line = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        held = request_line + header * (MAX_HEAD_BYTES // len(header))
        over = request_line + header * 30
        assert len(held) <= MAX_HEAD_BYTES < len(over)
        peak: list[int] = []

        async def attack() -> None:
            flood = asyncio.gather(
                *(dropped_while_trickling(t.port, held, b"") for _ in range(256)),
                *(dropped_while_trickling(t.port, over, b"") for _ in range(32)),
            )
            while not flood.done():  # the resident memory while the headers are held
                peak.append(t.rss())
                await asyncio.wait([flood], timeout=0.05)
            assert await flood == [b""] * (256 + 32)

        outcome = await beside_a_good_call(t, attack(), seconds=3.0)
        text = await metrics(t)
    report("header flood", outcome)
    most = max(peak) - outcome.rss_before
    print(f"header flood: {most / MIB:+.1f} MiB at most while held")
    assert metric(text, 'callsock_http_rejections_total{reason="head-too-large"}') == 32
    timed_out = metric(text, 'callsock_http_rejections_total{reason="request-timeout"}')
    evicted = metric(text, 'callsock_http_rejections_total{reason="connection-budget"}')
    assert timed_out + evicted >= 256  # 256 held, plus the good call's, the polls': over the budget
    assert most < 32 * MIB, most
    outcome.assert_health_answered()
