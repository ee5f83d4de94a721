"""The aiohttp server: the Media Streams WebSocket and the HTTP routes, on one port.

aiohttp serves HTTP (``/health``, ``/calls``, ``/metrics``, and later the TwiML webhooks) and
answers the WebSocket upgrade. From the ``101 Switching Protocols`` on, the connection's bytes
go to a :class:`_Stream`, installed as the request's payload parser (the hook aiohttp's own
WebSocket uses): frames are parsed as bytes arrive (:mod:`callsock.frames`) and each message
goes to its :class:`~callsock.connection.Connection` at once, with no task woken per message;
replies are framed and written straight to the transport.

Routes:
    ``GET <path>``: the WebSocket (a plain GET answers 426).
    ``GET /health``: ``{status, activeCalls, connections, uptimeSeconds}``.
    ``GET /calls``: the open connections and their calls.
    ``GET /metrics``: Prometheus text.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any, Final

import msgspec
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from .app import App
from .connection import Connection
from .errors import (
    CLOSE_NORMAL,
    CallEnded,
    FramingError,
    InvalidMessage,
    MessageTooBig,
    ServerBusy,
    StreamError,
)
from .frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameError,
    FrameReader,
    accept_key,
    close_frame,
    encode_frame,
    parse_close,
)
from .metrics import CONTENT_TYPE
from .service import CallService
from .settings import Settings

__all__ = ["CallServer"]

UPGRADE_REQUIRED: Final = (
    "426 Upgrade Required: this path serves Twilio Media Streams over WebSocket "
    '(point <Stream url="wss://..."> at it); a plain HTTP request cannot use it.\n'
)

MAX_MESSAGE_BYTES: Final = 1 << 20
_OUTGOING_LIMIT: Final = 64 * 1024


class _Stream:
    """An upgraded connection: aiohttp's payload parser on one side, a Transport on the other."""

    def __init__(
        self,
        transport: asyncio.Transport,
        writer: AbstractStreamWriter,
        *,
        max_message_bytes: int,
        close_timeout: float,
    ) -> None:
        self._transport = transport
        self._writer = writer
        # aiohttp's protocol (a BaseProtocol) learns from the transport when the peer stops reading.
        self._protocol: Any = transport.get_protocol()
        self._reader = FrameReader(max_message_bytes)
        self._close_timeout = close_timeout
        self._close_timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._outgoing: list[bytes] = []
        self._outgoing_bytes = 0
        self._reading = False  # inside feed_data: writes wait for its end
        self._flush_scheduled = False
        self.connection: Connection | None = None
        self.closing = False
        self.done: asyncio.Future[None] = self._loop.create_future()

    # The payload-parser side (aiohttp's RequestHandler calls these).

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        """Parse and dispatch the bytes that arrived."""
        try:
            messages = self._reader.feed(data)
        except FrameError as exc:
            self._broken(exc)
            return False, b""
        connection = self.connection
        self._reading = True
        try:
            for opcode, payload in messages:
                if opcode == OP_TEXT:
                    if connection is not None:
                        connection.receive_text(payload)
                elif opcode == OP_CLOSE:
                    self._peer_closed(payload)
                elif opcode == OP_PING:
                    if not self.closing:
                        self._queue(encode_frame(OP_PONG, payload))
                elif opcode == OP_BINARY and connection is not None:
                    connection.receive_binary()
        finally:
            self._reading = False
            self._flush()
        return False, b""

    def feed_eof(self) -> None:
        """The TCP connection is gone."""
        self.closing = True
        if self._close_timer is not None:
            self._close_timer.cancel()
        if not self.done.done():
            self.done.set_result(None)

    # The Transport side (the Connection and its Outbound call these).

    def write(self, data: bytes) -> bool:
        """Frame one text message, written with the others of this read; True if backlogged."""
        if self.closing:
            raise CallEnded()
        self._queue(encode_frame(OP_TEXT, data))
        return self._outgoing_bytes > _OUTGOING_LIMIT or bool(self._protocol.writing_paused)

    async def drain(self) -> None:
        """Wait for the peer to read (aiohttp's writer knows when the transport is paused)."""
        try:
            await self._writer.drain()
        except ConnectionError as exc:
            raise CallEnded() from exc

    def close(self, code: int, reason: str) -> None:
        """Send a close frame; the TCP connection closes when the peer answers, or on timeout."""
        if self.closing:
            return
        self.closing = True
        self._queue(close_frame(code, reason))
        self._flush()
        self._close_timer = asyncio.get_running_loop().call_later(self._close_timeout, self._transport.close)

    def _peer_closed(self, payload: bytes | bytearray) -> None:
        try:
            code, _ = parse_close(payload)
        except FrameError as exc:
            self._broken(exc)
            return
        if not self.closing:  # the peer began: answer with its code (RFC 6455 section 5.5.1)
            self.closing = True
            self._queue(close_frame(code or CLOSE_NORMAL, ""))
        self._flush()
        self._transport.close()

    def _queue(self, frame: bytes) -> None:
        # Frames written while one read is handled, or during one turn of the event loop, leave
        # in one system call: under load (many messages a read) that saves a write per message.
        self._outgoing.append(frame)
        self._outgoing_bytes += len(frame)
        if not self._reading and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._outgoing:
            frames, self._outgoing, self._outgoing_bytes = self._outgoing, [], 0
            self._transport.writelines(frames)

    def _broken(self, exc: FrameError) -> None:
        error: StreamError
        if exc.code == MessageTooBig.close_code:
            error = MessageTooBig("message-too-big", "", exc.reason)
        elif exc.code == InvalidMessage.close_code:
            error = InvalidMessage("close-frame", "", exc.reason)
        else:
            error = FramingError("websocket-framing", "", exc.reason)
        if self.connection is not None and not self.closing:
            self.connection.session.fail(error)
            self.connection.reject(error)
        else:
            self.close(exc.code, exc.reason)


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
        if self.service.debug:
            self._log_upgrade(request)
        refusal = _check_upgrade(request)
        if refusal is not None:
            return refusal
        response = web.StreamResponse(
            status=101,
            headers={
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Accept": accept_key(request.headers["Sec-WebSocket-Key"]),
            },
        )
        response.force_close()
        try:
            writer = await response.prepare(request)
        except ConnectionError:
            return response  # the client left during the handshake
        transport = request.transport
        if writer is None or transport is None:
            return response
        stream = _Stream(
            transport, writer, max_message_bytes=MAX_MESSAGE_BYTES, close_timeout=self.settings.close_timeout
        )
        admitted = self.service.admit(stream)
        if isinstance(admitted, Connection):
            stream.connection = admitted
        request.protocol.set_parser(stream)  # type: ignore[arg-type]  # aiohttp's parser hook
        request.protocol.keep_alive(False)
        if isinstance(admitted, ServerBusy):
            stream.close(admitted.close_code, admitted.close_reason)
            await stream.done
            return response
        try:
            await stream.done
        finally:
            self.service.forget(admitted)
        await admitted.wait_handlers()
        return response

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


def _check_upgrade(request: web.Request) -> web.Response | None:
    """Refuse a request that is not a valid WebSocket upgrade (RFC 6455 section 4.2.1)."""
    headers = request.headers
    if headers.get("Upgrade", "").lower() != "websocket":
        return web.Response(
            status=426, text=UPGRADE_REQUIRED, headers={"Upgrade": "websocket", "Connection": "Upgrade"}
        )
    if "upgrade" not in (t.strip().lower() for t in headers.get("Connection", "").split(",")):
        return web.Response(status=400, text="400 Bad Request: Connection header lacks 'upgrade'.\n")
    if headers.get("Sec-WebSocket-Version") != "13":
        return web.Response(
            status=426,
            text="426 Upgrade Required: only WebSocket version 13 is supported.\n",
            headers={"Sec-WebSocket-Version": "13"},
        )
    try:
        key_ok = len(base64.b64decode(headers.get("Sec-WebSocket-Key", ""), validate=True)) == 16
    except binascii.Error:
        key_ok = False
    if not key_ok:
        return web.Response(status=400, text="400 Bad Request: invalid Sec-WebSocket-Key.\n")
    return None


def _json(data: Any) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), content_type="application/json")
