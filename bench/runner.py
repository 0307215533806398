"""Run every benchmark case in one process, against the peer (DPDK testpmd's vhost PMD) in the same run.

Each case is a *rig*: a sender (testpmd virtio-user, the vhost-user front-end) and a back-end, either a second
testpmd (vhost PMD, the peer) or `vduproxy serve` on the software device. Throughput is the change of a
packet counter over a fixed window after a warm-up, read with `show port stats all`:

- open loop (txonly): the sender's TX-packets. virtio-user counts a packet as sent only once it is in the
  ring, and the 256-slot ring is full in steady state, so over a window this is what the back-end consumed.
  It is the one counter both back-ends share (the sim sink's counters live inside the proxy); for the peer
  the receiver's RX-packets is recorded too, as a cross-check.
- closed loop (io, tx_first): the sender's RX-packets, i.e. frames that made the round trip.

Two cores: the sender's forwarding lcore gets the last CPU, the back-end (testpmd's lcore, or every thread
of the proxy) the first one, so the two pollers never share a CPU with each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from vduproxy import __version__, control
from vduproxy.log import get_logger
from vduproxy.testing.dpdk import PortStats, Testpmd, TestpmdConfig, VhostVdev, VirtioUserVdev, open_testpmd
from vduproxy.testing.proxy import ProxyProcess, open_proxy

from . import report
from .report import BenchRun, Measurement, Status

log = get_logger(__name__)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
PROXY_VQS = [0, 1]  # one queue pair: RX 0, TX 1
LOOP_TX_FIRST = 8  # bursts of 32 put in flight by `start tx_first`, as in the test-bed baseline
MiB = 1024
MACHINE_BUSY = "_machine_busy"
PROXY_LOG = "info"  # as an operator runs it: debug events cost a JSON line each on the control path

OPEN_CASES = ("peer", "passthrough", "svq", "svq-sleep")
LOOP_CASES = ("loop-peer", "loop-passthrough", "loop-svq", "loop-svq-sleep")
# The *-sleep cases turn the SVQ's adaptive busy-poll off (`serve --svq-busy-poll 0`): what it is worth.
# how each proxy case runs the proxy: --svq, and extra `serve` options
PROXY_CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "passthrough": ("never", ()),
    "svq": ("always", ()),
    "svq-sleep": ("always", ("--svq-busy-poll", "0")),
    "loop-passthrough": ("never", ()),
    "loop-svq": ("always", ()),
    "loop-svq-sleep": ("always", ("--svq-busy-poll", "0")),
}
CONTROL_CASES = ("control", "switch", "downtime")
# The same C driver (bench/txgen.c: control plane by the project's front-end, data path in C) on each back-end:
# the sim device alone, and through the proxy; LOG_ALL + SET_LOG_BASE only this front-end sends.
CDRIVER_TX = ("c-device", "c-passthrough", "c-svq", "c-svq-log")
CDRIVER_LOOP = tuple(f"{c}-loop" for c in CDRIVER_TX)
CDRIVER_CASES = CDRIVER_TX + CDRIVER_LOOP
CDRIVER_REF = {
    "c-passthrough": "c-device", "c-svq": "c-device", "c-svq-log": "c-svq",
    "c-passthrough-loop": "c-device-loop", "c-svq-loop": "c-device-loop", "c-svq-log-loop": "c-svq-loop",
}  # fmt: skip
ALL_CASES = OPEN_CASES + LOOP_CASES + CDRIVER_CASES + CONTROL_CASES

TITLES = {
    "peer": "peer: DPDK vhost PMD rxonly",
    "passthrough": "vduproxy passthrough → sim sink",
    "svq": "vduproxy SVQ → sim sink",
    "svq-sleep": "vduproxy SVQ --svq-busy-poll 0 (never polls) → sim sink",
    "device": "sim device alone (= passthrough)",
    "c-device": "C driver → sim sink, no proxy (the device alone)",
    "c-passthrough": "C driver → vduproxy passthrough → sim sink",
    "c-svq": "C driver → vduproxy SVQ → sim sink",
    "c-svq-log": "C driver → vduproxy SVQ, dirty log on (LOG_ALL + SET_LOG_BASE) → sim sink",
    "c-device-loop": "C driver ↔ sim loopback, no proxy (the device alone)",
    "c-passthrough-loop": "C driver ↔ vduproxy passthrough ↔ sim loopback",
    "c-svq-loop": "C driver ↔ vduproxy SVQ ↔ sim loopback",
    "c-svq-log-loop": "C driver ↔ vduproxy SVQ, dirty log on ↔ sim loopback (RX pages logged)",
    "loop-peer": "peer: DPDK vhost PMD macswap",
    "loop-passthrough": "vduproxy passthrough ↔ sim loopback",
    "loop-svq": "vduproxy SVQ ↔ sim loopback",
    "loop-svq-sleep": "vduproxy SVQ --svq-busy-poll 0 (never polls) ↔ sim loopback",
}

CDRIVER_NOTE = (
    "same-driver rows: one C driver (bench/txgen.c, busy-polling like testpmd, EVENT_IDX) on every back-end, so "
    "their ratios compare back-ends only; the row they are divided by is in the 'vs' column"
)
SINK_NOTE = (
    "the sim sink counts TX frames without reading their payload, while the peer's vhost PMD copies every frame "
    "into an mbuf: at 1500 B the peer does more work per packet than the device behind the proxy"
)


class NotAvailable(Exception):
    """The proxy said (or showed) it cannot run this case; reported, not a failure."""


@dataclass(frozen=True)
class Settings:
    repeat: int = 5
    rounds: int = 1
    duration: float = 5.0
    warmup: float = 3.0
    sizes: tuple[int, ...] = (64, 1500)
    loop_size: int = 64
    cases: tuple[str, ...] = ALL_CASES
    connect_cycles: int = 3
    switch_cycles: int = 10
    migrations: int = 5  # per back-end (issue 7: the median of 5)
    mem_mb: int = 512
    svq_wait: float = 5.0  # how long the proxy gets to show a shadow virtqueue after the device started
    out: Path = DEFAULT_OUT
    log_dir: Path | None = None
    quick: bool = False

    def describe(self) -> dict[str, Any]:
        return {
            "repeat": self.repeat,
            "rounds": self.rounds,
            "window_s": self.duration,
            "warmup_s": self.warmup,
            "sizes": list(self.sizes),
            "loop_size": self.loop_size,
            "connect_cycles": self.connect_cycles,
            "switch_cycles": self.switch_cycles,
            "migrations": self.migrations,
            "testpmd_mem_mb": self.mem_mb,
        }


@dataclass
class Rig:
    sender: Testpmd
    receiver: Testpmd | None = None
    proxy: ProxyProcess | None = None

    def pids(self) -> dict[str, int]:
        out = {"sender": self.sender.pid}
        if self.receiver is not None:
            out["receiver"] = self.receiver.pid
        if self.proxy is not None:
            out["proxy"] = self.proxy.pid
        return out


@dataclass(frozen=True)
class Snapshot:
    t: float
    sender: PortStats
    receiver: PortStats | None
    ticks: dict[str, int]


@dataclass
class Context:
    settings: Settings
    sock_dir: Path
    log_dir: Path
    sender_cpu: int
    backend_cpu: int
    run: BenchRun
    rows: dict[tuple[str, int | None], Measurement] = field(default_factory=dict)
    connect_ms: list[float] = field(default_factory=list)
    rss_mib: list[float] = field(default_factory=list)
    hwm_mib: list[float] = field(default_factory=list)
    seq: int = 0

    def lcores(self, cpu: int) -> str:
        # Main lcore (blocked on the CLI) and forwarding lcore on one CPU: the other CPU stays the peer's.
        return f"0@{cpu},1@{cpu}"

    def row(self, case: str, size: int | None, group: str, unit: str = "Mpps", peer: str | None = None) -> Measurement:
        key = (case, size)
        if key not in self.rows:
            m = Measurement(case=case, title=TITLES.get(case, case), group=group, unit=unit, size=size, peer=peer)
            self.rows[key] = m
            self.run.measurements.append(m)
        return self.rows[key]

    def name(self, what: str) -> str:
        self.seq += 1
        return f"{self.seq:02d}-{what}"


# ---- machine facts ----------------------------------------------------------------------------------------


def read_loadavg() -> tuple[float, float, float]:
    return report.parse_loadavg(Path("/proc/loadavg").read_text())


def _proc_ticks(pid: int) -> int:
    try:
        return report.parse_proc_stat_ticks(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError):
        return 0


def proc_memory_mib(pid: int) -> tuple[float, float] | None:
    """(VmRSS, VmHWM) of a live process, in MiB."""
    try:
        fields = report.parse_proc_status_kib(Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return None
    if "VmRSS" not in fields or "VmHWM" not in fields:
        return None
    return fields["VmRSS"] / MiB, fields["VmHWM"] / MiB


def pin_threads(pid: int, cpu: int) -> int:
    """Pin every thread of `pid` (the proxy's trio thread and its native data-path threads) to `cpu`.

    sched_setaffinity acts on one thread, and threads created later inherit from their creator, so this is
    repeated once the data path is up."""
    pinned = 0
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
                os.sched_setaffinity(int(task.name), {cpu})
                pinned += 1
    return pinned


async def _command_output(argv: Sequence[str]) -> tuple[int, str]:
    try:
        res = await trio.run_process(list(argv), capture_stdout=True, capture_stderr=True, check=False)
    except OSError as e:
        return -1, str(e)
    return res.returncode, res.stdout.decode(errors="replace").strip()


async def machine_info() -> dict[str, Any]:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": sorted(os.sched_getaffinity(0)),
        "cpu_model": report.parse_cpu_model(cpuinfo),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_start": list(read_loadavg()),
    }


async def software_info() -> dict[str, Any]:
    rc, dpdk = await _command_output(["dpkg-query", "-W", "-f", "${Version}", "dpdk-dev"])
    _, rev = await _command_output(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"])
    # --no-optional-locks: never touch the index (other engineers commit in this tree).
    dirty_rc, _ = await _command_output(["git", "--no-optional-locks", "-C", str(REPO), "diff", "--quiet", "HEAD"])
    return {
        "dpdk": dpdk if rc == 0 and dpdk else "unknown",
        "testpmd": shutil.which("dpdk-testpmd") or "missing",
        "git_revision": rev or "unknown",
        "git_dirty": dirty_rc == 1,
        "vduproxy_version": __version__,
    }


# ---- rigs ---------------------------------------------------------------------------------------------------


def _sender_config(ctx: Context, sock: Path, mode: str, size: int) -> TestpmdConfig:
    return TestpmdConfig(
        vdevs=[VirtioUserVdev(sock)],
        forward_mode=mode,
        lcores=ctx.lcores(ctx.sender_cpu),
        mem_mb=ctx.settings.mem_mb,
        txpkts=size,
    )


@contextlib.asynccontextmanager
async def peer_rig(ctx: Context, sender_mode: str, receiver_mode: str, size: int) -> AsyncIterator[Rig]:
    sock = ctx.sock_dir / "peer.sock"
    be_cfg = TestpmdConfig(
        vdevs=[VhostVdev(sock)],
        forward_mode=receiver_mode,
        lcores=ctx.lcores(ctx.backend_cpu),
        mem_mb=ctx.settings.mem_mb,
    )
    async with open_testpmd(be_cfg, name=ctx.name("peer-vhost"), log_dir=ctx.log_dir) as be:
        cfg = _sender_config(ctx, sock, sender_mode, size)
        async with open_testpmd(cfg, name=ctx.name("virtio-user"), log_dir=ctx.log_dir) as fe:
            await be.output.wait_for(r"virtio is now ready|new device", timeout=60)
            await be.start_forwarding()
            yield Rig(sender=fe, receiver=be)


@contextlib.asynccontextmanager
async def proxy_rig(
    ctx: Context, sender_mode: str, backend: str, svq: str, size: int, extra: Sequence[str] = ()
) -> AsyncIterator[Rig]:
    sock = ctx.sock_dir / "vdu.sock"
    device = f"sim:profile=rich,backend={backend}"
    name = ctx.name(f"vduproxy-{svq}")
    try:
        async with open_proxy(
            sock, device, ["--svq", svq, *extra], log_dir=ctx.log_dir, name=name, log_level=PROXY_LOG
        ) as proxy:
            pin_threads(proxy.pid, ctx.backend_cpu)
            cfg = _sender_config(ctx, sock, sender_mode, size)
            async with open_testpmd(cfg, name=ctx.name("virtio-user"), log_dir=ctx.log_dir) as fe:
                await proxy.wait_event("device_started", timeout=60, vqs=PROXY_VQS)
                if svq == "always":
                    await _require_svq(ctx, proxy)
                pin_threads(proxy.pid, ctx.backend_cpu)
                try:
                    yield Rig(sender=fe, proxy=proxy)
                finally:
                    _record_proxy_memory(ctx, proxy)
            ctx.connect_ms += report.connect_to_started_ms(proxy.events(), PROXY_VQS)
    except NotAvailable:
        raise
    except Exception as exc:
        # A proxy that refuses `--svq always` may exit or fail the connection: its log says why.
        if svq == "always":
            verdict, why = report.svq_evidence(_events_of(ctx.log_dir / f"{name}.log"))
            if verdict is False:
                raise NotAvailable(why) from exc
        raise


def _events_of(path: Path) -> list[dict[str, Any]]:
    """JSON events from a process log file written by LineLog ("[   t] line")."""
    out: list[dict[str, Any]] = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            _, _, text = line.partition("] ")
            if text.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(text))
    return out


async def _require_svq(ctx: Context, proxy: ProxyProcess) -> None:
    """Wait (bounded) for the proxy to show a shadow virtqueue; NotAvailable if it refuses or stays silent."""
    with trio.move_on_after(ctx.settings.svq_wait):
        while True:
            verdict, why = report.svq_evidence(proxy.events())
            if verdict is True:
                log.info("svq_active", evidence=why)
                return
            if verdict is False:
                raise NotAvailable(why)
            await trio.sleep(0.1)
    raise NotAvailable(
        "the proxy accepted --svq always but logged no shadow virtqueue within "
        f"{ctx.settings.svq_wait:.0f} s after device_started (the data path still runs passthrough)"
    )


def _record_proxy_memory(ctx: Context, proxy: ProxyProcess) -> None:
    mem = proc_memory_mib(proxy.pid)
    if mem is not None:
        ctx.rss_mib.append(mem[0])
        ctx.hwm_mib.append(mem[1])


# ---- measuring ----------------------------------------------------------------------------------------------


async def _snapshot(rig: Rig) -> Snapshot:
    before = trio.current_time()
    sender = (await rig.sender.port_stats())[0]
    t = (before + trio.current_time()) / 2
    receiver = None if rig.receiver is None else (await rig.receiver.port_stats())[0]
    ticks = {k: _proc_ticks(pid) for k, pid in rig.pids().items()}
    with contextlib.suppress(OSError, ValueError):
        ticks[MACHINE_BUSY] = report.parse_stat_busy_ticks(Path("/proc/stat").read_text())
    return Snapshot(t, sender, receiver, ticks)


async def measure_windows(ctx: Context, rig: Rig, m: Measurement, counter: str) -> None:
    """Warm up, then `repeat` back-to-back windows: Mpps of `counter` ("tx_packets"/"rx_packets") of the
    sender, plus the peer receiver's RX rate and each process's CPU use for the record."""
    s = ctx.settings
    await trio.sleep(s.warmup)
    if m.load_before is None:
        m.load_before = read_loadavg()
    hz = os.sysconf("SC_CLK_TCK")
    prev = await _snapshot(rig)
    for _ in range(s.repeat):
        await trio.sleep(s.duration)
        cur = await _snapshot(rig)
        dt = cur.t - prev.t
        m.samples.append((getattr(cur.sender, counter) - getattr(prev.sender, counter)) / dt / 1e6)
        if cur.receiver is not None and prev.receiver is not None:
            rx = (cur.receiver.rx_packets - prev.receiver.rx_packets) / dt / 1e6
            m.extra.setdefault("receiver_rx_mpps", []).append(rx)
        cpu = m.extra.setdefault("cpu_percent", {})
        used = {k: (cur.ticks[k] - prev.ticks.get(k, 0)) / hz / dt * 100 for k in cur.ticks}
        if MACHINE_BUSY in used:
            # What the rest of the machine took from our two CPUs during the window: the noise indicator.
            busy = used.pop(MACHINE_BUSY)
            cpu.setdefault("others", []).append(round(max(0.0, busy - sum(used.values())), 1))
        for k, v in used.items():
            cpu.setdefault(k, []).append(round(v, 1))
        prev = cur
    m.load_after = read_loadavg()
    if not any(m.samples):
        # A closed loop whose back-end misses a notification drains and stops: say so, it is a finding.
        m.status, m.reason = Status.FAILED, f"no packets counted: the sender's {counter} stopped moving (stall)"
    log.info("measured", case=m.case, size=m.size, samples=[round(x, 3) for x in m.samples])


def _mark(rows: Sequence[Measurement], status: Status, reason: str) -> None:
    for m in rows:
        m.status, m.reason = status, reason


async def _guarded(
    ctx: Context, rows: Sequence[Measurement], body: Callable[[], Awaitable[None]], timeout: float | None = None
) -> None:
    """Run one case; its failure or unavailability is recorded on its rows, and the run goes on."""
    s = ctx.settings
    try:
        with trio.fail_after(timeout or 120 + s.repeat * s.duration * 3 + s.warmup * 3):
            await body()
    except NotAvailable as e:
        log.warning("case_not_available", case=rows[0].case, reason=str(e))
        _mark(rows, Status.NOT_AVAILABLE, str(e))
    except Exception as e:  # one broken case must not lose the others' figures
        log.error("case_failed", case=rows[0].case, error=repr(e))
        _mark(rows, Status.FAILED, f"{type(e).__name__}: {e}".splitlines()[0][:300])


async def run_open_loop(ctx: Context, case: str) -> None:
    sizes = ctx.settings.sizes
    rows = [ctx.row(case, size, "forwarding", peer=None if case == "peer" else "peer") for size in sizes]
    if all(r.status is not Status.OK for r in rows):
        return  # a previous round showed it cannot run: do not pay for it again

    async def body() -> None:
        rig_cm = (
            peer_rig(ctx, "txonly", "rxonly", sizes[0])
            if case == "peer"
            else proxy_rig(ctx, "txonly", "sink", *PROXY_CASES[case][:1], sizes[0], PROXY_CASES[case][1])
        )
        async with rig_cm as rig:
            for i, (size, m) in enumerate(zip(sizes, rows, strict=True)):
                if i:
                    await rig.sender.stop_forwarding()
                    await rig.sender.command(f"set txpkts {size}")
                await rig.sender.start_forwarding()
                await measure_windows(ctx, rig, m, "tx_packets")

    await _guarded(ctx, rows, body)


async def run_cdriver(ctx: Context, case: str) -> None:
    """One same-driver case (bench/cdriver.py) at every size; its windows join the case's row."""
    from . import cdriver

    s = ctx.settings
    sizes = (s.loop_size,) if case.endswith("-loop") else s.sizes
    for size in sizes:
        m = ctx.row(case, size, "same-driver", peer=CDRIVER_REF.get(case))
        if m.status is not Status.OK:
            continue

        async def body(m: Measurement = m, size: int = size) -> None:
            res = await cdriver.measure(
                case.removeprefix("c-"), size, windows=s.repeat, duration=s.duration, warmup=s.warmup,
                sender_cpu=ctx.sender_cpu, backend_cpu=ctx.backend_cpu, log_dir=ctx.log_dir / "cdriver",
                name=ctx.name(case),
            )  # fmt: skip
            if m.load_before is None:
                m.load_before = _tuple3((res.evidence.get("loadavg") or {}).get("before"))
            m.load_after = _tuple3((res.evidence.get("loadavg") or {}).get("after"))
            m.samples += res.samples
            m.extra["mode"] = res.mode
            cpu = m.extra.setdefault("cpu_percent", {})
            for w in res.windows:
                for k, v in (w.get("cpu_percent") or {}).items():
                    cpu.setdefault(k, []).append(v)
            if "dirty_log" in res.evidence:
                m.extra.setdefault("dirty_log", []).append(res.evidence["dirty_log"])

        await _guarded(ctx, [m], body)


def _tuple3(value: Any) -> tuple[float, float, float] | None:
    if isinstance(value, list | tuple) and len(value) == 3:
        return float(value[0]), float(value[1]), float(value[2])
    return None


async def run_closed_loop(ctx: Context, case: str) -> None:
    size = ctx.settings.loop_size
    m = ctx.row(case, size, "closed-loop", peer=None if case == "loop-peer" else "loop-peer")
    if m.status is not Status.OK:
        return

    async def body() -> None:
        rig_cm = (
            peer_rig(ctx, "io", "macswap", size)
            if case == "loop-peer"
            else proxy_rig(ctx, "io", "loopback", *PROXY_CASES[case][:1], size, PROXY_CASES[case][1])
        )
        async with rig_cm as rig:
            await rig.sender.start_forwarding(tx_first=LOOP_TX_FIRST)
            await measure_windows(ctx, rig, m, "rx_packets")

    await _guarded(ctx, [m], body)


SWITCH_ROWS = {
    "switch": "passthrough → SVQ switch under traffic (proxy's took_us)",
    "switch-back": "SVQ → passthrough switch under traffic, drains the SVQ (proxy's took_us)",
    "drain": "GET_VRING_BASE of a busy SVQ ring: request → reply (proxy's took_us)",
}
DRAIN_BURST = 192  # frames queued on TX (ring of 256) right before GET_VRING_BASE: the SVQ has work in flight


def switch_samples(
    events: Sequence[dict[str, Any]],
) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    """ms per forced mode switch (by the mode it switched to) and per GET_VRING_BASE of a running SVQ ring; and
    the median µs of each phase of those switches (device_started phases_us), per direction."""
    out: dict[str, list[float]] = {"switch": [], "switch-back": [], "drain": []}
    phases: dict[str, dict[str, list[float]]] = {"switch": {}, "switch-back": {}}
    mode = None
    for ev in events:
        if ev.get("event") == "device_started":
            if ev.get("why") == "mode forced" and mode is not None and ev.get("mode") != mode:
                row = "switch" if ev.get("mode") == "svq" else "switch-back"
                out[row].append(ev["took_us"] / 1000)
                for name, us in (ev.get("phases_us") or {}).items():
                    phases[row].setdefault(name, []).append(float(us))
            mode = ev.get("mode")
        elif ev.get("event") == "vring_stopped" and ev.get("was_running") and mode == "svq":
            out["drain"].append(ev["took_us"] / 1000)
    return out, {row: {k: statistics.median(v) for k, v in got.items()} for row, got in phases.items()}


@contextlib.contextmanager
def off_backend_cpu(ctx: Context) -> Iterator[None]:
    """This process (the harness: it parses every proxy log line as it arrives) off the back-end CPU while a
    control-plane figure is taken, so the proxy's timings are not its own work interleaved with the harness's."""
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {ctx.sender_cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


async def run_switch(ctx: Context) -> None:
    """Forced passthrough ⇄ SVQ switches while testpmd txonly runs, then GET_VRING_BASE (testpmd `port stop`)
    against a proxy forced into SVQ mode. Figures are the proxy's own timings from its JSON log."""
    rows = {case: ctx.row(case, None, "control-plane", unit="ms") for case in SWITCH_ROWS}
    for case, title in SWITCH_ROWS.items():
        rows[case].title = title

    async def body() -> None:
        sock = ctx.sock_dir / "sw.sock"
        ctl = ctx.sock_dir / "sw.ctl"
        async with open_proxy(
            sock, "sim:profile=rich,backend=sink", ["--svq", "auto", "--control", str(ctl)],
            log_dir=ctx.log_dir, name=ctx.name("vduproxy-switch"), log_level=PROXY_LOG,
        ) as proxy:  # fmt: skip
            pin_threads(proxy.pid, ctx.backend_cpu)
            cfg = _sender_config(ctx, sock, "txonly", 64)
            async with open_testpmd(cfg, name=ctx.name("virtio-user"), log_dir=ctx.log_dir) as fe:
                await proxy.wait_event("device_started", timeout=60, vqs=PROXY_VQS)
                pin_threads(proxy.pid, ctx.backend_cpu)
                await fe.start_forwarding()
                await trio.sleep(ctx.settings.warmup)
                for _ in range(ctx.settings.switch_cycles):
                    for mode in ("svq", "passthrough"):
                        await control.call(str(ctl), {"verb": "mode", "mode": mode})
                        pin_threads(proxy.pid, ctx.backend_cpu)  # a new SVQ thread starts on every switch
                        await trio.sleep(0.1)
                await control.call(str(ctl), {"verb": "mode", "mode": "svq"})
                for _ in range(ctx.settings.switch_cycles):
                    # testpmd refuses to stop a port that forwards; the rings still hold what was in flight
                    await fe.stop_forwarding()
                    await fe.command("port stop 0")
                    await fe.command("port start 0")
                    pin_threads(proxy.pid, ctx.backend_cpu)
                    await fe.start_forwarding()
                    await trio.sleep(0.1)
            got, median_phases = switch_samples(proxy.events())
            for row, phases in median_phases.items():
                rows[row].extra["median_phases_us"] = phases
                if phases:
                    rows[row].notes.append(
                        "proxy phases, median µs: " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items())
                    )
        got["drain"] += await _drain_samples(ctx, rows["drain"])
        for case, samples in got.items():
            rows[case].samples = [round(x, 3) for x in samples]
            if not samples:
                _mark([rows[case]], Status.FAILED, "no such event in the proxy log")

    with off_backend_cpu(ctx):
        await _guarded(ctx, list(rows.values()), body)


async def _drain_samples(ctx: Context, row: Measurement) -> list[float]:
    """GET_VRING_BASE against a proxy in SVQ mode while TX frames are in flight, from the project's front-end
    (testpmd's `port stop` does not send it): one connection per sample, rings stopped in QEMU's order (RX, TX).
    The front-end's own request → reply time is kept in extra for comparison."""
    from vduproxy.testing.frontend import VhostUserFrontend
    from vduproxy.testing.guest import GuestMemory, VirtioNetDriver, make_frame
    from vduproxy.vhost_user.wire import Req

    sock = ctx.sock_dir / "drain.sock"
    round_trips: list[float] = []
    async with open_proxy(
        sock, "sim:profile=rich,backend=sink", ["--svq", "always"],
        log_dir=ctx.log_dir, name=ctx.name("vduproxy-drain"), log_level=PROXY_LOG,
    ) as proxy:  # fmt: skip
        pin_threads(proxy.pid, ctx.backend_cpu)
        for i in range(ctx.settings.switch_cycles):
            with GuestMemory(64 << 20) as mem:
                async with await VhostUserFrontend.connect(str(sock)) as fe:
                    await fe.qemu72_connect()
                    driver = VirtioNetDriver(mem, queue_size=256)
                    try:
                        await fe.qemu72_start(driver)
                        await fe.get_u64(Req.GET_FEATURES)  # a round trip: the whole set-up is applied
                        pin_threads(proxy.pid, ctx.backend_cpu)
                        driver.send([make_frame(1500, i * DRAIN_BURST + k) for k in range(DRAIN_BURST)])
                        for vq in (0, 1):
                            t0 = trio.current_time()
                            await fe.get_vring_base(vq)
                            round_trips.append((trio.current_time() - t0) * 1000)
                    finally:
                        driver.close()
            with trio.fail_after(30):  # one front-end at a time: the next one would be refused
                while len(proxy.events("connection_closed")) <= i:
                    await trio.sleep(0.01)
        events = proxy.events()
    row.extra["frontend_round_trip_ms"] = [round(x, 3) for x in round_trips]
    row.notes.append(
        f"{DRAIN_BURST} TX frames queued before each GET_VRING_BASE; the first of a pair also restarts the other "
        "ring, which is what a front-end waits for"
    )
    return [ev["took_us"] / 1000 for ev in events if ev.get("event") == "vring_stopped" and ev.get("was_running")]


DOWNTIME_ROWS = {
    "downtime": "QEMU migration downtime, vduproxy back-end (query-migrate)",
    "downtime-peer": "QEMU migration downtime, DPDK vhost PMD back-end (query-migrate)",
    "downtime-diff": "downtime: vduproxy median − DPDK median",
}


async def run_downtime(ctx: Context) -> None:
    """bench/migration.py: one TCG guest per back-end migrated back and forth on this host, interleaved."""
    from . import migration

    rows = {case: ctx.row(case, None, "control-plane", unit="ms") for case in DOWNTIME_ROWS}
    for case, title in DOWNTIME_ROWS.items():
        rows[case].title = title

    async def body() -> None:
        cmp = await migration.compare_downtime(count=ctx.settings.migrations, log_dir=ctx.log_dir / "migration")
        for case, backend in (("downtime", "vduproxy"), ("downtime-peer", "dpdk")):
            res = cmp.results.get(backend)
            m = rows[case]
            if res is None or not res.samples:
                _mark([m], Status.FAILED, (res.error if res is not None else None) or "no migration completed")
                continue
            m.samples = [round(x, 2) for x in res.downtimes]
            for phase in migration.PHASES:
                values = [x.phases_ms[phase] for x in res.samples if phase in x.phases_ms]
                if values:
                    m.extra[f"{phase}_ms"] = [round(v, 2) for v in values]
            if res.failures:
                m.notes.append(f"{len(res.failures)} failed attempt(s), guest rebooted: see the JSON")
        diff = cmp.difference_ms()
        if diff is None:
            _mark([rows["downtime-diff"]], Status.FAILED, "a back-end has no downtime samples")
        else:
            rows["downtime-diff"].samples = [round(diff, 2)]
        rows["downtime-diff"].notes.append(
            f"settings: {json.dumps(cmp.settings.get('parameters', {}))}, return-path on; phases per migration "
            "(QEMU trace) are in each row's extra"
        )

    # two TCG guests boot, then each migration takes ~1-2 s plus the check that the guest is alive
    await _guarded(ctx, list(rows.values()), body, timeout=600 + 120 * ctx.settings.migrations)


async def run_control(ctx: Context) -> None:
    """Connect and disconnect a front-end `connect_cycles` times to one proxy: connect → device_started."""
    m = ctx.row("connect", None, "control-plane", unit="ms")

    async def body() -> None:
        sock = ctx.sock_dir / "ctl.sock"
        async with open_proxy(
            sock, "sim:profile=rich,backend=sink", ["--svq", "never"], log_dir=ctx.log_dir, name=ctx.name("vduproxy"),
            log_level=PROXY_LOG,
        ) as proxy:
            for _ in range(ctx.settings.connect_cycles):
                cfg = _sender_config(ctx, sock, "io", ctx.settings.loop_size)
                # Counted before testpmd starts: it connects and starts the device before it is "ready".
                started = len(proxy.events("frontend_connected"))
                gone = len(proxy.events("frontend_disconnected"))
                async with open_testpmd(cfg, name=ctx.name("virtio-user"), log_dir=ctx.log_dir):
                    with trio.fail_after(60):
                        while len(report.connect_to_started_ms(proxy.events(), PROXY_VQS)) <= started:
                            await trio.sleep(0.05)
                with trio.fail_after(30):
                    while len(proxy.events("frontend_disconnected")) < gone + 1:
                        await trio.sleep(0.05)
            _record_proxy_memory(ctx, proxy)
            ctx.connect_ms += report.connect_to_started_ms(proxy.events(), PROXY_VQS)

    with off_backend_cpu(ctx):
        await _guarded(ctx, [m], body)


def _create_rows(ctx: Context) -> None:
    """Every selected row up front, in reading order (table and chart follow the order rows were made)."""
    s = ctx.settings
    for case in OPEN_CASES:
        if case in s.cases:
            for size in s.sizes:
                ctx.row(case, size, "forwarding", peer=None if case == "peer" else "peer")
    for case in LOOP_CASES:
        if case in s.cases:
            ctx.row(case, s.loop_size, "closed-loop", peer=None if case == "loop-peer" else "loop-peer")
    for case in CDRIVER_CASES:
        if case in s.cases:
            for size in (s.loop_size,) if case.endswith("-loop") else s.sizes:
                ctx.row(case, size, "same-driver", peer=CDRIVER_REF.get(case))


def finish_rows(ctx: Context) -> None:
    """Rows that are derived, or not measurable yet, once every round has run."""
    run, s = ctx.run, ctx.settings
    if any(c in s.cases for c in CDRIVER_CASES):
        run.notes.append(CDRIVER_NOTE)
    if any(c in s.cases for c in ("passthrough", "svq", "svq-sleep")):
        run.notes.append(SINK_NOTE)
    connect = ctx.row("connect", None, "control-plane", unit="ms")
    connect.title = "connect → device_started (proxy log)"
    if connect.status is Status.OK:
        connect.samples = [round(x, 3) for x in ctx.connect_ms]
        connect.notes.append("from the proxy's JSON log timestamps, one sample per front-end connection")
        if not connect.samples and not ctx.hwm_mib:
            _mark([connect], Status.NOT_AVAILABLE, "no proxy ran in this selection of cases")
    rss = ctx.row("proxy-rss", None, "control-plane", unit="MiB")
    rss.title = "proxy peak resident memory (VmHWM)"
    rss.samples = [round(x, 2) for x in ctx.hwm_mib]
    rss.extra["vmrss_mib"] = [round(x, 2) for x in ctx.rss_mib]
    if not rss.samples:
        _mark([rss], Status.NOT_AVAILABLE, "no proxy ran in this selection of cases")
    for m in run.measurements:
        if m.status is Status.OK and not m.samples:
            _mark([m], Status.FAILED, "no samples")


async def run(settings: Settings) -> BenchRun:
    cpus = sorted(os.sched_getaffinity(0))
    started = datetime.now(UTC).isoformat(timespec="seconds")
    bench_run = BenchRun(started=started, mode="quick" if settings.quick else "full", settings=settings.describe())
    bench_run.machine = await machine_info()
    bench_run.software = await software_info()
    log_dir = settings.log_dir or Path(tempfile.mkdtemp(prefix="vdup-bench-logs-", dir="/tmp"))
    log_dir.mkdir(parents=True, exist_ok=True)
    sock_dir = Path(tempfile.mkdtemp(prefix="vdup-b-", dir="/tmp"))
    ctx = Context(settings, sock_dir, log_dir, sender_cpu=cpus[-1], backend_cpu=cpus[0], run=bench_run)
    bench_run.pinning = {
        "sender": f"testpmd virtio-user, --lcores {ctx.lcores(ctx.sender_cpu)}",
        "back-end": f"testpmd vhost PMD --lcores {ctx.lcores(ctx.backend_cpu)}; "
        f"vduproxy: every thread sched_setaffinity CPU {ctx.backend_cpu}",
        "harness": f"this runner on CPU {ctx.sender_cpu} during the control-plane cases (switch, drain, connect)",
    }
    if len(cpus) < 2:
        bench_run.notes.append("only one CPU usable: sender and back-end share it")
    log.info("bench_start", cases=settings.cases, log_dir=str(log_dir), pinning=bench_run.pinning)
    _create_rows(ctx)
    try:
        for rnd in range(settings.rounds):
            log.info("round", round=rnd + 1, of=settings.rounds)
            # Interleaved per round, so slow drift in the machine's load hits every case alike.
            for case in ("peer", "passthrough", "svq", "svq-sleep"):
                if case in settings.cases:
                    await run_open_loop(ctx, case)
            for case in LOOP_CASES:
                if case in settings.cases:
                    await run_closed_loop(ctx, case)
            for case in CDRIVER_CASES:
                if case in settings.cases:
                    await run_cdriver(ctx, case)
        if "control" in settings.cases:
            await run_control(ctx)
        if "switch" in settings.cases:
            await run_switch(ctx)
        if "downtime" in settings.cases:
            await run_downtime(ctx)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
    finish_rows(ctx)
    bench_run.machine["load_end"] = list(read_loadavg())
    bench_run.machine["logs"] = str(log_dir)
    bench_run.finished = datetime.now(UTC).isoformat(timespec="seconds")
    return bench_run


def write_results(bench_run: BenchRun, out: Path) -> list[str]:
    """latest.json, latest.md and latest.png in `out`; returns notes for the user (e.g. chart skipped)."""
    out.mkdir(parents=True, exist_ok=True)
    messages = []
    skipped = report.write_chart(bench_run, out / "latest.png")
    if skipped is not None:
        bench_run.notes.append(f"chart skipped: {skipped}")
        messages.append(f"chart skipped: {skipped}")
        with contextlib.suppress(FileNotFoundError):
            (out / "latest.png").unlink()  # a stale chart from an earlier run would contradict the table
    report.write_json(bench_run, out / "latest.json")
    report.write_markdown(bench_run, out / "latest.md")
    return messages
