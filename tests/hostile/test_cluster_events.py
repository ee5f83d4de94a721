"""Cluster events: one call's chatter is budgeted and can never trim another call's lifecycle away."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from callsock.cluster.link import MAX_ACTIVITY_EVENTS

from ..helpers import eventually, mark, receive_close, sid, stop, twilio_start
from ..processes import RedisServer
from .harness import beside_a_good_call, target

MARKS = 3 * MAX_ACTIVITY_EVENTS


async def test_a_mark_flood_is_budgeted_and_lifecycle_events_survive(tmp_path: Path) -> None:
    """3,000 marks from one call, streams capped at 50 entries: the call's activity stops at its
    budget (counted), and every call's started, stopped and recording-ready are still there."""
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    attacker = sid("MZ", 300)
    try:
        async with target(tmp_path, "--redis-url", redis.url, "--events-maxlen", "50") as t:

            async def attack() -> None:
                async with aiohttp.ClientSession() as client, client.ws_connect(t.ws_url) as ws:
                    await ws.send_str(twilio_start(attacker))
                    for n in range(MARKS):
                        await ws.send_str(mark(attacker, f"m{n}", seq=2 + n))
                    await ws.send_str(stop(attacker))
                    assert (await receive_close(ws))[0] == 1000

            await beside_a_good_call(t, attack(), n=301)
            client = aioredis.Redis.from_url(redis.url, decode_responses=True)
            try:

                async def lifecycle() -> list[dict[str, str]]:
                    entries: list[Any] = await client.xrange("callsock:events") or []
                    return [fields for _, fields in entries]

                wanted = {
                    (s, kind)
                    for s in (attacker, sid("MZ", 301))
                    for kind in ("started", "stopped", "recording-ready")
                }

                async def all_there() -> bool:
                    return wanted <= {(fields["streamSid"], fields["type"]) for fields in await lifecycle()}

                await eventually(all_there, what="both calls' lifecycle events")
                stopped = next(
                    json.loads(fields["data"])
                    for fields in await lifecycle()
                    if fields["type"] == "stopped" and fields["streamSid"] == attacker
                )
                activity = await client.xlen("callsock:events:activity")
            finally:
                await client.aclose()
            async with aiohttp.ClientSession() as http, http.get(t.http_url("/metrics")) as response:
                metrics = await response.text()
    finally:
        redis.stop()
    assert stopped["activityDropped"] == MARKS - MAX_ACTIVITY_EVENTS
    assert activity <= MAX_ACTIVITY_EVENTS
    budget = float(MARKS - MAX_ACTIVITY_EVENTS)
    assert f'callsock_cluster_events_dropped_total{{reason="budget"}} {budget}' in metrics
