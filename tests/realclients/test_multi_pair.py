"""Issue 8's isolation proof: one `vduproxy serve --config` daemon, three pairs, one front-end killed.

- `loop`: software device, rich profile, loopback; the project's front-end sends numbered frames and checks
  every one comes back byte for byte.
- `pmd`: software device, basic profile; DPDK testpmd's virtio-user forwards in a closed loop, and is killed
  with SIGKILL in the middle of it.
- `tap`: software device, vdpa_sim_net-like profile, TAP back-end into a network namespace; the project's
  front-end asks the namespace's kernel for its MAC (ARP) and counts the answers.

After the kill, `vduproxy stats` (the real CLI, over the control socket) must show `pmd` waiting for a new
front-end, the two others still attached and counting, the daemon never restarted; and the traffic on the two
others must be complete: no frame lost, duplicated or corrupted, one ARP reply per request.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from vduproxy.testing.dpdk import TestpmdConfig, VirtioUserVdev, open_testpmd
from vduproxy.testing.frontend import VhostUserFrontend
from vduproxy.testing.guest import GUEST_MAC, GuestMemory, VirtioNetDriver, check_frames, make_frame
from vduproxy.testing.netns import open_tap_peer
from vduproxy.testing.procs import ManagedProcess, open_service_nursery
from vduproxy.testing.proxy import ProxyProcess
from vduproxy.virtio import NetF

pytestmark = pytest.mark.realclient

ROOT = Path(__file__).resolve().parents[2]
FEATURES = NetF.VERSION_1 | NetF.MRG_RXBUF | NetF.RING_EVENT_IDX
GUEST_IP = bytes([10, 0, 2, 15])
PEER_IP = bytes([10, 0, 2, 2])
BATCH = 32
AFTER_KILL = 3000  # loopback frames that must still go through after the kill
ARP_AFTER_KILL = 100


def arp_request(seq: int) -> bytes:
    """who-has 10.0.2.2 tell 10.0.2.15; `seq` in the padding tells requests apart in a capture."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, GUEST_MAC, GUEST_IP, bytes(6), PEER_IP)
    frame = b"\xff" * 6 + GUEST_MAC + b"\x08\x06" + arp
    return frame + struct.pack("!I", seq) + bytes(60 - len(frame) - 4)


def is_arp_reply(frame: bytes, peer_mac: bytes) -> bool:
    if len(frame) < 42 or frame[12:14] != b"\x08\x06":
        return False
    op, sha, spa, tha, tpa = struct.unpack_from("!6xH6s4s6s4s", frame, 14)
    return op == 2 and sha == peer_mac and spa == PEER_IP and tha == GUEST_MAC and tpa == GUEST_IP


class LoopTraffic:
    """Numbered frames out and back through a loopback device, as long as it runs."""

    def __init__(self, driver: VirtioNetDriver) -> None:
        self.driver = driver
        self.sent = 0
        self.received: list[bytes] = []

    async def run(self, stop: trio.Event) -> None:
        d = self.driver
        while not stop.is_set() or len(self.received) < self.sent:
            d.post_rx_buffers(0)
            if not stop.is_set() and self.sent - len(self.received) < 128:
                frames = [make_frame(60 + (s * 37) % 1400, s) for s in range(self.sent, self.sent + BATCH)]
                self.sent += d.send(frames)
            d.reclaim_tx()
            got = d.receive()
            self.received += got
            if not got:
                with trio.move_on_after(0.05):
                    await d.wait_call(d.rx(0).index)
            await trio.lowlevel.checkpoint()


class ArpTraffic:
    """ARP requests to the namespace's peer, one at a time.

    A reply that arrives from the TAP while the device is being (re)configured is dropped like on any NIC
    being reset, so until the set-up has settled requests are retried, as ARP itself does. From then on
    (`ready`) every request must be answered.
    """

    WARMUP_REPLIES = 3

    def __init__(self, driver: VirtioNetDriver, peer_mac: bytes) -> None:
        self.driver = driver
        self.peer_mac = peer_mac
        self.requests = 0
        self.replies = 0
        self.ready = trio.Event()

    async def _ask(self, wait: float) -> bool:
        d = self.driver
        d.post_rx_buffers(0)
        await d.send_all([arp_request(self.requests)])
        self.requests += 1
        with trio.move_on_after(wait):
            while True:
                frames = await d.receive_frames(1)
                d.reclaim_tx()
                if any(is_arp_reply(f, self.peer_mac) for f in frames):
                    self.replies += 1
                    return True
        return False

    async def run(self, stop: trio.Event) -> None:
        with trio.fail_after(120):
            while self.replies < self.WARMUP_REPLIES:
                await self._ask(1.0)
        self.requests = self.replies = 0
        self.ready.set()
        while not stop.is_set():
            # a lost reply would wait forever: fail instead
            assert await self._ask(30.0), f"ARP request {self.requests - 1} was never answered"


@asynccontextmanager
async def attached(path: Path, mem: GuestMemory) -> AsyncIterator[VirtioNetDriver]:
    fe = await VhostUserFrontend.connect(str(path))
    async with fe:
        await fe.qemu72_connect()
        driver = VirtioNetDriver(mem, features=FEATURES)
        await fe.qemu72_start(driver)
        yield driver


