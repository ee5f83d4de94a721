"""The sans-I/O protocol, fed literal JSON strings: both dialects, every rule, the exact ack."""

from __future__ import annotations

import msgspec
import pytest

from callsock.protocol.errors import InvalidMessage, PolicyViolation, StreamError, UnsupportedData
from callsock.protocol.messages import (
    Connected,
    Dtmf,
    Mark,
    Media,
    OutboundMedia,
    OutboundMediaBody,
    Start,
    Stop,
)
from callsock.protocol.stream import State, StreamProtocol

SID = "MZ00000000000000000000000000000001"

TWILIO_CONNECTED = '{"event": "connected", "protocol": "Call", "version": "1.0.0"}'

TWILIO_START = (
    '{"event": "start", "sequenceNumber": "1", "start": {'
    '"accountSid": "AC00000000000000000000000000000001", '
    '"streamSid": "MZ00000000000000000000000000000001", '
    '"callSid": "CA00000000000000000000000000000001", '
    '"tracks": ["inbound"], '
    '"mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}, '
    '"customParameters": {"FirstName": "Jane"}}, '
    '"streamSid": "MZ00000000000000000000000000000001"}'
)

SEED_START = (
    '{"event": "start", "streamSid": "MTxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", '
    '"start": {"tracks": [{"id": "inbound", "format": "audio/x-mulaw", "rate": 8000, "channels": 1}]}}'
)

SEED_ACK = (
    '{"event":"start","protocol":"wss","version":"1.0.0",'
    '"streamSid":"MTxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx","tracks":[{"id":"inbound"}]}'
)

MEDIA = (
    '{"event": "media", "sequenceNumber": "2", "media": {"track": "inbound", "chunk": "1", '
    '"timestamp": "5", "payload": "/38AAQ=="}, "streamSid": "MZ00000000000000000000000000000001"}'
)


def streaming(start: str = TWILIO_START) -> StreamProtocol:
    protocol = StreamProtocol()
    protocol.receive_text(start)
    protocol.data_to_send()
    return protocol


def rejects(protocol: StreamProtocol, text: str | bytes) -> StreamError:
    with pytest.raises(StreamError) as caught:
        protocol.receive_text(text)
    assert protocol.state is State.FAILED
    return caught.value


def test_twilio_call_in_order() -> None:
    """connected, start, media, dtmf, mark and stop of the real protocol are accepted."""
    protocol = StreamProtocol()
    assert isinstance(protocol.receive_text(TWILIO_CONNECTED), Connected)
    start = protocol.receive_text(TWILIO_START)
    assert isinstance(start, Start)
    stream = protocol.stream
    assert stream is not None
    assert (stream.dialect, stream.tracks, stream.call_key) == (
        "twilio",
        ("inbound",),
        "CA00000000000000000000000000000001",
    )
    assert stream.custom_parameters == {"FirstName": "Jane"}
    media = protocol.receive_text(MEDIA)
    assert isinstance(media, Media)
    assert media.media.payload == b"\xff\x7f\x00\x01"
    assert media.media.timestamp == "5"
    dtmf = protocol.receive_text(
        '{"event": "dtmf", "streamSid": "' + SID + '", "sequenceNumber": "5",'
        ' "dtmf": {"track": "inbound_track", "digit": "#"}}'
    )
    assert isinstance(dtmf, Dtmf) and dtmf.dtmf.digit == "#"
    mark = protocol.receive_text(
        '{"event": "mark", "sequenceNumber": "4", "streamSid": "' + SID + '", "mark": {"name": "greeting"}}'
    )
    assert isinstance(mark, Mark) and mark.mark.name == "greeting"
    stop = protocol.receive_text(
        '{"event": "stop", "sequenceNumber": "5", "stop": {"accountSid": "AC1", "callSid": "CA1"},'
        ' "streamSid": "' + SID + '"}'
    )
    assert isinstance(stop, Stop)
    assert protocol.state is State.STOPPED


def test_twilio_start_gets_no_reply() -> None:
    """Twilio accepts only media, mark and clear, so its start is not acknowledged (auto)."""
    protocol = StreamProtocol()
    protocol.receive_text(TWILIO_START)
    assert protocol.data_to_send() == []


