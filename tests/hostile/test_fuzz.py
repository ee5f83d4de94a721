"""Fuzzing: the sans-I/O core fails closed on any input, and the server survives hostile sockets.

Part 1 states the invariant h11 and websockets give their sans-I/O cores, with hypothesis: any
input yields a message or one of the documented errors (a :class:`StreamError`), never another
exception; after an error, every later call raises that same error; a call's memory stays
bounded. Part 2 streams one good call through a real server while hundreds of broken
connections (bad HTTP, bad handshakes, bad frames, bad messages, abrupt closes) hit it at once,
then checks that the good call, the server and the record directory are untouched.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import random
import re
import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import aiohttp
import pytest
from aiohttp.http_exceptions import HttpProcessingError
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from callsock.call.session import CallSession
from callsock.protocol.errors import StreamError
from callsock.protocol.messages import Connected, Dtmf, Mark, Media, Start, Stop
from callsock.protocol.stream import State, StreamProtocol
from callsock.recording.buffer import AudioBuffer
from callsock.recording.diskwriter import DiskWriter
from callsock.recording.recorder import CallRecorder
from callsock.server.routes import CallServer

from ..helpers import (
    ACCOUNT,
    WAIT_SECONDS,
    decoded,
    eventually,
    files_under,
    frames,
    http_url,
    media,
    raw_frame,
    read_wav,
    receive_close,
    running_server,
    sid,
    stop,
    twilio_start,
    ws_url,
)

SID: Final = sid("MZ", 1)
OTHER_SID: Final = sid("MZ", 2)
MESSAGE_TYPES: Final = (Connected, Start, Media, Dtmf, Mark, Stop)

FUZZ: Final = settings(
    derandomize=True,
    database=None,
    deadline=None,
    report_multiple_bugs=False,
    phases=(Phase.explicit, Phase.generate, Phase.shrink),
    suppress_health_check=[HealthCheck.too_slow],
)
"""Repeatable (examples derived from the test's name, no example database written), unhurried, and
shrinking one failure only, so a failing property reports its smallest input quickly."""


# --- JSON that is almost a Media Streams message -------------------------------------------------

_RAW: Final = re.compile(r'"\\u0000([^"\\]*)\\u0000"')


def raw(token: str) -> str:
    """A placeholder that :func:`dumps` replaces with ``token`` as raw JSON (deep arrays, 1e400)."""
    return f"\x00{token}\x00"


def dumps(value: object) -> str:
    """``json.dumps``, then raw tokens put in place (Python's json cannot nest 3000 lists deep)."""
    return _RAW.sub(lambda m: m.group(1), json.dumps(value))


class _Missing:
    """Marks a field left out of a message."""


MISSING: Final = _Missing()

SCALARS: Final[st.SearchStrategy[object]] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([2**31, 2**63, 2**64, -(2**63) - 1, 10**300]),
    st.floats(),  # NaN and Infinity come out as tokens JSON does not have
    st.text(max_size=20),
    st.sampled_from([raw("1e400"), raw("-1e400"), raw("1" * 400), raw("-0.0e-999"), raw("0.1e1")]),
)
JSON_VALUES: Final[st.SearchStrategy[object]] = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
DEEP_ARRAYS: Final = st.sampled_from([1, 10, 100, 500, 1000, 1500, 3000]).map(
    lambda d: raw("[" * d + "]" * d)
)
"""Nested arrays the size limit lets through (3000 deep is 6 kB; the default limit is 64 kB)."""
ANY_VALUE: Final[st.SearchStrategy[object]] = st.one_of(JSON_VALUES, DEEP_ARRAYS)

EXTRA_NAMES: Final = ("x", "", "media", "start", "payload", "event ", "\u00e9v\u00e9nement")
"""Unknown members (some named like members of other objects), which the schema must ignore."""
Field = tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]
"""A field's strategies: valid values, and broken ones; MISSING leaves the field out."""


def field(valid: st.SearchStrategy[Any], wrong: st.SearchStrategy[Any], *, required: bool = True) -> Field:
    """A field: its valid values (or absence, if not ``required``) and, broken, absence or a wrong value."""
    return (valid if required else st.one_of(st.just(MISSING), valid)), st.one_of(
        st.just(MISSING), wrong, ANY_VALUE
    )


def obj(draw: st.DrawFn, fields: dict[str, Field], max_broken: int) -> dict[str, object]:
    """A JSON object with ``fields`` valid except up to ``max_broken`` of them; now and then an unknown member."""
    names = list(fields)
    broken = {names[draw(st.integers(0, len(names) - 1))] for _ in range(draw(st.integers(0, max_broken)))}
    out: dict[str, object] = {}
    for name, (valid, wrong) in fields.items():
        value = draw(wrong if name in broken else valid)
        if value is not MISSING:
            out[name] = value
    if draw(st.integers(0, 3)) == 0:  # an unknown member, first or last
        extra = {draw(st.sampled_from(EXTRA_NAMES)): draw(ANY_VALUE)}
        out = {**extra, **out} if draw(st.booleans()) else {**out, **extra}
    return out


def b64(size: int, seed: int) -> str:
    return base64.b64encode(random.Random(seed).randbytes(size)).decode()


