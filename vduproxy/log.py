"""structlog configured once: console renderer on a terminal, JSON lines otherwise."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_configured = False

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: str = "info", *, json: bool | None = None, stream: Any = None) -> None:
    """Configure structlog for the whole process. Later calls reconfigure (the CLI calls it once)."""
    global _configured
    out = stream if stream is not None else sys.stderr
    if json is None:
        json = not (hasattr(out, "isatty") and out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(name: str, **ctx: Any) -> Any:
    """A lazy logger; `name` becomes the `logger` key so lines can be filtered by module.

    Lazy on purpose: modules create their loggers at import time, before the CLI has configured structlog.
    """
    # `logger` is a parameter name of structlog.wrap_logger, so the key is passed through the context dict.
    return structlog.wrap_logger(None, **{"logger_name": name, **ctx})
