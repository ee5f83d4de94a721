"""Stream tokens: what binds a Media Stream to the call it claims to carry.

Twilio signs a WebSocket upgrade over its URL only, which is the same for every call: a captured
signed upgrade followed by a ``start`` naming someone else's callSid would take over that call.
So callsock's TwiML gives each stream a ``<Parameter name="callsockToken">`` holding an HMAC of
the call's SID, keyed by the Auth Token; Twilio hands it back in ``start.customParameters``
(TwiML ``<Stream>`` docs, "Custom parameters"), where only a peer that was given the TwiML can
have it.

The MAC is HMAC-SHA256 over a domain-separation prefix and the CallSid, sent as unpadded
base64url (43 characters). Twilio's own signatures are HMAC-SHA1 over a URL, 28 characters of
base64: a token can never be mistaken for one, nor one for a token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Final

from .messages import STREAM_TOKEN_PARAMETER

__all__ = ["STREAM_TOKEN_PARAMETER", "TOKEN_FIELD", "stream_token", "token_matches"]

TOKEN_FIELD: Final = f"start.customParameters.{STREAM_TOKEN_PARAMETER}"
"""Where a ``start`` carries its stream token, as an error's ``field`` names it."""

_DOMAIN: Final = b"callsock stream token v1\n"


def stream_token(auth_token: str, call_sid: str) -> str:
    """The stream token of a call: put it in the TwiML you write yourself.

    ``callsock serve`` adds it to the TwiML it answers on ``/twiml``. If you write your own, add
    ``<Parameter name="callsockToken" value="..."/>`` to the ``<Stream>`` with this value, so
    that only a stream carrying it can claim (or take over) the call.

    Args:
        auth_token: the Twilio Auth Token the server checks signatures with.
        call_sid: the call's SID (``CallSid`` in Twilio's webhook).

    Returns:
        43 characters of unpadded base64url.
    """
    mac = hmac.new(auth_token.encode(), _DOMAIN + call_sid.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


def token_matches(auth_token: str, call_sid: str, token: str) -> bool:
    """Whether ``token`` is the stream token of ``call_sid`` (compared in constant time)."""
    return hmac.compare_digest(stream_token(auth_token, call_sid).encode(), token.encode())