BAD_SIDS: Final = st.one_of(
    st.sampled_from([OTHER_SID, "", "../etc", "..", "a/b", "MZ" + "0" * 63, "MZ\u00e9", "MZ\n", "MZ\x00"]),
    st.text(max_size=70),
)
TRACK_NAMES: Final = st.sampled_from(
    ["inbound", "outbound", "both_tracks", "inbound_track", "outbound_track", "", "INBOUND"]
)
PAYLOAD_SIZES: Final = st.one_of(
    st.sampled_from([0, 1, 2, 3, 159, 160, 161, 499, 500, 501, 5000]), st.integers(0, 1200)
)
PAYLOADS: Final = st.builds(b64, PAYLOAD_SIZES, st.integers(0, 99))
BAD_PAYLOADS: Final = st.sampled_from(
    ["!", "AAE", "AA==AA==", "====", "A\nAA", "\u00e9\u00e9\u00e9\u00e9", "AAEC!", "AA=A"]
)
# Timestamps Python's int() takes (so the server must too, or reject them cleanly), and others.
ODD_TIMESTAMPS: Final = st.one_of(
    st.sampled_from(["99999999999999999999", "-0", "+5", " 7 ", "1_000", "\u0663", "0" * 50]),
    st.integers(0, 10**25).map(str),
)
BAD_TIMESTAMPS: Final = st.one_of(
    st.sampled_from(["-1", "", " ", "1.5", "1e3", "0x10", "NaN", "inf", "9" * 5000]),
    st.integers(-(10**25), -1).map(str),
    st.floats().map(str),
    st.text(max_size=8),
    st.integers(),
)
MULAW_FORMAT: Final = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
BAD_FORMATS: Final = st.fixed_dictionaries(
    {},
    optional={
        "encoding": st.sampled_from(["audio/x-mulaw", "audio/l16", ""]),
        "sampleRate": st.sampled_from([8000, 16000, 0, -8000, 2**64, 8000.0]),
        "channels": st.sampled_from([1, 2, 0, True]),
    },
)
SEED_TRACKS: Final = st.fixed_dictionaries(
    {"id": TRACK_NAMES},
    optional={
        "format": st.sampled_from(["audio/x-mulaw", "audio/wav"]),
        "rate": st.sampled_from([8000, 16000, 2**64]),
        "channels": st.sampled_from([1, 2]),
    },
)
TRACK_LISTS: Final = st.sampled_from([["inbound"], ["inbound", "outbound"], ["outbound"]])
BAD_TRACK_LISTS: Final = st.lists(st.one_of(TRACK_NAMES, SEED_TRACKS, JSON_VALUES), max_size=3)

START_FIELDS: Final = {
    "streamSid": field(st.just(SID), BAD_SIDS, required=False),
    "callSid": field(st.just(sid("CA", 1)), BAD_SIDS, required=False),
    "accountSid": field(st.just(ACCOUNT), BAD_SIDS, required=False),
    "tracks": field(TRACK_LISTS, BAD_TRACK_LISTS),
    "mediaFormat": field(st.just(MULAW_FORMAT), BAD_FORMATS),
    "customParameters": field(
        st.sampled_from([{}, {"FirstName": "Jane"}, {"\u00e9": "\u2603", "": ""}]),
        st.dictionaries(st.text(max_size=5), JSON_VALUES, min_size=1, max_size=3),
        required=False,
    ),
}
MEDIA_FIELDS: Final = {
    "payload": field(PAYLOADS, BAD_PAYLOADS),
    "track": field(
        st.sampled_from(["inbound", "inbound", "inbound", "outbound"]), TRACK_NAMES, required=False
    ),
    "chunk": field(st.integers(0, 99).map(str), st.integers(), required=False),
    "timestamp": field(
        st.one_of(st.integers(0, 5000).map(str), ODD_TIMESTAMPS), BAD_TIMESTAMPS, required=False
    ),
}
BODY_FIELDS: Final = {
    "start": START_FIELDS,
    "media": MEDIA_FIELDS,
    "dtmf": {
        "digit": field(st.sampled_from(list("0123456789*#ABCD")), st.text(max_size=3)),
        "track": field(st.just("inbound_track"), TRACK_NAMES, required=False),
    },
    "mark": {"name": field(st.text(max_size=10), JSON_VALUES)},
    "stop": {
        "accountSid": field(st.just(ACCOUNT), BAD_SIDS, required=False),
        "callSid": field(st.just(sid("CA", 1)), BAD_SIDS, required=False),
    },
}
EVENTS: Final = ("media",) * 10 + ("dtmf", "mark", "start", "stop", "connected")
TOP_FIELDS: Final = {
    event: {
        "event": field(
            st.just(event), st.sampled_from(["clear", "", "Media", "START", "closed", "start\x00"])
        ),
        "streamSid": field(st.just(SID), BAD_SIDS),
        "sequenceNumber": field(st.integers(0, 99).map(str), st.integers(), required=False),
        **(
            {
                "protocol": field(st.just("Call"), JSON_VALUES, required=False),
                "version": field(st.just("1.0.0"), JSON_VALUES, required=False),
            }
            if event == "connected"
            else {}
        ),
    }
    for event in dict.fromkeys(EVENTS)
}
BROKEN_BODY: Final = st.one_of(st.just(MISSING), ANY_VALUE)


