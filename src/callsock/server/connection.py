"""One WebSocket connection, independent of the web framework that carries it.

A driver (the aiohttp server, the ASGI adapter) parses frames and calls
:meth:`Connection.receive_text` for each text message. Everything here is synchronous: writes
go to the :class:`Transport`, which queues them in order, so the per-message path awaits
nothing and a ``start`` is fully acted on (call claimed, acknowledgement written, application
started) before the next message is read. Only the application's handlers and outbound pacing
run in tasks.

Everything about a call that is not moving bytes lives here: claiming the call in the
registry, the start acknowledgement, the application's handlers and outbound audio, closing
with the right code, and finishing the call exactly once, whatever ends it.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Final, Protocol

from ..call.call import AudioFrame, Call, MarkEcho
from ..call.handlers import MAX_QUEUED_EVENTS, HandlerRunner, Handlers
from ..call.outbound import Outbound
from ..call.session import CallSession, EndReason, Sink
from ..observability.logs import get_logger
from ..protocol.errors import (
    CLOSE_NORMAL,
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
from ..protocol.messages import Dtmf, InboundMessage, Mark, Media, Start, Stop
from ..protocol.stream import StreamInfo
from ..protocol.tokens import cannot_replace, proves_call
from ..recording.sinks import WavRecorder

if TYPE_CHECKING:
    from .hub import CallService

__all__ = ["MAX_ACTIVITY_EVENTS", "Connection", "Transport"]

MAX_ACTIVITY_EVENTS: Final = 1000
"""The most dtmf and mark events one call puts on the cluster's activity stream; more are counted."""


class Transport(Protocol):
    """What a driver provides: ordered text writes, backpressure, and closing."""

    @property
    def closing(self) -> bool:
        """Whether a close has begun (no more messages may be written)."""

    def write(self, data: bytes) -> bool:
        """Queue one text message (``data`` is UTF-8), in order.

        Returns:
            True when the peer is not keeping up: the writer should await :meth:`drain`.

        Raises:
            CallEnded: the connection is closing or closed.
        """

    async def drain(self) -> None:
        """Wait until the peer has read enough of what was written."""

    def close(self, code: int, reason: str) -> None:
        """Begin the closing handshake with ``code`` and ``reason``; idempotent."""


