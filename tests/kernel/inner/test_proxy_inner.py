"""The proxy against a vdpa_sim_net-like device, driven by the project's front-end replaying QEMU 7.2.

Runs in two places, unchanged:
- inside the kernel-tier guest (tests/kernel/test_kernel_proxy.py starts it there) with
  `VDUPROXY_PROXY_DEVICE=/dev/vhost-vdpa-0`: the real vdpa_sim_net behind vhost-vdpa;
- on the host (tier 2) against `sim:profile=vdpasim`, the software device's imitation of it: the same tests
  passing on both is what says the imitation is faithful where the proxy depends on it.

What vdpa_sim_net imposes on a test (DESIGN.md §3, testbed/vdpa-kernel/REPORT.md): it loops TX back to RX
but drops unicast frames not addressed to its MAC, so frames go to the device's configured MAC (or to the MAC
the proxy programmed); it drops a frame when RX has no free buffer, so RX stays posted and no more frames are
in flight than RX buffers; its rings are at most 256 entries; its CVQ sits in a group of its own that the
proxy moves to ASID 1.

`VDUPROXY_TEST_TIMEOUT` bounds each wait for the device (a deadline for a device that stopped answering, not
a performance assertion): TCG runs everything many times slower than the host.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn

import pytest
import trio
from structlog.testing import capture_logs

from vduproxy import server
from vduproxy.dataplane import DeviceSession, open_dataplane_factory
from vduproxy.testing.frontend import VhostUserFrontend
from vduproxy.testing.guest import GUEST_MAC, GuestMemory, VirtioNetDriver, check_frames, make_frame, parse_frame
from vduproxy.vdpa.device import BackendF
from vduproxy.vdpa.factory import open_device
from vduproxy.vhost_user.wire import Rarp, Req
from vduproxy.virtio import DESC_SIZE, VRING_DESC_F_WRITE, NetF, used_ring_size

pytestmark = pytest.mark.integration

DEVICE = os.environ.get("VDUPROXY_PROXY_DEVICE", "sim:profile=vdpasim")
TIMEOUT = float(os.environ.get("VDUPROXY_TEST_TIMEOUT", "30"))
RING = 256  # vdpa_sim_net's maximum
WINDOW = 64  # frames in flight at most: well under the RX buffers posted, so the device never drops one
BROADCAST = b"\xff" * 6
NEW_MAC = bytes.fromhex("02a0b0c0d0e1")  # locally administered, neither the device's nor the guest's MAC
PAGE = 4096
# The ring features vdpa_sim_net has itself. A guest that acks more (the front-end's default driver wants
# mergeable RX, indirect tables and event idx, which the proxy offers when the SVQ may bridge them) can only be
# served through the SVQ, so a test that needs passthrough first uses this set.
NATIVE = NetF.VERSION_1 | NetF.MTU


@pytest.fixture(params=[DEVICE])
def device(request: pytest.FixtureRequest) -> str:
    """The device spec; a fixture parameter so every test id names the device it ran on."""
    return str(request.param)


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "vdu.sock")


@asynccontextmanager
async def running_proxy(path: str, device: str, **kw: Any) -> AsyncIterator[DeviceSession]:
    """The proxy's real server, back-end and data plane in this process, listening on `path`."""
    factory, _ = open_dataplane_factory(device, **kw)
    assert factory.session is not None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: server.serve_unix(path, factory, task_status=task_status))
            yield factory.session
            nursery.cancel_scope.cancel()
    finally:
        factory.close()


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    # Two regions, the second above 4 GiB like QEMU's: GPA, front-end VA and IOVA all differ.
    with GuestMemory(32 << 20, regions=2) as m:
        yield m


def device_mac(device: str) -> bytes:
    dev = open_device(device)
    try:
        return dev.get_config(0, 6)
    finally:
        dev.close()


