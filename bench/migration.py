"""QEMU live-migration downtime with vduproxy vs with DPDK's vhost PMD as the vhost-user back-end (issue 7).

    python -m bench.migration --count 5          # both back-ends, interleaved; prints both medians

One guest per back-end (the real-client tests' kernel, initramfs and 512 MiB, QEMU 7.2 TCG) migrates `count`
times between two local QEMU processes, ping-pong: side A -> B -> A ..., each time into a fresh destination
QEMU (`-incoming defer`). Each side has its own back-end process on its own socket:

- vduproxy: `vduproxy serve --device sim:profile=rich,backend=loopback` (default `--svq auto`, so the source
  proxy switches to its shadow virtqueues when QEMU turns dirty logging on, as in a real migration);
- dpdk: `dpdk-testpmd --no-huge --vdev net_vhost0,iface=SOCK` (DPDK 22.11's vhost library: LOG_ALL and
  SET_LOG_BASE supported), interactive, packet forwarding *stopped* except while the destination's data path
  is checked after a migration.

Both back-ends listen; QEMU connects (`reconnect=1`) with the same -chardev/-netdev/-device options, guest
kernel, memory and migration capabilities. The figure is QEMU's own: `query-migrate` on the source once it
reports "completed" (`downtime`, `total-time`, `setup-time`, all in ms). The `return-path` capability is on
(both ends) by default, so the source only completes once the destination has loaded the state *and*
restarted the VM, which includes starting vhost on the destination back-end (SET_MEM_TABLE, the vrings, ...);
without it QEMU's downtime stops when the source has sent the last byte and leaves the destination back-end
out. QEMU's downtime-limit is 20 ms rather than its default 300 ms (`--downtime-limit 300` for QEMU's), so the
last RAM pass stays ~1 ms instead of adding 8-300 ms of noise that has nothing to do with the back-end.

Every QEMU also runs with a few trace events (`-trace`, log back-end, same for both back-ends), from which
`switchover_phases` splits each downtime into: vhost_stop (source, GET_VRING_BASE of every vring), final_pass,
vhost_start (destination: SET_MEM_TABLE and the vrings, what QEMU waits for), return_path. The back-end's own
log adds ready_after_resume: when its data path was really up, relative to the guest's resume, which QEMU's
figure does not see (QEMU does not wait for a back-end to finish starting its device).

After each migration: the source must be "postmigrate", the destination "running"; the guest's serial agent
must answer on the destination (console alive), and the guest's eth0 must receive frames through the
destination back-end while the guest pings (the sim loopback returns the guest's own frames; testpmd, briefly
forwarding in 5tswap mode, returns them with MACs swapped). Only then is the old source QEMU closed and the
next destination started on its side, once that back-end has seen the disconnect.

Fairness on this 2-core machine: neither back-end polls while QEMU migrates. The sim device and the proxy
are event driven (epoll), and the guest sits idle in its agent, so neither does data-path work during the
migration; testpmd's forwarding lcore sleeps (DPDK workers block on their command pipe) until `start`, and its
vhost library answers the control messages from its own event thread, like vduproxy's trio thread. Forwarding
testpmd during the migration would burn a whole CPU and slow the TCG guest down, to DPDK's disadvantage.
With `compare_downtime` both rigs stay up and the migrations alternate vduproxy, dpdk, vduproxy, ... so the
other back-end's idle guest is in the background of every migration alike.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import trio

from vduproxy.log import configure, get_logger
from vduproxy.testing.dpdk import Testpmd, TestpmdConfig, VhostVdev, open_testpmd
from vduproxy.testing.initramfs import GuestImage, build_initramfs
from vduproxy.testing.procs import open_service_nursery
from vduproxy.testing.proxy import ProxyProcess, open_proxy
from vduproxy.testing.qemu import QEMU_BINARY, GuestConfig, QemuGuest, free_tcp_port

from .report import Summary, parse_proc_stat_ticks, parse_stat_busy_ticks, summarize

log = get_logger(__name__)

Backend = Literal["vduproxy", "dpdk"]
BACKENDS: tuple[Backend, ...] = ("vduproxy", "dpdk")
TARGET_MS = 2.0  # issue 7: vduproxy's median downtime within 2 ms of DPDK's
PROXY_DEVICE = "sim:profile=rich,backend=loopback"
SIDES = ("a", "b")
DEFAULT_PARAMETERS: Mapping[str, Any] = {"downtime-limit": 20}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

BOOT_TIMEOUT = 300.0  # TCG on 2 shared cores: ~5 s quiet, much more under load
QMP_TIMEOUT = 120.0
MIGRATE_TIMEOUT = 600.0
CHECK_TIMEOUT = 120.0
DISCONNECT_TIMEOUT = 60.0
# QEMU's own timeline of the switchover (trace "log" back-end on stderr, so in the QEMU logs too), to see
# which part of the downtime each back-end accounts for; same events on every QEMU of both back-ends.
TRACE_EVENTS = (
    "migration_completion_vm_stop",
    "savevm_state_complete_precopy",
    "migration_return_path_end_*",
    "vhost_dev_st*",
    "vhost_user_set_mem_table_withfd",
    "loadvm_state_setup",
    "qemu_loadvm_state_post_main",
    "migrate_set_state",
    "migrate_send_rp_message",
    "migration_bitmap_sync_end",  # dirty pages found by each sync (why a migration took more iterations)
    "migrate_pending",
)
TRACE_ARGS = ("-msg", "timestamp=on", *(a for ev in TRACE_EVENTS for a in ("-trace", ev)))

# Run in the guest after each migration: frames received by eth0 before and after a short ping.
ALIVE_COMMAND = "vdup_stats; ping -c 3 -i 0.2 -W 1 {peer} > /dev/null 2>&1; sleep 0.5; vdup_stats"
_STATS = re.compile(r"rx_pkts=(\d+) tx_pkts=(\d+)")
# DPDK 22.11's vhost library on a new front-end connection and once it is gone ("link state change" is no
# sign of either: it comes at GET_VRING_BASE too).
_DPDK_OPENED = re.compile(r"new vhost user connection is")
_DPDK_CLOSED = re.compile(r"vhost peer closed")
_DPDK_READY = re.compile(r"virtio is now ready for processing")


class RigError(Exception):
    """The migration rig could not do what it was asked (a migration failed, the guest stopped answering)."""


# ---- settings and results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MigrationSettings:
    """What both back-ends share: guest, QEMU options and migration parameters."""

    mem_mb: int = 512
    return_path: bool = True
    # `migrate-set-parameters` for the source (QEMU's defaults for the rest, recorded in the results). A 20 ms
    # downtime-limit instead of QEMU's 300 ms makes QEMU iterate once more, until a few hundred KB are left
    # instead of 8-12 MB: the last RAM pass, which has nothing to do with the back-end and took 8-300 ms on this
    # shared machine, then takes 1-3 ms, and the downtime is mostly the back-ends' stop and start and the
    # destination QEMU catching up with its input.
    parameters: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_PARAMETERS))
    proxy_device: str = PROXY_DEVICE
    proxy_args: Sequence[str] = ()
    testpmd_mem_mb: int = 256
    testpmd_mbufs: int = 8192
    # main lcore + one forwarding lcore (sleeping while forwarding is stopped), both free to use either CPU
    testpmd_lcores: str = "0@(0-1),1@(0-1)"
    poll_s: float = 0.05  # query-migrate polling interval (the figures come from QEMU, not from this clock)
    settle_s: float = 10.0  # idle time after the guests booted, before the first migration
    trace: bool = True  # TRACE_ARGS on every QEMU: the downtime's phases (see switchover_phases)
    qemu_extra_args: Sequence[str] = ()  # appended to every QEMU
    max_failures: int = 3  # attempts without a sample (the guest is rebooted after each) before giving up

    def qemu_args(self) -> tuple[str, ...]:
        return (*(TRACE_ARGS if self.trace else ()), *self.qemu_extra_args)

    def capabilities(self) -> list[dict[str, Any]]:
        return [{"capability": "return-path", "state": self.return_path}]

    def describe(self) -> dict[str, Any]:
        return {
            "mem_mb": self.mem_mb,
            "capabilities": {c["capability"]: c["state"] for c in self.capabilities()},
            "parameters": dict(self.parameters),
            "proxy_device": self.proxy_device,
            "proxy_args": list(self.proxy_args),
            "qemu_extra_args": list(self.qemu_args()),
            "settle_s": self.settle_s,
            "testpmd": f"--no-huge -m {self.testpmd_mem_mb} --lcores {self.testpmd_lcores} "
            f"--total-num-mbufs={self.testpmd_mbufs}, forwarding stopped during migrations",
        }


@dataclass(frozen=True)
class MigrationTimes:
    """The figures of a completed `query-migrate`, in ms."""

    downtime_ms: float
    total_ms: float
    setup_ms: float | None
    transferred_bytes: int | None
    ram: dict[str, Any]  # query-migrate's "ram" statistics as QEMU reported them


def parse_query_migrate(info: Mapping[str, Any]) -> MigrationTimes:
    """Downtime, total and setup time of a completed migration; ValueError for anything else."""
    status = info.get("status")
    if status != "completed":
        raise ValueError(f"migration not completed: status {status!r} {info.get('error-desc', '')}".rstrip())
    try:
        downtime = float(info["downtime"])
        total = float(info["total-time"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"completed query-migrate without downtime/total-time: {dict(info)!r}") from e
    if downtime < 0 or total < 0:
        raise ValueError(f"negative times in query-migrate: downtime {downtime}, total {total}")
    setup = info.get("setup-time")
    ram = info.get("ram")
    transferred = ram.get("transferred") if isinstance(ram, Mapping) else None
    return MigrationTimes(
        downtime_ms=downtime,
        total_ms=total,
        setup_ms=float(setup) if isinstance(setup, int | float) else None,
        transferred_bytes=int(transferred) if isinstance(transferred, int) else None,
        ram=dict(ram) if isinstance(ram, Mapping) else {},
    )


def parse_guest_stats(output: str) -> list[tuple[int, int]]:
    """Every `rx_pkts=N tx_pkts=M` line of the guest's `vdup_stats`, as (rx, tx)."""
    return [(int(m[1]), int(m[2])) for m in _STATS.finditer(output)]


