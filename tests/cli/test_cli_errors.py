"""Every mistake on the command line is one line on stderr naming its flag (and variable), exit 2.

Most tests run the command line in-process (``main`` returns the exit status) against real files;
two run `callsock serve` as a real process to show nothing listens before the error.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import wave
from pathlib import Path

import pytest
import trustme

from callsock.cli.main import main
from callsock.recording.layout import PARTIAL_DIR
from callsock.server.settings import SettingError, Settings, check_record_dir

from ..processes import free_port

FIELDS_WITH_UNDERSCORES = [f.name for f in dataclasses.fields(Settings) if "_" in f.name]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No CALLSOCK_ variable or Twilio token from the outside; work in a fresh directory."""
    for name in list(os.environ):
        if name.startswith("CALLSOCK_") or name == "TWILIO_AUTH_TOKEN":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``callsock ARGV`` in-process; check it failed with exit 2 and one line; return the line."""
    status = main(argv)
    out, err = capsys.readouterr()
    assert status == 2, (out, err)
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    for name in FIELDS_WITH_UNDERSCORES:  # flags and variables, never internal field names
        assert name not in err, err
    return err.rstrip("\n")


def serve_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """The one line `callsock serve ARGS` fails with, without its ``callsock serve: error: ``."""
    line = error_line(capsys, ["serve", "--host", "127.0.0.1", "--port", "0", *args])
    prefix = "callsock serve: error: "
    assert line.startswith(prefix), line
    return line[len(prefix) :]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-calls", "0"], "--max-calls must be at least 1 (got 0)"),
        (["--buffer-bytes", "100"], "--buffer-bytes must be at least 160 (one 20 ms frame) (got 100)"),
        (["--handler-queue-ms", "-5"], "--handler-queue-ms must be at least 20 (one frame) (got -5)"),
        (["--send-lead-ms", "0"], "--send-lead-ms must be at least 20 (one frame) (got 0)"),
        (["--max-message-bytes", "10"], "--max-message-bytes must be at least 1024 (got 10)"),
        (["--pause-seconds", "0"], "--pause-seconds must be at least 1 (got 0)"),
        (["--events-maxlen", "0"], "--events-maxlen must be at least 1 (got 0)"),
        (["--port", "70000"], "--port must be from 0 to 65535 (got 70000)"),
        (["--idle-timeout", "nan"], "--idle-timeout must be a positive number of seconds (got nan)"),
        (["--idle-timeout", "0"], "--idle-timeout must be a positive number of seconds (got 0.0)"),
        (["--handshake-timeout", "inf"], "--handshake-timeout must be a positive number of seconds (got inf)"),
        (["--flush-seconds", "-1"], "--flush-seconds must be a positive number of seconds (got -1.0)"),
        (["--drain-timeout=-inf"], "--drain-timeout must be a number of seconds, 0 or more (got -inf)"),
        (["--registry-ttl", "nan"], "--registry-ttl must be a number of seconds, at least 3 (got nan)"),
        (["--path", "call"], "--path must start with '/' (got call)"),
        (["--path", "/call?x=1"], "--path must not have a query string (Twilio drops it) (got '/call?x=1')"),
        (["--public-url", "abc.ngrok.app"], "--public-url must look like https://host (got abc.ngrok.app)"),
        (["--public-url", "https://x.test/?a=1"], "--public-url must not have a query string: Twilio drops it; use --param"),
        (["--status-callback", "ftp://x.test/cb"], "--status-callback must be an http:// or https:// URL with a host (got ftp://x.test/cb)"),
        (["--status-callback", "https://"], "--status-callback must be an http:// or https:// URL with a host (got https://)"),
        (["--status-callback", "x.test/cb"], "--status-callback must be an http:// or https:// URL with a host (got x.test/cb)"),
        (["--redis-url", "http://x"], "--redis-url must start with redis://, rediss:// or unix://, as in redis://host:6379/0"),
        (["--redis-url", "redis//x"], "--redis-url must start with redis://, rediss:// or unix://, as in redis://host:6379/0"),
        (["--redis-url", "garbage"], "--redis-url must start with redis://, rediss:// or unix://, as in redis://host:6379/0"),
        (["--redis-url", "redis://x:port/0"], "--redis-url must have a port from 0 to 65535, as in redis://host:6379/0"),
        (["--redis-url", "redis://x/zero"], "--redis-url must end with a database number, as in redis://host:6379/0"),
        (["--redis-url", "unix://"], "--redis-url must name a socket, as in unix:///run/redis.sock"),
        (["--cluster-max-calls", "3"], "--cluster-max-calls needs --redis-url"),
        (["--redis-url", "redis://127.0.0.1:9/0", "--cluster-max-calls", "0"], "--cluster-max-calls must be at least 1 (got 0)"),
        (["--ssl-certfile", "cert.pem"], "--ssl-certfile needs --ssl-keyfile too"),
        (["--ssl-keyfile", "key.pem"], "--ssl-keyfile needs --ssl-certfile too"),
        (["--require-signature"], "--require-signature needs an auth token (--auth-token or TWILIO_AUTH_TOKEN)"),
        (["--param", "novalue"], "--param takes KEY=VALUE (got novalue)"),
        (["--port", "eighty"], "argument --port: invalid int value: 'eighty'"),
        (["--start-ack", "sometimes"], "argument --start-ack: invalid choice: 'sometimes' (choose from 'auto', 'always', 'never')"),
    ],
)  # fmt: skip
def test_each_bad_option_is_one_line_naming_its_flag(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """A bad value on the command line: exit 2, one line blaming only that flag, with the value."""
    assert serve_error(capsys, *args) == message


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CALLSOCK_MAX_CALLS": "0"}, "CALLSOCK_MAX_CALLS=0: --max-calls must be at least 1"),
        ({"CALLSOCK_PORT": "eighty"}, "CALLSOCK_PORT=eighty: --port takes a whole number"),
        ({"CALLSOCK_IDLE_TIMEOUT": "soon"}, "CALLSOCK_IDLE_TIMEOUT=soon: --idle-timeout takes a number"),
        ({"CALLSOCK_DRAIN_TIMEOUT": "inf"}, "CALLSOCK_DRAIN_TIMEOUT=inf: --drain-timeout must be a number of seconds, 0 or more"),
        ({"CALLSOCK_HANDSHAKE_TIMEOUT": "nan"}, "CALLSOCK_HANDSHAKE_TIMEOUT=nan: --handshake-timeout must be a positive number of seconds"),
        ({"CALLSOCK_START_ACK": "sometimes"}, "CALLSOCK_START_ACK=sometimes: --start-ack takes one of auto, always, never"),
        ({"CALLSOCK_NO_RECORD": "maybe"}, "CALLSOCK_NO_RECORD=maybe: --no-record takes 1/0, true/false, yes/no or on/off"),
        ({"CALLSOCK_PATH": "call"}, "CALLSOCK_PATH=call: --path must start with '/'"),
        ({"CALLSOCK_PUBLIC_URL": "https://x.test/?a=1"}, "CALLSOCK_PUBLIC_URL='https://x.test/?a=1': --public-url must not have a query string: Twilio drops it; use --param"),
        ({"CALLSOCK_PARAM": "a=1,novalue"}, "CALLSOCK_PARAM=a=1,novalue: --param takes KEY=VALUE"),
        ({"CALLSOCK_STATUS_CALLBACK": "mailto:x@y"}, "CALLSOCK_STATUS_CALLBACK=mailto:x@y: --status-callback must be an http:// or https:// URL with a host"),
        ({"CALLSOCK_REQUIRE_SIGNATURE": "yes"}, "CALLSOCK_REQUIRE_SIGNATURE=yes: --require-signature needs an auth token (--auth-token or TWILIO_AUTH_TOKEN)"),
        ({"CALLSOCK_CLUSTER_MAX_CALLS": "5"}, "CALLSOCK_CLUSTER_MAX_CALLS=5: --cluster-max-calls needs --redis-url"),
        ({"CALLSOCK_SSL_KEYFILE": "key.pem"}, "CALLSOCK_SSL_KEYFILE=key.pem: --ssl-keyfile needs --ssl-certfile too"),
    ],
)  # fmt: skip
def test_a_bad_variable_names_itself_and_its_flag(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    """A bad value from the environment: the line starts with VARIABLE=value, then the flag."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = ["serve", "--host", "127.0.0.1"] + ([] if "CALLSOCK_PORT" in env else ["--port", "0"])
    assert error_line(capsys, args) == f"callsock serve: error: {message}"


