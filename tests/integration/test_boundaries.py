"""The guest (and the front-end) can never make the device or the proxy touch memory outside what it was given.

Guest memory here is a 32 MiB memfd of which the memory table declares only the first 16 MiB; the rest is
filled with a canary pattern. The device and the proxy receive the whole fd, so a bounds check that is off, a
mapping that is too large or a descriptor followed blindly would show up as a changed canary (or as frames
carrying canary bytes). Every way in is tried, in passthrough and SVQ mode: descriptors outside memory or
straddling its end, an indirect table outside it, huge lengths, rings placed outside or across regions, a dirty
log too small for guest memory. Each must end in a reported fault (a broken vq or a rejected request), with the
canary intact and the daemon serving the next front-end normally.

Then the resource caps (regions, queues, ring size, message size) and the socket's permissions and ownership.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import grp
import mmap
import os
import shutil
import socket
import stat
import struct
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from vduproxy.testing.frontend import BackendRejected, FrontendError, VhostUserFrontend
from vduproxy.testing.guest import GuestMemory, VirtioNetDriver, make_frame
from vduproxy.testing.inproc import current_session, running_proxy
from vduproxy.testing.procs import short_socket_path
from vduproxy.testing.proxy import open_proxy
from vduproxy.testing.traffic import Pump
from vduproxy.vhost_user.wire import REQUEST_FLAGS, LogArea, Req, VringAddr, VringState, build_header
from vduproxy.virtio import VHOST_F_LOG_ALL, NetF
from vduproxy.vring import Buf

pytestmark = pytest.mark.integration

MB = 1 << 20
FD_SIZE = 32 * MB
DECLARED = 16 * MB  # what the memory table says the guest has
CANARY = 0xA5
RX, TX = 0, 1
MODES = ["never", "always"]


@contextlib.contextmanager
def canaried_memory() -> Iterator[GuestMemory]:
    """Guest memory whose memfd goes on past the declared region, the excess filled with the canary."""
    with GuestMemory(FD_SIZE) as mem:
        mem.regions = (dataclasses.replace(mem.regions[0], size=DECLARED),)
        mem.buf[DECLARED:] = bytes([CANARY]) * (FD_SIZE - DECLARED)
        yield mem


def canary_intact(mem: GuestMemory) -> bool:
    return bytes(mem.buf[DECLARED:]).count(CANARY) == FD_SIZE - DECLARED


async def started(path: str, mem: GuestMemory) -> tuple[VhostUserFrontend, VirtioNetDriver]:
    fe = await VhostUserFrontend.connect(path)
    driver = VirtioNetDriver(mem, queue_size=256)
    await fe.qemu72_connect()
    await fe.qemu72_start(driver)
    await fe.get_u64(Req.GET_FEATURES)  # a round trip: the daemon has applied the whole set-up
    return fe, driver


def fault_of(session: Any, vq: int) -> str | None:
    """Why vq is stopped, as the daemon or the device reports it: a device fault or a broken shadow vq."""
    dev_error = session.device.vq_stats(vq).error
    if dev_error:
        return f"device: {dev_error}"
    q = session.stats()["queues"].get(vq, {})
    if q.get("broken"):
        dp = session.active()
        return f"svq: {dp.svq.error(vq) if dp is not None and dp.svq is not None else 'broken'}"
    return None


async def wait_fault(session: Any, vq: int) -> str:
    with trio.move_on_after(10):
        while (why := fault_of(session, vq)) is None:
            await trio.sleep(0.01)
        return why
    raise AssertionError(f"no fault reported on vq {vq}: {session.stats()} {session.device.vq_stats(vq)}")


async def serves_normally(path: str, session: Any) -> None:
    """The daemon takes a fresh front-end and carries its traffic byte for byte."""
    with trio.fail_after(20):
        while session.active() is not None:
            await trio.sleep(0.01)
    with GuestMemory(16 * MB) as mem:
        fe, driver = await started(path, mem)
        try:
            pump = Pump(driver, 300, seed=1, max_size=1514)
            await pump.run(timeout=60)
            pump.check()
        finally:
            await fe.aclose()
            driver.close()


def kick(driver: VirtioNetDriver, vq: int) -> None:
    ring = driver.vqs[vq].ring
    ring.publish()
    os.eventfd_write(driver.vqs[vq].kick_fd, 1)


@dataclasses.dataclass(frozen=True)
class Hostile:
    name: str
    vq: int
    bufs: tuple[Buf, ...]
    indirect_at: int | None = None  # the ring descriptor points at an indirect table at this GPA


HOSTILE = [
    Hostile("tx_just_past_memory", TX, (Buf(DECLARED, 600),)),
    Hostile("tx_straddling_the_end", TX, (Buf(DECLARED - 100, 600),)),
    Hostile("tx_far_outside", TX, (Buf(1 << 40, 600),)),
    Hostile("tx_address_wraps", TX, (Buf((1 << 64) - 256, 600),)),
    Hostile("tx_huge_length", TX, (Buf(0x10000, 0xFFFF_FFFF),)),
    Hostile("tx_indirect_table_outside", TX, (Buf(0x10000, 12), Buf(0x10000 + 12, 100)), indirect_at=DECLARED),
    Hostile("rx_just_past_memory", RX, (Buf(DECLARED, 2048, writable=True),)),
    Hostile("rx_straddling_the_end", RX, (Buf(DECLARED - 512, 2048, writable=True),)),
    Hostile("rx_far_outside", RX, (Buf(1 << 40, 2048, writable=True),)),
]


@pytest.mark.parametrize("svq", MODES)
@pytest.mark.parametrize("case", HOSTILE, ids=[h.name for h in HOSTILE])
async def test_descriptors_outside_guest_memory_are_refused(
    proxy_at: Callable[..., Any], sock_path: str, case: Hostile, svq: str
) -> None:
    async with proxy_at("sim:profile=rich", svq=svq):
        session: Any = current_session()
        with canaried_memory() as mem:
            fe, driver = await started(sock_path, mem)
            try:
                if case.vq == TX:  # the rings work before the hostile chain arrives
                    pump = Pump(driver, 100, seed=2, max_size=1514)
                    await pump.run(timeout=60)
                    pump.check()
                # (on RX the hostile buffer must be the first the device finds: no traffic before it)
                ring = driver.vqs[case.vq].ring
                if case.indirect_at is None:
                    ring.add(list(case.bufs), "hostile")
                else:
                    scratch = memoryview(bytearray(16 * len(case.bufs)))
                    ring.add(list(case.bufs), "hostile", indirect_at=(scratch, case.indirect_at))
                kick(driver, case.vq)
                if case.vq == RX:  # something must arrive for the device to use the RX buffer
                    driver.send([make_frame(1000, 10_000)])
                why = await wait_fault(session, case.vq)
                print(f"\n{case.name} [{svq}]: {why}")
                assert canary_intact(mem), "memory outside the memory table was written"
                got = driver.receive(0, refill=False) if case.vq == TX else []
                assert not any(bytes([CANARY]) * 64 in frame for frame in got), "canary bytes were read and sent"
            finally:
                await fe.aclose()
                driver.close()
        await serves_normally(sock_path, session)


SHARED_AS_PROFILE = """
description = "a control queue but one address space: the proxy's CVQ memory shares the guest's IOVA space"
features = ["VERSION_1", "ACCESS_PLATFORM", "MAC", "MTU", "ANY_LAYOUT", "MRG_RXBUF", "CTRL_VQ", "CTRL_MAC_ADDR"]
backend_features = ["IOTLB_MSG_V2", "IOTLB_BATCH", "SUSPEND", "RESUME"]
address_spaces = 1
cvq_own_group = false
"""


async def test_passthrough_maps_no_proxy_memory_the_guest_could_reach(
    proxy_at: Callable[..., Any], sock_path: str, tmp_path: Path
) -> None:
    """On a device whose CVQ shares ASID 0 with the data queues, passthrough would put the proxy's CVQ ring and
    buffers where a guest descriptor can point: the proxy does not map them at all in passthrough."""
    profile = tmp_path / "shared-as.toml"
    profile.write_text(SHARED_AS_PROFILE)
    async with proxy_at(f"sim:profile={profile}", svq="never"):
        session: Any = current_session()
        with GuestMemory(16 * MB) as mem:
            fe, driver = await started(sock_path, mem)
            try:
                dp = session.active()
                assert dp is not None and not dp.shadow_active
                assert dp.cvq is None, "no proxy memory may sit in the guest's address space in passthrough"
            finally:
                await fe.aclose()
                driver.close()


@pytest.mark.parametrize("persist", [True, False], ids=["iotlb-persist", "no-persist"])
async def test_mode_switches_keep_the_guests_address_space_exact(
    proxy_at: Callable[..., Any], sock_path: str, tmp_path: Path, persist: bool
) -> None:
    """Maps kept across resets (IOTLB_PERSIST) must never leave proxy memory in the guest's address space: after
    any number of switches, passthrough has exactly the guest's regions in ASID 0, the SVQ adds only its shadow
    area and (one address space) its CVQ; guest memory is mapped once, not per switch; a finished front-end
    leaves no map behind."""
    from vduproxy.testing.guest import GUEST_MAC

    profile = tmp_path / "shared-as.toml"
    text = SHARED_AS_PROFILE
    if persist:
        text = text.replace('"RESUME"]', '"RESUME", "IOTLB_PERSIST"]')
    profile.write_text(text)
    async with proxy_at(f"sim:profile={profile}", svq="auto", mac=GUEST_MAC):
        session: Any = current_session()
        dev = session.device
        updates: list[int] = []
        real_update = dev.iotlb_update

        def counting_update(iova: int, size: int, uaddr: int, perm: Any, asid: int = 0) -> None:
            updates.append(iova)
            real_update(iova, size, uaddr, perm, asid)

        dev.iotlb_update = counting_update
        with GuestMemory(16 * MB, regions=2) as mem:
            fe = await VhostUserFrontend.connect(sock_path)
            # only what the device has: anything else would need the SVQ and no passthrough could be asked for
            driver = VirtioNetDriver(mem, queue_size=256, features=NetF.VERSION_1 | NetF.MRG_RXBUF)
            await fe.qemu72_connect()
            await fe.qemu72_start(driver)
            await fe.get_u64(Req.GET_FEATURES)
            try:
                dp = session.active()
                regions = {r.gpa for r in dp.mem.regions}
                assert len(regions) == 2
                for i in range(8):
                    await dp.force_mode(i % 2 == 0)
                    if dp.shadow_active:
                        # regions + shadow area + the CVQ (one address space: it can only live in ASID 0)
                        assert dev.iotlb_map_count(0) == len(regions) + 2
                    else:
                        assert dev.iotlb_map_count(0) == len(regions), "proxy memory left where the guest reaches"
                        assert dp.cvq is None
                guest_maps = [iova for iova in updates if iova in regions]
                if persist:
                    assert len(guest_maps) == len(regions), "guest memory was mapped again on a mode switch"
                else:
                    assert len(guest_maps) > len(regions)  # each reset dropped them: mapped again every time
                driver.send([make_frame(200, 1)])
                with trio.fail_after(10):
                    assert (await driver.receive_frames(1))[0] == make_frame(200, 1), "loopback after the switches"
            finally:
                await fe.aclose()
                driver.close()
            with trio.fail_after(10):
                while session.active() is not None:
                    await trio.sleep(0.01)
            assert dev.iotlb_map_count(0) == 0, "a finished front-end left maps in the device"


@pytest.mark.parametrize("direction", ["tx_reads", "rx_writes"])
async def test_guest_cannot_reach_the_proxys_cvq_memory(
    proxy_at: Callable[..., Any], sock_path: str, tmp_path: Path, direction: str
) -> None:
    """When the proxy needs that device's CVQ (here: to program --mac) it runs the SVQ, which checks every guest
    address: a descriptor aimed at the CVQ's IOVA is refused, never forwarded."""
    from vduproxy.testing.guest import GUEST_MAC

    profile = tmp_path / "shared-as.toml"
    profile.write_text(SHARED_AS_PROFILE)
    async with proxy_at(f"sim:profile={profile}", svq="auto", mac=GUEST_MAC):
        session: Any = current_session()
        with GuestMemory(16 * MB) as mem:
            fe, driver = await started(sock_path, mem)
            try:
                dp = session.active()
                assert dp is not None and dp.cvq is not None and dp.shadow_active
                target = dp.cvq.iova  # proxy memory: the CVQ ring and its command buffers
                vq = TX if direction == "tx_reads" else RX
                if direction == "tx_reads":
                    driver.post_rx_buffers(0)
                    driver.tx(0).ring.add([Buf(target, 600)], "hostile")
                    kick(driver, TX)
                else:
                    driver.rx(0).ring.add([Buf(target, 2048, writable=True)], "hostile")
                    kick(driver, RX)
                    driver.send([make_frame(1000, 1)])
                with trio.fail_after(20):
                    while dp.svq.error(vq) is None:
                        assert driver.vqs[vq].used_idx == 0, "a descriptor into proxy memory was used"
                        await trio.sleep(0.01)
                assert "outside" in dp.svq.error(vq) or "region" in dp.svq.error(vq), dp.svq.error(vq)
            finally:
                await fe.aclose()
                driver.close()