def rx_delta(output: str) -> int | None:
    """Frames eth0 received between the first and last `vdup_stats` of `output` (None: not two lines)."""
    stats = parse_guest_stats(output)
    if len(stats) < 2:
        return None
    return stats[-1][0] - stats[0][0]


_TRACE = re.compile(r"\b\d+@(\d+\.\d+):(\w+)(?: (.*))?$")

# name -> what it measures; every phase is in ms on the host's clock (all QEMUs share it)
PHASES = {
    "vhost_stop": "source: vhost_dev_stop -> VM stopped (GET_VRING_BASE of every vring)",
    "final_pass": "source: last RAM pass and device state sent",
    "vhost_start": "destination: vhost_dev_start -> migration completed (SET_MEM_TABLE, vrings, ...)",
    "return_path": "source: waiting for the destination to load and start (return path)",
    "stop_to_done": "source: vhost_dev_stop -> migration completed",
    "ready_after_resume": "destination back-end's data path ready (its own log) minus the guest's resume; "
    "> 0: the guest already ran without a working NIC. QEMU's downtime does not include it",
}


# the phases in the per-migration table, with their column labels
TABLE_PHASES = {
    "vhost_stop": "vhost_stop",
    "final_pass": "final_pass",
    "vhost_start": "vhost_start",
    "return_path": "return_path",
    "ready_after_resume": "ready_late",
}


