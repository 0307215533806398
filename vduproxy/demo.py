"""`vduproxy demo migrate`: the live-migration story on one machine, with a printed timeline.

Two daemons serve two software devices of different "vendors" (sim profiles `rich` and `vdpasim`), each on a TAP
in one bridge; a veth puts the bridge into a network namespace that holds the host address 10.0.2.2/24. A QEMU 7.2
TCG guest runs on the first daemon while the namespace pings it every 0.2 s. QMP `migrate` moves it to a second
QEMU on the other daemon (and back with `--back`). The timeline is assembled from what each party reports: QEMU's
`query-migrate`, the daemons' JSON log events (`dirty_logging`, `device_started` with its mode and `why`,
`rarp_sent`), their control sockets (`stats`: per-queue `dirty_pages`) and the pinger's per-reply lines.

Everything it creates (processes, namespace, TAPs, bridge, veth, sockets) is removed on every path, Ctrl-C
included. The test-bed modules under `vduproxy.testing` do the plumbing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import trio

from .log import get_logger

if TYPE_CHECKING:
    from .testing.initramfs import GuestImage

log = get_logger(__name__)

GUEST_IP = "10.0.2.15"
HOST_ADDRESS = "10.0.2.2/24"
PING_INTERVAL = 0.2
# The pinger is stopped by the demo; the count only has to outlast any run.
PING_COUNT = 1_000_000
STATS_POLL = 0.1  # dirty-page counters exist only while the source is in SVQ mode: sample often
BOOT_TIMEOUT = 180.0  # TCG boot is ~5 s quiet, far longer on a loaded 2-core machine
REACH_TIMEOUT = 120.0
MIGRATE_TIMEOUT = 180.0
EVENT_TIMEOUT = 30.0
# QEMU announces the guest 5 times over ~1.5 s after an incoming migration (SEND_RARP each time).
RARP_TIMEOUT = 10.0
PROFILES = ("rich", "vdpasim")
REQUIRED = {"qemu-system-x86_64": "qemu-system-x86", "ip": "iproute2"}
_PING = re.compile(r"PING seq=(\d+) (?:t=[\d.]+ ok|lost)")


class DemoError(Exception):
    """A step of the demo failed; the message says which and why."""


@dataclass(frozen=True)
class DemoOptions:
    keep_going: float = 10.0  # seconds of pings after each switchover
    back: bool = False  # migrate back to the first daemon too
    json: bool = False  # the timeline as one JSON document on stdout


@dataclass(frozen=True)
class Step:
    """One timeline entry; `t` is seconds since the demo started, `leg` 0 is set-up, 1 is A→B, 2 is B→A."""

    t: float
    leg: int
    step: str
    text: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"t": round(self.t, 3), "leg": self.leg, "step": self.step, "text": self.text, **self.data}


@dataclass
class DemoResult:
    steps: list[Step] = field(default_factory=list)
    legs: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    failed_step: str | None = None
    interrupted: str | None = None
    logs: str | None = None  # kept only when something failed

    @property
    def ok(self) -> bool:
        return self.error is None and self.interrupted is None

    def timeline(self) -> list[Step]:
        # Stable: steps observed at the same instant keep the order they were recorded in.
        return sorted(self.steps, key=lambda s: s.t)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "error": self.error, "failed_step": self.failed_step, "interrupted": self.interrupted,
            "logs": self.logs, "timeline": [s.to_json() for s in self.timeline()], "legs": self.legs,
            "summary": self.summary,
        }  # fmt: skip


class Clock:
    """Puts every source's time on one axis: seconds since the demo started.

    The daemons stamp events with wall-clock ISO times; process output lines carry monotonic arrival times.
    """

    def __init__(self) -> None:
        self.wall0 = time.time()
        self.mono0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.mono0

    def from_wall(self, ts: float) -> float:
        return ts - self.wall0

    def from_mono(self, mono: float) -> float:
        return mono - self.mono0


def preflight() -> list[str]:
    """What stops the demo from running here, each with its fix (empty when it can run)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("needs root: it creates a network namespace, TAP devices and a bridge (run it with sudo)")
    for binary, package in REQUIRED.items():
        if shutil.which(binary) is None:
            problems.append(f"{binary} not found (apt install {package})")
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        problems.append(f"/dev/net/tun unusable: {exc.strerror} (TAP devices need the tun module)")
    return problems


