"""structlog configured once: console renderer on a terminal, JSON lines otherwise."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import structlog

HOLD_MAX = 256  # lines held at most; more are written at once (a hold is for short sections)


class _Sink:
    """Where rendered lines go: the stream, or a buffer while a latency-critical section holds them.

    Writing a line to a pipe or socket whose reader sleeps costs a wake-up of that reader (tens of µs to ~0.1 ms
    on a busy VM); a reconfiguration that logs mid-way would pay it inside the data path's interruption."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.held: list[str] | None = None

    def write(self, line: str) -> None:
        if self.held is None:
            self.out.write(line + "\n")
            self.out.flush()
            return
        if len(self.held) >= HOLD_MAX:
            self._flush()
        self.held.append(line)

    def _flush(self) -> None:
        if self.held:
            self.out.write("\n".join(self.held) + "\n")
            self.out.flush()
            self.held.clear()

    def release(self) -> None:
        self._flush()
        self.held = None


class _SinkLogger:
    """structlog's final logger: every level writes the rendered line to the sink."""

    def __init__(self, sink: _Sink) -> None:
        self._sink = sink

    def msg(self, message: str) -> None:
        self._sink.write(message)

    log = debug = info = warn = warning = msg
    error = err = critical = fatal = exception = failure = msg


_sink: _Sink | None = None


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Keep log lines (rendered, with their own timestamps) until the block ends, then write them in one go.
    Nested holds release with the outermost; without configure() this does nothing."""
    sink = _sink
    if sink is None or sink.held is not None:
        yield
        return
    sink.held = []
    try:
        yield
    finally:
        sink.release()


LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: str = "info", *, json: bool | None = None, stream: Any = None) -> None:
    """Configure structlog for the whole process. Later calls reconfigure (the CLI calls it once)."""
    global _sink
    out = stream if stream is not None else sys.stderr
    if json is None:
        json = not (hasattr(out, "isatty") and out.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    if _sink is not None:
        _sink.release()
    sink = _sink = _Sink(out)
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
        logger_factory=lambda *args: _SinkLogger(sink),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str, **ctx: Any) -> Any:
    """A lazy logger; `name` becomes the `logger` key so lines can be filtered by module.

    Lazy on purpose: modules create their loggers at import time, before the CLI has configured structlog.
    """
    # `logger` is a parameter name of structlog.wrap_logger, so the key is passed through the context dict.
    return structlog.wrap_logger(None, **{"logger_name": name, **ctx})
