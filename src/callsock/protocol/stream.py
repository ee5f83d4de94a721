"""The sans-I/O core of a Media Streams connection: no sockets, no asyncio, only rules.

A :class:`StreamProtocol` is fed the text of each WebSocket message the peer sends and returns
the decoded, validated message, or raises a :class:`~callsock.errors.StreamError` that names the
broken rule and the WebSocket close code to end with. Replies it wants sent (the seed dialect's
start acknowledgement) are collected and handed over by :meth:`StreamProtocol.data_to_send`.

States::

    AWAITING_START --start--> STREAMING --stop--> STOPPED
          |                        |
          +-------- any error -----+----> FAILED   (every later call raises again)

``connected`` is optional (the seed dialect never sends it) and only allowed before ``start``.
"""

from __future__ import annotations

import binascii
import enum
import re
from dataclasses import dataclass, field
from typing import Final, Literal, NoReturn

import msgspec

from .errors import CallEnded, InvalidMessage, PolicyViolation, StreamError, UnsupportedData
from .g711 import SAMPLE_RATE
from .messages import (
    MAX_PARAMETER_CHARS,
    SEED_ACK_PROTOCOL,
    SEED_ACK_VERSION,
    STREAM_TOKEN_PARAMETER,
    Connected,
    Dtmf,
    InboundMessage,
    Mark,
    Media,
    MediaFormat,
    OutboundClear,
    OutboundMark,
    OutboundMarkBody,
    SeedStartAck,
    SeedTrack,
    SeedTrackAck,
    Start,
    Stop,
    decoder,
)

__all__ = ["Dialect", "StartAck", "State", "StreamInfo", "StreamProtocol", "call_key"]

Dialect = Literal["twilio", "seed"]
StartAck = Literal["auto", "always", "never"]

TRACK_IDS: Final = frozenset({"inbound", "outbound"})
"""Track names as the WebSocket spells them (WebSocket Messages, "media.track")."""

MULAW: Final = "audio/x-mulaw"
DTMF_DIGITS: Final = frozenset("0123456789*#ABCD")

MAX_NESTING: Final = 32
"""The deepest nesting of arrays and objects a message may have (Twilio's go 3 deep).

A rule of callsock's own: how deep a JSON decoder can go before it runs out of stack depends on
the interpreter (3.11 stops near a thousand levels, 3.13 goes much further), and a message must
be accepted or refused the same way on every Python callsock supports.
"""

# SIDs name files and directories of recordings, so they must be safe path components.
# Twilio's are two letters and 32 hex digits; the seed's examples use "MTxxxx...".
_SID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


def call_key(call_sid: str | None, stream_sid: str) -> str:
    """A call's key: its callSid, or ``stream.<streamSid>`` when it has none.

    The dot cannot appear in a SID, so a seed-dialect stream whose streamSid equals another
    call's callSid can never be taken for that call: not in the registry (it would replace
    it), nor on disk (it would write into its directory).
    """
    return call_sid or f"stream.{stream_sid}"


class State(enum.Enum):
    """Where a connection is in the Media Streams message sequence."""

    AWAITING_START = "awaiting-start"
    STREAMING = "streaming"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """What a valid ``start`` says about the stream, the same for both dialects.

    Attributes:
        stream_sid: the stream's SID; every later message must carry it.
        call_sid: the call's SID, or ``None`` (the seed dialect may omit it).
        account_sid: the account's SID, or ``None``.
        tracks: the track ids the stream carries, in the order given.
        custom_parameters: ``<Parameter>`` values from the TwiML.
        dialect: ``"twilio"`` (tracks as strings) or ``"seed"`` (tracks as objects).
        stream_token: the ``callsockToken`` custom parameter (left out of ``custom_parameters``).
        media_format: the audio format, as Twilio spells it in ``start.mediaFormat``.
    """

    stream_sid: str
    call_sid: str | None
    account_sid: str | None
    tracks: tuple[str, ...]
    custom_parameters: dict[str, str]
    dialect: Dialect
    stream_token: str | None = None
    media_format: dict[str, str | int] = field(
        default_factory=lambda: {"encoding": MULAW, "sampleRate": SAMPLE_RATE, "channels": 1}
    )

    @property
    def call_key(self) -> str:
        """The key that identifies the call (in the registry, and as its recordings' directory)."""
        return call_key(self.call_sid, self.stream_sid)


