"""The nesting rule: a message nested deeper than 32 levels is invalid (1007) on every Python.

How deep a JSON decoder can go before its stack runs out depends on the interpreter (3.11 fails
near a thousand levels, 3.13 accepts far more), so callsock sets its own limit.
"""

from __future__ import annotations

import json

import pytest

from callsock.protocol.errors import InvalidMessage
from callsock.protocol.stream import MAX_NESTING, State, StreamProtocol

from ..helpers import sid, twilio_start


def nested(depth: int) -> str:
    """A `connected` message whose ignored field nests ``depth`` levels in all (the message is one)."""
    inner = "[" * (depth - 2) + "{}" + "]" * (depth - 2)
    return '{"event": "connected", "x": ' + inner + "}"


@pytest.mark.parametrize("as_bytes", [False, True], ids=["str", "bytes"])
def test_nesting_up_to_the_limit_is_accepted(as_bytes: bool) -> None:
    text = nested(MAX_NESTING)
    StreamProtocol().receive_text(text.encode() if as_bytes else text)


@pytest.mark.parametrize("depth", [MAX_NESTING + 1, 1000, 100_000])
@pytest.mark.parametrize("as_bytes", [False, True], ids=["str", "bytes"])
def test_nesting_over_the_limit_is_invalid(depth: int, as_bytes: bool) -> None:
    protocol = StreamProtocol()
    text = nested(depth)
    with pytest.raises(InvalidMessage) as error:
        protocol.receive_text(text.encode() if as_bytes else text)
    assert error.value.close_code == 1007 and error.value.rule == "json"
    assert str(MAX_NESTING) in error.value.detail
    assert protocol.state is State.FAILED


def test_brackets_inside_strings_do_not_count() -> None:
    """A custom parameter may hold any text, brackets and escaped quotes included."""
    value = '[{"a": "\\"' + "[" * 200 + "{" * 100
    protocol = StreamProtocol()
    protocol.receive_text(twilio_start(sid("MZ", 1), params={"raw": value}))
    assert protocol.stream is not None and protocol.stream.custom_parameters == {"raw": value}


def test_nesting_in_a_media_message() -> None:
    """The rule holds on the hot path too: an ignored field in media cannot nest deeper."""
    protocol = StreamProtocol()
    stream_sid = sid("MZ", 2)
    protocol.receive_text(twilio_start(stream_sid))
    message = {"event": "media", "streamSid": stream_sid, "media": {"payload": "AAAA"}}
    shallow = json.dumps({**message, "x": [[["ok"]]]})
    protocol.receive_text(shallow)
    deep = json.dumps(message)[:-1] + ', "x": ' + "[" * 40 + "]" * 40 + "}"
    with pytest.raises(InvalidMessage):
        protocol.receive_text(deep)
