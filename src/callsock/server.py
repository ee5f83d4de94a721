"""The aiohttp server: the Media Streams WebSocket and the HTTP routes, on one port.

This module only moves frames: each WebSocket's reading loop hands text to its
:class:`~callsock.connection.Connection`, where every rule and every call's lifecycle lives.

Routes:
    ``GET <path>``: the WebSocket (a plain GET answers 426).
    ``GET /health``: ``{status, activeCalls, connections, uptimeSeconds}``.
    ``GET /calls``: the open connections and their calls.
    ``GET /metrics``: Prometheus text.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from aiohttp import WSMsgType, web

from .app import App
from .connection import Connection
from .errors import CallEnded, ServerBusy
from .metrics import CONTENT_TYPE
from .service import CallService
from .settings import Settings

__all__ = ["CallServer"]

UPGRADE_REQUIRED: Final = (
    "426 Upgrade Required: this path serves Twilio Media Streams over WebSocket "
    '(point <Stream url="wss://..."> at it); a plain HTTP request cannot use it.\n'
)


class _AiohttpTransport:
    """The :class:`~callsock.connection.Transport` of an aiohttp WebSocket."""

    __slots__ = ("ws",)

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws

    @property
    def closed(self) -> bool:
        return self.ws.closed

    async def send(self, data: bytes) -> None:
        try:
            await self.ws.send_frame(data, WSMsgType.TEXT)
        except ConnectionError as exc:
            raise CallEnded() from exc

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code=code, message=reason.encode())


async def _read(ws: web.WebSocketResponse, connection: Connection) -> None:
    """Feed the connection every frame until the WebSocket or the call ends."""
    receive_text = connection.receive_text
    while True:
        msg = await ws.receive()
        kind = msg.type
        if kind is WSMsgType.TEXT:
            result = receive_text(msg.data)  # media returns None: nothing to await
            if result is not None and await connection.act(result):
                return
        elif kind is WSMsgType.BINARY:
            await connection.reject_binary()
            return
        elif kind is WSMsgType.ERROR:
            connection.receive_error(msg.data, getattr(msg.data, "code", None))
            return
        else:  # CLOSE, CLOSING, CLOSED: the peer or another task ended the connection
            return


class CallServer:
    """A callsock server: an aiohttp application around a :class:`~callsock.service.CallService`.

    Args:
        settings: what to serve and how.
        app: the application whose handlers run for each call.
    """

    def __init__(self, settings: Settings, app: App | None = None) -> None:
        self.settings = settings
        self.service = CallService(settings, app)
        self.runner: web.AppRunner | None = None
        self.port: int | None = None

    @property
    def connections(self) -> dict[str, Connection]:
        """The open connections, by connection id."""
        return self.service.connections

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
        self.service.log.info(
            "listening",
            host=self.settings.host,
            port=self.port,
            path=self.settings.path,
            recordDir=str(self.settings.record_dir) if self.settings.record else None,
        )

    async def stop(self) -> None:
        """Close every connection with 1001, finish every call, and stop listening."""
        self.service.shut_down()
        if self.runner is not None:
            await self.runner.cleanup()
        self.service.log.info("stopped")

    async def handle_stream(self, request: web.Request) -> web.StreamResponse:
        """Serve the Media Streams WebSocket; answer 426 to a plain GET."""
        ws = web.WebSocketResponse(
            compress=False,  # Twilio offers no compression; deflating audio only costs CPU
            timeout=self.settings.close_timeout,
            decode_text=False,  # msgspec decodes the UTF-8 bytes itself
        )
        if not ws.can_prepare(request).ok:
            headers = {"Upgrade": "websocket", "Connection": "Upgrade"}
            return web.Response(status=426, text=UPGRADE_REQUIRED, headers=headers)
        if self.service.debug:
            self._log_upgrade(request)
        await ws.prepare(request)
        connection = self.service.admit(_AiohttpTransport(ws))
        if isinstance(connection, ServerBusy):
            await ws.close(code=connection.close_code, message=connection.close_reason.encode())
            return ws
        try:
            await _read(ws, connection)
        finally:
            self.service.forget(connection)
        await connection.wait_handlers()
        return ws

    async def handle_health(self, request: web.Request) -> web.Response:
        """Report liveness and load."""
        return _json(self.service.health())

    async def handle_calls(self, request: web.Request) -> web.Response:
        """List the open connections and their calls."""
        return _json(self.service.calls())

    async def handle_metrics(self, request: web.Request) -> web.Response:
        """Expose the metrics in the Prometheus text format."""
        return web.Response(body=self.service.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    def _log_upgrade(self, request: web.Request) -> None:
        headers = request.headers
        self.service.log.debug(
            "upgrade",
            upgrade=headers.get("Upgrade"),
            connection=headers.get("Connection"),
            forwardedProto=headers.get("X-Forwarded-Proto"),
            userAgent=headers.get("User-Agent"),
            peer=request.remote,
        )


def _json(data: Any) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), content_type="application/json")
