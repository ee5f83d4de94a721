"""Structured logging with structlog: JSON for machines, a readable console format for people.

Lines about a call carry ``callSid`` and ``streamSid`` (bound once the stream starts). Audio
payloads and secrets are never passed to a logger, so no processor has to scrub them. A string a
client chose (a form field, a header, a path) goes through :func:`clip` first, so a hostile client
can neither grow a log line past :data:`MAX_LOGGED_CHARS` nor forge lines with control characters.

aiohttp logs through the standard library; :func:`http_logger` is the logger its protocol gets: a
request it could not parse is one warning line (no traceback), anything else an error with one.
"""

from __future__ import annotations

import logging
import sys
from typing import Final, Literal, TextIO

import structlog
from aiohttp.http_exceptions import HttpProcessingError

__all__ = ["MAX_LOGGED_CHARS", "LogFormat", "clip", "configure_logging", "get_logger", "http_logger"]

LogFormat = Literal["auto", "json", "console"]

MAX_LOGGED_CHARS: Final = 200
"""The most characters of a client-provided string that go into a log line."""


def configure_logging(level: str = "info", fmt: LogFormat = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog for the process.

    Args:
        level: the lowest level emitted (``debug``, ``info``, ``warning``, ``error``).
        fmt: ``json``, ``console``, or ``auto``: console when ``stream`` is a terminal.
        stream: where lines go; standard output by default.
    """
    out = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_number(level)),
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def level_number(level: str) -> int:
    """Return the :mod:`logging` number of a level name such as ``"info"``."""
    number = logging.getLevelNamesMapping().get(level.upper())
    if number is None:
        raise ValueError(f"unknown log level: {level!r}")
    return number


def get_logger(**context: object) -> structlog.typing.FilteringBoundLogger:
    """Return callsock's logger, bound to ``context``."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger("callsock")
    return logger.bind(**context) if context else logger


def clip(value: object, limit: int = MAX_LOGGED_CHARS) -> str | None:
    """A client-provided value made safe to log: at most ``limit`` characters, control characters escaped.

    Args:
        value: what the client sent (``None`` stays ``None``; anything else is made a string).
        limit: the most characters kept; a longer value ends with ``...`` and its full length.

    Returns:
        The value as it may be logged.
    """
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    head = text[: limit + 1]
    if not head.isprintable():
        head = head.encode("unicode_escape").decode("ascii")
    if len(text) <= limit and len(head) <= limit:
        return head
    return f"{head[:limit]}...({len(text)} chars)"


class _OneLine(logging.Handler):
    """Hands aiohttp's records to structlog: client mistakes in one line, server faults with a traceback."""

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        log = get_logger(source="aiohttp")
        message = clip(record.getMessage()) or ""
        if exc is None:
            log.log(record.levelno, message)
        elif isinstance(exc, HttpProcessingError):
            # A request aiohttp could not parse is the client's fault: no traceback to read.
            log.warning(message, error=type(exc).__name__, detail=clip(getattr(exc, "message", str(exc))))
        else:
            log.error(message, exc_info=record.exc_info)


def http_logger() -> logging.Logger:
    """The standard-library logger to give aiohttp's request handlers (their ``logger``)."""
    logger = logging.getLogger("callsock.http")
    if not any(isinstance(handler, _OneLine) for handler in logger.handlers):
        logger.addHandler(_OneLine())
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger
