"""TwiML webhook, stream status callbacks and Twilio signatures, against the real server."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

import aiohttp
import pytest
import structlog

from callsock.settings import Settings
from callsock.signatures import signature_for

from .helpers import http_url, receive_close, running_server, sid, stop, twilio_start, ws_url

TOKEN = "12345"


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
