"""Fixtures for tier-3 tests against real QEMU and DPDK processes.

QEMU, dpdk-testpmd, iproute2, the guest kernel and busybox are test-bed requirements: missing ones fail the
test. Only optional *kernel* features (network namespaces, TUN, veth, bridge, vhost-vdpa) skip, with the
reason printed to the terminal even under output capture.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from vduproxy.testing.initramfs import GuestImage, InitramfsError, build_initramfs
from vduproxy.testing.netns import ip_cmd, unique_token

# binary -> Debian package that provides it
REQUIRED_BINARIES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "dpdk-testpmd": "dpdk-dev",
    "ip": "iproute2",
    "stdbuf": "coreutils",
    "busybox": "busybox-static",
}


@pytest.fixture(scope="session", autouse=True)
def realclient_binaries() -> None:
    missing = [f"{b} (apt: {pkg})" for b, pkg in REQUIRED_BINARIES.items() if shutil.which(b) is None]
    if missing:
        pytest.fail("test-bed binaries missing: " + ", ".join(missing), pytrace=False)


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The guest kernel and the cached test-bed initramfs (built on first use, ~0.2 s)."""
    try:
        return build_initramfs()
    except InitramfsError as e:
        pytest.fail(f"cannot build the guest initramfs: {e}", pytrace=False)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (pytest's tmp_path can exceed the 107-byte sun_path limit)."""
    d = Path(tempfile.mkdtemp(prefix="vdup-t-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    """Where process output is written (one file per process) for post-mortem reading."""
    d = tmp_path / "logs"
    d.mkdir()
    return d


def _skip(feature: str, why: str) -> None:
    msg = f"kernel feature {feature!r} unavailable: {why}"
    print(f"\nSKIP: {msg}", file=sys.__stderr__, flush=True)
    pytest.skip(msg)


async def _probe_link(feature: str, kind: str) -> None:
    name = f"vdq{unique_token()}"
    extra = ["peer", "name", name + "p"] if kind == "veth" else []
    res = await ip_cmd(["ip", "link", "add", name, "type", kind, *extra], check=False)
    if res.returncode != 0:
        _skip(feature, res.stderr.decode(errors="replace").strip())
    await ip_cmd(["ip", "link", "del", name], check=False)


async def check_kernel_feature(feature: str) -> None:
    """Skip the calling test (with a printed reason) when an optional kernel feature is missing."""
    if feature == "tun":
        try:
            # Opening without TUNSETIFF creates nothing; it fails when TUN is not built or not permitted.
            os.close(os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC))
        except OSError as e:
            _skip(feature, f"/dev/net/tun: {e}")
    elif feature == "netns":
        name = f"vdup-probe-{unique_token()}"
        res = await ip_cmd(["ip", "netns", "add", name], check=False)
        if res.returncode != 0:
            _skip(feature, res.stderr.decode(errors="replace").strip())
        await ip_cmd(["ip", "netns", "del", name], check=False)
    elif feature in ("veth", "bridge"):
        await _probe_link(feature, feature)
    elif feature == "vhost-vdpa":
        if not list(Path("/dev").glob("vhost-vdpa-*")):
            _skip(feature, "no /dev/vhost-vdpa-* (Debian's 6.1 kernel has CONFIG_VDPA unset)")
    else:
        raise ValueError(f"unknown kernel feature {feature!r}")


@pytest.fixture
def require_kernel_feature() -> Callable[[str], Awaitable[None]]:
    """`await require_kernel_feature("netns")`: skip unless the kernel offers it (tun, netns, veth, bridge,
    vhost-vdpa)."""
    return check_kernel_feature
