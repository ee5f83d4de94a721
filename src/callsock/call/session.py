"""One call's state, independent of any server: protocol, audio buffer, sinks and counters.

A :class:`CallSession` is what a driver (the aiohttp server, or an ASGI adapter) feeds each
message to. It validates through :class:`~callsock.protocol.StreamProtocol`, places audio in the
call's bounded :class:`~callsock.buffer.AudioBuffer`, hands flushed audio to its sinks (the WAV
recorder by default) and, when the call ends, whatever the end, finalizes everything once and
returns the call's summary.

A sink that fails (a full disk, say) is logged and dropped; the call itself goes on, since
ending a phone call because a recording could not be written would hurt the caller too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any, Final, Literal, NoReturn, Protocol

import structlog

from ..protocol.errors import CallsockError, InvalidMessage, StreamError
from ..protocol.g711 import BYTES_PER_MS, SAMPLE_RATE
from ..protocol.messages import Dtmf, InboundMessage, Media, Start
from ..protocol.stream import StartAck, StreamInfo, StreamProtocol
from ..recording.buffer import AudioBuffer

__all__ = ["MAX_AHEAD_SECONDS", "MAX_DTMF_KEPT", "CallCounters", "CallSession", "EndReason", "Sink"]

MAX_AHEAD_SECONDS: Final = 5.0
"""How far a track's timeline may run ahead of the call's wall-clock time: audio past it is dropped
(``aheadDroppedMs``), so disk and memory per call follow the call's real duration."""

MAX_DTMF_KEPT: Final = 256
"""DTMF digits kept for the summary; later ones are counted (``dtmfDropped``), not kept."""

EndReason = Literal[
    "stop", "hangup", "replaced", "closed", "idle-timeout", "max-duration", "error", "shutdown"
]
"""Why a call ended: the peer sent ``stop``; the application hung up; a newer connection took
over; the connection closed without ``stop``; nothing arrived for too long; the call outlasted
``--max-call-seconds``; an error; the server shut down."""