class Connection:
    """One WebSocket connection and the call it carries."""

    def __init__(self, service: CallService, transport: Transport, connection_id: str) -> None:
        self.service = service
        self.transport = transport
        self.id = connection_id
        settings = service.settings
        sinks: list[Sink] = []
        if settings.record:
            sinks.append(WavRecorder(settings.record_dir, connection_id, service.writer))
        self.session = CallSession(
            connection_id,
            sinks=sinks,
            buffer_bytes=settings.buffer_bytes,
            flush_seconds=settings.flush_seconds,
            start_ack=settings.start_ack,
            admit=self._admit_start,
            log=get_logger(connection=connection_id),
        )
        self.call: Call | None = None
        self.outbound: Outbound | None = None
        self.runner: HandlerRunner | None = None
        self._end_reason: EndReason | None = None
        self.closing = False
        self._closer: asyncio.Task[None] | None = None
        self._deadline: asyncio.TimerHandle | None = None  # --max-call-seconds
        self._proven = False  # whether the start carried its call's stream token
        self.activity_events = 0  # dtmf and mark events sent to the cluster's stream
        self.activity_dropped = 0
        self.published: asyncio.Future[dict[str, str]] | None = None
        """Done when the call's recording is on disk: its files, relative to the record dir."""
        self._observe = service.metrics.observe_processing
        self._debug = service.debug

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
        if self._debug:
            self._log_message(event, len(data))
        if type(event) is Media:
            runner = self.runner
            if runner is not None and runner.wants_audio:
                media = event.media
                runner.audio(AudioFrame(media.track, session.media_timestamp, media.payload))
        else:
            self._control(event)
        self._observe(time.perf_counter() - began)

    @property
    def started(self) -> bool:
        """Whether ``start`` has arrived."""
        return self.session.stream is not None

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
        error = MessageTooBig("message-too-big", "", f"message over {limit} bytes")
        self.reject(error)

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
        self.service.metrics.count_error(error.rule)
        self._close(error.close_code, error.close_reason)

    def end(self, reason: EndReason, error: CallsockError) -> None:
        """Close the connection from outside (replacement, shutdown, a failed handler)."""
        if self.closing:
            return
        if self._end_reason is None:
            self._end_reason = reason
        self.session.log.info("closing connection", endReason=reason, closeCode=error.close_code)
        self._close(error.close_code, error.close_reason)

    def timed_out(self, error: IdleTimeout) -> None:
        """Nothing, or no ``start``, arrived in time: end the call (1008)."""
        self.end("idle-timeout", error)

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
        self._close(CLOSE_NORMAL, "hangup")

    def peer_closed(self, code: int | None) -> None:
        """The peer sent its close frame: the call is over; the answer waits for the recording."""
        if self._end_reason is None:
            self._end_reason = "closed"
        self._close(code or CLOSE_NORMAL, "")

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
        service = self.service
        if stream is not None:
            service.registry.release(stream.call_key, self)
            if service.cluster is not None:
                service.cluster.released(stream.call_key, self)
        if self.runner is not None:
            self.runner.stop()
        if summary is None or stream is None:
            return
        service.metrics.call_ended(summary["endReason"])
        if service.cluster is not None:
            service.cluster.event(
                "stopped",
                stream.call_sid,
                stream.stream_sid,
                activityDropped=self.activity_dropped,
                **_outcome(summary),
            )
        if session.publishing:
            self.published = asyncio.ensure_future(_files_published(session.publishing))
            self.published.add_done_callback(self._recording_done)
        else:
            self._log_end(summary, None)

    def _recording_done(self, published: asyncio.Future[dict[str, str]]) -> None:
        """The recording is on disk (or failed): log the call's end, tell the cluster."""
        session = self.session
        summary, stream = session.summary, session.stream
        assert summary is not None and stream is not None
        files = None if published.cancelled() or published.exception() else published.result()
        self._log_end(summary, files)
        cluster = self.service.cluster
        if cluster is not None and files is not None:
            outcome = _outcome(summary)
            cluster.event("recording-ready", stream.call_sid, stream.stream_sid, files=files, **outcome)

    def _log_end(self, summary: dict[str, Any], files: dict[str, str] | None) -> None:
        self.session.log.info(
            "call ended",
            endReason=summary["endReason"],
            error=summary["error"],
            durationMs=summary["durationMs"],
            files=files,
        )

    async def wait_handlers(self) -> None:
        """After the connection ends: let the handlers drain (bounded), then run ``on_stop``."""
        if self.runner is not None:
            await self.runner.finish(self.service.settings.handler_drain_timeout)

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

    def _control(self, event: InboundMessage) -> None:
        if isinstance(event, Start):
            self._started()
        elif isinstance(event, Dtmf):
            if self.runner is not None:
                self.runner.dtmf(event.dtmf.digit)
            self._event("dtmf", digit=event.dtmf.digit)
        elif isinstance(event, Mark):
            self._mark_echoed(event.mark.name)
        elif isinstance(event, Stop):
            self._end_reason = "stop"
            self._close(CLOSE_NORMAL, "stream stopped")

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
        wait = self.service.settings.close_timeout
        try:
            await asyncio.wait_for(asyncio.shield(published), wait)
        except TimeoutError:
            self.session.mark_late("recording-late")
            self.service.metrics.count_error("recording-late")
            self.session.log.warning("recording still being written; closing anyway", waitSeconds=wait)
        except Exception:  # the writer logged it; the connection still closes
            pass
        self.transport.close(code, reason)

    def _admit_start(self, stream: StreamInfo) -> None:
        """Refuse a start that cannot carry this call, before anything of it is recorded.

        Its stream token is wrong, or it would take over a live call without proving that it is
        that call (see :mod:`callsock.tokens`).

        Raises:
            PolicyViolation: rule ``stream-token``.
        """
        self._proven = proves_call(self.service.settings, stream)
        holder = self.service.registry.holder(stream.call_key)
        if not self._proven and holder is not None and holder is not self:
            raise cannot_replace()

    def _started(self) -> None:
        session = self.session
        stream = session.stream
        assert stream is not None
        proven = self._proven
        previous = self.service.registry.claim(stream.call_key, self)
        if previous is not None:
            self.service.metrics.connections_replaced += 1
            previous.end("replaced", Replaced())
        if self.service.cluster is not None:
            if proven:  # claiming in the cluster replaces the call's connection on another server
                self.service.cluster.claimed(stream.call_key, self)
            self.service.cluster.event(
                "started",
                stream.call_sid,
                stream.stream_sid,
                dialect=stream.dialect,
                tracks=list(stream.tracks),
                customParameters=stream.custom_parameters,
            )
        for text in session.data_to_send():
            try:
                self.transport.write(text)
            except CallEnded:  # the peer broke the framing later in the same read
                break
        session.log.info("stream started", dialect=stream.dialect, tracks=list(stream.tracks))
        limit = self.service.settings.max_call_seconds
        self._deadline = asyncio.get_running_loop().call_later(
            limit, self.end, "max-duration", CallTooLong(limit)
        )
        if self.service.handlers:
            self._start_application(self.service.handlers)

    def _start_application(self, handlers: Handlers) -> None:
        session = self.session
        stream = session.stream
        assert stream is not None
        settings = self.service.settings
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
            dropped_frames=lambda: self.runner.dropped_frames if self.runner else 0,
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
        self.service.metrics.count_error(error.rule)
        self.end("error", error)

    def _mark_echoed(self, name: str) -> None:
        outcome = self.outbound.mark_echoed(name) if self.outbound is not None else "played"
        if self.runner is not None:
            self.runner.mark(MarkEcho(name, outcome))
        self._event("mark", name=name, outcome=outcome)

    def _event(self, kind: str, **data: Any) -> None:
        """An activity event (dtmf, mark) for the cluster's stream, within the call's budget."""
        cluster, stream = self.service.cluster, self.session.stream
        if cluster is None or stream is None:
            return
        if self.activity_events == MAX_ACTIVITY_EVENTS:
            cluster.events_dropped["budget"] += 1
            self.activity_dropped += 1
            return
        self.activity_events += 1
        cluster.event(kind, stream.call_sid, stream.stream_sid, **data)

    def _log_message(self, event: InboundMessage, size: int) -> None:
        self.session.log.debug(
            "message",
            kind=type(event).__name__.lower(),
            streamSid=getattr(event, "stream_sid", None),
            size=size,
        )


def _outcome(summary: dict[str, Any]) -> dict[str, Any]:
    return {key: summary[key] for key in ("endReason", "error", "durationMs")}


async def _files_published(publishing: list[Future[dict[str, str]]]) -> dict[str, str]:
    """Wait for every sink to publish; return their files, merged."""
    files: dict[str, str] = {}
    for done in await asyncio.gather(*(asyncio.wrap_future(f) for f in publishing)):
        files.update(done)
    return files
