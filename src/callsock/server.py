"""The aiohttp server: the Media Streams WebSocket and the HTTP routes, on one port.

This module is the I/O driver. Each WebSocket connection gets a :class:`Connection`, which
reads frames, feeds them to its :class:`~callsock.session.CallSession` (where every rule
lives), sends what the session wants sent, and closes with the code of any error. Whatever
ends a connection (``stop``, an error, the peer vanishing, a newer connection for the same
call, shutdown), the session is finished exactly once, so every recording is published.

Routes:
    ``GET <path>``: the WebSocket (a plain GET answers 426).
    ``GET /health``: ``{status, activeCalls, connections, uptimeSeconds}``.
    ``GET /calls``: the open connections and their calls.
    ``GET /metrics``: Prometheus text.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import Any, Final

import msgspec
from aiohttp import WSMsgType, web

from .errors import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CallsockError,
    MessageTooBig,
    Replaced,
    ServerBusy,
    StreamError,
)
from .logs import get_logger, level_number
from .metrics import CONTENT_TYPE, ServerMetrics
from .recording import WavRecorder
from .registry import CallRegistry
from .schema import InboundMessage, Media, Start, Stop
from .session import CallSession, EndReason, Sink
from .settings import Settings

__all__ = ["CallServer", "Connection"]

_UPGRADE_REQUIRED: Final = (
    "426 Upgrade Required: this path serves Twilio Media Streams over WebSocket "
    '(point <Stream url="wss://..."> at it); a plain HTTP request cannot use it.\n'
)


class Connection:
    """One WebSocket connection and the call it carries."""

    def __init__(self, server: CallServer, ws: web.WebSocketResponse, connection_id: str) -> None:
        self.server = server
        self.ws = ws
        self.id = connection_id
        settings = server.settings
        sinks: list[Sink] = []
        if settings.record:
            sinks.append(WavRecorder(settings.record_dir, connection_id))
        self.session = CallSession(
            connection_id,
            sinks=sinks,
            buffer_bytes=settings.buffer_bytes,
            start_ack=settings.start_ack,
            log=get_logger(connection=connection_id),
        )
        self._end_reason: EndReason | None = None
        self._close_task: asyncio.Task[Any] | None = None

    async def run(self) -> None:
        """Serve the connection until it ends, then finish the call."""
        try:
            await self._receive_loop()
        finally:
            self._finish()

    def end(self, reason: EndReason, error: CallsockError) -> None:
        """Close the connection from outside its own task (replacement, shutdown)."""
        if self._end_reason is None:
            self._end_reason = reason
        self.session.log.info("closing connection", endReason=reason, closeCode=error.close_code)
        self._close_task = asyncio.create_task(self._close(error.close_code, error.close_reason))

    async def _receive_loop(self) -> None:
        ws = self.ws
        session = self.session
        observe = self.server.metrics.observe_processing
        debug = self.server.debug
        clock = time.perf_counter
        while True:
            msg = await ws.receive()
            kind = msg.type
            if kind is WSMsgType.TEXT:
                began = clock()
                data = msg.data
                try:
                    event = session.receive_text(data)
                except StreamError as exc:
                    await self._reject(exc)
                    return
                if debug:
                    self._log_message(event, len(data))
                if type(event) is not Media and await self._control(event):
                    return
                observe(clock() - began)
            elif kind is WSMsgType.BINARY:
                try:
                    session.receive_binary()
                except StreamError as exc:
                    await self._reject(exc)
                return
            elif kind is WSMsgType.ERROR:
                self._receive_error(msg.data)
                return
            else:  # CLOSE, CLOSING, CLOSED: the peer or another task ended the connection
                return

    async def _control(self, event: InboundMessage) -> bool:
        """Act on a non-media message; return True when the connection is done."""
        session = self.session
        if isinstance(event, Start):
            self._claim_call()
            for text in session.data_to_send():
                await self.ws.send_str(text)
            stream = session.stream
            assert stream is not None
            session.log.info("stream started", dialect=stream.dialect, tracks=list(stream.tracks))
        elif isinstance(event, Stop):
            self._end_reason = "stop"
            self._finish()
            await self._close(CLOSE_NORMAL, "stream stopped")
            return True
        return False

    def _claim_call(self) -> None:
        stream = self.session.stream
        assert stream is not None
        previous = self.server.registry.claim(stream.call_key, self)
        if previous is not None:
            self.server.metrics.connections_replaced += 1
            previous.end("replaced", Replaced())

    async def _reject(self, error: StreamError) -> None:
        self.session.log.warning(
            "message rejected",
            rule=error.rule,
            field=error.field,
            detail=error.detail,
            closeCode=error.close_code,
        )
        self.server.metrics.count_error(error.rule)
        self._finish()
        await self._close(error.close_code, error.close_reason)

    def _receive_error(self, exc: BaseException) -> None:
        # aiohttp has already closed the socket; a too-large frame got 1009.
        too_big = getattr(exc, "code", None) == MessageTooBig.close_code
        if too_big:
            error: StreamError = MessageTooBig("message-too-big", "", "frame over the size limit")
            self.session.fail(error)
            self.server.metrics.count_error(error.rule)
        self.session.log.warning("connection error", exc=str(exc))

    async def _close(self, code: int, reason: str) -> None:
        if not self.ws.closed:
            await self.ws.close(code=code, message=reason.encode())

    def _finish(self) -> None:
        session = self.session
        if session.ended_at is not None:
            return
        summary = session.finish(self._end_reason or "closed")
        stream = session.stream
        server = self.server
        if stream is not None:
            server.registry.release(stream.call_key, self)
        server.metrics.session_finished(session)
        if summary is not None:
            session.log.info(
                "call ended",
                endReason=summary["endReason"],
                error=summary["error"],
                durationMs=summary["durationMs"],
                files=summary.get("files"),
            )

    def _log_message(self, event: InboundMessage, size: int) -> None:
        self.session.log.debug(
            "message",
            kind=type(event).__name__.lower(),
            streamSid=getattr(event, "stream_sid", None),
            size=size,
        )

    def describe(self) -> dict[str, Any]:
        """What ``GET /calls`` shows of this connection."""
        session = self.session
        stream = session.stream
        error = session.last_error
        return {
            "connectionId": self.id,
            "callSid": stream.call_sid if stream else None,
            "streamSid": stream.stream_sid if stream else None,
            "state": session.protocol.state.value,
            "connectedAt": session.connected_at,
            "startedAt": session.started_at,
            "messages": session.counters.total,
            "errors": session.counters.errors,
            "lastError": error.rule if error else None,
        }


class CallServer:
    """A callsock server: routes, connections, the call registry and metrics.

    Args:
        settings: what to serve and how.
        app: the user's application object (``serve module:attr``), kept for the handler API.
    """

    def __init__(self, settings: Settings, app: object | None = None) -> None:
        self.settings = settings
        self.app = app
        self.connections: dict[str, Connection] = {}
        self.registry: CallRegistry[Connection] = CallRegistry()
        self.metrics = ServerMetrics(lambda: [c.session for c in self.connections.values()])
        self.debug = level_number(settings.log_level) <= level_number("debug")
        self.log = get_logger()
        self.started_monotonic = time.monotonic()
        self.runner: web.AppRunner | None = None
        self.port: int | None = None
        self._ids = itertools.count(1)
        self._id_prefix = f"{os.getpid():x}-{int(time.time() * 1000):x}"

    def build_app(self) -> web.Application:
        """Return the aiohttp application with every route."""
        app = web.Application()
        app.router.add_get(self.settings.path, self.handle_stream)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/calls", self.handle_calls)
        app.router.add_get("/metrics", self.handle_metrics)
        return app

    async def start(self) -> None:
        """Listen on the configured host and port; :attr:`port` tells the port bound."""
        self.runner = web.AppRunner(self.build_app(), access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.settings.host, self.settings.port)
        await site.start()
        self.port = int(self.runner.addresses[0][1])
        self.log.info(
            "listening",
            host=self.settings.host,
            port=self.port,
            path=self.settings.path,
            recordDir=str(self.settings.record_dir) if self.settings.record else None,
        )

    async def stop(self) -> None:
        """Close every connection with 1001, finish every call, and stop listening."""
        for connection in list(self.connections.values()):
            connection.end("shutdown", _ShuttingDown())
        if self.runner is not None:
            await self.runner.cleanup()
        self.log.info("stopped")

    async def handle_stream(self, request: web.Request) -> web.StreamResponse:
        """Serve the Media Streams WebSocket; answer 426 to a plain GET."""
        ws = web.WebSocketResponse(
            compress=False,  # Twilio offers no compression; deflating audio only costs CPU
            timeout=self.settings.close_timeout,
            decode_text=False,  # msgspec decodes the UTF-8 bytes itself
        )
        if not ws.can_prepare(request).ok:
            return web.Response(
                status=426, text=_UPGRADE_REQUIRED, headers={"Upgrade": "websocket", "Connection": "Upgrade"}
            )
        if self.debug:
            headers = request.headers
            self.log.debug(
                "upgrade",
                upgrade=headers.get("Upgrade"),
                connection=headers.get("Connection"),
                forwardedProto=headers.get("X-Forwarded-Proto"),
                userAgent=headers.get("User-Agent"),
                peer=request.remote,
            )
        await ws.prepare(request)
        if len(self.connections) >= self.settings.max_calls:
            return await self._refuse(ws)
        connection = Connection(self, ws, f"{self._id_prefix}-{next(self._ids)}")
        self.connections[connection.id] = connection
        self.metrics.connections_opened += 1
        try:
            await connection.run()
        finally:
            del self.connections[connection.id]
        return ws

    async def _refuse(self, ws: web.WebSocketResponse) -> web.WebSocketResponse:
        busy = ServerBusy(self.settings.max_calls)
        self.metrics.connections_refused += 1
        self.log.warning("connection refused", reason=str(busy), closeCode=busy.close_code)
        await ws.close(code=busy.close_code, message=busy.close_reason.encode())
        return ws

    async def handle_health(self, request: web.Request) -> web.Response:
        """Report liveness and load."""
        return _json(
            {
                "status": "ok",
                "activeCalls": len(self.registry),
                "connections": len(self.connections),
                "uptimeSeconds": round(time.monotonic() - self.started_monotonic, 3),
            }
        )

    async def handle_calls(self, request: web.Request) -> web.Response:
        """List the open connections and their calls."""
        return _json([c.describe() for c in self.connections.values()])

    async def handle_metrics(self, request: web.Request) -> web.Response:
        """Expose the metrics in the Prometheus text format."""
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


class _ShuttingDown(CallsockError):
    close_code = CLOSE_GOING_AWAY

    def __init__(self) -> None:
        super().__init__("server shutting down")


def _json(data: Any) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), content_type="application/json")
