"""What Twilio asks of the server over HTTP: the TwiML for a call, its form, and signature checks.

``POST /twiml`` (or ``GET``) answers the call with TwiML built by the ``twilio`` helper library:
``<Connect><Stream>`` for a bidirectional stream, or ``<Start><Stream track=...>`` and a
``<Pause>`` for a one-way fork (TwiML ``<Stream>`` docs). The stream URL is always ``wss://``
(the only scheme Twilio dials), ends with the path this server serves, and never has a query
string (Twilio drops it): values go in ``<Parameter>`` elements instead. With an auth token, the
stream also gets the call's stream token (:mod:`callsock.tokens`).

The public URL a request was made to is ``--public-url`` alone when it is given. Otherwise it
is rebuilt from the request: ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` count only when the
peer is a proxy listed in ``--forwarded-allow-ips`` (anyone else could name any host), else the
``Host`` header and the connection's own scheme. A host that is not a plain ``name[:port]`` is
refused (:class:`BadHost`). Twilio signs that URL (Twilio docs, "Webhooks security"); for a
WebSocket upgrade it signs the ``wss://`` URL it dialed, with no parameters.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Final, Literal
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from aiohttp import hdrs, web
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import Connect, Start, Stream, VoiceResponse

from ..protocol.errors import PolicyViolation
from ..protocol.stream import StreamInfo
from ..protocol.tokens import STREAM_TOKEN_PARAMETER, TOKEN_FIELD, stream_token, token_matches
from .settings import ProxyNetwork, Settings, proxy_networks

__all__ = [
    "MAX_FORM_FIELDS",
    "BadForm",
    "BadHost",
    "candidate_urls",
    "cannot_replace",
    "form_params",
    "is_local",
    "is_signed",
    "proves_call",
    "signature_for",
    "stream_url",
    "twiml",
]

Kind = Literal["webhook", "websocket"]

MAX_FORM_FIELDS: Final = 256
"""The most fields a webhook form may have (Twilio's voice webhook sends a few dozen)."""

_SECURE = {"webhook": "https", "websocket": "wss"}
_PLAIN = {"webhook": "http", "websocket": "ws"}
_FORM: Final = "application/x-www-form-urlencoded"
_UTF8: Final = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})
# name[:port]: DNS labels (underscores tolerated) or an IPv4 address, or [IPv6][:port].
_HOST: Final = re.compile(
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?))"
    r"(?::(?P<port>[0-9]{1,5}))?",
    re.ASCII,
)


class BadHost(ValueError):
    """The request names a host that cannot be put in a URL (a path, a query, junk, non-ASCII)."""


class BadForm(ValueError):
    """A webhook body that is not the form Twilio sends (wrong type, not UTF-8, too many fields)."""


def stream_url(request: web.Request, settings: Settings) -> str:
    """The ``wss://`` URL Twilio should dial for this server's stream path.

    Raises:
        BadHost: there is no ``--public-url`` and the request's host is unusable.
    """
    return _public_base(request, settings, "websocket", secure=True) + settings.path


def twiml(settings: Settings, url: str, call_sid: str | None = None) -> str:
    """The TwiML that streams a call to ``url``, as the settings ask.

    Args:
        settings: the stream mode, parameters and status callback.
        url: the stream's ``wss://`` URL.
        call_sid: the call's SID from Twilio's webhook; with an auth token, the stream carries
            its stream token in a ``callsockToken`` parameter.
    """
    response = VoiceResponse()
    stream_attributes: dict[str, str] = {"url": url}
    if settings.status_callback:
        stream_attributes["status_callback"] = settings.status_callback
        stream_attributes["status_callback_method"] = "POST"
    if settings.stream_mode == "start":
        stream = Stream(track=settings.track, **stream_attributes)
        verb: Start | Connect = Start()
    else:
        stream = Stream(**stream_attributes)
        verb = Connect()
    for name, value in settings.parameters:
        stream.parameter(name=name, value=value)
    if settings.auth_token and call_sid:
        stream.parameter(name=STREAM_TOKEN_PARAMETER, value=stream_token(settings.auth_token, call_sid))
    verb.append(stream)
    response.append(verb)
    if settings.stream_mode == "start":
        # <Start> goes on at once to the next verb; without one the call would hang up.
        response.pause(length=settings.pause_seconds)
    return str(response)


