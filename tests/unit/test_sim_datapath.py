"""Data path of the software vDPA device, driven like a real driver would: rings in a memfd, reached only
through the IOTLB, with vduproxy.vring.SplitRingDriver playing the driver."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import pathlib
import select
import struct
import time
from collections.abc import Iterator

import pytest

from vduproxy.vdpa.device import BackendF, DeviceError, Perm
from vduproxy.vdpa.sim import SimDevice
from vduproxy.virtio import VIRTIO_NET_HDR_LEN, NetF, Status
from vduproxy.vring import Buf, RingLayout, SplitRingDriver

pytestmark = pytest.mark.unit

IOVA = 0x4000_0000
MEM_SIZE = 4 << 20
WAIT_S = 10.0  # upper bound for the native thread to react; never reached when things work


def wait_readable(fd: int, what: str) -> None:
    r, _, _ = select.select([fd], [], [], WAIT_S)
    assert r, f"{what}: fd never became readable"


def drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def wait_until(pred: object, what: str) -> None:
    assert callable(pred)
    deadline = time.monotonic() + WAIT_S
    while not pred():
        assert time.monotonic() < deadline, f"{what} did not happen"
        time.sleep(0.001)


class Guest:
    """A driver for one SimDevice: one memfd mapped RW at IOVA, rings and buffers carved from it."""

    def __init__(
        self,
        dev: SimDevice,
        features: int | None = None,
        num: int = 64,
        asid_of_cvq: int = 0,
        backend: int | None = None,
    ) -> None:
        self.dev = dev
        self.fd = os.memfd_create("sim-test")
        os.ftruncate(self.fd, 2 * MEM_SIZE)
        self.mm = mmap.mmap(self.fd, 2 * MEM_SIZE)
        self.mv = memoryview(self.mm)
        anchor = ctypes.c_char.from_buffer(self.mm)
        self.uaddr = ctypes.addressof(anchor)
        del anchor
        self.next_off = 0
        self.rings: dict[int, SplitRingDriver] = {}
        self.kick: dict[int, int] = {}
        self.call: dict[int, int] = {}
        offered = dev.get_features()
        if features is None:
            features = offered
        self.features = features & offered
        self.hdr = VIRTIO_NET_HDR_LEN
        if backend is None:
            backend = dev.get_backend_features() & ~BackendF.IOTLB_PERSIST
        dev.set_backend_features(backend)
        dev.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
        dev.set_features(self.features)
        dev.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        assert dev.get_status() & Status.FEATURES_OK
        # the first half of the memfd is ASID 0, the second half ASID 1 (the CVQ's group, when moved)
        dev.iotlb_update(IOVA, MEM_SIZE, self.uaddr, Perm.RW, asid=0)
        self.cvq = dev.get_vqs_count() - 1 if self.features & NetF.CTRL_VQ else -1
        if asid_of_cvq:
            dev.set_group_asid(dev.get_vring_group(self.cvq), asid_of_cvq)
            dev.iotlb_update(IOVA, MEM_SIZE, self.uaddr + MEM_SIZE, Perm.RW, asid=asid_of_cvq)
        self.cvq_off = MEM_SIZE if asid_of_cvq else 0
        self.cvq_next = self.cvq_off
        event_idx = bool(self.features & NetF.RING_EVENT_IDX)
        for vq in range(dev.get_vqs_count()):
            if vq == self.cvq and not self.features & NetF.CTRL_VQ:
                continue
            base = self.cvq_off if vq == self.cvq else 0
            layout = RingLayout.for_num(num, base_off=self.alloc(RingLayout.for_num(num).size, cvq=vq == self.cvq))
            ring = SplitRingDriver(self.mv, layout, IOVA - base, event_idx=event_idx)
            self.rings[vq] = ring
            dev.set_vring_num(vq, num)
            dev.set_vring_addr(vq, ring.desc_addr, ring.avail_addr, ring.used_addr)
            dev.set_vring_base(vq, 0)
            self.kick[vq] = os.eventfd(0, os.EFD_NONBLOCK)
            self.call[vq] = os.eventfd(0, os.EFD_NONBLOCK)
            dev.set_vring_kick(vq, self.kick[vq])
            dev.set_vring_call(vq, self.call[vq])
            dev.set_vring_enable(vq, True)

    def start(self) -> None:
        self.dev.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)
        assert self.dev.get_status() & Status.DRIVER_OK

    def alloc(self, size: int, *, cvq: bool = False) -> int:
        """Offset (into mm) of a fresh 64-byte aligned area."""
        if cvq and self.cvq_off:
            off = self.cvq_next
            self.cvq_next = (off + size + 63) & ~63
            return off
        off = self.next_off
        self.next_off = (off + size + 63) & ~63
        assert self.next_off <= MEM_SIZE
        return off

    def iova(self, off: int) -> int:
        return IOVA + (off - (MEM_SIZE if off >= MEM_SIZE else 0))

    def put(self, data: bytes, *, cvq: bool = False) -> int:
        off = self.alloc(len(data), cvq=cvq)
        self.mv[off : off + len(data)] = data
        return off

    def post_rx(self, vq: int = 0, count: int = 8, size: int = 2048) -> list[int]:
        offs = [self.alloc(size) for _ in range(count)]
        for off in offs:
            self.rings[vq].add([Buf(self.iova(off), size, writable=True)], token=off)
        self.rings[vq].publish()
        os.eventfd_write(self.kick[vq], 1)
        return offs

    def send(self, frame: bytes, vq: int = 1) -> None:
        off = self.put(bytes(self.hdr) + frame)
        self.rings[vq].add_and_publish([Buf(self.iova(off), self.hdr + len(frame))], token=off)
        os.eventfd_write(self.kick[vq], 1)

    def wait_used(self, vq: int, count: int = 1) -> list[tuple[object, int, int]]:
        got: list[tuple[object, int, int]] = []
        deadline = time.monotonic() + WAIT_S
        while len(got) < count:
            got += self.rings[vq].poll_used()
            if len(got) >= count:
                break
            left = deadline - time.monotonic()
            assert left > 0, f"vq {vq}: {len(got)} of {count} used entries"
            select.select([self.call[vq]], [], [], min(left, 0.05))
            drain(self.call[vq])
        return got

    def received(self, entry: tuple[object, int, int]) -> tuple[int, bytes]:
        """(num_buffers, bytes after the header) of one used RX buffer."""
        off, _head, length = entry
        assert isinstance(off, int)
        data = bytes(self.mv[off : off + length])
        return struct.unpack_from("<H", data, 10)[0], data[self.hdr :]

    def cvq_command(self, cls: int, cmd: int, payload: bytes) -> int:
        assert self.cvq >= 0
        out = self.put(bytes([cls, cmd]) + payload, cvq=True)
        ack = self.put(b"\xee", cvq=True)
        ring = self.rings[self.cvq]
        ring.add_and_publish([Buf(self.iova(out), 2 + len(payload)), Buf(self.iova(ack), 1, writable=True)])
        os.eventfd_write(self.kick[self.cvq], 1)
        [(_tok, _head, length)] = self.wait_used(self.cvq)
        assert length == 1
        return self.mm[ack]

    def close(self) -> None:
        # Stop the device before the memory goes: its thread reaches the rings through raw pointers (where
        # the kernel would have pinned the pages), and may still be finishing a round or re-checking a ring.
        with contextlib.suppress(DeviceError):
            self.dev.set_status(0)
        for fd in [*self.kick.values(), *self.call.values()]:
            os.close(fd)
        self.mv.release()
        self.mm.close()
        os.close(self.fd)


@pytest.fixture
def dev() -> Iterator[SimDevice]:
    d = SimDevice("sim")
    yield d
    d.close()


@pytest.fixture
def guest(dev: SimDevice) -> Iterator[Guest]:
    g = Guest(dev)
    yield g
    g.close()


def frame_to(dst: bytes, payload: bytes = b"hello, vdpa " * 10) -> bytes:
    return dst + bytes.fromhex("02aabbccddee") + b"\x88\xb5" + payload


def test_loopback_frame_is_byte_exact(guest: Guest, dev: SimDevice) -> None:
    guest.start()
    guest.post_rx()
    frame = frame_to(b"\xff" * 6, bytes(range(256)) * 4)
    guest.send(frame)
    [tx] = guest.wait_used(1)
    [rx] = guest.wait_used(0)
    nbuf, data = guest.received(rx)
    assert data == frame
    assert nbuf == 1
    assert tx[2] == 0  # TX buffers are read-only: nothing written
    assert dev.vq_stats(1).packets == 1 and dev.vq_stats(1).bytes == len(frame)
    assert dev.vq_stats(0).packets == 1
    assert dev.vq_stats(1).kicks >= 1
    assert dev.vq_stats(0).calls >= 1
    assert dev.get_vring_base(1) == 1


def test_loopback_on_every_pair(guest: Guest, dev: SimDevice) -> None:
    guest.start()
    pairs = dev.get_vqs_count() // 2
    # with MQ only the first pair runs until the driver asks for more
    assert guest.cvq_command(CTRL_MQ, 0, struct.pack("<H", pairs)) == OK
    for p in range(pairs):
        guest.post_rx(2 * p, count=2)
    for p in range(pairs):
        guest.send(frame_to(b"\xff" * 6, f"pair {p}".encode()), vq=2 * p + 1)
    for p in range(pairs):
        [rx] = guest.wait_used(2 * p)
        assert guest.received(rx)[1].endswith(f"pair {p}".encode())


def test_mergeable_rx_spreads_a_frame_over_buffers(guest: Guest) -> None:
    assert guest.features & NetF.MRG_RXBUF
    guest.start()
    guest.post_rx(count=4, size=256)
    frame = frame_to(b"\xff" * 6, os.urandom(500))
    guest.send(frame)
    used = guest.wait_used(0, count=3)
    nbuf, first = guest.received(used[0])
    rest = b"".join(bytes(guest.mv[off : off + n]) for off, _h, n in used[1:] if isinstance(off, int))
    assert nbuf == 3
    assert first + rest == frame


def test_rx_without_buffers_drops_and_counts_with_rx_full_drop() -> None:
    with SimDevice("sim:rx_full=drop") as dev:
        g = Guest(dev)
        try:
            g.start()
            g.send(frame_to(b"\xff" * 6))
            g.wait_used(1)
            assert dev.vq_stats(0).dropped == 1
            assert dev.vq_stats(0).packets == 0
            assert dev.vq_waits(1) == 0
        finally:
            g.close()


def test_indirect_tx_chain(guest: Guest) -> None:
    assert guest.features & NetF.RING_INDIRECT_DESC
    guest.start()
    guest.post_rx()
    frame = frame_to(b"\xff" * 6, b"indirect!" * 20)
    hdr_off = guest.put(bytes(guest.hdr))
    body_off = guest.put(frame)
    table_off = guest.alloc(64)
    guest.rings[1].add(
        [Buf(guest.iova(hdr_off), guest.hdr), Buf(guest.iova(body_off), len(frame))],
        indirect_at=(guest.mv[table_off:], guest.iova(table_off)),
    )
    guest.rings[1].publish()
    os.eventfd_write(guest.kick[1], 1)
    [rx] = guest.wait_used(0)
    assert guest.received(rx)[1] == frame


def test_sink_consumes_tx() -> None:
    with SimDevice("sim:backend=sink") as dev:
        g = Guest(dev)
        try:
            g.start()
            g.post_rx()
            for _ in range(5):
                g.send(frame_to(b"\xff" * 6))
            g.wait_used(1, count=5)
            assert dev.vq_stats(1).packets == 5
            assert dev.vq_stats(0).packets == 0
            assert g.rings[0].poll_used() == []
        finally:
            g.close()


def test_unmapped_descriptor_is_a_device_fault(guest: Guest, dev: SimDevice) -> None:
    guest.start()
    guest.post_rx()
    ring = guest.rings[1]
    ring.add_and_publish([Buf(IOVA + 64 * MEM_SIZE, 100)])
    os.eventfd_write(guest.kick[1], 1)
    wait_readable(dev.fault_fd(), "fault fd")
    faults = dev.take_faults()
    assert [f.vq for f in faults] == [1]
    assert faults[0].iova == IOVA + 64 * MEM_SIZE
    stats = dev.vq_stats(1)
    assert stats.faults == 1 and stats.error
    assert dev.get_vring_base(1) == 0  # the bad chain was not consumed
    # the vq stays stopped; the others still run
    guest.send(frame_to(b"\xff" * 6))
    assert ring.used_idx() == 0
    assert dev.vq_stats(0).error is None
    assert dev.take_faults() == []


def test_write_to_read_only_map_is_a_fault(dev: SimDevice) -> None:
    g = Guest(dev)
    try:
        ro_off = MEM_SIZE  # second half: map it read-only at another IOVA
        dev.iotlb_update(IOVA + MEM_SIZE, 4096, g.uaddr + ro_off, Perm.RO)
        g.start()
        g.rings[0].add_and_publish([Buf(IOVA + MEM_SIZE, 2048, writable=True)])
        g.send(frame_to(b"\xff" * 6))
        wait_readable(dev.fault_fd(), "fault fd")
        [fault] = dev.take_faults()
        assert fault.vq == 0 and "read-only" in fault.reason
        assert dev.vq_stats(0).faults == 1
    finally:
        g.close()


def test_descriptor_loop_is_a_fault(guest: Guest, dev: SimDevice) -> None:
    guest.start()
    ring = guest.rings[1]
    off = guest.put(bytes(64))
    ring.write_desc(0, guest.iova(off), 16, 1, 1)  # 0 -> 1 -> 0 ...
    ring.write_desc(1, guest.iova(off), 16, 1, 0)
    struct.pack_into("<H", guest.mv, ring.layout.avail_off + 4, 0)
    struct.pack_into("<H", guest.mv, ring.layout.avail_off + 2, 1)
    os.eventfd_write(guest.kick[1], 1)
    wait_readable(dev.fault_fd(), "fault fd")
    [fault] = dev.take_faults()
    assert fault.vq == 1 and "loop" in fault.reason


def test_suspend_freezes_rings_and_resume_continues(guest: Guest, dev: SimDevice) -> None:
    guest.start()
    guest.post_rx()
    guest.send(frame_to(b"\xff" * 6))
    guest.wait_used(1)
    dev.suspend()
    kicks = dev.vq_stats(1).kicks
    guest.send(frame_to(b"\xff" * 6, b"after suspend"))
    # the thread has seen the kick (it counts kicks under the lock it processes rings with) ...
    wait_until(lambda: dev.vq_stats(1).kicks > kicks, "kick seen")
    # ... yet nothing moved
    assert dev.get_vring_base(1) == 1
    assert guest.rings[1].used_idx() == 1
    dev.resume()
    guest.wait_used(1)
    assert dev.get_vring_base(1) == 2
    [_first, second] = guest.wait_used(0, count=2)
    assert guest.received(second)[1].endswith(b"after suspend")


def test_vring_config_is_refused_while_running(guest: Guest, dev: SimDevice) -> None:
    guest.start()
    with pytest.raises(Exception, match="set_vring_base"):
        dev.set_vring_base(1, 5)
    dev.suspend()
    dev.set_vring_base(1, 5)
    assert dev.get_vring_base(1) == 5


def test_reset_stops_processing_and_drops_maps(guest: Guest, dev: SimDevice) -> None:
    guest.start()
    dev.set_status(0)
    assert dev.iotlb_map_count(0) == 0
    assert dev.get_vring_base(1) == 0


def test_iotlb_persist_keeps_maps_over_reset(dev: SimDevice) -> None:
    g = Guest(dev, backend=dev.get_backend_features())
    try:
        assert dev.iotlb_map_count(0) == 1
        dev.set_status(0)
        assert dev.iotlb_map_count(0) == 1
    finally:
        g.close()


def test_event_idx_call_suppression(dev: SimDevice) -> None:
    g = Guest(dev)
    try:
        assert g.features & NetF.RING_EVENT_IDX
        g.start()
        g.post_rx(count=4)
        g.send(frame_to(b"\xff" * 6))
        g.wait_used(1)
        # the driver asks for no call until used idx passes 100: further TX completions stay silent
        struct.pack_into("<H", g.mv, g.rings[1].layout.avail_off + 4 + 2 * g.rings[1].num, 100)
        calls = dev.vq_stats(1).calls
        g.send(frame_to(b"\xff" * 6))
        wait_until(lambda: g.rings[1].used_idx() == 2, "second TX completion")
        assert dev.vq_stats(1).calls == calls
        # and the device asks to be kicked for the next avail entry
        used_off = g.rings[1].layout.used_off
        assert struct.unpack_from("<H", g.mv, used_off + 4 + 8 * g.rings[1].num)[0] == 2
    finally:
        g.close()


# ---------------------------------------------------------------- control queue

CTRL_RX, CTRL_MAC, CTRL_VLAN, CTRL_ANNOUNCE, CTRL_MQ, CTRL_GUEST_OFFLOADS = range(6)
OK, ERR = 0, 1


def test_vdpasim_mac_addr_set_through_asid1_filters_unicast() -> None:
    """The sequence probe.py ran against the kernel's vdpa_sim_net, with the same outcomes."""
    with SimDevice("sim:profile=vdpasim") as dev:
        g = Guest(dev, asid_of_cvq=1)
        try:
            g.start()
            old = dev.get_config(0, 6)
            new = bytes.fromhex("02aabbccddee")
            assert g.cvq_command(CTRL_MAC, 1, new) == OK
            assert dev.get_config(0, 6) == new
            assert dev.filter_state()["mac"] == new.hex(":")
            g.post_rx(count=4)
            g.send(frame_to(old, b"to the old mac"))
            g.send(frame_to(new, b"to the new mac"))
            g.wait_used(1, count=2)
            [rx] = g.wait_used(0)
            assert g.received(rx)[1] == frame_to(new, b"to the new mac")
            assert dev.vq_stats(0).dropped == 1
            # vdpa_sim_net's CVQ knows nothing but MAC_ADDR_SET
            assert g.cvq_command(CTRL_RX, 0, b"\x01") == ERR
            assert dev.vq_stats(2).packets == 2
        finally:
            g.close()