def test_secrets_are_never_shown(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A Redis URL may hold a password: its errors name the variable or flag, never the value."""
    monkeypatch.setenv("CALLSOCK_REDIS_URL", "http://user:hunter2@redis.internal:6379/0")
    line = serve_error(capsys)
    assert line == (
        "CALLSOCK_REDIS_URL: --redis-url must start with redis://, rediss:// or unix://, as in redis://host:6379/0"
    )
    assert "hunter2" not in serve_error(capsys, "--redis-url", "http://user:hunter2@x/0")


def test_a_flag_wins_over_its_bad_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The variable a flag overrides is not even read; the flag's own mistake is what is reported."""
    monkeypatch.setenv("CALLSOCK_MAX_CALLS", "zero")
    monkeypatch.setenv("CALLSOCK_IDLE_TIMEOUT", "nan")
    assert serve_error(capsys, "--max-calls", "5", "--idle-timeout", "-1") == (
        "--idle-timeout must be a positive number of seconds (got -1.0)"
    )


def write_wav(path: Path) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x00" * 800)
    return path


def test_greeting_must_be_a_readable_wav(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A missing, unreadable or malformed --greeting is refused at start, naming the file."""
    assert serve_error(capsys, "--greeting", "hello.wav") == (
        "--greeting cannot be read: no such file or directory (got hello.wav)"
    )
    (tmp_path / "folder.wav").mkdir()
    assert serve_error(capsys, "--greeting", "folder.wav") == (
        "--greeting cannot be read: is a directory (got folder.wav)"
    )
    (tmp_path / "short.wav").write_bytes(b"RIFF")
    assert serve_error(capsys, "--greeting", "short.wav") == (
        "--greeting must be a PCM WAV file: it ends before its header does (got short.wav)"
    )
    monkeypatch.setenv("CALLSOCK_GREETING", "hello.wav")
    assert serve_error(capsys) == (
        "CALLSOCK_GREETING=hello.wav: --greeting cannot be read: no such file or directory"
    )


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, Path]:
    """A certificate and its key, another certificate's key, and a file that is no PEM at all."""
    issued = trustme.CA().issue_cert("127.0.0.1")
    other = trustme.CA().issue_cert("127.0.0.1")
    files = {name: tmp_path / f"{name}.pem" for name in ("cert", "key", "other_key", "junk")}
    issued.cert_chain_pems[0].write_to_path(str(files["cert"]))
    issued.private_key_pem.write_to_path(str(files["key"]))
    other.private_key_pem.write_to_path(str(files["other_key"]))
    files["junk"].write_text("not a PEM file\n")
    return files


def test_tls_files_are_checked_and_the_wrong_one_named(
    capsys: pytest.CaptureFixture[str], tls_files: dict[str, Path]
) -> None:
    """A TLS file that is missing, unreadable or does not load is named, and only that one."""

    def tls(cert: str, key: str) -> str:
        return serve_error(capsys, "--ssl-certfile", cert, "--ssl-keyfile", key)

    assert tls("missing.pem", "key.pem") == (
        "--ssl-certfile cannot be read: no such file or directory (got missing.pem)"
    )
    assert tls("cert.pem", "missing.pem") == (
        "--ssl-keyfile cannot be read: no such file or directory (got missing.pem)"
    )
    assert tls("junk.pem", "key.pem") == (
        "--ssl-certfile must be a PEM certificate: no certificate or crl found (got junk.pem)"
    )
    assert (
        tls("cert.pem", "junk.pem")
        == "--ssl-keyfile must be a PEM private key: no usable PEM block in it (got junk.pem)"
    )
    assert (
        tls("cert.pem", "other_key.pem")
        == "--ssl-keyfile is not the private key of --ssl-certfile (got other_key.pem)"
    )
    assert tls("key.pem", "key.pem").startswith("--ssl-certfile must be a PEM certificate")


def test_record_dir_that_cannot_be_written_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A regular file, a file in the way, or a read-only place: refused at start, not per call."""
    (tmp_path / "notes.txt").write_text("a regular file\n")
    assert serve_error(capsys, "--record-dir", "notes.txt") == (
        "--record-dir is a file, not a directory (got notes.txt)"
    )
    assert serve_error(capsys, "--record-dir", "notes.txt/sub") == (
        "--record-dir cannot be created: not a directory (got notes.txt/sub)"
    )
    # Really read-only even for root (chmod is not): the kernel's own file systems.
    for place in ("/proc/callsock-test/recordings", "/sys/callsock-test"):
        line = serve_error(capsys, "--record-dir", place)
        assert line.startswith("--record-dir cannot be created: ") and line.endswith(f"(got {place})")
    monkeypatch.setenv("CALLSOCK_RECORD_DIR", "notes.txt")
    assert serve_error(capsys) == "CALLSOCK_RECORD_DIR=notes.txt: --record-dir is a file, not a directory"
    assert (tmp_path / "notes.txt").read_text() == "a regular file\n"


def test_record_dir_is_created_and_probed_without_leaving_anything(tmp_path: Path) -> None:
    """A usable record dir is created with its .partial directory; the probe files are gone."""
    directory = tmp_path / "a" / "b" / "recordings"
    check_record_dir(Settings(record_dir=directory))
    assert directory.is_dir() and (directory / PARTIAL_DIR).is_dir()
    assert list(directory.rglob("*")) == [directory / PARTIAL_DIR]
    # Without recording nothing is checked, nor created.
    (tmp_path / "notes.txt").write_text("")
    check_record_dir(Settings(record=False, record_dir=tmp_path / "notes.txt" / "sub"))
    with pytest.raises(SettingError, match=r"^record_dir cannot be created: not a directory"):
        check_record_dir(Settings(record_dir=tmp_path / "notes.txt" / "sub"))


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory for APP modules, on the import path for this test only."""
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    ("module", "source", "message"),
    [
        ("syntaxbot", "x = 1\ndef broken(:\n", "syntaxbot.py, line 2: SyntaxError: "),
        ("raisingbot", "x = 1\nraise RuntimeError('no API key\\nsecond line')\n", "raisingbot.py, line 2: RuntimeError: no API key"),
        ("jsonbot", "import json\n\njson.loads('{')\n", "jsonbot.py, line 3: JSONDecodeError: Expecting property name"),
        ("depbot", "import callsock_missing_dependency\n", "depbot.py, line 1: ModuleNotFoundError: No module named 'callsock_missing_dependency'"),
        ("envbot", "import os\n\napp = os.environ['CALLSOCK_TEST_UNSET_KEY']\n", "envbot.py, line 3: KeyError: 'CALLSOCK_TEST_UNSET_KEY'"),
    ],
)  # fmt: skip
def test_an_app_that_fails_to_import_says_where(
    capsys: pytest.CaptureFixture[str], app_dir: Path, module: str, source: str, message: str
) -> None:
    """An APP module with a syntax error or that raises: its file and line and the message, one line."""
    (app_dir / f"{module}.py").write_text(source)
    line = serve_error(capsys, f"{module}:app")
    assert line.startswith(f"APP {module}:app: cannot import '{module}': {message}"), line
    assert "Traceback" not in line and "importlib" not in line


def test_app_problems_name_the_app_or_its_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, app_dir: Path, tmp_path: Path
) -> None:
    """A missing module, a malformed spec, a missing attribute, an object that is not an App."""
    assert serve_error(capsys, "nomodule_xyz:app") == (
        f"APP nomodule_xyz:app: cannot import 'nomodule_xyz': no module named 'nomodule_xyz' in {tmp_path} "
        "or on the Python path"
    )
    assert serve_error(capsys, "mybot") == "APP mybot: must look like module:attribute, e.g. mybot:app"
    (app_dir / "holder_q7.py").write_text("app = 42\n")
    assert serve_error(capsys, "holder_q7:bot") == (
        "APP holder_q7:bot: module 'holder_q7' has no attribute 'bot'"
    )
    assert serve_error(capsys, "holder_q7:app") == "APP holder_q7:app: names an int, not a callsock.App"
    monkeypatch.setenv("CALLSOCK_APP", "holder_q7:app")
    assert serve_error(capsys) == "CALLSOCK_APP=holder_q7:app: APP names an int, not a callsock.App"
    sys.modules.pop("holder_q7")


