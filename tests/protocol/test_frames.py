"""RFC 6455 framing, server side: FrameReader, encode_frame, close frames and the accept key."""

from __future__ import annotations

import base64
import itertools
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callsock.protocol.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
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
from callsock.tools.bench import client_frame

from ..helpers import RFC_KEY, raw_frame

KEY = RFC_KEY  # the masking key of the examples in RFC 6455 section 5.7
LIMIT = 1 << 20
Message = tuple[int, bytes]


def test_raw_frame_follows_the_rfc() -> None:
    """The tests' frame builder reproduces RFC 6455 section 5.7's examples and each length form."""
    assert raw_frame(OP_TEXT, b"Hello") == bytes.fromhex("818537fa213d7f9f4d5158")
    assert raw_frame(OP_TEXT, b"Hello", None) == bytes.fromhex("810548656c6c6f")
    assert raw_frame(OP_BINARY, b"", announce=70000)[:10] == bytes.fromhex("82ff0000000000011170")
    payload = bytes(range(256)) * 3
    masked = raw_frame(OP_BINARY, payload)[8:]
    assert masked == bytes(octet ^ KEY[i % 4] for i, octet in enumerate(payload))


def parse_server_frames(data: bytes) -> list[tuple[bool, int, bytes]]:
    """Split server bytes into ``(fin, opcode, payload)``; servers never mask, so a mask bit fails."""
    frames: list[tuple[bool, int, bytes]] = []
    position = 0
    while position < len(data):
        first, second = data[position], data[position + 1]
        assert first & 0x70 == 0, "reserved bits set"
        assert second & 0x80 == 0, "server frame masked"
        size = second & 0x7F
        position += 2
        if size == 126:
            (size,) = struct.unpack(">H", data[position : position + 2])
            assert size >= 126, "16-bit length used for a short payload"
            position += 2
        elif size == 127:
            (size,) = struct.unpack(">Q", data[position : position + 8])
            assert 1 << 16 <= size < 1 << 63, "64-bit length used for a short payload"
            position += 8
        payload = data[position : position + size]
        assert len(payload) == size, "truncated frame"
        position += size
        frames.append((bool(first & 0x80), first & 0x0F, payload))
    return frames


def feed_all(reader: FrameReader, chunks: list[bytes]) -> list[Message]:
    """Feed each chunk in turn; return every message as ``(opcode, bytes)``."""
    messages: list[Message] = []
    for chunk in chunks:
        messages.extend((opcode, bytes(payload)) for opcode, payload in reader.feed(chunk))
    return messages


def raises_code(data: bytes, code: int, limit: int = LIMIT) -> FrameError:
    """Feed ``data`` to a fresh reader and check that it raises FrameError with ``code``."""
    with pytest.raises(FrameError) as info:
        FrameReader(limit).feed(data)
    assert info.value.code == code
    assert info.value.reason
    return info.value


# FrameReader: well-formed input


def test_rfc_example_masked_hello() -> None:
    """The masked "Hello" of RFC 6455 section 5.7, as literal bytes, is one text message."""
    data = bytes.fromhex("81 85 37 fa 21 3d 7f 9f 4d 51 58")
    assert feed_all(FrameReader(LIMIT), [data]) == [(OP_TEXT, b"Hello")]


def test_rfc_example_masked_pong() -> None:
    """The masked pong of RFC 6455 section 5.7 is passed through with its payload."""
    data = bytes.fromhex("8a 85 37 fa 21 3d 7f 9f 4d 51 58")
    assert feed_all(FrameReader(LIMIT), [data]) == [(OP_PONG, b"Hello")]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536])
def test_client_frame_of_each_length_form(size: int) -> None:
    """bench.client_frame (zero key) parses back to the same text for 7-, 16- and 64-bit lengths."""
    payload = bytes(i % 127 for i in range(size))  # ASCII: a text message must be UTF-8
    data = client_frame(payload)
    assert data[1] & 0x80
    assert data[1] & 0x7F == (size if size < 126 else 126 if size < 1 << 16 else 127)
    assert feed_all(FrameReader(LIMIT), [data]) == [(OP_TEXT, payload)]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536])
def test_masked_frame_of_each_length_form(size: int) -> None:
    """A frame masked with a non-zero key parses to the original payload for every length form."""
    payload = bytes(i % 127 for i in range(size))  # ASCII: a text message must be UTF-8
    data = raw_frame(OP_TEXT, payload)
    assert len(data) == len(payload) + 4 + (2 if size < 126 else 4 if size < 1 << 16 else 10)
    assert feed_all(FrameReader(LIMIT), [data]) == [(OP_TEXT, payload)]


