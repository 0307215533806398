from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from vduproxy import server
from vduproxy.dataplane import open_dataplane_factory

_sessions: list[Any] = []


def current_session() -> Any:
    """The device session of the innermost running proxy (to reach its live data plane from a test)."""
    return _sessions[-1]


@asynccontextmanager
async def running_proxy(path: str, device: str = "sim", **kw: Any) -> AsyncIterator[str]:
    """The proxy's real server and back-end, in this process (so tests can count its fds and read its logs)."""
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


@pytest.fixture
def sock_path(tmp_path: os.PathLike[str]) -> str:
    return os.path.join(str(tmp_path), "vdu.sock")


@pytest.fixture
def proxy_at(sock_path: str) -> Callable[..., Any]:
    def make(device: str = "sim", **kw: Any) -> Any:
        return running_proxy(sock_path, device, **kw)

    return make
