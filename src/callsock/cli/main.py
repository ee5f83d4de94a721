"""The ``callsock`` command line.

Every option of ``callsock serve`` can also come from an environment variable named
``CALLSOCK_<OPTION>`` (``--max-calls`` is ``CALLSOCK_MAX_CALLS``); a flag given on the command line
wins over the environment.

A mistake is one line on stderr and exit status 2, found before anything listens. The line names
the option by its flag, never by its :class:`~callsock.settings.Settings` field, and starts with
the variable when the value came from one: ``CALLSOCK_MAX_CALLS=0: --max-calls must be at least 1``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import math
import os
import resource
import shlex
import signal
import sys
import sysconfig
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn
from urllib.parse import urlsplit

from redis.exceptions import RedisError

from .. import __version__
from ..observability.logs import configure_logging, get_logger
from ..protocol.errors import ConfigurationError
from ..server.app import App
from ..server.routes import CallServer
from ..server.settings import (
    SettingError,
    Settings,
    check_files,
    check_record_dir,
    check_wav,
    load_secrets,
    redis_url_problem,
)

__all__ = ["load_app", "main"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for a usage error, said in one line)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 0
    status: int = args.command(args)
    return status


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: error: MESSAGE`` and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of every ``callsock`` subcommand."""
    parser = _Parser(
        prog="callsock",
        description="A production server for Twilio Media Streams.",
    )
    parser.add_argument("--version", action="version", version=f"callsock {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    _add_serve(commands)
    _add_simulate(commands)
    _add_bench(commands)
    _add_verify(commands)
    _add_recover(commands)
    _add_events(commands)
    return parser


def _add_events(commands: Any) -> None:
    events = commands.add_parser(
        "events",
        help="tail a cluster's call events (started, dtmf, mark, stopped, recording-ready)",
        description=(
            "Show the entries of the callsock:events Redis stream as servers write them. With "
            "--group, read as a member of that consumer group and acknowledge what was shown, "
            "as a worker would."
        ),
    )
    events.set_defaults(command=_events)
    events.add_argument("--redis-url", help="the cluster's Redis (default: $CALLSOCK_REDIS_URL)")
    events.add_argument(
        "--from-start", action="store_true", help="begin with the oldest event kept, not the next one"
    )
    events.add_argument("--group", help="read as a member of this consumer group (created if missing)")
    events.add_argument("--consumer", default="callsock-events", help="with --group: this reader's name")
    events.add_argument("--count", type=int, help="stop after this many events")
    events.add_argument("--json", action="store_true", help="print each event as a line of JSON")


def _add_recover(commands: Any) -> None:
    recover = commands.add_parser(
        "recover",
        help="publish the recordings a killed server left half-written",
        description=(
            "Turn the partial recordings a server left when it was killed (under DIR/.partial) into "
            "WAV and JSON files, endReason crashed, where the calls would have been published. "
            "Directories of a server still running are left alone."
        ),
    )
    recover.set_defaults(command=_recover)
    recover.add_argument("record_dir", type=Path, metavar="DIR", help="the server's --record-dir")
    recover.add_argument("--json", action="store_true", help="print the results as JSON")


def _add_verify(commands: Any) -> None:
    verify = commands.add_parser(
        "verify",
        help="run the seed guide's verification checklist against a deployment",
        description=(
            "Check a deployment end to end: the TwiML webhook (wss://, no query string, a served "
            "path), the upgrade, a Twilio-shaped call, the seed acknowledgement, rejection of an "
            "invalid start, replacement of a second connection, and signatures. Exits 1 if any "
            "check fails."
        ),
    )
    verify.set_defaults(command=_verify)
    verify.add_argument(
        "url", help="the deployment, e.g. https://example.ngrok.app (its /twiml is the webhook)"
    )
    verify.add_argument("--stream-url", help="the WebSocket URL to check instead of the TwiML's")
    verify.add_argument(
        "--auth-token", default=os.environ.get("TWILIO_AUTH_TOKEN"), help="sign requests and check signing"
    )
    verify.add_argument("--cafile", type=Path, help="a CA certificate to trust (self-signed deployments)")
    verify.add_argument("--insecure", action="store_true", help="do not check TLS certificates")
    verify.add_argument("--json", action="store_true", help="print the results as JSON")


def _add_simulate(commands: Any) -> None:
    simulate = commands.add_parser(
        "simulate",
        help="place one simulated Twilio call against a server and report what happened",
        description=(
            "Place one call the way Twilio does: connected, start, the audio at real-time pace, "
            "DTMF, stop. Marks are echoed as Twilio does; what the server sends is checked and "
            "its audio written with --out. Exits 0 when the call went through cleanly."
        ),
    )
    simulate.set_defaults(command=_simulate)
    simulate.add_argument("url", help="the WebSocket URL, e.g. ws://127.0.0.1:8081/call")
    simulate.add_argument(
        "--audio", type=Path, required=True, help="a PCM WAV file (any rate) the caller says"
    )
    simulate.add_argument(
        "--dialect", choices=("twilio", "seed"), default="twilio", help="the start message's dialect"
    )
    simulate.add_argument(
        "--fork", action="store_true", help="a one-way <Start><Stream>: the server may send nothing"
    )
    simulate.add_argument(
        "--track", choices=("inbound", "outbound", "both"), default="inbound", help="with --fork: tracks sent"
    )
    simulate.add_argument("--dtmf", default="", help="digits pressed after the audio (0-9, *, #, A-D)")
    simulate.add_argument(
        "--param", action="append", default=[], metavar="K=V", help="a customParameter (repeatable)"
    )
    simulate.add_argument("--auth-token", help="sign the upgrade with X-Twilio-Signature using this token")
    simulate.add_argument("--out", type=Path, help="write the audio the server sent back to this WAV file")
    simulate.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_bench(commands: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="many concurrent simulated calls against an echo server: latency and throughput",
        description=(
            "Run N concurrent calls against a server that echoes each media frame (callsock serve "
            "--echo, say). echo: real-time frames, echo round trip percentiles; flood: as fast as "
            "the server answers; idle: connect and start only."
        ),
    )
    bench.set_defaults(command=_bench)
    bench.add_argument("url", help="the WebSocket URL, e.g. ws://127.0.0.1:8081/call")
    bench.add_argument("--calls", type=int, default=100, help="concurrent calls (default: 100)")
    bench.add_argument("--seconds", type=float, default=10.0, help="measuring time once all calls started")
    bench.add_argument("--mode", choices=("echo", "flood", "idle"), default="echo", help="the workload")
    bench.add_argument("--ramp-ms", type=int, default=1000, help="spread the calls' starts over this long")
    bench.add_argument("--window", type=int, default=32, help="flood: frames in flight per call")
    bench.add_argument("--auth-token", help="sign each upgrade with X-Twilio-Signature using this token")
    bench.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_serve(commands: Any) -> None:
    defaults = Settings()
    serve = commands.add_parser(
        "serve",
        help="serve Media Streams on a WebSocket path, plus /health, /calls and /metrics",
        description=(
            "Serve Twilio Media Streams. Every option can also be set with an environment "
            "variable CALLSOCK_<OPTION>, e.g. CALLSOCK_PORT=9000."
        ),
    )
    options: list[_Option] = []
    serve.set_defaults(command=_serve, options=options)
    options.append(_Option("APP", "app", ("CALLSOCK_APP",)))
    serve.add_argument(
        "app",
        nargs="?",
        metavar="APP",
        help="your application object as module:attribute (like uvicorn), e.g. mybot:app [CALLSOCK_APP]",
    )
    option = _option_adder(serve, options)
    option("--host", default=defaults.host, help="address to listen on")
    option("--port", type=int, default=defaults.port, help="TCP port to listen on")
    option("--path", default=defaults.path, help="WebSocket path; must match the <Stream url> in your TwiML")
    option("--record-dir", type=Path, default=defaults.record_dir, help="directory of call recordings")
    option("--no-record", flag=True, help="do not record calls")
    option(
        "--start-ack",
        choices=("auto", "always", "never"),
        default=defaults.start_ack,
        help="answer start with the seed guide's acknowledgement: auto = only to seed-dialect starts",
    )
    option(
        "--max-calls", type=int, default=defaults.max_calls, help="most connections at once; more get 1013"
    )
    option(
        "--buffer-bytes",
        type=int,
        default=defaults.buffer_bytes,
        help="per-call audio buffer; flushed to the recording when full",
    )
    option(
        "--log-format",
        choices=("auto", "json", "console"),
        default=defaults.log_format,
        help="json, console, or auto: console on a terminal, json otherwise",
    )
    option(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=defaults.log_level,
        help="lowest level logged; debug logs every message (never its audio)",
    )
    option("--echo", flag=True, help="built-in echo: a bidirectional call hears itself")
    option("--greeting", type=Path, default=None, help="a WAV file (any rate) played when a call starts")
    option(
        "--stream-mode",
        choices=("connect", "start"),
        default=defaults.stream_mode,
        help="connect: <Connect><Stream>, bidirectional; start: a one-way <Start><Stream> fork",
    )
    option(
        "--handler-queue-ms",
        type=int,
        default=defaults.handler_queue_ms,
        help="audio that may wait for slow on_audio handlers; older frames are dropped past it",
    )
    option(
        "--send-lead-ms",
        type=int,
        default=defaults.send_lead_ms,
        help="how far outbound audio may run ahead of what the caller hears",
    )
    option(
        "--public-url", default=None, help="the public base URL, e.g. https://example.ngrok.app (for TwiML)"
    )
    options.append(_Option("--param", "param", ("CALLSOCK_PARAM",), [], "list"))
    serve.add_argument(
        "--param",
        action="append",
        metavar="NAME=VALUE",
        help="a <Parameter> for the TwiML's <Stream> (repeatable) [CALLSOCK_PARAM: NAME=VALUE,...]",
    )
    option(
        "--track",
        choices=("inbound_track", "outbound_track", "both_tracks"),
        default=defaults.track,
        help="with --stream-mode start: the tracks the fork carries",
    )
    option(
        "--pause-seconds",
        type=int,
        default=defaults.pause_seconds,
        help="with --stream-mode start: the <Pause> that keeps the call up",
    )
    option("--status-callback", default=None, help="a URL for Twilio's stream status callbacks")
    option(
        "--auth-token",
        default=None,
        secret=True,
        also="TWILIO_AUTH_TOKEN",
        help="Twilio Auth Token: check X-Twilio-Signature on webhooks and upgrades (also TWILIO_AUTH_TOKEN)",
    )
    option("--require-signature", flag=True, help="refuse to start without an auth token")
    option(
        "--auth-token-file",
        type=Path,
        default=None,
        help="a file whose first line is the Twilio Auth Token (instead of --auth-token, which ps shows)",
    )
    option(
        "--admin-token",
        default=None,
        secret=True,
        help="the bearer token GET /calls needs (Authorization: Bearer ...)",
    )
    option("--admin-token-file", type=Path, default=None, help="a file whose first line is the admin token")
    option(
        "--forwarded-allow-ips",
        default=defaults.forwarded_allow_ips,
        help="peers whose X-Forwarded-* headers are believed: IPs or networks, comma-separated, or *",
    )
    option(
        "--request-timeout",
        type=float,
        default=defaults.request_timeout,
        help="seconds an HTTP request has to arrive whole, headers and body; slower ones are dropped",
    )
    option(
        "--max-http-connections",
        type=int,
        default=defaults.max_http_connections,
        help="most plain HTTP connections at once (WebSockets count against --max-calls)",
    )
    option(
        "--max-message-bytes",
        type=int,
        default=defaults.max_message_bytes,
        help="largest WebSocket message; larger closes with 1009",
    )
    option(
        "--idle-timeout",
        type=float,
        default=defaults.idle_timeout,
        help="seconds without a message before a connection is closed",
    )
    option(
        "--handshake-timeout",
        type=float,
        default=defaults.handshake_timeout,
        help="seconds a connection has to send its request, and then start",
    )
    option(
        "--ssl-certfile", type=Path, default=None, help="PEM certificate: serve wss:// and https:// directly"
    )
    option("--ssl-keyfile", type=Path, default=None, help="the certificate's private key")
    option(
        "--flush-seconds",
        type=float,
        default=defaults.flush_seconds,
        help="audio waits in memory at most this long before it is written (what a crash loses)",
    )
    option("--redis-url", default=None, secret=True, help="join a cluster of servers through this Redis")
    option(
        "--cluster-max-calls",
        type=int,
        default=None,
        help="with --redis-url: the most connections across the whole cluster; more get 1013",
    )
    option(
        "--events-maxlen",
        type=int,
        default=defaults.events_maxlen,
        help="with --redis-url: the callsock:events stream is capped at about this many entries",
    )
    option(
        "--registry-ttl",
        type=float,
        default=defaults.registry_ttl,
        help="with --redis-url: seconds a dead server keeps holding its calls",
    )
    option(
        "--drain-timeout",
        type=float,
        default=defaults.drain_timeout,
        help="on SIGTERM, how long active calls may go on before they are closed with 1001",
    )
    option(
        "--max-call-seconds",
        type=float,
        default=defaults.max_call_seconds,
        help="calls longer than this are ended with 1008 (Twilio's own limit is 4 hours)",
    )
    option(
        "--close-timeout",
        type=float,
        default=defaults.close_timeout,
        help="how long a closing call waits for its recording to be published, then for the peer's close",
    )


def _option_adder(parser: argparse.ArgumentParser, options: list[_Option]) -> Any:
    """An ``add_argument`` for options that an environment variable can also set.

    Each option's argparse default is ``None`` (not given); :func:`_apply_environment` fills it
    in after parsing, from the variable or the default, so a flag on the command line wins and
    a bad variable is only an error when it is used.
    """

    def add(
        name: str,
        *,
        help: str,
        flag: bool = False,
        secret: bool = False,
        also: str | None = None,
        **kwargs: Any,
    ) -> None:
        key = name.lstrip("-").replace("-", "_")
        variables = (f"CALLSOCK_{key.upper()}", *((also,) if also else ()))
        if flag:
            options.append(_Option(name, key, variables, False, "flag"))
            parser.add_argument(name, action="store_true", default=None, help=f"{help} [{variables[0]}]")
            return
        default = kwargs.pop("default")
        choices = kwargs.get("choices")
        option = _Option(name, key, variables, default, "value", kwargs.get("type"), choices, secret)
        options.append(option)
        found = option.from_environment()
        shown = found[1] if found else default
        shown_text = "" if shown is None or secret else f" (default: {shown})"
        parser.add_argument(name, default=None, help=f"{help}{shown_text} [{variables[0]}]", **kwargs)

    return add


class _UsageError(Exception):
    """A mistake in how callsock was called: one line, exit status 2."""


@dataclass(frozen=True)
class _Option:
    """A ``serve`` option (or APP) that environment variables can also set.

    Attributes:
        flag: the option as the command line spells it (``--max-calls``, or ``APP``).
        dest: its attribute on the parsed namespace, also its field of :class:`Settings`.
        variables: the variables that can set it, the first winning.
        default: its value when neither the command line nor a variable sets it.
        kind: ``value``, ``flag`` (a switch) or ``list`` (comma-separated in the variable).
        convert: the type of a value (``int``, ``float``, ``Path``), applied to the variable.
        choices: the values allowed, if limited.
        secret: never show its value.
    """

    flag: str
    dest: str
    variables: tuple[str, ...]
    default: Any = None
    kind: Literal["value", "flag", "list"] = "value"
    convert: Callable[[str], Any] | None = None
    choices: Sequence[str] | None = None
    secret: bool = False

    def from_environment(self) -> tuple[str, str] | None:
        """The first of its variables that is set, and its text (an empty variable is unset)."""
        for variable in self.variables:
            raw = os.environ.get(variable, "")
            if raw.strip():
                return variable, raw
        return None

    def parse(self, variable: str, raw: str) -> Any:
        """The value of ``variable``, whose text is ``raw``.

        Raises:
            _UsageError: the text is not a value of this option.
        """
        if self.kind == "list":
            return [item.strip() for item in raw.split(",") if item.strip()]
        if self.kind == "flag":
            text = raw.strip().lower()
            if text in _TRUE | _FALSE:
                return text in _TRUE
            raise self._refuse(variable, raw, "takes 1/0, true/false, yes/no or on/off")
        if self.choices is not None and raw not in self.choices:
            raise self._refuse(variable, raw, f"takes one of {', '.join(self.choices)}")
        if self.convert is None:
            return raw
        try:
            return self.convert(raw)
        except ValueError:
            expected = "a whole number" if self.convert is int else "a number"
            raise self._refuse(variable, raw, f"takes {expected}") from None

    def _refuse(self, variable: str, raw: str, problem: str) -> _UsageError:
        return _UsageError(f"{_source(variable, raw, self.secret)}: {self.flag} {problem}")


def _source(variable: str, raw: str, secret: bool) -> str:
    """How an error names the variable a value came from: ``CALLSOCK_PORT=eighty``."""
    return variable if secret else f"{variable}={shlex.quote(raw)}"


def _apply_environment(args: argparse.Namespace) -> None:
    """Fill in each option the command line did not give, from its variable or its default.

    Records in ``args.sources`` which options came from which variable (``{dest: (variable,
    text)}``), so an error about one names the variable.

    Raises:
        _UsageError: a variable that is used holds something its option cannot take.
    """
    args.sources = {}
    for option in args.options:
        if getattr(args, option.dest) is not None:
            continue
        found = option.from_environment()
        if found is None:
            setattr(args, option.dest, option.default)
            continue
        setattr(args, option.dest, option.parse(*found))
        args.sources[option.dest] = found


def _flag_namer(args: argparse.Namespace) -> Callable[[str], str]:
    """How the command line calls a setting, given its field name: by its flag."""
    flags = {option.dest: option.flag for option in args.options}
    flags.update(record="--no-record", parameters="--param", auth_token="--auth-token or TWILIO_AUTH_TOKEN")
    return lambda name: flags.get(name, name)


def _explain(error: SettingError, args: argparse.Namespace) -> str:
    """A setting's error in the command line's words: its flag, and its variable if it set it."""
    name = _flag_namer(args)
    source = args.sources.get("param" if error.field == "parameters" else error.field)
    if source is None:
        return error.describe(name)
    variable, raw = source
    secret = any(o.secret for o in args.options if o.dest == error.field)
    return f"{_source(variable, raw, secret)}: {error.describe(name, show_value=False)}"


def load_app(spec: str) -> object:
    """Import the object named by ``module:attribute`` (the module is looked up from the cwd too).

    Raises:
        ConfigurationError: the spec is malformed, the module does not import (the message
            says where and why, in one line), or the attribute is missing.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError("must look like module:attribute, e.g. mybot:app")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # whatever the module raised: say where, in one line
        raise ConfigurationError(
            f"cannot import {module_name!r}: {_import_failure(module_name, exc)}"
        ) from exc
    obj: object = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigurationError(f"module {module_name!r} has no attribute {attribute!r}") from None
    return obj


def _import_failure(module_name: str, exc: Exception) -> str:
    """Why a module did not import, in one line: where it failed, the exception and its message."""
    if isinstance(exc, ModuleNotFoundError) and exc.name and f"{module_name}.".startswith(f"{exc.name}."):
        return f"no module named {exc.name!r} in {os.getcwd()} or on the Python path"
    if isinstance(exc, SyntaxError):
        where, message = (exc.filename, exc.lineno), exc.msg
    else:
        where, message = _raised_at(exc), str(exc)
    lines = message.strip().splitlines()
    described = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    filename, line = where
    if filename is None:
        return described
    return f"{_display_path(filename)}, line {line}: {described}"


def _raised_at(exc: Exception) -> tuple[str | None, int | None]:
    """The file and line an import failed at: the deepest frame in the user's own code."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
    libraries = [Path(__file__).parent.as_posix(), *_library_paths()]
    own = [f for f in frames if not any(f.filename.startswith(lib) for lib in libraries)]
    candidates = own or frames
    if not candidates:
        return None, None
    return candidates[-1].filename, candidates[-1].lineno


def _library_paths() -> list[str]:
    paths = sysconfig.get_paths()
    return [paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths]


def _display_path(filename: str) -> str:
    path = Path(filename)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return filename


def _load_application(args: argparse.Namespace) -> App | None:
    """The APP, loaded, or ``None`` without one.

    Raises:
        _UsageError: it does not load, or is not a :class:`App`; the message names the APP (and
            CALLSOCK_APP when it came from there).
    """
    spec: str | None = args.app
    if not spec:
        return None
    blame = f"CALLSOCK_APP={shlex.quote(spec)}: APP" if "app" in args.sources else f"APP {spec}:"
    try:
        app = load_app(spec)
    except ConfigurationError as exc:
        raise _UsageError(f"{blame} {exc}") from None
    if not isinstance(app, App):
        kind = type(app).__name__
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        raise _UsageError(f"{blame} names {article} {kind}, not a callsock.App")
    return app


def _settings(args: argparse.Namespace) -> Settings:
    """Build the settings from the parsed options (each option is named after its field)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if hasattr(args, f.name)}
    values["parameters"] = tuple(_parameter(p) for p in args.param)
    return Settings(**values, record=not args.no_record)


def _parameter(text: str) -> tuple[str, str]:
    try:
        return _key_value(text, "--param")
    except ValueError:
        raise SettingError("parameters", "takes KEY=VALUE", value=text) from None


def _simulate(args: argparse.Namespace) -> int:
    from ..tools.simulate import SimulationConfig, simulate, write_reply
    from ..tools.terminal import print_simulation

    try:
        parameters = dict(_key_value(p, "--param") for p in args.param)
        _check_simulation(args)
        config = SimulationConfig(
            url=args.url,
            audio=args.audio,
            dialect=args.dialect,
            fork=args.fork,
            track=args.track,
            dtmf=args.dtmf,
            parameters=parameters,
            auth_token=args.auth_token,
        )
        report = _run(simulate(config))
    except ValueError as exc:
        print(f"callsock simulate: error: {exc}", file=sys.stderr)
        return 2
    if args.out is not None:
        write_reply(report, args.out)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print_simulation(report, args.out)
    return 0 if report.ok else 1


def _check_simulation(args: argparse.Namespace) -> None:
    """Refuse what ``simulate`` cannot do, naming the option.

    Raises:
        ValueError: the digits, the audio file or the tracks are not usable.
    """
    if any(d not in "0123456789*#ABCD" for d in args.dtmf):
        raise ValueError(f"--dtmf takes 0-9, *, #, A-D, got {args.dtmf!r}")
    if args.track != "inbound" and not args.fork:
        raise ValueError(
            f"--track {args.track} needs --fork: a bidirectional stream carries only the inbound track"
        )
    try:
        check_wav("audio", args.audio)
    except SettingError as exc:
        raise ValueError(exc.describe(lambda name: f"--{name}")) from None


def _bench(args: argparse.Namespace) -> int:
    from ..server.twilio import signature_for
    from ..tools.bench import BenchConfig, run_bench
    from ..tools.terminal import BenchProgress, print_bench

    problem = _bench_problem(args)
    if problem is not None:
        print(f"callsock bench: error: {problem}", file=sys.stderr)
        return 2
    headers = {"X-Twilio-Signature": signature_for(args.auth_token, args.url, {})} if args.auth_token else {}
    try:
        config = BenchConfig(
            url=args.url,
            calls=args.calls,
            seconds=args.seconds,
            mode=args.mode,
            ramp_ms=args.ramp_ms,
            window=args.window,
            headers=headers,
            auth_token=args.auth_token,
        )
        if args.json:
            report = _run(run_bench(config))
        else:
            with BenchProgress(config) as progress:
                report = _run(run_bench(config, progress.update))
    except ValueError as exc:
        print(f"callsock bench: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print_bench(report)
    return 0 if report.failed == 0 and report.connected == config.calls else 1


def _bench_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with bench's numbers, in one line naming the option, or ``None``."""
    seconds = args.seconds
    checks = [
        ("--calls", args.calls, args.calls >= 1, "must be at least 1"),
        ("--seconds", seconds, math.isfinite(seconds) and seconds > 0, "must be a positive number"),
        ("--ramp-ms", args.ramp_ms, args.ramp_ms >= 0, "must be 0 or more"),
        ("--window", args.window, args.window >= 1, "must be at least 1"),
    ]
    for flag, value, valid, problem in checks:
        if not valid:
            return f"{flag} {problem} (got {value})"
    return None


def _verify(args: argparse.Namespace) -> int:
    from ..tools.terminal import print_verify
    from ..tools.verify import VerifyConfig, verify

    config = VerifyConfig(
        url=args.url,
        stream_url=args.stream_url,
        auth_token=args.auth_token,
        cafile=args.cafile,
        insecure=args.insecure,
    )
    checks = _run(verify(config))
    if args.json:
        print(json.dumps([c.to_dict() for c in checks]))
    else:
        print_verify(args.url, checks)
    return 1 if any(c.passed is False for c in checks) else 0


def _recover(args: argparse.Namespace) -> int:
    from ..recording.recover import recover
    from ..tools.terminal import print_recovered

    if not args.record_dir.is_dir():
        print(f"callsock recover: error: {args.record_dir}: no such directory", file=sys.stderr)
        return 2
    results = recover(args.record_dir)
    if args.json:
        print(json.dumps([r.to_dict() for r in results]))
    else:
        print_recovered(args.record_dir, results)
    return 1 if any(r.failed for r in results) else 0


def _events(args: argparse.Namespace) -> int:
    problem = _events_problem(args)
    if problem is not None:
        print(f"callsock events: error: {problem}", file=sys.stderr)
        return 2
    try:
        _run(_show_events(args))
    except KeyboardInterrupt:
        return 0
    except ConfigurationError as exc:
        print(f"callsock events: error: {exc}", file=sys.stderr)
        return 1
    except (RedisError, OSError) as exc:
        print(f"callsock events: error: lost Redis: {exc}", file=sys.stderr)
        return 1
    return 0


def _events_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the options of ``events`` (filling --redis-url from the environment)."""
    source = ""
    if not args.redis_url and os.environ.get("CALLSOCK_REDIS_URL", "").strip():
        args.redis_url, source = os.environ["CALLSOCK_REDIS_URL"], "CALLSOCK_REDIS_URL: "
    if not args.redis_url:
        return "--redis-url (or CALLSOCK_REDIS_URL) is required"
    problem = redis_url_problem(args.redis_url)
    if problem is not None:
        return f"{source}--redis-url {problem}"
    if args.count is not None and args.count < 1:
        return f"--count must be at least 1 (got {args.count})"
    return None


async def _show_events(args: argparse.Namespace) -> None:
    from ..cluster.events import read_events
    from ..tools.terminal import EventPrinter

    printer = EventPrinter()
    shown = 0
    events = read_events(args.redis_url, from_start=args.from_start, group=args.group, consumer=args.consumer)
    try:
        async for event in events:
            if args.json:
                print(json.dumps(event.to_dict()), flush=True)
            else:
                printer.show(event)
            shown += 1
            if shown == args.count:
                break
    finally:
        await events.aclose()


def _key_value(text: str, option: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"{option} takes KEY=VALUE, got {text!r}")
    return key, value


def _serve(args: argparse.Namespace) -> int:
    try:
        server = _prepare_server(args)
    except _UsageError as exc:
        print(f"callsock serve: error: {exc}", file=sys.stderr)
        return 2
    settings = server.settings
    _raise_file_limit()
    try:
        _run(_serve_until_signal(server))
    except ConfigurationError as exc:  # Redis unreachable at start
        print(f"callsock serve: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(
            f"callsock serve: error: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr
        )
        return 1
    return 0


def _prepare_server(args: argparse.Namespace) -> CallServer:
    """Check every option, the files they name, the APP and the record directory; nothing listens yet.

    Raises:
        _UsageError: the first mistake found, in one line naming its option (and variable).
    """
    exposed = _secrets_on_command_line(args)
    _apply_environment(args)
    try:
        settings = load_secrets(_settings(args))
        check_files(settings)
        app = _load_application(args)
        check_record_dir(settings)  # last: it creates the directory
        configure_logging(settings.log_level, settings.log_format)
        if exposed:
            get_logger().warning(
                "secret given on the command line, where any user of this machine can read it (ps); "
                "use its CALLSOCK_ variable or its --...-file option instead",
                options=exposed,
            )
        return CallServer(settings, app)
    except SettingError as exc:
        raise _UsageError(_explain(exc, args)) from None
    except (ValueError, ConfigurationError) as exc:
        raise _UsageError(str(exc)) from None


def _secrets_on_command_line(args: argparse.Namespace) -> list[str]:
    """The secret options given as flags (before the environment fills in the rest).

    A Redis URL counts only when it carries a password.
    """
    exposed = []
    for option in args.options:
        value = getattr(args, option.dest, None)
        if option.secret and value is not None:
            if option.dest != "redis_url" or _has_password(value):
                exposed.append(option.flag)
    return exposed


def _has_password(url: str) -> bool:
    try:
        return bool(urlsplit(url).password)
    except ValueError:
        return False


async def _serve_until_signal(server: CallServer) -> None:
    """Serve until SIGTERM or SIGINT; then drain (a second signal cuts the drain short)."""
    await server.start()
    stop, hurry = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def signalled() -> None:
        (hurry if stop.is_set() else stop).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signalled)
    try:
        await stop.wait()
    finally:
        await server.stop(drain=server.settings.drain_timeout, hurry=hurry)


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _raise_file_limit() -> None:
    """Each call holds a socket; lift the soft descriptor limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            get_logger().warning("could not raise the open-file limit", soft=soft, hard=hard)
