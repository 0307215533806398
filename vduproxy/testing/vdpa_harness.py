"""A test driver for any `VdpaDevice`: it plays the virtio-net *driver*, as the proxy or a guest kernel would.

The same harness drives the software device and a real /dev/vhost-vdpa-N, so everything goes through the
Protocol only: rings and buffers live in a memfd (MAP_SHARED: VA-mode vDPA drivers skip anonymous private
memory) mapped through the IOTLB, notifications are eventfds, and the MAC comes from config space. Frames are
addressed so that vdpa_sim_net's unicast filter accepts them (device MAC or broadcast) unless a test wants
otherwise, and every frame carries the 12-byte virtio_net_hdr_v1 (VERSION_1 is always negotiated).

Waiting is never an assertion: a wait has a deadline only so that a broken device fails a test instead of
hanging it. Whether a frame was *filtered* is decided with a marker frame sent after it on the same queue
pair: the loopback preserves order, so anything not received before the marker was dropped.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
import mmap
import os
import random
import resource
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType

import trio

from ..log import get_logger
from ..vdpa.device import BackendF, DeviceError, DeviceFault, IovaRange, Perm, VdpaDevice, VqStats, program_vq
from ..virtio import VIRTIO_NET_HDR_LEN, NetF, Status, describe_features
from ..vring import Buf, RingLayout, SplitRingDriver

log = get_logger(__name__)

PAGE = 4096
ETH_HLEN = 14
VLAN_TPID = 0x8100
# IEEE 802 "local experimental" ethertype: no stack anywhere will consume these frames
TEST_ETHERTYPE = 0x88B5
BROADCAST = b"\xff" * 6
HARNESS_SRC_MAC = bytes.fromhex("020000c0ffee")
MARKER_MAGIC = b"VDUPROXY-HARNESS-MARKER"

# Everything the harness knows how to drive. Offloads are left out on purpose: with them the device may
# rewrite or segment frames and a byte-for-byte loopback comparison would no longer hold.
DEFAULT_WANTED = (
    NetF.VERSION_1
    | NetF.ACCESS_PLATFORM
    | NetF.MAC
    | NetF.MTU
    | NetF.STATUS
    | NetF.MRG_RXBUF
    | NetF.CTRL_VQ
    | NetF.CTRL_RX
    | NetF.CTRL_RX_EXTRA
    | NetF.CTRL_VLAN
    | NetF.CTRL_MAC_ADDR
    | NetF.MQ
    | NetF.ANY_LAYOUT
)
REQUIRED = NetF.VERSION_1 | NetF.ACCESS_PLATFORM
DEFAULT_BACKEND_WANTED = (
    BackendF.IOTLB_MSG_V2 | BackendF.IOTLB_BATCH | BackendF.IOTLB_ASID | BackendF.SUSPEND | BackendF.RESUME
)

# struct virtio_net_config offsets (virtio 1.3 §5.1.4)
CFG_MAC = 0
CFG_STATUS = 6
CFG_MAX_PAIRS = 8
CFG_MTU = 10

# control virtqueue (virtio 1.3 §5.1.6.5)
CTRL_RX = 0
CTRL_RX_PROMISC = 0
CTRL_RX_ALLMULTI = 1
CTRL_RX_ALLUNI = 2
CTRL_RX_NOMULTI = 3
CTRL_RX_NOUNI = 4
CTRL_RX_NOBCAST = 5
CTRL_MAC = 1
CTRL_MAC_TABLE_SET = 0
CTRL_MAC_ADDR_SET = 1
CTRL_VLAN = 2
CTRL_VLAN_ADD = 0
CTRL_VLAN_DEL = 1
CTRL_MQ = 4
CTRL_MQ_VQ_PAIRS_SET = 0
CTRL_OK = 0
CTRL_ERR = 1

_HDR = struct.Struct("<BBHHHHH")  # virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_*, num_buffers
_CVQ_ACK_PENDING = 0xFF
_ARENA_CVQ_SCRATCH = 2 * PAGE


class HarnessError(Exception):
    """The device did not behave as a virtio-net device must for the harness to drive it."""


class HarnessTimeout(HarnessError):
    """A wait for the device ran past its deadline (the device is stuck or dropped something)."""


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def make_frame(dst: bytes, size: int, *, seq: int = 0, src: bytes = HARNESS_SRC_MAC, vlan: int | None = None) -> bytes:
    """An Ethernet frame of exactly `size` bytes (no FCS) with a payload that differs per `seq`, so a frame
    that comes back truncated, shifted or swapped with another one does not compare equal."""
    head = dst + src
    if vlan is not None:
        head += struct.pack("!HH", VLAN_TPID, vlan & 0x0FFF)
    head += struct.pack("!H", TEST_ETHERTYPE)
    if size < len(head) + 8:
        raise ValueError(f"frame size {size} too small for its headers")
    rnd = random.Random(seq)
    body = struct.pack("!Q", seq) + rnd.randbytes(size - len(head) - 8)
    return head + body


def frame_seq(frame: bytes) -> int | None:
    """The `seq` a frame from `make_frame` carries (None for other frames)."""
    off = 12
    if len(frame) >= 18 and struct.unpack_from("!H", frame, 12)[0] == VLAN_TPID:
        off = 16
    if len(frame) < off + 10 or struct.unpack_from("!H", frame, off)[0] != TEST_ETHERTYPE:
        return None
    return int(struct.unpack_from("!Q", frame, off + 2)[0])


@dataclasses.dataclass
class Arena:
    """One memfd, mapped here (MAP_SHARED) and into one ASID of the device at `iova`."""

    name: str
    size: int
    iova: int
    asid: int
    fd: int = -1
    mm: mmap.mmap | None = None
    uaddr: int = 0
    used: int = 0
    limit: int = 0  # front allocations stay below this (0: the whole arena)
    mapped: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (iova, size) IOTLB entries

    def open(self) -> None:
        self.fd = os.memfd_create(f"vduproxy-harness-{self.name}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.mm = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # the ctypes view pins an export of the mmap only while it lives: take the address and drop it
        anchor = ctypes.c_char.from_buffer(self.mm)
        self.uaddr = ctypes.addressof(anchor)
        del anchor

    @property
    def view(self) -> memoryview:
        if self.mm is None:
            raise HarnessError(f"arena {self.name} is closed")
        return memoryview(self.mm)

    def alloc(self, size: int, align: int = 64) -> int:
        """Offset of a fresh `size`-byte block."""
        off = _round_up(self.used, align)
        if off + size > (self.limit or self.size):
            raise HarnessError(f"arena {self.name}: {size} bytes do not fit ({self.used}/{self.size} used)")
        self.used = off + size
        return off

    def close(self) -> None:
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclasses.dataclass
class Vq:
    index: int
    ring: SplitRingDriver
    arena: Arena
    kick: int
    call: int
    calls_seen: int = 0
    # RX: buffer slots (offset in arena) free to post; TX: slots free to fill
    slot_off: int = 0
    slot_size: int = 0
    free_slots: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class RxCompletion:
    """One received frame: the header the device wrote and the Ethernet frame after it."""

    header: bytes
    frame: bytes
    num_buffers: int


class DeviceHarness:
    """Bring a device up as a virtio-net driver and move frames through it.

    `start()` does the whole bring-up; the steps are public so that a test can stop between them (for
    example to check that set_features fails after FEATURES_OK). The harness does not own the device:
    `close()` resets it and frees the harness's memory, eventfds and maps, the caller closes the device.
    """

    def __init__(
        self,
        device: VdpaDevice,
        *,
        wanted: int = DEFAULT_WANTED,
        backend_wanted: int = DEFAULT_BACKEND_WANTED,
        pairs: int | None = None,
        ring_num: int | None = None,
        base: int = 0,
        rx_buf_size: int | None = None,
        use_cvq: bool = True,
        clamp_pairs: bool = False,
        prefill_rx: bool = True,
        timeout: float | None = None,
    ) -> None:
        self.device = device
        self.wanted = wanted
        self.backend_wanted = backend_wanted
        self.requested_pairs = pairs
        self.requested_ring_num = ring_num
        self.base = base & 0xFFFF
        self.requested_rx_buf_size = rx_buf_size
        self.use_cvq = use_cvq
        self.clamp_pairs = clamp_pairs
        self.prefill_rx = prefill_rx
        self.timeout = timeout if timeout is not None else float(os.environ.get("VDUPROXY_TEST_TIMEOUT", "10"))
        self.log = log.bind(device=device.name)

        self.offered = 0
        self.features = 0
        self.backend_offered = 0
        self.backend_features = 0
        self.iova_range = IovaRange(0, 0)
        self.max_pairs = 1
        self.pairs = 1
        self.ring_num = 0
        self.rx_buf_size = 0
        self.tx_slot_size = 0
        self.cvq_index: int | None = None
        self.cvq_asid = 0
        self.arenas: list[Arena] = []
        self.vqs: dict[int, Vq] = {}
        self._cvq_scratch = 0
        self._tx_region = 0
        self._rx_backlog: dict[int, list[RxCompletion]] = {}
        self._rx_partial: dict[int, list[tuple[int, int]]] = {}
        self._marker_seq = itertools.count(1)
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> DeviceHarness:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> DeviceHarness:
        self.negotiate_backend()
        self.negotiate()
        return self.bring_up()

    def bring_up(self) -> DeviceHarness:
        """Everything after feature negotiation: memory, vqs, DRIVER_OK, RX buffers posted."""
        self.plan()
        self.map_memory()
        self.setup_vqs()
        self.driver_ok()
        if self.prefill_rx:
            for pair in range(self.pairs):
                self.post_rx(pair)
        return self

    def negotiate_backend(self) -> int:
        """Reset the device and ack the backend features we can use (before anything that depends on them,
        as vhost-vdpa wants: IOTLB message format and ASIDs follow from this ack)."""
        self.device.set_status(0)
        if self.device.get_device_id() != 1:
            raise HarnessError(f"{self.device.name} is not a net device (id {self.device.get_device_id()})")
        self.backend_offered = self.device.get_backend_features()
        self.backend_features = self.backend_offered & self.backend_wanted
        self.device.set_backend_features(self.backend_features)
        self.log.debug("backend_features", offered=hex(self.backend_offered), acked=hex(self.backend_features))
        return self.backend_features

    def negotiate(self) -> int:
        """ACK → DRIVER → set_features(offered ∩ wanted) → FEATURES_OK, and check that FEATURES_OK stuck."""
        dev = self.device
        self.offered = dev.get_features()
        missing = REQUIRED & ~self.offered
        if missing:
            raise HarnessError(f"device does not offer {describe_features(missing)}")
        dev.set_status(Status.ACKNOWLEDGE)
        dev.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
        self.features = self.offered & self.wanted
        dev.set_features(self.features)
        dev.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        if not dev.get_status() & Status.FEATURES_OK:
            raise HarnessError(f"device refused features {describe_features(self.features)}")
        self.log.debug("features", offered=describe_features(self.offered), acked=describe_features(self.features))
        return self.features

    def has(self, feature: int) -> bool:
        """Whether `feature` was negotiated."""
        return self.features & feature == feature

    def has_backend(self, feature: int) -> bool:
        return self.backend_features & feature == feature

    def plan(self) -> None:
        """Decide queue pairs, ring size, buffer sizes and where the CVQ lives."""
        dev = self.device
        self.max_pairs = self.config_max_pairs() if self.has(NetF.MQ) else 1
        want_pairs = self.requested_pairs if self.requested_pairs is not None else 1
        if self.clamp_pairs:
            want_pairs = min(want_pairs, self.max_pairs)
        if not 1 <= want_pairs <= self.max_pairs:
            raise HarnessError(f"{want_pairs} queue pairs requested, device has {self.max_pairs}")
        self.pairs = want_pairs
        ring_max = dev.get_vring_num_max()
        self.ring_num = min(self.requested_ring_num or 256, ring_max)
        max_frame = self.max_frame_size() + 4  # room for one VLAN tag
        if self.requested_rx_buf_size is not None:
            self.rx_buf_size = self.requested_rx_buf_size
        elif self.has(NetF.MRG_RXBUF):
            # smaller than a full frame on purpose, so that large frames exercise num_buffers > 1
            self.rx_buf_size = 1024
        else:
            self.rx_buf_size = _round_up(VIRTIO_NET_HDR_LEN + max_frame, 64)
        self.tx_slot_size = _round_up(VIRTIO_NET_HDR_LEN + max_frame, 64)
        if self.use_cvq and self.has(NetF.CTRL_VQ):
            self.cvq_index = 2 * self.max_pairs if self.has(NetF.MQ) else 2
            if self.cvq_index >= dev.get_vqs_count():
                raise HarnessError(f"CVQ index {self.cvq_index} but only {dev.get_vqs_count()} vqs")
            self.cvq_asid = 0
            if (
                self.has_backend(BackendF.IOTLB_ASID)
                and dev.get_groups_num() > 1
                and dev.get_as_num() > 1
                and dev.get_vring_group(self.cvq_index) != dev.get_vring_group(0)
            ):
                self.cvq_asid = 1

    def map_memory(self) -> None:
        """Create the arenas and map each through the IOTLB inside one batch."""
        self.iova_range = self.device.get_iova_range()
        rings = 2 * self.pairs * RingLayout.for_num(self.ring_num).size
        rx = self.pairs * self.ring_num * self.rx_buf_size
        tx = self.pairs * self.ring_num * self.tx_slot_size
        cvq_in_data = self.cvq_index is not None and self.cvq_asid == 0
        cvq_bytes = RingLayout.for_num(self.ring_num).size + _ARENA_CVQ_SCRATCH
        # + one page per allocation for alignment padding
        slack = (4 * self.pairs + 2) * PAGE
        rw_size = _round_up(rings + rx + (cvq_bytes if cvq_in_data else 0) + slack, PAGE)
        size = rw_size + _round_up(tx, PAGE)
        iova = self._choose_iova(size)
        data = Arena("data", size, iova, asid=0)
        self.arenas.append(data)
        if self.cvq_index is not None and self.cvq_asid != 0:
            # the same IOVA in the other address space: proves the spaces are separate
            self.arenas.append(Arena("cvq", _round_up(cvq_bytes, PAGE), iova, asid=self.cvq_asid))
        need = sum(a.size for a in self.arenas)
        _raise_memlock(need)
        for a in self.arenas:
            a.open()
        if self.cvq_index is not None and self.cvq_asid != 0:
            self.device.set_group_asid(self.device.get_vring_group(self.cvq_index), self.cvq_asid)
        with self.device.iotlb_batch():
            # device-writable part (rings, RX buffers, CVQ) and a read-only part (TX buffers): two updates,
            # so the device sees both permissions and more than one entry per batch
            self._map(data, 0, rw_size, Perm.RW)
            self._map(data, rw_size, size - rw_size, Perm.RO)
            for a in self.arenas[1:]:
                self._map(a, 0, a.size, Perm.RW)
        # TX slots sit in the read-only tail; everything else is allocated from the front
        data.used = 0
        data.limit = rw_size
        self._tx_region = rw_size
        self.log.debug("memory_mapped", iova=hex(iova), size=size, cvq_asid=self.cvq_asid)

    def _map(self, arena: Arena, off: int, size: int, perm: Perm) -> None:
        if size <= 0:
            return
        self.device.iotlb_update(arena.iova + off, size, arena.uaddr + off, perm, asid=arena.asid)
        arena.mapped.append((arena.iova + off, size))

    def _choose_iova(self, size: int) -> int:
        r = self.iova_range
        # away from 0 (a zero IOVA hides bugs that treat 0 as "unset"), 2 MiB aligned, inside the range;
        # preferably with unmapped room after it for tests that need an IOVA nobody mapped
        for room in (64 << 20, 0):
            for cand in (0x10000000, _round_up(r.first, 1 << 21), _round_up(r.first, PAGE)):
                if r.contains(cand, size + room):
                    return cand
        raise HarnessError(f"no room for {size} bytes in IOVA range {r.first:#x}-{r.last:#x}")

    def setup_vqs(self) -> None:
        data = self.arenas[0]
        for pair in range(self.pairs):
            rx = self._setup_vq(2 * pair, data)
            rx.slot_off = data.alloc(self.ring_num * self.rx_buf_size)
            rx.slot_size = self.rx_buf_size
            rx.free_slots = list(range(self.ring_num))
            tx = self._setup_vq(2 * pair + 1, data)
            tx.slot_off = self._tx_region + pair * self.ring_num * self.tx_slot_size
            tx.slot_size = self.tx_slot_size
            tx.free_slots = list(range(self.ring_num))
            self._rx_backlog[pair] = []
            self._rx_partial[pair] = []
        if self.cvq_index is not None:
            arena = self.arenas[1] if self.cvq_asid != 0 else data
            self._setup_vq(self.cvq_index, arena)
            self._cvq_scratch = arena.alloc(_ARENA_CVQ_SCRATCH, PAGE)

    def _setup_vq(self, index: int, arena: Arena) -> Vq:
        layout = RingLayout.for_num(self.ring_num, arena.alloc(RingLayout.for_num(self.ring_num).size, PAGE))
        ring = SplitRingDriver(arena.view, layout, arena.iova)
        if self.base:
            ring.set_base(self.base)
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        vq = Vq(index, ring, arena, kick, call)
        self.vqs[index] = vq
        program_vq(
            self.device, index, num=self.ring_num, desc=ring.desc_addr, avail=ring.avail_addr, used=ring.used_addr,
            base=self.base, kick=kick, call=call,
        )  # fmt: skip
        return vq

    def driver_ok(self) -> None:
        st = Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK
        self.device.set_status(st)
        got = self.device.get_status()
        if got & st != st:
            raise HarnessError(f"DRIVER_OK did not stick: status {got:#x}")
        self._started = True
        self.log.info(
            "harness_started",
            features=describe_features(self.features),
            pairs=self.pairs,
            ring_num=self.ring_num,
            cvq=self.cvq_index,
            cvq_asid=self.cvq_asid,
        )

    def close(self) -> None:
        """Reset the device, drop our maps, detach and close eventfds, free memory. Never raises for a device
        that already failed: the test that broke it reports that, cleanup must not mask it."""
        dev = self.device
        with contextlib.suppress(DeviceError):
            dev.set_status(0)
        for a in self.arenas:
            for iova, size in a.mapped:
                # maps are gone after a reset unless IOTLB_PERSIST was acked; invalidating is harmless then
                with contextlib.suppress(DeviceError):
                    dev.iotlb_invalidate(iova, size, asid=a.asid)
            a.mapped.clear()
        for vq in self.vqs.values():
            with contextlib.suppress(DeviceError):
                dev.set_vring_kick(vq.index, -1)
            with contextlib.suppress(DeviceError):
                dev.set_vring_call(vq.index, -1)
            os.close(vq.kick)
            os.close(vq.call)
            vq.ring.mem.release()
        self.vqs.clear()
        for a in self.arenas:
            a.close()
        self.arenas.clear()
        self._started = False

    # ------------------------------------------------------------------ config space

    def config_mac(self) -> bytes:
        return self.device.get_config(CFG_MAC, 6)

    @property
    def mac(self) -> bytes:
        """The device's current MAC (config space); broadcast when it has none, so frames still pass."""
        if not self.offered & NetF.MAC:
            return BROADCAST
        return self.config_mac()

    def config_max_pairs(self) -> int:
        return int(struct.unpack("<H", self.device.get_config(CFG_MAX_PAIRS, 2))[0])

    def config_mtu(self) -> int | None:
        if not self.offered & NetF.MTU:
            return None
        return int(struct.unpack("<H", self.device.get_config(CFG_MTU, 2))[0])

    def max_frame_size(self) -> int:
        """Largest untagged frame (no FCS) the negotiated configuration allows."""
        mtu = self.config_mtu() if self.has(NetF.MTU) else None
        return ETH_HLEN + (mtu if mtu else 1500)

    # ------------------------------------------------------------------ vq access

    def rx_vq(self, pair: int) -> Vq:
        return self.vqs[2 * pair]

    def tx_vq(self, pair: int) -> Vq:
        return self.vqs[2 * pair + 1]

    def kick(self, index: int) -> None:
        os.eventfd_write(self.vqs[index].kick, 1)

    def used_idx(self, index: int) -> int:
        return self.vqs[index].ring.used_idx()

    def avail_idx(self, index: int) -> int:
        return self.vqs[index].ring.avail_idx

    def stats(self, index: int) -> VqStats:
        return self.device.vq_stats(index)

    def _take_call(self, vq: Vq) -> None:
        with contextlib.suppress(BlockingIOError):
            vq.calls_seen += os.eventfd_read(vq.call)

    async def _wait_call(self, vq: Vq, deadline: float) -> None:
        """Wait for the vq's call eventfd (or a short while: a lost interrupt must not hide a used entry that
        is already there, and polling again is harmless)."""
        with trio.move_on_at(min(deadline, trio.current_time() + 0.25)):
            await trio.lowlevel.wait_readable(vq.call)
        self._take_call(vq)

    def _deadline(self, timeout: float | None) -> float:
        return trio.current_time() + (self.timeout if timeout is None else timeout)

    # ------------------------------------------------------------------ RX

    def post_rx(self, pair: int, count: int | None = None) -> int:
        """Post up to `count` free RX buffers (all of them by default) and kick; returns how many."""
        vq = self.rx_vq(pair)
        n = len(vq.free_slots) if count is None else min(count, len(vq.free_slots))
        for _ in range(n):
            slot = vq.free_slots.pop()
            addr = vq.arena.iova + vq.slot_off + slot * vq.slot_size
            vq.ring.add([Buf(addr, vq.slot_size, writable=True)], token=slot)
        if n:
            vq.ring.publish()
            self.kick(vq.index)
        return n

    def _collect_rx(self, pair: int) -> None:
        """Move completed RX chains into the backlog as frames and give their buffers back to the device."""
        vq = self.rx_vq(pair)
        self._take_call(vq)
        partial = self._rx_partial[pair]
        with vq.arena.view as mem:
            self._parse_rx(vq, pair, partial, mem)
        self.post_rx(pair)

    def _parse_rx(self, vq: Vq, pair: int, partial: list[tuple[int, int]], mem: memoryview) -> None:
        for token, _head, length in vq.ring.poll_used():
            assert isinstance(token, int)
            off = vq.slot_off + token * vq.slot_size
            if length > vq.slot_size:
                raise HarnessError(f"vq {vq.index}: device wrote {length} bytes into a {vq.slot_size}-byte buffer")
            partial.append((off, length))
            vq.free_slots.append(token)
        while partial:
            off, length = partial[0]
            if length < VIRTIO_NET_HDR_LEN:
                raise HarnessError(f"vq {vq.index}: used length {length} shorter than the virtio-net header")
            header = bytes(mem[off : off + VIRTIO_NET_HDR_LEN])
            nbuf = _HDR.unpack(header)[6] if self.has(NetF.MRG_RXBUF) else 1
            if nbuf < 1:
                raise HarnessError(f"vq {vq.index}: num_buffers {nbuf} in a merged RX header")
            if len(partial) < nbuf:
                break  # the rest of this frame is not in the used ring yet
            parts = [bytes(mem[off + VIRTIO_NET_HDR_LEN : off + length])]
            parts += [bytes(mem[o : o + n]) for o, n in partial[1:nbuf]]
            del partial[:nbuf]
            self._rx_backlog[pair].append(RxCompletion(header, b"".join(parts), nbuf))

    def take_received(self, pair: int) -> list[RxCompletion]:
        """Frames already received on `pair` (without waiting)."""
        self._collect_rx(pair)
        out, self._rx_backlog[pair] = self._rx_backlog[pair], []
        return out

    async def receive_completions(
        self, pair: int = 0, count: int = 1, timeout: float | None = None
    ) -> list[RxCompletion]:
        """Wait until `count` frames arrived on `pair`; return them with the header the device wrote."""
        deadline = self._deadline(timeout)
        vq = self.rx_vq(pair)
        while True:
            self._collect_rx(pair)
            backlog = self._rx_backlog[pair]
            if len(backlog) >= count:
                self._rx_backlog[pair] = backlog[count:]
                return backlog[:count]
            if trio.current_time() >= deadline:
                raise HarnessTimeout(
                    f"vq {vq.index}: {len(backlog)} of {count} frames received; "
                    f"used idx {vq.ring.used_idx()}, stats {self.stats(vq.index)}"
                )
            await self._wait_call(vq, deadline)

    async def receive(self, pair: int = 0, count: int = 1, timeout: float | None = None) -> list[bytes]:
        """Wait until `count` frames arrived on `pair`, return them (Ethernet frames, header stripped)."""
        return [c.frame for c in await self.receive_completions(pair, count, timeout)]

    # ------------------------------------------------------------------ TX

    def post_tx(self, frames: Sequence[bytes], pair: int = 0, *, kick: bool = True) -> int:
        """Queue as many frames as there are free TX slots (with a zeroed virtio_net_hdr_v1 in front of each);
        returns how many were queued."""
        vq = self.tx_vq(pair)
        n = min(len(frames), len(vq.free_slots))
        for frame in frames[:n]:
            if VIRTIO_NET_HDR_LEN + len(frame) > vq.slot_size:
                raise HarnessError(f"frame of {len(frame)} bytes exceeds the TX slot ({vq.slot_size})")
        with vq.arena.view as mem:
            for frame in frames[:n]:
                slot = vq.free_slots.pop()
                off = vq.slot_off + slot * vq.slot_size
                pkt = bytes(VIRTIO_NET_HDR_LEN) + frame
                mem[off : off + len(pkt)] = pkt
                vq.ring.add([Buf(vq.arena.iova + off, len(pkt))], token=slot)
        if n:
            vq.ring.publish()
            if kick:
                self.kick(vq.index)
        return n

    def reap_tx(self, pair: int = 0) -> int:
        """Free the slots of completed TX chains; returns how many completed."""
        vq = self.tx_vq(pair)
        self._take_call(vq)
        done = vq.ring.poll_used()
        for token, _head, _len in done:
            assert isinstance(token, int)
            vq.free_slots.append(token)
        return len(done)

    async def wait_used(self, index: int, target: int, timeout: float | None = None) -> None:
        """Wait until the device's used idx of vq `index` reaches `target` (mod 2^16)."""
        vq = self.vqs[index]
        deadline = self._deadline(timeout)
        while vq.ring.used_idx() != target & 0xFFFF:
            if trio.current_time() >= deadline:
                raise HarnessTimeout(
                    f"vq {index}: used idx {vq.ring.used_idx()}, waiting for {target & 0xFFFF}; "
                    f"stats {self.stats(index)}"
                )
            await self._wait_call(vq, deadline)

    async def send(self, frames: Sequence[bytes], pair: int = 0, timeout: float | None = None) -> None:
        """Transmit every frame and wait until the device consumed them all."""
        vq = self.tx_vq(pair)
        deadline = self._deadline(timeout)
        rest = list(frames)
        while True:
            self.reap_tx(pair)
            if rest:
                n = self.post_tx(rest, pair)
                rest = rest[n:]
                if n:
                    continue
            if not vq.ring.in_flight():
                return
            if trio.current_time() >= deadline:
                raise HarnessTimeout(
                    f"vq {vq.index}: {vq.ring.in_flight()} TX chains not consumed, {len(rest)} not queued; "
                    f"stats {self.stats(vq.index)}"
                )
            await self._wait_call(vq, deadline)

    def marker(self, dst: bytes | None = None) -> bytes:
        seq = next(self._marker_seq)
        return (
            (dst or self.mac)
            + HARNESS_SRC_MAC
            + struct.pack("!H", TEST_ETHERTYPE)
            + MARKER_MAGIC
            + struct.pack("!Q", seq).ljust(60 - ETH_HLEN - len(MARKER_MAGIC), b"\0")
        )

    def _chunk(self) -> int:
        """Frames per TX burst such that RX never runs out of posted buffers in between."""
        per_frame = -(-(VIRTIO_NET_HDR_LEN + self.max_frame_size() + 4) // self.rx_buf_size)
        return max(1, self.ring_num // (2 * per_frame))

    async def roundtrip(
        self,
        frames: Sequence[bytes],
        pair: int = 0,
        *,
        marker_dst: bytes | None = None,
        timeout: float | None = None,
    ) -> list[bytes]:
        """Send `frames` then a marker on `pair`; return every frame received on that pair before the marker.
        Frames missing from the result were dropped by the device (the loopback keeps order)."""
        marker = self.marker(marker_dst)
        received: list[bytes] = []
        batch = self._chunk()
        for i in range(0, len(frames), batch):
            await self.send(frames[i : i + batch], pair, timeout)
            received += [c.frame for c in self.take_received(pair)]
        await self.send([marker], pair, timeout)
        deadline = self._deadline(timeout)
        while marker not in received:
            if trio.current_time() >= deadline:
                raise HarnessTimeout(
                    f"pair {pair}: marker frame to {mac_str(marker[:6])} never came back "
                    f"({len(received)} other frames did)"
                )
            received += await self.receive(pair, 1, max(0.0, deadline - trio.current_time()))
        after = received[received.index(marker) + 1 :]
        if after:
            raise HarnessError(f"pair {pair}: {len(after)} frames arrived after the marker (reordered)")
        return received[: received.index(marker)]

    # ------------------------------------------------------------------ raw descriptors

    def post_raw(self, index: int, bufs: list[Buf]) -> int:
        """Put an arbitrary chain on vq `index` (e.g. at unmapped IOVAs) and kick; returns the head."""
        vq = self.vqs[index]
        head = vq.ring.add_and_publish(bufs, token=None)
        self.kick(index)
        return head

    def unmapped_iova(self, size: int = PAGE) -> int:
        """An IOVA inside the device's range that none of our maps covers (in any ASID)."""
        ends = [a.iova + a.size for a in self.arenas]
        cand = _round_up(max(ends) + (16 << 20), PAGE)
        if self.iova_range.contains(cand, size):
            return cand
        starts = [a.iova for a in self.arenas]
        cand = min(starts) - (16 << 20)
        if cand >= 0 and self.iova_range.contains(cand, size):
            return cand
        raise HarnessError("no unmapped IOVA inside the device range")

    # ------------------------------------------------------------------ faults

    async def wait_faults(self, timeout: float | None = None) -> list[DeviceFault]:
        """Wait for device fault events (only for devices with a fault fd)."""
        fd = self.device.fault_fd()
        if fd < 0:
            raise HarnessError(f"{self.device.name} reports no fault events")
        deadline = self._deadline(timeout)
        faults: list[DeviceFault] = []
        while not faults:
            faults = self.device.take_faults()
            if faults:
                break
            if trio.current_time() >= deadline:
                raise HarnessTimeout("no device fault reported")
            with trio.move_on_at(min(deadline, trio.current_time() + 0.25)):
                await trio.lowlevel.wait_readable(fd)
        return faults

    # ------------------------------------------------------------------ control virtqueue

    async def ctrl(self, cls: int, cmd: int, data: bytes = b"", timeout: float | None = None) -> int:
        """Run one control command and return the device's ack (CTRL_OK / CTRL_ERR)."""
        if self.cvq_index is None:
            raise HarnessError("no control virtqueue (CTRL_VQ not negotiated)")
        vq = self.vqs[self.cvq_index]
        if len(data) > _ARENA_CVQ_SCRATCH - 128:
            raise HarnessError(f"control command payload of {len(data)} bytes too large")
        base = self._cvq_scratch
        hdr_off, ack_off, data_off = base, base + 64, base + 128
        with vq.arena.view as mem:
            mem[hdr_off : hdr_off + 2] = bytes([cls, cmd])
            mem[data_off : data_off + len(data)] = data
            mem[ack_off] = _CVQ_ACK_PENDING
        iova = vq.arena.iova
        bufs = [Buf(iova + hdr_off, 2)]
        if data:
            bufs.append(Buf(iova + data_off, len(data)))
        bufs.append(Buf(iova + ack_off, 1, writable=True))
        target = (vq.ring.avail_idx + 1) & 0xFFFF
        vq.ring.add_and_publish(bufs)
        self.kick(vq.index)
        try:
            await self.wait_used(vq.index, target, timeout)
        finally:
            vq.ring.poll_used()
        with vq.arena.view as mem:
            ack = int(mem[ack_off])
        self.log.debug("ctrl", cls=cls, cmd=cmd, data=data.hex(), ack=ack)
        if ack == _CVQ_ACK_PENDING:
            raise HarnessError(f"control command {cls}/{cmd} completed without an ack byte")
        return ack

    async def set_mac(self, mac: bytes) -> int:
        return await self.ctrl(CTRL_MAC, CTRL_MAC_ADDR_SET, mac)

    async def set_rx_mode(self, cmd: int, on: bool) -> int:
        return await self.ctrl(CTRL_RX, cmd, bytes([1 if on else 0]))

    async def set_mac_table(self, unicast: Iterable[bytes], multicast: Iterable[bytes]) -> int:
        uni, multi = list(unicast), list(multicast)
        data = struct.pack("<I", len(uni)) + b"".join(uni) + struct.pack("<I", len(multi)) + b"".join(multi)
        return await self.ctrl(CTRL_MAC, CTRL_MAC_TABLE_SET, data)

    async def vlan_add(self, vid: int) -> int:
        return await self.ctrl(CTRL_VLAN, CTRL_VLAN_ADD, struct.pack("<H", vid))

    async def vlan_del(self, vid: int) -> int:
        return await self.ctrl(CTRL_VLAN, CTRL_VLAN_DEL, struct.pack("<H", vid))

    async def set_pairs(self, pairs: int) -> int:
        return await self.ctrl(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", pairs))

    # ------------------------------------------------------------------ suspend / base / resume

    def suspend(self) -> None:
        self.device.suspend()

    def resume(self) -> None:
        self.device.resume()

    def get_bases(self) -> dict[int, int]:
        """The device's next avail index for every vq the harness set up."""
        return {i: self.device.get_vring_base(i) for i in sorted(self.vqs)}

    def kick_all(self) -> None:
        for index in self.vqs:
            self.kick(index)


# the profiles a device suite must always cover, even if the profile directory cannot be listed
REQUIRED_SIM_PROFILES = ("rich", "vdpasim")


def sim_profile_names() -> list[str]:
    """Sim profiles to test: $VDUPROXY_TEST_SIM_PROFILES (comma-separated) or every shipped one."""
    env = os.environ.get("VDUPROXY_TEST_SIM_PROFILES")
    if env:
        return [p.strip() for p in env.split(",") if p.strip()]
    from .. import vdpa

    found = {p.stem for p in (Path(vdpa.__file__).parent / "profiles").glob("*.toml")}
    return sorted(found | set(REQUIRED_SIM_PROFILES))


def suite_device_specs() -> list[str]:
    """Device specs for a device suite: each sim profile, plus every path in $VDUPROXY_TEST_VDPA
    (comma-separated); only those paths when $VDUPROXY_TEST_VDPA_ONLY is set."""
    kernel = [p.strip() for p in os.environ.get("VDUPROXY_TEST_VDPA", "").split(",") if p.strip()]
    if os.environ.get("VDUPROXY_TEST_VDPA_ONLY") and kernel:
        return kernel
    return [f"sim:profile={name}" for name in sim_profile_names()] + kernel


def open_spec(spec: str) -> VdpaDevice:
    """Open a device by spec through the same factory the proxy uses (imported late: it pulls in the sim)."""
    from ..vdpa.factory import open_device

    dev: VdpaDevice = open_device(spec)
    return dev


def _raise_memlock(need: int) -> None:
    """vhost-vdpa pins mapped pages against RLIMIT_MEMLOCK (8 MiB by default for root in a bare guest)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY or soft >= 2 * need + (64 << 20):
        return
    for limit in ((resource.RLIM_INFINITY, resource.RLIM_INFINITY), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, limit)
            return
        except (ValueError, OSError):
            continue
    log.warning("memlock_not_raised", soft=soft, hard=hard, need=need)
