"""Reading the call event streams: what ``callsock events`` shows a person.

``callsock:events`` holds each call's lifecycle (started, stopped, recording-ready) and
``callsock:events:activity`` what happens during it (dtmf, mark); both are read, merged by time.

Workers that act on calls (transcribe a finished recording, bill a call) read the same streams with
their own consumer group; this module is the reference reader. With ``group`` set it reads as a
member of that consumer group and acknowledges each entry once handed over, so a reader that is
stopped and started again continues where it left off; without, it tails the stream from now (or
from the first entry kept).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Final

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from ..protocol.errors import ConfigurationError
from .link import ACTIVITY_STREAM, EVENTS_STREAM, redacted

__all__ = ["CallEvent", "read_events"]

_BLOCK_MS = 1000
STREAMS: Final = (EVENTS_STREAM, ACTIVITY_STREAM)


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
    handed: tuple[str, str] | None = None
    try:
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            raise ConfigurationError(f"cannot reach Redis at {redacted(redis_url)}: {exc}") from exc
        reader = _Reader(client, group, consumer)
        await reader.begin("0-0" if from_start else "$")
        while True:
            for stream, entry_id, fields in await reader.batch():
                handed = (stream, entry_id)
                yield CallEvent.from_entry(entry_id, fields)
                await reader.done(stream, entry_id)
                handed = None
    except GeneratorExit:  # the caller stopped after taking the last event handed over
        if handed is not None:
            await reader.done(*handed)
        raise
    finally:
        await client.aclose()


class _Reader:
    """Reads batches of entries from both streams, keeping a position in each.

    As a tail with XREAD, or as a group member with XREADGROUP and XACK.
    """

    def __init__(self, client: aioredis.Redis, group: str | None, consumer: str) -> None:
        self.client, self.group, self.consumer = client, group, consumer
        self.last_ids = dict.fromkeys(STREAMS, "0-0")
        # A group member first takes what it was handed before and did not acknowledge.
        self.pending: dict[str, str | None] = dict.fromkeys(STREAMS, "0-0")

    async def begin(self, start: str) -> None:
        """Position the reader: ``"0-0"`` for the oldest entries kept, ``"$"`` for the next ones."""
        for stream in STREAMS:
            if self.group is not None:
                try:
                    await self.client.xgroup_create(stream, self.group, id=start, mkstream=True)
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):  # an existing group keeps its position
                        raise
            elif start == "$":  # "$" means "after the newest" for one XREAD only: pin it down
                newest = await self.client.xrevrange(stream, count=1) or []
                self.last_ids[stream] = str(newest[0][0]) if newest else "0-0"

    async def batch(self) -> list[tuple[str, str, dict[str, str]]]:
        """The next entries as ``(stream, id, fields)``, oldest first (empty after a second with none)."""
        if self.group is None:
            positions: dict[Any, Any] = dict(self.last_ids)
            entries = _entries(await self.client.xread(positions, block=_BLOCK_MS, count=100))
            for stream, entry_id, _ in entries:
                self.last_ids[stream] = entry_id
            return _in_order(entries)
        wanted: dict[Any, Any] = {stream: pending or ">" for stream, pending in self.pending.items()}
        entries = _entries(
            await self.client.xreadgroup(self.group, self.consumer, wanted, block=_BLOCK_MS, count=100)
        )
        for stream, pending in self.pending.items():
            if pending is not None:
                handed = [entry_id for s, entry_id, _ in entries if s == stream]
                self.pending[stream] = handed[-1] if handed else None
        # A pending entry trimmed from the stream comes back without fields: acknowledge it.
        for stream, entry_id, fields in entries:
            if not fields:
                await self.done(stream, entry_id)
        return _in_order([entry for entry in entries if entry[2]])

    async def done(self, stream: str, entry_id: str) -> None:
        """Acknowledge an entry handed over (group members only)."""
        if self.group is not None:
            await self.client.xack(stream, self.group, entry_id)


def _entries(reply: Any) -> list[tuple[str, str, dict[str, str]]]:
    """The entries of an XREAD/XREADGROUP reply, with their stream's name."""
    streams = reply.items() if isinstance(reply, dict) else (reply or [])
    return [(str(stream), entry_id, fields) for stream, batch in streams for entry_id, fields in batch]


def _in_order(entries: list[tuple[str, str, dict[str, str]]]) -> list[tuple[str, str, dict[str, str]]]:
    """Entries of both streams merged by time (an ID is milliseconds, then a sequence number)."""
    return sorted(entries, key=lambda entry: tuple(int(part) for part in entry[1].split("-")))
