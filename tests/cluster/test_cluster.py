"""A cluster of real callsock server processes sharing a real redis-server (and, once, real nginx)."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import signal
import ssl
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from callsock import App
from callsock.protocol.errors import ConfigurationError
from callsock.server.settings import Settings
from callsock.server.twilio import signature_for

from ..helpers import (
    REPO,
    WAIT_SECONDS,
    StreamingCall,
    TwilioPeer,
    assert_valid_wav,
    eventually,
    receive_close,
    sid,
)
from ..processes import Nginx, RedisServer, free_port, run_callsock, serve_process, wait_healthy

ROOT = REPO
TOKEN = "cluster-test-auth-token"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    # Retries: the test stops and starts Redis under this client's pooled connection.
    client = aioredis.Redis.from_url(
        redis_server.url,
        decode_responses=True,
        retry=Retry(ExponentialBackoff(cap=0.5), 5),
        retry_on_error=[RedisConnectionError],
    )
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def two_servers(
    record_dir: Path, *options: str
) -> AsyncIterator[tuple[subprocess.Popen[str], int, int]]:
    """Two `callsock serve` processes with the same options, healthy: (process A, port A, port B)."""
    with (
        serve_process(record_dir, *options) as (a, port_a),
        serve_process(record_dir, *options) as (b, port_b),
    ):
        await asyncio.gather(wait_healthy(port_a, process=a), wait_healthy(port_b, process=b))
        yield a, port_a, port_b


async def health(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as client, client.get(f"http://127.0.0.1:{port}/health") as r:
        body: dict[str, Any] = await r.json()
        return body


async def metrics(port: int) -> str:
    async with aiohttp.ClientSession() as client, client.get(f"http://127.0.0.1:{port}/metrics") as r:
        return await r.text()


async def registered(client: aioredis.Redis, call_sid: str) -> str | None:
    value = await client.get(f"callsock:call:{call_sid}")
    return None if value is None else str(value)


def assert_replaced(call: StreamingCall) -> None:
    assert call.close_code == 4000 and "replaced" in (call.close_reason or "")


async def read_events(redis_url: str, count: int, *extra: str) -> list[dict[str, Any]]:
    """What `callsock events --json` prints for the first ``count`` events."""
    status, out, err = await run_callsock(
        "events", "--redis-url", redis_url, "--json", "--count", str(count), *extra
    )
    assert status == 0, err
    return [json.loads(line) for line in out.splitlines()]


async def test_redis_unreachable_at_start_is_an_error(tmp_path: Path) -> None:
    """No Redis where --redis-url points: a clear message and exit status 1."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    with serve_process(tmp_path / "rec", "--redis-url", url) as (process, _port):
        out, _ = await asyncio.to_thread(process.communicate, timeout=30)
    assert process.returncode == 1
    assert f"cannot reach Redis at {url}" in out


def test_asgi_adapter_does_not_join_a_cluster() -> None:
    """Clustering runs with `callsock serve`; the ASGI adapter says so instead of ignoring Redis."""
    with pytest.raises(ConfigurationError, match="does not join a cluster"):
        App().asgi(Settings(redis_url="redis://127.0.0.1:6379/0"))


