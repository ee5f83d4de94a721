"""callsock: a production server for Twilio Media Streams.

Start with ``callsock serve`` (or ``make serve``); see README.md.
"""

from __future__ import annotations

from .call.app import App
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
from .server.routes import CallServer
from .server.settings import Settings

__version__ = "0.1.0"

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
