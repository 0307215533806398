"""Network namespaces and TAP plumbing for real-client tests, driven through iproute2.

`open_tap_peer()` builds the topology a guest behind a TAP-backed device needs to reach a real network
stack: a persistent TAP in the host namespace (the device opens it by name), a bridge, and a veth pair whose
other end, with the peer address, lives in a fresh namespace. The TAP can be opened before or after the
topology is built, and nothing touches the host's own interfaces or routes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import struct
import subprocess
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import trio

from vduproxy.log import get_logger

log = get_logger(__name__)

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16


class NetnsError(Exception):
    """An iproute2 command failed; the message carries its stderr."""


async def ip_cmd(
    argv: Sequence[str], *, check: bool = True, timeout: float = 30.0
) -> subprocess.CompletedProcess[bytes]:
    """Run a command to completion (trio), capturing output; raises NetnsError on failure when `check`."""
    with trio.fail_after(timeout):
        res = await trio.run_process(list(argv), capture_stdout=True, capture_stderr=True, check=False)
    if check and res.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed rc={res.returncode}: {res.stderr.decode(errors='replace').strip()}")
    return res


def unique_token() -> str:
    """Short enough for 15-byte interface names with a 3-4 character prefix."""
    return secrets.token_hex(3)


@dataclass
class NetNs:
    name: str

    async def exec(self, *argv: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[bytes]:
        """Run a command inside the namespace."""
        return await ip_cmd(["ip", "netns", "exec", self.name, *argv], check=check, timeout=timeout)

    def argv(self, *argv: str) -> list[str]:
        """The argv that runs `argv` in the namespace (for long-running processes started elsewhere)."""
        return ["ip", "netns", "exec", self.name, *argv]


@contextlib.asynccontextmanager
async def open_netns(prefix: str = "vdup") -> AsyncIterator[NetNs]:
    """A fresh namespace with lo up, deleted on exit (with every interface still inside it)."""
    ns = NetNs(f"{prefix}-{os.getpid()}-{unique_token()}")
    await ip_cmd(["ip", "netns", "add", ns.name])
    log.info("netns created", netns=ns.name)
    try:
        await ns.exec("ip", "link", "set", "lo", "up")
        yield ns
    finally:
        with trio.CancelScope(shield=True):
            await ip_cmd(["ip", "netns", "del", ns.name], check=False)
            log.info("netns deleted", netns=ns.name)


@dataclass
class TapPeer:
    """host TAP `tap` -- bridge `bridge` -- veth `veth_host` | netns `ns`: `veth_ns` with `address`."""

    ns: NetNs
    tap: str
    bridge: str
    veth_host: str
    veth_ns: str
    address: str  # CIDR inside the namespace
    mac: str  # of veth_ns: what the guest should see as its peer

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]


@contextlib.asynccontextmanager
async def open_tap_peer(
    address: str = "10.0.2.2/24", *, mac: str = "02:00:00:00:00:02", multi_queue: bool = False
) -> AsyncIterator[TapPeer]:
    """Build the TAP/bridge/veth/namespace topology; everything created is deleted on exit."""
    token = unique_token()
    tap, bridge, veth_host, veth_ns = (f"vd{kind}{token}" for kind in ("t", "b", "h", "n"))
    created: list[str] = []
    async with open_netns() as ns:
        try:
            tuntap = ["ip", "tuntap", "add", "mode", "tap", "name", tap]
            await ip_cmd([*tuntap, "multi_queue"] if multi_queue else tuntap)
            created.append(tap)
            await ip_cmd(["ip", "link", "add", bridge, "type", "bridge"])
            created.append(bridge)
            await ip_cmd(["ip", "link", "add", veth_host, "type", "veth", "peer", "name", veth_ns])
            created.append(veth_host)
            await ip_cmd(["ip", "link", "set", veth_ns, "netns", ns.name])
            for dev in (tap, veth_host):
                await ip_cmd(["ip", "link", "set", dev, "master", bridge])
                await ip_cmd(["ip", "link", "set", dev, "up"])
            await ip_cmd(["ip", "link", "set", bridge, "up"])
            await ns.exec("ip", "link", "set", veth_ns, "address", mac)
            await ns.exec("ip", "addr", "add", address, "dev", veth_ns)
            await ns.exec("ip", "link", "set", veth_ns, "up")
            peer = TapPeer(ns, tap, bridge, veth_host, veth_ns, address, mac)
            log.info("tap peer created", tap=tap, bridge=bridge, netns=ns.name, address=address)
            yield peer
        finally:
            with trio.CancelScope(shield=True):
                # Deleting the host end of the veth pair deletes the namespace end too.
                for dev in reversed(created):
                    await ip_cmd(["ip", "link", "del", dev], check=False)


def open_tap(name: str, *, vnet_hdr: bool = False) -> int:
    """Attach to an existing TAP interface; returns a non-blocking fd carrying raw Ethernet frames."""
    if len(name.encode()) >= IFNAMSIZ:
        raise ValueError(f"interface name {name!r} longer than {IFNAMSIZ - 1} bytes")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
    except BaseException:
        os.close(fd)
        raise
    return fd


async def read_frame(fd: int) -> bytes:
    """One frame from a non-blocking TAP fd."""
    while True:
        try:
            return os.read(fd, 65536)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)


def write_frame(fd: int, frame: bytes) -> None:
    os.write(fd, frame)


def close_tap(fd: int) -> None:
    """Close a TAP fd, waking any task blocked in read_frame() on it (trio requires the notice)."""
    trio.lowlevel.notify_closing(fd)
    os.close(fd)


@contextlib.asynccontextmanager
async def open_extra_tap(peer: TapPeer) -> AsyncIterator[str]:
    """Another TAP on `peer`'s bridge (a second host's NIC on the same LAN: a migration destination)."""
    tap = f"vdt{unique_token()}"
    await ip_cmd(["ip", "tuntap", "add", "mode", "tap", "name", tap])
    try:
        await ip_cmd(["ip", "link", "set", tap, "master", peer.bridge])
        await ip_cmd(["ip", "link", "set", tap, "up"])
        yield tap
    finally:
        with trio.CancelScope(shield=True):
            await ip_cmd(["ip", "link", "del", tap], check=False)
