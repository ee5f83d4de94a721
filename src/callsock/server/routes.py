"""The aiohttp server: the Media Streams WebSocket and the HTTP routes, on one port.

aiohttp serves HTTP (``/health``, ``/calls``, ``/metrics``, the TwiML webhooks) and answers the
WebSocket upgrade; from the ``101 Switching Protocols`` on, a
:class:`~callsock.transport.WebSocketTransport` moves each message to its
:class:`~callsock.connection.Connection`.

Routes:
    ``GET <path>``: the WebSocket (a plain GET answers 426).
    ``POST /twiml`` (and ``GET``): the TwiML that streams a call here.
    ``POST /stream-status``: Twilio's stream status callbacks.
    ``GET /health``: ``{status, activeCalls, connections, uptimeSeconds}``.
    ``GET /calls``: the open connections and their calls (see :meth:`CallServer.handle_calls`
    for who may ask).
    ``GET /metrics``: Prometheus text.

With an auth token, the webhooks and the upgrade must carry a valid ``X-Twilio-Signature``
(403 otherwise, before any WebSocket opens). Plain HTTP is guarded by
:class:`~callsock.httpguard.HttpGuard`: a deadline for each request, a budget of connections,
bodies of at most 16 KiB.
"""

from __future__ import annotations

import asyncio
import hmac
import ssl
from typing import Any

import msgspec
from aiohttp import web

from ..observability.logs import clip, http_logger
from ..observability.metrics import CONTENT_TYPE
from ..protocol.errors import ServerBusy
from ..recording.recover import leftovers
from .app import App
from .connection import Connection
from .httpguard import MAX_BODY_BYTES, HttpGuard
from .hub import Hub
from .settings import Settings, load_secrets
from .transport import accept, check_upgrade
from .twilio import BadForm, BadHost, form_params, is_local, is_signed, stream_url, twiml

__all__ = ["CallServer"]