@dataclass(frozen=True)
class TraceEvent:
    t: float  # seconds since the epoch, as QEMU's log back-end prints it with -msg timestamp=on
    name: str
    args: str


def parse_trace(text: str) -> list[TraceEvent]:
    """The `TID@SECONDS:event args` lines of QEMU's trace log back-end in `text`, in order."""
    events = []
    for line in text.splitlines():
        m = _TRACE.search(line)
        if m is not None:
            events.append(TraceEvent(float(m[1]), m[2], (m[3] or "").strip()))
    return events


def _first(events: Sequence[TraceEvent], name: str, args: str | None = None, after: float = 0.0) -> float | None:
    for ev in events:
        if ev.name == name and ev.t >= after and (args is None or ev.args == args):
            return ev.t
    return None


def switchover_phases(source: Sequence[TraceEvent], destination: Sequence[TraceEvent]) -> dict[str, float]:
    """The downtime's phases (PHASES), in ms, from the last outgoing migration in `source`'s trace and the
    incoming one in `destination`'s; a phase whose events are missing is left out."""
    setups = [ev.t for ev in source if ev.name == "migrate_set_state" and ev.args == "new state setup"]
    start = setups[-1] if setups else 0.0
    stop = _first(source, "vhost_dev_stop", after=start)
    stopped = _first(source, "migration_completion_vm_stop", after=start)
    complete = _first(source, "savevm_state_complete_precopy", after=start)
    rp_before = _first(source, "migration_return_path_end_before", after=start)
    rp_after = _first(source, "migration_return_path_end_after", after=start)
    done = _first(source, "migrate_set_state", "new state completed", after=start)
    loading = _first(destination, "loadvm_state_setup")
    dst_start = _first(destination, "vhost_dev_start", after=loading) if loading is not None else None
    dst_done = _first(destination, "migrate_set_state", "new state completed", after=dst_start) if dst_start else None
    spans = {
        "vhost_stop": (stop, stopped),
        "final_pass": (complete, rp_before if rp_before is not None else done),
        "vhost_start": (dst_start, dst_done),
        "return_path": (rp_before, rp_after),
        "stop_to_done": (stop, done),
    }
    return {
        name: round((b - a) * 1000.0, 3) for name, (a, b) in spans.items() if a is not None and b is not None and b >= a
    }


def resumed_at(destination: Sequence[TraceEvent]) -> float | None:
    """When the destination QEMU finished its incoming migration and runs the guest (epoch s)."""
    loading = _first(destination, "loadvm_state_setup")
    if loading is None:
        return None
    return _first(destination, "migrate_set_state", "new state completed", after=loading)


def proxy_ready_at(events: Sequence[Mapping[str, Any]], vqs: Sequence[int] = (0, 1)) -> float | None:
    """The first `device_started` event covering every vq of `vqs`, as epoch seconds (structlog's ISO time)."""
    for ev in events:
        started = ev.get("vqs")
        if ev.get("event") == "device_started" and isinstance(started, list) and set(vqs) <= set(started):
            try:
                return datetime.fromisoformat(str(ev["timestamp"]).replace("Z", "+00:00")).timestamp()
            except (KeyError, ValueError):
                return None
    return None


@dataclass
class MigrationSample:
    index: int  # 1-based, per back-end
    source: str  # side name, "a" or "b"
    destination: str
    downtime_ms: float
    total_ms: float
    setup_ms: float | None
    transferred_bytes: int | None
    wall_s: float  # from `migrate` to seeing "completed" (includes polling; the QEMU figures are the ones)
    console_ok: bool
    rx_frames: int | None  # frames the guest received through the destination back-end after the switchover
    load1: float  # 1-minute load average just before the migration
    # CPU time (utime + stime, all threads, 10 ms ticks) each back-end process used from `migrate` to "completed"
    backend_cpu_ms: dict[str, float] = field(default_factory=dict)
    machine_busy_pct: float | None = None  # all CPUs, everyone's processes, from `migrate` to "completed"
    phases_ms: dict[str, float] = field(default_factory=dict)  # switchover_phases (QEMU trace)
    ram: dict[str, Any] = field(default_factory=dict)

    @property
    def net_ok(self) -> bool:
        return self.rx_frames is not None and self.rx_frames > 0

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "net_ok": self.net_ok}


