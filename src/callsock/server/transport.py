"""The WebSocket over aiohttp: bytes between the socket and the sans-I/O state machine, and timers.

aiohttp answers HTTP and the upgrade request. From the ``101 Switching Protocols`` on, the
connection's bytes go to a :class:`WebSocketTransport`, installed as the request's payload parser
(the hook aiohttp's own WebSocket uses): frames are parsed as bytes arrive
(:class:`~callsock.websocket.ServerWebSocket`) and each message goes to the :class:`Receiver` at
once, with no task woken per message; replies are framed and written straight to the socket,
those of one read in one system call.

The WebSocket rules (framing, the closing handshake) live in the state machine; this module
keeps only what needs a clock or a socket: the idle and first-message timeouts, the wait for the
peer's close frame, and reading that pauses while the peer does not read what it asked for.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any, Final, Protocol

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from ..protocol.codes import CloseCode
from ..protocol.errors import (
    CallEnded,
    FramingError,
    IdleTimeout,
    InvalidMessage,
    MessageTooBig,
    PolicyViolation,
    StreamError,
)
from ..protocol.frames import OP_BINARY, OP_TEXT, FrameError, accept_key
from ..protocol.websocket import ServerWebSocket

__all__ = ["Receiver", "WebSocketTransport", "accept", "check_upgrade"]

OUTGOING_LIMIT: Final = 64 * 1024
"""Bytes queued for the peer past which a writer is told to wait (``write`` returns True)."""

TURN_BUDGET: Final = 0.002
"""Seconds one connection may spend handing messages over before reading pauses for a turn."""

UPGRADE_REQUIRED: Final = (
    "426 Upgrade Required: this path serves Twilio Media Streams over WebSocket "
    '(point <Stream url="wss://..."> at it); a plain HTTP request cannot use it.\n'
)

_FRAMING_ERRORS: Final[dict[int, type[StreamError]]] = {
    error.close_code: error for error in (MessageTooBig, InvalidMessage, PolicyViolation, FramingError)
}


class Receiver(Protocol):
    """What a transport hands the peer's messages and the connection's events to."""

    @property
    def started(self) -> bool:
        """Whether the first message the connection waits for (``start``) has arrived."""

    def receive_text(self, data: bytes | bytearray) -> None:
        """A text message (valid UTF-8)."""

    def receive_binary(self, data: bytes | bytearray) -> None:
        """A binary message."""

    def peer_closed(self, code: int | None) -> None:
        """The peer's close frame arrived; answer with :meth:`WebSocketTransport.close`."""

    def reject(self, error: StreamError) -> None:
        """The peer broke the framing; the transport has already failed the connection."""

    def timed_out(self, error: IdleTimeout) -> None:
        """Nothing (or no first message) arrived in time; close with ``error``'s code."""