@pytest.fixture
async def device_mac_kept(device: str, sock_path: str) -> AsyncIterator[None]:
    """A kernel device keeps a programmed MAC across resets and opens (a sim is new at every open): put back
    the MAC it had, so each test starts from the device's configured one. Every test that starts rings asks
    for it by name: pytest-trio runs an async fixture only when the test names it (autouse is ignored)."""
    if device.startswith("sim"):
        yield
        return
    before = device_mac(device)
    yield
    if device_mac(device) != before:
        async with running_proxy(sock_path, device, mac=before) as session:
            with GuestMemory(8 << 20) as mem:
                driver = VirtioNetDriver(mem, queue_size=min(RING, session.info.ring_max))
                async with await connect_and_start(sock_path, driver) as fe:
                    await fe.qemu72_stop(driver)
        assert device_mac(device) == before, "could not restore the device's MAC"


def mode(session: DeviceSession) -> object:
    return session.stats()["mode"]


async def connect_and_start(path: str, driver: VirtioNetDriver, *, settled: bool = True) -> VhostUserFrontend:
    """QEMU 7.2's connect and start sequence. `settled`: also wait until the proxy has handled all of it (the
    last requests have no reply), so a test can look at the configured device."""
    fe = await VhostUserFrontend.connect(path, reply_timeout=TIMEOUT)
    try:
        await fe.qemu72_connect()
        await fe.qemu72_start(driver)
        if settled:
            await settle(fe)
    except BaseException:
        await fe.aclose()
        raise
    return fe