def test_mask_is_applied() -> None:
    """The payload on the wire differs from the message, and the reader undoes the XOR exactly."""
    payload = b'{"event":"media","media":{"payload":"AAAA"}}'
    data = raw_frame(OP_TEXT, payload, b"\x01\x80\xff\x5a")
    assert payload not in data
    assert feed_all(FrameReader(LIMIT), [data]) == [(OP_TEXT, payload)]
    other_key = raw_frame(OP_TEXT, payload, b"\x02\x80\xff\x5a")
    assert other_key != data
    assert feed_all(FrameReader(LIMIT), [other_key]) == [(OP_TEXT, payload)]


def test_binary_and_control_frames_keep_their_opcodes() -> None:
    """Binary, ping, pong and close frames come out with their own opcode and payload."""
    data = (
        raw_frame(OP_BINARY, b"\x00\x01\x02")
        + raw_frame(OP_PING, b"ping")
        + raw_frame(OP_PONG, b"")
        + raw_frame(OP_CLOSE, b"\x03\xe8bye")
    )
    assert feed_all(FrameReader(LIMIT), [data]) == [
        (OP_BINARY, b"\x00\x01\x02"),
        (OP_PING, b"ping"),
        (OP_PONG, b""),
        (OP_CLOSE, b"\x03\xe8bye"),
    ]


def test_several_frames_in_one_chunk() -> None:
    """Several frames in one chunk are returned in order, whatever their length forms."""
    payloads = [b"a", b"", b"b" * 125, b"c" * 126, b"d" * 70000, b"e" * 3]
    data = b"".join(raw_frame(OP_TEXT, p, bytes((i, 7, 9, 200))) for i, p in enumerate(payloads))
    assert feed_all(FrameReader(LIMIT), [data]) == [(OP_TEXT, p) for p in payloads]


def test_partial_frame_waits_for_the_rest() -> None:
    """A chunk ending mid-frame yields the whole frames only; the rest completes with the next chunk."""
    reader = FrameReader(LIMIT)
    first, second = raw_frame(OP_TEXT, b"one"), raw_frame(OP_TEXT, b"two" * 50)
    data = first + second
    cut = len(first) + 7
    assert feed_all(reader, [data[:cut]]) == [(OP_TEXT, b"one")]
    assert feed_all(reader, [b""]) == []
    assert feed_all(reader, [data[cut:]]) == [(OP_TEXT, b"two" * 50)]


def test_every_split_point_gives_the_same_messages() -> None:
    """Two chunks cut at any byte of a 7-bit, a 16-bit and a control frame give the same messages."""
    data = raw_frame(OP_TEXT, b"hello") + raw_frame(OP_BINARY, bytes(range(200))) + raw_frame(OP_PING, b"p")
    expected = [(OP_TEXT, b"hello"), (OP_BINARY, bytes(range(200))), (OP_PING, b"p")]
    for cut in range(len(data) + 1):
        assert feed_all(FrameReader(LIMIT), [data[:cut], data[cut:]]) == expected, cut


def test_byte_by_byte() -> None:
    """Feeding one byte at a time gives the same messages, each as soon as its last byte arrives."""
    frames = [
        raw_frame(OP_TEXT, b"hello"),
        raw_frame(OP_TEXT, bytes(range(128)) * 4),  # ASCII: a text message must be UTF-8
        client_frame(b"x" * 300),
    ]
    reader = FrameReader(LIMIT)
    got: list[tuple[int, Message]] = []
    data = b"".join(frames)
    for i in range(len(data)):
        got.extend((i, m) for m in feed_all(reader, [data[i : i + 1]]))
    ends = [sum(len(f) for f in frames[: n + 1]) - 1 for n in range(len(frames))]
    assert got == [
        (ends[0], (OP_TEXT, b"hello")),
        (ends[1], (OP_TEXT, bytes(range(128)) * 4)),
        (ends[2], (OP_TEXT, b"x" * 300)),
    ]


def test_fragmented_message_with_interleaved_ping() -> None:
    """Text + continuation frames are joined; a ping between fragments is delivered in order."""
    parts = [
        raw_frame(OP_TEXT, b"Hel", fin=False),
        raw_frame(OP_PING, b"p1"),
        raw_frame(OP_CONTINUATION, b"lo ", b"\x00\x00\x00\x01", fin=False),
        raw_frame(OP_CONTINUATION, b"", fin=False),
        raw_frame(OP_CONTINUATION, b"world", b"\x10\x20\x30\x40"),
        raw_frame(OP_TEXT, b"next"),
    ]
    expected = [(OP_PING, b"p1"), (OP_TEXT, b"Hello world"), (OP_TEXT, b"next")]
    assert feed_all(FrameReader(LIMIT), [b"".join(parts)]) == expected
    reader = FrameReader(LIMIT)
    assert [feed_all(reader, [p]) for p in parts] == [
        [],
        [(OP_PING, b"p1")],
        [],
        [],
        [(OP_TEXT, b"Hello world")],
        [(OP_TEXT, b"next")],
    ]


