"""One process, many vhost-user socket ↔ vDPA device pairs, each isolated from the others.

Every pair runs in its own task with its own nursery (the server's): a device that fails to open, a socket that
cannot be bound, or a back-end that dies ends that pair only; it is logged, marked `failed` with the reason, and
reported by `stats`, while the other pairs keep serving. The daemon exits (status 1) only when every pair has
failed, because then it serves nothing.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import structlog
import trio

from . import __version__
from .config import DaemonConfig, PairConfig
from .control import ControlError, TraceHub, serve_control
from .log import get_logger

if TYPE_CHECKING:
    from .dataplane import DataPlaneFactory, DeviceSession

log = get_logger(__name__)

PAIR_STATES = ("starting", "running", "failed", "stopped")


@dataclasses.dataclass
class PairRuntime:
    config: PairConfig
    state: str = "starting"
    error: str | None = None
    since: float = dataclasses.field(default_factory=time.time)
    factory: DataPlaneFactory | None = None
    device_desc: str | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def session(self) -> DeviceSession | None:
        return None if self.factory is None else self.factory.session

    def set_state(self, state: str, error: str | None = None) -> None:
        self.state, self.error, self.since = state, error, time.time()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "state": self.state,
            "error": self.error,
            "since": round(self.since, 3),
            **self.config.describe(),
        }
        session = self.session
        if session is not None and self.state == "running":
            out.update(session.stats())
        return out


class Daemon:
    """Runs the pairs of a `DaemonConfig`, the control socket and the optional metrics endpoint."""

    def __init__(self, config: DaemonConfig, *, trace: TraceHub | None = None, print_qemu_args: bool = False) -> None:
        self.config = config
        self.trace = trace if trace is not None else TraceHub()
        self.pairs = {p.name: PairRuntime(p) for p in config.pairs}
        self.started = time.time()
        self.print_qemu_args = print_qemu_args
        self._all_failed = trio.Event()

    @property
    def all_failed(self) -> bool:
        return all(p.state == "failed" for p in self.pairs.values())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled, or until every pair has failed. Control and metrics sockets bind first, so a
        clash with another daemon fails the start (ServerError/OSError) before any device is touched."""
        async with trio.open_nursery() as nursery:
            if self.config.control is not None:
                await nursery.start(serve_control, self.config.control, self)
            if self.config.metrics is not None:
                from .prometheus import serve_metrics

                host, port = self.config.metrics
                await nursery.start(serve_metrics, host, port, self.stats)
            for pair in self.pairs.values():
                await nursery.start(self._run_pair, pair)
            log.info(
                "daemon_ready", pairs=len(self.pairs),
                running=sorted(p.name for p in self.pairs.values() if p.state == "running"),
                failed=sorted(p.name for p in self.pairs.values() if p.state == "failed"),
            )  # fmt: skip
            task_status.started()
            if self.all_failed:
                self._all_failed.set()
            await self._all_failed.wait()
            log.error("daemon_stopping", reason="every pair has failed")
            nursery.cancel_scope.cancel()

    async def _run_pair(
        self, pair: PairRuntime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """One pair, start to end. Reports `started` once the pair listens (or has failed), never raises."""
        from .dataplane import open_dataplane_factory
        from .server import serve_client, serve_unix

        cfg = pair.config
        # Every event logged by this task and the connection tasks it spawns carries the pair's name.
        structlog.contextvars.bind_contextvars(pair=pair.name)
        started = False
        try:
            try:
                pair.factory, pair.device_desc = open_dataplane_factory(
                    cfg.device, queues=cfg.queues, svq=cfg.svq, mac=cfg.mac, svq_busy_poll_us=cfg.svq_busy_poll_us
                )
            except Exception as exc:
                self._fail(pair, f"device {cfg.device}: {describe_error(exc)}")
                return
            log.info("device_ready", device=pair.device_desc)
            if cfg.restore_state is not None:
                try:
                    session = pair.factory.session
                    if session is None:
                        raise ValueError("this pair has no device to restore into")
                    with open(cfg.restore_state, "rb") as f:
                        session.load_state(f.read())  # refused here when the device cannot honour it
                except Exception as exc:
                    pair.factory.close()
                    self._fail(pair, f"restore state {cfg.restore_state}: {describe_error(exc)}")
                    return
            if self.print_qemu_args:
                from .cli import qemu_args

                print(f"Attach QEMU to pair {pair.name} with:\n  " + qemu_args(cfg.socket), file=sys.stderr, flush=True)
            try:
                if cfg.client:
                    pair.set_state("running")
                    task_status.started()
                    started = True
                    await serve_client(cfg.socket, pair.factory)
                else:

                    async def listen(task_status: trio.TaskStatus[None]) -> None:
                        assert pair.factory is not None
                        await serve_unix(
                            cfg.socket, pair.factory, mode=cfg.socket_mode, group=cfg.socket_group,
                            task_status=task_status,
                        )  # fmt: skip

                    async with trio.open_nursery() as nursery:
                        await nursery.start(listen)
                        pair.set_state("running")
                        task_status.started()
                        started = True
            except Exception as exc:
                self._fail(pair, describe_error(exc))
                return
        finally:
            if pair.state != "failed":
                pair.set_state("stopped")
            if pair.factory is not None:
                with trio.CancelScope(shield=True):
                    try:
                        pair.factory.close()
                    except Exception as exc:
                        log.warning("device_close_failed", error=str(exc))
            if not started:
                task_status.started()

    def _fail(self, pair: PairRuntime, error: str) -> None:
        pair.set_state("failed", error)
        log.error("pair_failed", error=error, socket=pair.config.socket, device=pair.config.device)
        if self.all_failed:
            self._all_failed.set()

    # --- what the control socket calls ----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            "daemon": {
                "version": __version__,
                "pid": os.getpid(),
                "uptime_s": round(time.time() - self.started, 3),
                "trace_clients": self.trace.subscribers,
            },
            "pairs": {name: p.stats() for name, p in self.pairs.items()},
        }

    def _pair(self, name: str | None) -> PairRuntime:
        if name is None:
            if len(self.pairs) == 1:
                return next(iter(self.pairs.values()))
            raise ControlError(
                "unknown_pair", f"this daemon serves several pairs; name one of: {', '.join(self.pairs)}"
            )
        pair = self.pairs.get(name)
        if pair is None:
            raise ControlError("unknown_pair", f"no pair {name!r} (pairs: {', '.join(self.pairs)})")
        return pair

    def _session(self, name: str | None) -> tuple[PairRuntime, DeviceSession]:
        pair = self._pair(name)
        session = pair.session
        if pair.state != "running" or session is None:
            why = f": {pair.error}" if pair.error else ""
            raise ControlError("not_running", f"pair {pair.name} is {pair.state}{why}")
        return pair, session

    async def set_mode(self, name: str | None, mode: str) -> dict[str, Any]:
        from .vdpa.device import DeviceError

        pair, session = self._session(name)
        shadow = {"svq": True, "passthrough": False, "auto": None}[mode]
        try:
            now = await session.force_mode(shadow)
        except DeviceError as exc:
            raise ControlError("device", str(exc)) from None
        log.info("mode_forced", requested=mode, mode=now)
        return {"pair": pair.name, "mode": now, "requested": mode}

    async def save_state(self, name: str | None) -> tuple[str, bytes]:
        from .migration.state import StateError
        from .vdpa.device import DeviceError

        pair, session = self._session(name)
        try:
            blob = session.save_state()
        except (StateError, DeviceError) as exc:
            raise ControlError("state", str(exc)) from None
        log.info("device_state_saved", bytes=len(blob), transport="control")
        return pair.name, blob

    async def load_state(self, name: str | None, blob: bytes) -> str:
        from .migration.state import StateError
        from .vdpa.device import DeviceError

        pair, session = self._session(name)
        try:
            session.load_state(blob)
        except (StateError, DeviceError) as exc:
            raise ControlError("state", str(exc)) from None
        log.info("device_state_loaded", bytes=len(blob), transport="control")
        return pair.name


def describe_error(exc: BaseException) -> str:
    """One line for an error, looking inside the exception groups trio nurseries wrap errors in."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return str(exc) or type(exc).__name__
