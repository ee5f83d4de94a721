"""The wire schema of Twilio Media Streams, as msgspec structs decoded in one pass.

Inbound messages form a tagged union on ``event`` (Twilio's "WebSocket Messages" page, section
"Messages Twilio sends"). Field names are Twilio's camelCase on the wire and snake_case here.
Counters (``sequenceNumber``, ``media.chunk``, ``media.timestamp``) are strings on the wire and
stay strings: Twilio documents them so, and strict decoding rejects a number in their place.

``media.payload`` is typed ``bytes``, so msgspec decodes (and strictly validates) the base64 while
it parses the JSON. Unknown fields are ignored, so a field Twilio adds tomorrow cannot end live
calls; everything callsock relies on is required and typed. Every string has a length limit (the
``MAX_`` constants, checked by the decoder at no extra cost), so what a call keeps of what its peer
says is bounded whatever the peer sends. Messages hold only strings, bytes
and other messages, never a cycle, so they are left out of the garbage collector (``gc=False``):
at thousands of messages a second that keeps collections rare and short.

``start`` comes in two dialects:

- Twilio's: ``start.tracks`` is a list of strings and the format is in ``start.mediaFormat``.
- The seed guide's: ``start.tracks`` is a list of ``{id, format, rate, channels}`` objects, and
  callSid, accountSid and mediaFormat may be missing.

Both decode into :class:`StartBody`; :mod:`callsock.protocol` tells them apart and validates them.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

__all__ = [
    "Connected",
    "Dtmf",
    "DtmfBody",
    "Inbound",
    "Mark",
    "MarkBody",
    "Media",
    "MediaBody",
    "MediaFormat",
    "OutboundClear",
    "OutboundMark",
    "OutboundMarkBody",
    "OutboundMedia",
    "OutboundMediaBody",
    "SeedStartAck",
    "SeedTrack",
    "SeedTrackAck",
    "Start",
    "StartBody",
    "Stop",
    "StopBody",
    "decoder",
    "event_name",
]


MAX_COUNTER_CHARS: Final = 20
"""``sequenceNumber``, ``chunk`` and ``timestamp`` are counters: 20 digits hold any 64-bit value."""
MAX_NAME_CHARS: Final = 64
"""Track names, formats, SIDs, the protocol's name and version: short words."""
MAX_MARK_CHARS: Final = 256
"""A mark's name, both ways (callsock refuses to send a longer one)."""
MAX_PARAMETER_CHARS: Final = 500
"""A custom parameter's name and value together ("must be under 500 characters", TwiML <Parameter>)."""
MAX_PARAMETERS: Final = 99
"""Custom parameters per stream (the REST API takes Parameter1 to Parameter99)."""
STREAM_TOKEN_PARAMETER: Final = "callsockToken"
"""The custom parameter callsock's stream token travels in (see :mod:`callsock.tokens`); it is
taken out of ``customParameters``, so no summary, event or application ever sees it."""

Counter = Annotated[str, msgspec.Meta(max_length=MAX_COUNTER_CHARS)]
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]
MarkName = Annotated[str, msgspec.Meta(max_length=MAX_MARK_CHARS)]
ParameterText = Annotated[str, msgspec.Meta(max_length=MAX_PARAMETER_CHARS)]
Parameters = Annotated[dict[ParameterText, ParameterText], msgspec.Meta(max_length=MAX_PARAMETERS)]


class MediaFormat(msgspec.Struct, rename="camel", gc=False):
    """``start.mediaFormat``: always mu-law, 8000 Hz, mono on Twilio."""

    encoding: Name
    sample_rate: int
    channels: int


class SeedTrack(msgspec.Struct, gc=False):
    """One entry of ``start.tracks`` in the seed dialect; validated by the protocol."""

    id: Name
    format: Name | None = None
    rate: int | None = None
    channels: int | None = None


class StartBody(msgspec.Struct, rename="camel", omit_defaults=True, gc=False):
    """The ``start`` object of a start message, in either dialect."""

    tracks: Annotated[tuple[Name | SeedTrack, ...], msgspec.Meta(max_length=4)] = ()
    stream_sid: Name | None = None
    account_sid: Name | None = None
    call_sid: Name | None = None
    media_format: MediaFormat | None = None
    custom_parameters: Parameters = msgspec.field(default_factory=dict)


