"""Twilio request signatures (``X-Twilio-Signature``), with the ``twilio`` helper library.

Twilio signs each webhook and each Media Streams WebSocket upgrade with HMAC-SHA1 of the full URL
it requested, followed by the sorted POST parameters, keyed with the account's Auth Token
(Twilio docs, "Webhooks security"). For a WebSocket the URL is the ``wss://`` one Twilio dialed
and there are no parameters.
"""

from __future__ import annotations

from collections.abc import Mapping

from twilio.request_validator import RequestValidator

__all__ = ["signature_for"]


def signature_for(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """The ``X-Twilio-Signature`` Twilio would send for ``url`` and POST ``params``."""
    return str(RequestValidator(auth_token).compute_signature(url, dict(params)))
