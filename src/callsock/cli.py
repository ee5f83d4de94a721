"""The ``callsock`` command line.

Every option of ``callsock serve`` can also come from an environment variable named
``CALLSOCK_<OPTION>`` (``--max-calls`` is ``CALLSOCK_MAX_CALLS``); a flag given on the command line
wins over the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import os
import resource
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from . import __version__
from .app import App
from .errors import ConfigurationError
from .logs import configure_logging, get_logger
from .server import CallServer
from .settings import Settings

__all__ = ["load_app", "main"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    try:
        parser = build_parser()
    except _EnvError as exc:
        print(f"callsock: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    status: int = args.command(args)
    return status


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of every ``callsock`` subcommand."""
    parser = argparse.ArgumentParser(
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
    events.add_argument(
        "--redis-url",
        default=os.environ.get("CALLSOCK_REDIS_URL"),
        help="the cluster's Redis (default: $CALLSOCK_REDIS_URL)",
    )
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
    serve.set_defaults(command=_serve)
    serve.add_argument(
        "app",
        nargs="?",
        default=_env("app", None),
        metavar="APP",
        help="your application object as module:attribute (like uvicorn), e.g. mybot:app [CALLSOCK_APP]",
    )
    option = _option_adder(serve)
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
    serve.add_argument(
        "--param",
        action="append",
        default=_env_list("param"),
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
        default=os.environ.get("TWILIO_AUTH_TOKEN"),
        secret=True,
        help="Twilio Auth Token: check X-Twilio-Signature on webhooks and upgrades (also TWILIO_AUTH_TOKEN)",
    )
    option("--require-signature", flag=True, help="refuse to start without an auth token")
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


def _option_adder(parser: argparse.ArgumentParser) -> Any:
    def add(name: str, *, help: str, flag: bool = False, secret: bool = False, **kwargs: Any) -> None:
        key = name.lstrip("-").replace("-", "_")
        env = f"CALLSOCK_{key.upper()}"
        if flag:
            parser.add_argument(name, action="store_true", default=_env_flag(key), help=f"{help} [{env}]")
            return
        default = _env(key, kwargs.pop("default"))
        choices = kwargs.get("choices")
        if choices is not None and default not in choices:
            raise _EnvError(f"{env}={default!r}: choose from {', '.join(choices)}")
        shown = "" if default is None or secret else f" (default: {default})"
        parser.add_argument(name, default=default, help=f"{help}{shown} [{env}]", **kwargs)

    return add


class _EnvError(Exception):
    pass


def _env(key: str, default: Any) -> Any:
    """The value of ``CALLSOCK_<KEY>`` as a string (argparse applies the option's type), or ``default``."""
    return os.environ.get(f"CALLSOCK_{key.upper()}", default)


def _env_list(key: str) -> list[str]:
    raw = os.environ.get(f"CALLSOCK_{key.upper()}", "")
    return [item.strip() for item in raw.split(",") if item.strip()]


def _env_flag(key: str) -> bool:
    raw = os.environ.get(f"CALLSOCK_{key.upper()}", "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise _EnvError(f"CALLSOCK_{key.upper()}={raw!r}: use 1/0, true/false, yes/no or on/off")


def load_app(spec: str) -> object:
    """Import the object named by ``module:attribute`` (the module is looked up from the cwd too).

    Raises:
        ConfigurationError: the spec is malformed, the module does not import, or the attribute
            is missing.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(f"APP must look like module:attribute, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from exc
    obj: object = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigurationError(f"module {module_name!r} has no attribute {attribute!r}") from None
    return obj


def _load_application(spec: str) -> App:
    app = load_app(spec)
    if not isinstance(app, App):
        raise ConfigurationError(f"{spec} is a {type(app).__name__}, not a callsock.App")
    return app


def _settings(args: argparse.Namespace) -> Settings:
    """Build the settings from the parsed options (each option is named after its field)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if hasattr(args, f.name)}
    values["parameters"] = tuple(_key_value(p, "--param") for p in args.param)
    return Settings(**values, record=not args.no_record)


def _simulate(args: argparse.Namespace) -> int:
    from .simulate import SimulationConfig, simulate, write_reply
    from .views import print_simulation

    try:
        parameters = dict(_key_value(p, "--param") for p in args.param)
        if any(d not in "0123456789*#ABCD" for d in args.dtmf):
            raise ValueError(f"--dtmf takes 0-9, *, #, A-D, got {args.dtmf!r}")
        if not args.audio.is_file():
            raise ValueError(f"--audio {args.audio}: no such file")
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


def _bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, run_bench
    from .signatures import signature_for
    from .views import BenchProgress, print_bench

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


def _verify(args: argparse.Namespace) -> int:
    from .verify import VerifyConfig, verify
    from .views import print_verify

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
    from .recover import recover
    from .views import print_recovered

    if not args.record_dir.is_dir():
        print(f"callsock recover: error: {args.record_dir}: no such directory", file=sys.stderr)
        return 2
    results = recover(args.record_dir)
    if args.json:
        print(json.dumps([r.to_dict() for r in results]))
    else:
        print_recovered(args.record_dir, results)
    return 0


def _events(args: argparse.Namespace) -> int:
    if not args.redis_url:
        print("callsock events: error: --redis-url (or CALLSOCK_REDIS_URL) is required", file=sys.stderr)
        return 2
    if args.count is not None and args.count < 1:
        print("callsock events: error: --count must be at least 1", file=sys.stderr)
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


async def _show_events(args: argparse.Namespace) -> None:
    from .events import read_events
    from .views import EventPrinter

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
        settings = _settings(args)
        configure_logging(settings.log_level, settings.log_format)
        app = _load_application(args.app) if args.app else None
        server = CallServer(settings, app)
    except (ValueError, ConfigurationError) as exc:
        print(f"callsock serve: error: {exc}", file=sys.stderr)
        return 2
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