def test_vdpasim_filters_by_mac_from_reset() -> None:
    with SimDevice("sim:profile=vdpasim") as dev:
        g = Guest(dev)
        try:
            g.start()
            g.post_rx(count=4)
            g.send(frame_to(bytes.fromhex("020000000099")))
            g.send(frame_to(b"\x01\x00\x5e\x00\x00\x01"))  # multicast: accepted, as the kernel does
            g.wait_used(1, count=2)
            [rx] = g.wait_used(0)
            assert g.received(rx)[1][:6] == b"\x01\x00\x5e\x00\x00\x01"
            assert dev.vq_stats(0).dropped == 1
        finally:
            g.close()


def _deliverable(g: Guest, dev: SimDevice, frames: list[bytes]) -> list[bytes]:
    """Which of `frames` come out of RX (loopback), in order."""
    before_tx = g.rings[1].used_idx()
    before_drop = dev.vq_stats(0).dropped
    g.post_rx(count=len(frames))
    for f in frames:
        g.send(f)
    wait_until(lambda: g.rings[1].used_idx() == (before_tx + len(frames)) & 0xFFFF, "TX completions")
    got = []
    expected = len(frames) - (dev.vq_stats(0).dropped - before_drop)
    if expected:
        got = [g.received(e)[1] for e in g.wait_used(0, count=expected)]
    # reclaim unused RX buffers so the next round starts clean
    return got