class StreamProtocol:
    """Validates one connection's inbound messages and produces its replies.

    Args:
        start_ack: when to answer a ``start`` with the seed guide's acknowledgement:
            ``"auto"`` for seed-dialect starts only (Twilio accepts nothing but media, mark and
            clear and flags anything else, warning 31951), ``"always"`` or ``"never"``.
    """

    def __init__(self, *, start_ack: StartAck = "auto") -> None:
        self.start_ack: StartAck = start_ack
        self.state = State.AWAITING_START
        self.stream: StreamInfo | None = None
        self.error: StreamError | None = None
        self._stream_sid = ""
        self._media_prefix = b""
        self._tracks: tuple[str, ...] = ()
        self._decoder = decoder()
        self._encoder = msgspec.json.Encoder()
        self._outgoing: list[bytes] = []

    def receive_text(self, data: str | bytes | bytearray) -> InboundMessage:
        """Decode and validate one text message.

        Returns:
            The decoded message. For ``media`` the payload is already base64-decoded.

        Raises:
            InvalidMessage: the text is not valid JSON, or breaks the schema or a value rule.
            PolicyViolation: the message is valid but not allowed now, or names another stream.
        """
        if self.state is not State.STREAMING:
            self._check_not_failed()
        if _brackets(data) > MAX_NESTING and _nesting(data) > MAX_NESTING:
            self.fail(InvalidMessage("json", "", f"JSON nested deeper than {MAX_NESTING} levels"))
        try:
            msg = self._decoder.decode(data)
        except msgspec.ValidationError as exc:
            self.fail(_schema_error(str(exc)))
        except msgspec.DecodeError as exc:
            self.fail(InvalidMessage("json", "", _short(str(exc))))
        except RecursionError:  # unreachable below MAX_NESTING; kept so no interpreter can crash here
            self.fail(InvalidMessage("json", "", f"JSON nested deeper than {MAX_NESTING} levels"))
        except UnicodeEncodeError:  # a str holding a lone surrogate cannot be UTF-8
            self.fail(InvalidMessage("json", "", "text is not valid Unicode"))
        if type(msg) is Media:  # the hot path: about 50 a second per track
            if self.state is not State.STREAMING or msg.stream_sid != self._stream_sid:
                self._reject_out_of_place(msg)
            if msg.media.track not in self._tracks:
                self.fail(InvalidMessage("media-track", "media.track", "track not announced in start"))
            return msg
        if isinstance(msg, Start):
            self._receive_start(msg)
        elif isinstance(msg, Connected):
            if self.state is not State.AWAITING_START:
                self.fail(PolicyViolation("order", "event", "connected after start"))
        elif isinstance(msg, Dtmf | Mark | Stop):
            self._receive_control(msg)
        return msg

    def receive_binary(self) -> NoReturn:
        """Reject a binary frame: Media Streams messages are JSON text (warning 31950)."""
        self._check_not_failed()
        self.fail(UnsupportedData("binary-frame", "", "binary frames are not accepted"))

    def data_to_send(self) -> list[bytes]:
        """Return, and forget, the text messages (UTF-8) waiting to be sent to the peer."""
        out, self._outgoing = self._outgoing, []
        return out

    def media_message(self, mulaw: bytes | bytearray) -> bytes:
        """Encode outbound audio: base64 mu-law, no header, this stream's SID (WebSocket Messages).

        Raises:
            CallEnded: the stream has not started, or has ended.
        """
        if self.state is not State.STREAMING:
            raise CallEnded()
        # The same bytes msgspec makes of OutboundMedia (a test holds them equal), built from
        # a prefix made once per stream: this runs for every 20 ms of audio sent.
        return self._media_prefix + binascii.b2a_base64(mulaw, newline=False) + b'"}}'

    def mark_message(self, name: str) -> bytes:
        """Encode an outbound mark; Twilio echoes it when the audio before it has played.

        Raises:
            CallEnded: the stream has not started, or has ended.
        """
        return self._encoder.encode(OutboundMark(self._sending_sid(), OutboundMarkBody(name)))

    def clear_message(self) -> bytes:
        """Encode an outbound clear, which empties Twilio's queue of audio.

        Raises:
            CallEnded: the stream has not started, or has ended.
        """
        return self._encoder.encode(OutboundClear(self._sending_sid()))

    def _sending_sid(self) -> str:
        # Twilio flags a message with a missing or wrong streamSid (31951); nothing can be
        # sent before start gives the SID, nor after the stream ended.
        if self.state is not State.STREAMING:
            raise CallEnded()
        return self._stream_sid

    def _receive_start(self, msg: Start) -> None:
        if self.state is not State.AWAITING_START:
            self.fail(PolicyViolation("second-start", "event", "start received twice"))
        try:
            info = _validate_start(msg)
        except StreamError as exc:
            self.fail(exc)
        self.stream = info
        self._stream_sid = info.stream_sid
        self._media_prefix = (
            b'{"event":"media","streamSid":"%s","media":{"payload":"' % info.stream_sid.encode()
        )
        self._tracks = info.tracks
        self.state = State.STREAMING
        if self.start_ack == "always" or (self.start_ack == "auto" and info.dialect == "seed"):
            self._outgoing.append(_seed_ack(info))

    def _receive_control(self, msg: Dtmf | Mark | Stop) -> None:
        if self.state is not State.STREAMING or msg.stream_sid != self._stream_sid:
            self._reject_out_of_place(msg)
        if isinstance(msg, Dtmf) and msg.dtmf.digit not in DTMF_DIGITS:
            self.fail(InvalidMessage("dtmf-digit", "dtmf.digit", "not a DTMF digit"))
        if isinstance(msg, Stop):
            self.state = State.STOPPED

    def _reject_out_of_place(self, msg: Media | Dtmf | Mark | Stop) -> NoReturn:
        event = type(msg).__name__.lower()
        if self.state is State.AWAITING_START:
            self.fail(PolicyViolation("before-start", "event", f"{event} before start"))
        if self.state is State.STOPPED:
            self.fail(PolicyViolation("after-stop", "event", f"{event} after stop"))
        self.fail(PolicyViolation("stream-sid-mismatch", "streamSid", "streamSid differs from start"))

    def _check_not_failed(self) -> None:
        if self.state is State.FAILED:
            assert self.error is not None
            raise self.error

    def fail(self, error: StreamError) -> NoReturn:
        """Enter the FAILED state and raise ``error``; also for rules checked by the caller."""
        self.state = State.FAILED
        self.error = error
        raise error