# ------------------------------------------------------------------------------------------------ observers


def _event_time(ev: dict[str, Any], clock: Clock, fallback: float) -> float:
    ts = ev.get("timestamp")
    if isinstance(ts, str):
        with contextlib.suppress(ValueError):
            return clock.from_wall(datetime.datetime.fromisoformat(ts).timestamp())
    if isinstance(ts, int | float):
        return clock.from_wall(float(ts))
    return fallback


class ProxyEvents:
    """A daemon's JSON log events, each with its time on the demo's clock, from a line index on."""

    def __init__(self, proxy: Any, clock: Clock, label: str) -> None:
        self.proxy = proxy  # vduproxy.testing.proxy.ProxyProcess (imported lazily with the test bed)
        self.clock = clock
        self.label = label

    def mark(self) -> int:
        return int(self.proxy.proc.output.mark())

    def events(self, name: str, since: int = 0) -> list[tuple[float, dict[str, Any]]]:
        output = self.proxy.proc.output
        out = []
        for line in output.lines[since:]:
            text = line.text.strip()
            if not text.startswith("{"):
                continue
            try:
                ev = json.loads(text)
            except ValueError:
                continue
            if isinstance(ev, dict) and ev.get("event") == name:
                out.append((_event_time(ev, self.clock, self.clock.from_mono(output.t0 + line.t)), ev))
        return out

    async def wait(
        self, name: str, since: int, timeout: float, match: Callable[[dict[str, Any]], bool] = lambda ev: True
    ) -> tuple[float, dict[str, Any]] | None:
        """The first `name` event after line `since` that `match`es, or None after `timeout`."""
        with trio.move_on_after(timeout):
            while True:
                for found in self.events(name, since):
                    if match(found[1]):
                        return found
                if not self.proxy.proc.running:
                    raise DemoError(f"{self.label} exited (rc={self.proxy.proc.returncode}); see its log")
                await trio.sleep(0.05)
        return None


class PingLog:
    """The namespace pinger's verdicts: seq → (answered, time the verdict line arrived)."""

    def __init__(self, proc: Any, clock: Clock) -> None:
        self.proc = proc  # vduproxy.testing.procs.ManagedProcess
        self.clock = clock

    def results(self) -> dict[int, tuple[bool, float]]:
        output = self.proc.output
        out: dict[int, tuple[bool, float]] = {}
        for line in output.lines:
            m = _PING.search(line.text)
            if m:
                out[int(m[1])] = (line.text.endswith("ok"), self.clock.from_mono(output.t0 + line.t))
        return out

    def last_seq(self) -> int:
        return max(self.results(), default=-1)

    def lost_between(self, first: int, last: int) -> list[int]:
        res = self.results()
        return [s for s in range(first, last + 1) if s in res and not res[s][0]]

    async def wait_replies(self, n: int, timeout: float) -> None:
        with trio.fail_after(timeout):
            while sum(ok for ok, _ in self.results().values()) < n:
                if not self.proc.running:
                    raise DemoError(f"the pinger exited (rc={self.proc.returncode}): {self.proc.output.tail(3)}")
                await trio.sleep(0.2)

    async def first_reply_after(self, t: float, timeout: float) -> tuple[int, float] | None:
        """(seq, time) of the first reply that arrived after demo time `t`."""
        with trio.move_on_after(timeout):
            while True:
                after = [(at, seq) for seq, (ok, at) in self.results().items() if ok and at > t]
                if after:
                    at, seq = min(after)
                    return seq, at
                await trio.sleep(0.1)
        return None


@dataclass
class DirtySample:
    """Dirty-page counters of the source's SVQ, per queue, as the control socket reports them."""

    baseline: dict[str, int] = field(default_factory=dict)
    latest: dict[str, int] = field(default_factory=dict)
    first_seen: float | None = None  # first poll that showed pages logged during this migration
    last_seen: float | None = None
    polls: int = 0
    failures: int = 0

    def pages(self) -> dict[str, int]:
        return {vq: n - self.baseline.get(vq, 0) for vq, n in sorted(self.latest.items())}

    def total(self) -> int:
        return sum(self.pages().values())


async def _dirty_counters(control: Path) -> dict[str, int]:
    from .control import call

    reply = await call(str(control), {"verb": "stats"})
    out: dict[str, int] = {}
    for pair in reply.get("stats", {}).get("pairs", {}).values():
        for vq, q in (pair.get("queues") or {}).items():
            if isinstance(q, dict) and isinstance(q.get("dirty_pages"), int):
                out[str(vq)] = q["dirty_pages"]
    return out


async def _poll_dirty(control: Path, sample: DirtySample, clock: Clock) -> None:
    from .control import ControlError, ControlUnavailable

    while True:
        # Taken before asking: the daemon answers later than this, so a poll that shows pages is never placed
        # after the moment the source stopped its rings.
        asked = clock.now()
        try:
            counters = await _dirty_counters(control)
        except (ControlError, ControlUnavailable, OSError):
            sample.failures += 1
        else:
            sample.polls += 1
            # The counters vanish once the source stops its rings: keep the last values seen.
            for vq, n in counters.items():
                sample.latest[vq] = max(n, sample.latest.get(vq, 0))
            if any(n > sample.baseline.get(vq, 0) for vq, n in counters.items()):
                if sample.first_seen is None:
                    sample.first_seen = asked
                sample.last_seen = asked
        await trio.sleep(STATS_POLL)


# ------------------------------------------------------------------------------------------------ the demo


@dataclass
class End:
    """One migration end: its daemon, QEMU and control socket."""

    name: str
    profile: str
    proxy: Any  # ProxyProcess
    events: ProxyEvents
    control: Path
    socket: Path

    @property
    def label(self) -> str:
        return f"{self.name} ({self.profile})"


