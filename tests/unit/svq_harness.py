"""Test rig for the shadow virtqueue core: a Python guest driver, a Python device on the shadow ring, and the
memory both of them see.

Guest memory is an anonymous shared mapping at GPA `GPA_BASE`; the device sees it at `GPA_BASE + iova_shift`
(0 for the identity map that passed-through indirect tables need). Shadow rings live in a separate mapping
that only the proxy and the device see, exactly as in the product.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from collections.abc import Iterator

from vduproxy.svq import DevFlags, GuestFlags, Region, Svq, address_of
from vduproxy.virtio import (
    VIRTIO_NET_HDR_LEN,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
)
from vduproxy.vring import Buf, RingLayout, SplitRingDriver

GPA_BASE = 0x10_0000
GUEST_SIZE = 0x20_0000
IOVA_SHIFT = 0x7F00_0000_0000
PAGE = 4096

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_ELEM = struct.Struct("<II")


def store_u16(mem: memoryview, off: int, value: int) -> None:
    """One 2-byte store, as a ring index needs when the core's thread reads it concurrently: struct.pack_into
    clears the bytes before writing them, and a reader in between sees 0 (an index jump that breaks the vq)."""
    mem[off : off + 2].cast("H")[0] = value & 0xFFFF


def publish(driver: SplitRingDriver) -> None:
    """driver.publish() with the avail idx written in one store (SplitRingDriver.publish uses pack_into, whose
    transient 0 a running core reads as a jump). Mirrors SplitRingDriver.publish otherwise."""
    driver.avail_idx = (driver.avail_idx + driver._pending) & 0xFFFF
    driver._pending = 0
    store_u16(driver.mem, driver.layout.avail_off + 2, driver.avail_idx)


class GuestMemory:
    """The guest's RAM: one region, a bump allocator for rings, tables and buffers."""

    def __init__(self, size: int = GUEST_SIZE, gpa: int = GPA_BASE) -> None:
        self.mm = mmap.mmap(-1, size)
        self.mem = memoryview(self.mm)
        self.size = size
        self.gpa = gpa
        self.local = address_of(self.mm)
        self._next = 0

    def alloc(self, size: int, align: int = 16) -> int:
        """Reserve `size` bytes; returns their GPA."""
        off = (self._next + align - 1) & ~(align - 1)
        if off + size > self.size:
            raise MemoryError("test guest memory exhausted")
        self._next = off + size
        return self.gpa + off

    def view(self, gpa: int, size: int) -> memoryview:
        off = gpa - self.gpa
        assert off >= 0 and off + size <= self.size, f"{gpa:#x}+{size} outside guest memory"
        return self.mem[off : off + size]

    def write(self, gpa: int, data: bytes) -> None:
        self.view(gpa, len(data))[:] = data

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.view(gpa, size))

    def region(self, iova_shift: int) -> Region:
        return Region(gpa=self.gpa, size=self.size, local=self.local, iova=self.gpa + iova_shift)


@dataclasses.dataclass
class DevBuf:
    iova: int
    length: int
    writable: bool


@dataclasses.dataclass
class Chain:
    head: int
    bufs: list[DevBuf]
    indirect: bool  # the ring descriptor pointed at an indirect table


