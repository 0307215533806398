"""Issue 5 with real QEMU 7.2: a TCG guest live-migrates between two vduproxy daemons whose devices come from
different "vendors" (sim profiles rich and vdpasim), each on a TAP in one bridge, while a peer in a network
namespace pings the guest every 0.2 s. Then it migrates back."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest
import trio

from vduproxy.testing.initramfs import GuestImage
from vduproxy.testing.netns import TapPeer, open_extra_tap, open_tap_peer
from vduproxy.testing.procs import ManagedProcess, open_service_nursery
from vduproxy.testing.proxy import ProxyProcess, open_proxy
from vduproxy.testing.qemu import GuestConfig, QemuGuest, free_tcp_port, open_guest

pytestmark = pytest.mark.realclient

GUEST_IP = "10.0.2.15"
INTERVAL = 0.2
AFTER = 30.0  # seconds of pings checked after each switchover
MAX_LOST = 3
PING = re.compile(r"PING seq=(\d+) (?:t=([\d.]+) ok|lost)")


class Pings:
    def __init__(self, proc: ManagedProcess) -> None:
        self.proc = proc

    def results(self) -> dict[int, bool]:
        out: dict[int, bool] = {}
        for line in self.proc.output.text().splitlines():
            m = PING.search(line)
            if m:
                out[int(m[1])] = m[2] is not None
        return out

    def last_seq(self) -> int:
        return max(self.results(), default=-1)

    async def wait_replies(self, n: int, timeout: float = 120) -> None:
        with trio.fail_after(timeout):
            while sum(self.results().values()) < n:
                await trio.sleep(0.2)

    def lost_between(self, first: int, last: int) -> list[int]:
        res = self.results()
        return [s for s in range(first, last + 1) if not res.get(s, False)]


async def migrate(src: QemuGuest, dst: QemuGuest, port: int, pings: Pings, dst_proxy: ProxyProcess) -> None:
    first = pings.last_seq() + 1
    info = await src.migrate(f"tcp:127.0.0.1:{port}")
    assert info["status"] == "completed"
    assert await src.query_status() == "postmigrate"
    assert await dst.query_status() == "running"
    # the destination proxy started the guest's rings on its device
    await dst_proxy.wait_event("device_started", timeout=30)
    await trio.sleep(AFTER)
    last = pings.last_seq()
    lost = pings.lost_between(first, last)
    assert last - first >= int(AFTER / INTERVAL) - 10, "the pinger stopped"
    assert len(lost) <= MAX_LOST, (
        f"{len(lost)} pings lost around the switchover: seq {lost}; QEMU: downtime {info.get('downtime')} ms, "
        f"total {info.get('total-time')} ms"
    )
    # and the pings in the last 25 s all came back: traffic really continues on the destination
    tail = pings.lost_between(last - int(25 / INTERVAL), last - 5)
    assert not tail, f"pings lost well after the switchover: {tail}"


async def test_live_migration_across_device_profiles_and_back(
    guest_image: GuestImage, sock_dir: Path, log_dir: Path
) -> None:
    sock_a, sock_b = sock_dir / "a.sock", sock_dir / "b.sock"
    async with open_tap_peer("10.0.2.2/24") as peer, open_extra_tap(peer) as tap_b:
        dev_a = f"sim:profile=rich,backend=tap,tap={peer.tap}"
        dev_b = f"sim:profile=vdpasim,backend=tap,tap={tap_b}"
        async with (
            open_proxy(sock_a, dev_a, log_dir=log_dir, name="proxy-a") as proxy_a,
            open_proxy(sock_b, dev_b, log_dir=log_dir, name="proxy-b") as proxy_b,
        ):
            await run_scenario(guest_image, peer, sock_a, sock_b, proxy_a, proxy_b, log_dir)


async def run_scenario(
    image: GuestImage, peer: TapPeer, sock_a: Path, sock_b: Path, proxy_a: ProxyProcess, proxy_b: ProxyProcess,
    log_dir: Path,
) -> None:  # fmt: skip
    base = GuestConfig(kernel=image.kernel, initrd=image.initrd, socket=sock_a, peermac=None)
    total = int((60 + 3 * AFTER) / INTERVAL)
    pinger = ManagedProcess(
        "pinger",
        peer.ns.argv(sys.executable, "-m", "vduproxy.testing.pinger", GUEST_IP, str(INTERVAL), str(total)),
        log_path=log_dir / "pinger.log",
    )
    port1, port2 = free_tcp_port(), free_tcp_port()
    async with open_guest(base, name="src", log_dir=log_dir) as src:
        marker = await src.wait_marker(timeout=180)
        assert marker.carrier
        async with open_service_nursery() as nursery:
            await pinger.start(nursery)
            pings = Pings(pinger)
            try:
                await pings.wait_replies(10)
                dst_cfg = dataclasses.replace(base, socket=sock_b, incoming=f"tcp:127.0.0.1:{port1}")
                async with open_guest(dst_cfg, name="dst", log_dir=log_dir) as dst:
                    assert await dst.query_status() == "inmigrate"
                    await migrate(src, dst, port1, pings, proxy_b)
                    # B's device lacks what the guest negotiated on A (MRG_RXBUF, INDIRECT, EVENT_IDX): the SVQ
                    # bridges it, so B must be in SVQ mode
                    assert proxy_b.events("device_started")[-1]["mode"] == "svq"
                    # and back to A: the source QEMU quits, a new one waits on A
                    await src.aclose()
                    await proxy_a.wait_event("frontend_disconnected", timeout=30)
                    back_cfg = dataclasses.replace(base, incoming=f"tcp:127.0.0.1:{port2}")
                    async with open_guest(back_cfg, name="back", log_dir=log_dir) as back:
                        assert await back.query_status() == "inmigrate"
                        await migrate(dst, back, port2, pings, proxy_a)
                        assert await back.query_status() == "running"
            finally:
                await pinger.terminate()