def test_fragmented_binary_keeps_binary_opcode() -> None:
    """A binary message in fragments comes out as one binary message; an empty first fragment counts."""
    data = (
        raw_frame(OP_BINARY, b"", fin=False)
        + raw_frame(OP_CONTINUATION, b"\x01\x02", fin=False)
        + raw_frame(OP_CONTINUATION, b"\x03")
    )
    assert feed_all(FrameReader(LIMIT), [data]) == [(OP_BINARY, b"\x01\x02\x03")]


def test_message_of_exactly_the_limit_is_accepted() -> None:
    """A message of exactly max_message_bytes, whole or in fragments, is accepted."""
    assert feed_all(FrameReader(10), [raw_frame(OP_TEXT, b"0123456789")]) == [(OP_TEXT, b"0123456789")]
    data = raw_frame(OP_TEXT, b"01234", fin=False) + raw_frame(OP_CONTINUATION, b"56789")
    reader = FrameReader(10)
    assert feed_all(reader, [data]) == [(OP_TEXT, b"0123456789")]
    # the count starts again with the next message
    assert feed_all(reader, [raw_frame(OP_TEXT, b"abcdefghij")]) == [(OP_TEXT, b"abcdefghij")]


# FrameReader: errors


def test_unmasked_client_frame() -> None:
    """An unmasked client frame (the RFC's unmasked "Hello") is a protocol error (1002)."""
    raises_code(bytes.fromhex("81 05 48 65 6c 6c 6f"), 1002)
    raises_code(raw_frame(OP_PING, b"", None), 1002)


@pytest.mark.parametrize("rsv", [4, 2, 1, 7])
def test_reserved_bits(rsv: int) -> None:
    """RSV1, RSV2 or RSV3 set without a negotiated extension is a protocol error (1002)."""
    raises_code(raw_frame(OP_TEXT, b"x", rsv=rsv), 1002)


