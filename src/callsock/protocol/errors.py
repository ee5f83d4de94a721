"""The errors callsock raises, each tied to the WebSocket close code it ends a connection with.

The hierarchy::

    CallsockError
    ├── StreamError               the peer broke a rule of the stream (sans-I/O)
    │   ├── InvalidMessage        1007: not JSON, wrong schema, bad base64, bad track config
    │   ├── UnsupportedData       1003: a binary frame
    │   ├── PolicyViolation       1008: out of order, second start, wrong streamSid
    │   ├── MessageTooBig         1009: a frame over the size limit
    │   └── FramingError          1002: a WebSocket frame RFC 6455 forbids
    ├── IdleTimeout               1008: nothing received (or no start) for too long
    ├── CallTooLong               1008: the call outlasted --max-call-seconds
    ├── ShuttingDown              1001: the server is stopping
    ├── ServerBusy                1013: the server is at its call limit
    ├── Replaced                  4000: a newer connection took over the call
    ├── HandlerFailed             1011: an application handler raised; the call ends
    ├── UsageError                the application asked for something impossible (local)
    │   ├── OneWayStream          sending on a <Start> fork, which Twilio would fail (31924)
    │   └── CallEnded             sending on a call whose connection has closed
    └── ConfigurationError        a setting or the application object is unusable (local)

A :class:`StreamError` names the ``rule`` that was broken and the ``field`` it concerns, so a
log line and a metric can say exactly what went wrong without quoting the message (which may
carry call audio). Close reasons are short and never contain peer data.
"""

from __future__ import annotations

from .codes import CloseCode

__all__ = [
    "CallEnded",
    "CallTooLong",
    "CallsockError",
    "ConfigurationError",
    "FramingError",
    "HandlerFailed",
    "IdleTimeout",
    "InvalidMessage",
    "MessageTooBig",
    "OneWayStream",
    "PolicyViolation",
    "Replaced",
    "ServerBusy",
    "ShuttingDown",
    "StreamError",
    "UnsupportedData",
    "UsageError",
]

# RFC 6455 section 5.5: a control frame payload is at most 125 bytes, 2 of them the code.
_MAX_REASON_BYTES = 123


class CallsockError(Exception):
    """Base class of every error callsock raises on purpose."""

    close_code: CloseCode = CloseCode.INTERNAL_ERROR
    """The WebSocket close code a connection ends with when this error ends it."""

    rule: str = "internal"
    """A stable, kebab-case name of what went wrong (a metric label and the summary's ``error``)."""

    @property
    def close_reason(self) -> str:
        """A short close reason, safe to send to the peer."""
        return _truncate(str(self))


class StreamError(CallsockError):
    """The peer sent something the Media Streams protocol does not allow.

    Attributes:
        rule: a stable, kebab-case name of the rule that was broken (used as a metric label).
        field: the JSON path of the offending field, or ``""`` when the whole message is at fault.
        detail: a short human explanation, free of payload data.
    """

    def __init__(self, rule: str, field: str = "", detail: str = "") -> None:
        self.rule = rule
        self.field = field
        self.detail = detail or rule
        super().__init__(self.detail)

    def __str__(self) -> str:
        return f"{self.detail} ({self.field})" if self.field else self.detail


class InvalidMessage(StreamError):
    """A message is not JSON, does not match the schema, or carries an invalid value."""

    close_code = CloseCode.INVALID_DATA


class UnsupportedData(StreamError):
    """A binary frame arrived; Media Streams messages are JSON text frames."""

    close_code = CloseCode.UNSUPPORTED_DATA


class PolicyViolation(StreamError):
    """A well-formed message arrived out of order or for another stream."""

    close_code = CloseCode.POLICY_VIOLATION


class MessageTooBig(StreamError):
    """A frame exceeded the configured maximum message size."""

    close_code = CloseCode.MESSAGE_TOO_BIG


class FramingError(StreamError):
    """The WebSocket framing itself is broken (unmasked, reserved bits, bad opcode...)."""

    close_code = CloseCode.PROTOCOL_ERROR


class IdleTimeout(CallsockError):
    """The connection sent nothing (or no ``start``) for too long; it is closed (1008)."""

    close_code = CloseCode.POLICY_VIOLATION
    rule = "idle-timeout"


class CallTooLong(CallsockError):
    """The call lasted longer than ``--max-call-seconds``; it is ended (1008)."""

    close_code = CloseCode.POLICY_VIOLATION
    rule = "max-duration"

    def __init__(self, limit: float) -> None:
        self.limit = limit
        super().__init__(f"call longer than {limit:g} s")


class ShuttingDown(CallsockError):
    """The server is stopping; open calls are closed with 1001."""

    close_code = CloseCode.GOING_AWAY

    def __init__(self) -> None:
        super().__init__("server shutting down")


class ServerBusy(CallsockError):
    """The server already carries its maximum number of calls."""

    close_code = CloseCode.TRY_AGAIN_LATER

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"server at capacity ({limit} calls)")


class Replaced(CallsockError):
    """A newer connection for the same call took over; this one is closed."""

    close_code = CloseCode.REPLACED

    def __init__(self) -> None:
        super().__init__("replaced by a newer connection for the same call")


class HandlerFailed(CallsockError):
    """An application handler raised; the call ends with ``endReason`` ``error``."""

    rule = "handler"

    def __init__(self, handler: str) -> None:
        self.handler = handler
        super().__init__("application error")


class UsageError(CallsockError):
    """The application asked a call for something it cannot do."""


class OneWayStream(UsageError):
    """The stream is a one-way ``<Start>`` fork: Twilio fails it if the server sends (31924)."""

    def __init__(self) -> None:
        super().__init__(
            "this stream is one-way (<Start><Stream>): Twilio accepts no media, mark or clear on it; "
            "use <Connect><Stream> to talk back"
        )


class CallEnded(UsageError):
    """The call's connection has closed; nothing more can be sent."""

    def __init__(self) -> None:
        super().__init__("the call has ended")


class ConfigurationError(CallsockError):
    """A setting, or the application object named on the command line, cannot be used."""


def _truncate(text: str) -> str:
    encoded = text.encode()
    if len(encoded) <= _MAX_REASON_BYTES:
        return text
    return encoded[: _MAX_REASON_BYTES - 3].decode(errors="ignore") + "..."