class Demo:
    def __init__(self, options: DemoOptions, *, out: TextIO | None = None) -> None:
        self.options = options
        self.out = out if out is not None else sys.stderr
        self.clock = Clock()
        self.result = DemoResult()
        self.current = "starting"
        self.ends: list[End] = []

    # --- reporting ----------------------------------------------------------------------------------------
    def progress(self, text: str) -> None:
        print(f"[{self.clock.now():6.1f}s] {text}", file=self.out, flush=True)

    def record(self, t: float, leg: int, step: str, text: str, **data: Any) -> Step:
        s = Step(t, leg, step, text, data)
        self.result.steps.append(s)
        self.progress(f"  {'leg ' + str(leg) if leg else 'setup'}: {text}")
        return s

    def begin(self, what: str) -> None:
        self.current = what
        for end in self.ends:
            # A daemon that died would otherwise surface much later as a QEMU or QMP timeout.
            if not end.proxy.proc.running:
                raise DemoError(f"{end.name} exited (rc={end.proxy.proc.returncode}); see its log")
        self.progress(what + " ...")

    # --- the run ------------------------------------------------------------------------------------------
    async def run(self, image: GuestImage, workdir: Path) -> None:
        from .testing.netns import open_extra_tap, open_tap_peer
        from .testing.procs import ManagedProcess, open_service_nursery
        from .testing.proxy import open_proxy
        from .testing.qemu import GuestConfig, free_tcp_port, open_guest

        logs = workdir / "logs"
        logs.mkdir()
        async with contextlib.AsyncExitStack() as stack:
            self.begin(f"creating the network: namespace with {HOST_ADDRESS}, bridge, veth, two TAPs")
            peer = await stack.enter_async_context(open_tap_peer(HOST_ADDRESS))
            tap_b = await stack.enter_async_context(open_extra_tap(peer))
            self.progress(f"  netns {peer.ns.name}, bridge {peer.bridge}, TAPs {peer.tap} and {tap_b}")
            ends = self.ends
            for name, profile, tap in (("proxy-a", PROFILES[0], peer.tap), ("proxy-b", PROFILES[1], tap_b)):
                device = f"sim:profile={profile},backend=tap,tap={tap}"
                self.begin(f"starting {name}: vduproxy serve --device {device}")
                sock, ctl = workdir / f"{name}.sock", workdir / f"{name}.ctl"
                ctx = open_proxy(sock, device, ["--control", str(ctl)], log_dir=logs, name=name)
                proxy = await stack.enter_async_context(ctx)
                self.progress(f"  {name} pid {proxy.pid}, socket {sock}, control {ctl}")
                ends.append(End(name, profile, proxy, ProxyEvents(proxy, self.clock, name), ctl, sock))
            a, b = ends
            # The proxy does not offer GUEST_ANNOUNCE (QEMU emulates the guest's control queue for vhost-user), so
            # the guest cannot announce its new location itself: QEMU asks the destination back-end to (SEND_RARP)
            # and the proxy injects a RARP on its device's TX ring, which moves the MAC in the bridge.
            base = GuestConfig(kernel=image.kernel, initrd=image.initrd, socket=a.socket, peermac=None)
            self.begin(f"booting the guest on {a.label} (QEMU TCG, {base.mem_mb} MiB)")
            src = await stack.enter_async_context(open_guest(base, name="qemu-src", log_dir=logs))
            marker = await src.wait_marker(timeout=BOOT_TIMEOUT)
            if not marker.carrier:
                raise DemoError("the guest's eth0 has no carrier")
            self.record(self.clock.now(), 0, "guest_booted", f"guest up: eth0 {marker.ip} mac {marker.mac}")

            self.begin(f"pinging the guest ({GUEST_IP}) from the namespace every {PING_INTERVAL} s")
            pinger = ManagedProcess(
                "pinger",
                peer.ns.argv(sys.executable, "-m", "vduproxy.testing.pinger", GUEST_IP, str(PING_INTERVAL),
                             str(PING_COUNT)),
                log_path=logs / "pinger.log",
            )  # fmt: skip
            nursery = await stack.enter_async_context(open_service_nursery())
            stack.push_async_callback(pinger.terminate)
            await pinger.start(nursery)
            pings = PingLog(pinger, self.clock)
            await pings.wait_replies(5, REACH_TIMEOUT)
            self.record(self.clock.now(), 0, "guest_reachable", "the guest answers pings")

            dst_cfg = dataclasses.replace(base, socket=b.socket, incoming=f"tcp:127.0.0.1:{free_tcp_port()}")
            self.begin(f"starting the destination QEMU on {b.label}, waiting for the migration")
            dst = await stack.enter_async_context(open_guest(dst_cfg, name="qemu-dst", log_dir=logs))
            await self._expect_status(dst, "inmigrate")
            await self.migrate(1, src, dst, a, b, dst_cfg.incoming or "", pings)
            if self.options.back:
                self.begin(f"stopping the source QEMU so that {a.name} can take a new front-end")
                since = a.events.mark()
                await src.aclose()
                if await a.events.wait("frontend_disconnected", since, EVENT_TIMEOUT) is None:
                    raise DemoError(f"{a.name} did not see the old QEMU disconnect")
                back_cfg = dataclasses.replace(base, incoming=f"tcp:127.0.0.1:{free_tcp_port()}")
                self.begin(f"starting a QEMU on {a.label} to migrate back to")
                back = await stack.enter_async_context(open_guest(back_cfg, name="qemu-back", log_dir=logs))
                await self._expect_status(back, "inmigrate")
                await self.migrate(2, dst, back, b, a, back_cfg.incoming or "", pings)
            self.summarize(pings)
            self.begin("cleaning up")

    async def _expect_status(self, guest: Any, want: str) -> None:
        status = await guest.query_status()
        if status != want:
            raise DemoError(f"{guest.name} is {status!r}, expected {want!r}")

    async def migrate(self, leg: int, src: Any, dst: Any, a: End, b: End, uri: str, pings: PingLog) -> None:
        """One live migration from `a` to `b`, recorded step by step."""
        self.begin(f"leg {leg}: live migration {a.label} → {b.label}")
        from .control import ControlError, ControlUnavailable

        sample = DirtySample()
        with contextlib.suppress(ControlError, ControlUnavailable, OSError):
            # Counters from before the migration (a source already in SVQ mode) are not this migration's.
            sample.baseline = await _dirty_counters(a.control)
        since_a, since_b = a.events.mark(), b.events.mark()
        first_seq = pings.last_seq() + 1
        text = f"QMP migrate {uri} on {src.name}"
        self.record(self.clock.now(), leg, "migration_started", text, uri=uri, source=a.name, destination=b.name)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_poll_dirty, a.control, sample, self.clock)
            info = await src.migrate(uri, timeout=MIGRATE_TIMEOUT)
            nursery.cancel_scope.cancel()
        t_done = self.clock.now()

        for t, ev in a.events.events("dirty_logging", since_a):
            if ev.get("on"):
                self.record(t, leg, "dirty_logging_on", f"{a.name}: QEMU set VHOST_F_LOG_ALL, dirty logging on")
                break
        svq = [(t, ev) for t, ev in a.events.events("device_started", since_a) if ev.get("mode") == "svq"]
        if not svq:
            raise DemoError(f"{a.name} never switched to SVQ mode while QEMU asked for dirty logging")
        t_svq, ev_svq = svq[0]
        why = ev_svq.get("why")
        text = f"{a.name}: rings restarted in SVQ mode (why: {why}, took {ev_svq.get('took_us')} µs)"
        self.record(t_svq, leg, "source_svq", text, why=why, took_us=ev_svq.get("took_us"))

        pages = sample.pages()
        if sample.last_seen is None:
            text = f"{a.name}: no dirty pages seen in {sample.polls} stats polls"
            self.record(t_done, leg, "dirty_pages", text, pages=0, per_queue=pages, polls=sample.polls)
        else:
            text = f"{a.name}: the SVQ logged {sample.total()} dirty pages (per vq {pages}, from vduproxy stats)"
            self.record(sample.last_seen, leg, "dirty_pages", text, pages=sample.total(), per_queue=pages,
                        polls=sample.polls)  # fmt: skip

        downtime, total, ram = info.get("downtime"), info.get("total-time"), info.get("ram", {})
        sent = ram.get("transferred", 0) / 2**20
        text = f"QEMU: migration completed, downtime {downtime} ms, total {total} ms, {sent:.1f} MiB sent"
        self.record(t_done, leg, "migration_completed", text, downtime_ms=downtime, total_ms=total,
                    setup_ms=info.get("setup-time"), transferred=ram.get("transferred"))  # fmt: skip

        started = await b.events.wait("device_started", since_b, EVENT_TIMEOUT)
        if started is None:
            raise DemoError(f"{b.name} did not start the guest's rings within {EVENT_TIMEOUT:.0f} s")
        t_dst, ev_dst = started
        mode = ev_dst.get("mode")
        text = f"{b.name}: device started in {mode} mode (why: {ev_dst.get('why')})"
        self.record(t_dst, leg, "destination_started", text, mode=mode, why=ev_dst.get("why"))

        rarp = await b.events.wait("rarp_sent", since_b, RARP_TIMEOUT)
        if rarp is None:
            text = f"{b.name}: no RARP sent within {RARP_TIMEOUT:.0f} s (QEMU sent no SEND_RARP)"
            self.record(self.clock.now(), leg, "rarp_sent", text, sent=False)
        else:
            t_rarp, ev_rarp = rarp
            text = f"{b.name}: RARP for {ev_rarp.get('mac')} injected on the device's TX vq {ev_rarp.get('vq')}"
            self.record(t_rarp, leg, "rarp_sent", text, sent=True, mac=ev_rarp.get("mac"))

        reply = await pings.first_reply_after(t_dst, EVENT_TIMEOUT)
        if reply is None:
            raise DemoError(f"no ping answered within {EVENT_TIMEOUT:.0f} s after {b.name} started the device")
        seq, t_ping = reply
        text = f"first ping answered after the switchover: seq {seq}, {t_ping - t_dst:.2f} s after {b.name} started"
        self.record(t_ping, leg, "first_ping_after", text, seq=seq)

        self.progress(f"  keeping the pings going for {self.options.keep_going:g} s")
        await trio.sleep(self.options.keep_going)
        last = pings.last_seq()
        lost = pings.lost_between(first_seq, last)
        answered_after = sum(1 for ok, at in pings.results().values() if ok and at > t_dst)
        self.result.legs.append({
            "leg": leg, "source": a.label, "destination": b.label, "downtime_ms": downtime, "total_ms": total,
            "dirty_pages": sample.total(), "source_svq_why": why, "destination_mode": mode,
            "rarp_sent": rarp is not None, "first_seq": first_seq, "last_seq": last, "lost": lost,
            "answered_after_switchover": answered_after,
        })  # fmt: skip
        self.progress(f"  leg {leg}: {len(lost)} pings lost around the switchover {lost or ''}".rstrip())

    def summarize(self, pings: PingLog) -> None:
        res = pings.results()
        answered = sum(ok for ok, _ in res.values())
        self.result.summary = {
            "pings_sent": len(res), "pings_answered": answered, "pings_lost": len(res) - answered,
            "lost_seqs": sorted(s for s, (ok, _) in res.items() if not ok), "interval_s": PING_INTERVAL,
        }  # fmt: skip


