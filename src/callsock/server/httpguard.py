"""Limits on plain HTTP: a deadline for every request, a budget of connections, small requests.

**Deadlines.** A request must arrive whole, headers and body, within ``--request-timeout``,
counted from the moment its connection is made (or, on a kept-alive connection, from the end of
the previous request). aiohttp documents no deadline for a request's headers: the release this
was checked against (3.14) happens to arm its keep-alive timer when a connection is made, which
drops a connection that never completes its first request, but that is an implementation
detail, older releases allowed by ``pyproject.toml`` lack it, and nothing in aiohttp bounds a
body that trickles in. So each connection gets a timer of its own here: when it fires while the
connection is still waiting for its request, or for its body, the connection is closed.

**Counting connections.** ``loop.create_server`` is given :meth:`HttpGuard.protocol_factory`,
which builds aiohttp's own protocol (:class:`GuardedHandler`, a ``web.RequestHandler`` that
reports when its connection is made and lost, and what arrives on it). Every TCP connection is
therefore seen from its first moment, before aiohttp has parsed a byte, and forgotten exactly
when it closes, without polling aiohttp's bookkeeping. A connection stops counting as plain
HTTP when its request is a WebSocket upgrade the server accepts (:meth:`HttpGuard.release`):
from then on ``--max-calls`` limits it, and its bytes are no longer looked at.

**Evicting, not refusing.** Whether a new connection is Twilio's upgrade cannot be known before
its request arrives, so turning new connections away while the budget is full would let a few
hundred idle sockets keep every call out. Instead, at ``--max-http-connections`` one connection
is closed to make room, so a new connection always gets in: the oldest that has not sent a
whole request yet (the nearest to its deadline), else the oldest idle kept-alive one (a client
that already sent requests in time, such as a metrics scraper, goes after those that never
did), else the oldest still sending its body.

**Sizes.** Twilio's webhooks are small forms (a few KiB), so a body is read here, before the
route's handler runs, within the request's deadline and up to :data:`MAX_BODY_BYTES`; a larger
one is refused with 413 before it is read. aiohttp limits each header line and their number, not
their total, so a connection holding its headers open could make the server keep a megabyte:
here a request's head (its request line and headers, up to the blank line) may be at most
:data:`MAX_HEAD_BYTES`, as h11 allows, or the connection is closed. Bytes a client sends ahead
of its next request (pipelining) count against the next head.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from ..observability.metrics import ServerMetrics

if TYPE_CHECKING:
    from aiohttp.typedefs import Middleware

__all__ = ["MAX_BODY_BYTES", "MAX_HEAD_BYTES", "GuardedHandler", "HttpGuard"]

MAX_BODY_BYTES: Final = 16 * 1024
"""The largest request body accepted: Twilio's webhook forms are a few KiB."""

MAX_HEAD_BYTES: Final = 16 * 1024
"""The largest request line and headers, together (Twilio's are under 2 KiB)."""

Phase = Literal["new", "waiting", "body", "handling", "refused"]
"""Where a connection is: no request yet, idle between requests, sending a body, inside a route,
or refused (its body, or what it sent ahead: it closes once aiohttp has answered, at the latest at
its deadline)."""

