"""The aiohttp server: the Media Streams WebSocket and the HTTP routes, on one port.

aiohttp serves HTTP (``/health``, ``/calls``, ``/metrics``, and later the TwiML webhooks) and
answers the WebSocket upgrade. From the ``101 Switching Protocols`` on, the connection's bytes
go to a :class:`_Stream`, installed as the request's payload parser (the hook aiohttp's own
WebSocket uses): frames are parsed as bytes arrive (:mod:`callsock.frames`) and each message
goes to its :class:`~callsock.connection.Connection` at once, with no task woken per message;
replies are framed and written straight to the transport.

Routes:
    ``GET <path>``: the WebSocket (a plain GET answers 426).
    ``POST /twiml`` (and ``GET``): the TwiML that streams a call here.
    ``POST /stream-status``: Twilio's stream status callbacks.
    ``GET /health``: ``{status, activeCalls, connections, uptimeSeconds}``.
    ``GET /calls``: the open connections and their calls.
    ``GET /metrics``: Prometheus text.

With an auth token, the webhooks and the upgrade must carry a valid ``X-Twilio-Signature``
(403 otherwise, before any WebSocket opens).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ssl
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
    IdleTimeout,
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
from .recover import leftovers
from .service import CallService
from .settings import Settings
from .webhooks import is_signed, stream_url, twiml

__all__ = ["CallServer"]

UPGRADE_REQUIRED: Final = (
    "426 Upgrade Required: this path serves Twilio Media Streams over WebSocket "
    '(point <Stream url="wss://..."> at it); a plain HTTP request cannot use it.\n'
)

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
        idle_timeout: float,
        start_timeout: float,
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
        # One timer, re-armed lazily: data only moves the deadline, the timer checks it.
        self._idle_timeout = idle_timeout
        self._start_deadline = self._loop.time() + start_timeout
        self._last_data = self._loop.time()
        self._idle_timer = self._loop.call_at(
            min(self._start_deadline, self._last_data + idle_timeout), self._check_idle
        )

    # The payload-parser side (aiohttp's RequestHandler calls these).

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        """Parse and dispatch the bytes that arrived."""
        self._last_data = self._loop.time()
        fault: FrameError | None = None
        try:
            messages = self._reader.feed(data)
        except FrameError as exc:
            fault, messages = exc, exc.messages
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
            if fault is not None:
                self._broken(fault)
        finally:
            self._reading = False
            self._flush()
        return False, b""

    def feed_eof(self) -> None:
        """The TCP connection is gone."""
        self.closing = True
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._idle_timer.cancel()
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

    def _check_idle(self) -> None:
        if self.closing:
            return
        now = self._loop.time()
        connection = self.connection
        waiting_for_start = connection is not None and connection.session.stream is None
        if waiting_for_start and now >= self._start_deadline:
            self._timed_out(IdleTimeout("no start within the handshake timeout"))
        elif now >= self._last_data + self._idle_timeout:
            self._timed_out(IdleTimeout(f"nothing received for {self._idle_timeout:g} s"))
        else:
            deadline = self._last_data + self._idle_timeout
            if waiting_for_start:
                deadline = min(deadline, self._start_deadline)
            self._idle_timer = self._loop.call_at(deadline, self._check_idle)

    def _timed_out(self, error: IdleTimeout) -> None:
        if self.connection is not None:
            self.connection.end("idle-timeout", error)
        else:
            self.close(error.close_code, error.close_reason)

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
        app.router.add_route("POST", "/twiml", self.handle_twiml)
        app.router.add_route("GET", "/twiml", self.handle_twiml)
        app.router.add_post("/stream-status", self.handle_stream_status)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/calls", self.handle_calls)
        app.router.add_get("/metrics", self.handle_metrics)
        return app

    async def start(self) -> None:
        """Listen on the configured host and port; :attr:`port` tells the port bound."""
        settings = self.settings
        if self.service.cluster is not None:
            await self.service.cluster.start()
        # keepalive_timeout also bounds how long a new connection may take to send its request.
        self.runner = web.AppRunner(
            self.build_app(),
            access_log=None,
            handle_signals=False,
            keepalive_timeout=settings.handshake_timeout,
        )
        await self.runner.setup()
        site = web.TCPSite(self.runner, settings.host, settings.port, ssl_context=_ssl_context(settings))
        await site.start()
        self.port = int(self.runner.addresses[0][1])
        self.service.log.info(
            "listening",
            host=settings.host,
            port=self.port,
            path=settings.path,
            tls=settings.ssl_certfile is not None,
            recordDir=str(settings.record_dir) if settings.record else None,
        )
        stranded = leftovers(settings.record_dir) if settings.record else []
        if stranded:
            self.service.log.warning(
                "recordings left unfinished by a server that stopped unexpectedly; "
                f"run: callsock recover {settings.record_dir}",
                calls=len(stranded),
            )
        if not settings.auth_token:
            self.service.log.warning(
                "no Twilio auth token: signatures are not checked and anyone can connect; "
                "set --auth-token or TWILIO_AUTH_TOKEN (--require-signature makes it mandatory)"
            )

    async def stop(self, drain: float = 0.0, hurry: asyncio.Event | None = None) -> None:
        """Stop gracefully, losing nothing.

        New calls are refused (503); open ones go on for up to ``drain`` seconds (less if
        ``hurry`` is set); the rest are closed with 1001; every recording is written; then the
        server stops listening.
        """
        await self.service.drain(drain, hurry)
        self.service.shut_down()
        await self.service.wait_closed(self.settings.close_timeout + 10.0)
        if self.service.cluster is not None:
            await self.service.cluster.stop()
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
        if self.service.draining:
            return web.Response(status=503, text="503 Service Unavailable: the server is shutting down.\n")
        if self.settings.auth_token and not is_signed(request, self.settings, "websocket"):
            return self._unsigned(request, "websocket")
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
        settings = self.settings
        stream = _Stream(
            transport,
            writer,
            max_message_bytes=settings.max_message_bytes,
            close_timeout=settings.close_timeout,
            idle_timeout=settings.idle_timeout,
            start_timeout=settings.handshake_timeout,
        )
        cluster = self.service.cluster
        if cluster is not None and not await cluster.admit():
            full = ServerBusy(cluster.max_calls or 0)
            self.service.metrics.connections_refused += 1
            self.service.log.warning(
                "connection refused: cluster at --cluster-max-calls", closeCode=full.close_code
            )
            request.protocol.set_parser(stream)  # type: ignore[arg-type]
            stream.close(full.close_code, "cluster at capacity")
            await stream.done
            return response
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

    async def handle_twiml(self, request: web.Request) -> web.Response:
        """Answer Twilio's voice webhook with TwiML that streams the call here."""
        form = await request.post() if request.method == "POST" else {}
        params = {key: str(value) for key, value in form.items()}
        if self.settings.auth_token and not is_signed(request, self.settings, "webhook", params):
            return self._unsigned(request, "webhook")
        body = twiml(self.settings, stream_url(request, self.settings))
        self.service.log.info(
            "twiml served", callSid=params.get("CallSid"), streamUrl=stream_url(request, self.settings)
        )
        return web.Response(text=body, content_type="text/xml")

    async def handle_stream_status(self, request: web.Request) -> web.Response:
        """Take Twilio's stream status callback (stream-started, stream-stopped, stream-error)."""
        form = await request.post()
        params = {key: str(value) for key, value in form.items()}
        if self.settings.auth_token and not is_signed(request, self.settings, "webhook", params):
            return self._unsigned(request, "status-callback")
        event = params.get("StreamEvent", "unknown")
        self.service.metrics.count("stream_status", event)
        log = self.service.log.error if event == "stream-error" else self.service.log.info
        log(
            "stream status",
            streamEvent=event,
            callSid=params.get("CallSid"),
            streamSid=params.get("StreamSid"),
            streamError=params.get("StreamError"),
            timestamp=params.get("Timestamp"),
        )
        return web.Response(status=204)

    def _unsigned(self, request: web.Request, route: str) -> web.Response:
        present = "X-Twilio-Signature" in request.headers
        self.service.metrics.count("signature_rejections", route)
        self.service.log.warning(
            "request refused: Twilio signature " + ("invalid" if present else "missing"),
            route=route,
            path=request.path,
            peer=request.remote,
        )
        return web.Response(status=403, text="403 Forbidden: missing or invalid X-Twilio-Signature.\n")

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


def _ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.ssl_certfile is None or settings.ssl_keyfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile)
    return context


def _json(data: Any) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), content_type="application/json")
