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

from .call import AudioFrame, Call, MarkEcho
from .errors import (
    CLOSE_NORMAL,
    CallsockError,
    HandlerFailed,
    MessageTooBig,
    Replaced,
    StreamError,
)
from .logs import get_logger
from .outbound import Outbound
from .protocol import StreamInfo
from .recording import WavRecorder
from .runner import HandlerRunner, Handlers
from .schema import Dtmf, InboundMessage, Mark, Media, Start, Stop
from .session import CallSession, EndReason, Sink

if TYPE_CHECKING:
    from .service import CallService

__all__ = ["Connection", "Transport"]

PUBLISH_WAIT: Final = 10.0
"""The longest a closing connection waits for its recording to reach the disk."""


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
            log=get_logger(connection=connection_id),
        )
        self.call: Call | None = None
        self.outbound: Outbound | None = None
        self.runner: HandlerRunner | None = None
        self._end_reason: EndReason | None = None
        self.closing = False
        self._closer: asyncio.Task[None] | None = None
        self._observe = service.metrics.observe_processing
        self._debug = service.debug

    def receive_text(self, data: str | bytes | bytearray) -> None:
        """Handle one text message: validate it and act on it, all before returning."""
        if self.closing or self.transport.closing:
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

    def receive_binary(self) -> None:
        """Reject a binary frame (1003)."""
        if self.closing or self.transport.closing:
            return
        try:
            self.session.receive_binary()
        except StreamError as exc:
            self.reject(exc)

    def receive_oversized(self, limit: int) -> None:
        """Reject a message over the size limit (1009)."""
        error = MessageTooBig("message-too-big", "", f"message over {limit} bytes")
        self.session.fail(error)
        self.reject(error)

    def reject(self, error: StreamError) -> None:
        """Log and count a broken rule, finish the call, and close with the rule's code."""
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
        if self.closing or self.transport.closing:
            return
        if self._end_reason is None:
            self._end_reason = reason
        self.session.log.info("closing connection", endReason=reason, closeCode=error.close_code)
        self._close(error.close_code, error.close_reason)

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

    def finish(self) -> None:
        """Finish the call once: publish the recording, release the call, fold in the counters."""
        session = self.session
        if session.ended_at is not None:
            return
        if self.outbound is not None:
            self.outbound.close()
        summary = session.finish(self._end_reason or "closed")
        stream = session.stream
        service = self.service
        if stream is not None:
            service.registry.release(stream.call_key, self)
            if service.cluster is not None and summary is not None:
                self._tell_cluster(stream, summary)
        service.metrics.connection_finished(self)
        if self.runner is not None:
            self.runner.stop()
        if summary is not None:
            session.log.info(
                "call ended",
                endReason=summary["endReason"],
                error=summary["error"],
                durationMs=summary["durationMs"],
                files=summary.get("files"),
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

    def _tell_cluster(self, stream: StreamInfo, summary: dict[str, Any]) -> None:
        cluster = self.service.cluster
        assert cluster is not None
        cluster.released(stream.call_key, self)
        outcome = {
            "endReason": summary["endReason"],
            "error": summary["error"],
            "durationMs": summary["durationMs"],
        }
        cluster.event("stopped", stream.call_sid, stream.stream_sid, **outcome)
        loop = asyncio.get_running_loop()

        def ready(future: Future[dict[str, str]]) -> None:  # on the writer thread
            if not future.cancelled() and future.exception() is None:
                files = future.result()
                loop.call_soon_threadsafe(
                    lambda: cluster.event(
                        "recording-ready", stream.call_sid, stream.stream_sid, files=files, **outcome
                    )
                )

        for publishing in self.session.publishing:
            publishing.add_done_callback(ready)

    def _close(self, code: int, reason: str) -> None:
        # Once closing, nothing more is read, so the call is over: publish it now, and send the
        # close frame once the recording is on disk (a peer that sees the close sees the files).
        if self.closing:
            return
        self.closing = True
        self.finish()
        pending = [f for f in self.session.publishing if not f.done()]
        if pending:
            self._closer = asyncio.ensure_future(self._close_when_published(pending, code, reason))
        else:
            self.transport.close(code, reason)

    async def _close_when_published(
        self, pending: list[Future[dict[str, str]]], code: int, reason: str
    ) -> None:
        # shield: a closing connection that is cancelled must not cancel the publishing itself.
        waiting = asyncio.gather(
            *(asyncio.shield(asyncio.wrap_future(f)) for f in pending), return_exceptions=True
        )
        try:
            await asyncio.wait_for(waiting, PUBLISH_WAIT)
        except TimeoutError:
            self.session.log.warning(
                "recording still being written; closing anyway", waitSeconds=PUBLISH_WAIT
            )
        except Exception:  # the writer logged it; the connection still closes
            pass
        self.transport.close(code, reason)

    def _started(self) -> None:
        session = self.session
        stream = session.stream
        assert stream is not None
        previous = self.service.registry.claim(stream.call_key, self)
        if previous is not None:
            self.service.metrics.connections_replaced += 1
            previous.end("replaced", Replaced())
        if self.service.cluster is not None:
            self.service.cluster.claimed(stream.call_key, self)
            self._event("started", dialect=stream.dialect, tracks=list(stream.tracks),
                        customParameters=stream.custom_parameters)  # fmt: skip
        for text in session.data_to_send():
            self.transport.write(text)
        session.log.info("stream started", dialect=stream.dialect, tracks=list(stream.tracks))
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
            log=session.log,
        )
        self.runner.start()

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
        cluster, stream = self.service.cluster, self.session.stream
        if cluster is not None and stream is not None:
            cluster.event(kind, stream.call_sid, stream.stream_sid, **data)

    def _log_message(self, event: InboundMessage, size: int) -> None:
        self.session.log.debug(
            "message",
            kind=type(event).__name__.lower(),
            streamSid=getattr(event, "stream_sid", None),
            size=size,
        )