@dataclass
class DowntimeResult:
    backend: Backend
    samples: list[MigrationSample] = field(default_factory=list)
    error: str | None = None  # why the run stopped early, if it did
    parameters: dict[str, Any] = field(default_factory=dict)  # the source's query-migrate-parameters
    logs: str = ""
    pids: list[int] = field(default_factory=list)  # every process the run started (back-ends, QEMUs)
    failures: list[dict[str, Any]] = field(default_factory=list)  # attempts that gave no sample (see record_failure)

    @property
    def downtimes(self) -> list[float]:
        return [s.downtime_ms for s in self.samples]

    def downtime(self) -> Summary | None:
        return summarize(self.downtimes)

    def total(self) -> Summary | None:
        return summarize([s.total_ms for s in self.samples])

    def setup(self) -> Summary | None:
        return summarize([s.setup_ms for s in self.samples if s.setup_ms is not None])

    def phase(self, name: str) -> Summary | None:
        return summarize([s.phases_ms[name] for s in self.samples if name in s.phases_ms])

    def backend_share(self) -> float | None:
        """Median vhost_stop + median vhost_start: the downtime the back-end itself accounts for."""
        stop, start = self.phase("vhost_stop"), self.phase("vhost_start")
        if stop is None or start is None:
            return None
        return stop.median + start.median

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "backend": self.backend,
            "samples": [s.to_json() for s in self.samples],
            "error": self.error,
            "migrate_parameters": self.parameters,
            "logs": self.logs,
            "pids": self.pids,
            "failures": self.failures,
        }
        for name, summary in (("downtime_ms", self.downtime()), ("total_ms", self.total()), ("setup_ms", self.setup())):
            out[name] = _summary_json(summary)
        out["phases_ms"] = {name: _summary_json(self.phase(name)) for name in PHASES}
        return out


def _summary_json(summary: Summary | None) -> dict[str, Any] | None:
    return None if summary is None else {**dataclasses.asdict(summary), "spread": summary.spread}


@dataclass
class DowntimeComparison:
    results: dict[str, DowntimeResult]
    settings: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    started: str = ""
    finished: str = ""

    def difference_ms(self) -> float | None:
        """Median downtime with vduproxy minus median with DPDK (positive: vduproxy is slower)."""
        ours, peer = (self.results.get(b) for b in BACKENDS)
        a = ours.downtime() if ours else None
        b = peer.downtime() if peer else None
        if a is None or b is None:
            return None
        return a.median - b.median

    def target_met(self) -> bool | None:
        diff = self.difference_ms()
        if diff is None:
            return None
        return diff <= TARGET_MS

    def to_json(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "finished": self.finished,
            "settings": self.settings,
            "machine": self.machine,
            "results": {name: r.to_json() for name, r in self.results.items()},
            "difference_ms": self.difference_ms(),
            "target_ms": TARGET_MS,
            "target_met": self.target_met(),
        }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def render_text(cmp: DowntimeComparison) -> str:
    """Every migration, both medians and the difference, and where the downtime went, for a terminal."""
    lines = ["QEMU live migration downtime (query-migrate on the source, ms)"]
    if cmp.settings:
        caps = ", ".join(f"{k}={'on' if v else 'off'}" for k, v in cmp.settings.get("capabilities", {}).items())
        params = ", ".join(f"{k}={v}" for k, v in cmp.settings.get("parameters", {}).items())
        lines.append(
            f"guest {cmp.settings.get('mem_mb')} MiB; capabilities: {caps or '-'}; parameters: {params or '-'}"
        )
    git = cmp.machine.get("git") or {}
    if git:
        modified = ", ".join(git.get("modified") or []) or "none"
        lines.append(
            f"{cmp.machine.get('qemu', 'QEMU ?')}; DPDK {cmp.machine.get('dpdk', '?')}; "
            f"vduproxy git {git.get('revision', '?')}, uncommitted: {modified}"
        )
    lines.append("")
    head = f"{'back-end':<9} {'#':>2} {'dir':<4} {'downtime':>8} {'total':>6} {'setup':>5}"
    head += "".join(f" {label:>11}" for label in TABLE_PHASES.values())
    lines.append(head + f" {'busy%':>5}  alive")
    for name, res in cmp.results.items():
        for s in res.samples:
            alive = ("console" if s.console_ok else "NO CONSOLE") + (
                f", rx {s.rx_frames}" if s.net_ok else ", NO FRAMES RECEIVED"
            )
            row = f"{name:<9} {s.index:>2} {s.source}>{s.destination:<2} {s.downtime_ms:>8.0f} {s.total_ms:>6.0f} "
            row += f"{_fmt(s.setup_ms, 0):>5}"
            row += "".join(f" {_fmt(s.phases_ms.get(p)):>11}" for p in TABLE_PHASES)
            lines.append(row + f" {_fmt(s.machine_busy_pct, 0):>5}  {alive}")
    for name, res in cmp.results.items():
        for f in res.failures:
            qm = f.get("query_migrate") or {}
            lines.append(
                f"{name:<9} attempt {f['attempt']} FAILED while {f['stage']}"
                + (f" (QEMU downtime {qm['downtime']} ms)" if "downtime" in qm else "")
                + f": {str(f['error']).splitlines()[0][:160]}"
            )
    lines.append("")
    for name, res in cmp.results.items():
        d = res.downtime()
        if d is None:
            lines.append(f"{name}: no completed migration" + (f" ({res.error})" if res.error else ""))
            continue
        t = res.total()
        lines.append(
            f"{name}: median downtime {d.median:.1f} ms (min {d.minimum:.0f}, max {d.maximum:.0f}, n={d.count}); "
            f"median total {_fmt(t.median if t else None)} ms" + (f"; stopped early: {res.error}" if res.error else "")
        )
    diff = cmp.difference_ms()
    if diff is not None:
        verdict = "met" if cmp.target_met() else "NOT met"
        lines.append(f"difference (vduproxy - dpdk): {diff:+.1f} ms; target <= {TARGET_MS:.0f} ms: {verdict}")
    shares = {name: res.backend_share() for name, res in cmp.results.items()}
    if any(v is not None for v in shares.values()):
        lines += ["", "The back-end's own share (QEMU trace, medians, ms): vhost_stop + vhost_start"]
        for name, res in cmp.results.items():
            stop, start = res.phase("vhost_stop"), res.phase("vhost_start")
            late = res.phase("ready_after_resume")
            lines.append(
                f"{name}: vhost_stop {_fmt(stop.median if stop else None)}, "
                f"vhost_start {_fmt(start.median if start else None)}, sum {_fmt(shares[name])}"
                + ("" if late is None else f"; data path ready {late.median:+.1f} ms after the guest resumed")
            )
    return "\n".join(lines)