def _addr(vq: Any, **override: int) -> VringAddr:
    parts = {"desc": vq.desc_uva, "used": vq.used_uva, "avail": vq.avail_uva, **override}
    return VringAddr(vq.index, 0, parts["desc"], parts["used"], parts["avail"], vq.used_gpa)


RING_PLACEMENTS: dict[str, Callable[[GuestMemory, Any], VringAddr]] = {
    "desc_outside_every_region": lambda mem, vq: _addr(vq, desc=mem.regions[-1].uva + mem.regions[-1].size + 4096),
    "used_straddling_the_end": lambda mem, vq: _addr(vq, used=mem.regions[-1].uva + mem.regions[-1].size - 8),
    # the two regions are contiguous in the front-end's address space but not in GPA: a ring across them is not
    # contiguous guest memory
    "avail_across_two_regions": lambda mem, vq: _addr(vq, avail=mem.regions[1].uva - 4),
    "desc_below_every_region": lambda mem, vq: _addr(vq, desc=mem.regions[0].uva - 4096),
}


@pytest.mark.parametrize("svq", MODES)
@pytest.mark.parametrize("placement", list(RING_PLACEMENTS))
async def test_rings_outside_or_across_regions_are_rejected(
    proxy_at: Callable[..., Any], sock_path: str, placement: str, svq: str
) -> None:
    async with proxy_at("sim:profile=rich", svq=svq):
        session: Any = current_session()
        with GuestMemory(32 * MB, regions=2) as mem:
            fe = await VhostUserFrontend.connect(sock_path)
            driver = VirtioNetDriver(mem, queue_size=256)
            try:
                await fe.qemu72_connect()
                driver.negotiate(fe.offered_features or 0)
                await fe.set_features(fe._wire_features(driver))
                await fe.set_mem_table(driver.mem, need_reply=True)
                await fe.setup_vq(driver.rx(0), 0)
                tx = driver.tx(0)
                await fe.request(Req.SET_VRING_NUM, VringState(TX, tx.num))
                await fe.request(Req.SET_VRING_BASE, VringState(TX, 0))
                with capture_logs() as logs, pytest.raises(BackendRejected):
                    await fe.request(Req.SET_VRING_ADDR, RING_PLACEMENTS[placement](mem, tx), need_reply=True)
                assert any(e["event"] == "vring_error" and "not in guest memory" in e["reason"] for e in logs), logs
                await fe.set_vring_fd(Req.SET_VRING_KICK, TX, tx.kick_fd)
                await fe.set_vring_fd(Req.SET_VRING_CALL, TX, tx.call_fd)
                for vq in (RX, TX):
                    await fe.set_vring_enable(vq, True)
                await fe.get_u64(Req.GET_FEATURES)  # a round trip: everything before it was handled
                # the ring with the bad address never reached the device
                assert TX not in session.stats()["queues"]
                # QEMU's way back is the full ring set-up again, with a good address: then it runs
                await fe.setup_vq(tx, 0)
                pump = Pump(driver, 200, seed=3, max_size=1514)
                await pump.run(timeout=60)
                pump.check()
            finally:
                await fe.aclose()
                driver.close()


