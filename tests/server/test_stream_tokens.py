"""Stream tokens: a stream proves the call it claims, so only that call's stream can take it over."""

from __future__ import annotations

import base64
import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import aiohttp
import pytest
from twilio.twiml.voice_response import Connect, VoiceResponse

from callsock import stream_token
from callsock.server.twilio import signature_for

from ..helpers import (
    TwilioPeer,
    eventually,
    receive_close,
    running_server,
    seed_start,
    sid,
    stop,
    twilio_start,
    ws_url,
)

TOKEN = "stream-token-test-auth-token"


def test_the_token_is_an_hmac_of_the_call() -> None:
    """43 characters of base64url, the same for the same call and token, different otherwise, and
    never a Twilio signature (28 characters of base64)."""
    token = stream_token(TOKEN, sid("CA", 1))
    assert token == stream_token(TOKEN, sid("CA", 1))
    assert len(token) == 43 and len(base64.urlsafe_b64decode(token + "=")) == 32
    assert token != stream_token(TOKEN, sid("CA", 2))
    assert token != stream_token(TOKEN + "x", sid("CA", 1))
    assert token != signature_for(TOKEN, sid("CA", 1), {})


def test_own_twiml_as_the_readme_shows() -> None:
    """The README's example for users who write their TwiML themselves gives the parameter callsock checks."""
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url="wss://voice.example.com/call")
    stream.parameter(name="callsockToken", value=stream_token(TOKEN, sid("CA", 3)))
    response.append(connect)
    parameter = ElementTree.fromstring(str(response)).find(".//Parameter")
    assert parameter is not None
    assert parameter.attrib == {"name": "callsockToken", "value": stream_token(TOKEN, sid("CA", 3))}


def signed(url: str) -> dict[str, str]:
    return {"X-Twilio-Signature": signature_for(TOKEN, url, {})}


def proven(call_sid: str) -> dict[str, str]:
    return {"callsockToken": stream_token(TOKEN, call_sid)}


async def test_the_calls_own_token_replaces_it(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """Twilio reconnecting a call (its start with the call's token) replaces the connection: 4000,
    whether the old one proved the call or not."""
    async with running_server(record_dir, auth_token=TOKEN) as server:
        url = ws_url(server)
        for old_params in (proven(sid("CA", 4)), {}):
            async with client.ws_connect(url, headers=signed(url)) as old:
                first = TwilioPeer(old, sid("MZ", 4), sid("CA", 4))
                await first.start(params=old_params)
                await eventually(lambda: server.hub.registry.holder(sid("CA", 4)) is not None)
                async with client.ws_connect(url, headers=signed(url)) as new:
                    second = TwilioPeer(new, sid("MZ", 5), sid("CA", 4))
                    await second.start(params=proven(sid("CA", 4)))
                    code, reason = await receive_close(old)
                    assert (code, "replaced" in reason) == (4000, True)
                    await second.stop()
                    assert (await receive_close(new))[0] == 1000


async def test_require_signature_makes_the_token_mandatory(
    client: aiohttp.ClientSession, record_dir: Path
) -> None:
    """With --require-signature every start needs its call's token: without one, or in the seed
    dialect (no callSid to prove), 1008 and no recording; with it, the call goes through."""
    async with running_server(record_dir, auth_token=TOKEN, require_signature=True) as server:
        url = ws_url(server)
        for start in (twilio_start(sid("MZ", 6)), seed_start(sid("MZ", 7))):
            async with client.ws_connect(url, headers=signed(url)) as ws:
                await ws.send_str(start)
                code, reason = await receive_close(ws)
                assert code == 1008 and "stream token" in reason
        async with client.ws_connect(url, headers=signed(url)) as ws:
            await ws.send_str(twilio_start(sid("MZ", 8), params=proven(sid("CA", 8))))
            await ws.send_str(stop(sid("MZ", 8)))
            assert (await receive_close(ws))[0] == 1000
    # A refused start leaves nothing behind: no files under the callSid it named.
    summaries = [json.loads(p.read_text()) for p in record_dir.glob("*/*.json")]
    assert [(s["streamSid"], s["error"]) for s in summaries] == [(sid("MZ", 8), None)]


async def test_without_a_token_starts_need_no_proof(client: aiohttp.ClientSession, record_dir: Path) -> None:
    """A server without an auth token binds nothing: any start is accepted and the newest connection
    of a call replaces the older one, as before stream tokens."""
    async with running_server(record_dir) as server:
        url = ws_url(server)
        async with client.ws_connect(url) as old:
            await old.send_str(twilio_start(sid("MZ", 9), sid("CA", 9)))
            await eventually(lambda: server.hub.registry.holder(sid("CA", 9)) is not None)
            async with client.ws_connect(url) as new:
                await new.send_str(
                    twilio_start(sid("MZ", 10), sid("CA", 9), params={"callsockToken": "junk"})
                )
                assert (await receive_close(old))[0] == 4000
                await new.send_str(stop(sid("MZ", 10)))
                assert (await receive_close(new))[0] == 1000


@pytest.mark.parametrize("dialect", ["twilio", "seed"])
async def test_a_start_with_no_token_is_accepted_when_not_required(
    client: aiohttp.ClientSession, record_dir: Path, dialect: str
) -> None:
    """With an auth token but no --require-signature, a call whose TwiML has no token still works."""
    start = twilio_start(sid("MZ", 11)) if dialect == "twilio" else seed_start(sid("MZ", 11))
    async with running_server(record_dir, auth_token=TOKEN) as server:
        url = ws_url(server)
        async with client.ws_connect(url, headers=signed(url)) as ws:
            await ws.send_str(start)
            await ws.send_str(stop(sid("MZ", 11)))
            assert (await receive_close(ws))[0] == 1000


def test_the_token_is_kept_out_of_custom_parameters() -> None:
    """The protocol hands the token over apart: no summary, event or handler ever sees it."""
    from callsock.protocol.stream import StreamProtocol

    protocol = StreamProtocol()
    protocol.receive_text(twilio_start(sid("MZ", 30), params={"callsockToken": "t" * 43, "tenant": "acme"}))
    assert protocol.stream is not None
    assert protocol.stream.custom_parameters == {"tenant": "acme"}
    assert protocol.stream.stream_token == "t" * 43