class Sink(Protocol):
    """Where a call's audio goes when its buffer flushes (the WAV recorder is one)."""

    def open(self, stream: StreamInfo, meta: dict[str, Any]) -> None:
        """Prepare for the stream that ``start`` described; ``meta`` is its JSON description."""

    def write(self, track: str, mulaw: bytes | bytearray) -> None:
        """Take a chunk of ``track``'s audio; the buffer is only valid during the call."""

    def progress(self, data: dict[str, Any]) -> None:
        """Take what the summary would say so far (``dtmf``, ``counters``); keep no reference to change."""

    def close(self, summary: dict[str, Any]) -> Future[dict[str, str]] | None:
        """Finish with the call's summary; may return a future of the files it publishes."""


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
        connection_id: unique per connection, for logs and partial file names.
        sinks: where flushed audio goes; opened on ``start``, closed by :meth:`finish`.
        buffer_bytes: the capacity of the call's audio buffer.
        flush_seconds: flush the buffer once its oldest audio is this old (``None``: when full).
        start_ack: see :class:`~callsock.protocol.StreamProtocol`.
        admit: called with the stream a valid ``start`` describes, before anything of the call is
            recorded; it raises a :class:`~callsock.errors.StreamError` to refuse the start, and
            then the call leaves nothing behind (no files, no summary).
        log: the logger lines about this call go to; bound to its SIDs on ``start``.
    """

    def __init__(
        self,
        connection_id: str,
        *,
        sinks: Sequence[Sink] = (),
        buffer_bytes: int = 1 << 20,
        flush_seconds: float | None = None,
        start_ack: StartAck = "auto",
        admit: Callable[[StreamInfo], None] | None = None,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.connection_id = connection_id
        self.protocol = StreamProtocol(start_ack=start_ack)
        self.counters = CallCounters()
        self.connected_at = _now()
        self.started_at: str | None = None
        self.ended_at: str | None = None
        self.end_reason: EndReason | None = None
        self.last_error: CallsockError | None = None
        self.media_timestamp: int | None = None
        """The timestamp, in ms, of the last media message (``None`` if it had none)."""
        self.start_monotonic = 0.0
        """The monotonic time at which ``start`` arrived: the stream's time zero."""
        self.dtmf: list[dict[str, str | None]] = []
        self.dtmf_dropped = 0
        self.summary: dict[str, Any] | None = None
        self.publishing: list[Future[dict[str, str]]] = []
        """What the sinks are still publishing once the call has finished."""
        self.log = log or structlog.get_logger("callsock")
        self._sinks = list(sinks)
        self._buffer_bytes = buffer_bytes
        self._flush_seconds = flush_seconds
        self._buffer: AudioBuffer | None = None
        self._recording_outbound = False
        self._admit = admit
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
        event = type(msg).__name__.lower()
        counters.other[event] = counters.other.get(event, 0) + 1
        if isinstance(msg, Start):
            self._admit_start()
            self._start()
        elif isinstance(msg, Dtmf):
            if len(self.dtmf) < MAX_DTMF_KEPT:
                self.dtmf.append({"digit": msg.dtmf.digit, "sequenceNumber": msg.sequence_number})
                self._journal()
            else:
                self.dtmf_dropped += 1
        return msg

    def _admit_start(self) -> None:
        if self._admit is None:
            return
        assert self.stream is not None
        try:
            self._admit(self.stream)
        except StreamError as exc:
            self.refused = True
            self._sinks.clear()
            self._record_error(exc)
            raise

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
        buffer = self._buffer
        if buffer is None or self.ended_at is not None:
            return
        if not self._recording_outbound:
            buffer.add_track("outbound")
            self._recording_outbound = True
        offset = None
        if play_time is not None:
            offset = max(round((play_time - self.start_monotonic) * SAMPLE_RATE), 0)
        buffer.add_at("outbound", offset, mulaw)

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

    @property
    def stopped(self) -> bool:
        """Whether the peer sent ``stop``."""
        return self.end_reason == "stop"

    def finish(self, reason: EndReason) -> dict[str, Any] | None:
        """End the call: flush the buffer, pad the tracks to equal length, close the sinks.

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
        if self._buffer is not None:
            self._buffer.align()
            self._buffer.flush()
        self.summary = self._summary(stream)
        for sink in self._sinks:
            try:
                publishing = sink.close(self.summary)
            except OSError as exc:
                self.log.error("sink failed", sink=type(sink).__name__, op="close", exc=str(exc))
                continue
            if publishing is not None:
                self.publishing.append(publishing)
        self._sinks.clear()
        return self.summary

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
        assert self._buffer is not None
        self._buffer.add_at(media.track, None if timestamp is None else timestamp * BYTES_PER_MS, payload)

    def _start(self) -> None:
        stream = self.stream
        assert stream is not None
        self.started_at = _now()
        self.start_monotonic = time.monotonic()
        self.log = self.log.bind(callSid=stream.call_sid, streamSid=stream.stream_sid)
        self._buffer = AudioBuffer(
            stream.tracks,
            self._buffer_bytes,
            self._deliver,
            flush_after=self._flush_seconds,
            max_ahead=MAX_AHEAD_SECONDS,
        )
        meta = self._describe(stream)
        for sink in list(self._sinks):
            try:
                sink.open(stream, meta)
            except OSError as exc:
                self._drop_sink(sink, "open", exc)

    def _deliver(self, track: str, mulaw: bytearray) -> None:
        for sink in list(self._sinks):
            try:
                sink.write(track, mulaw)
            except OSError as exc:
                self._drop_sink(sink, "write", exc)
        self._journal()

    def _journal(self) -> None:
        """Tell the sinks what the summary would say so far, as the audio reaches them."""
        progress = {"dtmf": list(self.dtmf), "counters": self._counters()}
        for sink in self._sinks:
            sink.progress(progress)

    def _drop_sink(self, sink: Sink, op: str, exc: OSError) -> None:
        self.log.error("sink failed; call goes on without it", sink=type(sink).__name__, op=op, exc=str(exc))
        self._sinks.remove(sink)

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
        buffer = self._buffer
        return {
            **self._describe(stream),
            "endedAt": self.ended_at,
            "endReason": self.end_reason,
            "error": self.last_error.rule if self.last_error else None,
            "durationMs": round(max(buffer.position_ms(t) for t in buffer.tracks)) if buffer else 0,
            "dtmf": self.dtmf,
            "counters": self._counters(),
        }

    def _counters(self) -> dict[str, Any]:
        counters, buffer = self.counters, self._buffer
        return {
            "messages": counters.messages,
            "receivedBytes": counters.received_bytes,
            "mediaBytes": counters.media_bytes,
            "silenceMs": round(buffer.silence_bytes / BYTES_PER_MS) if buffer else 0,
            "aheadDroppedMs": round(buffer.ahead_bytes / BYTES_PER_MS) if buffer else 0,
            "dtmfDropped": self.dtmf_dropped,
            "errors": counters.errors,
        }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
