"""dpdk-testpmd (DPDK 22.11) as a vhost-user front-end (virtio-user) or back-end (vhost PMD) for tests.

No hugepages: `--no-huge -m N` memory is a memfd in 22.11, which virtio-user can pass over the socket.
`--in-memory` cannot be combined with `--no-huge`, so each instance gets a unique `--file-prefix`, and
the /var/run/dpdk/<prefix> directory DPDK creates anyway (as root) is removed on teardown.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import secrets
import shutil
import stat
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import trio

from vduproxy.log import get_logger
from vduproxy.testing.procs import LineLog, ManagedProcess, open_service_nursery, short_socket_path

log = get_logger(__name__)

TESTPMD_BINARY = "dpdk-testpmd"
DPDK_RUN_DIR = Path("/var/run/dpdk")
PROMPT = "testpmd> "
# Each testpmd needs a main lcore plus a forwarding lcore; letting both float over the 2 CPUs keeps two
# instances (front-end and back-end) from starving each other on a 2-core machine.
DEFAULT_LCORES = "0@(0-1),1@(0-1)"
_counter = itertools.count(1)


@dataclass(frozen=True)
class VirtioUserVdev:
    """virtio-user PMD: testpmd is the vhost-user front-end (the driver), like QEMU's side of the socket."""

    path: Path
    queues: int = 1
    queue_size: int = 256
    server: bool = False  # testpmd listens; it blocks before its prompt until the back-end connects
    mrg_rxbuf: bool | None = None
    in_order: bool | None = None
    packed_vq: bool | None = None
    mac: str | None = None
    extra: str = ""

    def devargs(self, index: int) -> str:
        args = f"net_virtio_user{index},path={short_socket_path(self.path)},queues={self.queues}"
        args += f",queue_size={self.queue_size}"
        if self.server:
            args += ",server=1"
        for name in ("mrg_rxbuf", "in_order", "packed_vq"):
            value = getattr(self, name)
            if value is not None:
                args += f",{name}={int(value)}"
        if self.mac is not None:
            args += f",mac={self.mac}"
        return args + self.extra


@dataclass(frozen=True)
class VhostVdev:
    """vhost PMD: testpmd is a vhost-user back-end (a reference peer for vduproxy)."""

    iface: Path
    queues: int = 1
    client: bool = False  # testpmd connects instead of listening
    extra: str = ""

    def devargs(self, index: int) -> str:
        args = f"net_vhost{index},iface={short_socket_path(self.iface)},queues={self.queues}"
        if self.client:
            args += ",client=1"
        return args + self.extra


Vdev = VirtioUserVdev | VhostVdev


