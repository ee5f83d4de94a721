"""Several callsock servers behind a load balancer, coordinated through Redis.

With ``--redis-url``, each server keeps its own calls as before and also:

- registers each call under ``callsock:call:<callSid>`` (value: server id and connection id),
  with a TTL it refreshes while the call lives, so a dead server cannot hold a call forever;
- when a call it starts was held by another server, tells that server on its channel
  ``callsock:server:<id>`` (pub/sub), which closes its connection with 4000 "replaced";
- appends each call's lifecycle events (started, stopped, recording-ready) to the Redis Stream
  ``callsock:events`` and what happens during calls (dtmf, mark; at most ``MAX_ACTIVITY_EVENTS``
  a call) to ``callsock:events:activity``, each capped at ``--events-maxlen`` entries, for
  workers reading with consumer groups (``callsock events`` tails both for a person);
- with ``--cluster-max-calls``, admits a connection only while the live servers' connections add
  up to less than the limit (an atomic script over the ``callsock:servers`` hash, in which each
  server's count expires with its heartbeat).

Redis unreachable at start is an error. Redis lost later is not: the server keeps serving with
its local registry (so one-connection-per-call still holds on each server), logs and counts the
outage, and when Redis is back it registers its calls again. Everything here runs off the
per-message path, in background tasks.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import time
from collections import deque
from typing import Any, Final, Protocol
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from ..protocol.errors import ConfigurationError
from ..protocol.stream import StreamInfo

__all__ = [
    "ACTIVITY_STREAM",
    "EVENTS_STREAM",
    "LIFECYCLE_EVENTS",
    "MAX_ACTIVITY_EVENTS",
    "Cluster",
    "ClusterCall",
    "ClusterHost",
    "redacted",
]

EVENTS_STREAM: Final = "callsock:events"
"""Each call's lifecycle: ``started``, ``stopped``, ``recording-ready``."""
ACTIVITY_STREAM: Final = "callsock:events:activity"
"""What happens during calls (``dtmf``, ``mark``): a stream of its own, so no amount of it can
trim the lifecycle events away."""
LIFECYCLE_EVENTS: Final = frozenset({"started", "stopped", "recording-ready"})
SERVERS_HASH: Final = "callsock:servers"
CALL_PREFIX: Final = "callsock:call:"
CHANNEL_PREFIX: Final = "callsock:server:"
_EVENTS_BUFFERED: Final = 10_000

# Delete the call's key only if it still names this connection (a newer one may own it now).
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Extend the TTL of the calls that still name this server's connections.
_REFRESH: Final = """
local kept = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i + 1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[1]); kept = kept + 1
  end
end
return kept
"""
# Admit a connection if the live servers' connections, this one's new count included, stay
# within the limit. ARGV: server id, its count with the new connection, limit, now, ttl.
_ADMIT: Final = """
local total = tonumber(ARGV[2])
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  if entries[i] ~= ARGV[1] then
    local entry = cjson.decode(entries[i + 1])
    if entry.expires > tonumber(ARGV[4]) then total = total + entry.calls
    else redis.call('HDEL', KEYS[1], entries[i]) end
  end
end
if total > tonumber(ARGV[3]) then return 0 end
local own = {calls = tonumber(ARGV[2]), expires = tonumber(ARGV[4]) + tonumber(ARGV[5])}
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(own))
return 1
"""


MAX_ACTIVITY_EVENTS: Final = 1000
"""The most dtmf and mark events one call puts on the activity stream; more are counted."""
ACTIVITY_EVENTS: Final = frozenset({"dtmf", "mark"})


class ClusterCall(Protocol):
    """What the cluster reads of a connection and its call (a ``Connection`` is one)."""

    @property
    def id(self) -> str:
        """The connection's id."""

    @property
    def stream(self) -> StreamInfo | None:
        """What ``start`` said."""

    @property
    def proven(self) -> bool:
        """Whether its ``start`` carried the call's stream token."""


class ClusterHost(Protocol):
    """What the cluster needs of its server (a hub is one)."""

    log: structlog.typing.FilteringBoundLogger

    def connection_count(self) -> int:
        """Connections open on this server now."""

    def held_calls(self) -> list[tuple[str, str]]:
        """The calls this server holds, as ``(call key, connection id)``."""

    def replace(self, connection_id: str) -> bool:
        """Close a connection another server's took over (4000); False if it is gone already."""


