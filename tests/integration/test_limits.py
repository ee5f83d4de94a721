"""Limits a peer cannot exceed: message size, idleness, slow handshakes; and direct TLS."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

import aiohttp

from ..helpers import (
    WAIT_SECONDS,
    eventually,
    http_url,
    media,
    receive_close,
    running_server,
    sid,
    stop,
    twilio_start,
    ws_url,
)


async def test_oversized_message_closes_1009(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """A message over --max-message-bytes closes its connection with 1009; others go on."""
    stream_sid = sid("MZ", 1)
    async with running_server(record_dir, max_message_bytes=4096) as server:
        async with client.ws_connect(ws_url(server)) as good, client.ws_connect(ws_url(server)) as big:
            await good.send_str(twilio_start(sid("MZ", 2)))
            await big.send_str(twilio_start(stream_sid))
            await big.send_str(media(stream_sid, b"\xff" * 4000, 0))  # base64 makes it over 4096
            assert (await receive_close(big))[0] == 1009
            await good.send_str(stop(sid("MZ", 2)))
            assert (await receive_close(good))[0] == 1000
        async with client.get(http_url(server, "/metrics")) as response:
            assert 'callsock_errors_total{rule="message-too-big"} 1.0' in await response.text()
    summary = json.loads((record_dir / ("CA" + stream_sid[2:]) / f"{stream_sid}.json").read_text())
    assert (summary["endReason"], summary["error"]) == ("error", "message-too-big")


async def test_idle_connection_is_closed_and_finalized(
    client: aiohttp.ClientSession, record_dir: Path
) -> None:
    """A call that sends nothing for --idle-timeout is closed (1008) with endReason idle-timeout."""
    stream_sid = sid("MZ", 3)
    async with (
        running_server(record_dir, idle_timeout=0.3) as server,
        client.ws_connect(ws_url(server)) as ws,
    ):
        await ws.send_str(twilio_start(stream_sid))
        await ws.send_str(media(stream_sid, b"\x10" * 160, 0))
        code, reason = await receive_close(ws)
    assert code == 1008 and "nothing received" in reason
    summary = json.loads((record_dir / ("CA" + stream_sid[2:]) / f"{stream_sid}.json").read_text())
    assert summary["endReason"] == "idle-timeout"


async def test_no_start_within_the_handshake_timeout(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """A connection that never sends start gives its slot back after --handshake-timeout."""
    async with running_server(record_dir, handshake_timeout=0.3, max_calls=1) as server:
        async with client.ws_connect(ws_url(server)) as ws:
            code, reason = await receive_close(ws)
        assert code == 1008 and "no start" in reason
        await eventually(lambda: not server.connections)  # given back once the closing handshake is done
        async with client.ws_connect(ws_url(server)) as ws:  # the slot is free again
            await ws.send_str(twilio_start(sid("MZ", 4)))
            await ws.send_str(stop(sid("MZ", 4)))
            assert (await receive_close(ws))[0] == 1000


async def test_slow_http_request_is_dropped(record_dir: Path) -> None:
    """A client that does not finish its request within the handshake timeout is disconnected."""
    async with running_server(record_dir, handshake_timeout=0.3) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /call HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
        await writer.drain()
        async with asyncio.timeout(WAIT_SECONDS):
            assert await reader.read() == b""  # the server closed the connection
        writer.close()


async def test_direct_tls(certificate: tuple[Path, Path, Path], record_dir: Path) -> None:
    """--ssl-certfile/--ssl-keyfile serve wss:// and https:// without a proxy."""
    cert, key, authority = certificate
    context = ssl.create_default_context(cafile=str(authority))
    connector = aiohttp.TCPConnector(ssl=context)
    async with running_server(record_dir, ssl_certfile=cert, ssl_keyfile=key) as server:
        async with aiohttp.ClientSession(connector=connector) as client:
            async with client.get(f"https://127.0.0.1:{server.port}/health") as response:
                assert response.status == 200
            async with client.ws_connect(f"wss://127.0.0.1:{server.port}/call") as ws:
                await ws.send_str(twilio_start(sid("MZ", 5)))
                await ws.send_str(stop(sid("MZ", 5)))
                assert (await receive_close(ws))[0] == 1000
            async with client.get(f"https://127.0.0.1:{server.port}/twiml") as response:
                assert f'url="wss://127.0.0.1:{server.port}/call"' in await response.text()