class FakeDevice:
    """The device side of one shadow ring: consumes avail chains, reads/writes their buffers, returns used."""

    def __init__(self, guest: GuestMemory, iova_shift: int, num: int, base: int, *, event_idx: bool) -> None:
        self.guest = guest
        self.iova_shift = iova_shift
        self.layout = RingLayout.for_num(num)
        self.mm = mmap.mmap(-1, self.layout.size)
        self.mem = memoryview(self.mm)
        self.local = address_of(self.mm)
        self.num = num
        self.last_avail = base
        self.used_idx = base
        self.event_idx = event_idx
        self.pages_written: set[int] = set()

    # addresses handed to the core
    @property
    def desc(self) -> int:
        return self.local + self.layout.desc_off

    @property
    def avail(self) -> int:
        return self.local + self.layout.avail_off

    @property
    def used(self) -> int:
        return self.local + self.layout.used_off

    def _u16(self, off: int) -> int:
        return int(_U16.unpack_from(self.mem, off)[0])

    def avail_idx(self) -> int:
        return self._u16(self.layout.avail_off + 2)

    def used_event(self) -> int:
        return self._u16(self.layout.avail_off + 4 + 2 * self.num)

    def set_avail_event(self, value: int) -> None:
        store_u16(self.mem, self.layout.used_off + 4 + 8 * self.num, value)

    def set_no_notify(self, on: bool) -> None:
        store_u16(self.mem, self.layout.used_off, 1 if on else 0)

    def gview(self, iova: int, size: int) -> memoryview:
        return self.guest.view(iova - self.iova_shift, size)

    def pending(self) -> int:
        return (self.avail_idx() - self.last_avail) & 0xFFFF

    def pop(self, limit: int | None = None) -> list[Chain]:
        out: list[Chain] = []
        while self.pending() and (limit is None or len(out) < limit):
            slot = self.layout.avail_off + 4 + 2 * (self.last_avail % self.num)
            out.append(self.walk(self._u16(slot)))
            self.last_avail = (self.last_avail + 1) & 0xFFFF
        return out

    def walk(self, head: int) -> Chain:
        bufs: list[DevBuf] = []
        indirect = False
        idx = head
        for _ in range(self.num):
            addr, length, flags, nxt = _DESC.unpack_from(self.mem, self.layout.desc_off + 16 * idx)
            if flags & VRING_DESC_F_INDIRECT:
                indirect = True
                table = self.gview(addr, length)
                i = 0
                for _ in range(length // 16):
                    a, ln, f, n = _DESC.unpack_from(table, 16 * i)
                    bufs.append(DevBuf(a, ln, bool(f & VRING_DESC_F_WRITE)))
                    if not f & VRING_DESC_F_NEXT:
                        break
                    i = n
            else:
                bufs.append(DevBuf(addr, length, bool(flags & VRING_DESC_F_WRITE)))
            if not flags & VRING_DESC_F_NEXT:
                break
            idx = nxt
        return Chain(head, bufs, indirect)

    def read(self, chain: Chain) -> bytes:
        return b"".join(bytes(self.gview(b.iova, b.length)) for b in chain.bufs if not b.writable)

    def write(self, chain: Chain, data: bytes) -> int:
        """Fill the chain's writable buffers in order; records every guest page touched."""
        done = 0
        for b in chain.bufs:
            if not b.writable or done == len(data):
                continue
            n = min(b.length, len(data) - done)
            self.gview(b.iova, n)[:] = data[done : done + n]
            gpa = b.iova - self.iova_shift
            self.pages_written.update(range(gpa // PAGE, (gpa + n - 1) // PAGE + 1))
            done += n
        assert done == len(data), "chain too small for the data"
        return done

    def complete(self, chain: Chain, length: int) -> None:
        slot = self.layout.used_off + 4 + 8 * (self.used_idx % self.num)
        _ELEM.pack_into(self.mem, slot, chain.head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        store_u16(self.mem, self.layout.used_off + 2, self.used_idx)


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def take(fd: int) -> int:
    """Read and reset an eventfd counter."""
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


@dataclasses.dataclass
class Queue:
    vq: int
    driver: SplitRingDriver
    dev: FakeDevice
    guest_kick: int
    guest_call: int
    dev_kick: int
    dev_call: int


class Rig:
    """An Svq handle wired to a test guest and fake devices. Close it (or use as a context manager)."""

    def __init__(self, nvqs: int = 2, *, iova_shift: int = IOVA_SHIFT, guest_size: int = GUEST_SIZE) -> None:
        self.guest = GuestMemory(guest_size)
        self.iova_shift = iova_shift
        self.svq = Svq(nvqs)
        self.svq.set_regions([self.guest.region(iova_shift)])
        self.queues: dict[int, Queue] = {}
        self._fds: list[int] = []

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.svq.close()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def _eventfd(self) -> int:
        fd = eventfd()
        self._fds.append(fd)
        return fd

    def add_queue(
        self,
        vq: int,
        num: int = 16,
        *,
        guest_base: int = 0,
        shadow_base: int | None = None,
        shadow_num: int | None = None,
        gflags: GuestFlags | int = 0,
        dflags: DevFlags | int = 0,
        call_fd: int | None = None,
    ) -> Queue:
        layout_size = RingLayout.for_num(num).size
        ring_gpa = self.guest.alloc(layout_size, PAGE)
        layout = RingLayout.for_num(num, base_off=ring_gpa - self.guest.gpa)
        driver = SplitRingDriver(self.guest.mem, layout, self.guest.gpa, event_idx=bool(gflags & GuestFlags.EVENT_IDX))
        driver.set_base(guest_base)
        sbase = guest_base if shadow_base is None else shadow_base
        dev = FakeDevice(
            self.guest, self.iova_shift, shadow_num or num, sbase, event_idx=bool(dflags & DevFlags.EVENT_IDX)
        )
        q = Queue(vq, driver, dev, self._eventfd(), self._eventfd(), self._eventfd(), self._eventfd())
        if call_fd is not None:
            q.guest_call = call_fd
        self.attach_guest(q, guest_base, gflags)
        self.svq.attach_shadow(
            vq, num=dev.num, desc=dev.desc, avail=dev.avail, used=dev.used, base=sbase, kick_fd=q.dev_kick,
            call_fd=q.dev_call, flags=dflags,
        )  # fmt: skip
        self.queues[vq] = q
        return q

    def attach_guest(self, q: Queue, last_avail: int, gflags: GuestFlags | int) -> None:
        d = q.driver
        self.svq.attach_guest(
            q.vq, num=d.num, desc=d.desc_addr, avail=d.avail_addr, used=d.used_addr, last_avail=last_avail,
            kick_fd=q.guest_kick, call_fd=q.guest_call, flags=gflags, log_used=d.used_addr,
        )  # fmt: skip

    def buf(self, size: int, data: bytes = b"", *, writable: bool = False, align: int = 16) -> Buf:
        gpa = self.guest.alloc(size, align)
        if data:
            self.guest.write(gpa, data)
        return Buf(gpa, size, writable)

    def table(self, entries: int) -> tuple[memoryview, int]:
        """Room for an indirect table: (guest view, GPA), for SplitRingDriver.add(indirect_at=...)."""
        gpa = self.guest.alloc(16 * entries, 16)
        return self.guest.view(gpa, 16 * entries), gpa


def payload(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def net_hdr(num_buffers: int = 0) -> bytes:
    return bytes(10) + num_buffers.to_bytes(2, "little")


HDR = VIRTIO_NET_HDR_LEN


def pages(gpa: int, size: int) -> Iterator[int]:
    yield from range(gpa // PAGE, (gpa + size - 1) // PAGE + 1)


def log_bit(log: bytes | bytearray | mmap.mmap, page: int) -> bool:
    return bool(log[page >> 3] >> (page & 7) & 1)
