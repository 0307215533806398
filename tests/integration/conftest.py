from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from vduproxy.testing.inproc import current_session, running_proxy

__all__ = ["current_session", "running_proxy"]

@pytest.fixture
def sock_path(tmp_path: os.PathLike[str]) -> str:
    return os.path.join(str(tmp_path), "vdu.sock")


@pytest.fixture
def proxy_at(sock_path: str) -> Callable[..., Any]:
    def make(device: str = "sim", **kw: Any) -> Any:
        return running_proxy(sock_path, device, **kw)

    return make