async def test_dirty_log_too_small_for_guest_memory(proxy_at: Callable[..., Any], sock_path: str) -> None:
    """8 bytes of log cover 256 KiB of guest memory; the guest's rings and buffers lie above that. The log fd is two
    pages, the rest of it a canary: nothing past the declared size may change."""
    declared, fd_size = 8, 2 * mmap.PAGESIZE
    async with proxy_at("sim:profile=rich", svq="auto"):
        session: Any = current_session()
        with GuestMemory(32 * MB) as mem:
            mem.alloc(MB)  # the rings and buffers go above the first MiB: past what 8 bytes of log cover
            fe, driver = await started(sock_path, mem)
            log_fd = os.memfd_create("small-log", os.MFD_CLOEXEC)
            try:
                os.ftruncate(log_fd, fd_size)
                log = mmap.mmap(log_fd, fd_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                rejected = False
                try:
                    reply = await fe.request(Req.SET_LOG_BASE, LogArea(declared, 0), fds=[log_fd])
                    assert reply is not None
                    reply.fds.close_rest()
                    rejected = reply.u64 != 0
                except BackendRejected:
                    rejected = True
                if not rejected:
                    await fe.set_features(fe._wire_features(driver, VHOST_F_LOG_ALL))
                    for vq in (driver.rx(0), driver.tx(0)):
                        await fe.set_vring_addr(vq, log=True)
                    # QEMU 7.2 waits for the back-end after a SET_VRING_ADDR with the log flag (a reply, or a
                    # GET_FEATURES round trip): from then on it relies on the log
                    await fe.get_u64(Req.GET_FEATURES)
                    driver.post_rx_buffers(0)
                    driver.send([make_frame(1000, i) for i in range(8)])
                    why = await wait_fault(session, RX)
                    print(f"\nlog too small: {why}")
                    assert "log" in why
                else:
                    print("\nlog too small: SET_LOG_BASE rejected")
                assert log[declared:] == bytes(fd_size - declared), "bytes past the declared log were written"
                log.close()
            finally:
                os.close(log_fd)
                await fe.aclose()
                driver.close()
        await serves_normally(sock_path, session)


# --- resource caps ------------------------------------------------------------------------------------------


async def raw_exchange(path: str, data: bytes, fds: list[int] | None = None) -> bytes:
    """Send raw bytes (+fds); return whatever comes back until the server closes the connection."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        await sock.connect(path)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        await sock.sendmsg([data], anc)
        out = b""
        with trio.fail_after(20):
            while chunk := await sock.recv(4096):
                out += chunk
        return out


async def test_caps_on_regions_queues_ring_size_and_message_size(tmp_path: Path) -> None:
    profile = tmp_path / "big.toml"
    profile.write_text(
        'features = ["VERSION_1", "ACCESS_PLATFORM", "MAC", "MQ", "CTRL_VQ"]\n'
        'backend_features = ["IOTLB_MSG_V2", "IOTLB_BATCH", "SUSPEND"]\nqueue_pairs = 2\nring_max = 32768\n'
    )
    path = str(tmp_path / "caps.sock")

    async with running_proxy(path, f"sim:profile={profile}"):
        session: Any = current_session()
        # ring size: 32768 is the largest split ring; 65536 and a non-power of two are refused
        fe = await VhostUserFrontend.connect(path)
        async with fe:
            await fe.qemu72_connect(pairs=2)
            assert fe.queue_num == 2
            await fe.request(Req.SET_VRING_NUM, VringState(0, 32768), need_reply=True)
            for bad in (65536, 3, 0):
                with pytest.raises(BackendRejected):
                    await fe.request(Req.SET_VRING_NUM, VringState(0, bad), need_reply=True)
            # queues: a vring index beyond the pairs offered ends the connection with a protocol error
            with capture_logs() as logs, pytest.raises(FrontendError):
                await fe.request(Req.SET_VRING_NUM, VringState(4, 256), need_reply=True)
            assert any(e["event"] == "vhost_user_protocol_error" for e in logs), logs
        # regions: 9 in one memory table (8 is the protocol's maximum); message size: a body over the limit
        fds = [os.memfd_create("r", os.MFD_CLOEXEC) for _ in range(9)]
        try:
            for fd in fds:
                os.ftruncate(fd, MB)
            regions = b"".join(struct.pack("<QQQQ", i * MB, MB, 0x7F00_0000_0000 + i * MB, 0) for i in range(9))
            body = struct.pack("<II", 9, 0) + regions
            for data, fd_list, reason in (
                (build_header(Req.SET_MEM_TABLE, REQUEST_FLAGS, len(body)) + body, fds, "regions"),
                (build_header(Req.SET_FEATURES, REQUEST_FLAGS, 1 << 20), [], "limit"),
            ):
                with trio.fail_after(30):
                    while session.active() is not None:
                        await trio.sleep(0.01)
                with capture_logs() as logs:
                    assert await raw_exchange(path, data, fd_list) == b""
                    with trio.fail_after(20):
                        while not any(e["event"] == "connection_closed" for e in logs):
                            await trio.sleep(0.01)
                errors = [e for e in logs if e["event"] == "vhost_user_protocol_error"]
                assert errors and reason in str(errors[0]), logs
        finally:
            for fd in fds:
                os.close(fd)


# --- socket permissions -------------------------------------------------------------------------------------


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A short directory others may traverse, so only the socket's own mode decides who connects."""
    d = Path(tempfile.mkdtemp(prefix="vdup-b-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def connect_as_nobody(path: Path) -> str:
    """Try to connect as uid/gid nobody/nogroup (a separate process); 'ok' or the error's name."""
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[1]); print('ok')\n"
        "except OSError as e:\n    print(type(e).__name__)\n"
    )
    res = await trio.run_process(
        ["/usr/bin/python3", "-c", code, str(path)], user="nobody", group="nogroup", extra_groups=[],
        capture_stdout=True, check=True,
    )  # fmt: skip
    return res.stdout.decode().strip()


@contextlib.asynccontextmanager
async def daemon(sock: Path, *args: str) -> AsyncIterator[Any]:
    async with open_proxy(short_socket_path(sock), "sim:profile=rich", list(args)) as proxy:
        yield proxy


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another user")
async def test_socket_is_0600_and_owned_by_the_daemon_user_by_default(open_dir: Path) -> None:
    sock = open_dir / "vdu.sock"
    async with daemon(sock):
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
        assert await connect_as_nobody(sock) == "PermissionError"


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another user")
async def test_socket_group_and_mode_let_that_group_in(open_dir: Path) -> None:
    sock = open_dir / "vdu.sock"
    nogroup = grp.getgrnam("nogroup").gr_gid
    async with daemon(sock, "--socket-group", "nogroup", "--socket-mode", "0660"):
        st = os.stat(sock)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert (st.st_uid, st.st_gid) == (os.getuid(), nogroup)
        assert await connect_as_nobody(sock) == "ok"
    # --socket-group alone keeps the safe mode: the group owns the socket but cannot use it until a mode says so
    async with daemon(sock, "--socket-group", "nogroup"):
        st = os.stat(sock)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o600, nogroup)
        assert await connect_as_nobody(sock) == "PermissionError"


async def test_unknown_socket_group_is_a_clear_startup_error(open_dir: Path) -> None:
    sock = open_dir / "vdu.sock"
    async with open_proxy(sock, "sim", ["--socket-group", "no-such-group-vdup"], wait_listening=False) as proxy:
        with trio.fail_after(60):
            while proxy.proc.running:
                await trio.sleep(0.05)
        assert proxy.proc.returncode != 0
        assert "no-such-group-vdup" in proxy.proc.output.text()
    assert not sock.exists()