@dataclass
class TestpmdConfig:
    vdevs: Sequence[Vdev]
    forward_mode: str = "io"
    interactive: bool = True  # driven over stdin; False: runs at once, prints stats every stats_period s
    auto_start: bool = False
    stats_period: int | None = None  # non-interactive only
    port_topology: str = "loop"  # each port forwards to itself; "paired" would pair port 0 with port 1
    lcores: str = DEFAULT_LCORES
    nb_cores: int = 1
    mem_mb: int = 512
    total_mbufs: int = 32768  # the default (155456) does not fit in 512 MiB
    rxq: int | None = None  # default: the largest vdev queue count
    txq: int | None = None
    txpkts: int | None = None  # frame length for txonly/flowgen
    log_levels: Sequence[str] = ()  # e.g. "lib.vhost.config:debug"
    extra_eal: Sequence[str] = field(default_factory=tuple)
    extra_app: Sequence[str] = field(default_factory=tuple)

    __test__ = False  # not a pytest class, despite its name

    def argv(self, file_prefix: str) -> list[str]:
        if not self.vdevs:
            raise ValueError("testpmd needs at least one vdev")
        if self.interactive and self.stats_period is not None:
            raise ValueError("stats_period only works in non-interactive mode")
        queues = max(v.queues for v in self.vdevs)
        # SIGPIPE ignored: a front-end whose back-end died is killed by SIGPIPE on `port close` otherwise.
        # stdbuf: testpmd's stdout is block-buffered into a pipe, so stats would only appear at exit.
        args = [
            "env",
            "--ignore-signal=PIPE",
            "stdbuf",
            "-oL",
            "-eL",
            TESTPMD_BINARY,
            "--lcores",
            self.lcores,
        ]
        args += ["--no-huge", "-m", str(self.mem_mb), "--no-pci", f"--file-prefix={file_prefix}"]
        args += [f"--log-level={lv}" for lv in self.log_levels]
        for i, vdev in enumerate(self.vdevs):
            args += ["--vdev", vdev.devargs(i)]
        args += list(self.extra_eal)
        args += ["--"]
        if self.interactive:
            args += ["-i"]
        args += ["--no-numa", f"--total-num-mbufs={self.total_mbufs}", f"--forward-mode={self.forward_mode}"]
        args += [f"--port-topology={self.port_topology}", f"--nb-cores={self.nb_cores}"]
        args += [f"--rxq={self.rxq or queues}", f"--txq={self.txq or queues}"]
        if self.auto_start:
            args += ["--auto-start"]
        if self.stats_period is not None:
            args += [f"--stats-period={self.stats_period}"]
        if self.txpkts is not None:
            args += [f"--txpkts={self.txpkts}"]
        return args + list(self.extra_app)


@dataclass(frozen=True)
class PortStats:
    """One port's `show port stats` block (throughput is since the previous show)."""

    port: int
    rx_packets: int = 0
    rx_missed: int = 0
    rx_bytes: int = 0
    rx_errors: int = 0
    rx_nombuf: int = 0
    tx_packets: int = 0
    tx_errors: int = 0
    tx_bytes: int = 0
    rx_pps: int = 0
    rx_bps: int = 0
    tx_pps: int = 0
    tx_bps: int = 0


_STATS_HEADER = re.compile(r"#+ NIC statistics for port (\d+)\s+#+")
_STATS_FIELD = re.compile(r"([RT]x-(?:packets|missed|bytes|errors|nombuf|pps|bps)):\s*(\d+)", re.IGNORECASE)
_STATS_NAMES = {f.name for f in fields(PortStats)}


def parse_port_stats(text: str) -> dict[int, PortStats]:
    """Every port's last statistics block in `text` (output of `show port stats all` or --stats-period)."""
    result: dict[int, PortStats] = {}
    port: int | None = None
    values: dict[str, int] = {}
    for line in text.splitlines():
        header = _STATS_HEADER.search(line)
        if header is not None:
            port, values = int(header[1]), {}
            continue
        if port is None:
            continue
        if re.fullmatch(r"\s*#{20,}\s*", line):
            result[port] = PortStats(port=port, **values)
            port = None
            continue
        for name, value in _STATS_FIELD.findall(line):
            # "RX-packets" and "Rx-pps" share a prefix: case decides which field it is.
            key = name.replace("-", "_").lower()
            if key in _STATS_NAMES:
                values[key] = int(value)
    return result


class TestpmdError(Exception):
    """testpmd printed an error for a command, or its output could not be understood."""