def test_seed_start_gets_the_exact_ack() -> None:
    """A seed-dialect start is answered byte for byte as the seed guide's "Our Response"."""
    protocol = StreamProtocol()
    protocol.receive_text(SEED_START)
    assert protocol.stream is not None and protocol.stream.dialect == "seed"
    assert protocol.stream.call_key == "stream.MTxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"  # no callSid
    assert protocol.data_to_send() == [SEED_ACK.encode()]
    assert protocol.data_to_send() == []


def test_seed_ack_lists_every_track_in_order() -> None:
    """The ack has one {"id"} per incoming track, in the order given."""
    protocol = StreamProtocol()
    protocol.receive_text(
        '{"event":"start","streamSid":"MT1","start":{"tracks":['
        '{"id":"outbound","format":"audio/x-mulaw","rate":8000,"channels":1},'
        '{"id":"inbound","format":"audio/x-mulaw","rate":8000,"channels":1}]}}'
    )
    assert protocol.data_to_send() == [
        b'{"event":"start","protocol":"wss","version":"1.0.0","streamSid":"MT1",'
        b'"tracks":[{"id":"outbound"},{"id":"inbound"}]}'
    ]


@pytest.mark.parametrize(
    ("mode", "twilio_ack", "seed_ack"), [("always", True, True), ("never", False, False)]
)
def test_start_ack_override(mode: str, twilio_ack: bool, seed_ack: bool) -> None:
    """--start-ack always/never overrides the dialect."""
    twilio = StreamProtocol(start_ack=mode)  # type: ignore[arg-type]
    twilio.receive_text(TWILIO_START)
    assert bool(twilio.data_to_send()) is twilio_ack
    seed = StreamProtocol(start_ack=mode)  # type: ignore[arg-type]
    seed.receive_text(SEED_START)
    assert bool(seed.data_to_send()) is seed_ack


def test_always_acks_twilio_start_with_its_sid() -> None:
    """An ack to a Twilio start names its streamSid and its string tracks."""
    protocol = StreamProtocol(start_ack="always")
    protocol.receive_text(TWILIO_START)
    assert protocol.data_to_send() == [
        b'{"event":"start","protocol":"wss","version":"1.0.0",'
        b'"streamSid":"MZ00000000000000000000000000000001","tracks":[{"id":"inbound"}]}'
    ]


def test_two_track_fork_start() -> None:
    """A <Start> fork with both tracks announces inbound and outbound."""
    protocol = StreamProtocol()
    protocol.receive_text(TWILIO_START.replace('["inbound"]', '["inbound", "outbound"]'))
    outbound = MEDIA.replace('"track": "inbound"', '"track": "outbound"')
    media = protocol.receive_text(outbound)
    assert isinstance(media, Media) and media.media.track == "outbound"


def test_unknown_fields_are_ignored() -> None:
    """A field Twilio adds tomorrow does not end live calls."""
    protocol = streaming()
    media = protocol.receive_text(MEDIA.replace('"event": "media",', '"event": "media", "newField": [1],'))
    assert isinstance(media, Media)