@pytest.mark.parametrize("opcode", [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcode(opcode: int) -> None:
    """A reserved opcode is a protocol error (1002)."""
    raises_code(raw_frame(opcode, b"x"), 1002)


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_control_frame_over_125_bytes(opcode: int) -> None:
    """A control frame of 126 bytes is a protocol error (1002); one of 125 bytes is fine."""
    raises_code(raw_frame(opcode, b"x" * 126), 1002)
    raises_code(raw_frame(opcode, b"x" * 126)[:4], 1002)  # known from the header alone
    assert feed_all(FrameReader(LIMIT), [raw_frame(opcode, b"x" * 125)]) == [(opcode, b"x" * 125)]


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_fragmented_control_frame(opcode: int) -> None:
    """A control frame without FIN is a protocol error (1002)."""
    raises_code(raw_frame(opcode, b"x", fin=False), 1002)


def test_continuation_without_a_message() -> None:
    """A continuation frame with no fragmented message open is a protocol error (1002)."""
    raises_code(raw_frame(OP_CONTINUATION, b"x"), 1002)
    raises_code(raw_frame(OP_CONTINUATION, b"x", fin=False), 1002)
    reader = FrameReader(LIMIT)
    reader.feed(raw_frame(OP_TEXT, b"a", fin=False) + raw_frame(OP_CONTINUATION, b"b"))
    with pytest.raises(FrameError) as info:
        reader.feed(raw_frame(OP_CONTINUATION, b"c"))  # the message was finished
    assert info.value.code == 1002


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_new_message_while_fragmented_message_open(opcode: int) -> None:
    """A new data frame before the fragmented message's final frame is a protocol error (1002)."""
    raises_code(raw_frame(OP_TEXT, b"abc", fin=False) + raw_frame(opcode, b"def"), 1002)
    raises_code(raw_frame(OP_TEXT, b"abc", fin=False) + raw_frame(opcode, b"def", fin=False), 1002)


@pytest.mark.parametrize("size", [101, 126, 65536, 1 << 40])
def test_too_big_raised_from_the_header_alone(size: int) -> None:
    """A frame announcing more than max_message_bytes raises 1009 from its header, payload unsent."""
    if size < 126:
        header = bytes((0x81, 0x80 | size))
    elif size < 1 << 16:
        header = bytes((0x81, 0x80 | 126)) + struct.pack(">H", size)
    else:
        header = bytes((0x81, 0x80 | 127)) + struct.pack(">Q", size)
    reader = FrameReader(100)
    assert reader.feed(header[:1]) == []
    with pytest.raises(FrameError) as info:
        reader.feed(header[1:])
    assert info.value.code == 1009


def test_fragments_over_the_limit() -> None:
    """Fragments whose total exceeds max_message_bytes raise 1009, though each one fits."""
    reader = FrameReader(10)
    assert reader.feed(raw_frame(OP_TEXT, b"012345", fin=False)) == []
    assert reader.feed(raw_frame(OP_PING, b"control frames do not count")) == [
        (OP_PING, b"control frames do not count")
    ]
    with pytest.raises(FrameError) as info:
        reader.feed(raw_frame(OP_CONTINUATION, b"6789X")[:2])
    assert info.value.code == 1009


# encode_frame, close_frame, parse_close


def test_encode_rfc_examples() -> None:
    """encode_frame writes the unmasked examples of RFC 6455 section 5.7 byte for byte."""
    assert encode_frame(OP_TEXT, b"Hello") == bytes.fromhex("81 05 48 65 6c 6c 6f")
    assert encode_frame(OP_PING, b"Hello") == bytes.fromhex("89 05 48 65 6c 6c 6f")
    assert encode_frame(OP_BINARY, bytes(256))[:4] == bytes.fromhex("82 7e 01 00")
    assert encode_frame(OP_BINARY, bytes(65536))[:10] == bytes.fromhex("82 7f 00 00 00 00 00 01 00 00")


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_encode_frame_parses_back(size: int, opcode: int) -> None:
    """Server frames are final, unmasked, use the shortest length form and carry the payload."""
    payload = bytes(i % 249 for i in range(size))
    data = encode_frame(opcode, payload)
    assert len(data) == size + (2 if size < 126 else 4 if size < 1 << 16 else 10)
    assert parse_server_frames(data) == [(True, opcode, payload)]
    assert parse_server_frames(encode_frame(opcode, bytearray(payload))) == [(True, opcode, payload)]


def test_close_frame_layout() -> None:
    """close_frame is a final close frame: the code in two big-endian bytes, then the UTF-8 reason."""
    assert close_frame(1000, "bye") == b"\x88\x05\x03\xe8bye"
    assert close_frame(1011, "") == b"\x88\x02\x03\xf3"
    [(fin, opcode, payload)] = parse_server_frames(close_frame(4000, "replaced"))
    assert (fin, opcode) == (True, OP_CLOSE)
    assert parse_close(payload) == (4000, "replaced")


def test_close_frame_truncates_long_ascii_reason() -> None:
    """A long reason is cut so the payload is exactly 125 bytes, the most a control frame holds."""
    reason = "".join(chr(ord("a") + i % 26) for i in range(300))
    [(_, opcode, payload)] = parse_server_frames(close_frame(1008, reason))
    assert opcode == OP_CLOSE
    assert len(payload) == 125
    assert parse_close(payload) == (1008, reason[:123])
    assert FrameReader(LIMIT).feed(raw_frame(OP_CLOSE, payload)) == [(OP_CLOSE, payload)]


def test_close_frame_truncates_long_non_ascii_reason_to_valid_utf8() -> None:
    """A long non-ASCII reason is cut on a character boundary: the frame fits and stays valid UTF-8."""
    reason = "é" * 100  # 200 bytes in UTF-8; 123 bytes would end in half a character
    [(_, opcode, payload)] = parse_server_frames(close_frame(1001, reason))
    assert opcode == OP_CLOSE
    assert len(payload) <= 125
    code, parsed = parse_close(payload)  # a peer fails the connection (1007) on invalid UTF-8
    assert code == 1001
    assert reason.startswith(parsed)
    assert len(parsed) == 61


def test_parse_close_empty() -> None:
    """An empty close payload has no code and no reason."""
    assert parse_close(b"") == (None, "")
    assert parse_close(bytearray()) == (None, "")


def test_parse_close_one_byte() -> None:
    """A one-byte close payload is a protocol error (1002)."""
    with pytest.raises(FrameError) as info:
        parse_close(b"\x03")
    assert info.value.code == 1002


@pytest.mark.parametrize("reason", [b"\xff", b"ok\xc3", b"\xed\xa0\x80", b"\xc0\xaf"])
def test_parse_close_invalid_utf8(reason: bytes) -> None:
    """A reason that is not UTF-8 (bad byte, cut sequence, surrogate, overlong) is invalid data (1007)."""
    with pytest.raises(FrameError) as info:
        parse_close(b"\x03\xe8" + reason)
    assert info.value.code == 1007


def test_parse_close_normal() -> None:
    """A code alone, or a code and a UTF-8 reason, parse to (code, reason)."""
    assert parse_close(b"\x03\xe8") == (1000, "")
    assert parse_close(b"\x03\xe8bye") == (1000, "bye")
    assert parse_close(bytearray(b"\x0f\xa0" + "adiós".encode())) == (4000, "adiós")


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
def test_parse_close_code_no_endpoint_may_send(code: int) -> None:
    """Codes outside section 7.4's sendable ranges are a protocol error (1002), never echoed."""
    with pytest.raises(FrameError) as info:
        parse_close(struct.pack("!H", code))
    assert info.value.code == 1002


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1007, 1011, 1012, 1014, 3000, 4000, 4999])
def test_parse_close_sendable_codes(code: int) -> None:
    assert parse_close(struct.pack("!H", code) + b"x") == (code, "x")