async def form_params(request: web.Request) -> dict[str, str]:
    """The parameters of a webhook: its URL-encoded form (POST), or its query string (GET).

    The body was read, within its deadline and size limit, before the route ran. Twilio sends
    ``application/x-www-form-urlencoded`` in UTF-8 (Twilio docs, "Twilio's request to your
    application"); anything else is refused rather than guessed at. A repeated name keeps its
    last value.

    Raises:
        BadForm: the body or query is not such a form.
    """
    if request.method != "POST":
        return _parsed(request.rel_url.raw_query_string)
    body = await request.read()
    if not body:
        return {}
    if request.headers.get(hdrs.CONTENT_ENCODING, "identity").lower() != "identity":
        raise BadForm("an encoded (compressed) body")
    if request.content_type.lower() != _FORM or (request.charset or "utf-8").lower() not in _UTF8:
        raise BadForm(f"a body that is not {_FORM} in UTF-8")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadForm("a body that is not UTF-8") from None
    return _parsed(text)


def _parsed(text: str) -> dict[str, str]:
    try:
        pairs = parse_qsl(text, keep_blank_values=True, errors="strict", max_num_fields=MAX_FORM_FIELDS)
    except UnicodeDecodeError:
        raise BadForm("percent-escapes that are not UTF-8") from None
    except ValueError:
        raise BadForm(f"more than {MAX_FORM_FIELDS} fields") from None
    return dict(pairs)


def candidate_urls(request: web.Request, settings: Settings, kind: Kind) -> list[str]:
    """The URLs Twilio may have signed for this request, the likeliest first.

    With ``--public-url``, that URL alone (``wss://`` for an upgrade; a plain ``http://`` public
    URL also allows ``ws://``). Otherwise the URL rebuilt from the request (forwarding headers
    from trusted proxies only) with its secure scheme (``https``/``wss``: what Twilio uses) and
    its plain one (a local test); none when the host is unusable.
    """
    path = request.path_qs
    if settings.public_url:
        urls = [_public_base(request, settings, kind, secure=kind == "websocket") + path]
        if kind == "websocket" and urlsplit(settings.public_url).scheme in ("http", "ws"):
            urls.append(_public_base(request, settings, kind, secure=False) + path)
    else:
        try:
            host = _host(request, settings)
        except BadHost:
            return []
        urls = [f"{scheme}://{host}{path}" for scheme in _schemes(request, settings, kind)]
    # RequestValidator tries each URL with and without its port, but takes the default port
    # to be 443 for https and 80 for anything else, wss included: add wss's 443 ourselves.
    for url in list(urls):
        parts = urlsplit(url)
        if parts.scheme == "wss" and parts.port is None:
            urls.append(urlunsplit((parts.scheme, f"{parts.hostname}:443", parts.path, parts.query, "")))
    return urls


def is_signed(
    request: web.Request, settings: Settings, kind: Kind, params: Mapping[str, str] | None = None
) -> bool:
    """Whether ``X-Twilio-Signature`` matches one of the URLs the request may have been signed for.

    twilio's ``RequestValidator`` also tries each URL with and without its port.
    """
    signature = request.headers.get("X-Twilio-Signature")
    if not signature or not settings.auth_token:
        return False
    validator = RequestValidator(settings.auth_token)
    form = dict(params or {})
    return any(validator.validate(url, form, signature) for url in candidate_urls(request, settings, kind))


def is_local(request: web.Request) -> bool:
    """Whether the request comes from this machine itself, not relayed by a proxy.

    A request a local proxy forwards comes from the loopback address too, so one that carries
    forwarding headers does not count as local.
    """
    if any(h in request.headers for h in ("Forwarded", "X-Forwarded-For", "X-Real-IP")):
        return False
    address = _address(request.remote)
    return address is not None and address.is_loopback


def _public_base(request: web.Request, settings: Settings, kind: Kind, *, secure: bool) -> str:
    if settings.public_url:
        parts = urlsplit(settings.public_url)
        scheme = _SECURE[kind] if secure or parts.scheme in ("https", "wss") else _PLAIN[kind]
        return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}"
    host = _host(request, settings)
    scheme = _SECURE[kind] if secure else _schemes(request, settings, kind)[0]
    return f"{scheme}://{host}"


