"""Prometheus metrics, gathered at scrape time so the per-message path only adds integers.

Each call counts its own messages and bytes in plain integers (it needs them for its summary
anyway). A scrape adds up the live calls' counters and the totals of calls that have ended,
so no lock or label lookup runs per message. The one per-message cost is the processing-time
histogram, kept as a list of bucket counts.

Every server has its own :class:`ServerMetrics` and registry; nothing is module-global, so
several servers can run in one process (tests do).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from ..call.session import CallCounters
from ..protocol.stream import StreamInfo

__all__ = ["CONTENT_TYPE", "LABEL_VALUES", "OTHER", "PROCESSING_BUCKETS", "ServerMetrics"]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

OTHER: Final = "other"
"""The label value that stands for anything outside a label's closed set."""

LABEL_VALUES: Final[dict[str, frozenset[str]]] = {
    # Twilio's StreamEvent values (Media Streams docs, "Stream status callback"); a client may
    # post anything, and each new label value would be a new time series kept for ever.
    "stream_status": frozenset({"stream-started", "stream-stopped", "stream-error"}),
    "signature_rejections": frozenset({"webhook", "websocket", "status-callback"}),
    "http_rejections": frozenset(
        {
            "request-timeout",
            "connection-budget",
            "body-too-large",
            "bad-body",
            "bad-form",
            "bad-host",
            "head-too-large",
            "unauthorized",
        }
    ),
}
"""The values each labelled counter of :meth:`ServerMetrics.count` may take; others count as ``other``."""

PROCESSING_BUCKETS: Final = (
    5e-6,
    10e-6,
    25e-6,
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    100e-3,
)
"""Upper bounds, in seconds, of the per-message processing-time histogram."""


class Figures(Protocol):
    """What the metrics read of a connection (a ``Connection`` is one)."""

    @property
    def stream(self) -> StreamInfo | None:
        """What ``start`` said, once it arrived."""

    @property
    def counters(self) -> CallCounters:
        """What the call received."""

    def sent(self) -> dict[str, int]:
        """What the call sent, by event, and ``bytes`` of audio."""

    def dropped_frames(self) -> int:
        """Audio frames dropped because the handlers fell behind."""


class ClusterFigures(Protocol):
    """What the metrics read of a cluster link (a ``Cluster`` is one)."""

    connected: bool
    events_dropped: dict[str, int]
    redis_events: dict[str, int]

    def state(self) -> dict[str, Any]:
        """The cluster's state as ``/health`` shows it."""


