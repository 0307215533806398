"""Device faults injected into the software device (IOTLB miss, failing ioctl, stuck queue, vanished device).

Each fault must give a clear error (a device fault event, a broken vq or a device error logged by the daemon),
never hang or kill the daemon, and leave every other socket/device pair running: each test runs a second
proxy on its own socket and device and proves it still carries traffic byte for byte while the first one is
broken. The faulted pair must come back when its front-end reconnects (or be reported gone for good).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from vduproxy.testing.frontend import FrontendError, VhostUserFrontend
from vduproxy.testing.guest import GuestMemory, VirtioNetDriver, check_frames, make_frame
from vduproxy.testing.inproc import current_session, running_proxy
from vduproxy.testing.traffic import Pump
from vduproxy.vdpa.device import DeviceError
from vduproxy.vdpa.sim import SimConfigError, SimDevice, parse_sim_spec
from vduproxy.vhost_user.wire import Req

pytestmark = pytest.mark.integration

TX = 1  # vq index of pair 0's TX ring


class Pair:
    """One proxy (socket + sim device) with a connected QEMU-7.2-like front-end and a guest driver."""

    def __init__(self, path: str, session: Any, fe: VhostUserFrontend, driver: VirtioNetDriver) -> None:
        self.path = path
        self.session = session
        self.fe = fe
        self.driver = driver
        self.seq = 0

    @property
    def device(self) -> Any:
        return self.session.device

    async def traffic(self, count: int = 300) -> None:
        """`count` frames out and back, byte-exact, no loss, no duplicate."""
        pump = Pump(self.driver, count, seed=self.seq, max_size=1514, first_seq=self.seq)
        self.seq += count
        await pump.run(timeout=60)
        pump.check()


@contextlib.asynccontextmanager
async def open_pair(path: str, svq: str) -> AsyncIterator[Pair]:
    async with running_proxy(path, "sim:profile=rich", svq=svq):
        session: Any = current_session()
        with GuestMemory(32 << 20, regions=2) as mem:
            fe = await VhostUserFrontend.connect(path)
            driver = VirtioNetDriver(mem, queue_size=256)
            try:
                await fe.qemu72_connect()
                await fe.qemu72_start(driver)
                pair = Pair(path, session, fe, driver)
                yield pair
            finally:
                with trio.CancelScope(shield=True):
                    await pair.fe.aclose() if "pair" in locals() else await fe.aclose()
                driver.close()


async def wait_detached(pair: Pair) -> None:
    """Until the daemon has cleaned up after the front-end left (a bounded wait, not a timing assertion)."""
    with trio.fail_after(20):
        while pair.session.active() is not None:
            await trio.sleep(0.01)


async def reconnect(pair: Pair) -> None:
    """QEMU's reconnect: the old connection dropped without a stop sequence, a new one replaying the whole
    set-up, the rings restarting from the used index."""
    await pair.fe.aclose()
    await wait_detached(pair)
    pair.fe = await VhostUserFrontend.connect(pair.path)
    await pair.fe.qemu72_connect()
    await pair.fe.qemu72_start(pair.driver)


async def send_unanswered(pair: Pair, count: int) -> list[bytes]:
    """Post RX buffers and put `count` frames on TX; return them (they are expected back only later)."""
    frames = [make_frame(200, pair.seq + i) for i in range(count)]
    pair.seq += count
    pair.driver.post_rx_buffers(0)
    assert pair.driver.send(frames, 0) == count
    return frames


async def collect(pair: Pair, count: int, timeout: float = 30) -> list[bytes]:
    got: list[bytes] = []
    with trio.fail_after(timeout):
        while len(got) < count:
            pair.driver.post_rx_buffers(0)
            pair.driver.reclaim_tx(0)
            more = pair.driver.receive(0)
            if not more:
                with trio.move_on_after(0.05):
                    await pair.driver.wait_call(pair.driver.rx(0).index)
            got += more
    return got


async def wait_vq_error(device: Any, vq: int) -> Any:
    with trio.fail_after(20):
        while (stats := device.vq_stats(vq)).error is None:
            await trio.sleep(0.01)
    return stats


@pytest.fixture
def paths(tmp_path: os.PathLike[str]) -> tuple[str, str]:
    return os.path.join(str(tmp_path), "a.sock"), os.path.join(str(tmp_path), "b.sock")


@pytest.mark.parametrize("svq", ["never", "always"])
async def test_iotlb_miss_breaks_one_vq_the_other_pair_runs_and_reconnect_recovers(
    paths: tuple[str, str], svq: str
) -> None:
    async with open_pair(paths[0], svq) as a, open_pair(paths[1], svq) as b:
        await a.traffic()
        await b.traffic()
        with capture_logs() as logs:
            a.device.inject_fault("iotlb_miss", TX)
            # the next frames make the device walk the TX ring: the first chain misses, the vq stops
            stranded = await send_unanswered(a, 20)
            stats = await wait_vq_error(a.device, TX)
            faults = a.device.take_faults()
        assert "IOTLB miss" in stats.error and stats.faults >= 1
        assert [(f.vq, "IOTLB miss" in f.reason) for f in faults] == [(TX, True)]
        assert any(e["event"] == "device_fault" and e["vq"] == TX for e in logs), logs
        # the daemon's view: the queue's fault counter moved
        assert a.session.stats()["queues"][TX]["faults"] >= 1
        # the frames on the broken TX ring went nowhere, while the other device passes traffic byte for byte
        await b.traffic(500)
        assert a.driver.receive(0) == []

        # QEMU's answer to a broken back-end: reconnect. The reset takes the fault away, the rings restart from
        # the used index, and the stranded frames go out then: nothing was lost.
        await reconnect(a)
        got = await collect(a, len(stranded))
        report = check_frames(range(a.seq - 20, a.seq), got)
        assert report.ok, report
        assert a.device.vq_stats(TX).error is None
        await a.traffic()
        await b.traffic()


@pytest.mark.parametrize("svq", ["never", "always"])
async def test_stuck_queue_does_not_hang_stop_and_the_other_pair_runs(paths: tuple[str, str], svq: str) -> None:
    async with open_pair(paths[0], svq) as a, open_pair(paths[1], svq) as b:
        await a.traffic()
        a.device.inject_fault("stuck", TX)
        await send_unanswered(a, 20)
        await b.traffic(500)
        # nothing came back on the stuck pair, and the device saw nothing new
        before = a.device.vq_stats(TX).packets
        assert a.driver.receive(0) == []
        # the front-end's stop sequence (GET_VRING_BASE) must still be answered: suspend + base, no waiting on
        # a queue that will never move
        with trio.fail_after(20):
            bases = await a.fe.qemu72_stop(a.driver)
        assert a.device.vq_stats(TX).packets == before
        # the base handed back must make QEMU resend what the device never took
        assert bases[TX] == a.driver.tx(0).used_idx
        a.device.inject_fault("clear", TX)
        await a.fe.qemu72_start(a.driver, bases=bases)
        got = await collect(a, 20)
        report = check_frames(range(a.seq - 20, a.seq), got)
        assert report.ok, report
        await a.traffic()
        await b.traffic()


@pytest.mark.parametrize("op", ["set_vring_addr", "iotlb_update", "set_status"])
async def test_failing_ioctl_is_a_logged_device_error_and_the_daemon_keeps_serving(
    paths: tuple[str, str], op: str
) -> None:
    async with open_pair(paths[0], "never") as a, open_pair(paths[1], "never") as b:
        await a.traffic()
        await b.traffic()
        # the front-end goes away; the next one makes the daemon program the device again, and hits the fault
        await a.fe.aclose()
        await wait_detached(a)
        a.device.inject_fault("ioctl", op=op)
        with capture_logs() as logs:
            with pytest.raises(FrontendError):
                a.fe = await VhostUserFrontend.connect(a.path)
                await a.fe.qemu72_connect()
                await a.fe.qemu72_start(a.driver)
                await a.fe.get_u64(Req.GET_FEATURES)  # a round trip: the daemon has handled everything before it
            await wait_detached(a)
        errors = [e for e in logs if e["log_level"] == "error"]
        assert any(op in str(e.get("error", "")) for e in errors), errors
        # the other pair never noticed
        await b.traffic(500)
        # the failure was one ioctl: the next connection works again
        a.fe = await VhostUserFrontend.connect(a.path)
        await a.fe.qemu72_connect()
        await a.fe.qemu72_start(a.driver)
        await a.traffic()


async def test_failing_reset_during_teardown_keeps_the_socket_serving(paths: tuple[str, str]) -> None:
    async with open_pair(paths[0], "never") as a, open_pair(paths[1], "never") as b:
        await a.traffic()
        # the front-end vanishes and the device refuses the reset that tears its rings down, once
        a.device.inject_fault("ioctl", op="set_status")
        with capture_logs() as logs:
            await a.fe.aclose()
            await wait_detached(a)
        assert any("set_status" in str(e.get("error", "")) for e in logs if e["log_level"] != "debug"), logs
        await b.traffic()
        # the socket still serves: QEMU's reconnect gets a working pair
        a.fe = await VhostUserFrontend.connect(a.path)
        await a.fe.qemu72_connect()
        await a.fe.qemu72_start(a.driver)
        await a.traffic()


async def test_vanished_device_fails_its_connection_not_the_daemon(paths: tuple[str, str]) -> None:
    async with open_pair(paths[0], "never") as a, open_pair(paths[1], "never") as b:
        await a.traffic()
        with capture_logs() as logs:
            a.device.inject_fault("vanish")
            # the next request that touches the device fails; the daemon ends that connection, not itself
            with pytest.raises(FrontendError):
                await a.fe.qemu72_stop(a.driver)
                await a.fe.get_u64(Req.GET_FEATURES)
            await wait_detached(a)
        errors = [e for e in logs if e["log_level"] == "error"]
        assert any("vanished" in str(e.get("error", "")) for e in errors), errors
        with pytest.raises(DeviceError, match="vanished"):
            a.device.get_vring_base(TX)
        await b.traffic(500)
        # a front-end arriving later is turned away with an error, and the listener is still there
        for _ in range(2):
            with pytest.raises(FrontendError):
                fe = await VhostUserFrontend.connect(a.path)
                async with fe:
                    await fe.qemu72_connect()
                    await fe.qemu72_start(a.driver)
                    await fe.get_u64(Req.GET_FEATURES)
            await wait_detached(a)
        await b.traffic()


async def test_faults_named_in_the_device_spec_fire_when_the_queue_is_used(paths: tuple[str, str]) -> None:
    async with running_proxy(paths[0], "sim:profile=rich,fault=iotlb_miss@vq1+ioctl@set_vring_addr"):
        session: Any = current_session()
        assert session.device.spec.faults == (("iotlb_miss", "vq1"), ("ioctl", "set_vring_addr"))
        with GuestMemory(32 << 20) as mem:
            driver = VirtioNetDriver(mem, queue_size=256)
            try:
                # the first programming of the device hits the failing ioctl: that connection ends with an error
                with capture_logs() as logs, pytest.raises(FrontendError):
                    fe = await VhostUserFrontend.connect(paths[0])
                    async with fe:
                        await fe.qemu72_connect()
                        await fe.qemu72_start(driver)
                        await fe.get_u64(Req.GET_FEATURES)
                assert any("set_vring_addr" in str(e.get("error", "")) for e in logs if e["log_level"] == "error")
                with trio.fail_after(20):
                    while session.active() is not None:
                        await trio.sleep(0.01)
                # the next one runs, and TX meets the IOTLB miss as soon as it is processed
                fe = await VhostUserFrontend.connect(paths[0])
                async with fe:
                    await fe.qemu72_connect()
                    await fe.qemu72_start(driver)
                    await fe.get_u64(Req.GET_FEATURES)  # a round trip: the set-up is applied
                    driver.post_rx_buffers(0)
                    driver.send([make_frame(100, 0)])
                    stats = await wait_vq_error(session.device, TX)
                    assert "IOTLB miss" in str(stats.error)
            finally:
                driver.close()


@pytest.mark.parametrize(
    "bad", ["fault=iotlb_miss", "fault=stuck@tx", "fault=ioctl@1x", "fault=vanish@vq1", "fault=melt@vq1"]
)
def test_bad_fault_specs_are_refused_with_the_expected_forms(bad: str) -> None:
    with pytest.raises(SimConfigError, match=r"iotlb_miss@vqN|a vq like|an operation|'device'"):
        parse_sim_spec(f"sim:{bad}")


def test_a_fault_on_a_vq_the_device_lacks_fails_the_open() -> None:
    with pytest.raises(DeviceError, match="vq 9 out of range"):
        SimDevice("sim:profile=basic,fault=stuck@vq9")
