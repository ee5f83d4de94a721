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
import hashlib
import struct
from typing import Final

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

CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_INVALID_DATA: Final = 1007
CLOSE_TOO_BIG: Final = 1009


class FrameError(Exception):
    """The peer broke RFC 6455; the connection must close with ``code``.

    Attributes:
        code: the close code.
        reason: what was wrong.
        messages: the whole messages that arrived before the fault, to be handled first.
    """

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
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
        raise FrameError(CLOSE_PROTOCOL_ERROR, "close frame with a one-byte payload")
    code: int = _U16.unpack_from(payload)[0]
    if not _sendable_close_code(code):
        raise FrameError(CLOSE_PROTOCOL_ERROR, f"close code {code} may not be sent (section 7.4)")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError(CLOSE_INVALID_DATA, "close reason is not UTF-8") from None
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
        self._buffer = b""
        self._fragments: list[bytes | bytearray] = []
        self._fragment_opcode = 0
        self._fragment_bytes = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes | bytearray]]:
        """Parse ``data``; return the complete messages in it as ``(opcode, payload)``.

        Raises:
            FrameError: the stream breaks RFC 6455 or the size limit; the messages before the
                fault are in its ``messages``.
        """
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        messages: list[tuple[int, bytes | bytearray]] = []
        try:
            return self._parse(data, messages)
        except FrameError as exc:
            exc.messages = messages
            raise

    def _parse(
        self, data: bytes, messages: list[tuple[int, bytes | bytearray]]
    ) -> list[tuple[int, bytes | bytearray]]:
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
            payload = _unmask(memoryview(data)[start : start + length], data[start - 4 : start])
            position = start + length
            if first & 0x80 and opcode != OP_CONTINUATION and not self._fragments:
                messages.append((opcode, payload))  # the usual case: a whole message
            else:
                self._fragment(first & 0x80, opcode, payload, messages)
        if position < end:
            self._buffer = data[position:]
        return messages

    def _check_header(self, first: int, second: int, opcode: int, length: int) -> None:
        if first & 0x70:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "reserved bits set without an extension")
        if not second & 0x80:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "client frame not masked")
        if opcode in _CONTROL_OPCODES:
            if length > 125 or not first & 0x80:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "control frame fragmented or over 125 bytes")
        elif opcode not in _DATA_OPCODES:
            raise FrameError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
        elif self._fragment_bytes + length > self.max_message_bytes:
            raise FrameError(CLOSE_TOO_BIG, f"message over {self.max_message_bytes} bytes")

    def _fragment(
        self, fin: int, opcode: int, payload: bytes | bytearray, messages: list[tuple[int, bytes | bytearray]]
    ) -> None:
        if opcode in _CONTROL_OPCODES:  # may arrive between the fragments of a message
            messages.append((opcode, payload))
            return
        if opcode == OP_CONTINUATION:
            if not self._fragments:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "continuation frame without a message")
        elif self._fragments:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "new message before the last one finished")
        else:
            self._fragment_opcode = opcode
        self._fragments.append(payload)
        self._fragment_bytes += len(payload)
        if fin:
            messages.append((self._fragment_opcode, b"".join(self._fragments)))
            self._fragments = []
            self._fragment_bytes = 0


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
