"""What a server's connections share, whatever framework carries them: the hub.

A :class:`Hub` holds the settings, the application's handlers, the open connections, the call
registry, the recording thread, the metrics and (with ``--redis-url``) the cluster link. It gives
each connection what it needs explicitly (:class:`~callsock.server.connection.Shared`), and
follows calls as their observers do: metrics and the cluster subscribe to what connections tell.
The aiohttp server and the ASGI adapter each own one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from ..call.builtin import builtin_handlers
from ..call.handlers import Handlers
from ..cluster.link import Cluster
from ..cluster.registry import CallRegistry
from ..observability.logs import get_logger, level_number
from ..observability.metrics import ServerMetrics
from ..protocol.errors import Replaced, ServerBusy, ShuttingDown
from ..recording.diskwriter import DiskWriter
from ..recording.instance import Instance
from ..recording.layout import partial_dir
from ..recording.recorder import CallRecorder
from ..recording.sinks import Sink, SummarySink, WavSink
from .connection import Connection, Shared, Transport
from .observers import Observers
from .settings import Settings

__all__ = ["Application", "Hub"]


class Application(Protocol):
    """What a hub runs for each call (an :class:`~callsock.server.app.App` is one)."""

    handlers: Handlers
    sinks: list[Callable[[], Sink]]


class Hub:
    """Connections, the call registry, metrics and the application, for one server.

    Args:
        settings: what to serve and how.
        app: the application whose handlers (and recording formats) run for each call; the
            built-ins the settings ask for (``echo``, ``greeting``) run after its handlers.
    """

    def __init__(self, settings: Settings, app: Application | None = None) -> None:
        self.settings = settings
        self.app = app
        self.handlers: Handlers = _combined_handlers(app, settings)
        self.writer = DiskWriter()
        self.draining = False
        self._no_connections = asyncio.Event()
        self._no_connections.set()
        self.connections: dict[str, Connection] = {}
        self.registry: CallRegistry[Connection] = CallRegistry()
        self.metrics = ServerMetrics(lambda: list(self.connections.values()), lambda: self.cluster)
        self.log = get_logger()
        self.started_monotonic = time.monotonic()
        self._ids = itertools.count(1)
        # Names this start's partial recordings; its lock file tells recover it still runs.
        self.instance = Instance.claim(settings.record_dir) if settings.record else Instance.unrecorded()
        self.observers = Observers([self.metrics])
        self.cluster: Cluster | None = None
        if settings.redis_url:
            self.cluster = Cluster(
                self,
                settings.redis_url,
                ttl=settings.registry_ttl,
                events_maxlen=settings.events_maxlen,
                max_calls=settings.cluster_max_calls,
            )
            self.observers.add(self.cluster)
        self.shared = Shared(
            settings=settings,
            handlers=self.handlers,
            registry=self.registry,
            observers=self.observers,
            recording=self._recording,
            observe_processing=self.metrics.observe_processing,
            debug=level_number(settings.log_level) <= level_number("debug"),
        )

    def warn_if_unsigned(self) -> None:
        """Log, once at start, that anyone can connect when no auth token is set."""
        if not self.settings.auth_token:
            self.log.warning(
                "no Twilio auth token: signatures are not checked and anyone can connect; "
                "set --auth-token or TWILIO_AUTH_TOKEN (--require-signature makes it mandatory)"
            )

    def admit(self, transport: Transport) -> Connection | ServerBusy:
        """Open a connection on ``transport``, or return the refusal if at ``max_calls``."""
        if len(self.connections) >= self.settings.max_calls:
            busy = ServerBusy(self.settings.max_calls)
            self.metrics.connections_refused += 1
            self.log.warning("connection refused", reason=str(busy), closeCode=busy.close_code)
            return busy
        connection = Connection(transport, f"{self.instance.id}-{next(self._ids)}", self.shared)
        self.connections[connection.id] = connection
        self._no_connections.clear()
        self.metrics.connections_opened += 1
        return connection

    def forget(self, connection: Connection) -> None:
        """Drop a closed connection, finishing its call if that has not happened yet."""
        connection.finish()
        if self.connections.pop(connection.id, None) is not None:
            self.observers.connection_forgotten(connection)
        if not self.connections:
            self._no_connections.set()

    # What the cluster link needs of its server (callsock.cluster.link.ClusterHost).

    def connection_count(self) -> int:
        """Connections open now."""
        return len(self.connections)

    def held_calls(self) -> list[tuple[str, str]]:
        """The calls this server's connections hold, as ``(call key, connection id)``."""
        held = []
        for connection in self.connections.values():
            stream = connection.stream
            if stream is not None and self.registry.holder(stream.call_key) is connection:
                held.append((stream.call_key, connection.id))
        return held

    def replace(self, connection_id: str) -> bool:
        """A connection on another server took this one's call over: close it (4000)."""
        connection = self.connections.get(connection_id)
        if connection is None:
            return False
        connection.end("replaced", Replaced())
        return True

    def _recording(self, connection_id: str, log: structlog.typing.FilteringBoundLogger) -> CallRecorder:
        """A call's recorder: the WAVs, the application's formats, and the summary, last."""
        settings = self.settings
        sinks: list[Sink] = []
        if settings.record:
            sinks = [WavSink(), *(make() for make in (self.app.sinks if self.app else ())), SummarySink()]
        return CallRecorder(
            settings.record_dir,
            partial_dir(settings.record_dir, connection_id),
            sinks,
            self.writer,
            buffer_bytes=settings.buffer_bytes,
            flush_seconds=settings.flush_seconds,
            log=log,
        )

    def shut_down(self) -> None:
        """Close every open connection with 1001; each call is finished with ``shutdown``."""
        self.draining = True
        for connection in list(self.connections.values()):
            connection.end("shutdown", ShuttingDown())

    async def drain(self, seconds: float, hurry: asyncio.Event | None = None) -> None:
        """Refuse new calls and wait up to ``seconds`` (or until ``hurry``) for the open ones to end."""
        self.draining = True
        if not self.connections or seconds <= 0:
            return
        self.log.info("draining", connections=len(self.connections), drainSeconds=seconds)
        waits = [asyncio.ensure_future(self._no_connections.wait())]
        if hurry is not None:
            waits.append(asyncio.ensure_future(hurry.wait()))
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()

    async def wait_closed(self, seconds: float) -> None:
        """Wait up to ``seconds`` for every connection to be gone, then for the recordings to be written."""
        started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_connections.wait(), seconds)
        remaining = max(seconds - (time.monotonic() - started), 1.0)
        written = await asyncio.to_thread(self.writer.close, remaining)
        if written:
            self.instance.release()
        else:  # the lock goes with the process: recover can then take the rest
            self.log.error("recordings still being written at exit; run callsock recover on the record dir")

    def health(self) -> dict[str, Any]:
        """Return liveness and load, as ``GET /health`` shows them."""
        return {
            "status": "draining" if self.draining else "ok",
            "activeCalls": len(self.registry),
            "connections": len(self.connections),
            "tasks": len(asyncio.all_tasks()),
            "uptimeSeconds": round(time.monotonic() - self.started_monotonic, 3),
            **({"cluster": self.cluster.state()} if self.cluster is not None else {}),
        }

    def calls(self) -> list[dict[str, Any]]:
        """Return the open connections, as ``GET /calls`` shows them."""
        return [c.describe() for c in self.connections.values()]


def _combined_handlers(app: Application | None, settings: Settings) -> Handlers:
    """The application's handlers, then those of the built-ins the settings ask for."""
    handlers = Handlers()
    if app is not None:
        handlers.extend(app.handlers)
    handlers.extend(builtin_handlers(echo_calls=settings.echo, greeting=settings.greeting))
    return handlers
