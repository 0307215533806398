"""The vhost-user net back-end: turns protocol requests into guest memory, vring state and data-plane actions.

One instance per front-end connection. Device-independent: everything that touches a device goes through the
`DataPlane` hook (vduproxy.dataplane), so this module can be exercised with no device at all.

Orders real front-ends use and that must all work (DESIGN.md §3, test-bed reports):
- QEMU 7.2: SET_VRING_CALL/ERR/ENABLE before SET_FEATURES and before the memory table; per pair SET_FEATURES;
  SET_MEM_TABLE once; per ring NUM/BASE/ADDR/KICK/CALL; SET_VRING_ENABLE 1 afterwards; stop = GET_VRING_BASE.
- DPDK virtio-user: SET_VRING_CALL before SET_FEATURES; SET_VRING_ENABLE after KICK; in server-mode reconnect
  GET_VRING_BASE and SET_VRING_ENABLE 0 arrive before any negotiation.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import time
from typing import Any, Protocol

import trio

from . import virtio
from .log import get_logger
from .memory import MemoryMap, RegionSpec
from .vhost_user.connection import ProtocolError, Request
from .vhost_user.wire import (
    DEVICE_STATE_NOFD,
    DeviceStateTransfer,
    LogArea,
    MemoryTable,
    ProtocolF,
    Rarp,
    TransferDirection,
    TransferPhase,
    VringAddr,
    VringFile,
    VringState,
)
from .virtio import VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, NetF

log = get_logger(__name__)


# What the back-end offers toward the front-end when no device narrows it. Deliberately absent (DESIGN.md §3):
# RING_RESET, RSS, HASH_REPORT, ACCESS_PLATFORM/IOMMU_PLATFORM, RING_PACKED (split rings only), IN_ORDER.
DEFAULT_FEATURES = (
    NetF.CSUM
    | NetF.GUEST_CSUM
    | NetF.MTU
    | NetF.MAC
    | NetF.MRG_RXBUF
    | NetF.STATUS
    | NetF.CTRL_VQ
    | NetF.CTRL_RX
    | NetF.CTRL_VLAN
    | NetF.GUEST_ANNOUNCE
    | NetF.MQ
    | NetF.CTRL_MAC_ADDR
    | NetF.RING_INDIRECT_DESC
    | NetF.RING_EVENT_IDX
    | NetF.VERSION_1
    | NetF.ANY_LAYOUT
)
NEVER_OFFERED = (
    NetF.ACCESS_PLATFORM
    | NetF.RING_RESET
    | NetF.RSS
    | NetF.HASH_REPORT
    | NetF.RING_PACKED
    | NetF.IN_ORDER
    | NetF.NOTIFICATION_DATA
    | NetF.SR_IOV
    | NetF.ORDER_PLATFORM
)
# No STATUS: QEMU 7.2 sends SET_STATUS(0) before GET_VRING_BASE.
# No BACKEND_REQ/CONFIG/INFLIGHT/POSTCOPY: nothing here uses them.
# DEVICE_STATE (QEMU >= 8.2) carries the migration blob in band; QEMU 7.2 ignores it (the blob then travels out of
# band through the control socket or a file).
OFFERED_PROTOCOL = (
    ProtocolF.MQ | ProtocolF.LOG_SHMFD | ProtocolF.RARP | ProtocolF.REPLY_ACK | ProtocolF.NET_MTU
    | ProtocolF.DEVICE_STATE
)  # fmt: skip
MAX_STATE_BLOB = 1 << 20  # a peer-controlled size: capped


class RingError(Exception):
    """A ring-level error: the ring becomes unusable (broken) but the connection survives."""


@dataclasses.dataclass
class Reply:
    value: Any = None
    error: int = 0
    fds: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Vring:
    index: int
    num: int = 0
    # addresses as the front-end sent them (its virtual addresses) and as GPAs once translated
    desc_uva: int = 0
    avail_uva: int = 0
    used_uva: int = 0
    log_gpa: int = 0
    addr_flags: int = 0
    desc_gpa: int | None = None
    avail_gpa: int | None = None
    used_gpa: int | None = None
    base: int = 0
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1
    has_addr: bool = False
    has_kick: bool = False  # a SET_VRING_KICK arrived (fd or NOFD)
    enabled: bool = False
    started: bool = False  # handed to the data plane
    broken: str | None = None

    def close_fds(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, name, -1)

    def snapshot(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "num": self.num,
            "base": self.base,
            "enabled": self.enabled,
            "started": self.started,
            "broken": self.broken,
        }


@dataclasses.dataclass(frozen=True)
class FrontendSnapshot:
    """What the front-end negotiated and where its rings are: the vhost-user half of the migration state."""

    guest_features: int
    protocol_features: int
    max_pairs: int
    rings: tuple[Vring, ...]
    mtu: int | None
    rarp_mac: bytes | None


class DataPlane(Protocol):
    """What the back-end asks of the layer that moves packets (device passthrough, SVQ, or nothing)."""

    def device_features(self) -> int | None:
        """Features the data path can carry toward the guest, or None for no device."""
        ...

    def supports_dirty_log(self) -> bool:
        """Whether LOG_ALL / LOG_SHMFD may be offered (without them QEMU refuses to migrate: the safe answer)."""
        ...

    def max_pairs(self) -> int: ...
    def max_ring_size(self) -> int: ...
    def mtu(self) -> int | None: ...
    async def set_memory(self, mem: MemoryMap | None) -> None: ...
    async def set_features(self, features: int) -> None: ...
    async def start_ring(self, ring: Vring) -> None: ...
    async def stop_ring(self, ring: Vring) -> int:
        """Stop the ring; return the exact next avail index to hand back (GET_VRING_BASE)."""
        ...

    async def set_log(self, log_fd: int, size: int, offset: int) -> None: ...
    async def ring_log_changed(self, ring: Vring) -> None: ...
    async def ring_call_changed(self, ring: Vring) -> bool:
        """A running ring got a new call fd: True if applied in place (no restart needed)."""
        ...

    async def set_mac(self, mac: bytes, source: str) -> None: ...
    def save_state(self, frontend: FrontendSnapshot) -> bytes:
        """The device-state blob (vduproxy.migration.state) of a stopped device."""
        ...

    def load_state(self, blob: bytes) -> None:
        """Accept a blob to restore into the device before its data queues start (raises on a bad one)."""
        ...

    async def close(self) -> None: ...


class StateTransferError(Exception):
    pass


class NullDataPlane:
    """No device: rings are tracked but nothing is processed, so the base handed back is the one set."""

    def __init__(self, pairs: int = 1) -> None:
        self._pairs = pairs

    def device_features(self) -> int | None:
        return None

    def supports_dirty_log(self) -> bool:
        return True

    def max_pairs(self) -> int:
        return self._pairs

    def max_ring_size(self) -> int:
        return virtio.MAX_RING_SIZE

    def mtu(self) -> int | None:
        return None

    async def set_memory(self, mem: MemoryMap | None) -> None:
        return None

    async def set_features(self, features: int) -> None:
        return None

    async def start_ring(self, ring: Vring) -> None:
        return None

    async def stop_ring(self, ring: Vring) -> int:
        return ring.base

    async def set_log(self, log_fd: int, size: int, offset: int) -> None:
        os.close(log_fd)

    async def ring_log_changed(self, ring: Vring) -> None:
        return None

    async def ring_call_changed(self, ring: Vring) -> bool:
        return True

    async def set_mac(self, mac: bytes, source: str) -> None:
        return None

    def save_state(self, frontend: FrontendSnapshot) -> bytes:
        raise StateTransferError("no device: nothing to save")

    def load_state(self, blob: bytes) -> None:
        raise StateTransferError("no device: nothing to restore into")

    async def close(self) -> None:
        return None


class NetBackend:
    """One front-end connection's view of the net device."""

    def __init__(
        self, conn_id: int, dataplane: DataPlane, *, protocol_features: int = OFFERED_PROTOCOL
    ) -> None:
        self.conn_id = conn_id
        self.dp = dataplane
        self.log = log.bind(conn=conn_id)
        dev = dataplane.device_features()
        base = DEFAULT_FEATURES if dev is None else dev
        if dataplane.mtu() is None:
            base &= ~NetF.MTU
        logging = dataplane.supports_dirty_log()
        self.offered = (base & ~NEVER_OFFERED) | VHOST_USER_F_PROTOCOL_FEATURES | (VHOST_F_LOG_ALL if logging else 0)
        self._protocol_offered = int(protocol_features) & ~(0 if logging else ProtocolF.LOG_SHMFD)
        self.acked: int | None = None
        self.protocol_acked = 0
        self.owner = False
        self.mem: MemoryMap | None = None
        self.pairs = dataplane.max_pairs()
        self.rings = [Vring(i) for i in range(2 * self.pairs)]
        self.mtu: int | None = None
        self.rarp_mac: bytes | None = None
        self.closed = False
        self._closing = False
        self.touched_pairs = 0
        self._nursery: trio.Nursery | None = None
        self._transfer: trio.Event | None = None  # set when the device-state pipe transfer finished
        self._transfer_error: str | None = None

    def bind_nursery(self, nursery: trio.Nursery) -> None:
        """Where background work of this connection runs (the device-state pipe transfer, the data plane's)."""
        self._nursery = nursery
        bind = getattr(self.dp, "bind_nursery", None)
        if bind is not None:
            bind(nursery)

    def snapshot(self) -> FrontendSnapshot:
        return FrontendSnapshot(
            guest_features=self.acked or 0,
            protocol_features=self.protocol_acked,
            max_pairs=max(self.touched_pairs, 1),
            rings=tuple(dataclasses.replace(r, kick_fd=-1, call_fd=-1, err_fd=-1) for r in self.rings),
            mtu=self.mtu,
            rarp_mac=self.rarp_mac,
        )

    # --- server-facing -------------------------------------------------------------------------------------
    def offered_protocol_features(self) -> int:
        return self._protocol_offered

    async def handle(self, req: Request) -> Reply:
        handler = getattr(self, "_on_" + req.req.name.lower(), None)
        if handler is None:
            # The connection already rejected what we never offered; anything else is a gap worth seeing.
            raise ProtocolError(req.req.name, "request not supported by this back-end")
        try:
            reply: Reply = await handler(req)
        except RingError as exc:
            self.log.error("vring_error", request=req.req.name, reason=str(exc))
            return Reply(error=1)
        return reply

    async def close(self) -> None:
        if self.closed or self._closing:
            return
        # `closed` only once everything is released: the session reports this connection as attached until then
        self._closing = True
        try:
            await self._close()
        finally:
            self.closed = True

    async def _close(self) -> None:
        for ring in self.rings:
            if ring.started:
                try:
                    await self.dp.stop_ring(ring)
                except Exception as exc:  # cleanup must go on whatever a device does
                    self.log.warning("stop_ring_failed", vq=ring.index, error=str(exc))
                ring.started = False
            ring.close_fds()
        await self.dp.close()
        if self.mem is not None:
            self.mem.close()
            self.mem = None

    # --- helpers --------------------------------------------------------------------------------------------
    def _ring(self, req: Request, index: int) -> Vring:
        if not 0 <= index < len(self.rings):
            raise ProtocolError(req.req.name, f"vring index {index} out of range (0..{len(self.rings) - 1})")
        # The pairs a front-end really has (QEMU's queues=N) show in the rings it touches; GET_QUEUE_NUM only
        # says how many it may have. The migration state records the former.
        self.touched_pairs = max(self.touched_pairs, index // 2 + 1)
        return self.rings[index]

    def _protocol_features_on(self) -> bool:
        return self.acked is not None and bool(self.acked & VHOST_USER_F_PROTOCOL_FEATURES)

    def _translate(self, ring: Vring) -> None:
        """Front-end VAs → GPAs, and check each ring part lies inside guest memory."""
        if self.mem is None or not ring.has_addr or ring.num == 0:
            return
        parts = (
            ("desc", ring.desc_uva, virtio.desc_table_size(ring.num)),
            ("avail", ring.avail_uva, virtio.avail_ring_size(ring.num)),
            ("used", ring.used_uva, virtio.used_ring_size(ring.num)),
        )
        gpas = []
        for name, uva, size in parts:
            try:
                gpa = self.mem.uva_to_gpa(uva)
                self.mem.gpa_to_local(gpa, size)
            except Exception as exc:
                raise RingError(
                    f"vring {ring.index} {name} ring at uva {uva:#x} not in guest memory: {exc}"
                ) from exc
            gpas.append(gpa)
        ring.desc_gpa, ring.avail_gpa, ring.used_gpa = gpas

    def _ready(self, ring: Vring) -> bool:
        enabled = ring.enabled or not self._protocol_features_on()
        return (
            ring.broken is None
            and self.mem is not None
            and ring.num > 0
            and ring.has_addr
            and ring.has_kick
            and enabled
            and ring.desc_gpa is not None
            and self.acked is not None
        )

    async def _reevaluate(self, ring: Vring) -> None:
        if self._ready(ring) and not ring.started:
            ring.started = True
            self.log.info("vring_start", vq=ring.index, num=ring.num, base=ring.base)
            await self.dp.start_ring(ring)
        elif ring.started and not self._ready(ring):
            ring.base = await self.dp.stop_ring(ring)
            ring.started = False
            self.log.info("vring_stop", vq=ring.index, base=ring.base)

    def _set_fd(self, req: Request, ring: Vring, attr: str) -> None:
        body = req.body_as(VringFile)
        old = getattr(ring, attr)
        if old >= 0:
            os.close(old)
        setattr(ring, attr, -1 if body.nofd else req.fds.take(0))

    # --- handlers (one per request; name = _on_<request name>) ---------------------------------------------
    async def _on_get_features(self, req: Request) -> Reply:
        return Reply(self.offered)

    async def _on_set_features(self, req: Request) -> Reply:
        features = req.u64
        unknown = features & ~self.offered
        if unknown:
            raise ProtocolError(req.req.name, f"features {unknown:#x} were never offered")
        first = self.acked is None
        old = self.acked or 0
        self.acked = features
        if first or old != features:
            self.log.info("features_acked", features=hex(features), log_all=bool(features & VHOST_F_LOG_ALL))
        await self.dp.set_features(features)
        return Reply()

    async def _on_get_protocol_features(self, req: Request) -> Reply:
        return Reply(self._protocol_offered)

    async def _on_set_protocol_features(self, req: Request) -> Reply:
        value = req.u64
        if value & ~self._protocol_offered:
            raise ProtocolError(
                req.req.name, f"protocol features {value & ~self._protocol_offered:#x} never offered"
            )
        self.protocol_acked = value
        return Reply()

    async def _on_set_owner(self, req: Request) -> Reply:
        self.owner = True
        return Reply()

    async def _on_reset_owner(self, req: Request) -> Reply:
        for ring in self.rings:
            if ring.started:
                await self.dp.stop_ring(ring)
            ring.close_fds()
        self.rings = [Vring(i) for i in range(2 * self.pairs)]
        self.acked = None
        self.owner = False
        return Reply()

    async def _on_get_queue_num(self, req: Request) -> Reply:
        return Reply(self.pairs)

    async def _on_set_mem_table(self, req: Request) -> Reply:
        specs = [
            RegionSpec(
                gpa=r.guest_phys_addr,
                size=r.memory_size,
                uva=r.userspace_addr,
                mmap_offset=r.mmap_offset,
                fd=req.fds.take(i),
            )
            for i, r in enumerate(req.body_as(MemoryTable).regions)
        ]
        try:
            new = MemoryMap.build(specs)  # owns (and on failure has closed) every fd
        except Exception as exc:
            raise ProtocolError(req.req.name, f"cannot map guest memory: {exc}") from exc
        old = self.mem
        running = [r for r in self.rings if r.started]
        for ring in running:  # the data plane must never see a ring whose memory is gone
            ring.base = await self.dp.stop_ring(ring)
            ring.started = False
        self.mem = new
        await self.dp.set_memory(new)
        if old is not None:
            old.close()
        self.log.info("memory_table", regions=[(hex(s.gpa), s.size) for s in specs])
        for ring in self.rings:
            try:
                self._translate(ring)
            except RingError as exc:
                ring.broken = str(exc)
                self.log.error("vring_broken", vq=ring.index, reason=ring.broken)
            await self._reevaluate(ring)
        return Reply()

    async def _on_set_vring_num(self, req: Request) -> Reply:
        body = req.body_as(VringState)
        ring = self._ring(req, body.index)
        if ring.started:
            # checked first: a running ring must not be left with a size the device does not have
            raise RingError(f"vring {ring.index}: SET_VRING_NUM while the ring runs")
        num = body.num
        maxn = self.dp.max_ring_size()
        if not virtio.is_pow2(num) or num > maxn:
            ring.num = 0
            ring.broken = f"ring size {num} is not a power of two <= {maxn}"
            raise RingError(ring.broken)
        ring.num = num
        ring.broken = None
        return Reply()

    async def _on_set_vring_addr(self, req: Request) -> Reply:
        body = req.body_as(VringAddr)
        ring = self._ring(req, body.index)
        same = (ring.desc_uva, ring.avail_uva, ring.used_uva) == (
            body.desc_user_addr,
            body.avail_user_addr,
            body.used_user_addr,
        )
        if ring.started and same:
            # QEMU re-sends the address of a running ring to switch dirty logging on or off: no restart.
            ring.log_gpa = body.log_guest_addr
            ring.addr_flags = body.flags
            await self.dp.ring_log_changed(ring)
            return Reply()
        if ring.started:
            ring.base = await self.dp.stop_ring(ring)
            ring.started = False
        ring.desc_uva, ring.avail_uva, ring.used_uva = (
            body.desc_user_addr,
            body.avail_user_addr,
            body.used_user_addr,
        )
        ring.log_gpa = body.log_guest_addr
        ring.addr_flags = body.flags
        ring.has_addr = True
        try:
            self._translate(ring)
        except RingError as exc:
            ring.broken = str(exc)
            raise
        await self._reevaluate(ring)
        return Reply()

    async def _on_set_vring_base(self, req: Request) -> Reply:
        body = req.body_as(VringState)
        ring = self._ring(req, body.index)
        if ring.started:
            raise RingError(f"vring {ring.index}: SET_VRING_BASE while the ring runs")
        ring.base = body.num & 0xFFFF
        return Reply()

    async def _on_get_vring_base(self, req: Request) -> Reply:
        t0 = time.perf_counter()
        ring = self._ring(req, req.body_as(VringState).index)
        was_running = ring.started
        if ring.started:
            ring.base = await self.dp.stop_ring(ring)
            ring.started = False
        # GET_VRING_BASE stops the ring: it needs a new kick before it runs again.
        if ring.kick_fd >= 0:
            os.close(ring.kick_fd)
            ring.kick_fd = -1
        ring.has_kick = False
        # took_us: what the front-end waits for its reply (drain, and the restart of the rings that stay)
        took_us = round((time.perf_counter() - t0) * 1e6)
        self.log.info("vring_stopped", vq=ring.index, base=ring.base, was_running=was_running, took_us=took_us)
        return Reply(VringState(ring.index, ring.base))

    async def _on_set_vring_kick(self, req: Request) -> Reply:
        ring = self._ring(req, req.body_as(VringFile).index)
        if ring.started:
            ring.base = await self.dp.stop_ring(ring)
            ring.started = False
        self._set_fd(req, ring, "kick_fd")
        ring.has_kick = True
        await self._reevaluate(ring)
        return Reply()

    async def _on_set_vring_call(self, req: Request) -> Reply:
        ring = self._ring(req, req.body_as(VringFile).index)
        if ring.started:
            self._set_fd(req, ring, "call_fd")
            # QEMU sends the call fd right after the kick: applied in place when the data plane can, else a restart
            if await self.dp.ring_call_changed(ring):
                return Reply()
            ring.base = await self.dp.stop_ring(ring)
            ring.started = False
            await self._reevaluate(ring)
            return Reply()
        self._set_fd(req, ring, "call_fd")
        await self._reevaluate(ring)
        return Reply()

    async def _on_set_vring_err(self, req: Request) -> Reply:
        ring = self._ring(req, req.body_as(VringFile).index)
        self._set_fd(req, ring, "err_fd")
        return Reply()

    async def _on_set_vring_enable(self, req: Request) -> Reply:
        body = req.body_as(VringState)
        ring = self._ring(req, body.index)
        if body.num not in (0, 1):
            raise RingError(f"vring {ring.index}: SET_VRING_ENABLE with {body.num}")
        ring.enabled = bool(body.num)
        await self._reevaluate(ring)
        return Reply()

    async def _on_send_rarp(self, req: Request) -> Reply:
        mac = req.body_as(Rarp).mac
        self.rarp_mac = mac
        self.log.info("rarp_requested", mac=mac.hex(":"))
        await self.dp.set_mac(mac, "send_rarp")
        return Reply()

    async def _on_net_set_mtu(self, req: Request) -> Reply:
        mtu = req.u64
        limit = self.dp.mtu()
        if mtu < 68 or (limit is not None and mtu > limit):
            self.log.error("mtu_rejected", mtu=mtu, limit=limit)
            return Reply(error=1)
        self.mtu = mtu
        return Reply()

    async def _on_set_log_base(self, req: Request) -> Reply:
        body = req.body_as(LogArea)
        fd = req.fds.take(0)
        try:
            await self.dp.set_log(fd, body.mmap_size, body.mmap_offset)  # owns (and closes) fd on every path
        except (ValueError, OSError) as exc:
            # the previous log (if any) stays in use; QEMU sees the failure in the reply
            self.log.error("dirty_log_rejected", size=body.mmap_size, offset=body.mmap_offset, error=str(exc))
            return Reply(error=1)
        return Reply()

    async def _on_set_device_state_fd(self, req: Request) -> Reply:
        body = req.body_as(DeviceStateTransfer)
        fd = req.fds.take(0)
        if body.phase != TransferPhase.STOPPED or any(r.started for r in self.rings):
            os.close(fd)
            self.log.error("device_state_refused", reason="rings still running or unknown phase", phase=body.phase)
            return Reply(error=1)
        if self._nursery is None:
            os.close(fd)
            return Reply(error=1)
        os.set_blocking(fd, False)
        self._transfer, self._transfer_error = trio.Event(), None
        if body.direction == TransferDirection.SAVE:
            try:
                blob = self.dp.save_state(self.snapshot())
            except Exception as exc:
                os.close(fd)
                self._transfer_error = str(exc)
                self._transfer.set()
                self.log.error("device_state_save_failed", error=str(exc))
                return Reply(error=1)
            self._nursery.start_soon(self._write_state, fd, blob, self._transfer)
        else:
            self._nursery.start_soon(self._read_state, fd, self._transfer)
        return Reply(DEVICE_STATE_NOFD)

    async def _write_state(self, fd: int, blob: bytes, done: trio.Event) -> None:
        view = memoryview(blob)
        try:
            while view:
                try:
                    n = os.write(fd, view)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(fd)
                    continue
                view = view[n:]
            self.log.info("device_state_saved", bytes=len(blob), transport="vhost-user")
        except OSError as exc:
            self._transfer_error = f"writing the state pipe: {exc}"
        finally:
            os.close(fd)
            done.set()

    async def _read_state(self, fd: int, done: trio.Event) -> None:
        chunks: list[bytes] = []
        total = 0
        try:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(fd)
                    continue
                if not chunk:
                    break
                total += len(chunk)
                if total > MAX_STATE_BLOB:
                    raise StateTransferError(f"device state larger than {MAX_STATE_BLOB} bytes")
                chunks.append(chunk)
            self.dp.load_state(b"".join(chunks))
            self.log.info("device_state_loaded", bytes=total, transport="vhost-user")
        except Exception as exc:  # a bad blob is reported through CHECK_DEVICE_STATE
            self._transfer_error = str(exc)
            self.log.error("device_state_load_failed", error=str(exc))
        finally:
            os.close(fd)
            done.set()

    async def _on_check_device_state(self, req: Request) -> Reply:
        if self._transfer is None:
            return Reply(errno.EINVAL)
        with trio.move_on_after(30):
            await self._transfer.wait()
        if not self._transfer.is_set():
            return Reply(errno.ETIMEDOUT)
        self._transfer = None
        return Reply(1 if self._transfer_error else 0)

    async def _on_set_log_fd(self, req: Request) -> Reply:
        os.close(req.fds.take(0))
        return Reply()
