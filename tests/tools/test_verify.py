"""`callsock verify` against well and badly configured deployments on loopback."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web

from callsock.tools.verify import VERIFY_PARAMETER, Check, VerifyConfig, verify

from ..helpers import published, running_server

TOKEN = "secret-token"


def results(checks: list[Check]) -> dict[int, bool | None]:
    return {check.number: check.passed for check in checks}


@asynccontextmanager
async def fake_twiml(stream_url: str) -> AsyncIterator[str]:
    """A webhook that answers TwiML naming ``stream_url``: a misconfigured deployment."""

    async def answer(request: web.Request) -> web.Response:
        body = f'<?xml version="1.0"?><Response><Connect><Stream url="{stream_url}"/></Connect></Response>'
        return web.Response(text=body, content_type="text/xml")

    app = web.Application()
    app.router.add_route("*", "/twiml", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_all_pass_on_a_good_deployment(record_dir: Path) -> None:
    """A correctly configured server passes checks 1-6; 7 is skipped without a token."""
    async with running_server(record_dir) as server:
        checks = await verify(VerifyConfig(f"http://127.0.0.1:{server.port}"))
    assert results(checks) == {1: True, 2: True, 3: True, 4: True, 5: True, 6: True, 7: None}, checks
    assert "wss://127.0.0.1" in checks[0].detail


async def test_verify_calls_are_marked_in_their_recordings(record_dir: Path) -> None:
    """Every call verify places carries customParameters callsockVerify=1, which its recording keeps."""
    async with running_server(record_dir) as server:
        checks = await verify(VerifyConfig(f"http://127.0.0.1:{server.port}"))
    assert all(check.passed is not False for check in checks), checks
    summaries = published(record_dir)  # complete: the server has stopped, every recording is written
    # The Twilio-shaped call, the seed acknowledgement's call, and both connections of the replacement.
    assert sorted((s["dialect"], s["endReason"]) for s in summaries.values()) == [
        ("seed", "closed"),
        ("twilio", "replaced"),
        ("twilio", "stop"),
        ("twilio", "stop"),
    ]
    for summary in summaries.values():
        assert summary["customParameters"] == {"callsockVerify": "1"} == VERIFY_PARAMETER


async def test_all_pass_with_signatures(record_dir: Path) -> None:
    """With the right token every check passes, signatures included."""
    async with running_server(record_dir, auth_token=TOKEN) as server:
        checks = await verify(VerifyConfig(f"http://127.0.0.1:{server.port}", auth_token=TOKEN))
    assert all(check.passed for check in checks), checks


async def test_all_pass_over_tls(certificate: tuple[Path, Path, Path], record_dir: Path) -> None:
    """Over direct TLS, with the test CA trusted, the checks pass as on wss://."""
    cert, key, authority = certificate
    async with running_server(record_dir, ssl_certfile=cert, ssl_keyfile=key) as server:
        checks = await verify(VerifyConfig(f"https://127.0.0.1:{server.port}", cafile=authority))
    assert results(checks) == {1: True, 2: True, 3: True, 4: True, 5: True, 6: True, 7: None}, checks


async def test_wrong_path_fails_the_twiml_and_upgrade_checks(record_dir: Path) -> None:
    """TwiML pointing at a path the server does not serve fails checks 1 and 2."""
    async with running_server(record_dir) as server:
        async with fake_twiml(f"wss://127.0.0.1:{server.port}/wrong") as webhook:
            checks = await verify(VerifyConfig(webhook))
    assert results(checks)[1] is False and "does not serve" in checks[0].detail
    assert results(checks)[2] is False


async def test_query_string_fails_the_twiml_check(record_dir: Path) -> None:
    """A stream URL with a query string fails check 1 with the reason; the call checks still run."""
    async with running_server(record_dir) as server:
        async with fake_twiml(f"wss://127.0.0.1:{server.port}/call?token=abc") as webhook:
            checks = await verify(VerifyConfig(webhook))
    assert results(checks)[1] is False and "query string" in checks[0].detail
    assert results(checks)[3] is True


async def test_http_stream_url_fails_the_twiml_check(record_dir: Path) -> None:
    """A stream URL that is not wss:// fails check 1."""
    async with running_server(record_dir) as server:
        async with fake_twiml(f"ws://127.0.0.1:{server.port}/call") as webhook:
            checks = await verify(VerifyConfig(webhook))
    assert results(checks)[1] is False and "not wss://" in checks[0].detail


async def test_ack_disabled_fails_the_ack_check(record_dir: Path) -> None:
    """--start-ack never fails check 4 only."""
    async with running_server(record_dir, start_ack="never") as server:
        checks = await verify(VerifyConfig(f"http://127.0.0.1:{server.port}"))
    assert results(checks) == {1: True, 2: True, 3: True, 4: False, 5: True, 6: True, 7: None}
    assert "no acknowledgement" in checks[3].detail


async def test_unenforced_signatures_fail_check_7(record_dir: Path) -> None:
    """A server without a token accepts unsigned upgrades: check 7 fails when a token is given."""
    async with running_server(record_dir) as server:
        checks = await verify(VerifyConfig(f"http://127.0.0.1:{server.port}", auth_token=TOKEN))
    assert results(checks)[7] is False and "anyone can open" in checks[6].detail


async def test_nothing_listening(tmp_path: Path) -> None:
    """No server: check 1 fails with the error, the rest are skipped or fail, nothing raises."""
    checks = await verify(VerifyConfig("http://127.0.0.1:9"))
    assert results(checks)[1] is False and all(c.passed is not True for c in checks)


async def test_cli_verify(record_dir: Path) -> None:
    """`callsock verify --json` exits 0 on a good deployment and 1 on a bad one."""
    async with running_server(record_dir) as good, running_server(record_dir, start_ack="never") as bad:
        ok, failing = await asyncio.gather(
            asyncio.to_thread(_cli, f"http://127.0.0.1:{good.port}"),
            asyncio.to_thread(_cli, f"http://127.0.0.1:{bad.port}"),
        )
    assert ok.returncode == 0 and len(json.loads(ok.stdout)) == 7
    assert failing.returncode == 1
    assert [c["passed"] for c in json.loads(failing.stdout)][3] is False


def _cli(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callsock", "verify", url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
