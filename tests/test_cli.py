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

from callsock.cli import load_app, main
from callsock.errors import ConfigurationError

from .helpers import receive_close, sid, stop, twilio_start
from .processes import free_port, wait_healthy


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
        ({"CALLSOCK_PORT": "eighty"}, "invalid int value"),
        ({"CALLSOCK_START_ACK": "sometimes"}, "CALLSOCK_START_ACK"),
        ({"CALLSOCK_NO_RECORD": "maybe"}, "CALLSOCK_NO_RECORD"),
        ({"CALLSOCK_PATH": "call"}, "path must start with '/'"),
        ({"CALLSOCK_MAX_CALLS": "0"}, "max_calls"),
        ({"CALLSOCK_REQUIRE_SIGNATURE": "1", "TWILIO_AUTH_TOKEN": ""}, "needs an auth token"),
        ({"CALLSOCK_PUBLIC_URL": "https://x.test/?a=1"}, "query string"),
        ({"CALLSOCK_PARAM": "novalue"}, "--param takes KEY=VALUE"),
    ],
)
def test_bad_environment_is_a_clear_error(env: dict[str, str], message: str) -> None:
    """A bad CALLSOCK_ variable stops the command with exit 2 and names the problem."""
    result = run_cli("serve", env=env)
    assert result.returncode == 2
    assert message in result.stderr


def test_load_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """APP is module:attribute, imported from the working directory."""
    (tmp_path / "mybot.py").write_text("class Holder:\n    app = object()\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    app = load_app("mybot:Holder.app")
    assert app is sys.modules["mybot"].Holder.app
    for spec, message in [("mybot", "module:attribute"), ("nomodule_xyz:app", "cannot import"),
                          ("mybot:missing", "no attribute")]:  # fmt: skip
        with pytest.raises(ConfigurationError, match=message):
            load_app(spec)


def test_serve_with_bad_app_exits_2(tmp_path: Path) -> None:
    """`serve` with an APP that does not load, or is not an App, exits 2 before listening."""
    result = run_cli("serve", "nomodule_xyz:app", "--port", str(free_port()), cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot import 'nomodule_xyz'" in result.stderr
    (tmp_path / "notapp.py").write_text("app = object()\n")
    result = run_cli("serve", "notapp:app", "--port", str(free_port()), cwd=tmp_path)
    assert result.returncode == 2
    assert "notapp:app is a object, not a callsock.App" in result.stderr


def test_main_returns_status_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    """main() returns 2 for a bad environment without raising."""
    os.environ["CALLSOCK_START_ACK"] = "bogus"
    try:
        assert main(["serve"]) == 2
    finally:
        del os.environ["CALLSOCK_START_ACK"]
    assert "choose from auto, always, never" in capsys.readouterr().err


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
    assert "hello.wav: not a PCM WAV file" in result.stderr