# ------------------------------------------------------------------------------------------------ rendering


def format_result(result: DemoResult) -> str:
    lines = ["", "timeline (seconds since the demo started)"]
    for s in result.timeline():
        leg = f"leg {s.leg}" if s.leg else "setup"
        lines.append(f"  {s.t:8.2f}  {leg:<5}  {s.step:<20} {s.text}")
    for g in result.legs:
        lines.append(
            f"leg {g['leg']} {g['source']} → {g['destination']}: downtime {g['downtime_ms']} ms, "
            f"total {g['total_ms']} ms, {g['dirty_pages']} dirty pages, destination in {g['destination_mode']} mode, "
            f"pings lost {len(g['lost'])} {g['lost'] or ''}".rstrip()
        )
    if result.summary:
        sm = result.summary
        lines.append(f"pings: {sm['pings_sent']} sent, {sm['pings_answered']} answered, {sm['pings_lost']} lost")
    if result.interrupted:
        lines.append(f"interrupted ({result.interrupted}): everything created was removed")
    if result.error:
        lines.append(f"FAILED while {result.failed_step}: {result.error}")
    if result.logs:
        lines.append(f"process logs kept in {result.logs}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ entry point


@contextlib.asynccontextmanager
async def _cancel_on_signal(result: DemoResult) -> AsyncIterator[None]:
    """Ctrl-C / SIGTERM cancel the run so that every context manager cleans up (a KeyboardInterrupt raised at an
    arbitrary point could skip a finally block half-way)."""
    async with trio.open_nursery() as nursery:

        async def watch(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                task_status.started()
                async for signum in signals:
                    result.interrupted = signal.Signals(signum).name
                    nursery.cancel_scope.cancel()
                    return

        await nursery.start(watch)
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()


def _describe(exc: BaseException) -> str:
    from .testing.procs import unwrap_group

    leaf = unwrap_group(exc)
    if isinstance(leaf, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in leaf.exceptions)
    if isinstance(leaf, trio.TooSlowError):
        return "timed out (the process logs say what it was waiting for)"
    return str(leaf) or type(leaf).__name__


async def _main(demo: Demo, image: GuestImage, workdir: Path) -> None:
    try:
        async with _cancel_on_signal(demo.result):
            await demo.run(image, workdir)
    except Exception as exc:
        demo.result.failed_step = demo.current
        demo.result.error = _describe(exc)
        log.debug("demo_failure", step=demo.current, exc_info=True)


def run_migrate(options: DemoOptions) -> int:
    """`vduproxy demo migrate`: 0 on success, 1 when a step failed, 2 when the host cannot run it, 130 on Ctrl-C."""
    problems = preflight()
    if problems:
        for p in problems:
            log.error("demo_cannot_run", problem=p)
        return 2
    from .testing.initramfs import InitramfsError, build_initramfs

    demo = Demo(options)
    demo.begin("building the guest image (kernel + busybox initramfs, cached)")
    try:
        image = build_initramfs()
    except InitramfsError as exc:
        log.error("demo_cannot_run", problem=f"cannot build the guest initramfs: {exc}")
        return 2
    except KeyboardInterrupt:
        return 130
    # A short path: vhost-user and control sockets must fit in sun_path.
    workdir = Path(tempfile.mkdtemp(prefix="vdup-demo-", dir="/tmp"))
    try:
        trio.run(_main, demo, image, workdir)
    except KeyboardInterrupt:
        # Only possible before the signal watcher is installed: nothing had been created yet.
        demo.result.interrupted = "SIGINT"
    result = demo.result
    if result.error is not None:
        result.logs = str(workdir / "logs")
        # The sockets go, the process logs stay for the post-mortem.
        for leftover in workdir.iterdir():
            if leftover.name != "logs":
                with contextlib.suppress(OSError):
                    leftover.unlink()
        log.error("demo_failed", step=result.failed_step, error=result.error, logs=result.logs)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if options.json:
        print(json.dumps(result.to_json(), indent=2, default=str), flush=True)
    else:
        print(format_result(result), flush=True)
    if result.interrupted is not None:
        return 130
    return 0 if result.ok else 1
