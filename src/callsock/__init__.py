"""callsock: a production server for Twilio Media Streams.

Start with ``callsock serve`` (or ``make serve``); see README.md.
"""

from __future__ import annotations

from .app import App
from .call import AudioFrame, Call, CallStats, MarkEcho
from .errors import (
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
from .protocol import StreamInfo, StreamProtocol
from .server import CallServer
from .session import CallSession
from .settings import Settings
from .tokens import stream_token

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
