"""The WebSocket close codes callsock sends, each once (RFC 6455 section 7.4.1, and one of its own)."""

from __future__ import annotations

import enum

__all__ = ["CloseCode"]


class CloseCode(enum.IntEnum):
    """Why a connection closes; every error callsock raises names one (:mod:`.errors`)."""

    NORMAL = 1000
    """The peer sent ``stop`` (or closed), or the application hung up."""
    GOING_AWAY = 1001
    """The server is shutting down."""
    PROTOCOL_ERROR = 1002
    """Broken WebSocket framing."""
    UNSUPPORTED_DATA = 1003
    """A binary frame: Media Streams messages are JSON text."""
    INVALID_DATA = 1007
    """An invalid message: not UTF-8, not JSON, wrong schema, bad values."""
    POLICY_VIOLATION = 1008
    """A valid message out of order, an idle connection, a budget spent."""
    MESSAGE_TOO_BIG = 1009
    """A message over ``--max-message-bytes``."""
    INTERNAL_ERROR = 1011
    """An application handler raised."""
    TRY_AGAIN_LATER = 1013
    """The server (or the cluster) is at its call limit."""
    REPLACED = 4000
    """A newer connection for the same call took over (a private code, RFC 6455 section 7.4.2)."""