def test_accept_key_rfc_example() -> None:
    """The Sec-WebSocket-Accept of RFC 6455 section 1.3's example key."""
    # The RFC lists the SHA-1 as b3 7a 4f 2c c0 62 4f 16 90 f6 46 06 cf 38 59 45 b2 be c4 ea.
    expected = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert base64.b64decode(expected) == bytes.fromhex("b37a4f2cc0624f1690f64606cf385945b2bec4ea")
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == expected


# Property tests

# Mostly short payloads (7- and 16-bit lengths), now and then one around 64 KiB (16- and 64-bit).
sizes_ = st.integers(0, 300) | st.integers(0, 300) | st.integers(0, 300) | st.integers(65530, 65540)


def _payload(opcode: int, size: int, seed: int) -> bytes:
    """Random bytes; for a text message, random ASCII (a text message must be UTF-8)."""
    data = random.Random(seed).randbytes(size)
    return bytes(b & 0x7F for b in data) if opcode == OP_TEXT else data


payloads = st.lists(
    st.sampled_from([OP_TEXT, OP_BINARY]).flatmap(
        lambda opcode: st.tuples(
            st.just(opcode),
            st.builds(_payload, st.just(opcode), sizes_, st.integers(0, 2**32)),
            st.binary(min_size=4, max_size=4),
        )
    ),
    max_size=8,
)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets (in any order, repeats give empty chunks)."""
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


PROPERTY = settings(database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])
"""No deadline and no "too slow" health check: how long an example takes depends on the machine's
load, not on the property."""


def test_split_at() -> None:
    """The chunking helper keeps every byte, in order."""
    assert split_at(b"abcdef", [4, 1, 1]) == [b"a", b"", b"bcd", b"ef"]
    assert split_at(b"", []) == [b""]


@settings(PROPERTY, max_examples=100)
@given(messages=payloads, data=st.data())
def test_any_payloads_in_any_chunks(messages: list[tuple[int, bytes, bytes]], data: st.DataObject) -> None:
    """Any payloads, masked with any keys and concatenated, come back exactly in any chunking."""
    wire = b"".join(raw_frame(opcode, payload, key) for opcode, payload, key in messages)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=40))
    reader = FrameReader(LIMIT)
    assert feed_all(reader, split_at(wire, cuts)) == [(opcode, payload) for opcode, payload, _ in messages]
    assert feed_all(reader, [b""]) == []


@settings(PROPERTY, max_examples=100)
@given(messages=st.lists(st.text(max_size=100).map(str.encode), max_size=6), data=st.data())
def test_any_fragmentation_with_pings(messages: list[bytes], data: st.DataObject) -> None:
    """Text messages split into random fragments (a character, too) with pings between them come back
    whole, pings in place."""
    wire = b""
    expected: list[Message] = []
    for n, message in enumerate(messages):
        cuts = sorted(data.draw(st.lists(st.integers(0, len(message)), max_size=4)))
        pieces = split_at(message, cuts)
        for i, piece in enumerate(pieces):
            key = data.draw(st.binary(min_size=4, max_size=4))
            opcode = OP_TEXT if i == 0 else OP_CONTINUATION
            wire += raw_frame(opcode, piece, key, fin=i == len(pieces) - 1)
            if i < len(pieces) - 1 and data.draw(st.booleans()):
                ping = f"{n}.{i}".encode()
                wire += raw_frame(OP_PING, ping, key)
                expected.append((OP_PING, ping))
        expected.append((OP_TEXT, message))
    chunks = split_at(wire, data.draw(st.lists(st.integers(0, len(wire)), max_size=40)))
    assert feed_all(FrameReader(LIMIT), chunks) == expected
