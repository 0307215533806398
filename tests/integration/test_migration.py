"""Issue 5's proofs with the project's front-end replaying QEMU's migration sequences against the real proxy.

- Dirty logging: every guest page whose bytes the device path changed is marked in the log (shadow-memory
  check), and with logging off the same check fails (negative control).
- Device state: saved on proxy A (profile rich) and loaded on proxy B (profile vdpasim, another "vendor"), in band
  (SET_DEVICE_STATE_FD) and through a file: traffic continues from the right indices, byte-exact, nothing lost or
  duplicated, and B's CVQ replay appears in the trace in order.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from vduproxy.testing.frontend import VhostUserFrontend
from vduproxy.testing.guest import GUEST_MAC, GuestMemory, VirtioNetDriver
from vduproxy.testing.inproc import current_session, running_proxy
from vduproxy.testing.traffic import Pump
from vduproxy.vhost_user.wire import ProtocolF
from vduproxy.virtio import NetF

pytestmark = pytest.mark.integration

PAGE = 4096
FEATURES = NetF.VERSION_1 | NetF.MRG_RXBUF | NetF.RING_INDIRECT_DESC | NetF.RING_EVENT_IDX


def driver_written_pages(driver: VirtioNetDriver) -> set[int]:
    """Pages the *driver* (the guest CPU) writes: QEMU logs those itself; the back-end must log the rest."""
    pages: set[int] = set()

    def add(gpa: int, size: int) -> None:
        pages.update(range(gpa // PAGE, (gpa + size - 1) // PAGE + 1))

    for pool in (*driver._tx_pool, *driver._table_pool):
        add(pool.area.gpa, pool.area.size)
    for vq in driver.vqs:
        add(vq.desc_gpa, 16 * vq.num)
        add(vq.avail_gpa, 6 + 2 * vq.num)
    return pages


def changed_pages(before: bytes, after: bytes, driver: VirtioNetDriver) -> set[int]:
    mem = driver.mem
    out = set()
    for region in mem.regions:
        for off in range(0, region.size, PAGE):
            a = region.mmap_offset + off
            if before[a : a + PAGE] != after[a : a + PAGE]:
                out.add((region.gpa + off) // PAGE)
    return out


async def logged_traffic_round(sock_path: str, *, logging: bool) -> tuple[set[int], set[int], set[int]]:
    """QEMU's migration start (or not), then traffic; returns (changed device-side pages, dirty pages, rx pages)."""
    with GuestMemory(64 << 20, regions=2) as mem:
        fe = await VhostUserFrontend.connect(sock_path)
        async with fe:
            await fe.qemu72_connect()
            driver = VirtioNetDriver(mem, queue_size=256, features=FEATURES, tx_buf_size=9216)
            await fe.qemu72_start(driver)
            await Pump(driver, 500, seed=1, max_size=1514).run()  # passthrough warm-up
            log = await fe.migration_start(driver) if logging else None
            if log is not None:
                log.clear()
            before = bytes(mem.buf)
            pump = Pump(driver, 3000, seed=2, max_size=9000, first_seq=500)
            await pump.run()
            pump.check()
            await fe.qemu72_stop(driver)  # GET_VRING_BASE: nothing may be written after this
            after = bytes(mem.buf)
            device_side = changed_pages(before, after, driver) - driver_written_pages(driver)
            dirty = log.dirty_pages() if log is not None else set()
            rx_pages = {
                p
                for pool in driver._rx_pool
                for p in range(pool.area.gpa // PAGE, (pool.area.gpa + pool.area.size - 1) // PAGE + 1)
            }
            return device_side, dirty, rx_pages


async def test_dirty_log_marks_every_page_the_device_path_wrote(proxy_at: Callable[..., Any], sock_path: str) -> None:
    async with proxy_at("sim:profile=rich", svq="auto"):
        with capture_logs() as logs:
            device_side, dirty, rx_pages = await logged_traffic_round(sock_path, logging=True)
    # SET_FEATURES with LOG_ALL moved the rings to the SVQ before it was answered
    modes = [e.get("mode") for e in logs if e["event"] == "device_started"]
    assert "svq" in modes
    assert device_side, "the traffic changed no device-written page: the check would prove nothing"
    assert device_side & rx_pages, "received frames must have landed in RX buffers"
    missing = device_side - dirty
    assert not missing, f"{len(missing)} changed pages not in the dirty log, e.g. {sorted(missing)[:5]}"


async def test_negative_control_without_logging_the_check_fails(proxy_at: Callable[..., Any], sock_path: str) -> None:
    """Same traffic, no LOG_ALL: the device-written pages are not in any log, so the shadow check above would
    fail — it is a real check, not one that passes whatever the proxy does."""
    async with proxy_at("sim:profile=rich", svq="auto"):
        device_side, dirty, _ = await logged_traffic_round(sock_path, logging=False)
    assert device_side and not device_side <= dirty


async def run_source(sock_path: str, driver: VirtioNetDriver, frames: int) -> tuple[VhostUserFrontend, Pump]:
    fe = await VhostUserFrontend.connect(sock_path)
    await fe.qemu72_connect(extra_protocol=ProtocolF.DEVICE_STATE)
    await fe.qemu72_start(driver)
    pump = Pump(driver, frames, seed=5, max_size=1514)
    return fe, pump


@pytest.mark.parametrize("transport", ["vhost-user", "file"])
async def test_state_moves_from_rich_to_vdpasim(tmp_path: os.PathLike[str], transport: str) -> None:
    """A guest on proxy A (rich device) migrates to proxy B (vdpasim device: no MRG_RXBUF, no INDIRECT, no
    EVENT_IDX, unicast filtered by MAC, only MAC_ADDR_SET on its CVQ)."""
    sock_a = os.path.join(str(tmp_path), "a.sock")
    sock_b = os.path.join(str(tmp_path), "b.sock")
    with GuestMemory(64 << 20, regions=2) as mem:
        driver = VirtioNetDriver(mem, queue_size=256, features=FEATURES, tx_layout="indirect")
        # the guest's MAC, as an operator would pass it (libvirt knows it)
        async with running_proxy(sock_a, "sim:profile=rich", svq="auto", mac=GUEST_MAC):
            fe_a, pump = await run_source(sock_a, driver, 6000)
            async with fe_a:
                await pump.run(until=2000)  # stop mid-stream: frames in flight in every direction
                await fe_a.migration_start(driver)
                await pump.run(until=3000)
                bases = await fe_a.qemu72_stop(driver)
                if transport == "vhost-user":
                    blob = await fe_a.save_device_state()
                else:
                    blob = current_session().save_state()
        path = os.path.join(str(tmp_path), "state.bin")
        with open(path, "wb") as f:
            f.write(blob)
        with capture_logs() as logs:
            # rx_full=wait: the kernel-like profile drops frames when RX runs dry (as vdpa_sim_net does); a loss
            # there would be the test device's, not the proxy's
            async with running_proxy(sock_b, "sim:profile=vdpasim,rx_full=wait", svq="auto"):
                if transport == "file":
                    with open(path, "rb") as f:
                        current_session().load_state(f.read())  # what `serve --restore-state FILE` does
                fe_b = await VhostUserFrontend.connect(sock_b)
                async with fe_b:
                    await fe_b.qemu72_connect(extra_protocol=ProtocolF.DEVICE_STATE)
                    if transport == "vhost-user":
                        await fe_b.load_device_state(blob)
                    await fe_b.qemu72_start(driver, bases=bases)
                    with trio.fail_after(300):
                        await pump.run()
                    pump.check()  # all 6000 frames: before, during and after the move, once each
                    dp = current_session().active()
                    assert dp is not None and dp.shadow_active, "vdpasim lacks MRG/INDIRECT: only the SVQ bridges"
    # B replayed the saved net state through its CVQ, in order, before traffic
    trace = [(e["cls"], e["cmd"]) for e in logs if e["event"] == "cvq_command" and e.get("ack") == "ok"]
    assert trace and trace[0] == ("MAC", "ADDR_SET"), trace
    restored = [e for e in logs if e["event"] == "device_state_restored"]
    assert restored and restored[0]["mac"] == GUEST_MAC.hex(":")


async def test_corrupt_or_newer_state_is_refused(proxy_at: Callable[..., Any], sock_path: str) -> None:
    async with proxy_at("sim:profile=rich"):
        session = current_session()
        with pytest.raises(Exception, match="magic"):
            session.load_state(b"not a state blob at all")
        from vduproxy.migration.state import StateError

        with pytest.raises(StateError):
            session.save_state()  # nothing attached yet: a clear error, not an empty blob
