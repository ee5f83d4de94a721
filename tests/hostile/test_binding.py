"""Attacks on the binding of a stream to its call, and on the list of live calls.

Twilio signs an upgrade over its URL only, the same for every call, so a captured signed upgrade
opens a WebSocket for anyone. These attacks use one to claim a live call by its callSid; the
stream token callsock's TwiML gives each call (``callsockToken``) is what stops them. Each runs
against a real ``callsock serve --auth-token`` beside a call placed as Twilio places it (a signed
upgrade), which must come out unharmed and recorded sample for sample.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from callsock import stream_token
from callsock.server.twilio import signature_for

from ..helpers import StreamingCall, eventually, receive_close, sid, twilio_start
from .harness import MIB, Outcome, Target, beside_a_good_call, target

TOKEN = "hostile-binding-auth-token"
ADMIN = "an-admin-token-of-32-characters!"


def captured(t: Target) -> dict[str, str]:
    """The headers of a signed upgrade, as an attacker who saw one would replay them."""
    return {"X-Twilio-Signature": signature_for(TOKEN, t.ws_url, {})}


async def beside_a_twilio_call(
    t: Target, attack: Callable[[StreamingCall], Awaitable[Any]], *, proven: bool = True, n: int = 1
) -> Outcome:
    """Run ``attack(call)`` while a call placed as Twilio places it (a signed upgrade, and its stream
    token unless ``proven`` is False) streams for 2 s; it must end well, recorded."""
    params = {"callsockToken": stream_token(TOKEN, sid("CA", n))} if proven else None
    return await beside_a_good_call(t, attack, seconds=2.0, n=n, params=params, headers=captured(t))


def forged_starts(victim: StreamingCall) -> dict[str, str]:
    """Starts that name the victim's call without its stream token, by what they carry instead."""
    other = sid("CA", 999)
    seed = {
        "event": "start",
        "streamSid": sid("MZ", 905),
        "start": {
            "callSid": victim.call_sid,
            "tracks": [{"id": "inbound", "format": "audio/x-mulaw", "rate": 8000, "channels": 1}],
        },
    }
    return {
        "no token": twilio_start(sid("MZ", 901), victim.call_sid),
        "a made-up token": twilio_start(sid("MZ", 902), victim.call_sid, params={"callsockToken": "A" * 43}),
        "another call's token": twilio_start(
            sid("MZ", 903), victim.call_sid, params={"callsockToken": stream_token(TOKEN, other)}
        ),
        "a Twilio signature as token": twilio_start(
            sid("MZ", 904), victim.call_sid, params={"callsockToken": captured_signature(victim)}
        ),
        "the seed dialect": json.dumps(seed),
    }


def captured_signature(victim: StreamingCall) -> str:
    return str(victim.connect["headers"]["X-Twilio-Signature"])


async def started(call: StreamingCall) -> None:
    await eventually(lambda: call.sent >= 10, what="the good call streaming")


async def metrics_text(t: Target) -> str:
    async with aiohttp.ClientSession() as client, client.get(t.http_url("/metrics")) as response:
        return await response.text()


async def test_a_captured_upgrade_cannot_take_over_a_call(tmp_path: Any) -> None:
    """With a replayed signed upgrade, starts naming the live call's callSid without its stream token
    are each closed with 1008 (stream-token); the call goes on, never replaced."""
    refusals: dict[str, tuple[int | None, str]] = {}
    async with target(tmp_path, "--auth-token", TOKEN) as t:

        async def attack(victim: StreamingCall) -> None:
            await started(victim)
            async with aiohttp.ClientSession() as client:
                for name, start in forged_starts(victim).items():
                    async with client.ws_connect(t.ws_url, headers=captured(t)) as ws:
                        await ws.send_str(start)
                        refusals[name] = await receive_close(ws)

        outcome = await beside_a_twilio_call(t, attack)
        metrics = await metrics_text(t)
        victims_files = sorted(p.name for p in (t.record_dir / sid("CA", 1)).iterdir())
    # The refused starts left nothing: the victim's directory holds its own recording only.
    assert victims_files == [f"{sid('MZ', 1)}.inbound.wav", f"{sid('MZ', 1)}.json"]
    assert {name: code for name, (code, _) in refusals.items()} == dict.fromkeys(refusals, 1008)
    assert all("stream token" in reason for _, reason in refusals.values()), refusals
    assert 'callsock_errors_total{rule="stream-token"} 5.0' in metrics
    assert "callsock_connections_replaced_total 0.0" in metrics
    assert outcome.rss_growth < 8 * MIB, outcome.rss_growth
    outcome.assert_health_answered()