def _outcome(summary: dict[str, Any]) -> dict[str, Any]:
    return {key: summary[key] for key in ("endReason", "error", "durationMs")}


def redacted(url: str) -> str:
    """The Redis URL without its password, fit for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + parts.netloc.rpartition("@")[2]))


class Cluster:
    """One server's link to the others through Redis.

    Args:
        host: the server's side: its calls, and replacing one (a hub is one).
        redis_url: where Redis is, e.g. ``redis://127.0.0.1:6379/0``.
        ttl: seconds a call's registration and a server's heartbeat last unless refreshed.
        events_maxlen: the length the events stream is capped at (approximately).
        max_calls: the cluster-wide connection limit, or ``None``.
    """

    def __init__(
        self,
        host: ClusterHost,
        redis_url: str,
        *,
        ttl: float = 30.0,
        events_maxlen: int = 10_000,
        max_calls: int | None = None,
    ) -> None:
        self.host = host
        self.redis_url = redis_url
        self.ttl = ttl
        self.events_maxlen = events_maxlen
        self.max_calls = max_calls
        self.server_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.connected = False
        self.errors = 0
        self.events_dropped = {"outage": 0, "budget": 0}
        """Events not sent: buffered past 10,000 during an outage, or past a call's budget."""
        self.cluster_calls = 0
        self.cluster_servers = 0
        self._admitting = 0
        self._count_pending = False
        self._recovery = asyncio.Lock()
        self._ttl_ms = int(ttl * 1000)
        self._redis: aioredis.Redis | None = None
        # Buffered until sent (during an outage too), one queue per stream for the same reason.
        self._events: dict[str, deque[dict[str, str]]] = {
            stream: deque(maxlen=_EVENTS_BUFFERED) for stream in (EVENTS_STREAM, ACTIVITY_STREAM)
        }
        self._events_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self.redis_events = {"errors": 0, "recovered": 0}
        """Redis outages and recoveries."""
        self._activity: dict[str, int] = {}  # activity events sent, by connection id (the budget)
        self._dropped: dict[str, int] = {}  # and those past it
        self._log = host.log.bind(serverId=self.server_id)

    @property
    def channel(self) -> str:
        """The pub/sub channel other servers tell this one about its calls on."""
        return CHANNEL_PREFIX + self.server_id

    async def start(self) -> None:
        """Connect and register; refuse to start if Redis cannot be reached.

        Raises:
            ConfigurationError: Redis does not answer.
        """
        self._redis = aioredis.Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=2.0)
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            await self._redis.aclose()
            raise ConfigurationError(f"cannot reach Redis at {redacted(self.redis_url)}: {exc}") from exc
        self.connected = True
        await self._heartbeat()
        self._tasks = [
            asyncio.create_task(self._listen(), name="callsock-cluster-listen"),
            asyncio.create_task(self._keep_alive(), name="callsock-cluster-heartbeat"),
            asyncio.create_task(self._publish_events(), name="callsock-cluster-events"),
        ]
        self._log.info("cluster joined", redis=redacted(self.redis_url))

    async def stop(self) -> None:
        """Send the events still buffered, leave the cluster and disconnect."""
        await self._flush_events()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._background:
            await asyncio.wait(self._background, timeout=2.0)
        if self._redis is not None:
            try:
                await self._redis.hdel(SERVERS_HASH, self.server_id)
            except (RedisError, OSError):
                pass
            await self._redis.aclose()

    # The hub's observer (synchronous; the Redis work happens in the background).

    def call_started(self, call: ClusterCall) -> None:
        """A call started here: register it, and tell the lifecycle stream.

        Registering replaces any holder on another server, so only a start that proved its call
        (its stream token) registers.
        """
        stream = call.stream
        assert stream is not None
        if call.proven:  # a start without its stream token may not take the call from another server
            self._spawn(self._claim(stream.call_key, call.id))
        self.event(
            "started",
            stream.call_sid,
            stream.stream_sid,
            dialect=stream.dialect,
            tracks=list(stream.tracks),
            customParameters=stream.custom_parameters,
        )

    def call_event(self, call: ClusterCall, kind: str, data: dict[str, Any]) -> None:
        """``dtmf`` and ``mark`` go to the activity stream, ``MAX_ACTIVITY_EVENTS`` a call at most."""
        stream = call.stream
        if kind not in ACTIVITY_EVENTS or stream is None:
            return
        sent = self._activity.get(call.id, 0)
        if sent == MAX_ACTIVITY_EVENTS:
            self.events_dropped["budget"] += 1
            self._dropped[call.id] = self._dropped.get(call.id, 0) + 1
            return
        self._activity[call.id] = sent + 1
        self.event(kind, stream.call_sid, stream.stream_sid, **data)

    def call_finished(self, call: ClusterCall, summary: dict[str, Any]) -> None:
        """Unregister the call (if this connection still holds it) and tell the lifecycle stream."""
        stream = call.stream
        assert stream is not None
        self._spawn(self._release(stream.call_key, call.id))
        self.event(
            "stopped",
            stream.call_sid,
            stream.stream_sid,
            activityDropped=self._dropped.pop(call.id, 0),
            **_outcome(summary),
        )

    def call_published(self, call: ClusterCall, summary: dict[str, Any], files: dict[str, str]) -> None:
        """Tell the lifecycle stream where the recording is."""
        stream = call.stream
        assert stream is not None
        self.event("recording-ready", stream.call_sid, stream.stream_sid, files=files, **_outcome(summary))

    def connection_forgotten(self, call: ClusterCall) -> None:
        """A connection ended: with a cluster-wide limit, tell the others the new count soon."""
        self._activity.pop(call.id, None)
        self._dropped.pop(call.id, None)
        if self.max_calls is not None and not self._count_pending:
            self._count_pending = True
            self._spawn(self._publish_count())

    def event(self, kind: str, call_sid: str | None, stream_sid: str | None, **data: Any) -> None:
        """Queue an event for its stream (lifecycle or activity; past 10,000 buffered, the oldest go)."""
        queue = self._events[EVENTS_STREAM if kind in LIFECYCLE_EVENTS else ACTIVITY_STREAM]
        if len(queue) == queue.maxlen:
            self.events_dropped["outage"] += 1
        entry = {
            "type": kind,
            "callSid": call_sid or "",
            "streamSid": stream_sid or "",
            "server": self.server_id,
            "at": f"{time.time():.3f}",
        }
        if data:
            entry["data"] = json.dumps(data, separators=(",", ":"))
        queue.append(entry)
        self._events_ready.set()

    async def admit(self) -> bool:
        """Whether the cluster-wide limit allows one more connection (True when there is none).

        When Redis is down the limit cannot be checked and only the server's own applies.
        """
        if self.max_calls is None or not self.connected or self._redis is None:
            return True
        # Connections being admitted concurrently count too, or a burst could overshoot.
        self._admitting += 1
        try:
            own = self.host.connection_count() + self._admitting
            admitted = await self._redis.eval(
                _ADMIT, 1, SERVERS_HASH, self.server_id, own, self.max_calls, time.time(), self.ttl
            )
        except (RedisError, OSError) as exc:
            self._lost(exc)
            return True
        finally:
            self._admitting -= 1
        return bool(admitted)

    def state(self) -> dict[str, Any]:
        """The cluster's state as ``/health`` shows it."""
        return {
            "redis": "connected" if self.connected else "unreachable",
            "serverId": self.server_id,
            "callsRegistered": len(self._held()) if self.connected else 0,
            "servers": self.cluster_servers,
            "clusterConnections": self.cluster_calls,
        }

    # Background work.

    async def _claim(self, call_key: str, connection_id: str) -> None:
        if not self.connected or self._redis is None:
            return
        value = f"{self.server_id} {connection_id}"
        try:
            previous = await self._redis.set(CALL_PREFIX + call_key, value, px=self._ttl_ms, get=True)
            if isinstance(previous, str) and previous != value:
                server_id, _, old_connection = previous.partition(" ")
                if server_id != self.server_id:
                    message = json.dumps(
                        {"type": "replace", "connection": old_connection, "callKey": call_key}
                    )
                    await self._redis.publish(CHANNEL_PREFIX + server_id, message)
        except (RedisError, OSError) as exc:
            self._lost(exc)

    async def _release(self, call_key: str, connection_id: str) -> None:
        if not self.connected or self._redis is None:
            return
        try:
            await self._redis.eval(_RELEASE, 1, CALL_PREFIX + call_key, f"{self.server_id} {connection_id}")
        except (RedisError, OSError) as exc:
            self._lost(exc)

    async def _listen(self) -> None:
        """Take other servers' messages; reconnect (and re-register) after an outage."""
        while True:
            try:
                assert self._redis is not None
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    if not self.connected:
                        await self._recovered()
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self._message(message.get("data", ""))
            except (RedisError, OSError) as exc:
                self._lost(exc)
                await asyncio.sleep(1.0)

    def _message(self, raw: str) -> None:
        try:
            message = json.loads(raw)
        except ValueError:
            return
        if message.get("type") == "replace":
            if self.host.replace(str(message.get("connection"))):
                self._log.info("replaced by a connection on another server", callKey=message.get("callKey"))

    async def _keep_alive(self) -> None:
        """Refresh this server's calls and heartbeat a few times per TTL; notice Redis coming back."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                assert self._redis is not None
                if not self.connected:
                    await self._redis.ping()
                    await self._recovered()
                await self._refresh_calls()
                await self._heartbeat()
            except (RedisError, OSError) as exc:
                self._lost(exc)

    async def _refresh_calls(self) -> None:
        held = self._held()
        if held and self._redis is not None:
            keys = [CALL_PREFIX + key for key, _ in held]
            values = [f"{self.server_id} {connection_id}" for _, connection_id in held]
            await self._redis.eval(_REFRESH, len(keys), *keys, self._ttl_ms, *values)

    async def _publish_count(self) -> None:
        # Connections closing together share one update.
        self._count_pending = False
        if self.connected and self._redis is not None:
            try:
                await self._set_count()
            except (RedisError, OSError) as exc:
                self._lost(exc)

    async def _set_count(self) -> None:
        assert self._redis is not None
        entry = json.dumps({"calls": self.host.connection_count(), "expires": time.time() + self.ttl})
        await self._redis.hset(SERVERS_HASH, self.server_id, entry)

    async def _heartbeat(self) -> None:
        assert self._redis is not None
        await self._set_count()
        now = time.time()
        servers = [json.loads(v) for v in (await self._redis.hgetall(SERVERS_HASH)).values()]
        live = [server for server in servers if server["expires"] > now]
        self.cluster_servers = len(live)
        self.cluster_calls = sum(int(server["calls"]) for server in live)

    async def _recovered(self) -> None:
        """Redis answers again: register this server's calls (unless taken meanwhile)."""
        assert self._redis is not None
        async with self._recovery:  # the listener and the heartbeat may both notice
            if not self.connected:
                await self._register_again()

    async def _register_again(self) -> None:
        assert self._redis is not None
        for call_key, connection_id in self._held():
            await self._redis.set(
                CALL_PREFIX + call_key, f"{self.server_id} {connection_id}", px=self._ttl_ms, nx=True
            )
        await self._heartbeat()
        self.connected = True
        self._events_ready.set()  # send what was buffered during the outage
        self.redis_events["recovered"] += 1
        self._log.warning("redis reachable again; calls registered again", calls=len(self._held()))

    def _held(self) -> list[tuple[str, str]]:
        return self.host.held_calls()

    async def _publish_events(self) -> None:
        while True:
            await self._events_ready.wait()
            self._events_ready.clear()
            if self.connected:
                await self._flush_events()

    async def _flush_events(self) -> None:
        if self._redis is None or not self.connected or not any(self._events.values()):
            return
        batches = {stream: list(queue) for stream, queue in self._events.items()}
        for queue in self._events.values():
            queue.clear()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for stream, batch in batches.items():
                    for entry in batch:
                        fields: dict[Any, Any] = dict(entry)
                        pipe.xadd(stream, fields, maxlen=self.events_maxlen, approximate=True)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            # Put each batch back before what arrived meanwhile; past the bound the oldest go.
            for stream, batch in batches.items():
                queue = self._events[stream]
                kept = deque(batch + list(queue), maxlen=_EVENTS_BUFFERED)
                self.events_dropped["outage"] += len(batch) + len(queue) - len(kept)
                self._events[stream] = kept
            self._lost(exc)

    def _lost(self, exc: BaseException) -> None:
        self.errors += 1
        self.redis_events["errors"] += 1
        if self.connected:
            self.connected = False
            self._log.error("redis unreachable; serving with the local registry", exc=str(exc))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
