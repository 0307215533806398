"""The test guest (virtio-net driver emulator) against a tiny device written here from the virtio spec.

The fake device sees guest memory only through GPAs (as a back-end does) and knows nothing of the driver's
internals, so a ring-layout, header or notification mistake in either shows up as a test failure.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest
import trio

from vduproxy.memory import MemoryMap
from vduproxy.testing.guest import (
    DriverError,
    GuestMemory,
    VirtioNetDriver,
    Vq,
    check_frames,
    make_frame,
    net_hdr_len,
    parse_frame,
)
from vduproxy.virtio import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    NetF,
)

pytestmark = pytest.mark.unit

MiB = 1 << 20
BASE = NetF.VERSION_1 | NetF.RING_INDIRECT_DESC | NetF.RING_EVENT_IDX


def u16(mem: GuestMemory, gpa: int) -> int:
    return int(struct.unpack("<H", mem.read(gpa, 2))[0])


def put16(mem: GuestMemory, gpa: int, v: int) -> None:
    mem.write(gpa, struct.pack("<H", v & 0xFFFF))


def need_event(event: int, new: int, old: int) -> bool:
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class FakeDevice:
    """The device side of split rings, per the virtio 1.x spec, reading memory by GPA only."""

    def __init__(self, mem: GuestMemory, features: int) -> None:
        self.mem = mem
        self.features = features
        self.hdr_len = net_hdr_len(features)
        self.event_idx = bool(features & NetF.RING_EVENT_IDX)
        self.last_avail: dict[int, int] = {}
        self.used: dict[int, int] = {}
        self.chain_shapes: list[tuple[int, bool]] = []  # (descriptors, indirect) of each TX chain
        self.calls = 0

    def desc(self, table: int, i: int) -> tuple[int, int, int, int]:
        addr, length, flags, nxt = struct.unpack("<QIHH", self.mem.read(table + 16 * i, 16))
        return addr, length, flags, nxt

    def chain(self, vq: Vq, head: int) -> tuple[list[tuple[int, int, bool]], bool]:
        addr, length, flags, nxt = self.desc(vq.desc_gpa, head)
        table, limit, indirect = vq.desc_gpa, vq.num, False
        if flags & VRING_DESC_F_INDIRECT:
            assert self.features & NetF.RING_INDIRECT_DESC and length % 16 == 0
            table, limit, indirect = addr, length // 16, True
            addr, length, flags, nxt = self.desc(table, 0)
        out = []
        for _ in range(limit):
            out.append((addr, length, bool(flags & VRING_DESC_F_WRITE)))
            if not flags & VRING_DESC_F_NEXT:
                return out, indirect
            assert nxt < limit
            addr, length, flags, nxt = self.desc(table, nxt)
        raise AssertionError("descriptor loop")

    def avail(self, vq: Vq) -> Iterator[int]:
        """Heads the driver made available since last time (the caller consumes or stops)."""
        while self.last_avail.get(vq.index, 0) != u16(self.mem, vq.avail_gpa + 2):
            i = self.last_avail.get(vq.index, 0)
            yield u16(self.mem, vq.avail_gpa + 4 + 2 * (i % vq.num))

    def consume(self, vq: Vq) -> None:
        self.last_avail[vq.index] = (self.last_avail.get(vq.index, 0) + 1) & 0xFFFF

    def push_used(self, vq: Vq, entries: list[tuple[int, int]]) -> None:
        old = self.used.get(vq.index, 0)
        idx = old
        for head, length in entries:
            self.mem.write(vq.used_gpa + 4 + 8 * (idx % vq.num), struct.pack("<II", head, length))
            idx = (idx + 1) & 0xFFFF
        self.used[vq.index] = idx
        put16(self.mem, vq.used_gpa + 2, idx)
        if self.event_idx:
            # ask for a kick on the very next buffer
            put16(self.mem, vq.used_gpa + 4 + 8 * vq.num, self.last_avail.get(vq.index, 0))
            call = need_event(u16(self.mem, vq.avail_gpa + 4 + 2 * vq.num), idx, old)
        else:
            call = not u16(self.mem, vq.avail_gpa) & VRING_AVAIL_F_NO_INTERRUPT
        if call and entries:
            os.eventfd_write(vq.call_fd, 1)
            self.calls += 1

    def tx_poll(self, vq: Vq) -> list[bytes]:
        frames, used = [], []
        for head in self.avail(vq):
            chain, indirect = self.chain(vq, head)
            self.chain_shapes.append((len(chain), indirect))
            assert not any(w for _, _, w in chain), "TX buffers are device-readable"
            data = b"".join(self.mem.read(a, n) for a, n, _ in chain)
            assert data[: self.hdr_len] == bytes(self.hdr_len), "no offloads requested"
            frames.append(data[self.hdr_len :])
            used.append((head, 0))
            self.consume(vq)
        self.push_used(vq, used)
        return frames

    def rx_push(self, vq: Vq, frames: list[bytes]) -> int:
        """Deliver frames into RX buffers (merging when negotiated); returns how many fit."""
        mergeable = bool(self.features & NetF.MRG_RXBUF)
        delivered = 0
        for frame in frames:
            used: list[tuple[int, int]] = []
            data = bytearray(self.hdr_len) + frame
            pos = 0
            start = self.last_avail.get(vq.index, 0)
            for head in self.avail(vq):
                chain, _ = self.chain(vq, head)
                assert all(w for _, _, w in chain), "RX buffers are device-writable"
                cap = sum(n for _, n, _ in chain)
                if not mergeable and cap < len(data):
                    break
                written = 0
                for addr, n, _ in chain:
                    piece = data[pos : pos + n]
                    self.mem.write(addr, bytes(piece))
                    pos += len(piece)
                    written += len(piece)
                used.append((head, written))
                self.consume(vq)
                if pos == len(data) or not mergeable:
                    break
            if pos < len(data):
                self.last_avail[vq.index] = start  # not enough buffers: give them back, drop the frame
                return delivered
            first_addr = self.chain(vq, used[0][0])[0][0][0]
            struct.pack_into("<H", data, 10, len(used) if mergeable else 1)
            self.mem.write(first_addr + 10, bytes(data[10:12]))
            self.push_used(vq, used)
            delivered += 1
        return delivered


def kicks(vq: Vq) -> int:
    try:
        return os.eventfd_read(vq.kick_fd)
    except BlockingIOError:
        return 0


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory(16 * MiB) as m:
        yield m


def frames_of(sizes: list[int], first_seq: int = 0) -> list[bytes]:
    return [make_frame(s, first_seq + i) for i, s in enumerate(sizes)]


SIZES = [60, 64, 511, 512, 513, 1514, 2000, 1025]


@pytest.mark.parametrize("layout", ["single", "chained", "indirect"])
def test_tx_layouts_deliver_exact_frames(mem: GuestMemory, layout: str) -> None:
    drv = VirtioNetDriver(mem, queue_size=32, tx_layout=layout, tx_chunk=512)  # type: ignore[arg-type]
    dev = FakeDevice(mem, drv.features)
    sent = frames_of(SIZES)
    assert drv.send(sent) == len(sent)
    got = dev.tx_poll(drv.tx())
    assert got == sent
    for (ndesc, indirect), frame in zip(dev.chain_shapes, sent, strict=True):
        assert indirect == (layout == "indirect")
        assert ndesc == (1 if layout == "single" else 1 + -(-len(frame) // 512))
    assert drv.reclaim_tx() == len(sent)
    # buffers came back: a full ring's worth fits again
    n = 32 // (2 if layout == "chained" else 1)
    assert drv.send(frames_of([100] * (n + 1), 100)) == n
    drv.close()


def test_tx_ring_full_and_header_length(mem: GuestMemory) -> None:
    drv = VirtioNetDriver(mem, queue_size=8, features=BASE, tx_layout="chained", tx_chunk=4096)
    dev = FakeDevice(mem, drv.features)
    assert drv.hdr_len == 12  # VERSION_1 without MRG_RXBUF still carries num_buffers
    # 2 descriptors per frame: 8 descriptors hold 4 frames, the rest must wait
    assert drv.send(frames_of([100] * 6)) == 4
    assert len(dev.tx_poll(drv.tx())) == 4
    assert drv.send(frames_of([100] * 2, 4)) == 2
    with pytest.raises(ValueError, match="does not fit"):
        drv.send([make_frame(4000, 0)])
    drv.close()


def test_header_length_rule() -> None:
    assert net_hdr_len(0) == 10
    assert net_hdr_len(NetF.MRG_RXBUF) == 12
    assert net_hdr_len(NetF.VERSION_1) == 12


@pytest.mark.parametrize(("rx_layout", "buf"), [("single", 256), ("chained", 300), ("single", 2048)])
def test_rx_mergeable_reassembly(mem: GuestMemory, rx_layout: str, buf: int) -> None:
    drv = VirtioNetDriver(mem, queue_size=64, rx_buf_size=buf, rx_layout=rx_layout)  # type: ignore[arg-type]
    dev = FakeDevice(mem, drv.features)
    assert drv.post_rx_buffers() == 64 // (2 if rx_layout == "chained" else 1)  # one chain per buffer
    sent = frames_of(SIZES)
    assert dev.rx_push(drv.rx(), sent) == len(sent)
    got = drv.receive()
    assert got == sent
    nb = [struct.unpack_from("<H", h, 10)[0] for h in drv.rx_headers]
    assert nb == [-(-(12 + len(f)) // buf) for f in sent]
    assert check_frames(range(len(sent)), got).ok
    drv.close()


def test_rx_mergeable_frame_split_across_polls(mem: GuestMemory) -> None:
    drv = VirtioNetDriver(mem, queue_size=16, rx_buf_size=256)
    dev = FakeDevice(mem, drv.features)
    drv.post_rx_buffers()
    frame = make_frame(1000, 7)  # 4 buffers of 256
    vq = drv.rx()
    # publish the used entries one at a time, as a device may, and poll in between
    dev.rx_push(vq, [frame])
    used_idx = vq.used_idx
    put16(mem, vq.used_gpa + 2, used_idx - 2)
    assert drv.receive(refill=False) == []
    put16(mem, vq.used_gpa + 2, used_idx)
    assert drv.receive() == [frame]
    drv.close()


def test_rx_without_mergeable(mem: GuestMemory) -> None:
    drv = VirtioNetDriver(mem, queue_size=16, features=BASE, rx_buf_size=1600)
    dev = FakeDevice(mem, drv.features)
    drv.post_rx_buffers()
    sent = frames_of([60, 1514, 700])
    assert dev.rx_push(drv.rx(), [*sent, make_frame(1700, 9)]) == 3  # 12 + 1700 does not fit one buffer
    assert drv.receive() == sent
    assert all(struct.unpack_from("<H", h, 10)[0] == 1 for h in drv.rx_headers)
    drv.close()


def test_rx_device_errors_are_reported(mem: GuestMemory) -> None:
    drv = VirtioNetDriver(mem, queue_size=8, rx_buf_size=256)
    drv.post_rx_buffers()
    vq = drv.rx()
    head = next(iter(vq.ring.chain_of))
    mem.write(vq.used_gpa + 4, struct.pack("<II", head, 257))
    put16(mem, vq.used_gpa + 2, 1)
    with pytest.raises(DriverError, match="used len 257"):
        drv.receive()
    drv.close()

    drv = VirtioNetDriver(mem, queue_size=8, rx_buf_size=256)
    drv.post_rx_buffers()
    vq = drv.rx()
    head = next(iter(vq.ring.chain_of))
    slot_gpa = FakeDevice(mem, drv.features).chain(vq, head)[0][0][0]
    mem.write(slot_gpa, bytes(12))  # num_buffers 0
    mem.write(vq.used_gpa + 4, struct.pack("<II", head, 100))
    put16(mem, vq.used_gpa + 2, 1)
    with pytest.raises(DriverError, match="num_buffers 0"):
        drv.receive()
    drv.close()


def test_kick_suppression_event_idx(mem: GuestMemory) -> None:
    drv = VirtioNetDriver(mem, queue_size=16)
    dev = FakeDevice(mem, drv.features)
    tx = drv.tx()
    drv.send(frames_of([100]))
    assert kicks(tx) == 1  # avail_event 0: the device wants to hear about entry 0
    drv.send(frames_of([100], 1))
    assert kicks(tx) == 0 and tx.kicks_suppressed == 1  # the device has not asked again
    dev.tx_poll(tx)  # consumes both and sets avail_event = 2
    drv.send(frames_of([100, 100], 2))
    assert kicks(tx) == 1
    drv.close()


def test_kick_suppression_no_notify(mem: GuestMemory) -> None:
    drv = VirtioNetDriver(mem, queue_size=16, features=NetF.VERSION_1)
    tx = drv.tx()
    put16(mem, tx.used_gpa, VRING_USED_F_NO_NOTIFY)
    drv.send(frames_of([100]))
    assert kicks(tx) == 0
    put16(mem, tx.used_gpa, 0)
    drv.send(frames_of([100], 1))
    assert kicks(tx) == 1
    drv.close()


@pytest.mark.parametrize("features", [NetF.VERSION_1 | NetF.MRG_RXBUF, BASE | NetF.MRG_RXBUF])
async def test_wait_call_and_stream(mem: GuestMemory, features: int) -> None:
    """A device task answering kicks: frames looped TX → RX, the driver waiting on its call eventfds."""
    drv = VirtioNetDriver(mem, queue_size=32, features=features, rx_buf_size=512)
    dev = FakeDevice(mem, drv.features)
    drv.post_rx_buffers()
    sent = frames_of([64 + (i * 37) % 1400 for i in range(200)])

    async def device() -> None:
        backlog: list[bytes] = []
        while True:
            await trio.lowlevel.wait_readable(drv.tx().kick_fd)
            kicks(drv.tx())
            backlog += dev.tx_poll(drv.tx())
            while backlog:
                n = dev.rx_push(drv.rx(), backlog)
                backlog = backlog[n:]
                if backlog:
                    await trio.sleep(0)  # wait for the driver to refill; it kicks RX when it does
                    kicks(drv.rx())
            await trio.sleep(0)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device)
            got: list[bytes] = []

            async def receiver() -> None:
                got.extend(await drv.receive_frames(len(sent)))

            async with trio.open_nursery() as inner:
                inner.start_soon(receiver)
                await drv.send_all(sent)
            nursery.cancel_scope.cancel()
    report = check_frames(range(len(sent)), got)
    assert report.ok and not report.reordered, report
    assert got == sent
    assert drv.rx().calls > 0
    drv.close()


def test_frame_checks() -> None:
    frames = frames_of([64, 100, 1514, 60])
    assert [parse_frame(f).seq for f in frames] == [0, 1, 2, 3]  # type: ignore[union-attr]
    bad = bytearray(frames[2])
    bad[700] ^= 1
    report = check_frames(range(5), [frames[1], frames[0], frames[0], bytes(bad), make_frame(64, 99)])
    assert report.lost == [2, 3, 4]
    assert report.duplicated == [0]
    assert report.corrupted == 1
    assert report.unexpected == [99]
    assert report.reordered and not report.ok


def test_two_regions_and_the_backend_view() -> None:
    """GPA ≠ front-end VA; the rings are found through a MemoryMap built from the same table."""
    with GuestMemory(8 * MiB, regions=2) as mem:
        r0, r1 = mem.regions
        assert r1.gpa == 1 << 32 and r1.uva == r0.uva + r0.size and r0.gpa != r0.uva
        first = mem.alloc(3 * MiB)
        second = mem.alloc(2 * MiB)  # would cross into region 1: placed inside it instead
        assert first.gpa < 4 * MiB and second.gpa == 1 << 32
        drv = VirtioNetDriver(mem, queue_size=64)
        with MemoryMap.build(mem.region_specs()) as mm:
            for vq in drv.vqs:
                assert vq.desc_gpa >= 1 << 32
                for uva, gpa in (
                    (vq.desc_uva, vq.desc_gpa),
                    (vq.avail_uva, vq.avail_gpa),
                    (vq.used_uva, vq.used_gpa),
                ):
                    assert mm.uva_to_gpa(uva) == gpa
            drv.send(frames_of([200]))
            tx = drv.tx()
            (head,) = struct.unpack("<H", mm.read(mm.uva_to_gpa(tx.avail_uva) + 4, 2))
            addr, length, flags, nxt = struct.unpack("<QIHH", mm.read(tx.desc_gpa + 16 * head, 16))
            assert mm.read(addr, length) == bytes(12) and flags & VRING_DESC_F_NEXT  # the header
            addr, length, flags, _ = struct.unpack("<QIHH", mm.read(tx.desc_gpa + 16 * nxt, 16))
            assert mm.read(addr, length) == make_frame(200, 0)
        drv.close()


def test_no_fd_leak() -> None:
    before = len(os.listdir("/proc/self/fd"))
    with GuestMemory(4 * MiB) as mem:
        drv = VirtioNetDriver(mem, pairs=2, queue_size=16)
        assert len(drv.vqs) == 4 and drv.features & NetF.MQ
        drv.close()
    assert len(os.listdir("/proc/self/fd")) == before
