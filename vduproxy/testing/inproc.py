"""The proxy's real server and back-end running inside the test's own process (so a test can count the proxy's
fds, read its structlog events with capture_logs, and reach its live data plane)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from .. import server
from ..dataplane import DeviceSession, open_dataplane_factory

_sessions: list[DeviceSession | None] = []


def current_session() -> DeviceSession:
    """The device session of the innermost running proxy."""
    session = _sessions[-1] if _sessions else None
    if session is None:
        raise RuntimeError("no in-process proxy with a device is running")
    return session


@asynccontextmanager
async def running_proxy(path: str, device: str = "sim", **kw: Any) -> AsyncIterator[str]:
    factory, _ = open_dataplane_factory(device, **kw)
    _sessions.append(factory.session)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: server.serve_unix(path, factory, task_status=task_status))
            yield path
            nursery.cancel_scope.cancel()
    finally:
        _sessions.pop()
        factory.close()