class MediaBody(msgspec.Struct, gc=False):
    """The ``media`` object of an inbound media message."""

    payload: bytes
    track: Name = "inbound"
    chunk: Counter | None = None
    timestamp: Counter | None = None


class DtmfBody(msgspec.Struct, gc=False):
    """The ``dtmf`` object: a digit pressed by the caller."""

    digit: Name
    track: Name = "inbound_track"


class MarkBody(msgspec.Struct, gc=False):
    """The ``mark`` object: the name of a mark the server sent earlier."""

    name: MarkName


class StopBody(msgspec.Struct, rename="camel", omit_defaults=True, gc=False):
    """The ``stop`` object; the seed dialect may leave it out."""

    account_sid: Name | None = None
    call_sid: Name | None = None


class Inbound(msgspec.Struct, tag_field="event", rename="camel", omit_defaults=True, gc=False):
    """Base of every message Twilio sends; ``event`` is the tag.

    (``omit_defaults`` only shapes encoding, for the simulator: an absent optional field stays
    absent rather than becoming ``null``.)
    """


class Connected(Inbound, tag="connected"):
    """The first message: names the protocol (``Call``) and its version."""

    protocol: Name | None = None
    version: Name | None = None


class Start(Inbound, tag="start"):
    """Stream metadata, sent once before any media."""

    stream_sid: Name
    start: StartBody
    sequence_number: Counter | None = None


class Media(Inbound, tag="media"):
    """A chunk of caller (or, on a fork, callee) audio."""

    stream_sid: Name
    media: MediaBody
    sequence_number: Counter | None = None


class Dtmf(Inbound, tag="dtmf"):
    """A DTMF digit (bidirectional streams only)."""

    stream_sid: Name
    dtmf: DtmfBody
    sequence_number: Counter | None = None


class Mark(Inbound, tag="mark"):
    """The echo of a mark the server sent: its audio played, or was cleared."""

    stream_sid: Name
    mark: MarkBody
    sequence_number: Counter | None = None


class Stop(Inbound, tag="stop"):
    """The stream has ended."""

    stream_sid: Name
    stop: StopBody | None = None
    sequence_number: Counter | None = None


InboundMessage = Connected | Start | Media | Dtmf | Mark | Stop


def event_name(message: Inbound) -> str:
    """A message's ``event``, as the wire spells it (its tag): for counters and logs."""
    tag: str = message.__struct_config__.tag  # type: ignore[assignment]
    return tag


def decoder() -> msgspec.json.Decoder[InboundMessage]:
    """Return a decoder for inbound messages; build one per protocol object and reuse it."""
    return msgspec.json.Decoder(InboundMessage)


class SeedTrackAck(msgspec.Struct, gc=False):
    """One track of the seed dialect's start acknowledgement."""

    id: str


class SeedStartAck(msgspec.Struct, tag_field="event", tag="start", rename="camel", gc=False):
    """The seed guide's reply to a start ("Our Response"), fields in its exact order."""

    protocol: str
    version: str
    stream_sid: str
    tracks: list[SeedTrackAck]


class OutboundMediaBody(msgspec.Struct, gc=False):
    """The ``media`` object the server sends: base64 mu-law with no file header."""

    payload: bytes


class OutboundMarkBody(msgspec.Struct, gc=False):
    """The ``mark`` object the server sends; ``name`` must be nested here (warning 31951 otherwise)."""

    name: str


class OutboundMedia(msgspec.Struct, tag_field="event", tag="media", rename="camel", gc=False):
    """Audio for Twilio to play, queued after what it already has."""

    stream_sid: str
    media: OutboundMediaBody


class OutboundMark(msgspec.Struct, tag_field="event", tag="mark", rename="camel", gc=False):
    """A marker Twilio echoes back when the audio queued before it has played, or was cleared."""

    stream_sid: str
    mark: OutboundMarkBody


class OutboundClear(msgspec.Struct, tag_field="event", tag="clear", rename="camel", gc=False):
    """Empties Twilio's buffer of queued audio; pending marks are echoed back."""

    stream_sid: str


SEED_ACK_PROTOCOL: Final = "wss"
SEED_ACK_VERSION: Final = "1.0.0"