@st.composite
def plausible_messages(draw: st.DrawFn, max_broken: int = 1) -> str:
    """A Media Streams message with up to ``max_broken`` fields, and as many of its body's, missing or wrong."""
    event = draw(st.sampled_from(EVENTS))
    message = obj(draw, TOP_FIELDS[event], max_broken)
    if event != "connected":
        broken = max_broken and draw(st.integers(0, 9)) == 0
        body = draw(BROKEN_BODY) if broken else obj(draw, BODY_FIELDS[event], max_broken)
        if body is not MISSING:
            message[event] = body
    return dumps(message)


@st.composite
def duplicate_keys(draw: st.DrawFn) -> str:
    """Two messages' members in one object: every key that both have appears twice."""
    first, second = draw(plausible_messages()), draw(plausible_messages())
    inner = ", ".join(m.strip()[1:-1] for m in (first, second) if m.strip() != "{}")
    return "{" + inner + "}"


STARTS: Final = st.sampled_from(
    [
        twilio_start(SID),
        twilio_start(SID, tracks=("inbound", "outbound")),
        json.dumps(
            {
                "event": "start",
                "streamSid": SID,
                "start": {
                    "tracks": [{"id": "inbound", "format": "audio/x-mulaw", "rate": 8000, "channels": 1}]
                },
            }
        ),
    ]
)

SURROGATES: Final = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=())
TEXT: Final = st.one_of(
    st.text(max_size=40),
    st.tuples(st.text(max_size=20), st.text(SURROGATES, min_size=1, max_size=2), st.text(max_size=20)).map(
        "".join
    ),
)
"""Any str: st.text() leaves out lone surrogates, which a str can hold (and an ASGI driver can pass)."""


@st.composite
def sequences(draw: st.DrawFn) -> list[str | bytes]:
    """Mostly a valid start, then valid and plausible messages, now and then raw text, bytes or duplicate keys."""
    out: list[str | bytes] = [draw(STARTS)] if draw(st.integers(0, 3)) else []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.integers(0, 19))
        if kind < 19:
            out.append(draw(plausible_messages(max_broken=0 if kind < 14 else 1)))
        else:
            out.append(draw(st.one_of(duplicate_keys(), st.binary(max_size=40), TEXT)))
    return out


# --- Part 1: the sans-I/O core -----------------------------------------------------------------


def feed(protocol: StreamProtocol, data: str | bytes | bytearray) -> object:
    """Feed ``data``; return the message, or the StreamError raised (any other exception propagates)."""
    try:
        return protocol.receive_text(data)
    except StreamError as exc:
        return exc


def assert_fail_closed(protocol: StreamProtocol, inputs: Sequence[str | bytes | bytearray]) -> None:
    """Feed ``inputs`` in order and check the state machine on the way."""
    error: StreamError | None = None
    for data in inputs:
        before = protocol.state
        result = feed(protocol, data)
        if error is not None:
            assert result is error, "after an error, every later call raises that same error"
        elif isinstance(result, StreamError):
            error = result
        else:
            assert isinstance(result, MESSAGE_TYPES)
            assert before in (State.AWAITING_START, State.STREAMING), f"{before} accepted {result!r}"
            assert not isinstance(result, Start) or before is State.AWAITING_START
            assert not isinstance(result, Media | Dtmf | Mark | Stop) or before is State.STREAMING
        assert (protocol.state is State.FAILED) == (error is not None)
        assert protocol.error is error
    if error is not None:
        with pytest.raises(StreamError) as caught:
            protocol.receive_binary()
        assert caught.value is error


@settings(FUZZ, max_examples=200)
@given(text=TEXT)
def test_any_text_fails_closed(text: str) -> None:
    """Any str, lone surrogates included, gives a message or a StreamError."""
    assert_fail_closed(StreamProtocol(), [text])


@settings(FUZZ, max_examples=200)
@given(data=st.binary(max_size=300))
def test_any_bytes_fail_closed(data: bytes) -> None:
    """Any bytes (mostly invalid UTF-8 or JSON), as bytes and as bytearray, give a message or a StreamError."""
    assert_fail_closed(StreamProtocol(), [data])
    assert_fail_closed(StreamProtocol(), [bytearray(data)])


@settings(FUZZ, max_examples=150)
@given(text=st.one_of(plausible_messages(), duplicate_keys()), encode=st.booleans())
def test_plausible_messages_fail_closed(text: str, encode: bool) -> None:
    """A plausible-but-wrong message, first or after a valid start, gives a message or a StreamError."""
    data: str | bytes = text.encode() if encode else text
    assert_fail_closed(StreamProtocol(), [data])
    assert_fail_closed(StreamProtocol(), [twilio_start(SID), data])


@settings(FUZZ, max_examples=60)
@given(inputs=sequences())
def test_message_sequences_fail_closed(inputs: list[str | bytes]) -> None:
    """Sequences of messages on one protocol: only allowed transitions, and errors are final."""
    assert_fail_closed(StreamProtocol(), inputs)


@st.composite
def session_messages(draw: st.DrawFn) -> str:
    """Mostly media the session accepts, odd timestamps and all; else broken media, stop, a binary frame."""
    kind = draw(st.integers(0, 39))
    if kind < 37:
        media_body = obj(draw, MEDIA_FIELDS, max_broken=0 if kind < 34 else 2)
        message = {"event": "media", "sequenceNumber": "2", "media": media_body, "streamSid": SID}
        return dumps(message)
    if kind == 37:
        return draw(plausible_messages())
    return stop(SID) if kind == 38 else "binary"