async def test_a_call_without_a_token_cannot_be_taken_over_either(tmp_path: Any) -> None:
    """A call whose TwiML carried no stream token (the user's own) is accepted, but a start with no
    valid token can never replace it: 1008, and the call goes on."""
    codes: list[int | None] = []
    async with target(tmp_path, "--auth-token", TOKEN) as t:

        async def attack(victim: StreamingCall) -> None:
            await started(victim)
            async with aiohttp.ClientSession() as client:
                for start in list(forged_starts(victim).values())[:2]:
                    async with client.ws_connect(t.ws_url, headers=captured(t)) as ws:
                        await ws.send_str(start)
                        codes.append((await receive_close(ws))[0])

        outcome = await beside_a_twilio_call(t, attack, proven=False)
        metrics = await metrics_text(t)
    assert codes == [1008, 1008]
    assert "callsock_connections_replaced_total 0.0" in metrics
    outcome.assert_health_answered()


async def test_guessing_the_admin_token_lists_nothing(tmp_path: Any) -> None:
    """/calls names live callSids, what a takeover needs: 1,000 guessed admin tokens and none at all
    get 401; the right token gets the list."""
    statuses: list[int] = []
    async with target(tmp_path, "--auth-token", TOKEN, "--admin-token", ADMIN) as t:

        async def attack(victim: StreamingCall) -> None:
            await started(victim)
            async with aiohttp.ClientSession() as client:
                for n in range(1000):
                    guess = {"Authorization": f"Bearer {ADMIN[:-4]}{n:04d}"}
                    async with client.get(t.http_url("/calls"), headers=guess) as response:
                        statuses.append(response.status)
                async with client.get(t.http_url("/calls")) as response:
                    statuses.append(response.status)
                right = {"Authorization": f"Bearer {ADMIN}"}
                async with client.get(t.http_url("/calls"), headers=right) as response:
                    assert response.status == 200
                    assert victim.call_sid in [c["callSid"] for c in await response.json()]

        outcome = await beside_a_twilio_call(t, attack)
    assert statuses == [401] * 1001
    outcome.assert_health_answered()


async def test_calls_relayed_by_a_proxy_are_not_local(tmp_path: Any) -> None:
    """With an auth token and no admin token, /calls answers this machine only: a request a local
    proxy relays (it carries X-Forwarded-For or Forwarded) is refused with 403."""
    statuses: dict[str, int] = {}
    async with target(tmp_path, "--auth-token", TOKEN) as t:

        async def attack(victim: StreamingCall) -> None:
            await started(victim)
            async with aiohttp.ClientSession() as client:
                for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
                    async with client.get(t.http_url("/calls"), headers={header: "203.0.113.9"}) as response:
                        statuses[header] = response.status
                async with client.get(t.http_url("/calls")) as response:
                    statuses["direct"] = response.status
                    assert victim.call_sid in [c["callSid"] for c in await response.json()]

        outcome = await beside_a_twilio_call(t, attack)
    assert statuses == {"X-Forwarded-For": 403, "Forwarded": 403, "X-Real-IP": 403, "direct": 200}
    outcome.assert_health_answered()