def test_rich_rx_filter_commands() -> None:
    with SimDevice("sim") as dev:
        g = Guest(dev)
        try:
            g.start()
            mac = dev.get_config(0, 6)
            other = bytes.fromhex("020000000077")
            listed = bytes.fromhex("020000000042")
            mcast = bytes.fromhex("01005e000001")
            # promiscuous until the driver says otherwise
            assert _deliverable(g, dev, [frame_to(other)]) == [frame_to(other)]
            assert dev.filter_state()["promisc"] is True
            assert g.cvq_command(CTRL_RX, 0, b"\x00") == OK  # PROMISC off
            table = struct.pack("<I", 1) + listed + struct.pack("<I", 1) + mcast
            assert g.cvq_command(CTRL_MAC, 0, table) == OK  # MAC_TABLE_SET
            frames = [
                frame_to(other),
                frame_to(mac),
                frame_to(listed),
                frame_to(mcast),
                frame_to(b"\xff" * 6),
            ]
            assert _deliverable(g, dev, frames) == frames[1:]
            assert g.cvq_command(CTRL_RX, 5, b"\x01") == OK  # NOBCAST
            assert g.cvq_command(CTRL_RX, 3, b"\x01") == OK  # NOMULTI
            assert _deliverable(g, dev, frames) == frames[1:3]
            state = dev.filter_state()
            assert state["uc_macs"] == [listed.hex(":")] and state["mc_macs"] == [mcast.hex(":")]
            assert state["nobcast"] and state["nomulti"] and not state["promisc"]
        finally:
            g.close()