# ---- back-ends -------------------------------------------------------------------------------------------


class _Side(Protocol):
    """One back-end process serving one QEMU (the source or the destination) on one socket."""

    name: str
    socket: Path

    def open_connections(self) -> int:
        """Front-end connections accepted and not yet seen closed."""
        ...

    def alive(self) -> bool: ...

    def mark(self) -> int:
        """A position in the back-end's log: `ready_at` looks only at what comes after it."""
        ...

    def ready_at(self, mark: int) -> float | None:
        """Wall-clock time (epoch s) the back-end reported its data path ready after `mark`, if it has."""
        ...

    async def start_traffic(self) -> None: ...

    async def stop_traffic(self) -> None: ...

    def pid(self) -> int: ...


class _ProxySide:
    def __init__(self, name: str, socket: Path, proxy: ProxyProcess) -> None:
        self.name, self.socket, self.proxy = name, socket, proxy

    def open_connections(self) -> int:
        return len(self.proxy.events("frontend_connected")) - len(self.proxy.events("frontend_disconnected"))

    def alive(self) -> bool:
        return self.proxy.proc.running

    def mark(self) -> int:
        return len(self.proxy.events())

    def ready_at(self, mark: int) -> float | None:
        return proxy_ready_at(self.proxy.events()[mark:])

    async def start_traffic(self) -> None:
        """The sim loopback is always on (and idle without guest traffic)."""

    async def stop_traffic(self) -> None:
        pass

    def pid(self) -> int:
        return self.proxy.pid


class _TestpmdSide:
    def __init__(self, name: str, socket: Path, pmd: Testpmd) -> None:
        self.name, self.socket, self.pmd = name, socket, pmd

    def open_connections(self) -> int:
        text = self.pmd.output.text()
        return len(_DPDK_OPENED.findall(text)) - len(_DPDK_CLOSED.findall(text))

    def alive(self) -> bool:
        return self.pmd.process.running

    def mark(self) -> int:
        return self.pmd.output.mark()

    def ready_at(self, mark: int) -> float | None:
        found = self.pmd.output.search(_DPDK_READY, since=mark)
        if found is None:
            return None
        # LineLog times are monotonic, from when the output pump read the line (a few ms late at worst)
        return self.pmd.output.t0 + self.pmd.output.lines[found[0]].t + time.time() - time.monotonic()

    async def start_traffic(self) -> None:
        await self.pmd.start_forwarding()

    async def stop_traffic(self) -> None:
        await self.pmd.stop_forwarding()

    def pid(self) -> int:
        return self.pmd.pid


@contextlib.asynccontextmanager
async def _open_side(
    backend: Backend, name: str, socket: Path, settings: MigrationSettings, log_dir: Path
) -> AsyncIterator[_Side]:
    if backend == "vduproxy":
        async with open_proxy(
            socket, settings.proxy_device, settings.proxy_args, log_dir=log_dir, name=f"vduproxy-{name}"
        ) as proxy:
            yield _ProxySide(name, socket, proxy)
    else:
        config = TestpmdConfig(
            vdevs=[VhostVdev(socket)],
            forward_mode="5tswap",
            interactive=True,
            lcores=settings.testpmd_lcores,
            nb_cores=1,
            mem_mb=settings.testpmd_mem_mb,
            total_mbufs=settings.testpmd_mbufs,
        )
        async with open_testpmd(config, name=f"testpmd-{name}", log_dir=log_dir) as pmd:
            yield _TestpmdSide(name, socket, pmd)


# ---- the rig ---------------------------------------------------------------------------------------------


def cpu_ms(pid: int) -> float | None:
    """utime + stime of a live process (all its threads) in ms; None if it is gone."""
    try:
        ticks = parse_proc_stat_ticks(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError):
        return None
    return ticks * 1000.0 / CLOCK_TICKS


def _busy_ticks() -> int | None:
    try:
        return parse_stat_busy_ticks(Path("/proc/stat").read_text())
    except (OSError, ValueError):
        return None


def _load1() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return -1.0


async def wait_idle(side: _Side, timeout: float) -> None:
    """Until `side`'s back-end has seen every front-end connection close (a new QEMU may then connect)."""
    with trio.fail_after(timeout):
        while side.open_connections() > 0:
            if not side.alive():
                raise RigError(f"back-end {side.name} exited")
            await trio.sleep(0.05)


