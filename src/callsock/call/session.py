"""One call's state, independent of any server: the protocol, counters, DTMF, and its end.

A :class:`CallSession` is what a driver (the aiohttp server, or an ASGI adapter) feeds each
message to. It validates through :class:`~callsock.protocol.stream.StreamProtocol`, counts, hands
each chunk of audio to the call's :class:`Recording` at its place on the timeline and, when the
call ends, whatever the end, finishes once and returns the call's summary.

The recording is given, not made here: the call layer knows what it needs of one (the
:class:`Recording` protocol), and :class:`~callsock.recording.recorder.CallRecorder` is what a
server gives it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any, Final, Literal, NoReturn, Protocol

import structlog

from ..protocol.errors import CallsockError, InvalidMessage, StreamError
from ..protocol.g711 import BYTES_PER_MS
from ..protocol.messages import Dtmf, InboundMessage, Media, Start, event_name
from ..protocol.stream import StartAck, StreamInfo, StreamProtocol

__all__ = ["MAX_DTMF_KEPT", "CallCounters", "CallSession", "EndReason", "Recording"]

MAX_DTMF_KEPT: Final = 256
"""DTMF digits kept for the summary; later ones are counted (``dtmfDropped``), not kept."""

EndReason = Literal[
    "stop", "hangup", "replaced", "closed", "idle-timeout", "max-duration", "error", "shutdown"
]
"""Why a call ended: the peer sent ``stop``; the application hung up; a newer connection took
over; the connection closed without ``stop``; nothing arrived for too long; the call outlasted
``--max-call-seconds``; an error; the server shut down."""


class Recording(Protocol):
    """What a call needs of its recording (:class:`~callsock.recording.recorder.CallRecorder`)."""

    place: Callable[[str, int | None, bytes], None]
    """``place(track, offset, mulaw)``: inbound audio at ``offset`` samples (``None``: next)."""

    def open(self, stream: StreamInfo, meta: dict[str, Any], progress: Callable[[], dict[str, Any]]) -> None:
        """The stream started; ``progress`` returns what the summary would say so far."""

    def outbound(self, mulaw: bytes, play_time: float | None) -> None:
        """Audio the caller heard from the application (``play_time`` ``None``: after the last)."""

    def journal(self) -> None:
        """What the summary would say changed: keep it, for a crash."""

    def figures(self) -> dict[str, int]:
        """``durationMs``, ``silenceMs`` and ``aheadDroppedMs`` of the timeline."""

    def end(self) -> None:
        """The call ended: complete the timeline."""

    def close(self, summary: dict[str, Any]) -> Future[dict[str, str]] | None:
        """Publish the call with ``summary``; a future of the files, or ``None``."""

    def discard(self) -> None:
        """The start was refused: keep nothing."""


class CallCounters:
    """What a call has received, kept as plain integers on the per-message path."""

    __slots__ = ("errors", "media", "media_bytes", "other", "received_bytes")

    def __init__(self) -> None:
        self.media = 0
        self.other: dict[str, int] = {}
        self.received_bytes = 0
        self.media_bytes = 0
        self.errors = 0

    @property
    def messages(self) -> dict[str, int]:
        """Messages received, by event (only events that occurred)."""
        counts = dict(self.other)
        if self.media:
            counts["media"] = self.media
        return counts

    @property
    def total(self) -> int:
        """All messages received."""
        return self.media + sum(self.other.values())


class CallSession:
    """The sans-I/O state of one call: feed it messages, then :meth:`finish` it.

    Args:
        connection_id: unique per connection, for logs.
        recording: where the call's audio goes (opened on ``start``, closed by :meth:`finish`).
        start_ack: see :class:`~callsock.protocol.stream.StreamProtocol`.
        admit: called with the stream a valid ``start`` describes, before anything of the call is
            recorded; it raises a :class:`~callsock.protocol.errors.StreamError` to refuse the
            start, and then the call leaves nothing behind (no files, no summary).
        log: the logger lines about this call go to; bound to its SIDs on ``start``.
    """

    def __init__(
        self,
        connection_id: str,
        recording: Recording,
        *,
        start_ack: StartAck = "auto",
        admit: Callable[[StreamInfo], None] | None = None,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.connection_id = connection_id
        self.protocol = StreamProtocol(start_ack=start_ack)
        self.recording = recording
        self.counters = CallCounters()
        self.connected_at = _now()
        self.started_at: str | None = None
        self.ended_at: str | None = None
        self.end_reason: EndReason | None = None
        self.last_error: CallsockError | None = None
        self.media_timestamp: int | None = None
        """The timestamp, in ms, of the last media message (``None`` if it had none)."""
        self.dtmf: list[dict[str, str | None]] = []
        self.dtmf_dropped = 0
        self.summary: dict[str, Any] | None = None
        self.publishing: Future[dict[str, str]] | None = None
        """The recording being published, once the call has finished (``None``: nothing to publish)."""
        self.log = log or structlog.get_logger("callsock")
        self._admit = admit
        self._place: Callable[[str, int | None, bytes], None] = recording.place
        self.refused = False
        """Whether ``admit`` refused the start (the call is then not recorded)."""

    @property
    def stream(self) -> StreamInfo | None:
        """The stream ``start`` described, once it has arrived."""
        return self.protocol.stream

    def receive_text(self, data: str | bytes | bytearray) -> InboundMessage:
        """Validate one text message and act on it; see :meth:`StreamProtocol.receive_text`.

        Raises:
            StreamError: the message broke a rule; the connection must close with its code.
        """
        counters = self.counters
        counters.received_bytes += len(data)
        try:
            msg = self.protocol.receive_text(data)
            if type(msg) is Media:
                counters.media += 1
                self._receive_media(msg)
                return msg
        except StreamError as exc:
            self._record_error(exc)
            raise
        event = event_name(msg)
        counters.other[event] = counters.other.get(event, 0) + 1
        if isinstance(msg, Start):
            self._admit_start()
            self._start()
        elif isinstance(msg, Dtmf):
            if len(self.dtmf) < MAX_DTMF_KEPT:
                self.dtmf.append({"digit": msg.dtmf.digit, "sequenceNumber": msg.sequence_number})
                self.recording.journal()
            else:
                self.dtmf_dropped += 1
        return msg

    def receive_binary(self) -> NoReturn:
        """Reject a binary frame (close code 1003)."""
        try:
            self.protocol.receive_binary()
        except StreamError as exc:
            self._record_error(exc)
            raise

    def fail(self, error: CallsockError) -> None:
        """Record an error found outside the protocol (an oversized frame, a failed handler)."""
        self._record_error(error)

    def record_outbound(self, mulaw: bytes, play_time: float | None) -> None:
        """Record audio the caller heard from the application.

        Args:
            mulaw: the audio.
            play_time: the monotonic time it started to play, or ``None`` when it played right
                after the previous outbound audio (placed back to back, whatever the clock says).
        """
        if self.stream is not None and self.ended_at is None:
            self.recording.outbound(mulaw, play_time)

    def mark_late(self, rule: str) -> None:
        """Say in the summary that the recording was not on disk when the connection closed.

        The summary is being published on the writer thread, which serializes it last; replacing
        the value of a key it already has is safe meanwhile (its size does not change).
        """
        if self.summary is not None and self.summary["error"] is None:
            self.summary["error"] = rule

    def data_to_send(self) -> list[bytes]:
        """Return, and forget, the messages waiting to be sent to the peer."""
        return self.protocol.data_to_send()

    def finish(self, reason: EndReason) -> dict[str, Any] | None:
        """End the call: complete the recording's timeline and publish it with the summary.

        Safe to call more than once; only the first call acts. ``reason`` is kept unless the
        call already failed (the end reason is then ``error``).

        Returns:
            The call's summary (also kept as :attr:`summary`), or ``None`` if ``start`` never
            arrived or was refused.
        """
        if self.ended_at is not None:
            return self.summary
        self.ended_at = _now()
        self.end_reason = "error" if self.last_error is not None else reason
        stream = self.stream
        if stream is None or self.refused:
            return None
        self.recording.end()
        self.summary = self._summary(stream)
        try:
            self.publishing = self.recording.close(self.summary)
        except OSError as exc:
            self.log.error("recording failed", exc=str(exc))
        return self.summary

    def _admit_start(self) -> None:
        if self._admit is None:
            return
        assert self.stream is not None
        try:
            self._admit(self.stream)
        except StreamError as exc:
            self.refused = True
            self.recording.discard()
            self._record_error(exc)
            raise

    def _receive_media(self, msg: Media) -> None:
        media = msg.media
        stamp = media.timestamp
        timestamp: int | None = None
        if stamp is not None:
            try:
                timestamp = int(stamp)
            except ValueError:
                timestamp = -1
            if timestamp < 0:
                self.protocol.fail(InvalidMessage("timestamp", "media.timestamp", "not a count of ms"))
        self.media_timestamp = timestamp
        payload = media.payload
        self.counters.media_bytes += len(payload)
        self._place(media.track, None if timestamp is None else timestamp * BYTES_PER_MS, payload)

    def _start(self) -> None:
        stream = self.stream
        assert stream is not None
        self.started_at = _now()
        self.log = self.log.bind(callSid=stream.call_sid, streamSid=stream.stream_sid)
        self.recording.open(stream, self._describe(stream), self._progress)
        self._place = self.recording.place  # looked up once: it runs for every media message

    def _progress(self) -> dict[str, Any]:
        """What the summary would say so far, for the recording's journal (copies, kept as they are)."""
        return {"dtmf": list(self.dtmf), "counters": self._counters()}

    def _record_error(self, exc: CallsockError) -> None:
        if self.last_error is None:
            self.counters.errors += 1
            self.last_error = exc

    def _describe(self, stream: StreamInfo) -> dict[str, Any]:
        return {
            "callSid": stream.call_sid,
            "streamSid": stream.stream_sid,
            "accountSid": stream.account_sid,
            "tracks": list(stream.tracks),
            "mediaFormat": stream.media_format,
            "customParameters": stream.custom_parameters,
            "dialect": stream.dialect,
            "startedAt": self.started_at,
        }

    def _summary(self, stream: StreamInfo) -> dict[str, Any]:
        return {
            **self._describe(stream),
            "endedAt": self.ended_at,
            "endReason": self.end_reason,
            "error": self.last_error.rule if self.last_error else None,
            "durationMs": self.recording.figures()["durationMs"],
            "dtmf": self.dtmf,
            "counters": self._counters(),
        }

    def _counters(self) -> dict[str, Any]:
        counters, figures = self.counters, self.recording.figures()
        return {
            "messages": counters.messages,
            "receivedBytes": counters.received_bytes,
            "mediaBytes": counters.media_bytes,
            "silenceMs": figures["silenceMs"],
            "aheadDroppedMs": figures["aheadDroppedMs"],
            "dtmfDropped": self.dtmf_dropped,
            "errors": counters.errors,
        }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