def test_rich_vlan_mq_offloads_announce() -> None:
    with SimDevice("sim") as dev:
        g = Guest(dev)
        try:
            g.start()
            mac = dev.get_config(0, 6)
            assert g.cvq_command(CTRL_RX, 0, b"\x00") == OK
            assert g.cvq_command(CTRL_VLAN, 0, struct.pack("<H", 5)) == OK
            assert g.cvq_command(CTRL_VLAN, 0, struct.pack("<H", 4096)) == ERR
            tagged5 = mac + mac + b"\x81\x00\x00\x05\x08\x00" + b"x" * 50
            tagged6 = mac + mac + b"\x81\x00\x00\x06\x08\x00" + b"x" * 50
            assert _deliverable(g, dev, [tagged5, tagged6]) == [tagged5]
            assert g.cvq_command(CTRL_VLAN, 1, struct.pack("<H", 5)) == OK
            assert dev.filter_state()["vlans"] == []
            assert g.cvq_command(CTRL_MQ, 0, struct.pack("<H", 2)) == OK
            assert g.cvq_command(CTRL_MQ, 0, struct.pack("<H", dev.get_vqs_count())) == ERR
            assert dev.filter_state()["active_pairs"] == 2
            assert g.cvq_command(CTRL_GUEST_OFFLOADS, 0, struct.pack("<Q", int(NetF.GUEST_CSUM))) == OK
            assert g.cvq_command(CTRL_GUEST_OFFLOADS, 0, struct.pack("<Q", int(NetF.GUEST_TSO4))) == ERR
            assert dev.filter_state()["guest_offloads"] == int(NetF.GUEST_CSUM)
            assert g.cvq_command(CTRL_ANNOUNCE, 0, b"") == OK
            assert g.cvq_command(99, 0, b"") == ERR
            assert g.cvq_command(CTRL_MAC, 0, b"\x05\x00") == ERR  # truncated table
        finally:
            g.close()