def rarp_from(mac: bytes) -> bytes:
    """QEMU's self-announcement (net/announce.c): a reverse ARP request from `mac`, broadcast, padded to 60."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 3, mac, bytes(4), mac, bytes(4))
    return (BROADCAST + mac + struct.pack("!H", 0x8035) + arp).ljust(60, b"\0")


async def check_announcement(
    session: DeviceSession, driver: VirtioNetDriver, logs: list[dict[str, Any]], mac: bytes, wanted_mode: str
) -> None:
    """The proxy announces the MAC as QEMU would, with a RARP on the device's TX (through a transient SVQ when
    in passthrough), then goes back to its mode. The looping device returns the RARP to the guest only if RX
    had room at that instant, so a broadcast fence sent afterwards shows what came back."""
    with trio.move_on_after(TIMEOUT):
        while not any(e["event"] == "rarp_sent" for e in logs):
            await trio.sleep(0.01)
    sent = [e for e in logs if e["event"] == "rarp_sent"]
    assert sent, "the proxy never sent the RARP for the SEND_RARP it got"
    assert sent[0]["mac"] == mac.hex(":")
    await wait_for_mode(session, wanted_mode)
    fence = make_frame(100, 3000, dst=BROADCAST)
    driver.post_rx_buffers()
    assert driver.send([fence]) == 1
    got = await receive_until(driver, lambda got: fence in got)
    assert got[:-1] in ([], [rarp_from(mac)]), "frames other than the announcement came back"


async def wait_for_mode(session: DeviceSession, wanted: str) -> None:
    """The proxy may still be moving its rings (a transient switch): wait for it, up to the deadline."""
    with trio.move_on_after(TIMEOUT):
        while mode(session) != wanted:
            await trio.sleep(0.01)
    assert mode(session) == wanted, f"the proxy stayed in mode {mode(session)}, not {wanted}"


async def settle(fe: VhostUserFrontend) -> None:
    """Wait until the proxy has handled every request sent so far. The last ones of a QEMU sequence have no
    reply, and the proxy handles a connection's requests in order: the answer to one more request that has a
    reply means they are done. (The data-path tests do not do this: a real guest kicks right away.)"""
    await fe.get_u64(Req.GET_FEATURES)


def frames_to(dst: bytes, count: int, *, seed: int, first_seq: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [make_frame(rng.randint(60, 1514), first_seq + i, dst=dst) for i in range(count)]


async def wait_rx(driver: VirtioNetDriver) -> None:
    """Sleep until the device signals RX, or briefly: the used ring is polled either way."""
    with trio.move_on_after(0.05):
        await driver.wait_call(driver.rx().index)


async def loopback(driver: VirtioNetDriver, frames: list[bytes]) -> list[bytes]:
    """Send `frames` with at most WINDOW in flight and RX always posted; returns what came back (all of it,
    or a failure at the deadline that says where the rings stood)."""
    received: list[bytes] = []
    sent = 0
    with trio.move_on_after(TIMEOUT) as deadline:
        while len(received) < len(frames):
            driver.post_rx_buffers()
            room = WINDOW - (sent - len(received))
            if sent < len(frames) and room > 0:
                sent += driver.send(frames[sent : sent + room])
            driver.reclaim_tx()
            got = driver.receive()
            if not got:
                await wait_rx(driver)
            received += got
    if deadline.cancelled_caught:
        fail_stalled(driver, f"{len(received)} of {len(frames)} frames back ({sent} sent)", range(sent), received)
    return received


async def receive_until(driver: VirtioNetDriver, done: Callable[[list[bytes]], bool]) -> list[bytes]:
    """Receive, RX kept posted, until `done(received)`; a failure at the deadline if that never happens."""
    received: list[bytes] = []
    with trio.move_on_after(TIMEOUT) as deadline:
        while not done(received):
            driver.post_rx_buffers()
            driver.reclaim_tx()
            got = driver.receive()
            if not got:
                await wait_rx(driver)
            received += got
    if deadline.cancelled_caught:
        fail_stalled(driver, f"{len(received)} frames back, not the awaited ones", (), received)
    return received


def fail_stalled(driver: VirtioNetDriver, what: str, sent: Iterable[int], received: list[bytes]) -> NoReturn:
    report = check_frames(sent, received)
    rings = "; ".join(
        f"vq {vq.index}: avail {vq.last_avail} used {vq.used_idx} kicks {vq.kicks} calls {vq.calls}"
        for vq in driver.vqs
    )
    pytest.fail(
        f"no progress for {TIMEOUT:.0f} s: {what}; lost {report.lost[:10]}, duplicated {report.duplicated[:10]}, "
        f"corrupted {report.corrupted}; {rings}",
        pytrace=False,
    )


def assert_same(received: list[bytes], sent: list[bytes]) -> None:
    """Every frame back once, intact, and in order (one queue pair, one device queue)."""
    report = check_frames([parse_seq(f) for f in sent], received)
    assert report.ok and report.received == len(sent), report
    assert received == sent, "frames came back reordered"


def parse_seq(frame: bytes) -> int:
    info = parse_frame(frame)
    assert info is not None
    return info.seq


def assert_exact_bases(bases: dict[int, int], driver: VirtioNetDriver) -> None:
    """GET_VRING_BASE after a stop is exactly where the guest's used rings are: every chain the device took
    was completed, nothing is half-done or lost."""
    for vq in driver.vqs:
        assert bases[vq.index] == vq.used_idx, f"vq {vq.index}: base {bases[vq.index]}, used idx {vq.used_idx}"


@pytest.mark.parametrize("svq", ["never", "always"])
async def test_loopback_byte_exact(
    device: str, sock_path: str, mem: GuestMemory, device_mac_kept: None, svq: str
) -> None:
    """The guest's MAC given with --mac; frames to it, more than the ring holds, three times over: all back
    through the device's unicast filter, intact, once each, in order; the stop hands back exact bases."""
    count = 3 * RING + 17  # indices wrap the 256-entry rings
    async with running_proxy(sock_path, device, svq=svq, mac=GUEST_MAC) as session:
        driver = VirtioNetDriver(mem, queue_size=min(RING, session.info.ring_max))
        async with await connect_and_start(sock_path, driver) as fe:
            assert mode(session) == ("svq" if svq == "always" else "passthrough")
            frames = frames_to(GUEST_MAC, count, seed=1)
            assert_same(await loopback(driver, frames), frames)
            bases = await fe.qemu72_stop(driver)
            assert_exact_bases(bases, driver)
            assert bases[1] == count % 65536