class MigrationRig:
    """One guest on one back-end type, migrating ping-pong between sides a and b. Use `open_rig()`."""

    def __init__(
        self,
        backend: Backend,
        sides: Sequence[_Side],
        base: GuestConfig,
        settings: MigrationSettings,
        nursery: trio.Nursery,
        log_dir: Path,
    ) -> None:
        self.backend = backend
        self.sides = list(sides)
        self.base = base
        self.settings = settings
        self.nursery = nursery
        self.log_dir = log_dir
        self.result = DowntimeResult(backend, logs=str(log_dir), pids=[s.pid() for s in sides])
        self.guest: QemuGuest | None = None
        self.side = 0  # index of the side the running guest is attached to
        self._guests: list[QemuGuest] = []
        self._seq = 0
        self._attempts = 0
        self._stage = ""
        self._last_info: dict[str, Any] | None = None
        self._log = log.bind(backend=backend)

    @property
    def failed(self) -> bool:
        return self.result.error is not None

    async def _start_guest(self, config: GuestConfig) -> QemuGuest:
        self._seq += 1
        guest = QemuGuest(config, name=f"{self.backend}-q{self._seq}", log_dir=self.log_dir)
        self._guests.append(guest)
        await guest.start(self.nursery)
        self.result.pids.append(guest.pid)
        return guest

    async def boot(self) -> None:
        guest = await self._start_guest(dataclasses.replace(self.base, socket=self.sides[0].socket))
        marker = await guest.wait_marker(timeout=BOOT_TIMEOUT)
        if not marker.carrier:
            raise RigError(f"{self.backend}: the guest's eth0 has no carrier")
        await guest.run("true", timeout=BOOT_TIMEOUT)  # the serial agent is up
        self.guest, self.side = guest, 0
        if not await self._check_alive(guest, self.sides[0]):
            raise RigError(f"{self.backend}: the guest received no frame through its back-end before migrating")
        self.result.parameters = dict(await guest.qmp("query-migrate-parameters", timeout=QMP_TIMEOUT))
        self._log.info("guest booted", uptime=marker.uptime, features=hex(marker.features))

    async def _check_alive(self, guest: QemuGuest, side: _Side) -> int | None:
        """The serial agent must answer (else OutputTimeout); returns the frames eth0 received while it pinged."""
        await side.start_traffic()
        try:
            res = await guest.run(ALIVE_COMMAND.format(peer=self.base.peer), timeout=CHECK_TIMEOUT)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(60):
                await side.stop_traffic()
        if res.rc != 0:
            raise RigError(f"{self.backend}: guest check command failed rc={res.rc}: {res.output}")
        return rx_delta(res.output)

    async def migrate_once(self) -> MigrationSample:
        src, src_side = self.guest, self.sides[self.side]
        if src is None:
            raise RigError("no guest running")
        self._attempts += 1
        self._last_info = None
        self._stage = "preparing (destination QEMU, capabilities)"
        dst_index = 1 - self.side
        dst_side = self.sides[dst_index]
        dst_mark = dst_side.mark()
        dst = await self._start_guest(dataclasses.replace(self.base, socket=dst_side.socket, incoming="defer"))
        # also waits for QMP, which QEMU only serves once its back-end has answered on the socket
        status = (await dst.qmp("query-status", timeout=QMP_TIMEOUT))["status"]
        if status != "inmigrate":
            raise RigError(f"destination QEMU is {status!r}, expected 'inmigrate'")
        caps = self.settings.capabilities()
        await dst.qmp("migrate-set-capabilities", {"capabilities": caps}, timeout=QMP_TIMEOUT)
        port = free_tcp_port()
        uri = f"tcp:127.0.0.1:{port}"
        await dst.migrate_incoming(uri)
        await src.qmp("migrate-set-capabilities", {"capabilities": caps}, timeout=QMP_TIMEOUT)
        if self.settings.parameters:
            await src.qmp("migrate-set-parameters", dict(self.settings.parameters), timeout=QMP_TIMEOUT)
        self._stage = "migrating"
        load1 = _load1()
        cpu0 = {side.name: cpu_ms(side.pid()) for side in (src_side, dst_side)}
        busy0 = _busy_ticks()
        t0 = time.monotonic()
        info = await src.migrate(uri, timeout=MIGRATE_TIMEOUT, poll=self.settings.poll_s)
        wall = time.monotonic() - t0
        busy1 = _busy_ticks()
        cpu1 = {side.name: cpu_ms(side.pid()) for side in (src_side, dst_side)}
        busy = None
        if busy0 is not None and busy1 is not None and wall > 0:
            busy = round(100.0 * (busy1 - busy0) / CLOCK_TICKS / wall / (os.cpu_count() or 1), 1)
        backend_cpu = {}
        for role, side in (("source", src_side), ("destination", dst_side)):
            before, after = cpu0[side.name], cpu1[side.name]
            if before is not None and after is not None:
                backend_cpu[role] = after - before
        self._last_info = info
        times = parse_query_migrate(info)
        self._stage = "checking the guest on the destination"
        src_status, dst_status = await src.query_status(), await dst.query_status()
        if (src_status, dst_status) != ("postmigrate", "running"):
            raise RigError(f"after migration: source {src_status!r}, destination {dst_status!r}")
        frames = await self._check_alive(dst, dst_side)
        dst_trace = parse_trace(dst.output.text())
        phases = switchover_phases(parse_trace(src.output.text()), dst_trace)
        resumed, ready = resumed_at(dst_trace), dst_side.ready_at(dst_mark)
        if resumed is not None and ready is not None:
            phases["ready_after_resume"] = round((ready - resumed) * 1000.0, 3)
        sample = MigrationSample(
            index=len(self.result.samples) + 1,
            source=src_side.name,
            destination=dst_side.name,
            downtime_ms=times.downtime_ms,
            total_ms=times.total_ms,
            setup_ms=times.setup_ms,
            transferred_bytes=times.transferred_bytes,
            wall_s=round(wall, 3),
            console_ok=True,  # else _check_alive raised
            rx_frames=frames,
            load1=load1,
            backend_cpu_ms=backend_cpu,
            machine_busy_pct=busy,
            phases_ms=phases,
            ram=times.ram,
        )
        self.result.samples.append(sample)
        self._log.info(
            "migration measured",
            n=sample.index,
            direction=f"{sample.source}>{sample.destination}",
            downtime_ms=sample.downtime_ms,
            total_ms=sample.total_ms,
            setup_ms=sample.setup_ms,
            rx_frames=frames,
            phases=phases,
            busy_pct=busy,
        )
        # The old source goes; its back-end must see the disconnect before the next destination connects.
        self._stage = "closing the source"
        await src.aclose()
        await wait_idle(src_side, DISCONNECT_TIMEOUT)
        self.guest, self.side = dst, dst_index
        return sample

    def record_failure(self, exc: BaseException) -> None:
        """A migration attempt that produced no sample: kept in the results with how far it got."""
        failure: dict[str, Any] = {"attempt": self._attempts, "stage": self._stage, "error": _describe_error(exc)}
        if self._last_info is not None:
            failure["query_migrate"] = self._last_info
        self.result.failures.append(failure)
        self._log.error("migration attempt failed", **failure)

    async def recover(self) -> None:
        """After a failed attempt: every QEMU of this rig goes, and a fresh guest boots on side a."""
        await self.aclose()
        for side in self.sides:
            await wait_idle(side, DISCONNECT_TIMEOUT)
        await self.boot()
        await trio.sleep(self.settings.settle_s)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for guest in reversed(self._guests):
                await guest.aclose()
        self.guest = None


