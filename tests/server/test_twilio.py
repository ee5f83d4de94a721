"""TwiML webhook, stream status callbacks and Twilio signatures, against the real server."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import aiohttp
import pytest
import structlog

from callsock import stream_token
from callsock.observability.logs import MAX_LOGGED_CHARS, clip
from callsock.server.settings import SettingError, Settings
from callsock.server.twilio import signature_for

from ..helpers import (
    ACCOUNT,
    WAIT_SECONDS,
    http_url,
    receive_close,
    running_server,
    sid,
    stop,
    twilio_start,
    ws_url,
)

TOKEN = "12345"
ADMIN = "admin-token-of-at-least-16-characters"


def stream_of(twiml: str) -> ElementTree.Element:
    stream = ElementTree.fromstring(twiml).find(".//Stream")
    assert stream is not None
    return stream


def test_twilio_documented_signature_vector() -> None:
    """The signature helper reproduces Twilio's documented test vector."""
    params = {
        "CallSid": "CA1234567890ABCDE",
        "Caller": "+14158675309",
        "Digits": "1234",
        "From": "+14158675309",
        "To": "+18005551212",
    }
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    assert signature_for(TOKEN, url, params) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="


async def test_twiml_connect_stream(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """POST /twiml answers <Connect><Stream url="wss://host/path"> with the configured parameters."""
    async with running_server(
        record_dir, parameters=(("tenant", "acme"), ("lang", "en")), status_callback="https://x.test/status"
    ) as server:
        async with client.post(http_url(server, "/twiml"), data={"CallSid": "CA1"}) as response:
            assert response.status == 200
            assert response.content_type == "text/xml"
            body = await response.text()
    root = ElementTree.fromstring(body)
    assert root.tag == "Response" and root[0].tag == "Connect"
    stream = stream_of(body)
    assert stream.get("url") == f"wss://127.0.0.1:{server.port}/call"
    assert stream.get("statusCallback") == "https://x.test/status"
    assert [(p.get("name"), p.get("value")) for p in stream.findall("Parameter")] == [
        ("tenant", "acme"),
        ("lang", "en"),
    ]


async def test_twiml_uses_forwarded_host_then_public_url(
    client: aiohttp.ClientSession, record_dir: Path
) -> None:
    """The stream URL follows X-Forwarded-Host, and --public-url over it; always wss://, no query."""
    headers = {"X-Forwarded-Host": "abc.ngrok.app", "X-Forwarded-Proto": "https"}
    async with running_server(record_dir, path="/media") as server:
        async with client.get(http_url(server, "/twiml?x=1"), headers=headers) as response:
            assert stream_of(await response.text()).get("url") == "wss://abc.ngrok.app/media"
    async with running_server(record_dir, public_url="https://voice.example.com/app/") as server:
        async with client.get(http_url(server, "/twiml"), headers=headers) as response:
            assert stream_of(await response.text()).get("url") == "wss://voice.example.com/app/call"


async def test_twiml_fork_with_pause(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """--stream-mode start gives <Start><Stream track=...> then a <Pause> that keeps the call up."""
    async with running_server(
        record_dir, stream_mode="start", track="both_tracks", pause_seconds=120
    ) as server:
        async with client.post(http_url(server, "/twiml")) as response:
            root = ElementTree.fromstring(await response.text())
    assert [child.tag for child in root] == ["Start", "Pause"]
    assert root[0][0].get("track") == "both_tracks"
    assert root[1].get("length") == "120"


def test_public_url_must_not_have_a_query() -> None:
    """A public URL with a query string is refused: Twilio would drop it."""
    with pytest.raises(ValueError, match="query string"):
        Settings(public_url="https://host.test/?token=1")
    with pytest.raises(ValueError, match="auth token"):
        Settings(require_signature=True)


async def test_stream_status_callback(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """POST /stream-status is logged and counted by event."""
    form = {"CallSid": "CA1", "StreamSid": "MZ1", "StreamEvent": "stream-error", "StreamError": "31920"}
    with structlog.testing.capture_logs() as logs:
        async with running_server(record_dir) as server:
            async with client.post(http_url(server, "/stream-status"), data=form) as response:
                assert response.status == 204
            async with client.get(http_url(server, "/metrics")) as response:
                metrics = await response.text()
    assert 'callsock_stream_status_total{event="stream-error"} 1.0' in metrics
    [line] = [line for line in logs if line["event"] == "stream status"]
    assert line["streamError"] == "31920" and line["log_level"] == "error"


async def test_webhook_signatures(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """With a token, the webhook needs a valid signature over its URL and form: else 403."""
    form = {"CallSid": "CA1", "From": "+15550001"}
    with structlog.testing.capture_logs() as logs:
        async with running_server(record_dir, auth_token=TOKEN) as server:
            url = http_url(server, "/twiml")
            good = signature_for(TOKEN, url, form)
            async with client.post(url, data=form, headers={"X-Twilio-Signature": good}) as response:
                assert response.status == 200
            async with client.post(url, data=form, headers={"X-Twilio-Signature": "bad"}) as response:
                assert response.status == 403
            async with client.post(
                url, data={**form, "From": "+1999"}, headers={"X-Twilio-Signature": good}
            ) as r:
                assert r.status == 403
            async with client.post(url, data=form) as response:
                assert response.status == 403
            async with client.get(http_url(server, "/metrics")) as response:
                metrics = await response.text()
    assert 'callsock_signature_rejections_total{route="webhook"} 3.0' in metrics
    refusals = [line for line in logs if line["event"].startswith("request refused")]
    assert len(refusals) == 3 and good not in str(logs)


async def test_upgrade_signatures(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """The upgrade must be signed over the ws(s) URL with no parameters; else 403 before any WebSocket."""
    async with running_server(record_dir, auth_token=TOKEN) as server:
        url = ws_url(server)
        for headers in ({}, {"X-Twilio-Signature": signature_for(TOKEN, url + "x", {})}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await client.ws_connect(url, headers=headers)
            assert refused.value.status == 403
        async with client.ws_connect(
            url, headers={"X-Twilio-Signature": signature_for(TOKEN, url, {})}
        ) as ws:
            await ws.send_str(twilio_start(sid("MZ", 1)))
            await ws.send_str(stop(sid("MZ", 1)))
            assert (await receive_close(ws))[0] == 1000
        # Twilio signs the wss:// URL it dialed; a plain-HTTP hop behind it does not change that.
        wss = url.replace("ws://", "wss://")
        async with client.ws_connect(
            url, headers={"X-Twilio-Signature": signature_for(TOKEN, wss, {})}
        ) as ws:
            await ws.close()


async def test_upgrade_signature_behind_a_proxy(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """Behind a TLS proxy the signed URL is wss://<forwarded host><path>, with or without its port."""
    async with running_server(record_dir, auth_token=TOKEN) as server:
        url = ws_url(server)
        for signed in ("wss://voice.example.com/call", "wss://voice.example.com:443/call"):
            headers = {
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "voice.example.com",
                "X-Twilio-Signature": signature_for(TOKEN, signed, {}),
            }
            async with client.ws_connect(url, headers=headers) as ws:
                await ws.close()
        headers = {
            "X-Forwarded-Host": "voice.example.com",
            "X-Twilio-Signature": signature_for(TOKEN, url, {}),
        }
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await client.ws_connect(url, headers=headers)  # signed for the local host, not the public one


async def test_public_url_for_signatures(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """With --public-url, the URL Twilio signed is the public one, whatever the request's Host."""
    async with running_server(record_dir, auth_token=TOKEN, public_url="https://voice.example.com") as server:
        signature = signature_for(TOKEN, "wss://voice.example.com/call", {})
        async with client.ws_connect(ws_url(server), headers={"X-Twilio-Signature": signature}) as ws:
            await ws.close()


async def test_no_token_warns_at_start(record_dir: Path) -> None:
    """Without a token the server starts, but says that anyone can connect."""
    with structlog.testing.capture_logs() as logs:
        async with running_server(record_dir):
            pass
    assert any("anyone can connect" in line["event"] for line in logs)


def parameters_of(twiml: str) -> dict[str, str | None]:
    return {p.get("name") or "": p.get("value") for p in stream_of(twiml).findall("Parameter")}


async def test_twiml_carries_the_calls_stream_token(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """With a token, the TwiML of a signed webhook gives the stream the call's stream token
    (POST form or GET query); without a token, or without a CallSid, there is none."""
    form = {"CallSid": sid("CA", 5), "AccountSid": ACCOUNT}
    async with running_server(record_dir, auth_token=TOKEN, parameters=(("tenant", "acme"),)) as server:
        url = http_url(server, "/twiml")
        signed = {"X-Twilio-Signature": signature_for(TOKEN, url, form)}
        async with client.post(url, data=form, headers=signed) as response:
            posted = parameters_of(await response.text())
        query = f"{url}?CallSid={sid('CA', 6)}"
        async with client.get(query, headers={"X-Twilio-Signature": signature_for(TOKEN, query, {})}) as r:
            got = parameters_of(await r.text())
        async with client.post(url, headers={"X-Twilio-Signature": signature_for(TOKEN, url, {})}) as r:
            anonymous = parameters_of(await r.text())
    assert posted == {"tenant": "acme", "callsockToken": stream_token(TOKEN, sid("CA", 5))}
    assert got == {"tenant": "acme", "callsockToken": stream_token(TOKEN, sid("CA", 6))}
    assert anonymous == {"tenant": "acme"}
    async with running_server(record_dir) as server:
        async with client.post(http_url(server, "/twiml"), data=form) as response:
            assert parameters_of(await response.text()) == {}


async def test_forwarding_headers_count_only_from_trusted_proxies(
    client: aiohttp.ClientSession, record_dir: Path
) -> None:
    """X-Forwarded-Host/-Proto from a peer outside --forwarded-allow-ips are ignored, for the TwiML
    and for signatures alike; `*` trusts every peer."""
    forwarded = {"X-Forwarded-Host": "voice.example.com", "X-Forwarded-Proto": "https"}
    async with running_server(record_dir, auth_token=TOKEN, forwarded_allow_ips="10.0.0.0/8") as server:
        url = http_url(server, "/twiml")
        as_proxied = {
            **forwarded,
            "X-Twilio-Signature": signature_for(TOKEN, "https://voice.example.com/twiml", {}),
        }
        async with client.post(url, headers=as_proxied) as response:
            assert response.status == 403  # signed for a host that an untrusted peer named
        local = {**forwarded, "X-Twilio-Signature": signature_for(TOKEN, url, {})}
        async with client.post(url, headers=local) as response:
            assert stream_of(await response.text()).get("url") == f"wss://127.0.0.1:{server.port}/call"
        upgrade = {
            **forwarded,
            "X-Twilio-Signature": signature_for(TOKEN, "wss://voice.example.com/call", {}),
        }
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await client.ws_connect(ws_url(server), headers=upgrade)
    async with running_server(record_dir, forwarded_allow_ips="*") as server:
        async with client.post(http_url(server, "/twiml"), headers=forwarded) as response:
            assert stream_of(await response.text()).get("url") == "wss://voice.example.com/call"


async def test_public_url_alone_is_signed(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """With --public-url, a signature over the URL the headers name is refused: only the public URL counts."""
    async with running_server(record_dir, auth_token=TOKEN, public_url="https://voice.example.com") as server:
        for signed_url in (ws_url(server), "wss://other.example.com/call"):
            headers = {
                "X-Forwarded-Host": "other.example.com",
                "X-Twilio-Signature": signature_for(TOKEN, signed_url, {}),
            }
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await client.ws_connect(ws_url(server), headers=headers)
            assert refused.value.status == 403
        url = http_url(server, "/twiml")
        for signed_url, status in ((url, 403), ("https://voice.example.com/twiml", 200)):
            headers = {"X-Twilio-Signature": signature_for(TOKEN, signed_url, {})}
            async with client.post(url, headers=headers) as response:
                assert response.status == status


async def raw_status(port: int | None, request: bytes) -> int:
    """The status of the server's answer to a raw request."""
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n"), WAIT_SECONDS)
    finally:
        writer.close()
    return int(head.split()[1])


@pytest.mark.parametrize(
    "host",
    [b"evil.example.com/path", b"evil.example.com?q=1", b"evil.example.com#f", b"user@evil.example.com",
     b"evil.example.com:99999", b"evil.example.com:80x", b"ex\xc3\xa4mple.com", b"a..b", b"[::zz]", b"",
     b"evil.example.com:443 extra"],
)  # fmt: skip
async def test_unusable_hosts_get_400(record_dir: Path, host: bytes) -> None:
    """A Host (or a trusted proxy's X-Forwarded-Host) that is not host[:port] never reaches a URL: 400."""
    async with running_server(record_dir) as server:
        headers = [b"Host: " + host]
        if host:  # an empty X-Forwarded-Host is no X-Forwarded-Host
            headers.append(b"Host: 127.0.0.1\r\nX-Forwarded-Host: " + host)
        for header in headers:
            request = b"POST /twiml HTTP/1.1\r\n" + header + b"\r\nContent-Length: 0\r\n\r\n"
            assert await raw_status(server.port, request) == 400, header


async def test_usable_hosts_are_kept(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """Names, IPv4 and IPv6 addresses, with or without a port, make the stream URL as given."""
    async with running_server(record_dir) as server:
        for host in (
            "voice.example.com",
            "voice.example.com:8443",
            "10.1.2.3:80",
            "[2001:db8::1]:443",
            "my_host",
        ):
            async with client.post(http_url(server, "/twiml"), headers={"Host": host}) as response:
                assert stream_of(await response.text()).get("url") == f"wss://{host}/call"


async def test_junk_webhooks_get_400_without_a_traceback(
    client: aiohttp.ClientSession, record_dir: Path
) -> None:
    """Bodies and queries that are not Twilio's form get 400 from both webhooks, and no traceback."""
    junk = [
        ({"Content-Type": "application/x-www-form-urlencoded"}, b"CallSid=\xff"),
        ({"Content-Type": "multipart/form-data; boundary=b"}, b"--b\r\nbroken"),
        ({"Content-Type": "text/plain"}, b"CallSid=CA1"),
    ]
    with structlog.testing.capture_logs() as logs:
        async with running_server(record_dir) as server:
            for route in ("/twiml", "/stream-status"):
                for headers, body in junk:
                    async with client.post(http_url(server, route), data=body, headers=headers) as response:
                        assert response.status == 400, (route, body)
            async with client.get(http_url(server, "/twiml?CallSid=%ff")) as response:
                assert response.status == 400
            async with client.get(http_url(server, "/metrics")) as response:
                metrics = await response.text()
    assert 'callsock_http_rejections_total{reason="bad-form"} 7.0' in metrics
    assert not [line for line in logs if "exc_info" in line or "exception" in line]


async def test_unknown_stream_events_count_as_other(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """callsock_stream_status_total takes Twilio's three StreamEvent values; anything else is `other`,
    and what the client sent is logged cut short."""
    with structlog.testing.capture_logs() as logs:
        async with running_server(record_dir) as server:
            for event in (
                "stream-started",
                "stream-stopped",
                "Stream-Started",
                "x" * 5000,
                "",
                "stream-error",
            ):
                form = (
                    {"StreamEvent": event, "StreamError": "e\n" * 1500, "CallSid": "C" * 5000}
                    if event
                    else {}
                )
                async with client.post(http_url(server, "/stream-status"), data=form) as response:
                    assert response.status == 204
            async with client.get(http_url(server, "/metrics")) as response:
                metrics = await response.text()
    series = sorted(line for line in metrics.splitlines() if line.startswith("callsock_stream_status_total{"))
    assert series == [
        'callsock_stream_status_total{event="other"} 3.0',
        'callsock_stream_status_total{event="stream-error"} 1.0',
        'callsock_stream_status_total{event="stream-started"} 1.0',
        'callsock_stream_status_total{event="stream-stopped"} 1.0',
    ]
    [line] = [line for line in logs if line["event"] == "stream status"]  # errors: the level tests log
    assert len(line["streamError"]) <= MAX_LOGGED_CHARS + 20 and "\n" not in line["streamError"]
    assert len(line["callSid"]) <= MAX_LOGGED_CHARS + 20


async def test_calls_is_open_without_a_token(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """Without an auth token /calls answers anyone, as a server that checks no signature hides
    nothing; an admin token, when set, is required all the same."""
    relayed = {"X-Forwarded-For": "203.0.113.9"}
    async with running_server(record_dir) as server:
        async with client.get(http_url(server, "/calls"), headers=relayed) as response:
            assert response.status == 200
    async with running_server(record_dir, admin_token=ADMIN) as server:
        async with client.get(http_url(server, "/calls")) as response:
            assert response.status == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
        for scheme in ("Bearer", "bearer"):
            headers = {"Authorization": f"{scheme} {ADMIN}"}
            async with client.get(http_url(server, "/calls"), headers=headers) as response:
                assert response.status == 200
        async with client.get(http_url(server, "/calls"), headers={"Authorization": f"Basic {ADMIN}"}) as r:
            assert r.status == 401


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"parameters": (("callsockToken", "x"),)}, "parameters must not name callsockToken: callsock sets it"),
        ({"forwarded_allow_ips": "10.0.0.1, proxy.local"}, "forwarded_allow_ips takes IP addresses or networks"),
        ({"forwarded_allow_ips": "*,10.0.0.1"}, "forwarded_allow_ips takes IP addresses or networks"),
        ({"request_timeout": 0}, "request_timeout must be a positive number of seconds (got 0)"),
        ({"max_http_connections": 0}, "max_http_connections must be at least 1 (got 0)"),
        ({"admin_token": "short"}, "admin_token must be at least 16 characters"),
        ({"auth_token": "t", "auth_token_file": Path("t")}, "auth_token_file cannot be given with auth_token"),
        ({"admin_token": ADMIN, "admin_token_file": Path("t")}, "admin_token_file cannot be given with admin_token"),
    ],
)  # fmt: skip
def test_security_settings_are_checked(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(SettingError) as error:
        Settings(**overrides)  # type: ignore[arg-type]
    assert str(error.value).startswith(message)
    assert ADMIN not in str(error.value)


def test_forwarded_allow_ips_takes_addresses_and_networks() -> None:
    """uvicorn's convention: addresses or networks separated by commas, or `*` for every peer."""
    assert Settings(forwarded_allow_ips="*").forwarded_allow_ips == "*"
    for allowed in ("127.0.0.1", "10.0.0.0/8, ::1", "192.168.1.7,fd00::/8"):
        assert Settings(forwarded_allow_ips=allowed).forwarded_allow_ips == allowed


def test_clip_bounds_and_escapes_client_strings() -> None:
    """What a client sent is logged at most MAX_LOGGED_CHARS long, control characters escaped."""
    assert clip(None) is None
    assert clip("CA123") == "CA123"
    assert clip("a\nb\x1b[31m") == "a\\nb\\x1b[31m"
    long = clip("x" * 10_000)
    assert long is not None and long.startswith("x" * MAX_LOGGED_CHARS) and long.endswith("(10000 chars)")
    assert len(clip("\x00" * 10_000) or "") <= MAX_LOGGED_CHARS + 20
