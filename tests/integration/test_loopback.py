"""The project's front-end replaying QEMU 7.2's sequences → the proxy → the software device in loopback."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import trio

from vduproxy.testing.frontend import VhostUserFrontend
from vduproxy.testing.guest import GuestMemory, VirtioNetDriver, check_frames, make_frame
from vduproxy.virtio import VHOST_F_LOG_ALL, NetF

pytestmark = pytest.mark.integration


async def exchange(driver: VirtioNetDriver, sizes: list[int], pair: int = 0, first_seq: int = 0) -> None:
    """Send frames of the given sizes on `pair`, receive them back, check byte-exactness, loss, duplication."""
    frames = [make_frame(size, first_seq + i) for i, size in enumerate(sizes)]
    received: list[bytes] = []
    pending = list(frames)
    with trio.fail_after(60):
        while pending or len(received) < len(frames):
            driver.post_rx_buffers(pair)
            n = driver.send(pending[:64], pair)
            pending = pending[n:]
            driver.reclaim_tx(pair)
            if len(received) < len(frames):
                got = driver.receive(pair)
                if not got:
                    with trio.move_on_after(0.05):
                        await driver.wait_call(driver.rx(pair).index)
                received += got
    report = check_frames(range(first_seq, first_seq + len(frames)), received)
    assert report.ok, report


@pytest.mark.parametrize("svq", ["never", "always"])
@pytest.mark.parametrize("profile", ["rich", "basic"])
async def test_qemu72_sequence_loopback_byte_exact(
    proxy_at: Callable[..., Any], sock_path: str, profile: str, svq: str
) -> None:
    rng = random.Random(7)
    async with proxy_at(f"sim:profile={profile}", svq=svq):
        with GuestMemory(64 << 20, regions=2) as mem:
            fe = await VhostUserFrontend.connect(sock_path)
            async with fe:
                await fe.qemu72_connect()
                driver = VirtioNetDriver(mem, queue_size=256, rx_buf_size=2048)
                await fe.qemu72_start(driver)
                # more frames than the ring holds, several times: indices wrap the ring
                await exchange(driver, [rng.randint(60, 1514) for _ in range(2000)])
                bases = await fe.qemu72_stop(driver)
                # the base handed back is exactly where the guest's rings are
                assert bases[0] == driver.rx(0).used_idx
                assert bases[1] == driver.tx(0).used_idx == 2000 % 65536


async def test_restart_resumes_at_the_returned_base(proxy_at: Callable[..., Any], sock_path: str) -> None:
    async with proxy_at("sim:profile=rich"):
        with GuestMemory(64 << 20) as mem:
            fe = await VhostUserFrontend.connect(sock_path)
            async with fe:
                await fe.qemu72_connect()
                driver = VirtioNetDriver(mem, queue_size=256)
                await fe.qemu72_start(driver)
                await exchange(driver, [100] * 300)
                bases = await fe.qemu72_stop(driver)
                await fe.qemu72_start(driver, bases=bases)
                await exchange(driver, [200] * 300, first_seq=300)


async def test_offered_features_follow_the_device_profile(proxy_at: Callable[..., Any], sock_path: str) -> None:
    offered = {}
    for profile, svq in (("rich", "never"), ("vdpasim", "never"), ("vdpasim", "auto")):
        async with proxy_at(f"sim:profile={profile}", svq=svq):
            fe = await VhostUserFrontend.connect(sock_path)
            async with fe:
                await fe.qemu72_connect()
                assert fe.offered_features is not None
                offered[profile, svq] = fe.offered_features
                assert not fe.offered_features & NetF.ACCESS_PLATFORM  # never toward QEMU
    # passthrough only: the guest gets what the device has
    assert offered["rich", "never"] & NetF.MRG_RXBUF and not offered["vdpasim", "never"] & NetF.MRG_RXBUF
    # without dirty logging there is no SVQ, so nothing that would let QEMU start a migration
    assert not offered["rich", "never"] & VHOST_F_LOG_ALL
    # with the SVQ allowed, what it can bridge is offered on any device: a guest can move between vendors
    assert offered["vdpasim", "auto"] & (NetF.MRG_RXBUF | NetF.RING_INDIRECT_DESC | NetF.RING_EVENT_IDX)
    assert offered["vdpasim", "auto"] & VHOST_F_LOG_ALL
