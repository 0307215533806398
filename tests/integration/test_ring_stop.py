"""GET_VRING_BASE answers with the exact base at once; the rings that stay restart after the reply.

A front-end stops its rings one after another (QEMU's vhost_dev_stop, DPDK): a restart of the remaining rings
inside every reply would sit on the migration's stop path and be undone by the next request. The proxy defers it
by a short grace and drops it when the next stop came first; a ring stopped alone still runs again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from vduproxy.testing.frontend import VhostUserFrontend
from vduproxy.testing.guest import GuestMemory, VirtioNetDriver, make_frame
from vduproxy.testing.inproc import current_session
from vduproxy.vhost_user.wire import Req

pytestmark = pytest.mark.integration

RX, TX = 0, 1


async def started(path: str, mem: GuestMemory) -> tuple[VhostUserFrontend, VirtioNetDriver]:
    fe = await VhostUserFrontend.connect(path)
    driver = VirtioNetDriver(mem, queue_size=256)
    await fe.qemu72_connect()
    await fe.qemu72_start(driver)
    await fe.get_u64(Req.GET_FEATURES)  # a round trip: the whole set-up is applied
    return fe, driver


def starts(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "device_started"]


@pytest.mark.parametrize("svq", ["never", "always"])
async def test_stopping_every_ring_restarts_nothing_in_between(
    proxy_at: Callable[..., Any], sock_path: str, svq: str
) -> None:
    async with proxy_at("sim:profile=rich", svq=svq):
        with GuestMemory(64 << 20) as mem:
            fe, driver = await started(sock_path, mem)
            async with fe:
                driver.post_rx_buffers(0)
                frames = [make_frame(300 + i, i) for i in range(40)]
                driver.send(frames)
                with trio.fail_after(10):
                    got = await driver.receive_frames(len(frames))
                assert got == frames
                with capture_logs() as logs:
                    bases = await fe.qemu72_stop(driver)
                    await trio.sleep(0.2)  # well past the grace: a deferred restart would have run by now
                assert bases == {RX: driver.rx(0).used_idx, TX: driver.tx(0).used_idx}
                assert starts(logs) == [], "the device was restarted between two GET_VRING_BASE"
                assert not current_session().backends[-1].dp.configured
            driver.close()


async def test_a_ring_stopped_alone_leaves_the_other_running(proxy_at: Callable[..., Any], sock_path: str) -> None:
    async with proxy_at("sim:profile=rich,backend=sink", svq="always"):
        with GuestMemory(64 << 20) as mem:
            fe, driver = await started(sock_path, mem)
            async with fe:
                dp = current_session().backends[-1].dp
                with capture_logs() as logs:
                    base = await fe.get_vring_base(RX)
                    assert base == driver.rx(0).used_idx
                    with trio.fail_after(10):
                        while not starts(logs):
                            await trio.sleep(0.005)
                assert starts(logs)[-1]["vqs"] == [TX]
                assert set(dp.configured) == {TX}
                before = dp.stats()[TX]["packets"]
                driver.send([make_frame(200, i) for i in range(10)])
                with trio.fail_after(10):  # the TX ring still forwards
                    while dp.stats()[TX]["packets"] < before + 10:
                        await trio.sleep(0.01)
            driver.close()


async def test_repeated_announcements_move_the_rings_once_each_way(
    proxy_at: Callable[..., Any], sock_path: str
) -> None:
    """QEMU sends SEND_RARP five times after a migration. In passthrough only the SVQ can put the proxy's RARP on
    the device's TX ring: one transient switch covers all five, and the rings go back once afterwards."""
    from vduproxy.dataplane import rarp_frame
    from vduproxy.testing.guest import GUEST_MAC
    from vduproxy.vhost_user.wire import Rarp
    from vduproxy.vhost_user.wire import Req as R

    async with proxy_at("sim:profile=rich", svq="never"):
        with GuestMemory(64 << 20) as mem:
            fe, driver = await started(sock_path, mem)
            async with fe:
                dp = current_session().backends[-1].dp
                assert not dp.shadow_active
                driver.post_rx_buffers(0)
                with capture_logs() as logs:
                    for _ in range(5):
                        await fe.send(R.SEND_RARP, Rarp(GUEST_MAC))
                        await trio.sleep(0.1)
                    with trio.fail_after(15):
                        while dp.shadow_active or len([e for e in logs if e["event"] == "rarp_sent"]) < 5:
                            await trio.sleep(0.02)
                        got = await driver.receive_frames(5)  # the loopback brings every announcement back
                assert got == [rarp_frame(GUEST_MAC)] * 5
                whys = [e["why"] for e in starts(logs)]
                assert whys == ["rarp injection", "rarp injected"], whys
            driver.close()