def _host(request: web.Request, settings: Settings) -> str:
    """The host the request was made to: the trusted proxy's ``X-Forwarded-Host``, else ``Host``.

    Raises:
        BadHost: it is missing or is not ``name[:port]`` (RFC 9110 section 7.2, ``uri-host [":" port]``).
    """
    forwarded = _forwarded(request, settings, "X-Forwarded-Host")
    host = forwarded if forwarded is not None else request.headers.get(hdrs.HOST, "")
    match = _HOST.fullmatch(host)
    if match is None:
        raise BadHost("not a host[:port]")
    port, ipv6, name = match["port"], match["ipv6"], match["name"]
    if port is not None and not 0 < int(port) <= 65535:
        raise BadHost("port out of range")
    if ipv6 is not None and _address(ipv6) is None:
        raise BadHost("not an IPv6 address")
    if name is not None and any(not 0 < len(label) <= 63 for label in name.split(".")):
        raise BadHost("an empty or over-long label")
    return host


def _schemes(request: web.Request, settings: Settings, kind: Kind) -> list[str]:
    proto = (_forwarded(request, settings, "X-Forwarded-Proto") or "").lower()
    if proto not in ("http", "https", "ws", "wss"):
        proto = request.scheme
    secure = proto in ("https", "wss")
    first, second = (_SECURE[kind], _PLAIN[kind]) if secure else (_PLAIN[kind], _SECURE[kind])
    return [first, second]


def _forwarded(request: web.Request, settings: Settings, header: str) -> str | None:
    """The first value of a forwarding header, if the peer is a trusted proxy.

    A chain of proxies appends its own values after the first one's.
    """
    value = request.headers.get(header)
    if not value or not _trusted(request.remote, settings.forwarded_allow_ips):
        return None
    return value.split(",")[0].strip() or None


def _trusted(peer: str | None, allowed: str) -> bool:
    networks = _networks(allowed)
    if networks is None:
        return True
    address = _address(peer)
    return address is not None and any(address in network for network in networks)


@lru_cache(maxsize=8)
def _networks(allowed: str) -> tuple[ProxyNetwork, ...] | None:
    return proxy_networks(allowed)


def _address(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address, an IPv4-mapped IPv6 one as IPv4 (a dual-stack socket's peers); else None."""
    try:
        address = ipaddress.ip_address(text or "")
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def signature_for(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """The ``X-Twilio-Signature`` Twilio would send for ``url`` and POST ``params``.

    Twilio signs each webhook and each Media Streams upgrade with HMAC-SHA1 of the URL it
    requested followed by the sorted POST parameters, keyed with the Auth Token (Twilio docs,
    "Webhooks security"); for a WebSocket, the ``wss://`` URL it dialed and no parameters.
    """
    return str(RequestValidator(auth_token).compute_signature(url, dict(params)))


def proves_call(settings: Settings, stream: StreamInfo) -> bool:
    """Whether a ``start`` proves the call it names, so that it may take the call over.

    Without an auth token there is nothing to prove against: every start may, as before stream
    tokens. With one, a start carrying the call's token (:mod:`callsock.protocol.tokens`) proves
    it; a start with no token is accepted but may not replace a live connection (unless
    ``--require-signature`` makes the token mandatory). A seed-dialect start without a callSid
    has nothing a token could cover.

    Raises:
        PolicyViolation: rule ``stream-token``: the token is wrong, has no callSid to match, or
            is missing under ``--require-signature``.
    """
    if not settings.auth_token:
        return True
    token = stream.stream_token
    if token is None:
        if settings.require_signature:
            raise PolicyViolation("stream-token", TOKEN_FIELD, "no stream token (--require-signature)")
        return False
    if stream.call_sid is None:
        raise PolicyViolation("stream-token", "start.callSid", "a stream token needs a callSid")
    if not token_matches(settings.auth_token, stream.call_sid, token):
        raise PolicyViolation("stream-token", TOKEN_FIELD, "stream token does not match the callSid")
    return True


def cannot_replace() -> PolicyViolation:
    """The refusal of a start without the call's token, for a call another connection holds."""
    detail = "only the call's stream token may replace its connection"
    return PolicyViolation("stream-token", TOKEN_FIELD, detail)