# ---------------------------------------------------------------- TAP back-end


def _tap_usable() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/net/tun")


@pytest.mark.skipif(not _tap_usable(), reason="needs root and /dev/net/tun")
def test_tap_backend_both_directions() -> None:
    import fcntl
    import socket

    ifname = f"vdusim{os.getpid() % 100000}"
    with SimDevice(f"sim:profile=basic,tap={ifname}") as dev:
        g = Guest(dev)
        try:
            # no IPv6 autoconfiguration frames: they would queue in the TAP and reach RX before the test's
            no_v6 = pathlib.Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6")
            if no_v6.exists():
                no_v6.write_text("1")
            # bring the interface up so the kernel passes frames through it
            ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            flags = struct.unpack_from("<H", fcntl.ioctl(ctl, 0x8913, struct.pack("16sH14x", ifname.encode(), 0)), 16)[
                0
            ]
            fcntl.ioctl(ctl, 0x8914, struct.pack("16sH14x", ifname.encode(), flags | 1))  # IFF_UP
            ctl.close()
            pkt = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
            pkt.bind((ifname, 0))
            pkt.settimeout(WAIT_S)
            try:
                g.start()
                g.post_rx(count=4)
                out = frame_to(b"\xff" * 6, b"guest to tap")
                g.send(out)
                assert pkt.recv(4096) == out
                inbound = frame_to(b"\xff" * 6, b"tap to guest")
                pkt.send(inbound)
                got: list[bytes] = []
                while inbound not in got and len(got) < 4:  # anything else the kernel sent comes first
                    got += [g.received(e)[1] for e in g.wait_used(0)]
                assert inbound in got
            finally:
                pkt.close()
        finally:
            g.close()
