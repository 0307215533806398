"""A C-speed vhost-user front-end for the benchmarks: Python control plane, C data path (issue 7, items 3 and 4).

DPDK's virtio-user never sets VHOST_F_LOG_ALL, and the project's Python driver moves packets in Python, so
neither can show what dirty logging costs the SVQ, nor the software device's own ceiling. This module drives
the rings with `txgen.c` (a split-virtqueue driver in a busy-poll loop, like testpmd txonly) while the control
plane is the project's own: `VhostUserFrontend` (QEMU 7.2's message sequences, `migration_start` for LOG_ALL +
SET_LOG_BASE) against `vduproxy serve`, or the `VdpaDevice` API of the software device in-process.

Cases (tx mode: the device is `sim:profile=rich,backend=sink`; `-loop` cases: `backend=loopback`, RX counted):

- `device`: the driver and the sim device in one process, no proxy: the device's ceiling.
- `passthrough`: `vduproxy serve --svq never`; the proxy's `device_started` must say `mode: passthrough`.
- `svq`: `--svq always` (`mode: svq`).
- `svq-log`: `--svq always`, LOG_ALL negotiated and SET_LOG_BASE sent with a memfd log covering guest memory,
  as QEMU does when migration starts. The log is read and cleared after every window (as QEMU's bitmap sync
  does); the pages found dirty are the evidence that logging ran.
- `device-loop`, `passthrough-loop`, `svq-loop`, `svq-log-loop`: the same with the RX ring stocked and the
  frames that made the round trip counted (a sample compared byte for byte with what was sent).

Every case runs the driver in its own process (`python -m bench.cdriver _child CONFIG`) pinned to the
sender CPU; every thread of the proxy (or, in `device`, the sim's data-path thread) is pinned to the back-end
CPU. Windows follow `runner.measure_windows`: a warm-up, then back-to-back windows; the packets and the window
length are both measured inside the C loop (clock_gettime), so a sample is packets / elapsed with no Python in
between. Processes are torn down by PID.

The table also gives each case's *quiet median*: the median over the windows in which the rest of the machine
took at most 10 % of a CPU (measured per window from /proc/stat), because on a shared 2-core machine a window
another job ran in measures that job as much as the case.

The ring has 256 entries by default, as DPDK virtio-user's and so the runner's testpmd rows. The sim device
completes up to 256 chains per round and then sleeps until kicked, so with 256 entries every case is paced by
the device's sleep/wake-up cycle (one kick per 256 packets, the device thread half idle); `--ring 1024` keeps it
busy (no kicks) and shows its per-packet ceiling instead.

Usage:
    python -m bench.cdriver                        # every case, 64 and 1500 B (tx), 64 B (loop)
    python -m bench.cdriver --cases svq,svq-log --sizes 64 --rounds 3 --windows 3 --json out.json
    python -m bench.cdriver --ring 1024 --proxy-args="--svq-busy-poll 50" --sim-options=busy_poll_us=50
API:
    result = await measure("svq-log", 64, windows=5, duration=2.0, warmup=1.0, sender_cpu=1, backend_cpu=0,
                           log_dir=Path("/tmp/logs"))
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import shlex
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from vduproxy.log import configure, get_logger
from vduproxy.testing.frontend import DirtyLog, VhostUserFrontend
from vduproxy.testing.guest import GUEST_MAC, PEER_MAC, Alloc, GuestMemory, VirtioNetDriver
from vduproxy.testing.procs import ManagedProcess, ProcessExited, open_service_nursery
from vduproxy.testing.proxy import ProxyProcess, open_proxy
from vduproxy.virtio import NetF, Status

from . import _txgen_build, report
from .runner import NotAvailable, pin_threads, software_info

log = get_logger(__name__)

REPO = Path(__file__).resolve().parent.parent
MSG_PREFIX = "@cdriver "  # the child's protocol lines on stdout; everything else is its log
PAGE = 4096
RING = 256
MEM_BYTES = 32 << 20
RX_SLOT = 2048
SLOT_ALIGN = 64
VQS = [0, 1]  # one queue pair: RX 0, TX 1
TX_FEATURES = NetF.VERSION_1 | NetF.MRG_RXBUF  # what DPDK virtio-user acks of the sim (no offloads)
SETUP_TIMEOUT = 60.0
QUIET_OTHERS = 10.0  # % of a CPU other processes may take during a window that still counts as quiet

BASE_CASES = ("device", "passthrough", "svq", "svq-log")
LOOP_CASES = tuple(f"{c}-loop" for c in BASE_CASES)
ALL_CASES = BASE_CASES + LOOP_CASES


# ---- cases --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    target: str  # "device" | "passthrough" | "svq" | "svq-log"
    loop: bool

    @property
    def svq(self) -> str | None:
        """The proxy's --svq policy (None: no proxy)."""
        return {"passthrough": "never", "svq": "always", "svq-log": "always"}.get(self.target)

    @property
    def dirty_log(self) -> bool:
        return self.target == "svq-log"

    def device_spec(self, extra: str = "") -> str:
        """The sim device of this case; `extra` adds spec options (e.g. "busy_poll_us=50")."""
        spec = f"sim:profile=rich,backend={'loopback' if self.loop else 'sink'}"
        return f"{spec},{extra}" if extra else spec

    @property
    def expected_mode(self) -> str:
        """What must have run: "device" (no proxy), or the proxy's `device_started` mode."""
        return {"device": "device", "passthrough": "passthrough"}.get(self.target, "svq")


