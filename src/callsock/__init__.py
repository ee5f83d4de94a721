"""callsock: a production server for Twilio Media Streams.

Start with ``callsock serve`` (or ``make serve``); see README.md.
"""

from __future__ import annotations

from .errors import (
    CallsockError,
    ConfigurationError,
    InvalidMessage,
    MessageTooBig,
    PolicyViolation,
    Replaced,
    ServerBusy,
    StreamError,
    UnsupportedData,
)
from .protocol import StreamInfo, StreamProtocol
from .server import CallServer
from .session import CallSession
from .settings import Settings

__version__ = "0.1.0"

__all__ = [
    "CallServer",
    "CallSession",
    "CallsockError",
    "ConfigurationError",
    "InvalidMessage",
    "MessageTooBig",
    "PolicyViolation",
    "Replaced",
    "ServerBusy",
    "Settings",
    "StreamError",
    "StreamInfo",
    "StreamProtocol",
    "UnsupportedData",
    "__version__",
]
