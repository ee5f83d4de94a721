"""The server's settings, with the seed guide's defaults; built by the CLI or by hand.

A value a setting cannot have raises :class:`SettingError`, which names the setting's field; the
command line translates the field into its flag (and its environment variable). Checks that
touch the file system (the greeting, the TLS files, the record directory) are separate
(:func:`check_files`, :func:`check_record_dir`) so building settings stays free of I/O.
"""

from __future__ import annotations

import ipaddress
import math
import os
import shlex
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlsplit

from ..observability.logs import LogFormat
from ..protocol.stream import StartAck
from ..protocol.tokens import STREAM_TOKEN_PARAMETER
from ..recording.layout import PARTIAL_DIR

StreamMode = Literal["connect", "start"]
ForkTrack = Literal["inbound_track", "outbound_track", "both_tracks"]

MAX_CALL_SECONDS: Final = 268_000
"""The longest call a WAV can hold: 4 GiB of 16-bit PCM at 8 kHz is 268,435 s."""

__all__ = [
    "MIN_ADMIN_TOKEN_CHARS",
    "SettingError",
    "Settings",
    "check_files",
    "check_record_dir",
    "check_wav",
    "load_secrets",
    "proxy_networks",
    "redis_url_problem",
]

MIN_ADMIN_TOKEN_CHARS: Final = 16
"""The shortest admin token accepted: it guards ``/calls`` over the network, so not a password."""

ProxyNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NO_VALUE: Final = object()
_REDIS_SCHEMES: Final = ("redis", "rediss", "unix")


