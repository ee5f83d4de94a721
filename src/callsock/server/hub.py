"""The state a server shares across its connections, whatever framework carries them.

A :class:`CallService` holds the settings, the application's handlers, the open connections,
the call registry and the metrics. The aiohttp server and the ASGI adapter each own one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import Any

from ..call.app import App
from ..call.builtin_apps import builtin_app
from ..call.handlers import Handlers
from ..cluster.link import Cluster
from ..cluster.registry import CallRegistry
from ..observability.logs import get_logger, level_number
from ..observability.metrics import ServerMetrics
from ..protocol.errors import CLOSE_GOING_AWAY, CallsockError, ServerBusy
from ..recording.diskwriter import DiskWriter
from ..recording.instance import Instance
from .connection import Connection, Transport
from .settings import Settings

__all__ = ["CallService", "ShuttingDown"]


class ShuttingDown(CallsockError):
    """The server is stopping; open calls are closed with 1001."""

    close_code = CLOSE_GOING_AWAY

    def __init__(self) -> None:
        super().__init__("server shutting down")


class CallService:
    """Connections, the call registry, metrics and the application, for one server.

    Args:
        settings: what to serve and how.
        app: the application whose handlers run for each call; the built-ins the settings ask
            for (``echo``, ``greeting``) run after its handlers.
    """

    def __init__(self, settings: Settings, app: App | None = None) -> None:
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
        self.debug = level_number(settings.log_level) <= level_number("debug")
        self.log = get_logger()
        self.started_monotonic = time.monotonic()
        self._ids = itertools.count(1)
        # Names this start's partial recordings; its lock file tells recover it still runs.
        self.instance = Instance.claim(settings.record_dir) if settings.record else Instance.unrecorded()
        self.cluster: Cluster | None = None
        if settings.redis_url:
            self.cluster = Cluster(
                self,
                settings.redis_url,
                ttl=settings.registry_ttl,
                events_maxlen=settings.events_maxlen,
                max_calls=settings.cluster_max_calls,
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
        connection = Connection(self, transport, f"{self.instance.id}-{next(self._ids)}")
        self.connections[connection.id] = connection
        self._no_connections.clear()
        self.metrics.connections_opened += 1
        return connection

    def forget(self, connection: Connection) -> None:
        """Drop a closed connection, finishing its call if that has not happened yet."""
        connection.finish()
        if self.connections.pop(connection.id, None) is not None:
            self.metrics.connection_forgotten(connection)
        if not self.connections:
            self._no_connections.set()
        if self.cluster is not None:
            self.cluster.connection_closed()

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


def _combined_handlers(app: App | None, settings: Settings) -> Handlers:
    combined = App()
    for part in (app, builtin_app(settings)):
        if part is not None:
            combined.include(part)
    return combined.handlers