def _validate_start(msg: Start) -> StreamInfo:
    """Apply the start rules of both dialects (seed ``validateStartMessage`` and beyond)."""
    body = msg.start
    if not _SID.fullmatch(msg.stream_sid):
        raise InvalidMessage("stream-sid", "streamSid", "streamSid missing or malformed")
    if body.stream_sid is not None and body.stream_sid != msg.stream_sid:
        raise InvalidMessage("stream-sid", "start.streamSid", "start.streamSid differs")
    if body.call_sid is not None and not _SID.fullmatch(body.call_sid):
        raise InvalidMessage("call-sid", "start.callSid", "callSid malformed")
    if body.account_sid is not None and not _SID.fullmatch(body.account_sid):
        raise InvalidMessage("account-sid", "start.accountSid", "accountSid malformed")
    for name, value in body.custom_parameters.items():
        if len(name) + len(value) > MAX_PARAMETER_CHARS:
            raise InvalidMessage(
                "custom-parameter",
                "start.customParameters",
                f"a name and value over {MAX_PARAMETER_CHARS} characters",
            )
    if not body.tracks:
        raise InvalidMessage("tracks", "start.tracks", "no track")
    if all(isinstance(t, str) for t in body.tracks):
        dialect: Dialect = "twilio"
        tracks = tuple(t for t in body.tracks if isinstance(t, str))
        if body.media_format is None:
            raise InvalidMessage("media-format", "start.mediaFormat", "mediaFormat missing")
    elif all(isinstance(t, SeedTrack) for t in body.tracks):
        dialect = "seed"
        tracks = tuple(_validate_seed_track(i, t) for i, t in enumerate(body.tracks))
    else:
        raise InvalidMessage("tracks", "start.tracks", "tracks mix strings and objects")
    for i, track in enumerate(tracks):
        if track not in TRACK_IDS:
            raise InvalidMessage("track-id", f"start.tracks[{i}]", "track id not inbound/outbound")
    if len(set(tracks)) != len(tracks):
        raise InvalidMessage("track-id", "start.tracks", "track listed twice")
    if body.media_format is not None:
        _validate_media_format(body.media_format)
    parameters = dict(body.custom_parameters)
    token = parameters.pop(STREAM_TOKEN_PARAMETER, None)
    return StreamInfo(
        stream_sid=msg.stream_sid,
        call_sid=body.call_sid,
        account_sid=body.account_sid,
        tracks=tracks,
        custom_parameters=parameters,
        dialect=dialect,
        stream_token=token,
    )