async def test_events_requires_a_reachable_redis() -> None:
    status, _, err = await run_callsock("events", "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    assert status == 1 and "cannot reach Redis" in err
    status, _, err = await run_callsock("events")
    assert status == 2 and "--redis-url" in err


async def test_replacement_across_servers(
    tmp_path: Path, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    """A call reconnecting on server B closes its connection on A (4000) at once, told over pub/sub;
    A publishes its recording with endReason replaced; the events stream tells the whole story."""
    record_dir = tmp_path / "rec"
    async with two_servers(record_dir, "--redis-url", redis_server.url) as (_a, port_a, port_b):
        async with aiohttp.ClientSession() as client:
            first = StreamingCall(client, f"ws://127.0.0.1:{port_a}/call", 7)
            running = asyncio.create_task(first.run())
            await eventually(lambda: registered(redis_client, first.call_sid))
            holder_a = await registered(redis_client, first.call_sid)
            assert (await health(port_a))["cluster"]["callsRegistered"] == 1

            async with client.ws_connect(f"ws://127.0.0.1:{port_b}/call") as ws:
                second = TwilioPeer(ws, first.stream_sid, first.call_sid)
                await second.start()
                replaced_from = time.monotonic()
                await asyncio.wait_for(running, WAIT_SECONDS)
                assert first.answered_at is not None
                assert_replaced(first)
                # Milliseconds, told over pub/sub. Not a performance figure: the bound only tells
                # that apart from A finding out by itself at its next registry refresh (every
                # ttl/3, 10 s by default), and is generous enough for a busy machine.
                assert first.answered_at - replaced_from < 5.0
                assert await registered(redis_client, first.call_sid) not in (None, holder_a)
                await second.media(bytes(range(160)))
                await second.dtmf("5")
                await second.stop()
                assert (await receive_close(ws))[0] == 1000

        summaries = sorted(
            (json.loads(p.read_text()) for p in record_dir.glob("*/*.json")), key=lambda s: s["endReason"]
        )
        assert [s["endReason"] for s in summaries] == ["replaced", "stop"]
        await eventually(lambda: _no_call(redis_client, first.call_sid))
        assert "callsock_connections_replaced_total 1.0" in await metrics(port_a)

        async def both_recordings_ready() -> bool:
            events = await _events_of(redis_server.url, first.call_sid)
            return sum(kind == "recording-ready" for kind, _ in events) == 2

        # Each server's last event: once both are in Redis, so is everything before them, and the
        # servers may be killed (what a server had not yet written to Redis would be lost).
        await eventually(both_recordings_ready)

    events = await read_events(redis_server.url, 7, "--from-start")
    kinds = [(e["type"], e["data"].get("endReason")) for e in events]
    assert sorted(kinds, key=str) == sorted(
        [("started", None), ("started", None), ("stopped", "replaced"), ("recording-ready", "replaced"),
         ("dtmf", None), ("stopped", "stop"), ("recording-ready", "stop")], key=str,
    )  # fmt: skip
    assert {e["callSid"] for e in events} == {first.call_sid}
    assert len({e["server"] for e in events}) == 2
    for ready in (e for e in events if e["type"] == "recording-ready"):
        wav = record_dir / ready["data"]["files"]["inbound"]
        assert_valid_wav(wav)
        assert (
            json.loads((record_dir / ready["data"]["files"]["summary"]).read_text())["endReason"]
            == (ready["data"]["endReason"])
        )
    assert next(e for e in events if e["type"] == "dtmf")["data"] == {"digit": "5"}


async def _no_call(client: aioredis.Redis, call_sid: str) -> bool:
    return await registered(client, call_sid) is None


async def test_registration_expires_after_server_killed(
    tmp_path: Path, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    """A killed server's calls and heartbeat expire after --registry-ttl; nobody is told to
    replace them, and the cluster counts only the live server."""
    record_dir = tmp_path / "rec"
    ttl = ("--redis-url", redis_server.url, "--registry-ttl", "3")
    async with two_servers(record_dir, *ttl) as (a, port_a, port_b):
        async with aiohttp.ClientSession() as client:
            call = StreamingCall(client, f"ws://127.0.0.1:{port_a}/call", 9)
            running = asyncio.create_task(call.run())
            await eventually(lambda: registered(redis_client, call.call_sid))
            assert await redis_client.hlen("callsock:servers") == 2
            a.send_signal(signal.SIGKILL)
            await asyncio.gather(running, return_exceptions=True)
            assert await redis_client.pttl(f"callsock:call:{call.call_sid}") <= 3000
            await eventually(lambda: _no_call(redis_client, call.call_sid))  # after the 3 s ttl

            async def one_server() -> bool:
                servers: int = (await health(port_b))["cluster"]["servers"]
                return servers == 1

            await eventually(one_server)
            async with client.ws_connect(f"ws://127.0.0.1:{port_b}/call") as ws:
                again = TwilioPeer(ws, call.stream_sid, call.call_sid)
                await again.start()
                await eventually(lambda: registered(redis_client, call.call_sid))
                await again.stop()
                assert (await receive_close(ws))[0] == 1000
        assert "callsock_connections_replaced_total 0.0" in await metrics(port_b)


async def test_cluster_wide_connection_limit(
    tmp_path: Path, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    """--cluster-max-calls 3 over two servers: the fourth connection anywhere gets 1013."""
    record_dir = tmp_path / "rec"
    options = ("--redis-url", redis_server.url, "--cluster-max-calls", "3")
    async with two_servers(record_dir, *options) as (_a, port_a, port_b):
        async with aiohttp.ClientSession() as client:
            ports = [port_a, port_a, port_b]
            sockets = [await client.ws_connect(f"ws://127.0.0.1:{port}/call") for port in ports]
            peers = [TwilioPeer(ws, sid("MZ", n)) for n, ws in enumerate(sockets)]
            for peer in peers:
                await peer.start()
            # The 101 comes before admission: wait until the three are counted.
            await eventually(lambda: _counted(redis_client, 3))
            async with client.ws_connect(f"ws://127.0.0.1:{port_b}/call") as refused:
                assert await receive_close(refused) == (1013, "cluster at capacity")
            await peers[0].stop()
            assert (await receive_close(sockets[0]))[0] == 1000
            await eventually(lambda: _counted(redis_client, 2))
            async with client.ws_connect(f"ws://127.0.0.1:{port_b}/call") as admitted:
                fourth = TwilioPeer(admitted, sid("MZ", 99))
                await fourth.start()
                await fourth.stop()
                assert (await receive_close(admitted))[0] == 1000
            for ws in sockets:
                await ws.close()
        assert "callsock_connections_refused_total 1.0" in await metrics(port_b)


async def _counted(client: aioredis.Redis, expected: int) -> bool:
    """Whether the connections the servers last told the cluster they hold add up to ``expected``."""
    servers = (await client.hgetall("callsock:servers")).values()
    return sum(int(json.loads(entry)["calls"]) for entry in servers) == expected


async def test_redis_outage_keeps_calls_and_reregisters(
    tmp_path: Path, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    """Redis stopped during calls: nothing is dropped, the outage shows in /health and /metrics,
    new calls are taken; Redis back (empty): the calls are registered again, the events written
    meanwhile arrive, and replacement across servers works again."""
    record_dir = tmp_path / "rec"
    options = ("--redis-url", redis_server.url, "--registry-ttl", "3")
    async with two_servers(record_dir, *options) as (_a, port_a, port_b):
        async with aiohttp.ClientSession() as client:
            url_a = f"ws://127.0.0.1:{port_a}/call"
            calls = [StreamingCall(client, url_a, n) for n in range(3)]
            running = [asyncio.create_task(call.run()) for call in calls]
            for call in calls:
                await eventually(functools.partial(registered, redis_client, call.call_sid))

            redis_server.stop()

            async def unreachable() -> bool:
                state: str = (await health(port_a))["cluster"]["redis"]
                return state == "unreachable"

            await eventually(unreachable)
            text = await metrics(port_a)
            assert "callsock_redis_connected 0.0" in text
            assert re.search(r'callsock_redis_events_total\{event="errors"\} [1-9]', text)
            during = StreamingCall(client, url_a, 50)
            running.append(asyncio.create_task(during.run()))
            # A second of the outage, counted in audio the new call streamed (50 frames of 20 ms).
            await eventually(lambda: during.sent >= 50 or any(task.done() for task in running))
            assert not any(task.done() for task in running), "a call was dropped during the outage"

            redis_server.start()
            calls.append(during)

            async def all_registered() -> bool:
                values = [await registered(redis_client, call.call_sid) for call in calls]
                return all(values) and (await health(port_a))["cluster"]["redis"] == "connected"

            await eventually(all_registered, within=15)
            assert (await health(port_a))["cluster"]["callsRegistered"] == 4
            assert re.search(r'callsock_redis_events_total\{event="recovered"\} [1-9]', await metrics(port_a))

            async with client.ws_connect(f"ws://127.0.0.1:{port_b}/call") as ws:
                second = TwilioPeer(ws, calls[0].stream_sid, calls[0].call_sid)
                await second.start()
                await asyncio.wait_for(running[0], WAIT_SECONDS)
                assert_replaced(calls[0])
                await second.stop()
                assert (await receive_close(ws))[0] == 1000
            assert not any(task.done() for task in running[1:])
            for task in running[1:]:
                task.cancel()
            await asyncio.gather(*running[1:], return_exceptions=True)

            # Written while Redis was away, sent when it came back.
            async def started_event_arrived() -> bool:
                return ("started", during.call_sid) in await _events_of(redis_server.url, during.call_sid)

            await eventually(started_event_arrived)


async def _events_of(redis_url: str, call_sid: str) -> list[tuple[str, str]]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        entries: list[Any] = await client.xrange("callsock:events") or []
    finally:
        await client.aclose()
    return [(f["type"], f["callSid"]) for _, f in entries if f["callSid"] == call_sid]


async def test_events_consumer_group_resumes(tmp_path: Path, redis_server: RedisServer) -> None:
    """Readers in a consumer group share the stream: each event is handed out once, and a
    reader started again continues after what was acknowledged."""
    with serve_process(tmp_path / "rec", "--redis-url", redis_server.url) as (process, port):
        await wait_healthy(port, process=process)
        async with aiohttp.ClientSession() as client:
            for n in range(2):
                await StreamingCall(client, f"ws://127.0.0.1:{port}/call", n).run(seconds=0.2)

        async def six_events() -> bool:
            return len(await _events_of(redis_server.url, sid("CA", 0))) == 3 and (
                len(await _events_of(redis_server.url, sid("CA", 1))) == 3
            )

        await eventually(six_events)
    first = await read_events(redis_server.url, 3, "--group", "workers", "--from-start")
    second = await read_events(redis_server.url, 3, "--group", "workers")
    assert [e["type"] for e in first + second] == ["started", "stopped", "recording-ready"] * 2
    assert len({e["id"] for e in first + second}) == 6
    status, shown, err = await run_callsock(
        "events", "--redis-url", redis_server.url, "--from-start", "--count", "3"
    )
    assert status == 0, err
    lines = shown.splitlines()
    assert [line.split()[1] for line in lines] == ["started", "stopped", "recording-ready"]
    assert all(sid("CA", 0) in line for line in lines) and "endReason=stop" in lines[1]


def nginx_config(upstreams: list[int], port: int, cert: Path, key: Path) -> str:
    """deploy/nginx.conf, pointed at the test's servers, port and certificate."""
    config = (ROOT / "deploy" / "nginx.conf").read_text()
    servers = "".join(f"    server 127.0.0.1:{p} max_fails=0;\n" for p in upstreams)
    replacements = [
        (r"(    server 10\.0\.0\.\d+:8081 max_fails=0;\n)+", servers),
        (r"listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;"),
        (r"listen \[::\]:443 ssl;\n", ""),
        (r"ssl_certificate +\S+;", f"ssl_certificate {cert};"),
        (r"ssl_certificate_key +\S+;", f"ssl_certificate_key {key};"),
    ]
    for pattern, replacement in replacements:
        config, found = re.subn(pattern, replacement, config)
        assert found == 1, f"deploy/nginx.conf no longer has {pattern!r}"
    return f"events {{}}\nhttp {{\n{config}\n}}\n"


async def test_the_whole_path_through_nginx(
    tmp_path: Path,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    certificate: tuple[Path, Path, Path],
) -> None:
    """Twilio's view: TLS at nginx, the signed TwiML webhook, a signed wss:// call through to one
    of two servers, a reconnect of the call replacing it, and the recording."""
    cert, key, authority = certificate
    record_dir = tmp_path / "rec"
    options = ("--redis-url", redis_server.url, "--auth-token", TOKEN, "--require-signature")
    async with two_servers(record_dir, *options) as (_a, port_a, port_b):
        port = free_port()
        nginx = Nginx(tmp_path / "nginx", nginx_config([port_a, port_b], port, cert, key))
        nginx.start(port)
        try:
            await _call_through(port, ssl.create_default_context(cafile=str(authority)), redis_client)
        finally:
            nginx.stop()
    # Both connections of the call share its streamSid; each has its own files.
    summaries = [json.loads(p.read_text()) for p in record_dir.glob("*/*.json")]
    assert sorted(s["endReason"] for s in summaries) == ["replaced", "stop"]
    wavs = sorted(record_dir.glob("*/*.inbound.wav"))
    assert len(wavs) == 2 and all(assert_valid_wav(w) for w in wavs)


async def _call_through(port: int, context: ssl.SSLContext, redis_client: aioredis.Redis) -> None:
    base = f"https://127.0.0.1:{port}"
    form = {"CallSid": sid("CA", 1), "AccountSid": "AC" + "0" * 32}
    signed = {"X-Twilio-Signature": signature_for(TOKEN, f"{base}/twiml", form)}
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{base}/twiml", data=form, headers=signed, ssl=context) as response:
            assert response.status == 200
            twiml = await response.text()
        stream_url = f"wss://127.0.0.1:{port}/call"
        assert f'url="{stream_url}"' in twiml
        # Twilio sends the <Stream>'s <Parameter>s in start.customParameters: so does this call.
        params = {p.attrib["name"]: p.attrib["value"] for p in ET.fromstring(twiml).iter("Parameter")}
        upgrade = {"X-Twilio-Signature": signature_for(TOKEN, stream_url, {})}
        with pytest.raises(aiohttp.WSServerHandshakeError) as unsigned:
            await client.ws_connect(stream_url, ssl=context)
        assert unsigned.value.status == 403
        first = StreamingCall(client, stream_url, 1, params, ssl=context, headers=upgrade)
        running = asyncio.create_task(first.run())
        # The first connection streams, and holds the call in the cluster, before the second comes.
        await eventually(lambda: first.sent >= 10 or running.done())
        assert not running.done(), f"the first connection ended: {first.close_code} {first.close_reason}"
        await eventually(lambda: registered(redis_client, first.call_sid))
        async with client.ws_connect(stream_url, ssl=context, headers=upgrade) as ws:
            second = TwilioPeer(ws, first.stream_sid, first.call_sid)
            await second.start(params=params)
            await asyncio.wait_for(running, WAIT_SECONDS)
            assert_replaced(first)
            assert first.sent >= 10
            await second.media(bytes(range(160)) * 5)
            await second.stop()
            assert (await receive_close(ws))[0] == 1000