def test_simulate_refuses_tracks_without_a_fork(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`simulate --track both` (or outbound) needs --fork; other mistakes name their option too."""
    wav = str(write_wav(tmp_path / "hello.wav"))
    url = "ws://127.0.0.1:9/call"  # never reached: the options are refused first
    for track in ("both", "outbound"):
        assert error_line(capsys, ["simulate", url, "--audio", wav, "--track", track]) == (
            f"callsock simulate: error: --track {track} needs --fork: "
            "a bidirectional stream carries only the inbound track"
        )
    (tmp_path / "noise.wav").write_bytes(b"RIFF")
    assert error_line(capsys, ["simulate", url, "--audio", "noise.wav"]) == (
        "callsock simulate: error: --audio must be a PCM WAV file: it ends before its header does (got noise.wav)"
    )
    assert error_line(capsys, ["simulate", url, "--audio", "missing.wav"]) == (
        "callsock simulate: error: --audio cannot be read: no such file or directory (got missing.wav)"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--calls", "0"], "--calls must be at least 1 (got 0)"),
        (["--seconds", "nan"], "--seconds must be a positive number (got nan)"),
        (["--seconds", "inf"], "--seconds must be a positive number (got inf)"),
        (["--seconds", "-2"], "--seconds must be a positive number (got -2.0)"),
        (["--ramp-ms", "-1"], "--ramp-ms must be 0 or more (got -1)"),
        (["--window", "0"], "--window must be at least 1 (got 0)"),
    ],
)
def test_bench_numbers(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    """bench's numbers: nan, inf and nonsense are refused, naming the flag."""
    line = error_line(capsys, ["bench", "ws://127.0.0.1:9/call", *args])
    assert line == f"callsock bench: error: {message}"


def test_events_checks_its_redis_url(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`events` refuses a malformed --redis-url (or variable) before connecting, without showing it."""
    assert error_line(capsys, ["events", "--redis-url", "http://x"]) == (
        "callsock events: error: --redis-url must start with redis://, rediss:// or unix://, as in redis://host:6379/0"
    )
    monkeypatch.setenv("CALLSOCK_REDIS_URL", "redis//:secret@x")
    line = error_line(capsys, ["events"])
    assert line.startswith("callsock events: error: CALLSOCK_REDIS_URL: --redis-url must start with")
    assert "secret" not in line
    assert error_line(capsys, ["events", "--redis-url", "redis://127.0.0.1:9/0", "--count", "0"]) == (
        "callsock events: error: --count must be at least 1 (got 0)"
    )


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """argparse's own errors (unknown option, missing command) are one line too, without the usage."""
    assert error_line(capsys, ["serve", "--bogus"]) == "callsock: error: unrecognized arguments: --bogus"
    assert error_line(capsys, []) == "callsock: error: the following arguments are required: COMMAND"
    assert error_line(capsys, ["simulate", "ws://127.0.0.1:9/call"]) == (
        "callsock simulate: error: the following arguments are required: --audio"
    )


def test_settings_by_hand_name_their_fields() -> None:
    """From Python, Settings' errors are ValueErrors naming the field; each blames one setting."""
    cases = [
        ({"max_calls": 0}, "max_calls must be at least 1 (got 0)"),
        ({"max_calls": 1.5}, "max_calls must be a whole number (got 1.5)"),
        ({"idle_timeout": float("nan")}, "idle_timeout must be a positive number of seconds (got nan)"),
        ({"close_timeout": float("inf")}, "close_timeout must be a positive number of seconds (got inf)"),
        ({"cluster_max_calls": 2}, "cluster_max_calls needs redis_url"),
        (
            {"cluster_max_calls": 0, "redis_url": "redis://x/0"},
            "cluster_max_calls must be at least 1 (got 0)",
        ),
        ({"events_maxlen": 0}, "events_maxlen must be at least 1 (got 0)"),
        ({"registry_ttl": 1.0}, "registry_ttl must be a number of seconds, at least 3 (got 1.0)"),
        ({"require_signature": True}, "require_signature needs an auth token (auth_token)"),
        ({"ssl_keyfile": Path("key.pem")}, "ssl_keyfile needs ssl_certfile too"),
    ]
    for overrides, message in cases:
        with pytest.raises(SettingError) as caught:
            Settings(**overrides)  # type: ignore[arg-type]
        assert str(caught.value) == message
        assert isinstance(caught.value, ValueError)


def test_serve_process_refuses_before_listening(tmp_path: Path) -> None:
    """The real process: a bad --record-dir is one line on stderr, exit 2, and nothing ever listened."""
    (tmp_path / "notes.txt").write_text("")
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "callsock", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--log-format", "json", "--record-dir", "notes.txt/sub"],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("CALLSOCK_")},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        "callsock serve: error: --record-dir cannot be created: not a directory (got notes.txt/sub)\n"
    )
    assert result.stdout == ""  # no "listening" line, no log at all


def test_serve_process_names_the_variable(tmp_path: Path) -> None:
    """The real process with a bad variable and a TLS key that does not load: one line each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLSOCK_")}
    (tmp_path / "junk.pem").write_text("junk\n")
    issued = trustme.CA().issue_cert("127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    command = [sys.executable, "-m", "callsock", "serve", "--host", "127.0.0.1", "--port", str(free_port())]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env={**env, "CALLSOCK_SSL_CERTFILE": "cert.pem", "CALLSOCK_SSL_KEYFILE": "junk.pem"},
    )
    assert result.returncode == 2
    assert result.stderr == (
        "callsock serve: error: CALLSOCK_SSL_KEYFILE=junk.pem: --ssl-keyfile must be a PEM private key: "
        "no usable PEM block in it\n"
    )
    assert result.stdout == ""
