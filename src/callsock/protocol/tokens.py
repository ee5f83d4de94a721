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
from typing import TYPE_CHECKING, Final

from .errors import PolicyViolation
from .messages import STREAM_TOKEN_PARAMETER

if TYPE_CHECKING:
    from ..server.settings import Settings
    from .stream import StreamInfo

__all__ = ["STREAM_TOKEN_PARAMETER", "cannot_replace", "proves_call", "stream_token", "token_matches"]


_FIELD: Final = f"start.customParameters.{STREAM_TOKEN_PARAMETER}"

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


def proves_call(settings: Settings, stream: StreamInfo) -> bool:
    """Whether a ``start`` proves the call it names, so that it may take the call over.

    Without an auth token there is nothing to prove against: every start may, as before stream
    tokens. With one, a start carrying the call's token proves it; a start with no token is
    accepted but may not replace a live connection (unless ``--require-signature`` makes the
    token mandatory). A seed-dialect start without a callSid has nothing a token could cover.

    Raises:
        PolicyViolation: rule ``stream-token``: the token is wrong, has no callSid to match, or
            is missing under ``--require-signature``.
    """
    if not settings.auth_token:
        return True
    token = stream.stream_token
    if token is None:
        if settings.require_signature:
            raise PolicyViolation("stream-token", _FIELD, "no stream token (--require-signature)")
        return False
    if stream.call_sid is None:
        raise PolicyViolation("stream-token", "start.callSid", "a stream token needs a callSid")
    if not token_matches(settings.auth_token, stream.call_sid, token):
        raise PolicyViolation("stream-token", _FIELD, "stream token does not match the callSid")
    return True


def cannot_replace() -> PolicyViolation:
    """The refusal of a start without the call's token, for a call another connection holds."""
    return PolicyViolation("stream-token", _FIELD, "only the call's stream token may replace its connection")
