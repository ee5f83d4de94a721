"""The command line: options, environment variables, APP loading, and `serve` as a real process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from callsock.cli.main import load_app, main
from callsock.protocol.errors import ConfigurationError

from ..helpers import receive_close, sid, stop, twilio_start
from ..processes import free_port, wait_healthy


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callsock", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def test_help_names_every_option_and_its_variable() -> None:
    """`serve --help` explains each option and its CALLSOCK_ variable."""
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    for option in ("--host", "--port", "--path", "--record-dir", "--no-record", "--start-ack", "--max-calls",
                   "--buffer-bytes", "--log-format", "--log-level"):  # fmt: skip
        assert option in result.stdout
        assert "CALLSOCK_" + option[2:].upper().replace("-", "_") in result.stdout
    assert "(default: 8081)" in result.stdout and "(default: /call)" in result.stdout


def test_version() -> None:
    """`python -m callsock --version` prints the version."""
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("callsock ")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CALLSOCK_PORT": "eighty"}, "CALLSOCK_PORT=eighty: --port takes a whole number"),
        ({"CALLSOCK_MAX_CALLS": "0"}, "CALLSOCK_MAX_CALLS=0: --max-calls must be at least 1"),
        ({"CALLSOCK_REQUIRE_SIGNATURE": "1", "TWILIO_AUTH_TOKEN": "", "CALLSOCK_AUTH_TOKEN": ""},
         "CALLSOCK_REQUIRE_SIGNATURE=1: --require-signature needs an auth token (--auth-token or TWILIO_AUTH_TOKEN)"),
    ],
)  # fmt: skip
def test_bad_environment_is_a_clear_error(tmp_path: Path, env: dict[str, str], message: str) -> None:
    """A bad CALLSOCK_ variable stops the real process with exit 2 and one line naming it.

    (Every variable and option is covered in-process by tests/test_cli_errors.py.)
    """
    port = () if "CALLSOCK_PORT" in env else ("--port", "0")
    result = run_cli("serve", "--host", "127.0.0.1", *port, env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"callsock serve: error: {message}\n"
    assert result.stdout == ""


def test_load_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """APP is module:attribute, imported from the working directory."""
    (tmp_path / "mybot.py").write_text("class Holder:\n    app = object()\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    app = load_app("mybot:Holder.app")
    assert app is sys.modules["mybot"].Holder.app
    for spec, message in [("mybot", "must look like module:attribute"),
                          ("nomodule_xyz:app", "cannot import 'nomodule_xyz': no module named"),
                          ("mybot:missing", "module 'mybot' has no attribute 'missing'")]:  # fmt: skip
        with pytest.raises(ConfigurationError, match=message):
            load_app(spec)


def test_serve_with_bad_app_exits_2(tmp_path: Path) -> None:
    """`serve` with an APP that does not load, or is not an App, exits 2 before listening."""
    result = run_cli("serve", "nomodule_xyz:app", "--port", str(free_port()), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(
        "callsock serve: error: APP nomodule_xyz:app: cannot import 'nomodule_xyz'"
    )
    (tmp_path / "notapp.py").write_text("app = object()\n")
    result = run_cli("serve", "notapp:app", "--port", str(free_port()), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "callsock serve: error: APP notapp:app: names an object, not a callsock.App\n"


def test_main_returns_status_in_process(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """main() returns 2 for a bad environment without raising."""
    monkeypatch.setenv("CALLSOCK_START_ACK", "bogus")
    assert main(["serve"]) == 2
    assert capsys.readouterr().err == (
        "callsock serve: error: CALLSOCK_START_ACK=bogus: --start-ack takes one of auto, always, never\n"
    )


def test_a_bad_variable_only_matters_when_it_is_used(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flag wins over its variable, even a bad one; other commands ignore serve's variables."""
    monkeypatch.setenv("CALLSOCK_START_ACK", "bogus")
    monkeypatch.setenv("CALLSOCK_PORT", "eighty")
    assert main(["serve", "--start-ack", "always", "--port", "70000"]) == 2
    assert capsys.readouterr().err == "callsock serve: error: --port must be from 0 to 65535 (got 70000)\n"
    assert main(["bench", "ws://127.0.0.1:9/call", "--calls", "0"]) == 2
    assert capsys.readouterr().err == "callsock bench: error: --calls must be at least 1 (got 0)\n"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[int, Path, subprocess.Popen[str]]]:
    """`callsock serve` as a real process, configured through the environment, with an APP."""
    port = free_port()
    (tmp_path / "userapp.py").write_text("from callsock import App\n\napp = App()\n")
    record_dir = tmp_path / "rec"
    env = {
        **os.environ,
        "CALLSOCK_PORT": str(port),
        "CALLSOCK_HOST": "127.0.0.1",
        "CALLSOCK_PATH": "/media",
        "CALLSOCK_RECORD_DIR": str(record_dir),
        "CALLSOCK_LOG_FORMAT": "json",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "callsock", "serve", "userapp:app"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield port, record_dir, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


async def test_serve_process_end_to_end(served: tuple[int, Path, subprocess.Popen[str]]) -> None:
    """The real `serve` process answers /health, records a call and exits 0 on SIGTERM."""
    port, record_dir, process = served
    stream_sid = sid("MZ", 60)
    async with aiohttp.ClientSession() as client:
        await wait_healthy(port)
        async with client.ws_connect(f"ws://127.0.0.1:{port}/media") as ws:
            await ws.send_str(twilio_start(stream_sid))
            await ws.send_str(stop(stream_sid))
            assert (await receive_close(ws))[0] == 1000
    assert (record_dir / ("CA" + stream_sid[2:]) / f"{stream_sid}.json").exists()
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=15)
    assert process.returncode == 0
    assert '"event": "listening"' in output and '"event": "stopped"' in output


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    """A port already taken ends `serve` with exit 1 and says so."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--host", "127.0.0.1", "--port", str(port), cwd=tmp_path)
    assert result.returncode == 1
    assert "cannot listen on 127.0.0.1" in result.stderr


def test_bad_greeting_is_a_clear_error(tmp_path: Path) -> None:
    """--greeting with a file that is not a PCM WAV exits 2 and names the file."""
    bogus = tmp_path / "hello.wav"
    bogus.write_text("not audio")
    result = run_cli("serve", "--greeting", str(bogus), "--port", str(free_port()), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        f"callsock serve: error: --greeting must be a PCM WAV file: file does not start with RIFF id (got {bogus})\n"
    )
    assert result.stdout == ""
