"""A QEMU 7.2 guest survives its back-end dying: the proxy is SIGKILLed (no cleanup at all: its device, its
mappings and its socket file are simply gone or stale) and started again on the same socket; QEMU's
`-chardev socket,reconnect=1` reconnects and replays the whole set-up, and the guest pings the namespace peer
again within 5 s of the restart (the time is printed).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from vduproxy.testing.initramfs import GuestImage
from vduproxy.testing.netns import open_tap_peer
from vduproxy.testing.proxy import open_proxy
from vduproxy.testing.qemu import GuestConfig, QemuGuest, open_guest

pytestmark = pytest.mark.realclient

BOOT_TIMEOUT = 180.0
BACK_WITHIN = 5.0  # seconds from the restarted proxy listening to the guest's first answered ping


async def first_answered_ping(guest: QemuGuest, peer_ip: str, deadline: float) -> float:
    """Ping once at a time until one is answered; returns when (time.monotonic)."""
    while True:
        res = await guest.ping(1, peer_ip, timeout=30)
        if res.received == 1:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"no ping answered by {deadline:.1f} (monotonic)")


@pytest.mark.parametrize("svq", ["never", "always"])
async def test_guest_pings_again_after_the_proxy_is_killed_and_restarted(
    guest_image: GuestImage, sock_dir: Path, log_dir: Path, svq: str
) -> None:
    sock = sock_dir / "vdu.sock"
    mode = "svq" if svq == "always" else "passthrough"
    async with open_tap_peer("10.0.2.2/24") as peer:
        device = f"sim:profile=rich,backend=tap,tap={peer.tap}"
        config = GuestConfig(kernel=guest_image.kernel, initrd=guest_image.initrd, socket=sock, peermac=None)
        async with (
            open_proxy(sock, device, ["--svq", svq], log_dir=log_dir, name="vduproxy-1") as first,
            open_guest(config, log_dir=log_dir) as guest,
        ):
            marker = await guest.wait_marker(timeout=BOOT_TIMEOUT)
            assert marker.carrier
            await first.wait_event("device_started", timeout=60, vqs=[0, 1], mode=mode)
            ping = await guest.ping(5, peer.ip, timeout=60)
            assert (ping.sent, ping.received) == (5, 5)

            os.kill(first.pid, signal.SIGKILL)  # by PID: the daemon alone, no chance to clean up
            assert await first.proc.wait(30) == -signal.SIGKILL
            # the dead back-end: nothing answers while it is gone
            assert (await guest.ping(2, peer.ip, timeout=60)).received == 0
            assert sock.exists(), "a SIGKILLed daemon leaves its socket file behind"

            async with open_proxy(sock, device, ["--svq", svq], log_dir=log_dir, name="vduproxy-2") as second:
                restarted = time.monotonic()  # open_proxy returns once the new daemon listens
                answered = await first_answered_ping(guest, peer.ip, deadline=restarted + 60)
                back_after = answered - restarted
                print(f"\n[{svq}] guest answered again {back_after:.2f} s after the proxy restarted")
                await second.wait_event("device_started", timeout=10, vqs=[0, 1], mode=mode)
                assert second.events("stale_socket_removed"), "the new daemon replaced the stale socket"
                assert back_after < BACK_WITHIN
                # and it keeps working
                ping = await guest.ping(20, peer.ip, timeout=120)
                assert (ping.sent, ping.received) == (20, 20)
                assert guest.process.running