class CallServer:
    """A callsock server: an aiohttp application around a :class:`~callsock.service.Hub`.

    Args:
        settings: what to serve and how; secrets named by file (``auth_token_file``...) are read.
        app: the application whose handlers run for each call.

    Raises:
        SettingError: a secret's file cannot be read.
    """

    def __init__(self, settings: Settings, app: App | None = None) -> None:
        settings = load_secrets(settings)
        self.settings = settings
        self.hub = Hub(settings, app)
        self.guard = HttpGuard(
            request_timeout=settings.request_timeout,
            max_connections=settings.max_http_connections,
            metrics=self.hub.metrics,
        )
        self.hub.metrics.http_connections = self.guard.__len__
        self.runner: web.AppRunner | None = None
        self.listener: asyncio.Server | None = None
        self.port: int | None = None

    @property
    def connections(self) -> dict[str, Connection]:
        """The open connections, by connection id."""
        return self.hub.connections

    def build_app(self) -> web.Application:
        """Return the aiohttp application with every route."""
        app = web.Application(middlewares=[self.guard.middleware()], client_max_size=MAX_BODY_BYTES)
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
        if self.hub.cluster is not None:
            await self.hub.cluster.start()
        self.runner = web.AppRunner(self.build_app(), handle_signals=False)
        await self.runner.setup()
        assert self.runner.server is not None
        self.listener = await self._listen(self.runner.server)
        self.port = int(self.listener.sockets[0].getsockname()[1])
        self.hub.log.info(
            "listening",
            host=settings.host,
            port=self.port,
            path=settings.path,
            tls=settings.ssl_certfile is not None,
            recordDir=str(settings.record_dir) if settings.record else None,
        )
        stranded = leftovers(settings.record_dir) if settings.record else []
        if stranded:
            self.hub.log.warning(
                "recordings left unfinished by a server that stopped unexpectedly; "
                f"run: callsock recover {settings.record_dir}",
                calls=len(stranded),
            )
        self.hub.warn_if_unsigned()

    async def _listen(self, server: web.Server) -> asyncio.Server:
        """Listen with aiohttp's protocol, each connection watched by the guard (see httpguard)."""
        settings = self.settings
        context = _ssl_context(settings)
        factory = self.guard.protocol_factory(
            server,
            keepalive_timeout=settings.handshake_timeout,  # also a bound on a silent new connection
            access_log=None,
            logger=http_logger(),
            auto_decompress=False,  # Twilio never compresses a webhook; nobody else needs to
            lingering_time=min(2.0, settings.request_timeout),  # reading what a refused body still sends
            read_bufsize=MAX_BODY_BYTES,  # what a body may buffer before reading pauses (64 KiB by default)
        )
        return await asyncio.get_running_loop().create_server(
            factory,
            settings.host,
            settings.port,
            ssl=context,
            backlog=128,
            ssl_handshake_timeout=settings.request_timeout if context is not None else None,
        )

    async def stop(self, drain: float = 0.0, hurry: asyncio.Event | None = None) -> None:
        """Stop gracefully, losing nothing.

        New calls are refused (503); open ones go on for up to ``drain`` seconds (less if
        ``hurry`` is set); the rest are closed with 1001; every recording is written; then the
        server stops listening.
        """
        await self.hub.drain(drain, hurry)
        self.hub.shut_down()
        await self.hub.wait_closed(self.settings.close_timeout + 10.0)
        if self.hub.cluster is not None:
            await self.hub.cluster.stop()
        if self.listener is not None:
            self.listener.close()  # no new connections; aiohttp closes the open ones
        if self.runner is not None:
            await self.runner.cleanup()
        self.guard.close()
        self.hub.log.info("stopped")

    async def handle_stream(self, request: web.Request) -> web.StreamResponse:
        """Serve the Media Streams WebSocket; answer 426 to a plain GET."""
        if self.hub.shared.debug:
            self._log_upgrade(request)
        refusal = check_upgrade(request)
        if refusal is not None:
            return refusal
        if self.hub.draining:
            return web.Response(status=503, text="503 Service Unavailable: the server is shutting down.\n")
        if self.settings.auth_token and not is_signed(request, self.settings, "websocket"):
            return self._unsigned(request, "websocket")
        self.guard.release(request)  # a WebSocket from here on: --max-calls limits it
        cluster = self.hub.cluster
        # Asked before the 101: once it is sent, the peer's bytes may arrive at any moment.
        cluster_full = cluster is not None and not await cluster.admit()
        settings = self.settings
        response, stream = await accept(
            request,
            max_message_bytes=settings.max_message_bytes,
            close_timeout=settings.close_timeout,
            idle_timeout=settings.idle_timeout,
            start_timeout=settings.handshake_timeout,
        )
        if stream is None:
            return response
        if cluster is not None and cluster_full:
            full = ServerBusy(cluster.max_calls or 0)
            self.hub.metrics.connections_refused += 1
            self.hub.log.warning(
                "connection refused: cluster at --cluster-max-calls", closeCode=full.close_code
            )
            stream.close(full.close_code, "cluster at capacity")
            await stream.done
            return response
        admitted = self.hub.admit(stream)
        if isinstance(admitted, ServerBusy):
            stream.close(admitted.close_code, admitted.close_reason)
            await stream.done
            return response
        stream.receiver = admitted
        try:
            await stream.done
        finally:
            self.hub.forget(admitted)
        await admitted.wait_handlers()
        return response

    async def handle_twiml(self, request: web.Request) -> web.Response:
        """Answer Twilio's voice webhook with TwiML that streams the call here.

        With an auth token the stream carries the call's stream token, so only this call's
        stream can claim the call (see :mod:`callsock.tokens`); the webhook is signed, so the
        ``CallSid`` it names is Twilio's.
        """
        params = await self._form(request)
        try:
            url = stream_url(request, self.settings)
        except BadHost:
            self.hub.metrics.count("http_rejections", "bad-host")
            raise web.HTTPBadRequest(
                text="400 Bad Request: the request's host is not a host[:port]; set --public-url.\n"
            ) from None
        # A GET's parameters are in its URL, which is what Twilio signs; a POST's form is signed apart.
        signed = params if request.method == "POST" else {}
        if self.settings.auth_token and not is_signed(request, self.settings, "webhook", signed):
            return self._unsigned(request, "webhook")
        call_sid = params.get("CallSid")
        self.hub.log.info("twiml served", callSid=clip(call_sid), streamUrl=clip(url))
        return web.Response(text=twiml(self.settings, url, call_sid), content_type="text/xml")

    async def handle_stream_status(self, request: web.Request) -> web.Response:
        """Take Twilio's stream status callback (stream-started, stream-stopped, stream-error)."""
        params = await self._form(request)
        if self.settings.auth_token and not is_signed(request, self.settings, "webhook", params):
            return self._unsigned(request, "status-callback")
        event = params.get("StreamEvent", "")
        self.hub.metrics.count("stream_status", event)  # anything unknown counts as "other"
        log = self.hub.log.error if event == "stream-error" else self.hub.log.info
        log(
            "stream status",
            streamEvent=clip(event),
            callSid=clip(params.get("CallSid")),
            streamSid=clip(params.get("StreamSid")),
            streamError=clip(params.get("StreamError")),
            timestamp=clip(params.get("Timestamp")),
        )
        return web.Response(status=204)

    async def _form(self, request: web.Request) -> dict[str, str]:
        """The webhook's parameters; 400 for a body that is not Twilio's form."""
        try:
            return await form_params(request)
        except BadForm as exc:
            self.hub.metrics.count("http_rejections", "bad-form")
            raise web.HTTPBadRequest(
                text=f"400 Bad Request: {exc}; Twilio sends an application/x-www-form-urlencoded form.\n"
            ) from None

    def _unsigned(self, request: web.Request, route: str) -> web.Response:
        present = "X-Twilio-Signature" in request.headers
        self.hub.metrics.count("signature_rejections", route)
        self.hub.log.warning(
            "request refused: Twilio signature " + ("invalid" if present else "missing"),
            route=route,
            path=clip(request.path),
            peer=request.remote,
        )
        return web.Response(status=403, text="403 Forbidden: missing or invalid X-Twilio-Signature.\n")

    async def handle_health(self, request: web.Request) -> web.Response:
        """Report liveness and load; 503 while draining, so load balancers stop sending calls."""
        return _json(self.hub.health(), status=503 if self.hub.draining else 200)

    async def handle_calls(self, request: web.Request) -> web.Response:
        """List the open connections and their calls (live callSids: not for everyone).

        With ``--admin-token``, only a request with ``Authorization: Bearer <token>`` (401
        otherwise); with an auth token but no admin token, only this machine (403 otherwise);
        with neither, anyone, as a server that checks no signature hides nothing.
        """
        refusal = self._admin_refusal(request)
        if refusal is not None:
            self.hub.metrics.count("http_rejections", "unauthorized")
            return refusal
        return _json(self.hub.calls())

    def _admin_refusal(self, request: web.Request) -> web.Response | None:
        admin_token = self.settings.admin_token
        if admin_token:
            scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(
                credential.strip().encode(), admin_token.encode()
            ):
                return None
            return web.Response(
                status=401,
                text="401 Unauthorized: send Authorization: Bearer <the --admin-token>.\n",
                headers={"WWW-Authenticate": 'Bearer realm="callsock"'},
            )
        if self.settings.auth_token and not is_local(request):
            return web.Response(
                status=403, text="403 Forbidden: /calls answers this machine only without --admin-token.\n"
            )
        return None

    async def handle_metrics(self, request: web.Request) -> web.Response:
        """Expose the metrics in the Prometheus text format."""
        return web.Response(body=self.hub.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    def _log_upgrade(self, request: web.Request) -> None:
        headers = request.headers
        self.hub.log.debug(
            "upgrade",
            upgrade=clip(headers.get("Upgrade")),
            connection=clip(headers.get("Connection")),
            forwardedProto=clip(headers.get("X-Forwarded-Proto")),
            userAgent=clip(headers.get("User-Agent")),
            peer=request.remote,
        )


def _ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.ssl_certfile is None or settings.ssl_keyfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile)
    return context


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json")
