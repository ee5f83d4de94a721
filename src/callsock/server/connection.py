"""One WebSocket connection and the call it carries, independent of the framework that drives it.

A driver (the aiohttp transport, the ASGI adapter) parses frames and calls
:meth:`Connection.receive_text` for each text message. Everything here is synchronous: writes
go to the :class:`Transport`, which queues them in order, so the per-message path awaits
nothing and a ``start`` is fully acted on (call claimed, acknowledgement written, application
started) before the next message is read. Only the application's handlers and outbound pacing
run in tasks.

Everything about a call that is not moving bytes lives here: claiming the call in the
registry, the start acknowledgement, the application's handlers and outbound audio, closing
with the right code, and finishing the call exactly once, whatever ends it. What connections
share comes in explicitly (:class:`Shared`); what happens to the call goes out to the hub's
observers (:mod:`callsock.server.observers`), never by reaching into metrics or the cluster.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from ..call.call import AudioFrame, Call, MarkEcho
from ..call.handlers import MAX_QUEUED_EVENTS, HandlerRunner, Handlers
from ..call.outbound import Outbound, Sender
from ..call.session import CallCounters, CallSession, EndReason, Recording
from ..cluster.registry import CallRegistry
from ..observability.logs import get_logger
from ..protocol.codes import CloseCode
from ..protocol.errors import (
    CallEnded,
    CallsockError,
    CallTooLong,
    HandlerFailed,
    IdleTimeout,
    MessageTooBig,
    PolicyViolation,
    Replaced,
    StreamError,
)
from ..protocol.messages import Connected, Dtmf, InboundMessage, Mark, Media, Start, Stop, event_name
from ..protocol.stream import StreamInfo
from .observers import CallObserver
from .settings import Settings
from .twilio import cannot_replace, proves_call

__all__ = ["Connection", "Shared", "Transport"]


class Transport(Sender, Protocol):
    """What a driver provides: ordered text writes, backpressure, and closing."""

    @property
    def closing(self) -> bool:
        """Whether a close has begun (no more messages may be written)."""

    def close(self, code: int, reason: str) -> None:
        """Begin the closing handshake with ``code`` and ``reason``; idempotent."""


@dataclass(frozen=True, slots=True)
class Shared:
    """What the connections of one hub share, given to each explicitly.

    Attributes:
        settings: what to serve and how.
        handlers: the application's handlers (empty: no application runs).
        registry: which connection holds each call.
        observers: told what happens to each call.
        recording: makes a call's recording, given the connection id and the call's logger.
        observe_processing: told how long each message took (seconds), on the hot path.
        debug: whether each message is logged.
    """

    settings: Settings
    handlers: Handlers
    registry: CallRegistry[Connection]
    observers: CallObserver
    recording: Callable[[str, structlog.typing.FilteringBoundLogger], Recording]
    observe_processing: Callable[[float], None] = lambda seconds: None
    debug: bool = False


class Connection:
    """One WebSocket connection and the call it carries.

    Args:
        transport: where its messages go.
        connection_id: unique per connection.
        shared: what it shares with the hub's other connections.
    """

    def __init__(self, transport: Transport, connection_id: str, shared: Shared) -> None:
        self.transport = transport
        self.id = connection_id
        self.shared = shared
        settings = shared.settings
        log = get_logger(connection=connection_id)
        self.session = CallSession(
            connection_id,
            shared.recording(connection_id, log),
            start_ack=settings.start_ack,
            admit=self._admit_start,
            log=log,
        )
        self.call: Call | None = None
        self.outbound: Outbound | None = None
        self.runner: HandlerRunner | None = None
        self.closing = False
        self.proven = False
        """Whether the start carried its call's stream token."""
        self.published: asyncio.Future[dict[str, str]] | None = None
        """Done when the call's recording is on disk: its files, relative to the record dir."""
        self._end_reason: EndReason | None = None
        self._closer: asyncio.Task[None] | None = None
        self._deadline: asyncio.TimerHandle | None = None  # --max-call-seconds
        self._observe = shared.observe_processing

    # What observers read (callsock.server.observers.ObservedCall).

    @property
    def stream(self) -> StreamInfo | None:
        """What ``start`` said, once it arrived."""
        return self.session.stream

    @property
    def counters(self) -> CallCounters:
        """What the call received."""
        return self.session.counters

    @property
    def started(self) -> bool:
        """Whether ``start`` has arrived."""
        return self.session.stream is not None

    def sent(self) -> dict[str, int]:
        """What the call sent, by event, and ``bytes`` of audio."""
        out = self.outbound
        if out is None:
            return {}
        return {
            "media": out.media_sent,
            "mark": out.marks_sent,
            "clear": out.clears_sent,
            "bytes": out.bytes_sent,
        }

    def dropped_frames(self) -> int:
        """Audio frames dropped because the ``on_audio`` handlers fell behind."""
        return self.runner.dropped_frames if self.runner is not None else 0

    # What the driver calls.

    def receive_text(self, data: str | bytes | bytearray) -> None:
        """Handle one text message: validate it and act on it, all before returning."""
        if self.closing:
            return  # the connection is closing: later data is ignored (RFC 6455 5.5.1)
        began = time.perf_counter()
        session = self.session
        try:
            event = session.receive_text(data)
        except StreamError as exc:
            self.reject(exc)
            return
        if self.shared.debug:
            self._log_message(event, len(data))
        if type(event) is Media:
            runner = self.runner
            if runner is not None and runner.wants_audio:
                media = event.media
                runner.audio(AudioFrame(media.track, session.media_timestamp, media.payload))
        else:
            _CONTROL[type(event)](self, event)
        self._observe(time.perf_counter() - began)

    def receive_binary(self, data: bytes | bytearray = b"") -> None:
        """Reject a binary frame (1003)."""
        if self.closing:
            return
        try:
            self.session.receive_binary()
        except StreamError as exc:
            self.reject(exc)

    def receive_oversized(self, limit: int) -> None:
        """Reject a message over the size limit (1009)."""
        self.reject(MessageTooBig("message-too-big", "", f"message over {limit} bytes"))

    def reject(self, error: StreamError) -> None:
        """Log and count a broken rule, finish the call, and close with the rule's code."""
        self.session.fail(error)
        self.session.log.warning(
            "message rejected",
            rule=error.rule,
            field=error.field,
            detail=error.detail,
            closeCode=error.close_code,
        )
        self.shared.observers.call_event(self, "error", {"rule": error.rule})
        self._close(error.close_code, error.close_reason)

    def end(self, reason: EndReason, error: CallsockError) -> None:
        """Close the connection from outside (replacement, shutdown, a failed handler, a timeout)."""
        if self.closing:
            return
        if self._end_reason is None:
            self._end_reason = reason
        if reason == "replaced":
            self.shared.observers.call_event(self, "replaced", {})
        self.session.log.info("closing connection", endReason=reason, closeCode=error.close_code)
        self._close(error.close_code, error.close_reason)

    def timed_out(self, error: IdleTimeout) -> None:
        """Nothing, or no ``start``, arrived in time: end the call (1008)."""
        self.end("idle-timeout", error)

    def peer_closed(self, code: int | None) -> None:
        """The peer sent its close frame: the call is over; the answer waits for the recording."""
        if self._end_reason is None:
            self._end_reason = "closed"
        self._close(code or CloseCode.NORMAL, "")

    def note_shutdown(self) -> None:
        """The framework closed the socket because the server is stopping."""
        if self._end_reason is None:
            self._end_reason = "shutdown"

    async def hangup(self) -> None:
        """The application ends the call: let sent audio play out, then close with 1000."""
        outbound = self.outbound
        if outbound is not None and not outbound.closed:
            await outbound.flush()
            remaining = outbound.playing_until - time.monotonic()
            if remaining > 0:
                try:
                    await asyncio.wait_for(outbound.mark("callsock-hangup"), remaining + 2.0)
                except (TimeoutError, CallsockError):
                    pass
        if self._end_reason is None:
            self._end_reason = "hangup"
        self._close(CloseCode.NORMAL, "hangup")

    def finish(self) -> None:
        """Finish the call once: release it, and publish its recording (logged when published)."""
        session = self.session
        if session.ended_at is not None:
            return
        if self.outbound is not None:
            self.outbound.close()
        if self._deadline is not None:
            self._deadline.cancel()
        summary = session.finish(self._end_reason or "closed")
        stream = session.stream
        if stream is not None:
            self.shared.registry.release(stream.call_key, self)
        if self.runner is not None:
            self.runner.stop()
        if summary is None or stream is None:
            return
        self.shared.observers.call_finished(self, summary)
        if session.publishing is None:
            self._log_end(summary, None)
            return
        self.published = asyncio.wrap_future(session.publishing)
        self.published.add_done_callback(self._recording_done)

    async def wait_handlers(self) -> None:
        """After the connection ends: let the handlers drain (bounded), then run ``on_stop``."""
        if self.runner is not None:
            await self.runner.finish(self.shared.settings.handler_drain_timeout)

    def describe(self) -> dict[str, Any]:
        """Return what ``GET /calls`` shows of this connection."""
        session = self.session
        stream = session.stream
        error = session.last_error
        return {
            "connectionId": self.id,
            "callSid": stream.call_sid if stream else None,
            "streamSid": stream.stream_sid if stream else None,
            "state": session.protocol.state.value,
            "connectedAt": session.connected_at,
            "startedAt": session.started_at,
            "messages": session.counters.total,
            "errors": session.counters.errors,
            "lastError": error.rule if error else None,
        }

    # The control messages (the handler table, _CONTROL, is below the class).

    def _started(self, event: Start) -> None:
        session = self.session
        stream = session.stream
        assert stream is not None
        previous = self.shared.registry.claim(stream.call_key, self)
        if previous is not None:
            previous.end("replaced", Replaced())
        self.shared.observers.call_started(self)
        for text in session.data_to_send():
            try:
                self.transport.write(text)
            except CallEnded:  # the peer broke the framing later in the same read
                break
        session.log.info("stream started", dialect=stream.dialect, tracks=list(stream.tracks))
        limit = self.shared.settings.max_call_seconds
        self._deadline = asyncio.get_running_loop().call_later(
            limit, self.end, "max-duration", CallTooLong(limit)
        )
        if self.shared.handlers:
            self._start_application(self.shared.handlers)

    def _dtmf(self, event: Dtmf) -> None:
        digit = event.dtmf.digit
        if self.runner is not None:
            self.runner.dtmf(digit)
        self.shared.observers.call_event(self, "dtmf", {"digit": digit})

    def _mark(self, event: Mark) -> None:
        name = event.mark.name
        outcome = self.outbound.mark_echoed(name) if self.outbound is not None else "played"
        if self.runner is not None:
            self.runner.mark(MarkEcho(name, outcome))
        self.shared.observers.call_event(self, "mark", {"name": name, "outcome": outcome})

    def _stopped(self, event: Stop) -> None:
        self._end_reason = "stop"
        self._close(CloseCode.NORMAL, "stream stopped")

    def _connected(self, event: Connected) -> None:
        """``connected`` only names the protocol: nothing to do."""

    # Closing.

    def _close(self, code: int, reason: str) -> None:
        # Once closing, nothing more is read, so the call is over: publish it now, and send the
        # close frame once the recording is on disk (a peer that sees the close sees the files).
        if self.closing:
            return
        self.closing = True
        self.finish()
        published = self.published
        if published is None or published.done():
            self.transport.close(code, reason)
        else:
            self._closer = asyncio.ensure_future(self._close_when_published(published, code, reason))

    async def _close_when_published(self, published: asyncio.Future[Any], code: int, reason: str) -> None:
        # shield: a closing connection that is cancelled must not cancel the publishing itself.
        wait = self.shared.settings.close_timeout
        try:
            await asyncio.wait_for(asyncio.shield(published), wait)
        except TimeoutError:
            self.session.mark_late("recording-late")
            self.shared.observers.call_event(self, "error", {"rule": "recording-late"})
            self.session.log.warning("recording still being written; closing anyway", waitSeconds=wait)
        except Exception:  # the writer logged it; the connection still closes
            pass
        self.transport.close(code, reason)

    def _recording_done(self, published: asyncio.Future[dict[str, str]]) -> None:
        """The recording is on disk (or failed): log the call's end, tell the observers."""
        summary = self.session.summary
        assert summary is not None
        files = None if published.cancelled() or published.exception() else published.result()
        self._log_end(summary, files)
        if files is not None:
            self.shared.observers.call_published(self, summary, files)

    def _log_end(self, summary: dict[str, Any], files: dict[str, str] | None) -> None:
        self.session.log.info(
            "call ended",
            endReason=summary["endReason"],
            error=summary["error"],
            durationMs=summary["durationMs"],
            files=files,
        )

    # The application.

    def _admit_start(self, stream: StreamInfo) -> None:
        """Refuse a start that cannot carry this call, before anything of it is recorded.

        Its stream token is wrong, or it would take over a live call without proving that it is
        that call (see :mod:`callsock.protocol.tokens`).

        Raises:
            PolicyViolation: rule ``stream-token``.
        """
        self.proven = proves_call(self.shared.settings, stream)
        holder = self.shared.registry.holder(stream.call_key)
        if not self.proven and holder is not None and holder is not self:
            raise cannot_replace()

    def _start_application(self, handlers: Handlers) -> None:
        session = self.session
        stream = session.stream
        assert stream is not None
        settings = self.shared.settings
        self.outbound = Outbound(
            session.protocol,
            self.transport,
            session.record_outbound,
            lead=settings.send_lead_ms / 1000,
        )
        bidirectional = settings.stream_mode == "connect" and "outbound" not in stream.tracks
        self.call = Call(
            session,
            self.outbound,
            bidirectional=bidirectional,
            hangup=self.hangup,
            dropped_frames=self.dropped_frames,
        )
        self.runner = HandlerRunner(
            handlers,
            self.call,
            max_audio_ms=settings.handler_queue_ms,
            on_failure=self._handler_failed,
            on_backlog=self._backlogged,
            log=session.log,
        )
        self.runner.start()

    def _backlogged(self) -> None:
        detail = f"over {MAX_QUEUED_EVENTS} events wait for the handlers"
        self.reject(PolicyViolation("event-backlog", "", detail))

    def _handler_failed(self, error: HandlerFailed) -> None:
        self.session.fail(error)
        self.shared.observers.call_event(self, "error", {"rule": error.rule})
        self.end("error", error)

    def _log_message(self, event: InboundMessage, size: int) -> None:
        self.session.log.debug(
            "message",
            kind=event_name(event),
            streamSid=getattr(event, "stream_sid", None),
            size=size,
        )


_CONTROL: dict[type[Any], Callable[[Connection, Any], None]] = {
    Start: Connection._started,
    Dtmf: Connection._dtmf,
    Mark: Connection._mark,
    Stop: Connection._stopped,
    Connected: Connection._connected,
}
"""What each message other than media does: adding an event adds a row here (and to the schema
and the stream rules), nothing more."""