def parse_case(name: str) -> Case:
    if name not in ALL_CASES:
        raise ValueError(f"unknown case {name!r} (known: {', '.join(ALL_CASES)})")
    loop = name.endswith("-loop")
    return Case(name, name.removesuffix("-loop"), loop)


@dataclass(frozen=True)
class DriverOptions:
    ring: int = RING
    burst: int = 32  # recycle TX / repost RX in bursts of at least this many, like DPDK's tx_free_thresh
    event_idx: bool = True  # negotiate VIRTIO_F_EVENT_IDX (the sim never sets NO_NOTIFY: without it, kick per burst)
    verify_every: int = 64  # loop: compare every Nth RX frame with the frame sent
    mem_bytes: int = MEM_BYTES
    sim_options: str = ""  # appended to the sim device spec, in every case (e.g. "busy_poll_us=50")
    proxy_args: tuple[str, ...] = ()  # extra `vduproxy serve` arguments (e.g. "--svq-busy-poll", "50")

    @property
    def features(self) -> int:
        return int(TX_FEATURES | (NetF.RING_EVENT_IDX if self.event_idx else 0))


@dataclass
class CaseResult:
    """One case at one frame size: per-window Mpps and what shows the case ran as its name says."""

    case: str
    size: int
    loop: bool
    samples: list[float] = field(default_factory=list)  # Mpps per window: packets / elapsed, both from C
    windows: list[dict[str, Any]] = field(default_factory=list)  # per window: packets, elapsed, CPU, dirty pages
    mode: str = ""  # "device", or the mode of the proxy's last device_started
    evidence: dict[str, Any] = field(default_factory=dict)  # driver counters, dirty log, device counters, events
    pids: dict[str, int] = field(default_factory=dict)
    pinning: dict[str, int] = field(default_factory=dict)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    def quiet_samples(self, max_others: float = QUIET_OTHERS) -> list[float]:
        """Samples of the windows in which the rest of the machine took at most `max_others` % of a CPU: on a
        shared machine the windows another job ran in measure that job as much as this case."""
        return [
            float(w["mpps"]) for w in self.windows if w.get("cpu_percent", {}).get("others", float("inf")) <= max_others
        ]

    @property
    def quiet_median(self) -> float | None:
        quiet = self.quiet_samples()
        return statistics.median(quiet) if quiet else None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- the C driver -------------------------------------------------------------------------------------------