@pytest.mark.parametrize("svq", ["never", "always"])
async def test_traffic_right_after_start_is_not_lost(
    device: str, sock_path: str, mem: GuestMemory, device_mac_kept: None, svq: str
) -> None:
    """A guest queues frames and kicks as soon as QEMU's start messages are out, while the proxy may still be
    configuring the device (the last messages have no reply). vdpa_sim_net looks at a ring only when kicked,
    so a kick that lands during that window must not be lost: every frame still comes back."""
    async with running_proxy(sock_path, device, svq=svq) as session:
        driver = VirtioNetDriver(mem, queue_size=min(RING, session.info.ring_max))
        driver.post_rx_buffers()  # a guest's RX buffers are there before DRIVER_OK
        async with await connect_and_start(sock_path, driver, settled=False) as fe:
            frames = frames_to(BROADCAST, WINDOW, seed=7)  # broadcast: whatever MAC the filter has
            assert_same(await loopback(driver, frames), frames)
            assert_exact_bases(await fe.qemu72_stop(driver), driver)


MAC_CASES = [("--mac", "never"), ("--mac", "always"), ("send_rarp", "never"), ("send_rarp", "always"), ("tx", "always")]


@pytest.mark.parametrize(("source", "svq"), MAC_CASES, ids=[f"{s}-{m}" for s, m in MAC_CASES])
async def test_proxy_programs_the_guest_mac_through_the_cvq(
    device: str, sock_path: str, mem: GuestMemory, device_mac_kept: None, svq: str, source: str
) -> None:
    """The guest's MAC, from --mac, from a SEND_RARP that arrives before the rings (QEMU's order on a
    migration destination) or learned from the guest's own frames (SVQ only), is set with MAC_ADDR_SET on the
    device's CVQ: traced, in the device config, and the device's unicast filter now passes frames to it and
    drops frames to its old MAC."""
    mac = NEW_MAC if source == "--mac" else GUEST_MAC
    kw = {"mac": mac} if source == "--mac" else {}
    expected_mode = "svq" if svq == "always" else "passthrough"
    async with running_proxy(sock_path, device, svq=svq, **kw) as session:
        old_mac = session.info.mac
        assert old_mac != mac, "pick a MAC the device does not already have"
        driver = VirtioNetDriver(mem, queue_size=min(RING, session.info.ring_max))
        with capture_logs() as logs:
            fe = await VhostUserFrontend.connect(sock_path, reply_timeout=TIMEOUT)
            async with fe:
                await fe.qemu72_connect()
                if source == "send_rarp":
                    await fe.request(Req.SEND_RARP, Rarp(mac))
                # RX buffers ready before the rings start, as on a migration destination: the device drops what
                # it cannot place, and the announcement goes out as soon as TX runs.
                driver.post_rx_buffers()
                await fe.qemu72_start(driver)
                await settle(fe)
                if source == "send_rarp":
                    await check_announcement(session, driver, logs, mac, expected_mode)
                elif source == "tx":
                    hello = make_frame(64, 500, dst=BROADCAST, src=mac)
                    assert_same(await loopback(driver, [hello]), [hello])
                    await wait_for_mac_set(logs, mac)
                assert mode(session) == expected_mode
                check_cvq_trace(session, logs, mac)

                # to the new MAC: all through, byte for byte
                frames = frames_to(mac, 40, seed=2)
                assert_same(await loopback(driver, frames), frames)
                # to the old MAC: filtered; the broadcast fence behind them shows they are not merely late
                dropped = frames_to(old_mac, 8, seed=3, first_seq=1000)
                fence = make_frame(100, 2000, dst=BROADCAST)
                driver.post_rx_buffers()
                assert driver.send([*dropped, fence]) == len(dropped) + 1
                # The device handles TX in order on one queue pair: anything it passed of what was sent before the
                # fence arrives before it, so the fence proves the drop without a timed wait.
                assert await receive_until(driver, lambda got: fence in got) == [fence]
                assert_exact_bases(await fe.qemu72_stop(driver), driver)


