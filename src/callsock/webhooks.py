"""What Twilio asks of the server over HTTP: the TwiML for a call, and signature checks.

``POST /twiml`` (or ``GET``) answers the call with TwiML built by the ``twilio`` helper library:
``<Connect><Stream>`` for a bidirectional stream, or ``<Start><Stream track=...>`` and a
``<Pause>`` for a one-way fork (TwiML ``<Stream>`` docs). The stream URL is always ``wss://``
(the only scheme Twilio dials), ends with the path this server serves, and never has a query
string (Twilio drops it): values go in ``<Parameter>`` elements instead.

The public URL a request was made to is ``--public-url`` when given; otherwise it is rebuilt
from ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` (set by ngrok and most proxies), else from
the request itself. Twilio signs that URL (Twilio docs, "Webhooks security"); for a WebSocket
upgrade it signs the ``wss://`` URL it dialed, with no parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import Connect, Start, Stream, VoiceResponse

from .settings import Settings

__all__ = ["candidate_urls", "is_signed", "stream_url", "twiml"]

Kind = Literal["webhook", "websocket"]

_SECURE = {"webhook": "https", "websocket": "wss"}
_PLAIN = {"webhook": "http", "websocket": "ws"}


def stream_url(request: web.Request, settings: Settings) -> str:
    """The ``wss://`` URL Twilio should dial for this server's stream path."""
    return _public_base(request, settings, "websocket", secure=True) + settings.path


def twiml(settings: Settings, url: str) -> str:
    """The TwiML that streams a call to ``url``, as the settings ask."""
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
    verb.append(stream)
    response.append(verb)
    if settings.stream_mode == "start":
        # <Start> goes on at once to the next verb; without one the call would hang up.
        response.pause(length=settings.pause_seconds)
    return str(response)


def candidate_urls(request: web.Request, settings: Settings, kind: Kind) -> list[str]:
    """The URLs Twilio may have signed for this request, the likeliest first.

    The public URL when configured; then the URL rebuilt from forwarding headers with its
    secure scheme (``https``/``wss``: what Twilio uses) and its plain one (a local test).
    """
    path = request.path_qs
    urls = []
    if settings.public_url:
        urls.append(_public_base(request, settings, kind, secure=True) + path)
    host = _forwarded(request, "X-Forwarded-Host") or request.host
    for scheme in _schemes(request, kind):
        url = f"{scheme}://{host}{path}"
        if url not in urls:
            urls.append(url)
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


def _public_base(request: web.Request, settings: Settings, kind: Kind, *, secure: bool) -> str:
    if settings.public_url:
        parts = urlsplit(settings.public_url)
        scheme = _SECURE[kind] if secure or parts.scheme in ("https", "wss") else _PLAIN[kind]
        return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}"
    host = _forwarded(request, "X-Forwarded-Host") or request.host
    scheme = _SECURE[kind] if secure else _schemes(request, kind)[0]
    return f"{scheme}://{host}"


def _schemes(request: web.Request, kind: Kind) -> list[str]:
    proto = (_forwarded(request, "X-Forwarded-Proto") or request.scheme).lower()
    secure = proto in ("https", "wss")
    first, second = (_SECURE[kind], _PLAIN[kind]) if secure else (_PLAIN[kind], _SECURE[kind])
    return [first, second]


def _forwarded(request: web.Request, header: str) -> str | None:
    """The first value of a forwarding header (a chain of proxies appends theirs after it)."""
    value = request.headers.get(header)
    return value.split(",")[0].strip() or None if value else None