@settings(FUZZ, max_examples=100)
@given(
    tracks=st.sampled_from([("inbound",), ("inbound", "outbound")]),
    messages=st.lists(session_messages(), max_size=30),
)
def test_session_fails_closed_with_bounded_memory(tracks: tuple[str, ...], messages: list[str]) -> None:
    """A started call fed mutated media: only StreamErrors, a bounded buffer, and always a summary."""
    capacity = 500
    nowhere = Path("/nonexistent")  # a recorder with no sinks writes nothing
    recording = CallRecorder(nowhere, nowhere, [], DiskWriter(inline=True), buffer_bytes=capacity)
    session = CallSession("fuzz", recording)
    session.receive_text(twilio_start(SID, tracks=tracks))
    buffer = recording._buffer
    assert isinstance(buffer, AudioBuffer)
    largest = max((len(text) for text in messages), default=0)  # base64 is longer than its bytes
    deliver = buffer._deliver

    def checked_deliver(track: str, mulaw: bytearray) -> None:
        # While it flushes, the buffer holds at most its capacity plus one message's audio.
        assert buffer.size <= capacity + largest
        deliver(track, mulaw)

    buffer._deliver = checked_deliver
    error: StreamError | None = None
    for text in messages:
        reach = sum(buffer.position_ms(t) for t in buffer.tracks)
        try:
            if text == "binary":
                session.receive_binary()
            else:
                session.receive_text(text)
        except StreamError as exc:
            assert error is None or exc is error
            error = error or exc
        else:
            assert error is None
        assert buffer.size <= capacity
        assert buffer.size == sum(len(t.buffer) for t in buffer._tracks.values())
        # One message adds its audio and at most 60 s of silence, whatever its timestamp says.
        assert sum(buffer.position_ms(t) for t in buffer.tracks) - reach <= 60_000 + largest / 8
    summary = session.finish("closed")
    assert isinstance(summary, dict)
    assert summary["endReason"] == ("error" if error else "closed")
    assert summary["error"] == (error.rule if error else None)
    assert summary["counters"]["errors"] == (1 if error else 0)
    assert session.finish("stop") is summary
    assert buffer.size == 0


# Minimal reproductions of the two ways found to break the invariant above.


def test_lone_surrogate_text_raises_stream_error() -> None:
    """A str that cannot be UTF-8 encoded (a lone surrogate, possible from an ASGI driver) is a StreamError."""
    protocol = StreamProtocol()
    with pytest.raises(StreamError):
        protocol.receive_text('{"event": "connected", "protocol": "\ud800"}')
    assert protocol.state is State.FAILED


def test_deeply_nested_unknown_field_raises_stream_error() -> None:
    """A 6 kB message whose ignored field nests 3000 arrays deep is a StreamError, not a RecursionError."""
    protocol = StreamProtocol()
    text = '{"event": "connected", "x": ' + "[" * 3000 + "]" * 3000 + "}"
    with pytest.raises(StreamError):
        protocol.receive_text(text)
    assert protocol.state is State.FAILED


# --- Part 2: a hostile crowd beside one good call ------------------------------------------------

BAD_CONNECTIONS: Final = 300
CONCURRENCY: Final = 20
MAX_MESSAGE: Final = 4096
READ_SECONDS: Final = WAIT_SECONDS  # the longest a fuzzer waits for the server's answer (it comes at once)
PEEK_SECONDS: Final = 0.2  # how long a fuzzer listens when the server need not answer
SPREAD_SECONDS: Final = 0.004  # between the starts of two bad connections: 300 take 1.2 s
KEY: Final = base64.b64encode(b"callsock-fuzzing").decode()
PROTOCOL_ERRORS: Final = frozenset({1002, 1003, 1007, 1008, 1009})

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def text_frame(text: str | bytes, rng: random.Random) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return raw_frame(OP_TEXT, data, key=rng.randbytes(4))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack(">H", code) + reason


End = Literal["close", "reset", "peek", "read", "http"]


@dataclass
class Plan:
    """What one bad connection does, and what it must get back.

    Attributes:
        kind: the scenario's name.
        steps: bytes to write, or seconds to pause, in order.
        upgrade: first complete a valid WebSocket handshake (and check the 101).
        end: ``close`` or ``reset`` (FIN or RST at once), ``read`` (wait for the close frame),
            ``http`` (wait for an HTTP status), ``peek`` (listen briefly for either: the server
            need not answer at all).
        expect: the close codes (or HTTP statuses) allowed; ``None``: anything, or nothing.
        audio: for a call the server must publish: its streamSid and the audio it sent.
    """

    kind: str
    steps: list[bytes | float]
    upgrade: bool = True
    end: End = "read"
    expect: frozenset[int] | None = None
    audio: tuple[str, bytes] | None = None


@dataclass
class Outcome:
    plan: Plan
    got: int | None = None
    problems: list[str] = dataclasses.field(default_factory=list)


