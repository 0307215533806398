"""QEMU 7.2 TCG guest for real-client tests: command line, serial agent, minimal QMP client, teardown.

Facts this module encodes (measured on the target machine, see TESTBED.md):
- /dev/kvm is a PVM hypervisor that QEMU cannot use: always `-accel tcg`.
- vhost-user needs guest RAM in a shared fd-backed mapping (memfd share=on); share=off silently drops
  every packet.
- QEMU 7.2 segfaults under TCG when a vhost-user virtio-net-pci with MSI-X starts: `vectors=0` (INTx).
- QEMU blocks at start-up (no guest, no QMP) until a vhost-user back-end is on the socket.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import re
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import trio

from vduproxy.log import get_logger
from vduproxy.testing.procs import (
    LineLog,
    ManagedProcess,
    OutputTimeout,
    ProcessError,
    ProcessExited,
    open_service_nursery,
    short_socket_path,
)

log = get_logger(__name__)

# Boot to the marker takes ~5 s on a quiet machine and up to ~20 s under load under TCG.
DEFAULT_TIMEOUT = 120.0
QEMU_BINARY = "qemu-system-x86_64"
# The guest's serial tty reads canonical lines of at most 4095 bytes.
MAX_AGENT_LINE = 4000
# printk lines on the console ("[    5.123456] ...") and the background tick are not command output.
_NOISE = re.compile(r"^(\[\s*\d+\.\d+\] |VDUP-TICK )")

NetMode = Literal["vhost-user", "user", "none"]


class GuestError(ProcessError):
    """The guest did something the test bed did not expect (bad marker, agent framing, ...)."""


class QmpError(Exception):
    """QMP returned an error, or the QMP connection failed."""

    def __init__(self, message: str, *, error_class: str = "") -> None:
        super().__init__(f"{error_class}: {message}" if error_class else message)
        self.error_class = error_class


class MigrationFailed(Exception):
    """`query-migrate` ended in a status other than "completed"."""

    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__(f"migration ended with status {info.get('status')!r}: {info.get('error-desc', '')}")
        self.info = info


@dataclass
class GuestConfig:
    """Everything that goes on the QEMU command line. Keep device options identical on both migration ends."""

    kernel: Path
    initrd: Path
    net: NetMode = "vhost-user"
    socket: Path | None = None  # vhost-user socket
    server: bool = False  # QEMU listens on `socket` (back-end connects as client)
    queues: int = 1
    mac: str = "52:54:00:12:34:56"
    mem_mb: int = 512
    smp: int = 1
    msix: bool = False  # True crashes QEMU 7.2 TCG with vhost-user: see module docstring
    device_opts: str = ""  # appended to -device virtio-net-pci, e.g. ",mrg_rxbuf=off"
    user_netdev_opts: str = ""  # appended to -netdev user, e.g. ",hostfwd=tcp:127.0.0.1:5555-:5555"
    qmp: Path | None = None  # default: a private short path
    incoming: str | None = None  # "tcp:127.0.0.1:PORT" or "defer"
    # Guest /init keys (lab.*), see guest-init.sh.
    ip: str = "10.0.2.15/24"
    peer: str = "10.0.2.2"
    peermac: str | None = "02:00:00:00:00:02"  # None: the peer answers ARP itself
    ping: int = 0
    loop: bool = False
    poweroff: bool = False
    boot_cmd: str | None = None
    kernel_args: str = "console=ttyS0 panic=-1 quiet loglevel=4"
    extra_args: Sequence[str] = field(default_factory=tuple)

    def cmdline(self) -> str:
        parts = [self.kernel_args, f"lab.ip={self.ip}", f"lab.peer={self.peer}"]
        parts.append(f"lab.peermac={self.peermac or 'none'}")
        if self.ping:
            parts.append(f"lab.ping={self.ping}")
        if self.loop:
            parts.append("lab.loop=1")
        if self.poweroff:
            parts.append("lab.off=1")
        if self.boot_cmd is not None:
            parts.append("lab.cmd64=" + base64.b64encode(self.boot_cmd.encode()).decode())
        return " ".join(parts)

    def argv(self, qmp: Path, name: str = "guest") -> list[str]:
        if self.queues < 1:
            raise ValueError(f"queues must be >= 1, got {self.queues}")
        args = [QEMU_BINARY, "-name", name, "-accel", "tcg", "-machine", "q35", "-cpu", "max"]
        args += ["-smp", str(self.smp), "-m", str(self.mem_mb), "-nographic", "-vga", "none", "-nic", "none"]
        args += [
            "-no-reboot",
            "-kernel",
            str(self.kernel),
            "-initrd",
            str(self.initrd),
            "-append",
            self.cmdline(),
        ]
        args += [
            "-object",
            f"memory-backend-memfd,id=mem,size={self.mem_mb}M,share=on",
            "-numa",
            "node,memdev=mem",
        ]
        dev = f"virtio-net-pci,netdev=n0,mac={self.mac}"
        if self.queues > 1:
            dev += ",mq=on"
        if not self.msix:
            dev += ",vectors=0"
        if self.net == "vhost-user":
            if self.socket is None:
                raise ValueError("net='vhost-user' needs a socket path")
            mode = "server=on,wait=off" if self.server else "reconnect=1"
            args += ["-chardev", f"socket,id=c0,path={short_socket_path(self.socket)},{mode}"]
            args += ["-netdev", f"vhost-user,id=n0,chardev=c0,queues={self.queues}"]
            args += ["-device", dev + self.device_opts]
        elif self.net == "user":
            args += ["-netdev", f"user,id=n0{self.user_netdev_opts}", "-device", dev + self.device_opts]
        args += ["-qmp", f"unix:{short_socket_path(qmp)},server=on,wait=off"]
        if self.incoming is not None:
            args += ["-incoming", self.incoming]
        return args + list(self.extra_args)


@dataclass(frozen=True)
class GuestMarker:
    """The guest's VDUP-MARKER line: eth0 as the guest driver sees it."""

    ip: str
    mac: str
    driver: str
    carrier: bool
    mtu: int
    rx_queues: int
    tx_queues: int
    features: int  # negotiated virtio feature bits, as the guest reports them in sysfs
    uptime: float

    def has_feature(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    @classmethod
    def parse(cls, line: str) -> GuestMarker:
        kv = dict(re.findall(r"(\w+)=(\S+)", line))
        try:
            bits = kv["features"]
            return cls(
                ip=kv["ip"],
                mac=kv["mac"],
                driver=kv["driver"],
                carrier=kv["carrier"] == "1",
                mtu=int(kv["mtu"]),
                rx_queues=int(kv["rx_queues"]),
                tx_queues=int(kv["tx_queues"]),
                # sysfs prints bit 0 first.
                features=sum(1 << i for i, c in enumerate(bits) if c == "1"),
                uptime=float(kv["uptime"]),
            )
        except (KeyError, ValueError) as e:
            raise GuestError(f"unparsable marker line: {line!r} ({e})", name="guest") from e


@dataclass(frozen=True)
class CommandResult:
    rc: int
    output: str  # the command's stdout+stderr, console noise removed

    def check(self) -> CommandResult:
        if self.rc != 0:
            raise GuestError(f"guest command failed rc={self.rc}", name="guest", output=self.output)
        return self


@dataclass(frozen=True)
class PingResult:
    sent: int
    received: int
    peer: str

    @classmethod
    def parse(cls, text: str) -> PingResult:
        m = re.search(r"VDUP-PING-RESULT sent=(\d+) received=(\d+) peer=(\S+)", text)
        if m is None:
            raise GuestError("no VDUP-PING-RESULT line", name="guest", output=text)
        return cls(int(m[1]), int(m[2]), m[3])


class QmpClient:
    """A minimal QMP client: one command at a time, events kept in `events`."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buf = b""
        self._ids = itertools.count(1)
        self._lock = trio.Lock()
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def connect(
        cls, path: Path, timeout: float = DEFAULT_TIMEOUT, *, alive: Callable[[], bool] | None = None
    ) -> QmpClient:
        """Connect and negotiate capabilities; retries while QEMU has not created or served the socket yet.

        `alive` stops the retries early once QEMU has exited.
        """
        with trio.move_on_after(timeout):
            while True:
                if alive is not None and not alive():
                    raise QmpError(f"QEMU exited before QMP on {path} answered")
                try:
                    stream = await trio.open_unix_socket(str(path))
                except (FileNotFoundError, ConnectionRefusedError):
                    await trio.sleep(0.1)
                    continue
                client = cls(stream)
                try:
                    greeting = await client._read_message()
                    if "QMP" not in greeting:
                        raise QmpError(f"unexpected QMP greeting {greeting!r}")
                    await client.execute("qmp_capabilities")
                except BaseException:
                    await client.aclose()
                    raise
                return client
        raise QmpError(f"no QMP greeting on {path} within {timeout:.0f} s (is QEMU waiting for a back-end?)")

    async def _read_message(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            data = await self._stream.receive_some(65536)
            if not data:
                raise QmpError("QMP connection closed")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise QmpError(f"QMP sent a non-object: {line!r}")
        return msg

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command and return its "return" value; raises QmpError on an "error" reply."""
        async with self._lock:
            msg_id = next(self._ids)
            msg: dict[str, Any] = {"execute": command, "id": msg_id}
            if arguments:
                msg["arguments"] = arguments
            try:
                await self._stream.send_all(json.dumps(msg).encode() + b"\n")
                while True:
                    reply = await self._read_message()
                    if "event" in reply:
                        self.events.append(reply)
                    elif reply.get("id") == msg_id:
                        break
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise QmpError(f"QMP connection lost during {command}") from e
        if "error" in reply:
            err = reply["error"]
            raise QmpError(str(err.get("desc", err)), error_class=str(err.get("class", "")))
        return reply.get("return")

    async def aclose(self) -> None:
        await self._stream.aclose()


class QemuGuest:
    """One QEMU process running the test-bed guest. Start it with `start(nursery)` or `open_guest()`."""

    def __init__(self, config: GuestConfig, *, name: str = "guest", log_dir: Path | None = None) -> None:
        self.config = config
        self.name = name
        self._tmp: Path | None = None
        if config.qmp is None:
            # pytest's tmp_path is often too long for sun_path: keep our own short directory.
            self._tmp = Path(tempfile.mkdtemp(prefix="vdup-qmp-", dir="/tmp"))
            self.qmp_path = self._tmp / "qmp.sock"
        else:
            self.qmp_path = config.qmp
        self.argv = config.argv(self.qmp_path, name)
        self.process = ManagedProcess(name, self.argv, log_path=log_dir / f"{name}.log" if log_dir else None)
        self._qmp: QmpClient | None = None
        self._cmd_ids = itertools.count(1)
        self._agent_lock = trio.Lock()
        self._log = log.bind(guest=name)

    @property
    def output(self) -> LineLog:
        """The LineLog of QEMU's stdout+stderr (the guest serial console plus QEMU's own messages)."""
        return self.process.output

    @property
    def pid(self) -> int:
        return self.process.pid

    async def start(self, nursery: trio.Nursery) -> None:
        await self.process.start(nursery)

    async def wait_for(
        self, pattern: str | re.Pattern[str], timeout: float = DEFAULT_TIMEOUT, *, since: int = 0
    ) -> re.Match[str]:
        """Wait for a console line (at or after line index `since`) matching `pattern`."""
        _, m = await self.process.output.wait_for(pattern, timeout, since=since)
        return m

    async def wait_marker(self, timeout: float = DEFAULT_TIMEOUT) -> GuestMarker:
        """Wait for eth0 to come up in the guest; fails fast if the guest reports it has no eth0."""
        m = await self.wait_for(r"^VDUP-(MARKER .*|ERROR: no eth0)$", timeout)
        if m[1].startswith("ERROR"):
            raise GuestError("guest has no eth0", name=self.name, output=self.process.output.tail(60))
        marker = GuestMarker.parse(m[0])
        self._log.info("guest marker", uptime=marker.uptime, features=hex(marker.features), mac=marker.mac)
        return marker

    async def run(self, command: str, timeout: float = 60.0) -> CommandResult:
        """Run a shell command in the guest over the serial console; output excludes console noise.

        The guest shell has helpers: `vdup_ping N [PEER]`, `vdup_send HOST PORT BYTES` (prints
        `VDUP-MD5 <hex> bytes=N` then `VDUP-SENT rc=N`), `vdup_recv PORT` (prints `VDUP-MD5`), `vdup_stats`.
        """
        encoded = base64.b64encode(command.encode()).decode()
        if len(encoded) > MAX_AGENT_LINE:
            raise ValueError(f"guest command too long ({len(command)} bytes; the tty line limit is 4095)")
        async with self._agent_lock:
            if self.config.incoming is None:
                # A migration destination resumes a guest whose agent announced itself on the source's
                # console: the caller waits for the source to be ready before migrating.
                await self.wait_for(r"^VDUP-READY$", timeout)
            cmd_id = next(self._cmd_ids)
            since = self.process.output.mark()
            await self.process.send(f"VDUP-RUN {cmd_id} {encoded}\n")
            lines = self.process.output
            begin, _ = await lines.wait_for(rf"^VDUP-BEGIN {cmd_id}$", timeout, since=since)
            end, m = await lines.wait_for(rf"^VDUP-END {cmd_id} rc=(\d+)$", timeout, since=begin + 1)
            out = [ln.text for ln in lines.lines[begin + 1 : end] if not _NOISE.match(ln.text)]
        return CommandResult(rc=int(m[1]), output="\n".join(out))

    async def ping(self, count: int, peer: str | None = None, timeout: float = 60.0) -> PingResult:
        res = await self.run(f"vdup_ping {int(count)} {peer or ''}", timeout)
        return PingResult.parse(res.output)

    async def qmp(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        """Execute a QMP command (connecting on first use)."""
        with trio.fail_after(timeout):
            if self._qmp is None:
                if not self.process.running:
                    raise ProcessExited("QEMU is not running", name=self.name, output=self.output.tail())
                self._qmp = await QmpClient.connect(self.qmp_path, timeout, alive=lambda: self.process.running)
            return await self._qmp.execute(command, arguments)

    async def query_status(self) -> str:
        return str((await self.qmp("query-status"))["status"])

    async def query_migrate(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.qmp("query-migrate")
        return result

    async def migrate_incoming(self, uri: str) -> None:
        """For a destination started with `incoming="defer"`."""
        await self.qmp("migrate-incoming", {"uri": uri})

    async def migrate(self, uri: str, timeout: float = 300.0, poll: float = 0.2) -> dict[str, Any]:
        """Start an outgoing migration and wait for it to end; returns the final `query-migrate`."""
        await self.qmp("migrate", {"uri": uri})
        with trio.move_on_after(timeout):
            while True:
                info = await self.query_migrate()
                if info.get("status") in ("completed", "failed", "cancelled"):
                    break
                await trio.sleep(poll)
            self._log.info(
                "migration ended",
                status=info.get("status"),
                total_ms=info.get("total-time"),
                downtime_ms=info.get("downtime"),
            )
            if info["status"] != "completed":
                raise MigrationFailed(info)
            return info
        raise OutputTimeout(f"migration to {uri} not finished within {timeout:.0f} s", name=self.name)

    async def wait_exit(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        return await self.process.wait(timeout)

    async def aclose(self, grace: float = 10.0) -> int | None:
        """Terminate QEMU by PID (SIGTERM, SIGKILL after `grace`), reap it, remove private files."""
        with trio.CancelScope(shield=True):
            if self._qmp is not None:
                with contextlib.suppress(Exception):
                    await self._qmp.aclose()
                self._qmp = None
            rc = await self.process.terminate(grace)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        return rc


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for `-incoming tcp:`): QEMU binds it itself, so a race remains."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def open_guest(
    config: GuestConfig, *, name: str = "guest", log_dir: Path | None = None
) -> AsyncIterator[QemuGuest]:
    """Start QEMU, yield it, and always tear it down (by PID) on exit."""
    async with open_service_nursery() as nursery:
        guest = QemuGuest(config, name=name, log_dir=log_dir)
        try:
            await guest.start(nursery)
            yield guest
        finally:
            await guest.aclose()