async def wait_for_mac_set(logs: list[dict[str, Any]], mac: bytes) -> None:
    def done() -> bool:
        return any(e["event"] == "cvq_command" and e["args"] == {"mac": mac.hex(":")} for e in logs)

    with trio.move_on_after(TIMEOUT):
        while not done():
            await trio.sleep(0.01)
    assert done(), f"the proxy did not program {mac.hex(':')}, the source MAC of the guest's frames"


def check_cvq_trace(session: DeviceSession, logs: list[dict[str, Any]], mac: bytes) -> None:
    setups = [e for e in logs if e["event"] == "cvq_setup"]
    assert setups, "the proxy did not set up the device's CVQ"
    dev = session.device
    if dev.get_backend_features() & BackendF.IOTLB_ASID and dev.get_as_num() >= 2 and dev.get_groups_num() >= 2:
        # vdpa_sim_net's CVQ has a group of its own: the proxy gives it its own address space, as QEMU does
        assert setups[-1]["asid"] == 1, setups
    commands = [e for e in logs if e["event"] == "cvq_command"]
    mac_sets = [e for e in commands if (e["cls"], e["cmd"]) == ("MAC", "ADDR_SET")]
    assert mac_sets, f"no MAC_ADDR_SET on the CVQ; commands: {commands}"
    assert mac_sets[-1]["args"] == {"mac": mac.hex(":")} and mac_sets[-1]["ack"] == "ok", mac_sets
    assert dev.get_config(0, 6) == mac, "the device's config space does not show the programmed MAC"