@asynccontextmanager
async def open_daemon(config: Path, log_dir: Path) -> AsyncIterator[ProxyProcess]:
    argv = [sys.executable, "-m", "vduproxy", "--log-level", "debug", "--log-format", "json", "serve"]
    proc = ManagedProcess("vduproxy", [*argv, "--config", str(config)], log_path=log_dir / "vduproxy.log")
    async with open_service_nursery() as nursery:
        await proc.start(nursery)
        daemon = ProxyProcess(proc, config)
        try:
            await daemon.wait_event("daemon_ready")
            yield daemon
        finally:
            await proc.terminate(grace=10)


async def vduproxy_stats(control: Path, *extra: str) -> str:
    res = await trio.run_process(
        [sys.executable, "-m", "vduproxy", "stats", "--control", str(control), *extra],
        capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr.decode()
    return res.stdout.decode()


async def test_three_pairs_one_frontend_killed(sock_dir: Path, log_dir: Path, require_kernel_feature: Any) -> None:
    await require_kernel_feature("tun")
    await require_kernel_feature("netns")
    control = sock_dir / "control.sock"
    async with open_tap_peer("10.0.2.2/24") as peer:
        config = sock_dir / "vduproxy.toml"
        config.write_text(
            f'[daemon]\ncontrol = "{control}"\n\n'
            f'[pairs.loop]\nsocket = "{sock_dir}/loop.sock"\ndevice = "sim:profile=rich"\n\n'
            f'[pairs.pmd]\nsocket = "{sock_dir}/pmd.sock"\ndevice = "sim:profile=basic"\n\n'
            f'[pairs.tap]\nsocket = "{sock_dir}/tap.sock"\n'
            f'device = "sim:profile=vdpasim,backend=tap,tap={peer.tap}"\nmac = "{GUEST_MAC.hex(":")}"\n'
        )
        peer_mac = bytes.fromhex(peer.mac.replace(":", ""))
        async with open_daemon(config, log_dir) as daemon:
            pid_before = json.loads(await vduproxy_stats(control, "--json"))["daemon"]["pid"]
            pmd_cfg = TestpmdConfig(vdevs=[VirtioUserVdev(sock_dir / "pmd.sock")], forward_mode="io")
            async with open_testpmd(pmd_cfg, log_dir=log_dir) as pmd:
                await daemon.wait_event("device_started", timeout=60, pair="pmd")
                with GuestMemory(64 << 20) as mem_loop, GuestMemory(64 << 20) as mem_tap:
                    async with (
                        attached(sock_dir / "loop.sock", mem_loop) as d_loop,
                        attached(sock_dir / "tap.sock", mem_tap) as d_tap,
                    ):
                        loop, arp = LoopTraffic(d_loop), ArpTraffic(d_tap, peer_mac)
                        stop = trio.Event()
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(loop.run, stop)
                            nursery.start_soon(arp.run, stop)
                            # the two survivors carry traffic before the third starts and dies
                            with trio.fail_after(120):
                                while not arp.ready.is_set() or arp.replies < 3 or len(loop.received) < 1000:
                                    await trio.sleep(0.05)
                            await pmd.start_forwarding(tx_first=1)
                            with trio.fail_after(120):
                                while (await pmd.port_stats())[0].rx_packets < 10_000:
                                    await trio.sleep(0.2)
                            # everyone is mid-traffic: kill the DPDK front-end without letting it say goodbye
                            os.killpg(pmd.pid, signal.SIGKILL)
                            await pmd.process.wait(30)
                            await daemon.wait_event("connection_closed", timeout=60, pair="pmd")
                            sent_at_kill, arp_at_kill = loop.sent, arp.replies
                            assert sent_at_kill > 0 and arp_at_kill > 0, "the others were not yet moving traffic"
                            with trio.fail_after(300):
                                while (
                                    loop.sent < sent_at_kill + AFTER_KILL or arp.replies < arp_at_kill + ARP_AFTER_KILL
                                ):
                                    await trio.sleep(0.1)
                            stats = json.loads(await vduproxy_stats(control, "--json"))
                            text = await vduproxy_stats(control)
                            stop.set()
            # the pair whose front-end died takes the next one, as if nothing had happened
            async with open_testpmd(pmd_cfg, name="testpmd2", log_dir=log_dir) as pmd2:
                await pmd2.start_forwarding(tx_first=1)
                with trio.fail_after(120):
                    while (await pmd2.port_stats())[0].rx_packets < 1000:
                        await trio.sleep(0.2)

        pairs = stats["pairs"]
        # the daemon never restarted and every pair still serves its socket
        assert stats["daemon"]["pid"] == pid_before
        assert {name: p["state"] for name, p in pairs.items()} == {
            "loop": "running",
            "pmd": "running",
            "tap": "running",
        }
        # the killed front-end is gone; its pair waits for the next one
        assert pairs["pmd"]["attached"] is False
        assert "pair pmd: running waiting for a front-end" in text
        # the other two were attached all along and their devices counted the traffic
        for name in ("loop", "tap"):
            assert pairs[name]["attached"] is True and pairs[name]["mode"] in ("passthrough", "svq")
            assert f"pair {name}: running attached" in text
        assert pairs["loop"]["queues"]["1"]["device_packets"] >= sent_at_kill + AFTER_KILL
        assert pairs["tap"]["queues"]["1"]["device_packets"] >= arp_at_kill + ARP_AFTER_KILL
        # and nothing of theirs was lost, duplicated or damaged across the kill
        report = check_frames(range(loop.sent), loop.received)
        assert report.ok, report
        assert arp.replies == arp.requests