@functools.cache
def load_txgen() -> tuple[Any, Any]:
    """(ffi, lib) of the C driver, built into the cache on first use (see _txgen_build)."""
    path = _txgen_build.build()
    spec = importlib.util.spec_from_file_location(_txgen_build.MODULE, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ffi, lib = module.ffi, module.lib
    if lib.txgen_abi_version() != _txgen_build.ABI_VERSION:
        raise ImportError(f"{path}: ABI {lib.txgen_abi_version()} != {_txgen_build.ABI_VERSION}")
    return ffi, lib


class TxGenError(Exception):
    pass


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _pages(area: Alloc) -> set[int]:
    return set(range(area.gpa // PAGE, (area.gpa + area.size - 1) // PAGE + 1))


@dataclass(frozen=True)
class RunResult:
    packets: int
    tx_packets: int
    rx_packets: int
    elapsed_s: float

    @property
    def mpps(self) -> float:
        return self.packets / self.elapsed_s / 1e6 if self.elapsed_s > 0 else 0.0


class TxGen:
    """The C driver on the rings of `driver` (a VirtioNetDriver whose control plane is done elsewhere): TX frames
    and RX buffers get their own areas in `mem`; the Python ring objects are never used for traffic."""

    def __init__(
        self, mem: GuestMemory, driver: VirtioNetDriver, *, size: int, loop: bool, opts: DriverOptions
    ) -> None:
        self.ffi, self.lib = load_txgen()
        self.mem = mem
        self.size = size
        self.loop = loop
        self.hdr_len = driver.hdr_len
        self.event_idx = bool(driver.features & NetF.RING_EVENT_IDX)
        num = driver.tx().num
        self.num = num
        self.tx_slot = _round_up(self.hdr_len + size, SLOT_ALIGN)
        self.rx_slot = max(RX_SLOT, _round_up(self.hdr_len + size, SLOT_ALIGN))
        self.tx_area = mem.alloc(num * self.tx_slot, align=PAGE)
        self.rx_area = mem.alloc(num * self.rx_slot, align=PAGE) if loop else None
        self._buf = self.ffi.from_buffer("uint8_t[]", mem.buf, require_writable=True)
        self.address = int(self.ffi.cast("uintptr_t", self._buf))
        p = self.ffi.new("struct txgen_params *")
        p.mem = self._buf
        p.mem_size = mem.size
        p.num = num
        p.event_idx = int(self.event_idx)
        p.loop = int(loop)
        p.hdr_len = self.hdr_len
        p.frame_len = size
        p.burst = opts.burst
        p.verify_every = opts.verify_every
        for ring, vq in ((p.tx, driver.tx()), (p.rx, driver.rx())):
            ring.desc_off = vq.area.offset + vq.layout.desc_off
            ring.avail_off = vq.area.offset + vq.layout.avail_off
            ring.used_off = vq.area.offset + vq.layout.used_off
            ring.kick_fd = vq.kick_fd
        p.tx_buf_off, p.tx_buf_gpa, p.tx_slot = self.tx_area.offset, self.tx_area.gpa, self.tx_slot
        if self.rx_area is not None:
            p.rx_buf_off, p.rx_buf_gpa, p.rx_slot = self.rx_area.offset, self.rx_area.gpa, self.rx_slot
        p.dst_mac = list(PEER_MAC)
        p.src_mac = list(GUEST_MAC)
        out = self.ffi.new("struct txgen **")
        rc = self.lib.txgen_create(p, out)
        self._g: Any = out[0]
        if rc < 0:
            why = self._error()
            self.close()
            raise TxGenError(f"txgen_create: {why} ({os.strerror(-rc)})")
        self._res = self.ffi.new("struct txgen_result *")

    def _error(self) -> str:
        return str(self.ffi.string(self.lib.txgen_error(self._g)).decode(errors="replace"))

    def start(self) -> None:
        rc = self.lib.txgen_start(self._g)
        if rc < 0:
            raise TxGenError(f"txgen_start: {self._error() or os.strerror(-rc)}")

    def run(self, seconds: float) -> RunResult:
        """Busy-poll for `seconds` in C (the GIL is released)."""
        rc = self.lib.txgen_run(self._g, seconds, self._res)
        if rc < 0:
            raise TxGenError(f"txgen_run: {self._error() or os.strerror(-rc)}")
        r = self._res
        return RunResult(int(r.packets), int(r.tx_packets), int(r.rx_packets), int(r.elapsed_ns) / 1e9)

    def stats(self) -> dict[str, int]:
        s = self.ffi.new("struct txgen_stats *")
        self.lib.txgen_get_stats(self._g, s)
        return {name: int(getattr(s, name)) for name, _ in self.ffi.typeof("struct txgen_stats").fields}

    def tx_frame(self, slot: int) -> bytes:
        off = self.tx_area.offset + slot * self.tx_slot + self.hdr_len
        return bytes(self.mem.buf[off : off + self.size])

    def check_rx_buffers(self, count: int = 8) -> dict[str, Any]:
        """Independent of the C check: read up to `count` RX buffers the device filled and compare each frame with
        the TX frame its tag names (slot number at UDP payload offset 0, then the magic "vdup"). Buffers go out in
        slot order and the device fills them in order, so the first `rx_packets` slots have all been written."""
        assert self.rx_area is not None
        written = min(count, self.num, self.stats()["rx_packets"])
        matched = 0
        bad: list[str] = []
        for slot in range(written):
            off = self.rx_area.offset + slot * self.rx_slot + self.hdr_len
            frame = bytes(self.mem.buf[off : off + self.size])
            tag = int.from_bytes(frame[42:46], "big")
            if frame[46:50] == b"vdup" and tag < self.num and frame == self.tx_frame(tag):
                matched += 1
            elif len(bad) < 3:
                bad.append(f"rx slot {slot}: {frame[:64].hex()}")
        return {"checked": written, "matched": matched, "bad": bad}

    def rx_pages(self) -> set[int]:
        return _pages(self.rx_area) if self.rx_area is not None else set()

    def tx_pages(self) -> set[int]:
        return _pages(self.tx_area)

    def close(self) -> None:
        g, self._g = getattr(self, "_g", None), None
        if g is not None and g != self.ffi.NULL:
            self.lib.txgen_destroy(g)
        buf, self._buf = getattr(self, "_buf", None), None
        if buf is not None:
            self.ffi.release(buf)  # GuestMemory.close releases its view: no export may be left


# ---- the child: control plane + C loop ----------------------------------------------------------------------


@dataclass(frozen=True)
class ChildConfig:
    case: str
    size: int
    windows: int
    duration: float
    warmup: float
    sender_cpu: int
    backend_cpu: int
    socket: str | None = None
    proxy_pid: int | None = None
    options: DriverOptions = DriverOptions()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ChildConfig:
        data = json.loads(text)
        opts = data.get("options", {})
        opts["proxy_args"] = tuple(opts.get("proxy_args", ()))
        data["options"] = DriverOptions(**opts)
        return cls(**data)


def _emit(kind: str, **data: Any) -> None:
    sys.stdout.write(MSG_PREFIX + json.dumps({"type": kind, **data}) + "\n")
    sys.stdout.flush()


def _ticks(path: str) -> int | None:
    try:
        return report.parse_proc_stat_ticks(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _cpu_snapshot(proxy_pid: int | None) -> dict[str, int | None]:
    """CPU ticks so far: the driver (this process's main thread), this process's other threads (the sim's
    data-path thread in `device` cases), the proxy (all its threads), and the whole machine's busy ticks."""
    me = os.getpid()
    others = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{me}/task").iterdir():
            if task.name != str(me):
                others += _ticks(f"{task}/stat") or 0
    snap: dict[str, int | None] = {
        "driver": _ticks(f"/proc/{me}/task/{me}/stat"),
        "device_thread": others,
        "proxy": None if proxy_pid is None else _ticks(f"/proc/{proxy_pid}/stat"),
    }
    try:
        snap["_busy"] = report.parse_stat_busy_ticks(Path("/proc/stat").read_text())
    except (OSError, ValueError):
        snap["_busy"] = None
    return snap


def _cpu_percent(before: dict[str, int | None], after: dict[str, int | None], seconds: float) -> dict[str, float]:
    """CPU % of the driver process and the proxy over a window, and what the rest of the machine took."""
    hz = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for key in before:
        a, b = before[key], after.get(key)
        if a is not None and b is not None and seconds > 0:
            out[key] = round((b - a) / hz / seconds * 100, 1)
    busy = out.pop("_busy", None)
    if busy is not None:
        out["others"] = round(max(0.0, busy - sum(out.values())), 1)
    return out


def thread_affinity(pid: int) -> dict[str, list[int]]:
    """Each thread of `pid` and the CPUs it may run on (evidence of the pinning)."""
    out: dict[str, list[int]] = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out[task.name] = sorted(os.sched_getaffinity(int(task.name)))
    return out


class DeviceRig:
    """`device` cases: the sim device in this process, programmed through the VdpaDevice API as the proxy does
    in passthrough (IOTLB map of the memfd at IOVA = GPA, the driver's own rings, kick and call eventfds)."""

    def __init__(self, spec: str, driver: VirtioNetDriver, cfg: ChildConfig) -> None:
        from vduproxy.vdpa.device import BackendF
        from vduproxy.vdpa.sim import SimDevice

        self.dev = SimDevice(spec)
        self.driver = driver
        # The sim's data-path thread exists from here on: every thread goes to the back-end CPU, then this
        # one (the driver) back to the sender CPU.
        pin_threads(os.getpid(), cfg.backend_cpu)
        os.sched_setaffinity(0, {cfg.sender_cpu})
        dev = self.dev
        dev.set_status(0)
        dev.set_backend_features(int(BackendF.IOTLB_MSG_V2 & dev.get_backend_features()))
        self.status = Status.ACKNOWLEDGE | Status.DRIVER
        dev.set_status(self.status)
        self.features = int(driver.negotiate(dev.get_features()) | NetF.ACCESS_PLATFORM)
        dev.set_features(self.features)
        self.status |= Status.FEATURES_OK
        dev.set_status(self.status)
        if not dev.get_status() & Status.FEATURES_OK:
            raise RuntimeError(f"the device refused features {self.features:#x}")

    def start(self, mem: GuestMemory, address: int) -> None:
        """Map guest memory (`address`: where it is mapped in this process), give the rings, DRIVER_OK."""
        from vduproxy.vdpa.device import Perm, program_vq

        dev = self.dev
        with dev.iotlb_batch():
            for region in mem.regions:
                dev.iotlb_update(region.gpa, region.size, address + region.mmap_offset, Perm.RW)
        for vq in (self.driver.rx(), self.driver.tx()):
            program_vq(
                dev, vq.index, num=vq.num, desc=vq.desc_gpa, avail=vq.avail_gpa, used=vq.used_gpa, base=0,
                kick=vq.kick_fd, call=vq.call_fd,
            )  # fmt: skip
        dev.set_status(self.status | Status.DRIVER_OK)

    def evidence(self) -> dict[str, Any]:
        tx, rx = self.dev.vq_stats(1), self.dev.vq_stats(0)
        return {
            "device_tx_packets": tx.packets, "device_rx_packets": rx.packets, "device_tx_kicks": tx.kicks,
            "device_faults": tx.faults + rx.faults, "device_error": tx.error or rx.error,
        }  # fmt: skip

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.dev.set_status(0)
        self.dev.close()


async def _child(cfg: ChildConfig) -> None:
    os.sched_setaffinity(0, {cfg.sender_cpu})
    case = parse_case(cfg.case)
    opts = cfg.options
    async with contextlib.AsyncExitStack() as stack:
        mem = stack.enter_context(GuestMemory(opts.mem_bytes, name="vduproxy-bench"))
        # The Python driver only lays out the rings and owns the eventfds; its own buffer pools stay tiny.
        driver = VirtioNetDriver(
            mem, queue_size=opts.ring, features=opts.features, rx_buf_size=64, tx_buf_size=64, tx_chunk=64
        )
        stack.callback(driver.close)
        dlog: DirtyLog | None = None
        rig: DeviceRig | None = None
        if case.target == "device":
            rig = DeviceRig(case.device_spec(opts.sim_options), driver, cfg)
            stack.callback(rig.close)
        else:
            assert cfg.socket is not None
            fe = await VhostUserFrontend.connect(cfg.socket)
            stack.push_async_callback(fe.aclose)
            await fe.qemu72_connect()
            await fe.qemu72_start(driver)
            if case.dirty_log:
                dlog = await fe.migration_start(driver)
        gen = TxGen(mem, driver, size=cfg.size, loop=case.loop, opts=opts)
        stack.callback(gen.close)
        if rig is not None:
            rig.start(mem, gen.address)
        ready: dict[str, Any] = {
            "features": hex(driver.features), "event_idx": gen.event_idx, "hdr_len": gen.hdr_len, "ring": gen.num,
            "dirty_log_bytes": dlog.size if dlog is not None else None,
            "threads": thread_affinity(os.getpid()),
        }  # fmt: skip
        _emit("ready", **ready)
        if sys.stdin.readline().strip() != "go":
            return  # the parent gave up (mode check failed): nothing to measure
        gen.start()
        if cfg.warmup > 0:
            gen.run(cfg.warmup)
        if dlog is not None:
            dlog.clear()
        rx_pages, tx_pages = gen.rx_pages(), gen.tx_pages()
        used_pages = {driver.tx().used_gpa // PAGE, driver.rx().used_gpa // PAGE}
        for i in range(cfg.windows):
            before, stats_before = _cpu_snapshot(cfg.proxy_pid), gen.stats()
            r = gen.run(cfg.duration)
            after, stats_after = _cpu_snapshot(cfg.proxy_pid), gen.stats()
            window: dict[str, Any] = {
                "window": i, "packets": r.packets, "elapsed_s": round(r.elapsed_s, 6), "mpps": round(r.mpps, 4),
                "tx_packets": r.tx_packets, "rx_packets": r.rx_packets,
                "cpu_percent": _cpu_percent(before, after, r.elapsed_s),
                "kicks": {k: stats_after[k] - stats_before[k] for k in ("tx_kicks", "rx_kicks")},
            }  # fmt: skip
            if dlog is not None:
                # QEMU's bitmap sync: read what was logged during the window, then clear for the next one.
                dirty = dlog.dirty_pages()
                dlog.clear()
                window.update(
                    dirty_pages=len(dirty), rx_pages_dirty=len(dirty & rx_pages), rx_pages=len(rx_pages),
                    used_ring_pages_dirty=len(dirty & used_pages), tx_frame_pages_dirty=len(dirty & tx_pages),
                )  # fmt: skip
            _emit("window", **window)
        done: dict[str, Any] = {"driver": gen.stats(), "dirty_log": dlog is not None}
        if case.loop:
            done["rx_check"] = gen.check_rx_buffers()
        if rig is not None:
            done.update(rig.evidence())
        _emit("done", **done)


def child_main(config: str) -> int:
    configure("info", json=True, stream=sys.stderr)
    try:
        trio.run(_child, ChildConfig.from_json(config))
    except Exception as exc:
        log.exception("cdriver_child_failed")
        _emit("error", error=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


# ---- the parent: rigs, pinning, windows ---------------------------------------------------------------------


class _Child:
    """The driver process: its protocol lines, parsed as they arrive."""

    def __init__(self, proc: ManagedProcess) -> None:
        self.proc = proc
        self._seen = 0

    async def next(self, kind: str, timeout: float) -> dict[str, Any]:
        """The next protocol message (of any type: an "error" raises); it must be of type `kind`."""
        with trio.fail_after(timeout):
            while True:
                lines = self.proc.output.lines
                while self._seen < len(lines):
                    text = lines[self._seen].text
                    self._seen += 1
                    if not text.startswith(MSG_PREFIX):
                        continue
                    msg: dict[str, Any] = json.loads(text[len(MSG_PREFIX) :])
                    if msg["type"] == "error":
                        raise RuntimeError(f"cdriver child failed: {msg['error']}\n{self.proc.output.tail()}")
                    if msg["type"] != kind:
                        raise RuntimeError(f"cdriver child sent {msg['type']!r} while {kind!r} was expected")
                    return msg
                if self.proc.output.closed:
                    raise ProcessExited(f"exited before {kind!r}", name=self.proc.name, output=self.proc.output.tail())
                await trio.sleep(0.02)


def _started_mode(proxy: ProxyProcess) -> tuple[str, dict[str, Any] | None]:
    """Mode of the proxy's last device start with the whole queue pair, and that event."""
    starts = [ev for ev in proxy.events("device_started") if ev.get("vqs") == VQS]
    if not starts:
        return "", None
    return str(starts[-1].get("mode", "")), starts[-1]


async def _settle(proxy: ProxyProcess, dirty_log: bool, quiet: float = 0.3, timeout: float = 10.0) -> None:
    """Wait (bounded) until the proxy logged a start of the whole queue pair (and, with LOG_ALL, dirty_logging)
    and no further device_started arrived for `quiet` seconds."""
    with trio.move_on_after(timeout):
        seen, since = -1, trio.current_time()
        while True:
            starts = proxy.events("device_started")
            if len(starts) != seen:
                seen, since = len(starts), trio.current_time()
            ready = any(ev.get("vqs") == VQS for ev in starts) and (
                not dirty_log or bool(proxy.events("dirty_logging"))
            )
            if ready and trio.current_time() - since >= quiet:
                return
            await trio.sleep(0.05)


def _proxy_events_evidence(proxy: ProxyProcess) -> dict[str, Any]:
    return {
        "device_started": [
            {k: ev.get(k) for k in ("mode", "why", "took_us", "vqs")} for ev in proxy.events("device_started")
        ],
        "dirty_logging": [ev.get("on") for ev in proxy.events("dirty_logging")],
        "dirty_log_mapped": [ev.get("size") for ev in proxy.events("dirty_log_mapped")],
        "errors": [ev.get("event") for ev in proxy.events() if ev.get("level") in ("warning", "error")][:20],
    }


async def _drive(
    child: _Child, result: CaseResult, cfg: ChildConfig, *, on_ready: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Ready → (checks by the caller) → go → warm-up and windows → done."""
    ready = await child.next("ready", SETUP_TIMEOUT)
    result.evidence["negotiated"] = {k: v for k, v in ready.items() if k != "type"}
    if on_ready is not None:
        await on_ready()
    await child.proc.send("go\n")
    slack = 30.0
    for i in range(cfg.windows):
        win = await child.next("window", (cfg.warmup if i == 0 else 0) + cfg.duration + slack)
        win.pop("type")
        result.windows.append(win)
        result.samples.append(float(win["mpps"]))
    done = await child.next("done", slack)
    done.pop("type")
    result.evidence.update(done)


def _loadavg() -> list[float] | None:
    try:
        return list(report.parse_loadavg(Path("/proc/loadavg").read_text()))
    except (OSError, ValueError):
        return None


def _child_argv(cfg: ChildConfig) -> list[str]:
    return [sys.executable, "-m", "bench.cdriver", "_child", cfg.to_json()]


async def measure(
    case: str,
    size: int,
    *,
    windows: int,
    duration: float,
    warmup: float,
    sender_cpu: int,
    backend_cpu: int,
    log_dir: Path,
    options: DriverOptions | None = None,
    name: str | None = None,
) -> CaseResult:
    """Set up one case, warm up, measure `windows` windows of `duration` s, tear down by PID.

    Raises `runner.NotAvailable` when the proxy did not run the mode the case names (it says why), other
    exceptions when something failed."""
    c = parse_case(case)
    opts = options or DriverOptions()
    _txgen_build.build()  # once here, not concurrently in the child
    log_dir.mkdir(parents=True, exist_ok=True)
    stem = name or f"cdriver-{case}-{size}"
    result = CaseResult(case, size, c.loop, pinning={"sender_cpu": sender_cpu, "backend_cpu": backend_cpu})
    base = ChildConfig(case, size, windows, duration, warmup, sender_cpu, backend_cpu, options=opts)
    load_before = _loadavg()
    with tempfile.TemporaryDirectory(prefix="vdup-cd-", dir="/tmp") as sock_dir:
        if c.svq is None:
            await _measure_device(base, result, log_dir, stem)
        else:
            sock = Path(sock_dir) / "vdu.sock"
            await _measure_proxy(c, base, result, log_dir, stem, sock)
    result.evidence["loadavg"] = {"before": load_before, "after": _loadavg()}
    log.info("cdriver_measured", case=case, size=size, mode=result.mode, samples=[round(x, 3) for x in result.samples])
    return result


async def _measure_device(cfg: ChildConfig, result: CaseResult, log_dir: Path, stem: str) -> None:
    proc = ManagedProcess(stem, _child_argv(cfg), log_path=log_dir / f"{stem}.log", cwd=REPO)
    async with open_service_nursery() as nursery:
        await proc.start(nursery)
        result.pids["driver"] = proc.pid
        try:
            await _drive(_Child(proc), result, cfg)
            result.mode = "device"
            await proc.wait(30)
        finally:
            await proc.terminate(grace=5)


async def _measure_proxy(c: Case, base: ChildConfig, result: CaseResult, log_dir: Path, stem: str, sock: Path) -> None:
    assert c.svq is not None
    spec, args = c.device_spec(base.options.sim_options), ["--svq", c.svq, *base.options.proxy_args]
    # The proxy runs as an operator would run it (info): every event the checks need is at info.
    async with open_proxy(sock, spec, args, log_dir=log_dir, name=f"{stem}-vduproxy", log_level="info") as proxy:
        result.pids["proxy"] = proxy.pid
        pin_threads(proxy.pid, base.backend_cpu)
        cfg = dataclasses.replace(base, socket=str(sock), proxy_pid=proxy.pid)
        proc = ManagedProcess(stem, _child_argv(cfg), log_path=log_dir / f"{stem}.log", cwd=REPO)
        async with open_service_nursery() as nursery:
            await proc.start(nursery)
            result.pids["driver"] = proc.pid

            async def check_mode() -> None:
                # The control plane is done (every request answered), but the proxy's log reaches us through a
                # pipe: wait until its device starts stop coming, then the last one is what runs.
                await _settle(proxy, c.dirty_log)
                mode, ev = _started_mode(proxy)
                result.mode = mode
                result.evidence["proxy_start"] = ev
                if mode != c.expected_mode:
                    _, why = report.svq_evidence(proxy.events())
                    raise NotAvailable(
                        f"{c.name} needs the proxy in {c.expected_mode} mode; its last device_started says "
                        f"{mode or 'nothing'}" + (f" ({why})" if why else "")
                    )
                if c.dirty_log and True not in [ev.get("on") for ev in proxy.events("dirty_logging")]:
                    raise NotAvailable("the proxy never logged dirty_logging on=True after LOG_ALL")
                # SVQ threads start with the device: pin again now that every thread exists.
                result.evidence["proxy_threads_pinned"] = pin_threads(proxy.pid, base.backend_cpu)
                result.evidence["proxy_threads"] = thread_affinity(proxy.pid)

            try:
                await _drive(_Child(proc), result, cfg, on_ready=check_mode)
                await proc.wait(30)
            finally:
                await proc.terminate(grace=5)
                result.evidence["proxy_events"] = _proxy_events_evidence(proxy)


# ---- command line -------------------------------------------------------------------------------------------


def _ratio(
    results: dict[tuple[str, int], CaseResult], num: str, den: str, size: int, *, quiet: bool = False
) -> float | None:
    a, b = results.get((num, size)), results.get((den, size))
    if a is None or b is None:
        return None
    x, y = (a.quiet_median, b.quiet_median) if quiet else (a.median, b.median)
    return x / y if x is not None and y else None


RATIOS = (
    ("passthrough", "device"),
    ("svq", "device"),
    ("svq-log", "svq"),
    ("passthrough-loop", "device-loop"),
    ("svq-loop", "device-loop"),
    ("svq-log-loop", "svq-loop"),
)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f} %"


def render(results: dict[tuple[str, int], CaseResult], failures: dict[tuple[str, int], str]) -> str:
    lines = [
        f"| case | size | Mpps median | min..max | spread | quiet median (windows, others ≤ {QUIET_OTHERS:.0f} %) "
        "| mode | evidence |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted(set(results) | set(failures), key=lambda k: (ALL_CASES.index(k[0]), k[1]))
    for key in keys:
        if key in failures:
            lines.append(f"| {key[0]} | {key[1]} | — | — | — | — | — | {failures[key]} |")
            continue
        r = results[key]
        s = report.summarize(r.samples)
        assert s is not None
        spread = "—" if s.spread is None else f"{s.spread * 100:.0f} %"
        qm = r.quiet_median
        quiet = "—" if qm is None else f"{qm:.3f} ({len(r.quiet_samples())}/{len(r.samples)})"
        lines.append(
            f"| {r.case} | {r.size} | {s.median:.3f} | {s.minimum:.3f}..{s.maximum:.3f} | {spread} | {quiet} | "
            f"{r.mode} | {_evidence_text(r)} |"
        )
    lines += ["", "| ratio | size | of medians | of quiet medians |", "|---|---|---|---|"]
    sizes = sorted({k[1] for k in results})
    for num, den in RATIOS:
        for size in sizes:
            value = _ratio(results, num, den, size)
            if value is not None:
                quiet = _pct(_ratio(results, num, den, size, quiet=True))
                lines.append(f"| {num} / {den} | {size} | {_pct(value)} | {quiet} |")
    return "\n".join(lines)


def _evidence_text(r: CaseResult) -> str:
    ev, parts = r.evidence, []
    drv = ev.get("driver", {})
    if r.loop:
        parts.append(f"rx verified {drv.get('rx_verified', 0)}, mismatched {drv.get('rx_mismatch', 0)}")
    dirty = [w["dirty_pages"] for w in r.windows if "dirty_pages" in w]
    if dirty:
        rx = [w["rx_pages_dirty"] for w in r.windows]
        parts.append(f"dirty pages/window {min(dirty)}..{max(dirty)}" + (f" (rx {max(rx)})" if r.loop else ""))
    packets = drv.get("tx_packets") or 0
    if packets:
        parts.append(f"tx kicks/kpkt {drv.get('tx_kicks', 0) * 1000 / packets:.2f}")
    cpu = [w.get("cpu_percent", {}).get("others") for w in r.windows]
    cpu_known = [x for x in cpu if x is not None]
    if cpu_known:
        parts.append(f"others' CPU ≤ {max(cpu_known):.0f} %")
    return "; ".join(parts)


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _sizes(text: str) -> list[int]:
    return [int(x) for x in _csv(text)]


@contextlib.contextmanager
def _log_dir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
    else:
        yield Path(tempfile.mkdtemp(prefix="vdup-cdriver-logs-", dir="/tmp"))


async def run_cases(
    cases: Sequence[str],
    sizes: Sequence[int],
    loop_sizes: Sequence[int],
    *,
    rounds: int,
    windows: int,
    duration: float,
    warmup: float,
    log_dir: Path,
    options: DriverOptions,
) -> tuple[dict[tuple[str, int], CaseResult], dict[tuple[str, int], str]]:
    """Every case at its sizes, `rounds` times interleaved (drift hits every case alike); windows accumulate."""
    cpus = sorted(os.sched_getaffinity(0))
    sender, backend = cpus[-1], cpus[0]
    results: dict[tuple[str, int], CaseResult] = {}
    failures: dict[tuple[str, int], str] = {}
    for rnd in range(rounds):
        for case in cases:
            for size in loop_sizes if parse_case(case).loop else sizes:
                key = (case, size)
                if key in failures:
                    continue
                try:
                    r = await measure(
                        case, size, windows=windows, duration=duration, warmup=warmup, sender_cpu=sender,
                        backend_cpu=backend, log_dir=log_dir, options=options, name=f"r{rnd}-{case}-{size}",
                    )  # fmt: skip
                except NotAvailable as exc:
                    failures[key] = f"not available: {exc}"
                    continue
                except Exception as exc:
                    log.error("cdriver_case_failed", case=case, size=size, error=repr(exc))
                    failures[key] = f"failed: {type(exc).__name__}: {exc}".splitlines()[0][:300]
                    continue
                if key in results:
                    prev = results[key]
                    prev.samples += r.samples
                    prev.windows += r.windows
                    prev.evidence.setdefault("rounds", []).append(r.evidence)
                else:
                    results[key] = r
    return results, failures


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["_child"]:
        return child_main(args_list[1])
    ap = argparse.ArgumentParser(prog="python -m bench.cdriver", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=_csv, default=list(ALL_CASES), help=f"comma list of {','.join(ALL_CASES)}")
    ap.add_argument("--sizes", type=_sizes, default=[64, 1500], help="frame sizes of the tx cases (bytes)")
    ap.add_argument("--loop-sizes", type=_sizes, default=[64], help="frame sizes of the -loop cases")
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--duration", type=float, default=2.0, help="window length, s")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up before the first window, s")
    ap.add_argument("--rounds", type=int, default=1, help="set every case up N times, interleaved")
    ap.add_argument("--ring", type=int, default=RING, help="ring size (the sim allows up to 1024)")
    ap.add_argument("--burst", type=int, default=32, help="recycle / repost in bursts of at least N entries")
    ap.add_argument("--no-event-idx", action="store_true", help="do not negotiate VIRTIO_F_EVENT_IDX")
    ap.add_argument("--sim-options", default="", help='extra sim spec options, e.g. "busy_poll_us=50"')
    ap.add_argument(
        "--proxy-args", default="", help='extra `vduproxy serve` arguments, e.g. --proxy-args="--svq-busy-poll 50"'
    )
    ap.add_argument("--log-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write every sample and the evidence here")
    args = ap.parse_args(args_list)
    unknown = [c for c in args.cases if c not in ALL_CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {','.join(ALL_CASES)}")
    configure("info")
    opts = DriverOptions(
        ring=args.ring, burst=args.burst, event_idx=not args.no_event_idx, sim_options=args.sim_options,
        proxy_args=tuple(shlex.split(args.proxy_args)),
    )  # fmt: skip
    with _log_dir(args.log_dir) as log_dir:
        software = trio.run(software_info)
        results, failures = trio.run(
            functools.partial(
                run_cases, args.cases, args.sizes, args.loop_sizes, rounds=args.rounds, windows=args.windows,
                duration=args.duration, warmup=args.warmup, log_dir=log_dir, options=opts,
            )
        )  # fmt: skip
        print(render(results, failures))
        print(f"\nlogs: {log_dir}; git {software['git_revision']}{' + working tree' if software['git_dirty'] else ''}")
    if args.json is not None:
        sizes = sorted({k[1] for k in results})
        payload = {
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "log_dir")},
            "machine": {"nproc": os.cpu_count(), "load_end": _loadavg()},
            "software": software,
            "results": [r.to_json() for r in results.values()],
            "failures": [{"case": k[0], "size": k[1], "reason": v} for k, v in failures.items()],
            "ratios": {f"{n}/{d}@{s}": _ratio(results, n, d, s) for n, d in RATIOS for s in sizes},
            "quiet_ratios": {f"{n}/{d}@{s}": _ratio(results, n, d, s, quiet=True) for n, d in RATIOS for s in sizes},
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return 1 if any(v.startswith("failed") for v in failures.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