@pytest.mark.parametrize("svq", ["never", "always"])
async def test_stop_with_frames_in_flight_returns_exact_bases(
    device: str, sock_path: str, mem: GuestMemory, device_mac_kept: None, svq: str
) -> None:
    """QEMU stops the back-end while TX is still queued: the proxy suspends the device and answers
    GET_VRING_BASE with exactly what was completed; restarted at those bases, the rest goes out, so every
    frame arrives exactly once."""
    async with running_proxy(sock_path, device, svq=svq) as session:
        driver = VirtioNetDriver(mem, queue_size=min(RING, session.info.ring_max))
        async with await connect_and_start(sock_path, driver) as fe:
            # As many as fit the TX ring at once (up to 4 descriptors each), well under the RX buffers posted
            frames = frames_to(BROADCAST, RING // 4, seed=4)
            driver.post_rx_buffers()
            with capture_logs() as logs:
                assert driver.send(frames) == len(frames)
                bases = await fe.qemu72_stop(driver)
            # vdpa_sim_net offers SUSPEND (Linux 6.0+) and the proxy acked it, so the stop suspended the device
            assert session.info.backend_features & BackendF.SUSPEND
            assert not [e for e in logs if e["event"] in ("suspend_failed", "get_vring_base_failed")], logs
            assert_exact_bases(bases, driver)
            assert bases[1] <= driver.tx().last_avail
            received = driver.receive(refill=False)
            assert received == frames[: bases[0]]

            # restarted as QEMU does (no settling): what was still queued goes out now
            await fe.qemu72_start(driver, bases=bases)
            pending = len(frames) - len(received)
            received += await receive_until(driver, lambda got: len(got) >= pending)
            assert_same(received, frames)
            bases = await fe.qemu72_stop(driver)
            assert_exact_bases(bases, driver)
            assert bases[1] == len(frames)


def device_writable_pages(mem: GuestMemory, driver: VirtioNetDriver) -> set[int]:
    """Pages the device may write, from what the driver published: every used ring, and every buffer of a
    writable descriptor in the rings' descriptor tables (the driver uses no indirect tables on RX)."""
    pages: set[int] = set()

    def span(gpa: int, size: int) -> None:
        pages.update(range(gpa // PAGE, (gpa + size - 1) // PAGE + 1))

    for vq in driver.vqs:
        span(vq.used_gpa, used_ring_size(vq.num))
        table = mem.read(vq.desc_gpa, DESC_SIZE * vq.num)
        for addr, length, flags, _next in struct.iter_unpack("<QIHH", table):
            if flags & VRING_DESC_F_WRITE and length:
                span(addr, length)
    return pages


def changed_pages(mem: GuestMemory, before: bytes) -> set[int]:
    now = mem.buf
    changed: set[int] = set()
    for r in mem.regions:
        for off in range(r.mmap_offset, r.mmap_offset + r.size, PAGE):
            if now[off : off + PAGE] != before[off : off + PAGE]:
                changed.add((r.gpa + off - r.mmap_offset) // PAGE)
    return changed


async def test_dirty_log_covers_every_page_the_device_wrote(
    device: str, sock_path: str, mem: GuestMemory, device_mac_kept: None
) -> None:
    """QEMU's migration start on the source (SET_LOG_BASE, SET_FEATURES with LOG_ALL, ring addresses with the
    log flag): the proxy switches the device to SVQ, and every guest page the device changed afterwards (RX
    buffers, used rings) is marked in the dirty log."""
    async with running_proxy(sock_path, device, svq="auto") as session:
        driver = VirtioNetDriver(mem, queue_size=min(RING, session.info.ring_max), features=NATIVE)
        async with await connect_and_start(sock_path, driver) as fe:
            assert mode(session) == "passthrough"
            warmup = frames_to(BROADCAST, 50, seed=5)  # the SVQ may learn and program the guest MAC
            assert_same(await loopback(driver, warmup), warmup)

            log = await fe.migration_start(driver)
            # SET_VRING_ADDR with the log flag has no reply: what follows must be logged under the full
            # migration set-up, not race it.
            await settle(fe)
            assert mode(session) == "svq", "logging on, but the proxy did not switch to its shadow rings"
            log.clear()  # pages written before logging began are not the question
            driver.post_rx_buffers()
            before = bytes(mem.buf)

            frames = frames_to(BROADCAST, RING + 44, seed=6, first_seq=100)
            assert_same(await loopback(driver, frames), frames)
            bases = await fe.qemu72_stop(driver)  # switch-over: the log is final once the bases are read
            assert_exact_bases(bases, driver)

            written = changed_pages(mem, before) & device_writable_pages(mem, driver)
            dirty = log.dirty_pages()
            used_pages = {vq.used_gpa // PAGE for vq in driver.vqs}
            assert driver.rx().used_gpa // PAGE in written, "the RX used ring did not change"
            assert written - used_pages, "no RX buffer page changed: the test exercised nothing"
            missing = sorted(written - dirty)
            assert not missing, f"{len(missing)} page(s) the device wrote are not in the dirty log: {missing[:20]}"
            guest_pages = {p for r in mem.regions for p in range(r.gpa // PAGE, (r.gpa + r.size) // PAGE)}
            assert dirty <= guest_pages, f"dirty bits outside guest memory: {sorted(dirty - guest_pages)[:20]}"


async def test_vdpa_sim_net_features_reach_the_front_end(device: str, sock_path: str) -> None:
    """What vdpa_sim_net offers (the device-facing bits the proxy keeps, ring size 256) shapes what the
    front-end sees: the CVQ and ACCESS_PLATFORM stay with the proxy."""
    async with running_proxy(sock_path, device) as session:
        info = session.info
        assert info.features & NetF.CTRL_VQ and info.features & NetF.ACCESS_PLATFORM, hex(info.features)
        assert info.ring_max == RING
        fe = await VhostUserFrontend.connect(sock_path, reply_timeout=TIMEOUT)
        async with fe:
            await fe.qemu72_connect()
            offered = fe.offered_features
            assert offered is not None
            assert offered & NetF.VERSION_1 and offered & NetF.MAC
            assert not offered & (NetF.CTRL_VQ | NetF.ACCESS_PLATFORM | NetF.CTRL_MAC_ADDR)
