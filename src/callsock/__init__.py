"""callsock: a production server for Twilio Media Streams.

Start with ``callsock serve`` (or ``make serve``); see README.md. The names below are imported
when first used, so ``import callsock.protocol`` (say) loads no web framework.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Each public name, and the module it lives in.
_EXPORTS = {
    "App": "server.app",
    "AudioFrame": "call.call",
    "Call": "call.call",
    "CallEnded": "protocol.errors",
    "CallServer": "server.routes",
    "CallSession": "call.session",
    "CallStats": "call.call",
    "CallsockError": "protocol.errors",
    "ConfigurationError": "protocol.errors",
    "HandlerFailed": "protocol.errors",
    "InvalidMessage": "protocol.errors",
    "MarkEcho": "call.call",
    "MessageTooBig": "protocol.errors",
    "OneWayStream": "protocol.errors",
    "PolicyViolation": "protocol.errors",
    "Replaced": "protocol.errors",
    "ServerBusy": "protocol.errors",
    "Settings": "server.settings",
    "StreamError": "protocol.errors",
    "StreamInfo": "protocol.stream",
    "StreamProtocol": "protocol.stream",
    "UnsupportedData": "protocol.errors",
    "UsageError": "protocol.errors",
    "stream_token": "protocol.tokens",
}

__all__ = [
    "App",
    "AudioFrame",
    "Call",
    "CallEnded",
    "CallServer",
    "CallSession",
    "CallStats",
    "CallsockError",
    "ConfigurationError",
    "HandlerFailed",
    "InvalidMessage",
    "MarkEcho",
    "MessageTooBig",
    "OneWayStream",
    "PolicyViolation",
    "Replaced",
    "ServerBusy",
    "Settings",
    "StreamError",
    "StreamInfo",
    "StreamProtocol",
    "UnsupportedData",
    "UsageError",
    "__version__",
    "stream_token",
]

if TYPE_CHECKING:
    from .call.call import AudioFrame, Call, CallStats, MarkEcho
    from .call.session import CallSession
    from .protocol.errors import (
        CallEnded,
        CallsockError,
        ConfigurationError,
        HandlerFailed,
        InvalidMessage,
        MessageTooBig,
        OneWayStream,
        PolicyViolation,
        Replaced,
        ServerBusy,
        StreamError,
        UnsupportedData,
        UsageError,
    )
    from .protocol.stream import StreamInfo, StreamProtocol
    from .protocol.tokens import stream_token
    from .server.app import App
    from .server.routes import CallServer
    from .server.settings import Settings


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'callsock' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup is an ordinary one
    return value