class WebSocketTransport:
    """An upgraded connection: aiohttp's payload parser on one side, a receiver on the other.

    Args:
        transport: the socket.
        writer: aiohttp's writer of the response (its ``drain`` knows when the socket is full).
        max_message_bytes: the largest message accepted (1009 past it).
        close_timeout: how long to wait for the peer's close frame once ours is sent.
        idle_timeout: how long the peer may send no whole data message.
        start_timeout: how long the receiver may wait for its first message (``started``).
    """

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
        self._ws = ServerWebSocket(max_message_bytes)
        self._close_timeout = close_timeout
        self._close_timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._reading = False  # inside feed_data: writes wait for its end
        self._flush_scheduled = False
        self._close_handled = False
        self._paused: set[str] = set()  # why reading is paused: "busy", "backlog"
        self._resuming: asyncio.Task[None] | None = None
        self._queued: list[tuple[int, bytes | bytearray]] = []  # parsed, not yet handed over
        self._next = 0
        self._spent = 0.0  # seconds spent handing messages over since reading last paused
        self.receiver: Receiver | None = None
        self.done: asyncio.Future[None] = self._loop.create_future()
        """Done when the TCP connection is gone."""
        # One timer, re-armed lazily: data only moves the deadline, the timer checks it.
        self._idle_timeout = idle_timeout
        self._start_deadline = self._loop.time() + start_timeout
        self._last_data = self._loop.time()
        self._idle_timer = self._loop.call_at(
            min(self._start_deadline, self._last_data + idle_timeout), self._check_idle
        )

    @property
    def closing(self) -> bool:
        """Whether the close frame has been sent (nothing more may be written)."""
        return self._ws.close_sent

    # The payload-parser side (aiohttp's RequestHandler calls these).

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        """Parse what arrived and hand its messages over (some later, if it is a flood)."""
        self._queued = self._ws.receive_data(data)
        self._next = 0
        self._dispatch()
        return False, b""

    def _dispatch(self) -> None:
        """Hand the queued messages over, for at most ``TURN_BUDGET`` of this turn of the loop.

        A client that floods the socket could otherwise keep the event loop to itself: one read
        can hold a thousand messages, and uvloop makes up to 32 reads a turn. Past the budget,
        reading pauses and the rest waits for the next turn, after everyone else's.
        """
        queued, receiver, loop = self._queued, self.receiver, self._loop
        began = loop.time()
        index, count = self._next, len(queued)
        self._reading = True
        try:
            if count:
                self._last_data = began  # only whole messages keep a connection alive
            if receiver is not None:
                while index < count:
                    opcode, payload = queued[index]
                    index += 1
                    if opcode == OP_TEXT:
                        receiver.receive_text(payload)
                    else:
                        receiver.receive_binary(payload)
                    if not index % 64 and loop.time() - began > TURN_BUDGET:
                        break
            self._next = index
            if index < count:
                self._pause_reading("busy")
                loop.call_soon(self._dispatch)
                return
            self._queued = []
            self._after_messages()
        finally:
            self._reading = False
            self._flush()
        self._spent += loop.time() - began
        if self._spent > TURN_BUDGET:  # many small reads in one turn add up the same way
            self._pause_reading("busy")
            loop.call_soon(self._rested)
        elif "busy" in self._paused:
            self._resume_reading("busy")

    def _rested(self) -> None:
        self._spent = 0.0
        self._resume_reading("busy")

    def _after_messages(self) -> None:
        ws = self._ws
        if ws.failure is not None:
            self._broken(ws.failure)
        elif ws.close_received and not self._close_handled:
            self._close_handled = True
            self._peer_closed(ws.close_code)

    def _pause_reading(self, reason: str) -> None:
        if not self._paused:
            self._transport.pause_reading()
        self._paused.add(reason)

    def _resume_reading(self, reason: str) -> None:
        self._paused.discard(reason)
        if not self._paused and not self._transport.is_closing():
            self._transport.resume_reading()

    def feed_eof(self) -> None:
        """The TCP connection is gone."""
        self._ws.receive_eof()
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._idle_timer.cancel()
        if not self.done.done():
            self.done.set_result(None)

    # The sending side (a Connection and its Outbound call these).

    def write(self, data: bytes) -> bool:
        """Frame one text message, written with the others of this read; True if backlogged.

        Raises:
            CallEnded: the close frame has been sent.
        """
        return self._send(OP_TEXT, data)

    def write_binary(self, data: bytes | bytearray) -> bool:
        """Frame one binary message; see :meth:`write`."""
        return self._send(OP_BINARY, data)

    async def drain(self) -> None:
        """Wait for the peer to read (aiohttp's writer knows when the transport is paused)."""
        try:
            await self._writer.drain()
        except ConnectionError as exc:
            raise CallEnded() from exc

    def close(self, code: int, reason: str) -> None:
        """Send the close frame; TCP closes once the peer's close frame is in too, or on timeout."""
        self._ws.send_close(code, reason)
        self._flush()

    def _send(self, opcode: int, data: bytes | bytearray) -> bool:
        ws = self._ws
        if ws.close_sent:
            raise CallEnded()
        ws.send(opcode, data)
        if not self._reading and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return ws.outgoing_bytes > OUTGOING_LIMIT or bool(self._protocol.writing_paused)

    def _check_idle(self) -> None:
        if self.closing:
            return
        now = self._loop.time()
        receiver = self.receiver
        waiting_for_start = receiver is not None and not receiver.started
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
        if self.receiver is not None:
            self.receiver.timed_out(error)
        else:
            self.close(error.close_code, error.close_reason)

    def _peer_closed(self, code: int | None) -> None:
        # The peer began the close: the receiver answers when it is ready (its call published).
        if self.receiver is not None:
            self.receiver.peer_closed(code)
        else:
            self.close(code or CloseCode.NORMAL, "")

    def _flush(self) -> None:
        # Frames written while one read is handled, or during one turn of the event loop, leave
        # in one system call: under load (many messages a read) that saves a write per message.
        self._flush_scheduled = False
        ws = self._ws
        if ws.outgoing_bytes or ws.close_tcp:
            frames = ws.data_to_send()
            if frames and not self._transport.is_closing():  # the peer may be gone already
                self._transport.writelines(frames)
        if ws.close_tcp:
            self._transport.close()
            return
        if ws.close_sent and self._close_timer is None:
            self._close_timer = self._loop.call_later(self._close_timeout, self._transport.close)
        if self._protocol.writing_paused and "backlog" not in self._paused:
            # The peer does not read what it asks for (pongs, say): stop reading it until it does,
            # so what it makes us write cannot pile up.
            self._pause_reading("backlog")
            self._resuming = self._loop.create_task(self._resume_reading_when_drained())

    async def _resume_reading_when_drained(self) -> None:
        try:
            await self._writer.drain()
        except ConnectionError:
            return
        self._resume_reading("backlog")

    def _broken(self, exc: FrameError) -> None:
        kind = _FRAMING_ERRORS.get(exc.code, FramingError)
        if self.receiver is not None:
            self.receiver.reject(kind(exc.rule, "", exc.reason))


def check_upgrade(request: web.Request) -> web.Response | None:
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


async def accept(
    request: web.Request, **options: Any
) -> tuple[web.StreamResponse, WebSocketTransport | None]:
    """Answer a checked upgrade with 101 and take the connection's bytes over.

    Set the returned transport's :attr:`~WebSocketTransport.receiver` before awaiting anything:
    bytes can arrive from the next turn of the event loop on. ``options`` are the transport's.

    Returns:
        The response (for aiohttp to finish), and the transport, or ``None`` if the client left.
    """
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
        return response, None  # the client left during the handshake
    if writer is None or request.transport is None:
        return response, None
    transport = WebSocketTransport(request.transport, writer, **options)
    request.protocol.set_parser(transport)  # type: ignore[arg-type]  # aiohttp's parser hook
    request.protocol.keep_alive(False)
    return response, transport
