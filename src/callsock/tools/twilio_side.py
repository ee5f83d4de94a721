"""The Twilio side of a stream: the messages ``callsock simulate`` and ``callsock bench`` send.

Built from the same schema the server decodes (:mod:`callsock.schema`), so the two sides cannot
drift apart. Counters are strings, as Twilio sends them (WebSocket Messages, "Media message").
"""

from __future__ import annotations

import binascii
import secrets
from dataclasses import dataclass, field
from typing import Final, Literal

import msgspec

from ..protocol.messages import (
    STREAM_TOKEN_PARAMETER,
    Connected,
    Dtmf,
    DtmfBody,
    Mark,
    MarkBody,
    MediaFormat,
    SeedTrack,
    Start,
    StartBody,
    Stop,
    StopBody,
)
from ..protocol.stream import MULAW
from ..protocol.tokens import stream_token

__all__ = ["Caller", "Dialect", "new_sid"]

Dialect = Literal["twilio", "seed"]

_ENCODER: Final = msgspec.json.Encoder()


def new_sid(prefix: str) -> str:
    """A random Twilio-shaped SID: ``prefix`` and 32 hex digits."""
    return prefix + secrets.token_hex(16)


@dataclass
class Caller:
    """Builds one stream's messages, keeping its sequence numbers and per-track clocks.

    Attributes:
        stream_sid: the stream's SID.
        call_sid: the call's SID.
        account_sid: the account's SID.
        dialect: ``twilio`` (tracks as strings, mediaFormat) or ``seed`` (track objects).
        tracks: the tracks the stream announces.
        parameters: the ``customParameters`` of ``start``.
        auth_token: with one, ``start`` carries the call's stream token (:mod:`callsock.tokens`),
            as Twilio passes on the ``<Parameter>`` callsock's TwiML gives it.
    """

    stream_sid: str = field(default_factory=lambda: new_sid("MZ"))
    call_sid: str = field(default_factory=lambda: new_sid("CA"))
    account_sid: str = field(default_factory=lambda: new_sid("AC"))
    dialect: Dialect = "twilio"
    tracks: tuple[str, ...] = ("inbound",)
    parameters: dict[str, str] = field(default_factory=dict)
    auth_token: str | None = field(default=None, repr=False)
    sequence: int = 0
    chunks: int = 0
    clocks: dict[str, int] = field(default_factory=dict)

    def connected(self) -> bytes:
        """The first message (Twilio's dialect only)."""
        return _ENCODER.encode(Connected(protocol="Call", version="1.0.0"))

    def start(self) -> bytes:
        """The ``start`` message, in this caller's dialect, with :attr:`parameters` (if any)."""
        if self.dialect == "seed":
            tracks: tuple[str | SeedTrack, ...] = tuple(SeedTrack(t, MULAW, 8000, 1) for t in self.tracks)
            # The seed dialect names no customParameters; they go in only when there are some.
            seed = StartBody(tracks=tracks, custom_parameters=self.parameters)
            return _ENCODER.encode(Start(stream_sid=self.stream_sid, start=seed))
        parameters = dict(self.parameters)
        if self.auth_token:
            parameters[STREAM_TOKEN_PARAMETER] = stream_token(self.auth_token, self.call_sid)
        body = StartBody(
            tracks=self.tracks,
            stream_sid=self.stream_sid,
            account_sid=self.account_sid,
            call_sid=self.call_sid,
            media_format=MediaFormat(MULAW, 8000, 1),
            custom_parameters=parameters,
        )
        return _ENCODER.encode(Start(stream_sid=self.stream_sid, start=body, sequence_number=self._next()))

    def media(self, payload: bytes, track: str = "inbound") -> bytes:
        """A ``media`` message with the next counters; the track's clock advances by its length."""
        timestamp = self.clocks.get(track, 0)
        self.clocks[track] = timestamp + len(payload) // 8
        self.chunks += 1
        self.sequence += 1
        return (
            b'{"event":"media","sequenceNumber":"%d","media":{"track":"%s","chunk":"%d","timestamp":"%d","payload":"%s"},"streamSid":"%s"}'
            % (
                self.sequence,
                track.encode(),
                self.chunks,
                timestamp,
                binascii.b2a_base64(payload, newline=False),
                self.stream_sid.encode(),
            )
        )

    def skip(self, milliseconds: int, track: str = "inbound") -> None:
        """Advance a track's clock without sending: a lost frame, as the timestamps show it."""
        self.clocks[track] = self.clocks.get(track, 0) + milliseconds

    def dtmf(self, digit: str) -> bytes:
        """A ``dtmf`` message (track ``inbound_track``, as Twilio spells it there)."""
        return _ENCODER.encode(
            Dtmf(stream_sid=self.stream_sid, dtmf=DtmfBody(digit=digit), sequence_number=self._next())
        )

    def mark(self, name: str) -> bytes:
        """The echo of a mark the server sent."""
        return _ENCODER.encode(
            Mark(stream_sid=self.stream_sid, mark=MarkBody(name), sequence_number=self._next())
        )

    def stop(self) -> bytes:
        """The ``stop`` message."""
        body = (
            StopBody(account_sid=self.account_sid, call_sid=self.call_sid)
            if self.dialect == "twilio"
            else None
        )
        return _ENCODER.encode(Stop(stream_sid=self.stream_sid, stop=body, sequence_number=self._next()))

    def _next(self) -> str | None:
        if self.dialect == "seed":
            return None
        self.sequence += 1
        return str(self.sequence)
