"""Driver side of a split virtqueue laid out in a buffer the caller owns.

Used by the test guest (vduproxy.testing), the device test harness and the proxy's own CVQ client: all of them
play the *driver* role toward some device. Addresses written into descriptors are whatever address space the
device reads through (GPA for a guest ring, IOVA for a ring handed to a vDPA device); the caller supplies them.
Not for the hot path: the data path in the product is C.
"""

from __future__ import annotations

import dataclasses
import struct

from .virtio import (
    DESC_SIZE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    avail_ring_size,
    is_pow2,
    used_ring_size,
)

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


class RingFull(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class RingLayout:
    """Offsets of the three parts inside one contiguous area, each aligned as virtio 1.x requires."""

    num: int
    desc_off: int
    avail_off: int
    used_off: int
    size: int

    @classmethod
    def for_num(cls, num: int, base_off: int = 0) -> RingLayout:
        if not is_pow2(num) or num > 32768:
            raise ValueError(f"ring size {num} is not a power of two <= 32768")
        desc = base_off
        avail = desc + DESC_SIZE * num
        used = (avail + avail_ring_size(num) + 3) & ~3
        end = used + used_ring_size(num)
        return cls(num, desc, avail, used, ((end + 4095) & ~4095) - base_off)


@dataclasses.dataclass(frozen=True)
class Buf:
    """One buffer of a chain: its device-visible address and length."""

    addr: int
    length: int
    writable: bool = False


class SplitRingDriver:
    """Driver side of one split ring.

    `mem` is the buffer holding the ring at `layout` offsets; `dev_addr` is the device-visible address of
    offset 0 of `mem` (so the ring parts are at dev_addr + layout.*_off).
    """

    def __init__(
        self, mem: memoryview, layout: RingLayout, dev_addr: int, *, event_idx: bool = False
    ) -> None:
        self.mem = mem
        self.layout = layout
        self.num = layout.num
        self.dev_addr = dev_addr
        self.event_idx = event_idx
        self.avail_idx = 0
        self.last_used = 0
        self.free = list(range(self.num))
        self.chain_of: dict[int, list[int]] = {}
        self.tokens: dict[int, object] = {}
        self._pending = 0
        mem[layout.desc_off : layout.used_off + used_ring_size(self.num)] = bytes(
            layout.used_off + used_ring_size(self.num) - layout.desc_off
        )

    def _store16(self, off: int, value: int) -> None:
        """Ring fields are shared with a device running on another thread: each must change in one aligned 16-bit
        store. struct.pack_into zero-fills its target before writing, so a concurrent reader could see a
        transient 0 (an index jumping backwards). The views are released at once: a live export would keep the
        owner from closing its mmap."""
        assert off % 2 == 0
        with self.mem[off : off + 2] as raw, raw.cast("H") as u16:
            u16[0] = value

    # addresses the device is given
    @property
    def desc_addr(self) -> int:
        return self.dev_addr + self.layout.desc_off

    @property
    def avail_addr(self) -> int:
        return self.dev_addr + self.layout.avail_off

    @property
    def used_addr(self) -> int:
        return self.dev_addr + self.layout.used_off

    def set_base(self, idx: int) -> None:
        """Start at a given index (resuming a ring after migration or reconnect)."""
        self.avail_idx = idx & 0xFFFF
        self.last_used = idx & 0xFFFF
        self._store16(self.layout.avail_off + 2, self.avail_idx)
        self._store16(self.layout.used_off + 2, self.last_used)

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        _DESC.pack_into(self.mem, self.layout.desc_off + DESC_SIZE * i, addr, length, flags, nxt)

    def add(
        self, bufs: list[Buf], token: object = None, *, indirect_at: tuple[memoryview, int] | None = None
    ) -> int:
        """Queue one chain; returns its head. With `indirect_at=(table_mem, table_dev_addr)` the chain goes into
        an indirect table in that buffer and uses one ring descriptor."""
        if not bufs:
            raise ValueError("empty chain")
        if indirect_at is not None:
            table, table_addr = indirect_at
            for k, b in enumerate(bufs):
                flags = (VRING_DESC_F_WRITE if b.writable else 0) | (
                    VRING_DESC_F_NEXT if k + 1 < len(bufs) else 0
                )
                _DESC.pack_into(
                    table, DESC_SIZE * k, b.addr, b.length, flags, k + 1 if k + 1 < len(bufs) else 0
                )
            if not self.free:
                raise RingFull
            head = self.free.pop()
            self.write_desc(head, table_addr, DESC_SIZE * len(bufs), VRING_DESC_F_INDIRECT, 0)
            ids = [head]
        else:
            if len(self.free) < len(bufs):
                raise RingFull
            ids = [self.free.pop() for _ in bufs]
            for k, b in enumerate(bufs):
                last = k + 1 == len(bufs)
                flags = (VRING_DESC_F_WRITE if b.writable else 0) | (0 if last else VRING_DESC_F_NEXT)
                self.write_desc(ids[k], b.addr, b.length, flags, 0 if last else ids[k + 1])
            head = ids[0]
        self.chain_of[head] = ids
        self.tokens[head] = token
        slot = self.layout.avail_off + 4 + 2 * ((self.avail_idx + self._pending) % self.num)
        self._store16(slot, head)
        self._pending += 1
        return head

    def publish(self) -> None:
        """Make every added chain visible (one avail->idx store)."""
        self.avail_idx = (self.avail_idx + self._pending) & 0xFFFF
        self._pending = 0
        self._store16(self.layout.avail_off + 2, self.avail_idx)

    def add_and_publish(self, bufs: list[Buf], token: object = None) -> int:
        head = self.add(bufs, token)
        self.publish()
        return head

    def in_flight(self) -> int:
        return len(self.chain_of)

    def poll_used(self) -> list[tuple[object, int, int]]:
        """Collect completed chains: (token, head, used len), in used-ring order; frees their descriptors."""
        out = []
        used_idx = _U16.unpack_from(self.mem, self.layout.used_off + 2)[0]
        while self.last_used != used_idx:
            elem = self.layout.used_off + 4 + 8 * (self.last_used % self.num)
            head, length = _USED_ELEM.unpack_from(self.mem, elem)
            ids = self.chain_of.pop(head, None)
            if ids is None:
                raise RuntimeError(f"device returned unknown head {head}")
            self.free.extend(ids)
            out.append((self.tokens.pop(head), head, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx:
            # used_event: ask to be called as soon as the next entry lands
            self._store16(self.layout.avail_off + 4 + 2 * self.num, self.last_used)
        return out

    def used_idx(self) -> int:
        return int(_U16.unpack_from(self.mem, self.layout.used_off + 2)[0])

    def set_no_interrupt(self, on: bool) -> None:
        self._store16(self.layout.avail_off, VRING_AVAIL_F_NO_INTERRUPT if on else 0)

    def needs_kick(self, old_avail: int) -> bool:
        """Whether the device asked to be kicked for avail moving from old_avail to the current index."""
        used_off = self.layout.used_off
        if self.event_idx:
            avail_event = int(_U16.unpack_from(self.mem, used_off + 4 + 8 * self.num)[0])
            return ((self.avail_idx - avail_event - 1) & 0xFFFF) < ((self.avail_idx - old_avail) & 0xFFFF)
        return not (_U16.unpack_from(self.mem, used_off)[0] & 1)