class SettingError(ValueError):
    """A setting with a value it cannot have; the message blames that one setting.

    ``str()`` names settings by their field names (``max_calls must be at least 1 (got 0)``);
    :meth:`describe` names them any other way, as the command line does with its flags.

    Attributes:
        field: the setting that is wrong.
        problem: what is wrong with it; ``{0}``, ``{1}``... stand for the ``related`` settings.
        related: other settings the problem mentions (``needs {0}``).
        value: the offending value, shown after the problem; absent for secrets and for
            problems that are not about the value.
    """

    def __init__(self, field: str, problem: str, *related: str, value: object = _NO_VALUE) -> None:
        self.field = field
        self.problem = problem
        self.related = related
        self.value = value
        super().__init__(self.describe(str))

    @property
    def has_value(self) -> bool:
        """Whether the message shows the offending value."""
        return self.value is not _NO_VALUE

    def describe(self, name: Callable[[str], str], *, show_value: bool = True) -> str:
        """The message, with each setting called ``name(field)``.

        Args:
            name: how to call a setting, given its field name.
            show_value: append ``(got VALUE)`` when the error carries the value.
        """
        problem = self.problem.format(*map(name, self.related)) if self.related else self.problem
        text = f"{name(self.field)} {problem}"
        if show_value and self.has_value:
            shown = shlex.quote(str(self.value)) if isinstance(self.value, str | Path) else self.value
            text += f" (got {shown})"
        return text


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
        close_timeout: seconds a closing connection waits for its recording to be published
            before it sends its close frame, and then for the peer's close frame.
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
        max_call_seconds: calls that last longer are ended (1008, ``endReason``
            ``max-duration``); Twilio's own limit is 4 hours. At most 268,000 s, so a WAV stays
            under the RIFF format's 4 GiB.
        redis_url: join a cluster of servers through this Redis (``redis://host:6379/0``).
        cluster_max_calls: with ``redis_url``, the most connections across the whole cluster.
        events_maxlen: with ``redis_url``, the length the ``callsock:events`` stream is capped at.
        registry_ttl: with ``redis_url``, seconds a call's registration lasts unless refreshed
            (how long a dead server can keep holding its calls).
        request_timeout: seconds an HTTP request has to arrive whole, headers and body (counted
            from the connection, or from the previous response on a kept-alive connection).
        max_http_connections: the most plain HTTP connections at once (WebSocket connections
            count against ``max_calls`` instead); past it the oldest waiting one is closed.
        forwarded_allow_ips: the peers whose ``X-Forwarded-Host``/``X-Forwarded-Proto``/
            ``X-Forwarded-For`` are believed, comma-separated IP addresses or networks (``*``:
            every peer), as uvicorn's option of that name.
        auth_token_file: a file holding the auth token (its first line), instead of ``auth_token``.
        admin_token: the bearer token ``GET /calls`` needs (``Authorization: Bearer ...``).
        admin_token_file: a file holding the admin token, instead of ``admin_token``.
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
    max_call_seconds: float = 14_400.0
    redis_url: str | None = field(default=None, repr=False)
    cluster_max_calls: int | None = None
    events_maxlen: int = 10_000
    registry_ttl: float = 30.0
    request_timeout: float = 10.0
    max_http_connections: int = 256
    forwarded_allow_ips: str = "127.0.0.1"
    auth_token_file: Path | None = None
    admin_token: str | None = field(default=None, repr=False)
    admin_token_file: Path | None = None

    def __post_init__(self) -> None:
        for check in (_check_web, _check_limits, _check_times, _check_security, _check_cluster):
            check(self)


def _check_web(s: Settings) -> None:
    if not s.path.startswith("/"):
        raise SettingError("path", "must start with '/'", value=s.path)
    if "?" in s.path:
        raise SettingError("path", "must not have a query string (Twilio drops it)", value=s.path)
    if s.public_url is not None:
        parts = urlsplit(s.public_url)
        if parts.scheme not in ("http", "https", "ws", "wss") or not parts.netloc:
            raise SettingError("public_url", "must look like https://host", value=s.public_url)
        if parts.query or parts.fragment:
            raise SettingError(
                "public_url", "must not have a query string: Twilio drops it; use {0}", "parameters"
            )
    if s.status_callback is not None and not _is_web_url(s.status_callback):
        raise SettingError(
            "status_callback", "must be an http:// or https:// URL with a host", value=s.status_callback
        )
    if any(name == STREAM_TOKEN_PARAMETER for name, _ in s.parameters):
        raise SettingError("parameters", f"must not name {STREAM_TOKEN_PARAMETER}: callsock sets it")
    if proxy_networks(s.forwarded_allow_ips) == ():
        raise SettingError(
            "forwarded_allow_ips",
            "takes IP addresses or networks separated by commas, or *",
            value=s.forwarded_allow_ips,
        )


def proxy_networks(text: str) -> tuple[ProxyNetwork, ...] | None:
    """The networks a ``forwarded_allow_ips`` value trusts; ``None`` trusts every peer.

    Returns:
        The networks (an address is a network of one), or ``()`` when the text is not usable.
    """
    items = [item.strip() for item in text.split(",") if item.strip()]
    if "*" in items:
        return None if items == ["*"] else ()
    try:
        return tuple(ipaddress.ip_network(item, strict=False) for item in items)
    except ValueError:
        return ()


def _is_web_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises for a port that is not a number, or out of range
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _check_limits(s: Settings) -> None:
    if not (_is_whole(s.port) and 0 <= s.port <= 65535):
        raise SettingError("port", "must be from 0 to 65535", value=s.port)
    _at_least(s, "max_calls", 1)
    _at_least(s, "buffer_bytes", 160, " (one 20 ms frame)")
    _at_least(s, "handler_queue_ms", 20, " (one frame)")
    _at_least(s, "send_lead_ms", 20, " (one frame)")
    _at_least(s, "max_message_bytes", 1024)
    _at_least(s, "pause_seconds", 1)
    _at_least(s, "events_maxlen", 1)
    _at_least(s, "max_http_connections", 1)


def _is_whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _at_least(s: Settings, name: str, minimum: int, why: str = "") -> None:
    value = getattr(s, name)
    if not _is_whole(value):
        raise SettingError(name, "must be a whole number", value=value)
    if value < minimum:
        raise SettingError(name, f"must be at least {minimum}{why}", value=value)


def _check_times(s: Settings) -> None:
    _seconds(s, "idle_timeout", "must be a positive number of seconds", lambda v: v > 0)
    _seconds(s, "handshake_timeout", "must be a positive number of seconds", lambda v: v > 0)
    _seconds(s, "request_timeout", "must be a positive number of seconds", lambda v: v > 0)
    _seconds(s, "flush_seconds", "must be a positive number of seconds", lambda v: v > 0)
    _seconds(s, "close_timeout", "must be a positive number of seconds", lambda v: v > 0)
    _seconds(s, "drain_timeout", "must be a number of seconds, 0 or more", lambda v: v >= 0)
    _seconds(s, "handler_drain_timeout", "must be a number of seconds, 0 or more", lambda v: v >= 0)
    _seconds(s, "registry_ttl", "must be a number of seconds, at least 3", lambda v: v >= 3)
    _seconds(
        s,
        "max_call_seconds",
        f"must be a positive number of seconds, at most {MAX_CALL_SECONDS} (a WAV's 4 GiB)",
        lambda v: 0 < v <= MAX_CALL_SECONDS,
    )


def _seconds(s: Settings, name: str, problem: str, valid: Callable[[float], bool]) -> None:
    value = getattr(s, name)
    usable = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not (usable and valid(value)):
        raise SettingError(name, problem, value=value)


def _check_security(s: Settings) -> None:
    if s.require_signature and not (s.auth_token or s.auth_token_file):
        raise SettingError("require_signature", "needs an auth token ({0})", "auth_token")
    for secret, file in (("auth_token", "auth_token_file"), ("admin_token", "admin_token_file")):
        if getattr(s, secret) is not None and getattr(s, file) is not None:
            raise SettingError(file, "cannot be given with {0}: choose one", secret)
    if s.admin_token is not None and len(s.admin_token.strip()) < MIN_ADMIN_TOKEN_CHARS:
        raise SettingError("admin_token", f"must be at least {MIN_ADMIN_TOKEN_CHARS} characters")
    if s.ssl_certfile is not None and s.ssl_keyfile is None:
        raise SettingError("ssl_certfile", "needs {0} too", "ssl_keyfile")
    if s.ssl_keyfile is not None and s.ssl_certfile is None:
        raise SettingError("ssl_keyfile", "needs {0} too", "ssl_certfile")


def _check_cluster(s: Settings) -> None:
    if s.redis_url is not None:
        problem = redis_url_problem(s.redis_url)
        if problem is not None:
            raise SettingError("redis_url", problem)  # no value: the URL may hold a password
    if s.cluster_max_calls is not None:
        if s.redis_url is None:
            raise SettingError("cluster_max_calls", "needs {0}", "redis_url")
        _at_least(s, "cluster_max_calls", 1)


def redis_url_problem(url: str) -> str | None:
    """What is wrong with a Redis URL (a predicate, ``must ...``), or ``None`` if it is usable.

    The problem never quotes the URL, which may hold a password.
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises for a port that is not a number, or out of range
    except ValueError:
        return "must have a port from 0 to 65535, as in redis://host:6379/0"
    if parts.scheme not in _REDIS_SCHEMES or not url.startswith(f"{parts.scheme}://"):
        return "must start with redis://, rediss:// or unix://, as in redis://host:6379/0"
    if parts.scheme == "unix":
        return None if parts.path else "must name a socket, as in unix:///run/redis.sock"
    database = parts.path.lstrip("/")
    if database and not database.isdigit():
        return "must end with a database number, as in redis://host:6379/0"
    return None


def check_files(settings: Settings) -> None:
    """Check that the files the settings name can be used: the greeting and the TLS pair.

    Raises:
        SettingError: a file is missing, unreadable, or not what it should be.
    """
    if settings.greeting is not None:
        check_wav("greeting", settings.greeting)
    if settings.ssl_certfile is not None and settings.ssl_keyfile is not None:
        _check_tls(settings.ssl_certfile, settings.ssl_keyfile)


def load_secrets(settings: Settings) -> Settings:
    """The settings with the secrets their files hold read in (the first line of each file).

    ``auth_token_file`` becomes ``auth_token`` and ``admin_token_file`` ``admin_token``; the
    settings returned name no file, so loading them again changes nothing.

    Raises:
        SettingError: a file cannot be read, or holds no secret (or too short an admin token).
    """
    if settings.auth_token_file is not None:
        token = _secret_in("auth_token_file", settings.auth_token_file)
        settings = replace(settings, auth_token=token, auth_token_file=None)
    if settings.admin_token_file is not None:
        path = settings.admin_token_file
        admin = _secret_in("admin_token_file", path)
        if len(admin) < MIN_ADMIN_TOKEN_CHARS:
            raise SettingError(
                "admin_token_file", f"must hold at least {MIN_ADMIN_TOKEN_CHARS} characters", value=path
            )
        settings = replace(settings, admin_token=admin, admin_token_file=None)
    return settings


def _secret_in(name: str, path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = _reason(exc) if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise SettingError(name, f"cannot be read: {reason}", value=path) from None
    lines = text.strip().splitlines()
    if not lines or not lines[0].strip():
        raise SettingError(name, "is empty", value=path)
    return lines[0].strip()


def _readable(name: str, path: Path) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise SettingError(name, f"cannot be read: {_reason(exc)}", value=path) from None


def check_wav(name: str, path: Path) -> None:
    """Check that ``path`` is a PCM WAV file callsock can play.

    Args:
        name: the setting that names the file, for the error.
        path: the file.

    Raises:
        SettingError: the file cannot be read, or is not a PCM WAV file.
    """
    from ..call.audio import load_wav  # numpy and soxr: only when there is a file to check

    _readable(name, path)
    try:
        load_wav(path)
    except Exception as exc:  # wave and numpy raise several kinds for a damaged file
        raise SettingError(name, f"must be a PCM WAV file: {_wav_reason(exc)}", value=path) from None


def _wav_reason(exc: Exception) -> str:
    cause = exc.__cause__ if isinstance(exc, ValueError) and exc.__cause__ is not None else exc
    if isinstance(cause, EOFError):
        return "it ends before its header does"
    return str(cause) or "it cannot be read as one"


class _Encrypted(Exception):
    pass


def _no_password() -> str:
    raise _Encrypted()


def _check_tls(certfile: Path, keyfile: Path) -> None:
    _readable("ssl_certfile", certfile)
    _readable("ssl_keyfile", keyfile)
    try:
        ssl.create_default_context().load_verify_locations(cafile=certfile)
    except ssl.SSLError as exc:
        raise SettingError(
            "ssl_certfile", f"must be a PEM certificate: {_ssl_reason(exc)}", value=certfile
        ) from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile, password=_no_password)
    except _Encrypted:
        raise SettingError(
            "ssl_keyfile", "is encrypted with a passphrase; use an unencrypted key", value=keyfile
        ) from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise SettingError(
                "ssl_keyfile", "is not the private key of {0}", "ssl_certfile", value=keyfile
            ) from None
        raise SettingError(
            "ssl_keyfile", f"must be a PEM private key: {_ssl_reason(exc)}", value=keyfile
        ) from None


def _ssl_reason(exc: ssl.SSLError) -> str:
    reason = str(exc.reason or "").replace("_", " ").lower()
    if not reason or reason == "pem lib":
        return "no usable PEM block in it"
    return reason


def check_record_dir(settings: Settings) -> None:
    """Make sure recordings can be written: create the directory, write and link a probe file.

    The record directory and its ``.partial`` directory are created if missing; a probe file is
    written in each and hard-linked from one to the other (recordings are published with a
    hard link), then removed. Does nothing when recording is off.

    Raises:
        SettingError: the directory cannot be created, written, or hard-linked in.
    """
    if not settings.record:
        return
    directory = settings.record_dir
    partial = directory / PARTIAL_DIR
    step = "cannot be created"
    try:
        if directory.exists() and not directory.is_dir():
            raise SettingError("record_dir", "is a file, not a directory", value=directory)
        directory.mkdir(parents=True, exist_ok=True)
        step = "cannot be written"
        _probe(directory).unlink()
        step = f"cannot be written (its {PARTIAL_DIR} directory)"
        partial.mkdir(exist_ok=True)
        probe = _probe(partial)
        try:
            step = "does not allow hard links (recordings are published with them)"
            os.link(probe, directory / probe.name)
            os.unlink(directory / probe.name)
        finally:
            probe.unlink()
    except OSError as exc:
        raise SettingError("record_dir", f"{step}: {_reason(exc)}", value=directory) from None


def _probe(directory: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=".callsock-probe-", dir=directory)
    try:
        os.write(fd, b"probe")
    finally:
        os.close(fd)
    return Path(name)


def _reason(exc: OSError) -> str:
    return exc.strerror.lower() if exc.strerror else str(exc)
