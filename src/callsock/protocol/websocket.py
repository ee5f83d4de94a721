"""One server-side WebSocket connection as a state machine, sans-I/O: bytes in, messages and bytes out.

:class:`ServerWebSocket` is fed what the socket read (:meth:`~ServerWebSocket.receive_data`) and
returns the data messages in it; control frames are handled here (a ping is answered, a close
is recorded). What it wants written is collected and handed over by
:meth:`~ServerWebSocket.data_to_send`, and :attr:`~ServerWebSocket.close_tcp` says when the
driver must close the TCP connection. Timers (the close timeout, idle timeouts) belong to the
driver; nothing here sleeps or touches a socket.

The closing handshake (RFC 6455 section 7):

- The peer's close frame is recorded (:attr:`~ServerWebSocket.close_received`) and *not* answered
  at once: the layer above answers with :meth:`~ServerWebSocket.send_close` when the call is
  finished, so a peer that sees the close sees the call's recording (section 5.5.1 asks for the
  answer "as soon as practical"). Nothing after a close frame is parsed.
- Once a close frame has gone both ways the server closes TCP first (section 7.1.1).
- A peer that breaks the framing is failed (section 7.1.7): nothing more is parsed, the
  messages before the fault are handed over (replies to them may still be sent), then a close
  frame with the error's code, and TCP is closed at once, without waiting for the peer's reply.
"""

from __future__ import annotations

import enum

from .codes import CloseCode
from .frames import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameError,
    FrameReader,
    close_frame,
    encode_frame,
    parse_close,
)

__all__ = ["ServerWebSocket", "WebSocketState"]


class WebSocketState(enum.Enum):
    """Where the connection is in RFC 6455's life cycle (section 4 on)."""

    OPEN = "open"
    CLOSING = "closing"  # a close frame went one way
    CLOSED = "closed"  # a close frame went both ways, or the connection failed


class ServerWebSocket:
    """The server side of one WebSocket connection, after the opening handshake.

    Args:
        max_message_bytes: the largest data message accepted (fragments joined); a larger one
            fails the connection with 1009 as soon as a frame header announces it.
    """

    def __init__(self, max_message_bytes: int) -> None:
        self.state = WebSocketState.OPEN
        self.close_sent = False
        self.close_received = False
        self.close_code: int | None = None
        """The code of the peer's close frame (``None`` when it carried none)."""
        self.failure: FrameError | None = None
        """What broke the framing, once the connection has failed."""
        self.close_tcp = False
        """Whether the driver must now close the TCP connection."""
        self.outgoing_bytes = 0
        """Bytes waiting in :meth:`data_to_send`."""
        self._reader = FrameReader(max_message_bytes)
        self._outgoing: list[bytes] = []

    @property
    def open(self) -> bool:
        """Whether data messages may still be sent."""
        return not self.close_sent

    def receive_data(self, data: bytes) -> list[tuple[int, bytes | bytearray]]:
        """Parse what the peer sent; return its data messages as ``(opcode, payload)``, in order.

        Control frames are handled here. After a close frame, or a framing error, nothing more
        is parsed: later bytes are ignored.
        """
        if self.close_received or self.failure is not None:
            return []
        try:
            frames = self._reader.feed(data)
        except FrameError as exc:
            frames = exc.messages
            self._fail(exc)
            messages = self._handle(frames)
            return messages
        return self._handle(frames)

    def receive_eof(self) -> None:
        """The peer closed TCP: the connection is over, whatever its state."""
        self.state = WebSocketState.CLOSED

    def send_text(self, data: bytes | bytearray) -> None:
        """Queue one text message (``data`` is UTF-8); see :meth:`send`."""
        self.send(OP_TEXT, data)

    def send(self, opcode: int, data: bytes | bytearray) -> None:
        """Queue one data message, text or binary.

        Raises:
            RuntimeError: a close frame was already sent.
        """
        if self.close_sent:
            raise RuntimeError("cannot send after the close frame")
        frame = encode_frame(opcode, data)
        self._outgoing.append(frame)
        self.outgoing_bytes += len(frame)

    def send_close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Queue the close frame (once); TCP is to be closed when the peer's has arrived too."""
        if self.close_sent:
            return
        self.close_sent = True
        self._queue(close_frame(code, reason))
        if self.close_received or self.failure is not None:
            self.state = WebSocketState.CLOSED
            self.close_tcp = True
        else:
            self.state = WebSocketState.CLOSING

    def data_to_send(self) -> list[bytes]:
        """Return, and forget, the frames waiting to be written (a failure's close frame last)."""
        if self.failure is not None and not self.close_sent:
            self.close_sent = True
            self._queue(close_frame(self.failure.code, self.failure.reason))
        out, self._outgoing = self._outgoing, []
        self.outgoing_bytes = 0
        return out

    def _handle(self, frames: list[tuple[int, bytes | bytearray]]) -> list[tuple[int, bytes | bytearray]]:
        # The usual read holds only data messages: return the list as it is.
        for opcode, _ in frames:
            if opcode >= OP_CLOSE:
                break
        else:
            return frames
        messages: list[tuple[int, bytes | bytearray]] = []
        for opcode, payload in frames:
            if opcode < OP_CLOSE:
                messages.append((opcode, payload))
            elif opcode == OP_PING:
                if not self.close_sent:
                    self._queue(encode_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                self._peer_closed(payload)
                break  # nothing after a close frame counts (section 5.5.1)
        return messages

    def _peer_closed(self, payload: bytes | bytearray) -> None:
        try:
            self.close_code, _ = parse_close(payload)
        except FrameError as exc:
            self._fail(exc)
            return
        self.close_received = True
        if self.close_sent:
            self.state = WebSocketState.CLOSED
            self.close_tcp = True
        else:
            self.state = WebSocketState.CLOSING

    def _fail(self, error: FrameError) -> None:
        # The close frame goes out with the next data_to_send(), after any replies to the messages
        # that came before the fault, which are still handed over and may still be answered.
        self.failure = error
        self.state = WebSocketState.CLOSED
        self.close_tcp = True

    def _queue(self, frame: bytes) -> None:
        self._outgoing.append(frame)
        self.outgoing_bytes += len(frame)
