"""Structured logging with structlog: JSON for machines, a readable console format for people.

Lines about a call carry ``callSid`` and ``streamSid`` (bound once the stream starts). Audio
payloads and secrets are never passed to a logger, so no processor has to scrub them.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

__all__ = ["LogFormat", "configure_logging", "get_logger"]

LogFormat = Literal["auto", "json", "console"]


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