# Every rejection rule: (rule, field, error class, message text), fed to a fresh protocol.
START_RULES = [
    ("json", "", InvalidMessage, "this is not json"),
    ("json", "", InvalidMessage, '{"event": "start",'),
    ("schema", "", InvalidMessage, "[1, 2]"),
    ("event", "event", InvalidMessage, '{"streamSid": "MZ1"}'),
    ("event", "event", InvalidMessage, '{"event": "hello", "streamSid": "MZ1"}'),
    ("stream-sid", "streamSid", InvalidMessage, '{"event": "start", "start": {"tracks": ["inbound"]}}'),
    ("stream-sid", "streamSid", InvalidMessage, SEED_START.replace("MTxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", "")),
    ("stream-sid", "streamSid", InvalidMessage, SEED_START.replace("MTxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", "../x")),
    (
        "stream-sid",
        "start.streamSid",
        InvalidMessage,
        TWILIO_START.replace('"streamSid": "MZ00000000000000000000000000000001", "callSid"', '"streamSid": "MZ2", "callSid"'),
    ),
    ("call-sid", "start.callSid", InvalidMessage, TWILIO_START.replace("CA00000000000000000000000000000001", "CA/1")),
    ("tracks", "start.tracks", InvalidMessage, SEED_START.replace('[{"id": "inbound", "format": "audio/x-mulaw", "rate": 8000, "channels": 1}]', "[]")),
    ("tracks", "start.tracks", InvalidMessage, '{"event": "start", "streamSid": "MT1", "start": {}}'),
    ("schema", "start", InvalidMessage, '{"event": "start", "streamSid": "MT1"}'),
    ("tracks", "start.tracks", InvalidMessage, TWILIO_START.replace('["inbound"]', '["inbound", {"id": "outbound"}]')),
    ("track-id", "start.tracks[0]", InvalidMessage, SEED_START.replace('"id": "inbound"', '"id": "caller"')),
    ("track-id", "start.tracks[0]", InvalidMessage, TWILIO_START.replace('["inbound"]', '["inbound_track"]')),
    ("track-id", "start.tracks", InvalidMessage, TWILIO_START.replace('["inbound"]', '["inbound", "inbound"]')),
    ("track-format", "start.tracks[0].format", InvalidMessage, SEED_START.replace("audio/x-mulaw", "audio/l16")),
    ("track-format", "start.tracks[0].format", InvalidMessage, SEED_START.replace('"format": "audio/x-mulaw", ', "")),
    ("track-rate", "start.tracks[0].rate", InvalidMessage, SEED_START.replace("8000", "16000")),
    ("track-channels", "start.tracks[0].channels", InvalidMessage, SEED_START.replace('"channels": 1', '"channels": 2')),
    ("schema", "start.tracks[0].rate", InvalidMessage, SEED_START.replace("8000", '"8000"')),
    ("media-format", "start.mediaFormat", InvalidMessage, TWILIO_START.replace(', "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}', "")),
    ("track-format", "start.mediaFormat.encoding", InvalidMessage, TWILIO_START.replace("audio/x-mulaw", "audio/x-alaw")),
    ("track-rate", "start.mediaFormat.sampleRate", InvalidMessage, TWILIO_START.replace('"sampleRate": 8000', '"sampleRate": 16000')),
    ("track-channels", "start.mediaFormat.channels", InvalidMessage, TWILIO_START.replace('"channels": 1', '"channels": 2')),
    ("before-start", "event", PolicyViolation, MEDIA),
    ("before-start", "event", PolicyViolation, '{"event": "stop", "streamSid": "MZ1"}'),
    ("before-start", "event", PolicyViolation, '{"event": "mark", "streamSid": "MZ1", "mark": {"name": "a"}}'),
    ("before-start", "event", PolicyViolation, '{"event": "dtmf", "streamSid": "MZ1", "dtmf": {"digit": "1"}}'),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "field", "kind", "text"), START_RULES)
def test_rejected_before_or_at_start(rule: str, field: str, kind: type[StreamError], text: str) -> None:
    """Each rule of start validation rejects with its rule, field and error class."""
    error = rejects(StreamProtocol(), text)
    assert (error.rule, error.field, type(error)) == (rule, field, kind)