def upgrade_request(port: int, path: str = "/call", **headers: str) -> bytes:
    fields = {
        "Host": f"127.0.0.1:{port}",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
        **headers,
    }
    lines = [f"GET {path} HTTP/1.1", *(f"{k}: {v}" for k, v in fields.items() if v)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def started(rng: random.Random, n: int, media_frames: int) -> tuple[str, bytes, list[bytes]]:
    """A valid start for fuzz call ``n`` and some valid media: its streamSid, audio and frames."""
    stream_sid = sid("MZ", 10_000 + n)
    audio = rng.randbytes(160 * media_frames)
    wire = [text_frame(twilio_start(stream_sid), rng)]
    wire += [text_frame(media(stream_sid, f, i * 20, seq=i + 2), rng) for i, f in enumerate(frames(audio))]
    return stream_sid, audio, wire


def abrupt(rng: random.Random) -> End:
    return rng.choice(["close", "reset"])


def garbage_after_start(rng: random.Random, n: int, port: int) -> Plan:
    """A valid start and media, then one bad message: each kind closes with its documented code."""
    stream_sid, audio, wire = started(rng, n, rng.randrange(0, 6))
    ts = len(audio) // 8
    bad_media = json.loads(media(stream_sid, b"\x7f" * 160, ts))
    garbage: list[tuple[int, bytes]] = [
        (1007, text_frame("not json", rng)),
        (1007, text_frame(rng.randbytes(rng.randrange(1, 200)), rng)),
        (1007, text_frame(b'{"event": "media", "payload": "\xc3\x28"}', rng)),
        (1007, text_frame('{"event": "media"}', rng)),
        (1007, text_frame(json.dumps({"event": "clear", "streamSid": stream_sid}), rng)),
        (
            1007,
            text_frame(json.dumps({**bad_media, "media": {**bad_media["media"], "payload": "AA!="}}), rng),
        ),
        (
            1007,
            text_frame(json.dumps({**bad_media, "media": {**bad_media["media"], "timestamp": "-20"}}), rng),
        ),
        (
            1007,
            text_frame(json.dumps({**bad_media, "media": {**bad_media["media"], "track": "outbound"}}), rng),
        ),
        (1007, text_frame(json.dumps({**bad_media, "sequenceNumber": 3}), rng)),
        (
            1007,
            text_frame(json.dumps({"event": "dtmf", "streamSid": stream_sid, "dtmf": {"digit": "X"}}), rng),
        ),
        (1008, text_frame(media(sid("MZ", 99_999), b"\x7f" * 160, ts), rng)),
        (1008, text_frame(twilio_start(stream_sid), rng)),
        (1008, text_frame('{"event": "connected"}', rng)),
        (1003, raw_frame(OP_BINARY, rng.randbytes(160), key=rng.randbytes(4))),
        (1009, text_frame(media(stream_sid, b"\x7f" * 4000, ts), rng)),
        (1002, raw_frame(OP_TEXT, b'{"event": "connected"}', key=None)),
        (1002, raw_frame(OP_TEXT, b"{}", rsv=rng.randrange(1, 8))),
    ]
    # Deeply nested JSON is left out: test_server_closes_deeply_nested_json_with_1007 shows that it
    # ends the connection without a close frame today.
    code, bad = rng.choice(garbage)
    ends: list[End] = ["read", "read", "read", "close", "reset"]
    end = rng.choice(ends)
    data = b"".join(wire) + bad
    cut = rng.randrange(len(data))
    return Plan(
        "start-then-garbage",
        [data[:cut], data[cut:]],
        end=end,
        expect=frozenset({code}) if end == "read" else None,
        audio=(stream_sid, audio) if end == "read" else None,
    )


def fragmented_call(rng: random.Random, n: int, port: int) -> Plan:
    """A whole valid call, every message cut into fragments with pings between them: 1000, recorded."""
    stream_sid, audio, _ = started(rng, n, rng.randrange(1, 6))
    texts = [twilio_start(stream_sid)]
    texts += [media(stream_sid, f, i * 20, seq=i + 2) for i, f in enumerate(frames(audio))]
    texts.append(stop(stream_sid))
    wire = b""
    for text in texts:
        data = text.encode()
        cuts = sorted(rng.sample(range(1, len(data)), rng.randrange(0, 4)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        for i, piece in enumerate(pieces):
            opcode = OP_TEXT if i == 0 else OP_CONT
            wire += raw_frame(opcode, piece, fin=i == len(pieces) - 1, key=rng.randbytes(4))
            if rng.random() < 0.5:
                wire += raw_frame(OP_PING, rng.randbytes(rng.randrange(0, 126)), key=rng.randbytes(4))
    cut = rng.randrange(len(wire))
    return Plan(
        "fragmented-call", [wire[:cut], wire[cut:]], expect=frozenset({1000}), audio=(stream_sid, audio)
    )


def http_random(rng: random.Random, n: int, port: int) -> Plan:
    """Random bytes instead of an HTTP request."""
    return Plan(
        "http-random",
        [rng.randbytes(rng.randrange(1, 2000))],
        upgrade=False,
        end=rng.choice(["close", "reset", "peek"]),
    )


def http_truncated(rng: random.Random, n: int, port: int) -> Plan:
    """An upgrade request cut short, then gone: FIN or RST mid-handshake."""
    request = upgrade_request(port)
    return Plan("http-truncated", [request[: rng.randrange(1, len(request))]], upgrade=False, end=abrupt(rng))


def http_gone_before_101(rng: random.Random, n: int, port: int) -> Plan:
    """A complete upgrade request, and the client gone before the 101 is read."""
    return Plan("http-gone-before-101", [upgrade_request(port)], upgrade=False, end=abrupt(rng))


def http_refused(rng: random.Random, n: int, port: int) -> Plan:
    """Upgrade requests the server must refuse, each with its status."""
    status, request = rng.choice(
        [
            (426, f"GET /call HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()),
            (426, upgrade_request(port, **{"Sec-WebSocket-Version": "8"})),
            (400, upgrade_request(port, **{"Sec-WebSocket-Key": "c2hvcnQ="})),
            (400, upgrade_request(port, **{"Sec-WebSocket-Key": "not base64!!"})),
            (400, upgrade_request(port, Connection="keep-alive")),
            (404, upgrade_request(port, "/nowhere")),
            (400, b"GET /call HTTP/1.1\r\nHost: \x00\xff\r\n\r\n"),
            (400, b"GET /call HTTP/9.9\r\n\r\n"),
        ]
    )
    return Plan("http-refused", [request], upgrade=False, end="http", expect=frozenset({status}))


def ws_random(rng: random.Random, n: int, port: int) -> Plan:
    """Random bytes after the handshake: a close with a protocol-error code, or silence."""
    # Random bytes may happen to form a well-formed close frame, which is answered with its code.
    return Plan("ws-random", [rng.randbytes(rng.randrange(1, 300))], end="peek")


def ws_truncated(rng: random.Random, n: int, port: int) -> Plan:
    """A frame cut mid-header or mid-payload, then gone."""
    _, _, wire = started(rng, n, 2)
    data = b"".join(wire)
    return Plan("ws-truncated", [data[: rng.randrange(1, len(data))]], end=abrupt(rng))


def ws_huge(rng: random.Random, n: int, port: int) -> Plan:
    """A frame announcing more than the size limit (or fragments adding up to more): 1009 at once."""
    opcode = rng.choice([OP_TEXT, OP_BINARY])
    if rng.random() < 0.3:
        # Text as ASCII: random bytes are not UTF-8, which a server may reject (1007) before it
        # has counted the size; this plan is about the size.
        valid = (lambda data: bytes(b & 0x7F for b in data)) if opcode == OP_TEXT else bytes
        first = raw_frame(opcode, valid(rng.randbytes(3000)), fin=False)
        steps: list[bytes | float] = [first + raw_frame(OP_CONT, valid(rng.randbytes(1200)))]
    else:
        announced = rng.choice([MAX_MESSAGE + 1, 65535, 1 << 16, 1 << 32, (1 << 63) - 1, (1 << 64) - 1])
        steps = [raw_frame(opcode, rng.randbytes(rng.randrange(0, 100)), announce=announced)]
    return Plan("ws-huge", steps, expect=frozenset({1009}))


def ws_binary(rng: random.Random, n: int, port: int) -> Plan:
    """A binary frame, before any start: 1003."""
    return Plan(
        "ws-binary",
        [raw_frame(OP_BINARY, rng.randbytes(rng.randrange(0, 400)), key=rng.randbytes(4))],
        expect=frozenset({1003}),
    )


def ws_bad_utf8(rng: random.Random, n: int, port: int) -> Plan:
    """A text frame that is not UTF-8: 1007."""
    payload = rng.choice(
        [b"\xff", b"\xc3\x28", b'{"event": "connected", "protocol": "\xed\xa0\x80"}', b"\xf8\x88\x80\x80\x80"]
    )
    return Plan("ws-bad-utf8", [text_frame(payload, rng)], expect=frozenset({1007}))


def ws_unmasked(rng: random.Random, n: int, port: int) -> Plan:
    """An unmasked client frame (RFC 6455 5.1): 1002."""
    opcode = rng.choice([OP_TEXT, OP_BINARY, OP_PING])
    return Plan(
        "ws-unmasked", [raw_frame(opcode, b'{"event": "connected"}', key=None)], expect=frozenset({1002})
    )


def ws_bad_header(rng: random.Random, n: int, port: int) -> Plan:
    """Reserved bits, an unknown opcode, a lone continuation, a fragmented or oversized control frame: 1002."""
    frame = rng.choice(
        [
            raw_frame(OP_TEXT, b"{}", rsv=rng.randrange(1, 8)),
            raw_frame(rng.choice([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF]), b"x"),
            raw_frame(OP_CONT, b"x"),
            raw_frame(rng.choice([OP_PING, OP_PONG, OP_CLOSE]), b"", fin=False),
            raw_frame(rng.choice([OP_PING, OP_PONG]), rng.randbytes(rng.randrange(126, 300))),
            raw_frame(OP_CLOSE, close_payload(1000, b"r" * 200)),
            raw_frame(OP_TEXT, b"{", fin=False) + raw_frame(OP_TEXT, b"}"),
            raw_frame(OP_CLOSE, b"\x03"),
        ]
    )
    return Plan("ws-bad-header", [frame], expect=frozenset({1002}))


def ws_close(rng: random.Random, n: int, port: int) -> Plan:
    """A close frame: answered with its code; one whose reason is not UTF-8: 1007."""
    code = rng.choice([1000, 1001, 4000, 4999])
    if rng.random() < 0.3:
        return Plan(
            "ws-close", [raw_frame(OP_CLOSE, close_payload(code, b"\xff\xfe"))], expect=frozenset({1007})
        )
    pings = b"".join(raw_frame(OP_PING, b"p") for _ in range(rng.randrange(0, 20)))
    return Plan(
        "ws-close", [pings + raw_frame(OP_CLOSE, close_payload(code, b"bye"))], expect=frozenset({code})
    )


def ws_fragmented_garbage(rng: random.Random, n: int, port: int) -> Plan:
    """Fragments, pings between them, that join into no message at all: 1007."""
    data = rng.choice([b"not json at all", b'{"event": "start"}', b'{"event": "media", "x": []}'])
    wire = raw_frame(OP_TEXT, data[:5], fin=False) + raw_frame(OP_PING, b"hi") + raw_frame(OP_CONT, data[5:])
    return Plan("ws-fragmented-garbage", [wire], expect=frozenset({1007}))


def ws_abort_mid_frame(rng: random.Random, n: int, port: int) -> Plan:
    """A started call, half a media frame, a short pause, and then the client is gone."""
    stream_sid, _, wire = started(rng, n, rng.randrange(0, 4))
    half = text_frame(media(stream_sid, b"\x7f" * 160, 0), rng)
    return Plan(
        "ws-abort-mid-frame", [b"".join(wire), half[: rng.randrange(1, len(half))], 0.01], end=abrupt(rng)
    )


def ws_silent(rng: random.Random, n: int, port: int) -> Plan:
    """A handshake and nothing more; then gone."""
    return Plan("ws-silent", [0.01], end=abrupt(rng))


SCENARIOS: Final[list[Callable[[random.Random, int, int], Plan]]] = [
    http_random,
    http_truncated,
    http_gone_before_101,
    http_refused,
    ws_random,
    ws_truncated,
    ws_huge,
    ws_binary,
    ws_bad_utf8,
    ws_unmasked,
    ws_bad_header,
    ws_close,
    ws_fragmented_garbage,
    ws_abort_mid_frame,
    ws_silent,
    garbage_after_start,
    garbage_after_start,
    garbage_after_start,
    fragmented_call,
]


def server_frames(data: bytes) -> Iterator[tuple[int, bytes]]:
    """The complete frames in what the server sent (servers never mask)."""
    position = 0
    while len(data) - position >= 2:
        opcode, size = data[position] & 0x0F, data[position + 1] & 0x7F
        header = 2
        if size == 126:
            if len(data) - position < 4:
                return
            size, header = struct.unpack_from(">H", data, position + 2)[0], 4
        elif size == 127:
            if len(data) - position < 10:
                return
            size, header = struct.unpack_from(">Q", data, position + 2)[0], 10
        if len(data) - position - header < size:
            return
        yield opcode, data[position + header : position + header + size]
        position += header + size


async def read_close_code(reader: asyncio.StreamReader, seconds: float) -> int | None:
    """Read server frames until a close frame; its code, or None at EOF or after ``seconds``."""
    received = b""
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(seconds):
            while chunk := await reader.read(65536):
                received += chunk
                for opcode, payload in server_frames(received):
                    if opcode == OP_CLOSE:
                        return int(struct.unpack(">H", payload[:2])[0]) if len(payload) >= 2 else 1005
    return None


async def read_status(reader: asyncio.StreamReader, seconds: float = READ_SECONDS) -> int | None:
    """The status of the HTTP response the server sends; None at EOF or after ``seconds``."""
    with contextlib.suppress(TimeoutError, ConnectionError, asyncio.IncompleteReadError, ValueError):
        async with asyncio.timeout(seconds):
            head = await reader.readuntil(b"\r\n\r\n")
            return int(head.split(b" ", 2)[1])
    return None


async def run_plan(port: int, plan: Plan) -> Outcome:
    """Carry out one bad connection and note what came back."""
    outcome = Outcome(plan)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if plan.upgrade:
            writer.write(upgrade_request(port))
            status = await read_status(reader)
            if status != 101:
                outcome.problems.append(f"handshake answered {status}")
                return outcome
        with contextlib.suppress(ConnectionError):
            for step in plan.steps:
                if isinstance(step, bytes):
                    writer.write(step)
                    await writer.drain()
                else:
                    await asyncio.sleep(step)
        if plan.end == "http" or (plan.end == "peek" and not plan.upgrade):
            outcome.got = await read_status(reader, READ_SECONDS if plan.end == "http" else PEEK_SECONDS)
            if outcome.got is not None and not 400 <= outcome.got < 500:
                outcome.problems.append(f"answered HTTP {outcome.got}")
        elif plan.end in ("read", "peek"):
            outcome.got = await read_close_code(reader, READ_SECONDS if plan.end == "read" else PEEK_SECONDS)
            if outcome.got is not None and not writer.is_closing():
                writer.write(raw_frame(OP_CLOSE, close_payload(outcome.got)))  # finish the closing handshake
        if outcome.got == 1011:
            outcome.problems.append("closed with 1011 (internal error)")
        if plan.expect is not None and (plan.end != "peek" or outcome.got is not None):
            if outcome.got not in plan.expect:
                outcome.problems.append(f"expected {sorted(plan.expect)}, got {outcome.got}")
    finally:
        if plan.end == "reset":  # an RST, not a FIN: SO_LINGER with a zero timeout
            sock = writer.get_extra_info("socket")
            with contextlib.suppress(OSError):  # the server may have closed it already
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return outcome


async def hammer(port: int, plans: list[Plan]) -> list[Outcome]:
    """Run the plans, at most CONCURRENCY at a time."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(n: int, plan: Plan) -> Outcome:
        await asyncio.sleep(n * SPREAD_SECONDS)  # spread over the good call's whole length
        async with gate:
            return await run_plan(port, plan)

    return list(await asyncio.gather(*(one(n, plan) for n, plan in enumerate(plans))))


async def good_call(
    client: aiohttp.ClientSession, server: CallServer, stream_sid: str, audio: bytes
) -> int | None:
    """Twilio's side of a real call, paced a little faster than real time; the close code."""
    async with client.ws_connect(ws_url(server)) as ws:
        await ws.send_str(twilio_start(stream_sid))
        for i, frame in enumerate(frames(audio)):
            await ws.send_str(media(stream_sid, frame, i * 20, seq=i + 2))
            await asyncio.sleep(0.015)
        await ws.send_str(stop(stream_sid))
        code, _ = await receive_close(ws)
    return code


def wav_path(record_dir: Path, stream_sid: str) -> Path:
    return record_dir / ("CA" + stream_sid[2:]) / f"{stream_sid}.inbound.wav"


async def settled(client: aiohttp.ClientSession, server: CallServer, record_dir: Path) -> dict[str, Any]:
    """Wait for no connection to be open and nothing left in .partial; return /health then."""
    health: dict[str, Any] = {}
    partial = record_dir / ".partial"

    async def quiet() -> bool:
        nonlocal health
        async with client.get(http_url(server, "/health")) as response:
            assert response.status == 200
            health = await response.json()
        return health["connections"] == 0 and not files_under(partial)

    await eventually(quiet, interval=0.05, what="no connection open and nothing left in .partial/")
    return health


def unexpected(record: logging.LogRecord) -> bool:
    """Whether asyncio or aiohttp logged something other than aiohttp refusing a malformed request."""
    if not record.name.startswith(("asyncio", "aiohttp")):
        return False
    error = record.exc_info[1] if record.exc_info else None
    # aiohttp answers a malformed HTTP request with 400 and logs it at ERROR (web_protocol.handle_error).
    return not (record.name == "aiohttp.server" and isinstance(error, HttpProcessingError))


async def test_hostile_crowd_beside_a_good_call(record_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """300 broken connections, 20 at a time, beside one good call: the call and the server are untouched."""
    rng = random.Random(20240611)
    loop_errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: loop_errors.append(context))
    good_sid = sid("MZ", 1)
    audio = random.Random(1).randbytes(8000 * 3 // 2)  # 1.5 s: 75 frames of 20 ms
    caplog.set_level(logging.WARNING)
    try:
        async with (
            running_server(record_dir, max_message_bytes=MAX_MESSAGE, close_timeout=1.0) as server,
            aiohttp.ClientSession() as client,
        ):
            port = server.port
            assert port is not None
            plans = [SCENARIOS[n % len(SCENARIOS)](rng, n, port) for n in range(BAD_CONNECTIONS)]
            code, outcomes = await asyncio.gather(
                good_call(client, server, good_sid, audio), hammer(port, plans)
            )
            health = await settled(client, server, record_dir)
            async with client.get(http_url(server, "/calls")) as response:
                calls = await response.json()
            async with client.get(http_url(server, "/metrics")) as response:
                metrics = await response.text()
    finally:
        loop.set_exception_handler(previous_handler)

    assert code == 1000
    assert read_wav(wav_path(record_dir, good_sid)) == decoded(audio)

    problems = [f"{o.plan.kind}: {p}" for o in outcomes for p in o.problems]
    assert problems == []
    for outcome in outcomes:  # the fuzz calls that were answered were published, sample for sample
        if outcome.plan.audio is not None:
            stream_sid, sent = outcome.plan.audio
            assert read_wav(wav_path(record_dir, stream_sid)) == decoded(sent), outcome.plan.kind

    assert health["status"] == "ok" and health["connections"] == 0 and health["activeCalls"] == 0
    assert calls == []
    assert files_under(record_dir / ".partial") == []
    summaries = [json.loads(path.read_text()) for path in record_dir.glob("*/*.json")]
    answered = sum(1 for o in outcomes if o.plan.audio is not None)
    assert len(summaries) >= 1 + answered  # aborted calls the server saw start are published too
    for summary in summaries:
        assert summary["endReason"] in ("stop", "error", "closed"), summary
        assert all((record_dir / name).is_file() for name in summary["files"].values())

    errors = {
        m["rule"]: float(m["n"])
        for m in re.finditer(r'^callsock_errors_total\{rule="(?P<rule>[^"]+)"\} (?P<n>\S+)$', metrics, re.M)
    }
    rejected = sum(1 for o in outcomes if o.got in PROTOCOL_ERRORS and o.plan.end != "http")
    assert {"websocket-framing", "message-too-big", "binary-frame", "json"} <= set(errors)
    assert sum(errors.values()) >= rejected > 50
    stopped = 1 + sum(1 for o in outcomes if o.plan.kind == "fragmented-call")
    assert f'callsock_calls_ended_total{{reason="stop"}} {float(stopped)}' in metrics

    assert loop_errors == [], "an exception escaped into the event loop"
    assert [r.getMessage() for r in caplog.records if unexpected(r)] == []


async def test_server_closes_deeply_nested_json_with_1007(record_dir: Path) -> None:
    """A message nesting arrays 3000 deep (6 kB) mid-call is closed with 1007, not a dropped TCP connection."""
    stream_sid = sid("MZ", 3)
    async with running_server(record_dir) as server, aiohttp.ClientSession() as client:
        async with client.ws_connect(ws_url(server)) as ws:
            await ws.send_str(twilio_start(stream_sid))
            await ws.send_str('{"event": "connected", "x": ' + "[" * 3000 + "]" * 3000 + "}")
            code, _ = await receive_close(ws)
        assert code == 1007
