"""An ASGI adapter: the same calls, handlers and recordings inside a FastAPI or Starlette app.

``App.asgi()`` returns an :class:`ASGIAdapter`. Mount it where Twilio's ``<Stream url>`` points::

    api = FastAPI()
    calls = app.asgi()
    api.router.routes.append(WebSocketRoute("/call", calls))   # starlette.routing

Every WebSocket that reaches the adapter is a Media Stream; a plain HTTP request gets 426.
(``api.mount("/call", calls)`` works too, but serves ``/call/`` and below, not ``/call``.)
Routed or mounted applications get no lifespan events from Starlette, so call
:meth:`ASGIAdapter.shutdown` from the host application's own shutdown to close calls with 1001
and publish their recordings.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import structlog

from ..observability.logs import configure_logging
from ..protocol.errors import CallEnded, ConfigurationError, ServerBusy
from .connection import Connection
from .hub import Application, Hub
from .settings import Settings

__all__ = ["ASGIAdapter"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# uvicorn closes open WebSockets with 1012 (service restart) when it shuts down, before the
# application's lifespan shutdown runs: those calls end because the server is stopping.
_SERVICE_RESTART = 1012
_QUEUE_LIMIT = 64 * 1024

_UPGRADE_REQUIRED = b"426 Upgrade Required: this path serves Twilio Media Streams over WebSocket.\n"


class _ASGITransport:
    """The :class:`~callsock.connection.Transport` of an ASGI WebSocket.

    ASGI's ``send`` is a coroutine, so writes are queued and a task sends them, in order.
    """

    def __init__(self, send: Send) -> None:
        self._send = send
        self._queue: deque[Message] = deque()
        self._queued_bytes = 0
        self._ready = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._broken = False
        self.closing = False
        self._task = asyncio.ensure_future(self._pump())

    def write(self, data: bytes) -> bool:
        if self.closing or self._broken:
            raise CallEnded()
        self._queue.append({"type": "websocket.send", "text": data.decode()})
        self._queued_bytes += len(data)
        self._drained.clear()
        self._ready.set()
        return self._queued_bytes > _QUEUE_LIMIT

    async def drain(self) -> None:
        await self._drained.wait()
        if self._broken:
            raise CallEnded()

    def close(self, code: int, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        self._queue.append({"type": "websocket.close", "code": code, "reason": reason})
        self._ready.set()

    async def flush(self) -> None:
        """Send what is queued (the connection has ended), then stop the sending task."""
        self.closing = True
        self._ready.set()
        await self._task

    async def _pump(self) -> None:
        while True:
            if not self._queue:
                self._queued_bytes = 0
                self._drained.set()
                if self.closing:
                    return
                self._ready.clear()
                await self._ready.wait()
                continue
            message = self._queue.popleft()
            if "text" in message:
                self._queued_bytes -= len(message["text"])
            try:
                await self._send(message)
            except (OSError, RuntimeError):  # servers differ: ClientDisconnected, RuntimeError
                self._broken = True
                self._queue.clear()


class ASGIAdapter:
    """An ASGI application serving Media Streams with an :class:`~callsock.server.app.App`'s handlers.

    Args:
        app: the handlers to run for each call.
        settings: recording, limits and the rest; ``host``, ``port`` and ``path`` are the host
            application's business and are ignored. Logging follows ``log_level`` and
            ``log_format`` as under ``callsock serve`` (JSON when standard output is not a
            terminal), unless the host application configured structlog itself.

    Raises:
        ConfigurationError: ``settings.redis_url`` is set; clustering needs ``callsock serve``.
    """

    def __init__(self, app: Application, settings: Settings) -> None:
        if settings.redis_url:
            # The cluster's background tasks live with CallServer's start and stop; an ASGI host
            # application has no such hook for us that every server honours.
            raise ConfigurationError(
                "the ASGI adapter does not join a cluster: use callsock serve --redis-url"
            )
        if not structlog.is_configured():  # the host application's own configuration wins
            configure_logging(settings.log_level, settings.log_format)
        self.hub = Hub(settings, app)
        self.hub.warn_if_unsigned()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection: a WebSocket stream, an HTTP request, or lifespan events."""
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(receive, send)
        elif kind == "http":
            await _upgrade_required(send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    def shutdown(self) -> None:
        """Close every call with 1001 (endReason ``shutdown``); call from the host's shutdown."""
        self.hub.shut_down()

    async def _websocket(self, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        transport = _ASGITransport(send)
        connection = self.hub.admit(transport)
        if isinstance(connection, ServerBusy):
            transport.close(connection.close_code, connection.close_reason)
            await transport.flush()
            return
        try:
            await _read(receive, connection)
        finally:
            self.hub.forget(connection)
            await transport.flush()
        await connection.wait_handlers()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _read(receive: Receive, connection: Connection) -> None:
    receive_text = connection.receive_text
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":  # websocket.disconnect
            if message.get("code") == _SERVICE_RESTART:
                connection.note_shutdown()
            return
        text = message.get("text")
        if text is None:
            connection.receive_binary()
        else:
            receive_text(text)


async def _upgrade_required(send: Send) -> None:
    headers = [(b"content-type", b"text/plain"), (b"upgrade", b"websocket"), (b"connection", b"Upgrade")]
    await send({"type": "http.response.start", "status": 426, "headers": headers})
    await send({"type": "http.response.body", "body": _UPGRADE_REQUIRED})
