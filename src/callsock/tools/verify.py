"""``callsock verify``: the seed guide's verification checklist, run against a deployment.

1. The webhook answers TwiML whose ``<Stream url>`` is ``wss://``, has no query string, and
   names a path the server serves (a plain GET there answers 426, "upgrade required").
2. The WebSocket upgrade on that URL answers 101.
3. A Twilio-shaped call (connected, start, media, stop) is accepted and ends with 1000.
4. A seed-dialect start receives the exact acknowledgement.
5. An invalid start is rejected with 1007.
6. A second connection for the same call replaces the first (which is closed with 4000).
7. With an auth token: an unsigned upgrade is refused and a signed one accepted.

Each check that fails says why. Every ``start`` the checks send carries the custom parameter
``callsockVerify`` = ``1`` (``<Parameter name="callsockVerify" value="1"/>``, arriving as
``customParameters``), so the server's recordings of these test calls can be told apart.
"""

from __future__ import annotations

import asyncio
import ssl
import xml.etree.ElementTree as ElementTree
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from ..server.twilio import signature_for
from .twilio_side import Caller, Dialect

__all__ = ["VERIFY_PARAMETER", "Check", "VerifyConfig", "verify"]

_TIMEOUT = aiohttp.ClientTimeout(total=10)
VERIFY_PARAMETER: Final = {"callsockVerify": "1"}
"""The custom parameter of every call ``callsock verify`` places."""


@dataclass(frozen=True)
class VerifyConfig:
    """What to check.

    Attributes:
        url: the deployment's base URL (``https://host``), or its webhook URL (``.../twiml``).
        stream_url: the WebSocket URL to check, instead of the one the TwiML names.
        auth_token: sign requests as Twilio does, and check that unsigned ones are refused.
        cafile: a CA certificate to trust (a self-signed deployment).
        insecure: do not check TLS certificates at all.
    """

    url: str
    stream_url: str | None = None
    auth_token: str | None = None
    cafile: Path | None = None
    insecure: bool = False


