"""A virtio-net *driver* over memfd-backed guest memory: the guest half of every test that needs no VM.

`GuestMemory` is what QEMU's `memory-backend-memfd,share=on` gives a back-end: a memfd, described by regions
whose GPA and front-end virtual address (UVA) differ, so a back-end that confuses the spaces fails loudly.
With `regions=2` it is laid out like QEMU above 4 GiB: one memfd, the second region at an mmap_offset and a
high GPA, both regions contiguous in the front-end's address space (so UVA ranges can cross regions).

`VirtioNetDriver` plays the guest's virtio-net driver on split rings in that memory: TX with the
virtio_net_hdr (single, chained or indirect), RX buffers (mergeable or not), kick suppression as the device
asks (EVENT_IDX or NO_NOTIFY), and call eventfds a trio task can wait on. It never interprets what the
device does beyond the virtio rules, and it reports device misbehaviour as `DriverError`.

Frames from `make_frame` carry a sequence number and a payload derived from it, so `check_frames` can tell
loss, duplication and corruption apart without keeping copies.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import mmap
import os
import random
import struct
from collections.abc import Iterable, Sequence
from typing import Literal

import trio

from ..memory import RegionSpec
from ..virtio import DESC_SIZE, NetF
from ..vring import Buf, RingFull, RingLayout, SplitRingDriver

DEFAULT_UVA_BASE = 0x7F5A_0000_0000  # far from any GPA this class hands out, like a real QEMU mapping
HIGH_GPA = 1 << 32  # where QEMU puts RAM above the PCI hole
GUEST_MAC = bytes.fromhex("525400123456")
PEER_MAC = bytes.fromhex("020000000002")

DEFAULT_FEATURES = NetF.VERSION_1 | NetF.MRG_RXBUF | NetF.RING_INDIRECT_DESC | NetF.RING_EVENT_IDX

TxLayout = Literal["single", "chained", "indirect"]
RxLayout = Literal["single", "chained"]


class GuestMemoryFull(Exception):
    pass


class DriverError(Exception):
    """The device broke a virtio rule the driver can see (bad used entry, bad num_buffers, …)."""


def net_hdr_len(features: int) -> int:
    """virtio_net_hdr is 12 bytes (with num_buffers) under VERSION_1 or MRG_RXBUF, 10 bytes otherwise."""
    return 12 if features & (NetF.VERSION_1 | NetF.MRG_RXBUF) else 10


@dataclasses.dataclass(frozen=True)
class GuestRegion:
    gpa: int
    size: int
    uva: int
    mmap_offset: int  # also the region's offset in GuestMemory's own mapping


@dataclasses.dataclass(frozen=True)
class Alloc:
    """A piece of guest memory: where it is here (offset), to the device (gpa) and to the front-end (uva)."""

    offset: int
    size: int
    gpa: int
    uva: int


class GuestMemory:
    """A memfd of `size` bytes mapped here, described as 1 or 2 regions, with a bump allocator."""

    def __init__(
        self,
        size: int,
        *,
        regions: int = 1,
        gpa_base: int = 0,
        high_gpa: int = HIGH_GPA,
        uva_base: int = DEFAULT_UVA_BASE,
        name: str = "vduproxy-guest",
    ) -> None:
        if size <= 0 or size % (2 * mmap.PAGESIZE):
            raise ValueError(f"size {size} must be a positive multiple of {2 * mmap.PAGESIZE}")
        if regions not in (1, 2):
            raise ValueError("regions must be 1 or 2")
        if regions == 2 and gpa_base + size // 2 > high_gpa:
            raise ValueError("the first region would overlap the high one")
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._mm = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.buf = memoryview(self._mm)
        if regions == 1:
            self.regions: tuple[GuestRegion, ...] = (GuestRegion(gpa_base, size, uva_base, 0),)
        else:
            half = size // 2
            self.regions = (
                GuestRegion(gpa_base, half, uva_base, 0),
                GuestRegion(high_gpa, half, uva_base + half, half),
            )
        self._next = 0

    def close(self) -> None:
        if self.fd < 0:
            return
        self.buf.release()
        # a ring or a test may still hold a view: then the mapping goes with the last one
        with contextlib.suppress(BufferError):
            self._mm.close()
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def region_specs(self) -> list[RegionSpec]:
        """The memory table as `vduproxy.memory` takes it, each with its own dup of the memfd (owned by the
        receiver, as fds received over the socket would be)."""
        return [RegionSpec(r.gpa, r.size, r.uva, r.mmap_offset, os.dup(self.fd)) for r in self.regions]

    # address spaces
    def _region_of_offset(self, offset: int) -> GuestRegion:
        for r in self.regions:
            if r.mmap_offset <= offset < r.mmap_offset + r.size:
                return r
        raise ValueError(f"offset {offset:#x} outside guest memory")

    def gpa(self, offset: int) -> int:
        r = self._region_of_offset(offset)
        return r.gpa + offset - r.mmap_offset

    def uva(self, offset: int) -> int:
        r = self._region_of_offset(offset)
        return r.uva + offset - r.mmap_offset

    def offset_of_gpa(self, gpa: int, size: int = 1) -> int:
        for r in self.regions:
            if r.gpa <= gpa and gpa + size <= r.gpa + r.size:
                return r.mmap_offset + gpa - r.gpa
        raise ValueError(f"gpa range [{gpa:#x}, +{size:#x}) not inside one region")

    def gpa_of_uva(self, uva: int) -> int:
        for r in self.regions:
            if r.uva <= uva < r.uva + r.size:
                return r.gpa + uva - r.uva
        raise ValueError(f"uva {uva:#x} outside guest memory")

    def view(self, gpa: int, size: int) -> memoryview:
        off = self.offset_of_gpa(gpa, size)
        return self.buf[off : off + size]

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.view(gpa, size))

    def write(self, gpa: int, data: bytes) -> None:
        self.view(gpa, len(data))[:] = data

    def alloc(self, size: int, align: int = 64) -> Alloc:
        """Bump-allocate `size` bytes inside one region (never across two, as a device could not use that)."""
        if size <= 0 or align <= 0 or align & (align - 1):
            raise ValueError("size must be > 0 and align a power of two")
        for r in self.regions:
            start = max(self._next, r.mmap_offset)
            start = (start + align - 1) & ~(align - 1)
            if start + size <= r.mmap_offset + r.size:
                self._next = start + size
                return Alloc(start, size, self.gpa(start), self.uva(start))
        raise GuestMemoryFull(f"no room for {size} bytes")


class _Pool:
    """Fixed-size slots carved out of one allocation."""

    def __init__(self, mem: GuestMemory, count: int, slot_size: int) -> None:
        self.slot_size = slot_size
        self.area = mem.alloc(count * slot_size)
        self.mem = mem
        self.free = collections.deque(range(count))

    def gpa(self, slot: int) -> int:
        return self.area.gpa + slot * self.slot_size

    def view(self, slot: int) -> memoryview:
        off = self.area.offset + slot * self.slot_size
        return self.mem.buf[off : off + self.slot_size]


class Vq:
    """One virtqueue of the driver, with everything a front-end tells the back-end about it."""

    def __init__(self, mem: GuestMemory, index: int, num: int, *, event_idx: bool) -> None:
        self.index = index
        self.layout = RingLayout.for_num(num)
        self.area = mem.alloc(self.layout.size, align=4096)
        ring_mem = mem.buf[self.area.offset : self.area.offset + self.layout.size]
        self.ring = SplitRingDriver(ring_mem, self.layout, self.area.gpa, event_idx=event_idx)
        flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC
        self.kick_fd = os.eventfd(0, flags)
        self.call_fd = os.eventfd(0, flags)
        self.kicks = 0
        self.kicks_suppressed = 0
        self.calls = 0

    @property
    def num(self) -> int:
        return self.layout.num

    @property
    def desc_gpa(self) -> int:
        return self.ring.desc_addr

    @property
    def avail_gpa(self) -> int:
        return self.ring.avail_addr

    @property
    def used_gpa(self) -> int:
        return self.ring.used_addr

    @property
    def desc_uva(self) -> int:
        return self.area.uva + self.layout.desc_off

    @property
    def avail_uva(self) -> int:
        return self.area.uva + self.layout.avail_off

    @property
    def used_uva(self) -> int:
        return self.area.uva + self.layout.used_off

    @property
    def last_avail(self) -> int:
        """The driver's avail index: what a stopped, fully drained device reports in GET_VRING_BASE."""
        return self.ring.avail_idx

    @property
    def used_idx(self) -> int:
        return self.ring.used_idx()

    def pending_used(self) -> bool:
        return self.ring.used_idx() != self.ring.last_used

    def kick_if_needed(self, old_avail: int) -> bool:
        if self.ring.avail_idx == old_avail:
            return False
        if self.ring.needs_kick(old_avail):
            os.eventfd_write(self.kick_fd, 1)
            self.kicks += 1
            return True
        self.kicks_suppressed += 1
        return False

    def poll_used(self) -> list[tuple[object, int, int]]:
        try:
            return self.ring.poll_used()
        except RuntimeError as e:  # unknown head
            raise DriverError(f"vq {self.index}: {e}") from None

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd):
            if fd >= 0:
                os.close(fd)
        self.kick_fd = self.call_fd = -1
        self.ring.mem.release()