class Testpmd:
    """One dpdk-testpmd process. Start it with `start(nursery)` or `open_testpmd()`."""

    __test__ = False

    def __init__(self, config: TestpmdConfig, *, name: str = "testpmd", log_dir: Path | None = None) -> None:
        self.config = config
        self.name = name
        self.file_prefix = f"vdup-{name}-{os.getpid()}-{next(_counter)}-{secrets.token_hex(2)}"
        self.argv = config.argv(self.file_prefix)
        self.process = ManagedProcess(name, self.argv, log_path=log_dir / f"{name}.log" if log_dir else None)
        self._lock = trio.Lock()
        self._ready = False
        self._log = log.bind(testpmd=name)

    @property
    def output(self) -> LineLog:
        return self.process.output

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def num_ports(self) -> int:
        return len(self.config.vdevs)

    async def start(self, nursery: trio.Nursery) -> None:
        for vdev in self.config.vdevs:
            if isinstance(vdev, VhostVdev) and not vdev.client:
                # A server killed with SIGKILL leaves its socket file, and the next bind() fails.
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(vdev.iface.lstat().st_mode):
                        vdev.iface.unlink()
        await self.process.start(nursery)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the ports are started (a server-mode virtio-user waits here for its back-end)."""
        if self._ready:
            return
        if self.config.interactive:
            await self.output.wait_for(rf"^{PROMPT}", timeout, partial=True)
        else:
            i, _ = await self.output.wait_for(r"^Checking link statuses", timeout)
            await self.output.wait_for(r"^Done$", timeout, since=i + 1)
        self._ready = True
        self._log.info("testpmd ready", pid=self.pid, prefix=self.file_prefix)

    async def command(self, cmd: str, timeout: float = 30.0) -> str:
        """Run one interactive command; returns its output (until the next prompt)."""
        if not self.config.interactive:
            raise TestpmdError("command() needs interactive mode")
        if "\n" in cmd:
            raise ValueError("one command per call")
        async with self._lock:
            await self.wait_ready(timeout)
            since = self.output.mark()
            await self.process.send(cmd + "\n")
            # testpmd echoes each command (after its prompt, unless an event message came in between);
            # the output ends at the next prompt.
            echo, _ = await self.output.wait_for(rf"^({PROMPT})?{re.escape(cmd)}\s*$", timeout, since=since)
            end, _ = await self.output.wait_for(rf"^{PROMPT}", timeout, since=echo + 1, partial=True)
            return "\n".join(line.text for line in self.output.lines[echo + 1 : end])

    async def start_forwarding(self, tx_first: int = 0) -> None:
        """`start`, or `start tx_first N` so a closed loop (io <-> io) has packets to forward."""
        await self.command("start" if tx_first == 0 else f"start tx_first {tx_first}")

    async def stop_forwarding(self) -> str:
        return await self.command("stop")

    async def port_stats(self, timeout: float = 30.0) -> dict[int, PortStats]:
        """`show port stats all`, parsed; every port of this instance must be in it."""
        stats = parse_port_stats(await self.command("show port stats all", timeout))
        if set(stats) != set(range(self.num_ports)):
            raise TestpmdError(f"port stats for ports {sorted(stats)}, expected {self.num_ports} ports")
        return stats

    def latest_port_stats(self) -> dict[int, PortStats]:
        """The last periodic stats printed so far (non-interactive mode with stats_period)."""
        return parse_port_stats(self.output.text())

    async def aclose(self, grace: float = 10.0) -> int | None:
        """Quit (interactive) or SIGTERM, SIGKILL after `grace`; always reaped; the DPDK run dir removed."""
        with trio.CancelScope(shield=True):
            if self.process.running and self.config.interactive:
                # `quit` closes the vhost-user connection cleanly (GET_VRING_BASE), which a signal skips.
                with contextlib.suppress(Exception):
                    await self.process.send("quit\n")
                    await self.process.wait(grace)
            rc = await self.process.terminate(grace)
        shutil.rmtree(DPDK_RUN_DIR / self.file_prefix, ignore_errors=True)
        self._log.info("testpmd closed", rc=rc)
        return rc


@contextlib.asynccontextmanager
async def open_testpmd(
    config: TestpmdConfig, *, name: str = "testpmd", log_dir: Path | None = None, wait_ready: bool = True
) -> AsyncIterator[Testpmd]:
    """Start testpmd (waiting for its ports unless `wait_ready=False`), always tear it down on exit."""
    async with open_service_nursery() as nursery:
        pmd = Testpmd(config, name=name, log_dir=log_dir)
        try:
            await pmd.start(nursery)
            if wait_ready:
                await pmd.wait_ready()
            yield pmd
        finally:
            await pmd.aclose()
