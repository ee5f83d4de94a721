"""The server's settings, with the seed guide's defaults; built by the CLI or by hand."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from .logs import LogFormat
from .protocol import StartAck

StreamMode = Literal["connect", "start"]
ForkTrack = Literal["inbound_track", "outbound_track", "both_tracks"]

__all__ = ["Settings"]


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything ``callsock serve`` can be told; each field is a command-line option.

    Attributes:
        host: the address to listen on.
        port: the TCP port (0 picks a free one, which tests use).
        path: the WebSocket path; must match the ``<Stream url>`` in the TwiML.
        record_dir: where recordings go.
        record: whether to record calls at all.
        start_ack: when to answer ``start`` with the seed guide's acknowledgement.
        max_calls: the most connections served at once; more are closed with 1013.
        buffer_bytes: each call's audio buffer capacity; it flushes to the sinks when full.
        log_format: ``json``, ``console`` or ``auto`` (console on a terminal).
        log_level: the lowest level logged.
        close_timeout: seconds to wait for the peer's close frame after sending ours.
        stream_mode: ``connect`` (bidirectional ``<Connect><Stream>``) or ``start`` (a one-way
            ``<Start><Stream>`` fork, on which the application may not send).
        handler_queue_ms: the most audio that may wait for slow ``on_audio`` handlers.
        send_lead_ms: how far outbound audio may run ahead of what the caller hears.
        handler_drain_timeout: seconds the handlers may keep working after a call ends.
        echo: serve the built-in echo (each inbound frame is sent back).
        greeting: a WAV file played when a call starts.
        public_url: the server's public base URL (``https://example.ngrok.app``); the TwiML's
            ``wss://`` stream URL and signature checks use it. Without it they use the request's
            ``X-Forwarded-Host`` (else ``Host``).
        parameters: ``<Parameter>`` name/value pairs the TwiML gives the stream.
        track: with ``stream_mode`` ``start``, the tracks the fork carries.
        pause_seconds: with ``stream_mode`` ``start``, how long the ``<Pause>`` after
            ``<Start>`` keeps the call up.
        status_callback: a URL Twilio posts stream status events to (``statusCallback``).
        auth_token: the Twilio Auth Token; with it every webhook and upgrade must be signed.
        require_signature: refuse to start without an auth token.
        max_message_bytes: the largest WebSocket message accepted; larger closes with 1009.
        idle_timeout: seconds without any message before a connection is closed.
        handshake_timeout: seconds a connection has to send its request, and then ``start``.
        ssl_certfile: a PEM certificate: serve ``wss://`` and ``https://`` directly.
        ssl_keyfile: the certificate's private key.
        flush_seconds: the longest audio waits in a call's buffer before it goes to disk (what
            a crash can lose).
        drain_timeout: on SIGTERM, how long active calls may go on before they are closed.
        redis_url: join a cluster of servers through this Redis (``redis://host:6379/0``).
        cluster_max_calls: with ``redis_url``, the most connections across the whole cluster.
        events_maxlen: with ``redis_url``, the length the ``callsock:events`` stream is capped at.
        registry_ttl: with ``redis_url``, seconds a call's registration lasts unless refreshed
            (how long a dead server can keep holding its calls).
    """

    host: str = "0.0.0.0"
    port: int = 8081
    path: str = "/call"
    record_dir: Path = Path("recordings")
    record: bool = True
    start_ack: StartAck = "auto"
    max_calls: int = 1000
    buffer_bytes: int = 1 << 20
    log_format: LogFormat = "auto"
    log_level: str = "info"
    close_timeout: float = 5.0
    stream_mode: StreamMode = "connect"
    handler_queue_ms: int = 10_000
    send_lead_ms: int = 100
    handler_drain_timeout: float = 10.0
    echo: bool = False
    greeting: Path | None = None
    public_url: str | None = None
    parameters: tuple[tuple[str, str], ...] = ()
    track: ForkTrack = "inbound_track"
    pause_seconds: int = 3600
    status_callback: str | None = None
    auth_token: str | None = field(default=None, repr=False)
    require_signature: bool = False
    max_message_bytes: int = 65_536
    idle_timeout: float = 30.0
    handshake_timeout: float = 10.0
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    flush_seconds: float = 5.0
    drain_timeout: float = 30.0
    redis_url: str | None = field(default=None, repr=False)
    cluster_max_calls: int | None = None
    events_maxlen: int = 10_000
    registry_ttl: float = 30.0

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise ValueError(f"path must start with '/': {self.path!r}")
        if "?" in self.path:
            raise ValueError("path must not have a query string (Twilio drops it)")
        if self.max_calls < 1:
            raise ValueError("max_calls must be at least 1")
        if self.buffer_bytes < 160:
            raise ValueError("buffer_bytes must be at least 160 (one 20 ms frame)")
        if self.handler_queue_ms < 20:
            raise ValueError("handler_queue_ms must be at least 20 (one frame)")
        if self.send_lead_ms < 20:
            raise ValueError("send_lead_ms must be at least 20 (one frame)")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        if self.public_url is not None:
            parts = urlsplit(self.public_url)
            if parts.scheme not in ("http", "https", "ws", "wss") or not parts.netloc:
                raise ValueError(f"public_url must look like https://host, got {self.public_url!r}")
            if parts.query or parts.fragment:
                raise ValueError("public_url must not have a query string: Twilio drops it; use parameters")
        if self.require_signature and not self.auth_token:
            raise ValueError("require_signature needs an auth token (--auth-token or TWILIO_AUTH_TOKEN)")
        if self.max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be at least 1024")
        if self.idle_timeout <= 0 or self.handshake_timeout <= 0:
            raise ValueError("idle_timeout and handshake_timeout must be positive")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together")
        if self.flush_seconds <= 0 or self.drain_timeout < 0:
            raise ValueError("flush_seconds must be positive and drain_timeout not negative")
        if self.cluster_max_calls is not None and (self.redis_url is None or self.cluster_max_calls < 1):
            raise ValueError("cluster_max_calls needs redis_url and must be at least 1")
        if self.events_maxlen < 1 or self.registry_ttl < 3:
            raise ValueError("events_maxlen must be at least 1 and registry_ttl at least 3 seconds")
        if self.pause_seconds < 1:
            raise ValueError("pause_seconds must be at least 1")
