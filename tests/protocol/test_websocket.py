"""The sans-I/O WebSocket state machine, fed literal frames (RFC 6455), as websockets tests its Protocol."""

from __future__ import annotations

import struct

from callsock.protocol.websocket import ServerWebSocket, WebSocketState

from ..helpers import raw_frame

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# RFC 6455 section 5.7: a single-frame masked text message, "Hello".
MASKED_HELLO = bytes.fromhex("818537fa213d7f9f4d5158")


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack(">H", code) + reason


def server_close(code: int, reason: bytes = b"") -> bytes:
    """A close frame as the server must write it: final, unmasked."""
    payload = close_payload(code, reason)
    return bytes((0x88, len(payload))) + payload


def state(ws: ServerWebSocket) -> WebSocketState:
    """The state, read afresh (so a type checker does not carry an earlier check over)."""
    return ws.state


def test_text_message_passes_through() -> None:
    ws = ServerWebSocket(1 << 16)
    assert ws.receive_data(MASKED_HELLO) == [(OP_TEXT, b"Hello")]
    assert ws.data_to_send() == [] and state(ws) is WebSocketState.OPEN and not ws.close_tcp


def test_ping_is_answered_with_its_payload() -> None:
    ws = ServerWebSocket(1 << 16)
    assert ws.receive_data(raw_frame(OP_PING, b"Hello")) == []
    assert ws.data_to_send() == [bytes.fromhex("8a05") + b"Hello"]  # section 5.7's unmasked pong


def test_pong_is_ignored() -> None:
    ws = ServerWebSocket(1 << 16)
    assert ws.receive_data(raw_frame(OP_PONG, b"x")) == []
    assert ws.data_to_send() == []


def test_send_text_frames_unmasked() -> None:
    ws = ServerWebSocket(1 << 16)
    ws.send_text(b"Hello")
    assert ws.outgoing_bytes == 7
    assert ws.data_to_send() == [bytes.fromhex("810548656c6c6f")]  # section 5.7
    assert ws.outgoing_bytes == 0


def test_peer_close_is_not_answered_until_the_server_says_so() -> None:
    """The peer's close frame is recorded; the answer waits for send_close (the recording first)."""
    ws = ServerWebSocket(1 << 16)
    data = MASKED_HELLO + raw_frame(OP_CLOSE, close_payload(1000, b"bye"))
    assert ws.receive_data(data) == [(OP_TEXT, b"Hello")]
    assert (ws.close_received, ws.close_code, ws.close_sent) == (True, 1000, False)
    assert state(ws) is WebSocketState.CLOSING
    assert ws.data_to_send() == [] and not ws.close_tcp
    ws.send_close(1000, "")
    assert ws.data_to_send() == [server_close(1000)]
    assert state(ws) is WebSocketState.CLOSED and ws.close_tcp  # the server closes TCP first (7.1.1)


def test_nothing_after_the_peers_close_is_parsed() -> None:
    ws = ServerWebSocket(1 << 16)
    data = raw_frame(OP_CLOSE, close_payload(1001)) + MASKED_HELLO + raw_frame(OP_PING, b"p")
    assert ws.receive_data(data) == []
    assert ws.receive_data(MASKED_HELLO) == []
    assert ws.data_to_send() == []  # not even a pong


def test_close_without_a_code() -> None:
    ws = ServerWebSocket(1 << 16)
    ws.receive_data(raw_frame(OP_CLOSE, b""))
    assert ws.close_received and ws.close_code is None


def test_server_close_first_then_the_peers_answer() -> None:
    ws = ServerWebSocket(1 << 16)
    ws.send_close(4000, "replaced")
    assert ws.data_to_send() == [server_close(4000, b"replaced")]
    assert state(ws) is WebSocketState.CLOSING and not ws.close_tcp
    assert ws.receive_data(MASKED_HELLO) == [(OP_TEXT, b"Hello")]  # data in flight still arrives
    ws.receive_data(raw_frame(OP_CLOSE, close_payload(4000)))
    assert state(ws) is WebSocketState.CLOSED and ws.close_tcp
    assert ws.data_to_send() == []  # one close frame each way, no more


def test_close_is_sent_once() -> None:
    ws = ServerWebSocket(1 << 16)
    ws.send_close(1000)
    ws.send_close(1011)
    assert ws.data_to_send() == [server_close(1000)]


def test_no_pong_after_the_close_frame() -> None:
    ws = ServerWebSocket(1 << 16)
    ws.send_close(1000)
    ws.data_to_send()
    ws.receive_data(raw_frame(OP_PING, b"late"))
    assert ws.data_to_send() == []


def test_protocol_error_fails_at_once() -> None:
    """An unmasked frame (section 5.1): close 1002, nothing more parsed, TCP closed without waiting."""
    ws = ServerWebSocket(1 << 16)
    data = MASKED_HELLO + raw_frame(OP_TEXT, b"unmasked", key=None) + MASKED_HELLO
    assert ws.receive_data(data) == [(OP_TEXT, b"Hello")]  # what came before the fault
    assert ws.failure is not None and ws.failure.code == 1002
    assert ws.data_to_send() == [server_close(1002, b"client frame not masked")]
    assert ws.close_tcp and state(ws) is WebSocketState.CLOSED
    assert ws.receive_data(MASKED_HELLO) == []


def test_message_over_the_limit_fails_with_1009() -> None:
    ws = ServerWebSocket(100)
    ws.receive_data(raw_frame(OP_TEXT, b"x" * 101))
    assert ws.failure is not None and ws.failure.code == 1009 and ws.close_tcp


def test_malformed_close_frame_fails_the_connection() -> None:
    """A close code no endpoint may send (1005) is a protocol error, answered with 1002."""
    ws = ServerWebSocket(1 << 16)
    ws.receive_data(raw_frame(OP_CLOSE, close_payload(1005)))
    assert not ws.close_received and ws.failure is not None
    assert ws.data_to_send() == [server_close(1002, b"close code 1005 may not be sent (section 7.4)")]
    assert ws.close_tcp


def test_failure_after_the_servers_close_sends_no_second_close() -> None:
    ws = ServerWebSocket(1 << 16)
    ws.send_close(1000)
    ws.data_to_send()
    ws.receive_data(raw_frame(OP_TEXT, b"x", rsv=4))
    assert ws.failure is not None and ws.data_to_send() == [] and ws.close_tcp


def test_eof_closes() -> None:
    ws = ServerWebSocket(1 << 16)
    ws.receive_eof()
    assert state(ws) is WebSocketState.CLOSED


def test_fragmented_message_with_a_ping_between() -> None:
    ws = ServerWebSocket(1 << 16)
    data = (
        raw_frame(OP_TEXT, b"Hel", fin=False) + raw_frame(OP_PING, b"!") + raw_frame(OP_CONT, b"lo", fin=True)
    )
    assert ws.receive_data(data) == [(OP_TEXT, b"Hello")]
    assert ws.data_to_send() == [bytes.fromhex("8a01") + b"!"]