_EVICTION_ORDER: Final[tuple[Phase, ...]] = ("refused", "new", "waiting", "body")
_BLANK_LINE: Final = b"\r\n\r\n"  # the end of a request's head (RFC 9112 section 2.1)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class GuardedHandler(web.RequestHandler):
    """aiohttp's HTTP protocol, telling an :class:`HttpGuard` what happens on its connection."""

    def __init__(self, guard: HttpGuard, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.guard = guard
        self.watched = True
        """Whether the guard still looks at what arrives (not once the connection is a WebSocket)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the connection's first deadline (after aiohttp's own set-up)."""
        super().connection_made(transport)
        self.guard.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        """Forget the connection."""
        self.guard.closed(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Hand the bytes to aiohttp, unless they make a request's head too large."""
        if self.watched and not self.guard.received(self, data):
            return
        super().data_received(data)


@dataclass(eq=False, slots=True)
class _Tracked:
    handler: GuardedHandler
    phase: Phase = "new"
    timer: asyncio.TimerHandle | None = None
    head: int = 0  # bytes of the current request's head so far
    head_done: bool = False  # its blank line arrived
    tail: bytes = b""  # the head's last bytes, to find a blank line split across two reads
    after: int = 0  # bytes since the blank line: the body, and anything sent ahead of time
    body: int = 0  # the body's length, once read


class HttpGuard:
    """The deadlines, sizes and connection budget of one server's plain HTTP.

    Args:
        request_timeout: seconds a request has to arrive whole.
        max_connections: the most plain HTTP connections kept open at once.
        metrics: where refusals are counted (``callsock_http_rejections_total``).
    """

    def __init__(self, *, request_timeout: float, max_connections: int, metrics: ServerMetrics) -> None:
        self._timeout = request_timeout
        self._max = max_connections
        self._metrics = metrics
        self._open: dict[web.RequestHandler, _Tracked] = {}  # oldest first (see _evict)

    def __len__(self) -> int:
        """The plain HTTP connections open now."""
        return len(self._open)

    def protocol_factory(self, server: web.Server, **handler_args: Any) -> Callable[[], GuardedHandler]:
        """The protocol factory to listen with: aiohttp's protocol, watched by this guard.

        Args:
            server: the runner's ``web.Server`` (what routes each request to the application).
            handler_args: what ``web.RequestHandler`` takes (``keepalive_timeout``, ``logger``...).
        """
        loop = asyncio.get_running_loop()

        def make() -> GuardedHandler:
            return GuardedHandler(self, server, loop=loop, **handler_args)

        return make

    def middleware(self) -> Middleware:
        """The aiohttp middleware that reads each body within its deadline, before the route runs."""

        @web.middleware
        async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
            tracked = self._open.get(request.protocol)
            if tracked is None:  # closed meanwhile
                return await handler(request)
            tracked.phase, tracked.head_done = "body", True
            refusal = await self._read_body(request, tracked)
            if refusal is not None:
                tracked.phase = "refused"  # what more it sends is read and dropped; its deadline stands
                return refusal
            tracked.phase = "handling"
            try:
                return await handler(request)
            finally:
                if self._open.get(request.protocol) is tracked:
                    self._next_request(tracked)

        return guard

    def release(self, request: web.Request) -> None:
        """The request is a WebSocket upgrade about to be accepted: no longer plain HTTP."""
        tracked = self._open.pop(request.protocol, None)
        if tracked is not None:
            tracked.handler.watched = False
            if tracked.timer is not None:
                tracked.timer.cancel()

    def opened(self, handler: GuardedHandler) -> None:
        """A connection was made: make room for it if needed, and start its deadline."""
        if len(self._open) >= self._max:
            self._evict()
        tracked = _Tracked(handler)
        self._open[handler] = tracked
        self._arm(tracked)

    def received(self, handler: GuardedHandler, data: bytes) -> bool:
        """Measure what arrived; False (and the connection closed) once a request's head is too large."""
        tracked = self._open.get(handler)
        if tracked is None or tracked.phase == "refused":
            return True
        if tracked.head_done:
            tracked.after += len(data)
            return True
        window = tracked.tail + data[: MAX_HEAD_BYTES - tracked.head + len(_BLANK_LINE)]
        end = window.find(_BLANK_LINE)
        if end >= 0:
            in_head = end + len(_BLANK_LINE) - len(tracked.tail)
            tracked.head += in_head
            tracked.head_done, tracked.after = True, len(data) - in_head
            return True
        tracked.head += len(data)
        tracked.tail = window[-(len(_BLANK_LINE) - 1) :]
        if tracked.head <= MAX_HEAD_BYTES:
            return True
        self._drop(tracked, "head-too-large")
        return False

    def closed(self, handler: web.RequestHandler) -> None:
        """A connection is gone."""
        tracked = self._open.pop(handler, None)
        if tracked is not None and tracked.timer is not None:
            tracked.timer.cancel()

    def close(self) -> None:
        """Stop every timer (the server is stopping; aiohttp closes the connections)."""
        for tracked in self._open.values():
            if tracked.timer is not None:
                tracked.timer.cancel()
        self._open.clear()

    def _arm(self, tracked: _Tracked) -> None:
        if tracked.timer is not None:
            tracked.timer.cancel()
        tracked.timer = asyncio.get_running_loop().call_later(self._timeout, self._expired, tracked)

    def _next_request(self, tracked: _Tracked) -> None:
        """A request is done: the next one on this connection has a deadline and a head of its own."""
        ahead = max(tracked.after - tracked.body, 0)  # sent behind this request: the next one's head
        tracked.phase, tracked.head_done, tracked.tail = "waiting", False, b""
        tracked.head, tracked.after, tracked.body = ahead, 0, 0
        if ahead > MAX_HEAD_BYTES:
            # aiohttp answers the request it has, then closes, reading nothing more meanwhile.
            tracked.phase = "refused"
            self._metrics.count("http_rejections", "head-too-large")
            tracked.handler.close()
            return
        # Moved to the end: the connections at the front are the oldest, evicted first.
        del self._open[tracked.handler]
        self._open[tracked.handler] = tracked
        self._arm(tracked)

    def _expired(self, tracked: _Tracked) -> None:
        tracked.timer = None
        if tracked.phase == "handling":  # a route runs: its end starts the next deadline
            return
        idle = tracked.phase == "waiting" and tracked.head == 0  # a kept-alive client with nothing to ask
        refused = tracked.phase == "refused"  # counted when it was refused
        self._drop(tracked, None if idle or refused else "request-timeout")

    def _evict(self) -> None:
        for phase in _EVICTION_ORDER:
            for tracked in self._open.values():
                if tracked.phase == phase:
                    self._drop(tracked, "connection-budget")
                    return
        # Every connection is inside a route, each about to answer: let the new one in too.

    def _drop(self, tracked: _Tracked, reason: str | None) -> None:
        self.closed(tracked.handler)
        if reason is not None:
            self._metrics.count("http_rejections", reason)
        tracked.handler.force_close()

    async def _read_body(self, request: web.Request, tracked: _Tracked) -> web.Response | None:
        """Read the body (cached for the route), or return the response that refuses it."""
        if hdrs.UPGRADE in request.headers or not request.can_read_body:
            return None  # an upgrade's bytes after the request belong to the WebSocket
        length = request.content_length
        if length is not None and length > MAX_BODY_BYTES:
            return self._too_large()
        try:
            # The application's client_max_size stops a chunked body at the same size.
            tracked.body = len(await request.read())
        except web.HTTPRequestEntityTooLarge:
            return self._too_large()
        except (ConnectionError, web.RequestPayloadError, HttpProcessingError):
            # Dropped at its deadline (counted then), gone, or chunks that break their own framing.
            if request.protocol in self._open:
                self._metrics.count("http_rejections", "bad-body")
            response = web.Response(status=400, text="400 Bad Request: the body could not be read.\n")
            response.force_close()
            return response
        return None

    def _too_large(self) -> web.Response:
        self._metrics.count("http_rejections", "body-too-large")
        response = web.Response(
            status=413, text=f"413 Content Too Large: bodies are limited to {MAX_BODY_BYTES} bytes.\n"
        )
        response.force_close()
        return response