def _validate_seed_track(index: int, track: SeedTrack | str) -> str:
    assert isinstance(track, SeedTrack)
    where = f"start.tracks[{index}]"
    _check_format(track.format, track.rate, track.channels, where, "format", "rate", "channels")
    return track.id


def _validate_media_format(fmt: MediaFormat) -> None:
    where = "start.mediaFormat"
    _check_format(fmt.encoding, fmt.sample_rate, fmt.channels, where, "encoding", "sampleRate", "channels")


def _check_format(
    encoding: str | None,
    rate: int | None,
    channels: int | None,
    where: str,
    *names: str,
) -> None:
    if encoding != MULAW:
        raise InvalidMessage("track-format", f"{where}.{names[0]}", "format is not audio/x-mulaw")
    if rate != SAMPLE_RATE:
        raise InvalidMessage("track-rate", f"{where}.{names[1]}", "rate is not 8000")
    if channels != 1:
        raise InvalidMessage("track-channels", f"{where}.{names[2]}", "channels is not 1")


def _seed_ack(info: StreamInfo) -> bytes:
    ack = SeedStartAck(
        protocol=SEED_ACK_PROTOCOL,
        version=SEED_ACK_VERSION,
        stream_sid=info.stream_sid,
        tracks=[SeedTrackAck(id=t) for t in info.tracks],
    )
    return msgspec.json.encode(ack)


_AT: Final = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING: Final = re.compile(r"Object missing required field `(?P<name>[^`]+)`")


def _schema_error(message: str) -> InvalidMessage:
    """Turn a msgspec validation message into a rule and a field path.

    msgspec says, for instance, ``Invalid base64 encoded string - at `$.media.payload```; the
    message names the type or the field, never the offending value, except for an unknown
    ``event`` tag, which is short and shown truncated.
    """
    at = _AT.search(message)
    path = at.group("path") if at else ""
    missing = _MISSING.search(message)
    if missing:
        path = f"{path}.{missing.group('name')}" if path else missing.group("name")
    text = _short(message[: at.start()] if at else message)
    if path == "event":
        return InvalidMessage("event", path, "event missing or unknown")
    if "length <=" in message:  # one of the schema's limits
        return InvalidMessage("too-long", path, text)
    if path == "streamSid":
        return InvalidMessage("stream-sid", path, text)
    if "base64" in message:
        return InvalidMessage("base64", path, "payload is not valid base64")
    return InvalidMessage("schema", path, text)


def _brackets(data: str | bytes | bytearray) -> int:
    """How many arrays and objects a message opens at most: a cheap bound on its nesting."""
    if isinstance(data, str):
        return data.count("{") + data.count("[")
    return data.count(b"{") + data.count(b"[")


_TOKENS: Final = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _nesting(data: str | bytes | bytearray) -> int:
    """The deepest nesting of arrays and objects in ``data``, brackets inside strings aside."""
    raw = data.encode(errors="surrogatepass") if isinstance(data, str) else bytes(data)
    depth = deepest = 0
    for token in _TOKENS.finditer(raw):
        bracket = token[0]
        if bracket in (b"{", b"["):
            depth += 1
            deepest = max(deepest, depth)
        elif bracket in (b"}", b"]"):
            depth -= 1
    return deepest


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