class ServerMetrics:
    """The counters of one server, exposed in the Prometheus text format.

    It follows calls as an observer of the hub (:mod:`callsock.server.observers`): a call's own
    counters are summed with the live ones at scrape time, and folded into the totals when its
    connection is forgotten.

    Args:
        active: returns the connections open now.
        cluster: returns the cluster link, if the server has one.
    """

    def __init__(
        self,
        active: Callable[[], Iterable[Figures]],
        cluster: Callable[[], ClusterFigures | None] = lambda: None,
    ) -> None:
        self.connections_opened = 0
        self.connections_replaced = 0
        self.connections_refused = 0
        self.errors: dict[str, int] = {}
        self.finished_messages: dict[str, int] = {}
        self.finished_received_bytes = 0
        self.finished_media_bytes = 0
        self.calls_finished: dict[str, int] = {}
        self.finished_outbound: dict[str, int] = {}
        self.finished_outbound_bytes = 0
        self.finished_dropped_frames = 0
        self.labelled: dict[str, dict[str, int]] = {name: {} for name in LABEL_VALUES}
        self.http_connections: Callable[[], int] | None = None
        """Returns the plain HTTP connections open now (set by a server that counts them)."""
        self.bucket_counts = [0] * (len(PROCESSING_BUCKETS) + 1)
        self.processing_sum = 0.0
        self._active = active
        self._cluster = cluster
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)

    def observe_processing(self, seconds: float) -> None:
        """Record how long one message took to process."""
        self.bucket_counts[bisect_left(PROCESSING_BUCKETS, seconds)] += 1
        self.processing_sum += seconds

    def count(self, name: str, label: str) -> None:
        """Count one event of a labelled counter (``stream_status`` by event, ...).

        A label value outside the counter's closed set (:data:`LABEL_VALUES`) counts as
        :data:`OTHER`, so a client cannot make the server keep a time series per string it sends.
        """
        if label not in LABEL_VALUES[name]:
            label = OTHER
        family = self.labelled[name]
        family[label] = family.get(label, 0) + 1

    def count_error(self, rule: str) -> None:
        """Count one rejected message or connection, by the rule it broke (rules are callsock's own)."""
        self.errors[rule] = self.errors.get(rule, 0) + 1

    # The hub's observer.

    def call_started(self, call: Figures) -> None:
        """Nothing to count: live calls are read at scrape time."""

    def call_event(self, call: Figures, kind: str, data: dict[str, Any]) -> None:
        """Count errors by rule, and replacements."""
        if kind == "error":
            self.count_error(data["rule"])
        elif kind == "replaced":
            self.connections_replaced += 1

    def call_finished(self, call: Figures, summary: dict[str, Any]) -> None:
        """Count a call that ended, by its end reason."""
        reason = summary["endReason"]
        self.calls_finished[reason] = self.calls_finished.get(reason, 0) + 1

    def call_published(self, call: Figures, summary: dict[str, Any], files: dict[str, str]) -> None:
        """Nothing to count."""

    def connection_forgotten(self, call: Figures) -> None:
        """Fold a connection's counters into the totals as it leaves the active set.

        The hub calls it in the same step that removes the connection from what ``active``
        returns: counted twice or not at all for a moment, a counter would go backwards.
        """
        sent = call.sent()
        _add(self.finished_outbound, _messages(sent))
        self.finished_outbound_bytes += sent.get("bytes", 0)
        self.finished_dropped_frames += call.dropped_frames()
        counters = call.counters
        _add(self.finished_messages, counters.messages)
        self.finished_received_bytes += counters.received_bytes
        self.finished_media_bytes += counters.media_bytes

    def render(self) -> bytes:
        """Return the metrics in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    def active(self) -> list[Figures]:
        """Return the connections open now."""
        return list(self._active())


class _Collector:
    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        active = m.active()
        messages = dict(m.finished_messages)
        received = m.finished_received_bytes
        media = m.finished_media_bytes
        outbound = dict(m.finished_outbound)
        outbound_bytes = m.finished_outbound_bytes
        dropped = m.finished_dropped_frames
        for call in active:
            counters = call.counters
            _add(messages, counters.messages)
            received += counters.received_bytes
            media += counters.media_bytes
            sent = call.sent()
            _add(outbound, _messages(sent))
            outbound_bytes += sent.get("bytes", 0)
            dropped += call.dropped_frames()

        yield _counter("messages", "Messages processed, by event.", "event", messages)
        yield _counter("received_bytes", "Bytes of WebSocket text received.", value=received)
        yield _counter("media_bytes", "Bytes of mu-law audio received.", value=media)
        yield _counter("errors", "Messages or connections rejected, by rule.", "rule", m.errors)
        yield _counter("connections_opened", "WebSocket connections accepted.", value=m.connections_opened)
        yield _counter(
            "connections_replaced",
            "Connections closed because a newer one took over their call.",
            value=m.connections_replaced,
        )
        yield _counter(
            "connections_refused",
            "Connections refused because the server was at --max-calls.",
            value=m.connections_refused,
        )
        yield _counter("calls_ended", "Calls ended, by end reason.", "reason", m.calls_finished)
        yield _counter("sent_messages", "Messages sent to the peer, by event.", "event", outbound)
        yield _counter("sent_media_bytes", "Bytes of mu-law audio sent to the peer.", value=outbound_bytes)
        yield _counter(
            "audio_frames_dropped",
            "Audio frames dropped because on_audio handlers fell behind.",
            value=dropped,
        )
        yield _counter(
            "stream_status", "Twilio stream status callbacks, by event.", "event", m.labelled["stream_status"]
        )
        yield _counter(
            "signature_rejections",
            "Requests refused for a missing or invalid Twilio signature, by route.",
            "route",
            m.labelled["signature_rejections"],
        )
        yield _counter(
            "http_rejections",
            "HTTP requests or connections refused or dropped, by reason.",
            "reason",
            m.labelled["http_rejections"],
        )
        if m.http_connections is not None:
            http = GaugeMetricFamily("callsock_http_connections", "Plain HTTP connections open now.")
            http.add_metric([], m.http_connections())
            yield http
        yield from _cluster_metrics(m)
        gauge = GaugeMetricFamily("callsock_connections_active", "WebSocket connections open now.")
        gauge.add_metric([], len(active))
        yield gauge
        calls = GaugeMetricFamily("callsock_calls_active", "Open connections that have started a stream.")
        calls.add_metric([], sum(1 for call in active if call.stream is not None))
        yield calls
        yield _histogram(m)


def _cluster_metrics(m: ServerMetrics) -> Iterator[Metric]:
    cluster = m._cluster()
    if cluster is None:
        return
    yield _counter("redis_events", "Redis outages (errors) and recoveries.", "event", cluster.redis_events)
    state = cluster.state()
    for name, documentation, value in (
        ("redis_connected", "1 while Redis answers, 0 during an outage.", int(cluster.connected)),
        ("cluster_calls_registered", "This server's calls registered in Redis.", state["callsRegistered"]),
        ("cluster_servers", "Live servers in the cluster (last heartbeat).", state["servers"]),
        (
            "cluster_connections",
            "Connections across the live servers (last heartbeat).",
            state["clusterConnections"],
        ),
    ):
        gauge = GaugeMetricFamily(f"callsock_{name}", documentation)
        gauge.add_metric([], value)
        yield gauge
    yield _counter(
        "cluster_events_dropped",
        "Call events not sent: buffered past 10,000 during an outage, or past a call's budget.",
        "reason",
        cluster.events_dropped,
    )


def _messages(sent: dict[str, int]) -> dict[str, int]:
    """The message counts of what a call sent (its ``bytes`` aside)."""
    return {event: count for event, count in sent.items() if event != "bytes"}


def _add(totals: dict[str, int], counts: dict[str, int]) -> None:
    for key, count in counts.items():
        totals[key] = totals.get(key, 0) + count


def _counter(
    name: str, doc: str, label: str = "", by: dict[str, int] | None = None, value: int = 0
) -> CounterMetricFamily:
    if not label:
        return CounterMetricFamily(f"callsock_{name}", doc, value=value)
    family = CounterMetricFamily(f"callsock_{name}", doc, labels=[label])
    for key, count in sorted((by or {}).items()):
        family.add_metric([key], count)
    return family


def _histogram(m: ServerMetrics) -> HistogramMetricFamily:
    buckets: list[tuple[str, float]] = []
    cumulative = 0
    for bound, count in zip((*PROCESSING_BUCKETS, float("inf")), m.bucket_counts, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    return HistogramMetricFamily(
        "callsock_message_processing_seconds",
        "Time to validate and handle one inbound message.",
        buckets=buckets,
        sum_value=m.processing_sum,
    )
