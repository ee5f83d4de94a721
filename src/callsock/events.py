"""Reading the ``callsock:events`` stream: what ``callsock events`` shows a person.

Workers that act on calls (transcribe a finished recording, bill a call) read the same stream with
their own consumer group; this module is the reference reader. With ``group`` set it reads as a
member of that consumer group and acknowledges each entry once handed over, so a reader that is
stopped and started again continues where it left off; without, it tails the stream from now (or
from the first entry kept).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from .cluster import EVENTS_STREAM, redacted
from .errors import ConfigurationError

__all__ = ["CallEvent", "read_events"]

_BLOCK_MS = 1000


@dataclass(frozen=True, slots=True)
class CallEvent:
    """One entry of the events stream."""

    id: str
    type: str
    call_sid: str
    stream_sid: str
    server: str
    at: float
    data: dict[str, Any]

    @classmethod
    def from_entry(cls, entry_id: str, fields: dict[str, str]) -> CallEvent:
        """Build an event from a stream entry's fields (as the cluster writes them)."""
        return cls(
            id=entry_id,
            type=fields.get("type", ""),
            call_sid=fields.get("callSid", ""),
            stream_sid=fields.get("streamSid", ""),
            server=fields.get("server", ""),
            at=float(fields.get("at") or 0.0),
            data=json.loads(fields["data"]) if fields.get("data") else {},
        )

    def to_dict(self) -> dict[str, Any]:
        """The event as one JSON line of ``callsock events --json``."""
        return {
            "id": self.id,
            "type": self.type,
            "callSid": self.call_sid,
            "streamSid": self.stream_sid,
            "server": self.server,
            "at": self.at,
            "data": self.data,
        }


async def read_events(
    redis_url: str,
    *,
    from_start: bool = False,
    group: str | None = None,
    consumer: str = "callsock-events",
) -> AsyncGenerator[CallEvent, None]:
    """Yield the stream's events as they arrive, until the caller stops iterating.

    Args:
        redis_url: the cluster's Redis.
        from_start: begin with the oldest entry kept instead of the next one written (for a new
            group, where the group starts).
        group: read as a member of this consumer group (created if missing); each event is
            acknowledged once the caller has it (asks for the next one, or stops).
        consumer: this reader's name within ``group``.

    Raises:
        ConfigurationError: Redis cannot be reached.
    """
    client = aioredis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=_BLOCK_MS / 1000 + 5)
    handed: str | None = None
    try:
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            raise ConfigurationError(f"cannot reach Redis at {redacted(redis_url)}: {exc}") from exc
        reader = _Reader(client, group, consumer)
        await reader.begin("0-0" if from_start else "$")
        while True:
            for entry_id, fields in await reader.batch():
                handed = entry_id
                yield CallEvent.from_entry(entry_id, fields)
                await reader.done(entry_id)
                handed = None
    except GeneratorExit:  # the caller stopped after taking the last event handed over
        if handed is not None:
            await reader.done(handed)
        raise
    finally:
        await client.aclose()


class _Reader:
    """Reads batches of entries: as a tail (XREAD), or as a group member (XREADGROUP + XACK)."""

    def __init__(self, client: aioredis.Redis, group: str | None, consumer: str) -> None:
        self.client, self.group, self.consumer = client, group, consumer
        self.last_id = "0-0"
        # A group member first takes what it was handed before and did not acknowledge.
        self.pending: str | None = "0-0"

    async def begin(self, start: str) -> None:
        """Position the reader: ``"0-0"`` for the oldest entry kept, ``"$"`` for the next one."""
        if self.group is not None:
            try:
                await self.client.xgroup_create(EVENTS_STREAM, self.group, id=start, mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):  # an existing group keeps its position
                    raise
        elif start == "$":  # "$" means "after the newest" for one XREAD only: pin it down
            newest = await self.client.xrevrange(EVENTS_STREAM, count=1) or []
            self.last_id = str(newest[0][0]) if newest else "0-0"

    async def batch(self) -> list[tuple[str, dict[str, str]]]:
        """The next entries (empty after a second with none)."""
        if self.group is None:
            reply = await self.client.xread({EVENTS_STREAM: self.last_id}, block=_BLOCK_MS, count=100)
            entries = _entries(reply)
            if entries:
                self.last_id = entries[-1][0]
            return entries
        grouped = await self.client.xreadgroup(
            self.group, self.consumer, {EVENTS_STREAM: self.pending or ">"}, block=_BLOCK_MS, count=100
        )
        entries = _entries(grouped)
        if self.pending is not None:
            if not entries:
                self.pending = None
            else:
                self.pending = entries[-1][0]
        # A pending entry trimmed from the stream comes back without fields: acknowledge it.
        for entry_id, fields in entries:
            if not fields:
                await self.done(entry_id)
        return [(entry_id, fields) for entry_id, fields in entries if fields]

    async def done(self, entry_id: str) -> None:
        """Acknowledge an entry handed over (group members only)."""
        if self.group is not None:
            await self.client.xack(EVENTS_STREAM, self.group, entry_id)


def _entries(reply: Any) -> list[tuple[str, dict[str, str]]]:
    """The entries of an XREAD/XREADGROUP reply (one stream), oldest first."""
    streams = reply.values() if isinstance(reply, dict) else (batch for _stream, batch in reply or [])
    return [(entry_id, fields) for batch in streams for entry_id, fields in batch]
