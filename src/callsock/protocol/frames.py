"""WebSocket framing (RFC 6455), server side, sans-I/O: bytes in, messages out, and back.

Why callsock frames its own messages: aiohttp's WebSocket object hands each message to a task
that awaits it and sends each reply through another awaited writer. Media Streams traffic is
thousands of small messages a second, one at a time, so that machinery costs more than the
work done on each message. Here frames are parsed synchronously as bytes arrive and replies
are written straight to the transport; aiohttp still does HTTP and the upgrade handshake.

:class:`FrameReader` turns client bytes into whole messages (fragments joined, control frames
passed through) and raises :class:`FrameError`, carrying the close code, on anything RFC 6455
forbids: an unmasked client frame (section 5.1), reserved bits without an extension (5.2),
an unknown opcode, a fragmented or oversized control frame (5.5), a continuation without a
start, a message over the size limit (1009).
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import struct
from typing import Final

from .codes import CloseCode

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "FrameError",
    "FrameReader",
    "accept_key",
    "close_frame",
    "encode_frame",
    "parse_close",
]

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

_DATA_OPCODES: Final = frozenset((OP_CONTINUATION, OP_TEXT, OP_BINARY))
_CONTROL_OPCODES: Final = frozenset((OP_CLOSE, OP_PING, OP_PONG))
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
_U16: Final = struct.Struct(">H")
_U64: Final = struct.Struct(">Q")


MIN_FRAGMENTS: Final = 1024
"""The most frames one message may come in is this, or one per 64 bytes of the size limit if that
is more: empty continuation frames cost memory too (about 56 bytes each, held until the end)."""


class FrameError(Exception):
    """The peer broke RFC 6455; the connection must close with ``code``.

    Attributes:
        code: the close code.
        reason: what was wrong.
        rule: a stable, kebab-case name of the rule broken (a metric label).
        messages: the whole messages that arrived before the fault, to be handled first.
    """

    def __init__(self, code: int, reason: str, rule: str = "websocket-framing") -> None:
        self.code = code
        self.reason = reason
        self.rule = rule
        self.messages: list[tuple[int, bytes | bytearray]] = []
        super().__init__(reason)


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value for a client's ``Sec-WebSocket-Key`` (section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def encode_frame(opcode: int, payload: bytes | bytearray) -> bytes:
    """One unmasked, final server frame (servers never mask, section 5.1)."""
    size = len(payload)
    if size < 126:
        return bytes((0x80 | opcode, size)) + payload
    if size < 1 << 16:
        return bytes((0x80 | opcode, 126)) + _U16.pack(size) + payload
    return bytes((0x80 | opcode, 127)) + _U64.pack(size) + payload


def close_frame(code: int, reason: str) -> bytes:
    """A close frame with ``code`` and ``reason`` (cut, at a character, to fit 125 bytes)."""
    encoded = reason.encode()[:123].decode(errors="ignore").encode()
    return encode_frame(OP_CLOSE, _U16.pack(code) + encoded)


def parse_close(payload: bytes | bytearray) -> tuple[int | None, str]:
    """The code and reason of a close frame's payload (section 5.5.1).

    Raises:
        FrameError: a one-byte payload, a code no endpoint may send, or a reason that is not UTF-8.
    """
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise FrameError(CloseCode.PROTOCOL_ERROR, "close frame with a one-byte payload")
    code: int = _U16.unpack_from(payload)[0]
    if not _sendable_close_code(code):
        raise FrameError(CloseCode.PROTOCOL_ERROR, f"close code {code} may not be sent (section 7.4)")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError(CloseCode.INVALID_DATA, "close reason is not UTF-8", "close-frame") from None
    return code, reason


def _sendable_close_code(code: int) -> bool:
    # Section 7.4.1 defines 1000-1011 but reserves 1004-1006 (1005 and 1006 are never sent);
    # 1012-1014 are in IANA's registry; 3000-4999 belong to libraries and applications.
    return (1000 <= code <= 1014 and code not in (1004, 1005, 1006)) or 3000 <= code <= 4999


class FrameReader:
    """Parses a client's byte stream into messages.

    Args:
        max_message_bytes: the largest message accepted; a larger one raises (1009) as soon
            as its header announces it, before its payload is read.
    """

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_fragments = max(MIN_FRAGMENTS, max_message_bytes // 64)
        self._buffer = bytearray()  # the start of a frame whose end has not arrived yet
        self._awaited = 0  # the buffer's size at which that frame (or its header) is complete
        self._fragments: list[bytes | bytearray] = []
        self._fragment_opcode = 0
        self._fragment_bytes = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")()

    def feed(self, data: bytes) -> list[tuple[int, bytes | bytearray]]:
        """Parse ``data``; return the complete messages in it as ``(opcode, payload)``.

        Raises:
            FrameError: the stream breaks RFC 6455 or the size limit; the messages before the
                fault are in its ``messages``.
        """
        buffer = self._buffer
        messages: list[tuple[int, bytes | bytearray]] = []
        try:
            if buffer:
                # A frame arriving in pieces: append (amortized, never re-copying what is held),
                # and parse again only once the bytes its header asks for are in.
                buffer += data
                if len(buffer) < self._awaited:
                    return messages
                del buffer[: self._parse(buffer, messages)]
            else:  # the usual case: parse what was read as it is
                position = self._parse(data, messages)
                if position < len(data):
                    buffer += memoryview(data)[position:]
            self._awaited = _frame_size(buffer) if buffer else 0
            return messages
        except FrameError as exc:
            exc.messages = messages
            raise

    def _parse(self, data: bytes | bytearray, messages: list[tuple[int, bytes | bytearray]]) -> int:
        """Append the messages of the whole frames at the start of ``data``; return where they end."""
        position = 0
        end = len(data)
        while end - position >= 2:
            first, second = data[position], data[position + 1]
            length = second & 0x7F
            header = 2
            if length == 126:
                if end - position < 4:
                    break
                length = _U16.unpack_from(data, position + 2)[0]
                header = 4
            elif length == 127:
                if end - position < 10:
                    break
                length = _U64.unpack_from(data, position + 2)[0]
                header = 10
            opcode = first & 0x0F
            self._check_header(first, second, opcode, length)
            start = position + header + 4
            if end - start < length:
                break
            payload = _unmask(memoryview(data)[start : start + length], bytes(data[start - 4 : start]))
            position = start + length
            if first & 0x80 and opcode != OP_CONTINUATION and not self._fragments:
                if opcode == OP_TEXT and not payload.isascii():  # Twilio's messages are ASCII
                    _check_utf8(payload)
                messages.append((opcode, payload))  # the usual case: a whole message
            else:
                self._fragment(first & 0x80, opcode, payload, messages)
        return position

    def _check_header(self, first: int, second: int, opcode: int, length: int) -> None:
        if first & 0x70:
            raise FrameError(CloseCode.PROTOCOL_ERROR, "reserved bits set without an extension")
        if not second & 0x80:
            raise FrameError(CloseCode.PROTOCOL_ERROR, "client frame not masked")
        if opcode in _CONTROL_OPCODES:
            if length > 125 or not first & 0x80:
                raise FrameError(CloseCode.PROTOCOL_ERROR, "control frame fragmented or over 125 bytes")
        elif opcode not in _DATA_OPCODES:
            raise FrameError(CloseCode.PROTOCOL_ERROR, f"unknown opcode {opcode}")
        elif self._fragment_bytes + length > self.max_message_bytes:
            detail = f"message over {self.max_message_bytes} bytes"
            raise FrameError(CloseCode.MESSAGE_TOO_BIG, detail, "message-too-big")

    def _fragment(
        self, fin: int, opcode: int, payload: bytes | bytearray, messages: list[tuple[int, bytes | bytearray]]
    ) -> None:
        if opcode in _CONTROL_OPCODES:  # may arrive between the fragments of a message
            messages.append((opcode, payload))
            return
        if opcode == OP_CONTINUATION:
            if not self._fragments:
                raise FrameError(CloseCode.PROTOCOL_ERROR, "continuation frame without a message")
        elif self._fragments:
            raise FrameError(CloseCode.PROTOCOL_ERROR, "new message before the last one finished")
        else:
            self._fragment_opcode = opcode
        if len(self._fragments) == self.max_fragments:
            detail = f"message in over {self.max_fragments} frames"
            raise FrameError(CloseCode.POLICY_VIOLATION, detail, "fragments")
        if self._fragment_opcode == OP_TEXT:  # fail as soon as a fragment cannot be UTF-8 (8.1)
            try:
                self._utf8.decode(payload, final=bool(fin))
            except UnicodeDecodeError:
                raise _not_utf8() from None
        self._fragments.append(payload)
        self._fragment_bytes += len(payload)
        if fin:
            messages.append((self._fragment_opcode, b"".join(self._fragments)))
            self._utf8.reset()
            self._fragments = []
            self._fragment_bytes = 0


def _check_utf8(payload: bytes | bytearray) -> None:
    """Fail a text message that is not UTF-8 (section 8.1), whatever part of it a reader would use."""
    try:
        payload.decode()
    except UnicodeDecodeError:
        raise _not_utf8() from None


def _not_utf8() -> FrameError:
    return FrameError(CloseCode.INVALID_DATA, "text message is not UTF-8", "invalid-utf8")


def _frame_size(data: bytearray) -> int:
    """The size of the (masked) frame starting ``data``, or of its header while that is incomplete."""
    if len(data) < 2:
        return 2
    length = data[1] & 0x7F
    if length == 126:
        return 4 if len(data) < 4 else 8 + _U16.unpack_from(data, 2)[0]
    if length == 127:
        return 10 if len(data) < 10 else 14 + _U64.unpack_from(data, 2)[0]
    return 6 + length


try:
    # aiohttp (a dependency already) ships the XOR in C; it is ten times the speed of the
    # big-integer version below, which stays as the fallback should that module move.
    from aiohttp._websocket.helpers import websocket_mask as _mask_in_place

    _C_MASK = True
except ImportError:  # pragma: no cover
    _C_MASK = False


def _unmask(payload: memoryview, mask: bytes) -> bytes | bytearray:
    """XOR the payload with the 4-byte masking key (section 5.3)."""
    size = len(payload)
    if _C_MASK:
        unmasked = bytearray(payload)
        _mask_in_place(mask, unmasked)
        return unmasked
    if not size:
        return b""
    key = int.from_bytes((mask * ((size + 3) // 4))[:size], "little")
    return (int.from_bytes(payload, "little") ^ key).to_bytes(size, "little")
