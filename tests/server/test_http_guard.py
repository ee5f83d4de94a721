"""The HTTP guard's rules, one at a time, against a real server and raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path

import aiohttp

from callsock.server.httpguard import MAX_HEAD_BYTES
from callsock.server.routes import CallServer

from ..helpers import (
    WAIT_SECONDS,
    eventually,
    http_url,
    receive_close,
    running_server,
    sid,
    stop,
    twilio_start,
)

GET_HEALTH = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def metric(client: aiohttp.ClientSession, server: CallServer, name: str) -> float:
    async with client.get(http_url(server, "/metrics")) as response:
        text = await response.text()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def answer(reader: asyncio.StreamReader) -> bytes:
    """One response to GET /health: its head and its body (the JSON's length is in its head)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_SECONDS)
    length = int(re.search(rb"Content-Length: (\d+)", head, re.IGNORECASE).group(1))  # type: ignore[union-attr]
    return head + await reader.readexactly(length)


async def shut(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    with contextlib.suppress(ConnectionError):
        return await asyncio.wait_for(reader.read(65536), WAIT_SECONDS) == b""
    return True


async def test_an_idle_kept_alive_connection_is_closed_quietly(
    client: aiohttp.ClientSession, record_dir: Path
) -> None:
    """A client that got its answer and asks nothing more is closed after --request-timeout, and
    that is no refusal: only requests that began and did not finish count."""
    async with running_server(record_dir, request_timeout=0.3) as server:
        assert server.port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(GET_HEALTH)
        assert (await answer(reader)).startswith(b"HTTP/1.1 200")
        assert await closed_by_server(reader)
        await shut(writer)
        assert await metric(client, server, 'callsock_http_rejections_total{reason="request-timeout"}') == 0


async def test_eviction_spares_clients_that_sent_requests(
    client: aiohttp.ClientSession, record_dir: Path
) -> None:
    """At --max-http-connections, silent connections are closed, the oldest first, before a
    kept-alive client that already sent a request in time."""
    async with running_server(record_dir, max_http_connections=4) as server:
        assert server.port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(GET_HEALTH)
        await answer(reader)
        silent = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(10)]
        await eventually(lambda: len(server.guard) == 4)
        assert all([await closed_by_server(r) for r, _ in silent[:7]])
        writer.write(GET_HEALTH)
        assert (await answer(reader)).startswith(b"HTTP/1.1 200")  # still served, on the same socket
        evicted = await metric(client, server, 'callsock_http_rejections_total{reason="connection-budget"}')
        assert evicted == 8  # the seven, and one more for the connection that asked for the metrics
        for _, w in [*silent, (reader, writer)]:
            await shut(w)


async def test_a_head_sent_ahead_counts_too(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """Bytes pipelined behind a request count against the next request's head: a client cannot
    park a large unfinished head behind a small request."""
    async with running_server(record_dir) as server:
        assert server.port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        padding = b"".join(b"X-Pad-%d: %s\r\n" % (n, b"a" * 4000) for n in range(5))
        assert len(padding) > MAX_HEAD_BYTES
        writer.write(GET_HEALTH + b"GET /health HTTP/1.1\r\n" + padding)
        assert (await answer(reader)).startswith(b"HTTP/1.1 200")
        assert await closed_by_server(reader)
        await shut(writer)
        assert await metric(client, server, 'callsock_http_rejections_total{reason="head-too-large"}') == 1


async def test_a_websocket_is_no_longer_plain_http(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """An accepted upgrade leaves the HTTP budget and its deadline: a call outlives --request-timeout
    (a silent socket opened after it is closed meanwhile)."""
    async with running_server(record_dir, request_timeout=0.2) as server:
        assert server.port is not None
        async with client.ws_connect(f"ws://127.0.0.1:{server.port}/call") as ws:
            await eventually(lambda: len(server.connections) == 1 and len(server.guard) == 0)
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            assert await closed_by_server(reader)
            await shut(writer)
            await ws.send_str(twilio_start(sid("MZ", 1)))
            await ws.send_str(stop(sid("MZ", 1)))
            assert (await receive_close(ws))[0] == 1000
