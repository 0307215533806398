"""Front-ends that die: 100 cycles of connect → traffic → kill (the socket closed with no stop sequence) →
reconnect against one proxy, in passthrough and in SVQ mode.

What a user of a long-running daemon checks: every cycle's traffic arrives byte for byte, nothing is leaked (the
fd table after the last cycle is the one after the warm-up, entry for entry) and memory stays flat (RSS growth
after a warm-up under a generous bound; the numbers are printed). One run is in process (the proxy's fds are
this process's, so a leak shows as a new entry), one against the real daemon as a child process, measured
through /proc/PID/fd and VmRSS.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from vduproxy.testing.frontend import VhostUserFrontend
from vduproxy.testing.guest import GuestMemory, VirtioNetDriver
from vduproxy.testing.inproc import current_session
from vduproxy.testing.procs import short_socket_path
from vduproxy.testing.proxy import open_proxy
from vduproxy.testing.traffic import Pump

pytestmark = pytest.mark.integration

CYCLES = 100
WARMUP = 10  # allocator pools, caches and lazily imported modules settle in the first cycles
FRAMES = 200  # per cycle: wraps the 256-entry rings every few cycles
RSS_BOUND_KIB = 16 * 1024  # generous: a leaked guest mapping alone (32 MiB, touched) would exceed it


def fd_table(pid: int | str = "self") -> dict[int, str]:
    """fd -> what it points to (socket:[inode], /memfd:..., anon_inode:[eventfd], ...)."""
    out = {}
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            out[int(name)] = os.readlink(f"{base}/{name}")
        except FileNotFoundError:  # the listing's own fd, closed already
            continue
    return out


def rss_kib(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        m = re.search(r"^VmRSS:\s+(\d+) kB", f.read(), flags=re.M)
    assert m is not None
    return int(m.group(1))


def leaked(before: dict[int, str], after: dict[int, str]) -> dict[int, str]:
    return {fd: what for fd, what in after.items() if before.get(fd) != what}


async def one_cycle(path: str, driver: VirtioNetDriver, cycle: int) -> VhostUserFrontend:
    """Connect, replay QEMU 7.2's set-up (rings restart from their used index), move FRAMES byte-exact."""
    fe = await VhostUserFrontend.connect(path)
    try:
        await fe.qemu72_connect()
        await fe.qemu72_start(driver)
        pump = Pump(driver, FRAMES, seed=cycle, max_size=1514, first_seq=cycle * FRAMES)
        await pump.run(timeout=60)
        pump.check()
    except BaseException:
        await fe.aclose()
        raise
    return fe


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for the daemon's socket (pytest's tmp_path can exceed sun_path's 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="vdup-rc-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("svq", ["never", "always"])
async def test_100_killed_front_ends_leak_nothing_in_process(
    proxy_at: Callable[..., Any], sock_path: str, svq: str
) -> None:
    expected_mode = "svq" if svq == "always" else "passthrough"
    async with proxy_at("sim:profile=rich", svq=svq):
        session: Any = current_session()
        with GuestMemory(32 << 20, regions=2) as mem:
            driver = VirtioNetDriver(mem, queue_size=256)
            try:
                fds0: dict[int, str] = {}
                rss0 = 0
                for cycle in range(CYCLES):
                    fe = await one_cycle(sock_path, driver, cycle)
                    assert session.stats()["mode"] == expected_mode
                    await fe.aclose()  # the kill: no SET_STATUS 0, no GET_VRING_BASE
                    with trio.fail_after(20):
                        while session.active() is not None:
                            await trio.sleep(0.005)
                    if cycle == WARMUP - 1:
                        fds0, rss0 = fd_table(), rss_kib()
                fds1, rss1 = fd_table(), rss_kib()
            finally:
                driver.close()
    print(
        f"\n[{svq}] in-process after {WARMUP} cycles: {len(fds0)} fds, RSS {rss0} KiB; "
        f"after {CYCLES}: {len(fds1)} fds, RSS {rss1} KiB (growth {rss1 - rss0} KiB)"
    )
    assert leaked(fds0, fds1) == {}, "fds left behind by killed front-ends"
    assert rss1 - rss0 < RSS_BOUND_KIB


@pytest.mark.parametrize("svq", ["never", "always"])
async def test_100_killed_front_ends_leak_nothing_in_the_daemon(sock_dir: Path, svq: str) -> None:
    sock = short_socket_path(sock_dir / "vdu.sock")
    expected = "svq" if svq == "always" else "passthrough"
    async with open_proxy(sock, "sim:profile=rich", ["--svq", svq]) as proxy:
        with GuestMemory(32 << 20, regions=2) as mem:
            driver = VirtioNetDriver(mem, queue_size=256)
            try:
                fds0: dict[int, str] = {}
                rss0 = 0
                for cycle in range(CYCLES):
                    mark = proxy.proc.output.mark()
                    fe = await one_cycle(str(sock), driver, cycle)
                    await fe.aclose()
                    # the daemon has torn the connection down (and logged which mode it ran) before we measure
                    await proxy.proc.output.wait_for('"connection_closed"', 20, since=mark)
                    assert proxy.proc.output.search(f'"mode": "{expected}"', since=mark) is not None
                    if cycle == WARMUP - 1:
                        fds0, rss0 = fd_table(proxy.pid), rss_kib(proxy.pid)
                fds1, rss1 = fd_table(proxy.pid), rss_kib(proxy.pid)
            finally:
                driver.close()
    print(
        f"\n[{svq}] daemon pid {proxy.pid} after {WARMUP} cycles: {len(fds0)} fds, RSS {rss0} KiB; "
        f"after {CYCLES}: {len(fds1)} fds, RSS {rss1} KiB (growth {rss1 - rss0} KiB)"
    )
    assert leaked(fds0, fds1) == {}, "fds left behind in the daemon by killed front-ends"
    assert rss1 - rss0 < RSS_BOUND_KIB