STREAMING_RULES = [
    ("second-start", "event", PolicyViolation, TWILIO_START),
    ("order", "event", PolicyViolation, TWILIO_CONNECTED),
    ("stream-sid-mismatch", "streamSid", PolicyViolation, MEDIA.replace(SID, "MZ00000000000000000000000000000002")),
    ("stream-sid-mismatch", "streamSid", PolicyViolation, '{"event": "stop", "streamSid": "MZ9"}'),
    ("stream-sid", "streamSid", InvalidMessage, MEDIA.replace(', "streamSid": "' + SID + '"', "")),
    ("base64", "media.payload", InvalidMessage, MEDIA.replace("/38AAQ==", "not base64!")),
    ("base64", "media.payload", InvalidMessage, MEDIA.replace("/38AAQ==", "/38AAQ")),
    ("schema", "media.payload", InvalidMessage, MEDIA.replace('"/38AAQ=="', "12")),
    ("schema", "media.payload", InvalidMessage, MEDIA.replace('"payload": "/38AAQ=="', '"payloads": "x"')),
    ("schema", "media.timestamp", InvalidMessage, MEDIA.replace('"timestamp": "5"', '"timestamp": 5')),
    ("media-track", "media.track", InvalidMessage, MEDIA.replace('"track": "inbound"', '"track": "outbound"')),
    ("dtmf-digit", "dtmf.digit", InvalidMessage, '{"event": "dtmf", "streamSid": "' + SID + '", "dtmf": {"digit": "12"}}'),
    ("schema", "mark.name", InvalidMessage, '{"event": "mark", "streamSid": "' + SID + '", "mark": {}}'),
    ("schema", "mark", InvalidMessage, '{"event": "mark", "streamSid": "' + SID + '"}'),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "field", "kind", "text"), STREAMING_RULES)
def test_rejected_while_streaming(rule: str, field: str, kind: type[StreamError], text: str) -> None:
    """Each rule checked after start rejects with its rule, field and error class."""
    error = rejects(streaming(), text)
    assert (error.rule, error.field, type(error)) == (rule, field, kind)


def test_close_codes_by_class() -> None:
    """Invalid data closes 1007, policy violations 1008, binary frames 1003."""
    assert InvalidMessage("x").close_code == 1007
    assert PolicyViolation("x").close_code == 1008
    assert UnsupportedData("x").close_code == 1003


def test_binary_frame_rejected() -> None:
    """A binary frame is rejected (warning 31950 on Twilio's side) with 1003."""
    protocol = streaming()
    with pytest.raises(UnsupportedData) as caught:
        protocol.receive_binary()
    assert caught.value.rule == "binary-frame"
    assert protocol.state is State.FAILED


def test_after_stop_rejected() -> None:
    """Nothing may follow stop."""
    protocol = streaming()
    protocol.receive_text('{"event": "stop", "streamSid": "' + SID + '"}')
    error = rejects(protocol, MEDIA)
    assert error.rule == "after-stop"


def test_failed_stays_failed() -> None:
    """After an error every later message raises the same error (h11's rule)."""
    protocol = streaming()
    first = rejects(protocol, "nope")
    with pytest.raises(StreamError) as again:
        protocol.receive_text(MEDIA)
    assert again.value is first


def test_error_text_never_quotes_the_payload() -> None:
    """Rejection details name the rule and field, not the audio."""
    payload = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo" * 3
    for text in (MEDIA.replace("/38AAQ==", payload), MEDIA.replace('"/38AAQ=="', "[" + '"' + payload + '"]')):
        error = rejects(streaming(), text)
        assert payload not in str(error)
        assert payload not in error.close_reason


def test_unknown_event_value_not_echoed() -> None:
    """An unknown event name, peer-chosen text, is not repeated in the error."""
    error = rejects(StreamProtocol(), '{"event": "' + "x" * 500 + '"}')
    assert "xxxx" not in str(error)


def test_close_reason_fits_a_control_frame() -> None:
    """Close reasons are at most 123 bytes (RFC 6455 section 5.5)."""
    error = InvalidMessage("schema", "a" * 200, "b" * 200)
    assert len(error.close_reason.encode()) <= 123


def test_bytes_input_and_invalid_utf8() -> None:
    """Text arrives as UTF-8 bytes; invalid UTF-8 is a json error."""
    protocol = StreamProtocol()
    assert isinstance(protocol.receive_text(TWILIO_START.encode()), Start)
    error = rejects(streaming(), b'{"event": "media", "streamSid": "\xff"}')
    assert error.rule == "json"


def test_media_message_equals_the_schema_encoding() -> None:
    """The hand-built outbound media message is byte for byte what msgspec makes of the schema."""
    protocol = streaming()
    for audio in (b"", b"\x00", bytes(range(256)), b"\xff" * 160):
        expected = msgspec.json.encode(OutboundMedia(SID, OutboundMediaBody(audio)))
        assert protocol.media_message(audio) == expected
