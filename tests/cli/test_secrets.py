"""Secrets from files and the environment, the warning for secrets on the command line, and the
command line's checks of the security options (one line naming the flag, exit 2)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import aiohttp
import pytest

from callsock import stream_token
from callsock.cli.main import main
from callsock.server.twilio import signature_for

from ..processes import serve_process, wait_healthy

TOKEN = "secret-test-auth-token"
ADMIN = "secret-test-admin-token-0123456789"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No CALLSOCK_ variable or Twilio token from the outside; work in a fresh directory."""
    for name in list(os.environ):
        if name.startswith("CALLSOCK_") or name == "TWILIO_AUTH_TOKEN":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def serve_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """The one line `callsock serve ARGS` fails with (exit 2), without its prefix."""
    status = main(["serve", "--host", "127.0.0.1", "--port", "0", *args])
    out, err = capsys.readouterr()
    assert status == 2 and out == "" and err.count("\n") == 1, (status, out, err)
    prefix = "callsock serve: error: "
    assert err.startswith(prefix), err
    return err[len(prefix) :].rstrip("\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--auth-token-file", "missing.txt"], "--auth-token-file cannot be read: no such file or directory (got missing.txt)"),
        (["--auth-token-file", "empty.txt"], "--auth-token-file is empty (got empty.txt)"),
        (["--admin-token-file", "short.txt"], "--admin-token-file must hold at least 16 characters (got short.txt)"),
        (["--auth-token", "t", "--auth-token-file", "token.txt"], "--auth-token-file cannot be given with --auth-token or TWILIO_AUTH_TOKEN: choose one"),
        (["--admin-token", "short"], "--admin-token must be at least 16 characters"),
        (["--forwarded-allow-ips", "proxy.local"], "--forwarded-allow-ips takes IP addresses or networks separated by commas, or * (got proxy.local)"),
        (["--request-timeout", "0"], "--request-timeout must be a positive number of seconds (got 0.0)"),
        (["--max-http-connections", "0"], "--max-http-connections must be at least 1 (got 0)"),
        (["--param", "callsockToken=x"], "--param must not name callsockToken: callsock sets it"),
    ],
)  # fmt: skip
def test_security_options_are_checked(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "short.txt").write_text("tiny\n")
    (tmp_path / "token.txt").write_text(TOKEN)
    assert serve_error(capsys, *args) == message


def test_secret_variables_are_named_not_shown(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A secret from the environment is blamed by its variable, never quoted."""
    monkeypatch.setenv("CALLSOCK_ADMIN_TOKEN", "hunter2")
    assert serve_error(capsys) == "CALLSOCK_ADMIN_TOKEN: --admin-token must be at least 16 characters"
    monkeypatch.setenv("CALLSOCK_ADMIN_TOKEN_FILE", "gone.txt")
    monkeypatch.delenv("CALLSOCK_ADMIN_TOKEN")
    assert serve_error(capsys) == (
        "CALLSOCK_ADMIN_TOKEN_FILE=gone.txt: --admin-token-file cannot be read: no such file or directory"
    )


def log_lines(output: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def warnings_about_secrets(output: str) -> list[dict[str, object]]:
    return [line for line in log_lines(output) if "command line" in str(line.get("event"))]


async def test_secrets_from_files(tmp_path: Path) -> None:
    """--auth-token-file and --admin-token-file: the first line of each file is the secret; the
    webhook is checked with it, its TwiML carries the token, /calls wants the admin token; and no
    warning, as nothing secret is on the command line."""
    (tmp_path / "auth").write_text(TOKEN + "\n")
    (tmp_path / "admin").write_text(ADMIN + "\n# a comment line\n")
    form = {"CallSid": "CA" + "1" * 32}
    args = ("--auth-token-file", str(tmp_path / "auth"), "--admin-token-file", str(tmp_path / "admin"))
    with serve_process(tmp_path / "rec", *args, "--require-signature") as (process, port):
        await wait_healthy(port, process=process)
        url = f"http://127.0.0.1:{port}/twiml"
        async with aiohttp.ClientSession() as client:
            headers = {"X-Twilio-Signature": signature_for(TOKEN, url, form)}
            async with client.post(url, data=form, headers=headers) as response:
                assert response.status == 200
                assert stream_token(TOKEN, form["CallSid"]) in await response.text()
            calls = f"http://127.0.0.1:{port}/calls"
            async with client.get(calls) as response:
                assert response.status == 401
            async with client.get(calls, headers={"Authorization": f"Bearer {ADMIN}"}) as response:
                assert response.status == 200
        process.terminate()
        output, _ = process.communicate(timeout=20)
    assert warnings_about_secrets(output) == []
    assert TOKEN not in output and ADMIN not in output


@pytest.mark.parametrize("where", ["command line", "environment"])
async def test_secrets_on_the_command_line_are_warned_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A secret given as a flag is visible to every user in `ps`: the log says so at start, naming
    the flags (never the values); the same secrets from variables get no warning."""
    flags: list[str] = []
    if where == "command line":
        flags = ["--auth-token", TOKEN, "--admin-token", ADMIN]
    else:
        monkeypatch.setenv("CALLSOCK_AUTH_TOKEN", TOKEN)
        monkeypatch.setenv("CALLSOCK_ADMIN_TOKEN", ADMIN)
    with serve_process(tmp_path / "rec", *flags) as (process, port):
        await wait_healthy(port, process=process)
        process.terminate()
        output, _ = process.communicate(timeout=20)
    warnings = warnings_about_secrets(output)
    if where == "command line":
        assert [w["options"] for w in warnings] == [["--auth-token", "--admin-token"]]
        assert warnings[0]["level"] == "warning"
    else:
        assert warnings == []
    assert TOKEN not in output and ADMIN not in output