@dataclass
class Check:
    """One item of the checklist: passed, failed (with the reason), or skipped (``None``)."""

    number: int
    name: str
    passed: bool | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The check as plain data (``--json``)."""
        return asdict(self)


@dataclass
class _Run:
    config: VerifyConfig
    session: aiohttp.ClientSession
    checks: list[Check] = field(default_factory=list)
    stream_url: str | None = None
    connect_url: str | None = None
    note: str = ""

    def headers(self, url: str, signed: bool = True) -> dict[str, str]:
        headers = {"User-Agent": "Twilio.TmeWs/1.0"}
        if signed and self.config.auth_token:
            headers["X-Twilio-Signature"] = signature_for(self.config.auth_token, url, {})
        return headers


async def verify(config: VerifyConfig) -> list[Check]:
    """Run the checklist; every check runs (or is skipped when it cannot), and none raises."""
    connector = aiohttp.TCPConnector(ssl=_ssl(config))
    async with aiohttp.ClientSession(connector=connector, timeout=_TIMEOUT) as session:
        run = _Run(config, session)
        steps: list[tuple[str, Callable[[_Run], Awaitable[str]]]] = [
            ("webhook answers TwiML with a wss:// stream URL on a served path", _check_twiml),
            ("WebSocket upgrade answers 101", _check_upgrade),
            ("a Twilio-shaped call is accepted and ends with 1000", _check_twilio_call),
            ("a seed-dialect start gets the exact acknowledgement", _check_seed_ack),
            ("an invalid start is rejected with 1007", _check_invalid_start),
            ("a second connection for the same call replaces the first (4000)", _check_replacement),
            ("an unsigned upgrade is refused and a signed one accepted", _check_signatures),
        ]
        for number, (name, step) in enumerate(steps, start=1):
            check = Check(number, name)
            try:
                check.detail = await step(run)
                check.passed = True
            except _Skipped as exc:
                check.detail = str(exc)
            except _Failed as exc:
                check.passed = False
                check.detail = str(exc)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                check.passed = False
                check.detail = f"{type(exc).__name__}: {exc}"
            run.checks.append(check)
        return run.checks


class _Failed(Exception):
    pass


class _Skipped(Exception):
    pass


def _ssl(config: VerifyConfig) -> ssl.SSLContext | bool:
    if config.insecure:
        return False
    if config.cafile is not None:
        return ssl.create_default_context(cafile=str(config.cafile))
    return True


def _webhook_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.path in ("", "/"):
        return urlunsplit((parts.scheme, parts.netloc, "/twiml", parts.query, ""))
    return url


async def _check_twiml(run: _Run) -> str:
    webhook = _webhook_url(run.config.url)
    form = {"CallSid": "CA" + "0" * 32, "AccountSid": "AC" + "0" * 32, "CallStatus": "ringing"}
    headers = {}
    if run.config.auth_token:
        headers["X-Twilio-Signature"] = signature_for(run.config.auth_token, webhook, form)
    if run.config.stream_url:
        run.stream_url = run.config.stream_url
    async with run.session.post(webhook, data=form, headers=headers) as response:
        body = await response.text()
        if response.status != 200:
            raise _Failed(f"POST {webhook} answered {response.status}")
    try:
        stream = ElementTree.fromstring(body).find(".//Stream")
    except ElementTree.ParseError as exc:
        raise _Failed(f"the webhook's answer is not TwiML: {exc}") from None
    if stream is None or not stream.get("url"):
        raise _Failed("the TwiML has no <Stream url=...>")
    url = stream.get("url", "")
    run.stream_url = run.stream_url or url
    parts = urlsplit(url)
    if parts.scheme != "wss":
        raise _Failed(f"stream URL {url} is not wss:// (Twilio only dials wss, error 31922)")
    if parts.query:
        raise _Failed(f"stream URL {url} has a query string, which Twilio drops: use <Parameter>")
    probe = urlunsplit(
        ("https" if urlsplit(webhook).scheme == "https" else "http", parts.netloc, parts.path, "", "")
    )
    probe = _reachable(run, probe)
    async with run.session.get(probe) as response:
        if response.status != 426:
            raise _Failed(
                f"GET {parts.path} answered {response.status}, not 426: the server does not serve it"
            )
    return f"{url} ({'<Connect>' if body.count('<Connect>') else '<Start>'})"


def _reachable(run: _Run, url: str) -> str:
    """The URL to connect to: a plain-HTTP webhook means a local test, so TLS is dropped."""
    if urlsplit(run.config.url).scheme in ("http", "ws"):
        parts = urlsplit(url)
        scheme = {"https": "http", "wss": "ws"}.get(parts.scheme, parts.scheme)
        if scheme != parts.scheme:
            run.note = "the webhook is plain http, so the stream was reached without TLS"
        return urlunsplit((scheme, parts.netloc, parts.path, parts.query, ""))
    return url


def _target(run: _Run) -> str:
    if run.stream_url is None:
        raise _Skipped("no stream URL: the TwiML check failed and no --stream-url was given")
    return _reachable(run, run.stream_url)


async def _check_upgrade(run: _Run) -> str:
    url = _target(run)
    async with run.session.ws_connect(url, headers=run.headers(url)) as ws:
        await ws.close()
    return f"101 from {url}" + (f" ({run.note})" if run.note else "")


async def _call(
    run: _Run, messages: list[bytes], *, until: str = "close", wait: float = 5.0
) -> tuple[int | None, list[str]]:
    """Send ``messages``; return the close code (``None`` if not closed) and the texts received.

    Waits at most ``wait`` seconds for the close, or with ``until="text"`` for the first text.
    """
    url = _target(run)
    received: list[str] = []
    async with run.session.ws_connect(url, headers=run.headers(url)) as ws:
        for message in messages:
            await ws.send_str(message.decode())
        try:
            async with asyncio.timeout(wait):
                while True:
                    msg = await ws.receive()
                    if msg.type is aiohttp.WSMsgType.TEXT:
                        received.append(msg.data)
                        if until == "text":
                            return None, received
                    elif msg.type in (
                        aiohttp.WSMsgType.CLOSE,
                        aiohttp.WSMsgType.CLOSED,
                        aiohttp.WSMsgType.ERROR,
                    ):
                        return ws.close_code, received
        except TimeoutError:
            return None, received


def _caller(run: _Run, dialect: Dialect = "twilio") -> Caller:
    """A caller whose start marks the call as a test (:data:`VERIFY_PARAMETER`).

    With an auth token, the start carries the call's stream token too, as Twilio passes on the
    ``<Parameter>`` of callsock's TwiML.
    """
    return Caller(dialect=dialect, parameters=dict(VERIFY_PARAMETER), auth_token=run.config.auth_token)


async def _check_twilio_call(run: _Run) -> str:
    caller = _caller(run)
    frames = [caller.media(b"\xff" * 160) for _ in range(10)]
    code, _ = await _call(run, [caller.connected(), caller.start(), *frames, caller.stop()])
    if code != 1000:
        raise _Failed("not closed within 5 s" if code is None else f"closed with {code}, not 1000")
    return f"stream {caller.stream_sid} closed with 1000"


async def _check_seed_ack(run: _Run) -> str:
    caller = _caller(run, dialect="seed")
    _, received = await _call(run, [caller.start()], until="text", wait=2.0)
    expected = (
        '{"event":"start","protocol":"wss","version":"1.0.0",'
        f'"streamSid":"{caller.stream_sid}","tracks":[{{"id":"inbound"}}]}}'
    )
    if not received:
        raise _Failed("no acknowledgement within 2 s (is --start-ack never set?)")
    if received[0] != expected:
        raise _Failed(f"acknowledgement differs: {received[0][:160]}")
    return "exact"


async def _check_invalid_start(run: _Run) -> str:
    caller = _caller(run, dialect="seed")
    bad = caller.start().replace(b'"rate":8000', b'"rate":16000')
    code, _ = await _call(run, [bad])
    if code != 1007:
        raise _Failed("not closed within 5 s" if code is None else f"closed with {code}, not 1007")
    return "closed with 1007"


async def _check_replacement(run: _Run) -> str:
    url = _target(run)
    first, second = _caller(run), _caller(run)
    second.call_sid = first.call_sid
    async with run.session.ws_connect(url, headers=run.headers(url)) as old:
        await old.send_str(first.start().decode())
        await asyncio.sleep(0.2)
        async with run.session.ws_connect(url, headers=run.headers(url)) as new:
            await new.send_str(second.start().decode())
            try:
                async with asyncio.timeout(2):
                    while (msg := await old.receive()).type is aiohttp.WSMsgType.TEXT:
                        pass
            except TimeoutError:
                raise _Failed("the first connection was still open 2 s after the second started") from None
            await new.send_str(second.stop().decode())
        if old.close_code != 4000:
            raise _Failed(f"the first connection closed with {old.close_code}, not 4000")
        if "replaced" not in (msg.extra or ""):
            raise _Failed(f"close reason {msg.extra!r} does not say 'replaced'")
    return "first connection closed with 4000 'replaced'"


async def _check_signatures(run: _Run) -> str:
    if not run.config.auth_token:
        raise _Skipped("no --auth-token given")
    url = _target(run)
    try:
        async with run.session.ws_connect(url, headers=run.headers(url, signed=False)) as ws:
            await ws.close()
    except aiohttp.WSServerHandshakeError as exc:
        unsigned = exc.status
    else:
        raise _Failed("an unsigned upgrade was accepted: anyone can open a stream")
    async with run.session.ws_connect(url, headers=run.headers(url)) as ws:
        await ws.close()
    return f"unsigned refused with {unsigned}, signed accepted"
