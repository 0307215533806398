"""QEMU 7.2 TCG guest → vduproxy → software device with a TAP back-end → a network namespace.

The guest pings the namespace's address and moves 20 MB over TCP each way, checksummed at both ends.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import trio

from vduproxy.testing.initramfs import GuestImage
from vduproxy.testing.netns import TapPeer, open_tap_peer
from vduproxy.testing.procs import ManagedProcess, open_service_nursery
from vduproxy.testing.proxy import open_proxy
from vduproxy.testing.qemu import GuestConfig, QemuGuest, open_guest

pytestmark = pytest.mark.realclient

BOOT_TIMEOUT = 180.0
TRANSFER = 20 * 1024 * 1024
MD5 = re.compile(r"(?:VDUP|TCPCHECK)-MD5 ([0-9a-f]{32}) bytes=(\d+)")


async def tcp_guest_to_ns(guest: QemuGuest, peer: TapPeer, port: int, log_dir: Path) -> None:
    sink = ManagedProcess(
        "tcp-sink",
        peer.ns.argv(sys.executable, "-m", "vduproxy.testing.tcpcheck", "recv", peer.ip, str(port)),
        log_path=log_dir / "tcp-sink.log",
    )
    async with open_service_nursery() as nursery:
        await sink.start(nursery)
        try:
            await sink.output.wait_for("TCPCHECK-LISTENING", 30)
            sent = await guest.run(f"vdup_send {peer.ip} {port} {TRANSFER}", timeout=600)
            _, got = await sink.output.wait_for(MD5.pattern, 120)
        finally:
            await sink.terminate()
    m = MD5.search(sent.output)
    assert m is not None, sent.output
    assert (got[1], int(got[2])) == (m[1], TRANSFER), (sent.output, got[0])


async def tcp_ns_to_guest(guest: QemuGuest, peer: TapPeer, port: int, log_dir: Path) -> None:
    source = ManagedProcess(
        "tcp-source",
        peer.ns.argv(sys.executable, "-m", "vduproxy.testing.tcpcheck", "send", "10.0.2.15", str(port), str(TRANSFER)),
        log_path=log_dir / "tcp-source.log",
    )
    async with open_service_nursery() as nursery:
        # the guest listens first; the source retries its connect until the listener is up
        received: list[str] = []

        async def guest_side() -> None:
            res = await guest.run(f"vdup_recv {port}", timeout=600)
            received.append(res.output)

        nursery.start_soon(guest_side)
        await source.start(nursery)
        try:
            _, sent = await source.output.wait_for(MD5.pattern, 600)
        finally:
            await source.terminate()
    with trio.fail_after(120):
        while not received:
            await trio.sleep(0.1)
    m = MD5.search(received[0])
    assert m is not None, received[0]
    assert (m[1], int(m[2])) == (sent[1], TRANSFER)


@pytest.mark.parametrize("svq", ["never", "always"])
async def test_guest_pings_and_transfers_through_tap(
    guest_image: GuestImage, sock_dir: Path, log_dir: Path, svq: str
) -> None:
    sock = sock_dir / "vdu.sock"
    async with open_tap_peer("10.0.2.2/24") as peer:
        device = f"sim:profile=rich,backend=tap,tap={peer.tap}"
        async with open_proxy(sock, device, ["--svq", svq], log_dir=log_dir) as proxy:
            config = GuestConfig(kernel=guest_image.kernel, initrd=guest_image.initrd, socket=sock, peermac=None)
            async with open_guest(config, log_dir=log_dir) as guest:
                marker = await guest.wait_marker(timeout=BOOT_TIMEOUT)
                assert marker.carrier
                await proxy.wait_event(
                    "device_started", timeout=60, vqs=[0, 1], mode="svq" if svq == "always" else "passthrough"
                )
                ping = await guest.ping(20, peer.ip, timeout=120)
                assert (ping.sent, ping.received) == (20, 20)
                await tcp_guest_to_ns(guest, peer, 5001, log_dir)
                await tcp_ns_to_guest(guest, peer, 5002, log_dir)
        if svq == "always":
            # the traffic really went through the shadow virtqueue: the proxy's C core counted it
            assert proxy.events("device_started")[-1]["mode"] == "svq"