class VirtioNetDriver:
    """The guest's virtio-net driver for `pairs` queue pairs (vq 2i = RX of pair i, 2i+1 = TX).

    `features` are the ones the driver wants; `negotiate(offered)` keeps those the device offers and sets up
    header length and event-idx accordingly. Without negotiation the wanted set is used as is.
    """

    def __init__(
        self,
        mem: GuestMemory,
        *,
        pairs: int = 1,
        queue_size: int = 256,
        features: int = DEFAULT_FEATURES,
        rx_buf_size: int = 2048,
        rx_layout: RxLayout = "single",
        tx_buf_size: int = 2048,
        tx_layout: TxLayout = "chained",
        tx_chunk: int = 512,
        mac: bytes = GUEST_MAC,
    ) -> None:
        if pairs < 1:
            raise ValueError("pairs must be >= 1")
        if tx_chunk <= 0:
            raise ValueError("tx_chunk must be > 0")
        self.mem = mem
        self.pairs = pairs
        self.mac = mac
        self.features = int(features) | (int(NetF.MQ) if pairs > 1 else 0)
        self.rx_buf_size = rx_buf_size
        self.rx_layout: RxLayout = rx_layout
        self.tx_buf_size = tx_buf_size
        self.tx_layout: TxLayout = tx_layout
        self.tx_chunk = tx_chunk
        event_idx = bool(self.features & NetF.RING_EVENT_IDX)
        self.vqs = [Vq(mem, i, queue_size, event_idx=event_idx) for i in range(2 * pairs)]
        self._rx_pool = [_Pool(mem, queue_size, rx_buf_size) for _ in range(pairs)]
        self._tx_pool = [_Pool(mem, queue_size, tx_buf_size) for _ in range(pairs)]
        max_chain = 1 + -(-tx_buf_size // tx_chunk)
        self._table_pool = [_Pool(mem, queue_size, DESC_SIZE * max_chain) for _ in range(pairs)]
        # mergeable RX: buffers of a frame may arrive over several polls
        self._partial: list[tuple[list[bytes], int] | None] = [None] * pairs
        self.rx_headers: list[bytes] = []  # virtio_net_hdr of every received frame, in order
        self.rx_returned = 0  # RX buffers completed with len 0 (returned unused by a draining back-end)
        self.tx_completed = 0

    # negotiation and geometry -------------------------------------------------------------------------------

    def negotiate(self, offered: int) -> int:
        """Keep the wanted features the device offers; returns the acked set (without transport bit 30)."""
        self.features &= offered
        if not self.features & NetF.VERSION_1:
            raise DriverError("the device does not offer VERSION_1")
        for vq in self.vqs:
            vq.ring.event_idx = bool(self.features & NetF.RING_EVENT_IDX)
        return self.features

    @property
    def hdr_len(self) -> int:
        return net_hdr_len(self.features)

    @property
    def mergeable(self) -> bool:
        return bool(self.features & NetF.MRG_RXBUF)

    def rx(self, pair: int = 0) -> Vq:
        return self.vqs[2 * pair]

    def tx(self, pair: int = 0) -> Vq:
        return self.vqs[2 * pair + 1]

    def close(self) -> None:
        for vq in self.vqs:
            vq.close()

    # RX -----------------------------------------------------------------------------------------------------

    def post_rx_buffers(self, pair: int | None = None) -> int:
        """Give every free RX buffer to the device (kicking if it asks); returns how many were posted."""
        posted = 0
        for p in range(self.pairs) if pair is None else [pair]:
            vq, pool = self.rx(p), self._rx_pool[p]
            old = vq.ring.avail_idx
            while pool.free:
                slot = pool.free[0]
                gpa = pool.gpa(slot)
                if self.rx_layout == "chained":
                    bufs = [
                        Buf(gpa, self.hdr_len, True),
                        Buf(gpa + self.hdr_len, self.rx_buf_size - self.hdr_len, True),
                    ]
                else:
                    bufs = [Buf(gpa, self.rx_buf_size, True)]
                try:
                    vq.ring.add(bufs, slot)
                except RingFull:
                    break
                pool.free.popleft()
                posted += 1
            vq.ring.publish()
            vq.kick_if_needed(old)
        return posted

    def receive(self, pair: int = 0, *, refill: bool = True) -> list[bytes]:
        """Frames the device completed on pair's RX queue (headers stripped; see `rx_headers`)."""
        vq, pool = self.rx(pair), self._rx_pool[pair]
        frames: list[bytes] = []
        for token, head, length in vq.poll_used():
            slot = token if isinstance(token, int) else -1
            if length > pool.slot_size:
                raise DriverError(
                    f"vq {vq.index}: used len {length} > buffer size {pool.slot_size} (head {head})"
                )
            data = bytes(pool.view(slot)[:length])
            pool.free.append(slot)
            if length == 0 and self._partial[pair] is None:
                # A buffer handed back unused (a back-end draining its rings completes leftover RX buffers
                # with len 0, as vhost does); Linux counts it as a length error and reposts. Not a device bug.
                self.rx_returned += 1
                continue
            frame = self._rx_one(pair, data)
            if frame is not None:
                frames.append(frame)
        if refill:
            self.post_rx_buffers(pair)
        return frames

    def _rx_one(self, pair: int, data: bytes) -> bytes | None:
        hl = self.hdr_len
        partial = self._partial[pair]
        if partial is not None:
            parts, remaining = partial
            parts.append(data)
            if remaining > 1:
                self._partial[pair] = (parts, remaining - 1)
                return None
            self._partial[pair] = None
            return b"".join(parts)
        if len(data) < hl:
            raise DriverError(f"pair {pair}: used len {len(data)} shorter than the {hl}-byte header")
        self.rx_headers.append(data[:hl])
        if not self.mergeable:
            return data[hl:]
        (num_buffers,) = struct.unpack_from("<H", data, 10)
        if num_buffers == 0:
            raise DriverError(f"pair {pair}: num_buffers 0 in a mergeable RX header")
        if num_buffers == 1:
            return data[hl:]
        self._partial[pair] = ([data[hl:]], num_buffers - 1)
        return None

    async def wait_call(self, index: int) -> int:
        """Wait until the device signals vq `index`'s call eventfd; returns the eventfd count."""
        fd = self.vqs[index].call_fd
        await trio.lowlevel.checkpoint()
        while True:
            try:
                n = os.eventfd_read(fd)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                continue
            self.vqs[index].calls += 1
            return n

    async def receive_frames(self, count: int, pair: int = 0) -> list[bytes]:
        """Receive until `count` frames arrived. Bound it with trio.fail_after: a lost frame waits forever."""
        vq = self.rx(pair)
        frames = self.receive(pair)
        while len(frames) < count:
            # poll_used re-armed used_event; entries that landed before that raised no call, so look again
            # before sleeping (the driver-side half of virtio's notification race).
            if not vq.pending_used():
                await self.wait_call(vq.index)
            frames += self.receive(pair)
        return frames

    # TX -----------------------------------------------------------------------------------------------------

    def reclaim_tx(self, pair: int = 0) -> int:
        """Free the TX buffers the device has consumed; returns how many."""
        done = self.tx(pair).poll_used()
        for token, _head, _len in done:
            assert isinstance(token, tuple)
            slot, table = token
            self._tx_pool[pair].free.append(slot)
            if table is not None:
                self._table_pool[pair].free.append(table)
        self.tx_completed += len(done)
        return len(done)

    def send(self, frames: Iterable[bytes], pair: int = 0, *, layout: TxLayout | None = None) -> int:
        """Queue frames on pair's TX queue with a zeroed virtio_net_hdr (no offloads) and kick if the device
        asks. Returns how many were queued: fewer than given when the ring or the buffers are full."""
        layout = layout or self.tx_layout
        if layout == "indirect" and not self.features & NetF.RING_INDIRECT_DESC:
            raise ValueError("indirect TX needs RING_INDIRECT_DESC")
        self.reclaim_tx(pair)
        vq, pool, tables = self.tx(pair), self._tx_pool[pair], self._table_pool[pair]
        hl = self.hdr_len
        old = vq.ring.avail_idx
        sent = 0
        for frame in frames:
            if hl + len(frame) > pool.slot_size:
                raise ValueError(
                    f"frame of {len(frame)} bytes does not fit a {pool.slot_size}-byte TX buffer"
                )
            if not pool.free or (layout == "indirect" and not tables.free):
                break
            slot = pool.free[0]
            view = pool.view(slot)
            view[:hl] = bytes(hl)
            view[hl : hl + len(frame)] = frame
            gpa = pool.gpa(slot)
            if layout == "single":
                bufs = [Buf(gpa, hl + len(frame))]
            else:
                bufs = [Buf(gpa, hl)]
                bufs += [
                    Buf(gpa + hl + o, min(self.tx_chunk, len(frame) - o))
                    for o in range(0, len(frame), self.tx_chunk)
                ]
            table: int | None = None
            try:
                if layout == "indirect":
                    table = tables.free[0]
                    vq.ring.add(bufs, (slot, table), indirect_at=(tables.view(table), tables.gpa(table)))
                    tables.free.popleft()
                else:
                    vq.ring.add(bufs, (slot, None))
            except RingFull:
                break
            pool.free.popleft()
            sent += 1
        vq.ring.publish()
        vq.kick_if_needed(old)
        return sent

    async def send_all(self, frames: Sequence[bytes], pair: int = 0) -> None:
        """Send every frame, waiting for TX completions when the ring is full."""
        i = 0
        while i < len(frames):
            n = self.send(frames[i:], pair)
            i += n
            if i < len(frames) and n == 0:
                vq = self.tx(pair)
                if not vq.pending_used():
                    await self.wait_call(vq.index)


# frames -----------------------------------------------------------------------------------------------------

ETHERTYPE_TEST = 0x88B5  # IEEE local experimental
_MAGIC = b"VDUP"
_FRAME_HDR = struct.Struct("!6s6sH4sQI")  # dst, src, ethertype, magic, seq, total length
MIN_FRAME = _FRAME_HDR.size


def _payload(seq: int, size: int) -> bytes:
    return random.Random(seq * 65537 + size).randbytes(size - MIN_FRAME)


def make_frame(size: int, seq: int, *, dst: bytes = GUEST_MAC, src: bytes = GUEST_MAC) -> bytes:
    """An Ethernet frame of exactly `size` bytes whose payload is a function of (seq, size).

    By default addressed to the guest itself: in a loopback the frame comes back to the guest, and a device
    filtering unicast by the guest's MAC (programmed by the proxy from what it learned) must let it in."""
    if size < MIN_FRAME:
        raise ValueError(f"frame size {size} < {MIN_FRAME}")
    return _FRAME_HDR.pack(dst, src, ETHERTYPE_TEST, _MAGIC, seq, size) + _payload(seq, size)


@dataclasses.dataclass(frozen=True)
class FrameInfo:
    dst: bytes
    src: bytes
    seq: int
    size: int


def parse_frame(frame: bytes) -> FrameInfo | None:
    """The frame's identity if it is an intact `make_frame` frame, else None."""
    if len(frame) < MIN_FRAME:
        return None
    dst, src, etype, magic, seq, size = _FRAME_HDR.unpack_from(frame)
    if etype != ETHERTYPE_TEST or magic != _MAGIC or size != len(frame):
        return None
    if frame[MIN_FRAME:] != _payload(seq, size):
        return None
    return FrameInfo(dst, src, seq, size)


@dataclasses.dataclass
class FrameReport:
    received: int
    lost: list[int]
    duplicated: list[int]
    corrupted: int  # frames that are not intact test frames
    unexpected: list[int]  # intact frames with a sequence number that was not sent
    reordered: bool

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.corrupted or self.unexpected)


def check_frames(sent_seqs: Iterable[int], received: Iterable[bytes]) -> FrameReport:
    """Compare what arrived with the sequence numbers sent."""
    expected = list(sent_seqs)
    want = set(expected)
    seen: collections.Counter[int] = collections.Counter()
    order: list[int] = []
    corrupted = 0
    n = 0
    for frame in received:
        n += 1
        info = parse_frame(frame)
        if info is None:
            corrupted += 1
            continue
        seen[info.seq] += 1
        order.append(info.seq)
    in_order = [s for s in order if s in want]
    rank = {s: i for i, s in enumerate(expected)}
    return FrameReport(
        received=n,
        lost=sorted(want - set(seen)),
        duplicated=sorted(s for s, c in seen.items() if c > 1),
        corrupted=corrupted,
        unexpected=sorted(s for s in seen if s not in want),
        reordered=any(rank[a] > rank[b] for a, b in itertools.pairwise(in_order)),
    )
