"""Run the real `vduproxy serve` as a child process for tests and benchmarks, with its JSON log parsed."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import trio

from .procs import ManagedProcess, open_service_nursery


class ProxyProcess:
    def __init__(self, proc: ManagedProcess, socket: Path) -> None:
        self.proc = proc
        self.socket = socket

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every JSON log event so far (optionally only those named `name`)."""
        out = []
        for line in self.proc.output.text().splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if name is None or ev.get("event") == name:
                out.append(ev)
        return out

    async def wait_event(self, name: str, timeout: float = 60.0, **match: Any) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while True:
                for ev in self.events(name):
                    if all(ev.get(k) == v for k, v in match.items()):
                        return ev
                if not self.proc.running:
                    raise RuntimeError(f"vduproxy exited (rc={self.proc.returncode}):\n{self.proc.output.tail()}")
                await trio.sleep(0.05)

    def requests(self) -> list[str]:
        """Names of the vhost-user requests the proxy received, in order."""
        return [str(ev.get("request")) for ev in self.events("vhost_user_request")]


@contextlib.asynccontextmanager
async def open_proxy(
    socket: Path,
    device: str = "sim",
    args: Sequence[str] = (),
    *,
    log_dir: Path | None = None,
    name: str = "vduproxy",
    wait_listening: bool = True,
    log_level: str = "debug",
) -> AsyncIterator[ProxyProcess]:
    """Start `python -m vduproxy serve` on `socket`, wait until it listens, always stop it by PID.

    log_level: tests want every event; a benchmark runs the proxy as an operator would (info)."""
    argv = [
        sys.executable,
        "-m",
        "vduproxy",
        "--log-level",
        log_level,
        "--log-format",
        "json",
        "serve",
        "--socket",
        str(socket),
        "--device",
        device,
        *args,
    ]
    proc = ManagedProcess(name, argv, log_path=None if log_dir is None else log_dir / f"{name}.log")
    async with open_service_nursery() as nursery:
        await proc.start(nursery)
        proxy = ProxyProcess(proc, socket)
        try:
            if wait_listening:
                await proxy.wait_event("listening" if "--client" not in args else "device_ready")
            yield proxy
        finally:
            await proc.terminate(grace=10)