@contextlib.asynccontextmanager
async def open_rig(
    backend: Backend, image: GuestImage, settings: MigrationSettings, log_dir: Path
) -> AsyncIterator[MigrationRig]:
    """Both back-end processes, and the guest booted on side a; everything torn down by PID on exit."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown back-end {backend!r} (known: {', '.join(BACKENDS)})")
    sock_dir = Path(tempfile.mkdtemp(prefix="vdup-mig-", dir="/tmp"))
    rig_logs = log_dir / backend
    rig_logs.mkdir(parents=True, exist_ok=True)
    base = GuestConfig(
        kernel=image.kernel,
        initrd=image.initrd,
        peermac=None,
        mem_mb=settings.mem_mb,
        extra_args=settings.qemu_args(),
    )
    try:
        async with contextlib.AsyncExitStack() as stack:
            sides = [
                await stack.enter_async_context(
                    _open_side(backend, name, sock_dir / f"{name}.sock", settings, rig_logs)
                )
                for name in SIDES
            ]
            nursery = await stack.enter_async_context(open_service_nursery())
            rig = MigrationRig(backend, sides, base, settings, nursery, rig_logs)
            stack.push_async_callback(rig.aclose)
            await rig.boot()
            yield rig
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def _describe_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 2000 else text[:2000] + " ..."


async def _run_interleaved(
    backends: Sequence[Backend],
    count: int,
    log_dir: Path,
    image: GuestImage,
    settings: MigrationSettings,
    on_sample: Callable[[Backend, MigrationSample], None] | None = None,
) -> dict[str, DowntimeResult]:
    results: dict[str, DowntimeResult] = {b: DowntimeResult(b, logs=str(log_dir / b)) for b in backends}
    async with contextlib.AsyncExitStack() as stack:
        rigs: list[MigrationRig] = []
        for backend in backends:  # booted one after the other: two TCG boots at once only slow both
            try:
                rig = await stack.enter_async_context(open_rig(backend, image, settings, log_dir))
            except Exception as e:
                log.error("rig failed to start", backend=backend, error=_describe_error(e))
                results[backend].error = f"set-up: {_describe_error(e)}"
                continue
            results[backend] = rig.result
            rigs.append(rig)
        if rigs:
            # a guest that just booted is still busy
            await trio.sleep(settings.settle_s)
        while True:
            pending = [r for r in rigs if not r.failed and len(r.result.samples) < count]
            if not pending:
                break
            for rig in pending:  # one attempt each per round: vduproxy, dpdk, vduproxy, dpdk, ...
                try:
                    sample = await rig.migrate_once()
                except Exception as e:
                    rig.record_failure(e)
                    if len(rig.result.failures) > settings.max_failures:
                        rig.result.error = f"{len(rig.result.failures)} failed attempts; last: {_describe_error(e)}"
                        await rig.aclose()  # its QEMUs now; its back-ends at the end (trio scopes close LIFO)
                        continue
                    try:
                        await rig.recover()
                    except Exception as e2:
                        log.error("rig recovery failed", backend=rig.backend, error=_describe_error(e2))
                        rig.result.error = f"recovery failed: {_describe_error(e2)}"
                        await rig.aclose()
                    continue
                if on_sample is not None:
                    on_sample(rig.backend, sample)
    return results


def _default_log_dir(log_dir: Path | None) -> Path:
    d = log_dir or Path(tempfile.mkdtemp(prefix="vdup-mig-logs-", dir="/tmp"))
    d.mkdir(parents=True, exist_ok=True)
    return d


async def measure_downtime(
    backend: Backend,
    *,
    count: int = 5,
    log_dir: Path,
    settings: MigrationSettings | None = None,
    image: GuestImage | None = None,
) -> DowntimeResult:
    """Migrate one guest `count` times on `backend` ("vduproxy" or "dpdk"); QEMU's downtime of each.

    An attempt that fails (a migration, a guest that stops answering) is kept in `failures` and the guest is
    booted afresh; after `settings.max_failures` of them, or a failed set-up, the run stops early with the
    samples so far and `error` set. Process logs go to `log_dir/<backend>/`.
    """
    results = await _run_interleaved(
        [backend], count, _default_log_dir(log_dir), image or build_initramfs(), settings or MigrationSettings()
    )
    return results[backend]


async def _qemu_version() -> str:
    try:
        res = await trio.run_process([QEMU_BINARY, "--version"], capture_stdout=True, check=False)
    except OSError:
        return "unknown"
    return res.stdout.decode(errors="replace").splitlines()[0] if res.stdout else "unknown"


async def _dpdk_version() -> str:
    try:
        res = await trio.run_process(
            ["dpkg-query", "-W", "-f", "${Version}", "dpdk-dev"], capture_stdout=True, capture_stderr=True, check=False
        )
    except OSError:
        return "unknown"
    return res.stdout.decode(errors="replace").strip() or "unknown"


async def _git_state() -> dict[str, Any]:
    """The revision measured and the files changed on top of it (other engineers share this tree)."""
    repo = Path(__file__).resolve().parent.parent
    out: dict[str, Any] = {}
    for key, argv in (
        ("revision", ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"]),
        # --no-optional-locks: never touch the index while others commit in this tree
        ("modified", ["git", "--no-optional-locks", "-C", str(repo), "status", "--porcelain", "--", "vduproxy"]),
    ):
        try:
            res = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
        except OSError:
            continue
        text = res.stdout.decode(errors="replace")
        out[key] = text.strip() if key == "revision" else [line[3:] for line in text.splitlines() if line[3:]]
    return out


async def compare_downtime(
    *,
    count: int = 5,
    log_dir: Path | None = None,
    backends: Sequence[Backend] = BACKENDS,
    settings: MigrationSettings | None = None,
    image: GuestImage | None = None,
    on_sample: Callable[[Backend, MigrationSample], None] | None = None,
) -> DowntimeComparison:
    """Both back-ends in one run, migrations interleaved (vduproxy, dpdk, vduproxy, ...), `count` each."""
    settings = settings or MigrationSettings()
    logs = _default_log_dir(log_dir)
    cmp = DowntimeComparison(results={}, settings=settings.describe())
    cmp.started = datetime.now(UTC).isoformat(timespec="seconds")
    cmp.machine = {
        "qemu": await _qemu_version(),
        "dpdk": await _dpdk_version(),
        "git": await _git_state(),
        "load_start": _load1(),
        "logs": str(logs),
    }
    cmp.results = await _run_interleaved(backends, count, logs, image or build_initramfs(), settings, on_sample)
    cmp.machine["pids"] = [pid for r in cmp.results.values() for pid in r.pids]
    cmp.machine["load_end"] = _load1()
    cmp.finished = datetime.now(UTC).isoformat(timespec="seconds")
    return cmp


# ---- command line ----------------------------------------------------------------------------------------


def leftover_processes(pids: Sequence[int]) -> list[str]:
    """`pgrep -a` lines of QEMU/testpmd/vduproxy processes this run started that are still alive (want none)."""
    wanted = {str(p) for p in pids}
    out = []
    for pattern in ("qemu-system", "dpdk-testpmd", "vduproxy"):
        res = subprocess.run(["pgrep", "-a", "-f", pattern], capture_output=True, text=True, check=False)
        out += [line for line in res.stdout.splitlines() if line.split(" ", 1)[0] in wanted]
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.migration", description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=5, help="migrations per back-end (default 5)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated, in interleaving order")
    p.add_argument("--no-return-path", action="store_true", help="QEMU's downtime without the destination's start")
    p.add_argument(
        "--downtime-limit",
        type=int,
        default=DEFAULT_PARAMETERS["downtime-limit"],
        help="QEMU downtime-limit in ms (default %(default)s; QEMU's own default is 300)",
    )
    p.add_argument("--max-bandwidth", type=int, help="QEMU max-bandwidth in bytes/s (default: QEMU's, 128 MiB/s)")
    p.add_argument("--no-trace", action="store_true", help="no QEMU trace events (and no downtime phases)")
    p.add_argument("--settle", type=float, default=10.0, help="seconds between the boots and the first migration")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--log-dir", type=Path, help="process logs (default: a new /tmp/vdup-mig-logs-* dir)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends or args.count < 1:
        print(f"bad --backends {args.backends!r} or --count {args.count}", file=sys.stderr)
        return 2
    configure(args.log_level, json=False)
    parameters = {"downtime-limit": args.downtime_limit}
    if args.max_bandwidth is not None:
        parameters["max-bandwidth"] = args.max_bandwidth
    settings = MigrationSettings(
        parameters=parameters,
        return_path=not args.no_return_path,
        settle_s=args.settle,
        trace=not args.no_trace,
    )

    def progress(backend: Backend, s: MigrationSample) -> None:
        phases = ", ".join(f"{k} {v:.1f}" for k, v in s.phases_ms.items())
        print(f"{backend} #{s.index} {s.source}>{s.destination}: downtime {s.downtime_ms:.0f} ms, "
              f"total {s.total_ms:.0f} ms, rx {s.rx_frames}; {phases}", flush=True)  # fmt: skip

    order = [b for name in backends for b in BACKENDS if b == name]
    cmp = trio.run(
        lambda: compare_downtime(
            count=args.count, log_dir=args.log_dir, backends=order, settings=settings, on_sample=progress
        )
    )
    print(render_text(cmp))
    print(f"process logs: {cmp.machine['logs']}")
    left = leftover_processes(cmp.machine.get("pids", []))
    if left:
        print("processes still running after the run:\n" + "\n".join(left), file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(cmp.to_json(), indent=2) + "\n", encoding="utf-8")
        print(f"results: {args.json}")
    return 1 if any(r.error for r in cmp.results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
