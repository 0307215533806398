"""Data planes: what happens to a vring once the front-end has set it up.

- `DeviceSession` owns one vDPA device for the daemon's lifetime (a second open of /dev/vhost-vdpa-N is EBUSY,
  so it is opened once, probed once, and reset between front-end connections).
- `DeviceDataPlane` drives that device for one connection, in one of two modes (DESIGN.md §1):
  * passthrough: the guest's rings go to the device as they are (IOVA = GPA, the guest's kick/call fds);
  * shadow (SVQ): the device gets shadow rings in proxy memory, and the C core (vduproxy.svq) forwards between
    them and the guest's rings, logging every guest page written while the front-end asks for dirty logging.

Guest memory is mapped at IOVA = GPA in both modes, so a mode switch never remaps guest memory and shadow
descriptors carry the guest's own addresses. Shadow rings and the proxy's CVQ live high in the IOVA range.

vhost-user has no DRIVER_OK (STATUS is not offered to QEMU 7.2), and a vhost-vdpa device cannot take new ring
addresses after DRIVER_OK, so every change (a ring starts or stops, new memory, a mode switch) is applied the same
way: stop the SVQ thread, suspend, read each ring's exact base (draining the SVQ), reset, configure, DRIVER_OK.
With IOTLB_PERSIST (the sim; Linux >= 6.7) the maps survive that reset, so what did not move (guest memory, the
shadow area, the CVQ) is not mapped again: a mode switch then costs ring programming, not page pinning.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import mmap
import os
import stat
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from .backend import FrontendSnapshot, NetBackend, NullDataPlane, StateTransferError, Vring
from .config import DEFAULT_BUSY_POLL_US
from .log import get_logger, held
from .memory import MemoryMap
from .migration.compat import Severity, check_compat, device_summary
from .migration.restore import RestoreError, apply_restore, cvq_caps, plan_restore
from .migration.state import RX_MODE_DEFAULT, DeviceState, MacSource, StateError
from .migration.state import VringState as SavedVring
from .svq import INJECT_SLOT, NET_HDR_LEN_DEVICE, DevFlags, GuestFlags, Region, Svq, SvqError
from .vdpa.cvq import CvqClient, CvqError
from .vdpa.device import BackendF, DeviceError, Perm, VdpaDevice, program_vq
from .virtio import VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, NetF, Status
from .vring import RingLayout

log = get_logger(__name__)

WANTED_BACKEND = (
    BackendF.IOTLB_MSG_V2 | BackendF.IOTLB_BATCH | BackendF.IOTLB_ASID | BackendF.SUSPEND | BackendF.RESUME
    | BackendF.ENABLE_AFTER_DRIVER_OK | BackendF.IOTLB_PERSIST
)  # fmt: skip
# What the SVQ can give a guest whatever the device does (so a guest can move to a device from another vendor):
# indirect tables are flattened, num_buffers is written, event idx is handled per side, and guest receive
# offloads only allow the device to send something it never has to.
SVQ_BRIDGED = NetF.MRG_RXBUF | NetF.RING_INDIRECT_DESC | NetF.RING_EVENT_IDX  # need the SVQ when the device lacks them
GUEST_RX_OFFLOADS = NetF.GUEST_CSUM | NetF.GUEST_TSO4 | NetF.GUEST_TSO6 | NetF.GUEST_ECN | NetF.GUEST_UFO
BRIDGEABLE = SVQ_BRIDGED | GUEST_RX_OFFLOADS  # the offloads need nothing: the device just never uses them
MAC_SOURCES = {"--mac": MacSource.CLI, "send_rarp": MacSource.RARP, "tx": MacSource.TX, "state": MacSource.STATE}
# Features the proxy keeps for itself on the device side: it owns the device's control queue.
PROXY_DEVICE_FEATURES = NetF.CTRL_VQ | NetF.CTRL_MAC_ADDR | NetF.MQ
# Never passed to the guest: the guest's CVQ is emulated by QEMU for vhost-user (DESIGN.md §3).
GUEST_HIDDEN = (
    NetF.ACCESS_PLATFORM | NetF.CTRL_VQ | NetF.CTRL_RX | NetF.CTRL_VLAN | NetF.CTRL_MAC_ADDR
    | NetF.CTRL_GUEST_OFFLOADS | NetF.GUEST_ANNOUNCE | NetF.CTRL_RX_EXTRA
)  # fmt: skip
IOVA_CEILING = (1 << 48) - 1  # stay inside what every IOMMU-backed parent can address
PAGE = 4096
CVQ_AREA = 16 * PAGE
ANNOUNCE_HOLD = 1.5  # s after the last RARP before a transient SVQ goes (QEMU's announce rounds: ~1.25 s)
RESTART_GRACE = 0.002  # s: a front-end's next GET_VRING_BASE comes within a round trip (QEMU, DPDK: < 0.1 ms)
SVQ_MODES = ("auto", "always", "never")


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    name: str
    features: int
    backend_features: int
    mac: bytes
    max_pairs: int
    mtu: int | None
    vqs: int
    ring_max: int
    iova_first: int
    iova_last: int


class DeviceSession:
    """One device, probed once; shared by the successive connections of one socket."""

    def __init__(
        self, device: VdpaDevice, *, queues: int | None = None, mac: bytes | None = None, svq: str = "auto",
        svq_busy_poll_us: int = DEFAULT_BUSY_POLL_US,
    ) -> None:  # fmt: skip
        if svq not in SVQ_MODES:
            raise ValueError(f"svq mode {svq!r} not in {SVQ_MODES}")
        self.svq_busy_poll_us = svq_busy_poll_us
        self.device = device
        self.mac_override = mac
        self.svq_mode = svq
        features = device.get_features()
        backend = device.get_backend_features() & WANTED_BACKEND
        device.set_backend_features(backend)
        cfg = device.get_config(0, 12)
        dev_mac, _status, max_pairs, mtu = struct.unpack_from("<6sHHH", cfg)
        if not features & NetF.MQ or not features & NetF.CTRL_VQ:
            max_pairs = 1
        if queues is not None:
            if not 1 <= queues <= max(max_pairs, 1):
                raise DeviceError("queues", f"device has {max_pairs} queue pair(s), {queues} requested")
            max_pairs = queues
        rng = device.get_iova_range()
        self.info = DeviceInfo(
            name=device.name,
            features=features,
            backend_features=backend,
            mac=dev_mac if features & NetF.MAC else b"",
            max_pairs=max(max_pairs, 1),
            mtu=mtu if features & NetF.MTU else None,
            vqs=device.get_vqs_count(),
            ring_max=device.get_vring_num_max(),
            iova_first=rng.first,
            iova_last=rng.last,
        )
        self.backends: list[NetBackend] = []  # live connections (one at a time per socket)
        self.pending_state: DeviceState | None = None  # to restore before the data queues next start
        self.net_state: DeviceState | None = None  # the last restored state: its net settings carry on
        # (CVQ index, negotiated features) -> whether the CVQ can have an address space of its own: the answer
        # is fixed per device and negotiation, and asking costs a few calls on every passthrough start.
        self.cvq_isolation: dict[tuple[int, int], bool] = {}
        log.info(
            "device_probed", device=device.name, features=hex(features), backend_features=hex(backend),
            mac=dev_mac.hex(":"), max_pairs=self.info.max_pairs, ring_max=self.info.ring_max, vqs=self.info.vqs,
            svq=svq,
        )  # fmt: skip

    def reset(self) -> None:
        self.device.set_status(0)

    # --- what the control socket and CLI verbs call ---------------------------------------------------------
    def active(self) -> DeviceDataPlane | None:
        """The data plane of the attached front-end, if any."""
        for backend in reversed(self.backends):
            if not backend.closed and isinstance(backend.dp, DeviceDataPlane):
                return backend.dp
        return None

    def stats(self) -> dict[str, object]:
        """Per-queue counters and the mode; the device's own counters when no front-end is attached."""
        dp = self.active()
        queues: dict[int, dict[str, object]] = dp.stats() if dp is not None else {}
        return {
            "device": self.info.name,
            "attached": dp is not None,
            "mode": None if dp is None or not dp.configured else ("svq" if dp.shadow_active else "passthrough"),
            "svq_policy": self.svq_mode,
            "switches": 0 if dp is None else dp.switches,
            "queues": queues,
        }

    def save_state(self) -> bytes:
        """The device-state blob of the latest front-end (its rings stopped by GET_VRING_BASE)."""
        if not self.backends:
            raise StateError("no front-end has attached: there is no state to save")
        backend = self.backends[-1]
        if any(r.started for r in backend.rings):
            raise StateError("the rings are still running: save after the front-end stopped them (GET_VRING_BASE)")
        return backend.dp.save_state(backend.snapshot())

    def load_state(self, blob: bytes) -> DeviceState:
        """Accept a blob for the next start; refuse it now if this device cannot honour it."""
        state = DeviceState.from_bytes(blob)
        errors = [p for p in check_compat(state, device_summary(self.device)) if p.severity == Severity.ERROR]
        if errors:
            raise StateError(
                "this device cannot honour the saved state: " + "; ".join(f"{p.what}: {p.why}" for p in errors)
            )
        self.pending_state = state
        log.info("device_state_accepted", device=self.info.name, mac=state.mac.hex(":"), pairs=state.pairs)
        return state

    async def force_mode(self, shadow: bool | None) -> str:
        dp = self.active()
        if dp is None:
            raise DeviceError("mode", "no front-end attached")
        await dp.force_mode(shadow)
        return "svq" if dp.shadow_active else "passthrough"

    def close(self) -> None:
        try:
            self.device.set_status(0)
        except DeviceError as exc:  # a vanished device still gets its fd closed
            log.warning("device_reset_failed", device=self.info.name, error=str(exc))
        finally:
            self.device.close()


class _Area:
    """Proxy memory the device reaches through the IOTLB: a memfd mapped MAP_SHARED (VA-mode vDPA drivers skip
    anonymous private memory)."""

    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        anchor = ctypes.c_char.from_buffer(self.mm)
        self.local = ctypes.addressof(anchor)
        del anchor

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


@dataclasses.dataclass
class _Shadow:
    vq: int
    num: int
    layout: RingLayout
    kick: int  # the SVQ writes it to kick the device
    call: int  # the device writes it to signal the SVQ


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def rarp_frame(mac: bytes) -> bytes:
    """The reverse-ARP request QEMU itself sends to announce a migrated NIC (net/announce.c), padded to 60."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 3, mac, bytes(4), mac, bytes(4))
    return (b"\xff" * 6 + mac + b"\x80\x35" + arp).ljust(60, b"\0")


class DeviceDataPlane:
    """Drives the session's device for one front-end connection, in passthrough or shadow mode."""

    def __init__(self, session: DeviceSession, conn_id: int) -> None:
        self.session = session
        self.dev = session.device
        self.info = session.info
        self.mode_policy = session.svq_mode
        self.log = log.bind(conn=conn_id, device=self.info.name)
        self.mem: MemoryMap | None = None
        self.guest_features = 0
        self.rings: dict[int, Vring] = {}  # rings the front-end has started
        self.configured: dict[int, Vring] = {}  # rings the device was given at the last DRIVER_OK
        self.shadow_active = False  # the mode of the running configuration
        self.forced_shadow: bool | None = None  # an operator's override of the policy
        self.svq: Svq | None = None
        self.shadows: dict[int, _Shadow] = {}
        self.area: _Area | None = None
        self.area_iova = 0
        self.cvq: CvqClient | None = None
        self.mac: bytes | None = session.mac_override
        self.mac_source = "--mac" if session.mac_override else ""
        self.log_mm: mmap.mmap | None = None
        self.log_local = 0
        self.log_size = 0
        self.switches = 0
        self.last_switch_us = 0.0
        self.pending_rarp: bytes | None = None
        self._nursery: trio.Nursery | None = None
        # Every change of the device's configuration, and every use of it from a background task (RARP
        # injection, MAC programming), runs under this lock: they await in the middle (CVQ acks), and a frame
        # injected while the rings are being torn down would be in flight during the drain.
        self._lock = trio.Lock()
        self._reported_broken: set[int] = set()
        self._last_stats: dict[int, dict[str, object]] | None = None
        self.transient_shadow = False
        self.inject_off = 0
        self._iova_next = 0
        self._cvq_iova = 0
        self._announce_until = 0.0
        self._generation = 0  # bumped by every configuration change: a deferred restart that sees it move yields
        self._fd_vqs: set[int] = set()  # vqs the device was given an eventfd for (unbound at close)
        # ASID-0 maps this connection made (guest regions, shadow area): (asid, iova) -> (size, uaddr). With
        # IOTLB_PERSIST they outlive a reset and are reused; every other reset empties it.
        self._maps: dict[tuple[int, int], tuple[int, int]] = {}

    # --- DataPlane -----------------------------------------------------------------------------------------
    def device_features(self) -> int:
        # The control-queue features stay with the proxy. With the SVQ allowed, what it can bridge is offered
        # too: a guest must be able to land on a device from another vendor after a migration.
        own = self.info.features & ~GUEST_HIDDEN
        return own | (BRIDGEABLE if self.mode_policy != "never" else 0)

    def _needs_bridge(self) -> int:
        """Guest features the device lacks: only the SVQ can carry them."""
        return self.guest_features & SVQ_BRIDGED & ~self.info.features

    def supports_dirty_log(self) -> bool:
        return self.mode_policy != "never"

    def max_pairs(self) -> int:
        return self.info.max_pairs

    def max_ring_size(self) -> int:
        return self.info.ring_max

    def mtu(self) -> int | None:
        return self.info.mtu

    async def set_memory(self, mem: MemoryMap | None) -> None:
        self.mem = mem
        if not self.configured:
            self._forget_configuration()  # maps kept for the old memory must not outlive it
        if self.configured:
            await self._reconfigure("memory table changed")

    async def set_features(self, features: int) -> None:
        old = self.guest_features
        self.guest_features = features
        if features == old:
            return
        if (features ^ old) & VHOST_F_LOG_ALL:
            self.log.info("dirty_logging", on=bool(features & VHOST_F_LOG_ALL))
        if self.configured:
            # Must complete before SET_FEATURES is answered: from then on QEMU relies on the log.
            await self._reconfigure("features changed")

    async def start_ring(self, ring: Vring) -> None:
        self.rings[ring.index] = ring
        await self._reconfigure(f"vring {ring.index} started")

    async def stop_ring(self, ring: Vring) -> int:
        """GET_VRING_BASE: stop the device (exact base for the reply); the rings that stay restart after the reply.

        A front-end stops its rings one after the other (QEMU, DPDK): restarting the others before each reply
        would put a whole device start into every GET_VRING_BASE — on the migration's stop path — only to undo
        it at the next request. The restart waits RESTART_GRACE for that next request, and is dropped if it came."""
        self.rings.pop(ring.index, None)
        if self._nursery is None or not self.rings:
            await self._reconfigure(f"vring {ring.index} stopped")
            return ring.base
        async with self._locked():
            self._generation += 1
            try:
                self._stop_device(keep=True)
            except BaseException:
                with contextlib.suppress(DeviceError):
                    self._reset_device()
                self._forget_configuration()
                raise
            generation = self._generation
        self._nursery_soon(self._restart_after_stop, generation, ring.index)
        return ring.base

    async def _restart_after_stop(self, generation: int, stopped: int) -> None:
        await trio.sleep(RESTART_GRACE)
        async with self._locked():
            if generation != self._generation or self.configured or not self.rings:
                return  # another change came first and configured (or stopped) the device itself
            try:
                await self._reconfigure(f"vring {stopped} stopped")
            except (DeviceError, SvqError, CvqError) as exc:
                # no request to fail any more: the rings stay stopped, and the operator is told why
                self.log.error("restart_after_stop_failed", error=str(exc))

    async def set_log(self, log_fd: int, size: int, offset: int) -> None:
        """SET_LOG_BASE: map the front-end's dirty log; a new one replaces the old before the reply."""
        try:
            st = os.fstat(log_fd)
            if not stat.S_ISREG(st.st_mode) or size == 0 or offset + size > st.st_size:
                raise ValueError(f"log of {size} bytes at offset {offset} does not fit its fd ({st.st_size} bytes)")
            mm = mmap.mmap(log_fd, size + offset, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(log_fd)
        anchor = ctypes.c_char.from_buffer(mm)
        local = ctypes.addressof(anchor) + offset
        del anchor
        old = self.log_mm
        self.log_mm, self.log_local, self.log_size = mm, local, size
        if self.svq is not None:
            self.svq.set_log(local, size)
        if old is not None:
            old.close()
        self.log.info("dirty_log_mapped", size=size)

    async def ring_call_changed(self, ring: Vring) -> bool:
        async with self._locked():
            if ring.index not in self.configured or self.configured[ring.index] is not ring:
                return False
            try:
                if self.shadow_active:
                    if self.svq is None or ring.index not in self.shadows:
                        return False
                    self.svq.set_guest_call(ring.index, ring.call_fd)  # the SVQ signals the guest, not the device
                else:
                    self.dev.set_vring_call(ring.index, ring.call_fd)  # vhost-vdpa takes a new call fd at any time
            except (DeviceError, SvqError) as exc:
                self.log.warning("set_vring_call_live_failed", vq=ring.index, error=str(exc))
                return False
            return True

    async def ring_log_changed(self, ring: Vring) -> None:
        if self.shadow_active and self.svq is not None and ring.index in self.shadows:
            self.svq.set_vq_log(ring.index, bool(ring.addr_flags & 1), ring.log_gpa)

    async def set_mac(self, mac: bytes, source: str) -> None:
        if self.mac_source == "--mac" and mac != self.mac:
            self.log.warning("mac_ignored", mac=mac.hex(":"), source=source, kept=self.mac.hex(":") if self.mac else "")
        else:
            self.mac, self.mac_source = mac, source
            self.log.info("mac_learned", mac=mac.hex(":"), source=source)
            async with self._locked():
                await self._program_mac()
        if source == "send_rarp":
            # QEMU asks the back-end to announce the guest at its new place (it arrives before the rings exist
            # on a destination: kept until TX is up)
            self.pending_rarp = mac
            self._nursery_soon(self._send_pending_rarp)

    def bind_nursery(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        nursery.start_soon(self._watch_learned_mac)

    def _nursery_soon(self, fn: Callable[..., Awaitable[None]], *args: object) -> bool:
        """Start a background task of the connection; False once the connection is ending (nothing to do then)."""
        if self._nursery is None:
            return False
        try:
            self._nursery.start_soon(fn, *args)
        except RuntimeError:  # "Nursery is closed to new arrivals": the connection's teardown has begun
            return False
        return True

    def _report_faults(self) -> None:
        """Device faults (an access to an unmapped IOVA…) and broken SVQ vqs become error events, once each."""
        try:
            faults = self.dev.take_faults()
        except DeviceError:
            faults = []
        for f in faults:
            self.log.error("device_fault", vq=f.vq, reason=f.reason, iova=hex(f.iova))
        if self.svq is not None and self.svq.take_error_events():
            for idx in sorted(self.shadows):
                reason = self.svq.error(idx)
                if reason and idx not in self._reported_broken:
                    self._reported_broken.add(idx)
                    self.log.error("vring_broken", vq=idx, reason=reason, where="svq")

    async def _watch_learned_mac(self) -> None:
        """In SVQ mode the C core samples the source MAC of the guest's frames; the first one seen (when no
        other source gave a MAC) programs the device filter. Faults are reported from here too."""
        while True:
            await trio.sleep(0.25)
            self._report_faults()
            if self.mac is not None or not self.shadow_active or self.svq is None:
                continue
            for idx in sorted(self.configured):
                if idx % 2 == 1 and idx in self.shadows:
                    try:
                        learned = self.svq.learned_mac(idx)
                    except SvqError:
                        continue
                    if learned is not None:
                        await self.set_mac(learned, "tx")
                        break

    async def _send_pending_rarp(self) -> None:
        async with self._locked():
            await self._send_pending_rarp_locked()

    async def _send_pending_rarp_locked(self) -> None:
        mac = self.pending_rarp
        tx = sorted(i for i in self.configured if i % 2 == 1)
        if mac is None or not tx:
            return
        transient = not self.shadow_active
        if transient:
            # only the SVQ can put a frame of the proxy's own on the device's TX ring
            self.transient_shadow = True
            await self._reconfigure("rarp injection")
        try:
            assert self.svq is not None
            done_before = self.svq.stats(tx[0]).injected
            for attempt in range(50):
                try:
                    self.svq.inject_tx(tx[0], rarp_frame(mac), hdr_len=NET_HDR_LEN_DEVICE)
                    break
                except SvqError as exc:
                    if exc.errno != errno.EAGAIN or attempt == 49:
                        raise
                    await trio.sleep(0.002)
            # the frame is the device's once it completes it; only then may the rings move (a transient switch)
            with trio.move_on_after(0.5):
                while self.svq.stats(tx[0]).injected == done_before:
                    await trio.sleep(0.001)
            self.pending_rarp = None
            self.log.info("rarp_sent", mac=mac.hex(":"), vq=tx[0])
        except SvqError as exc:
            self.log.error("rarp_failed", mac=mac.hex(":"), error=str(exc))
        finally:
            if self.transient_shadow:
                # QEMU announces a migrated guest several times (net/announce.c: 5 rounds over ~1.25 s): the SVQ
                # stays for all of them rather than moving the rings twice per RARP
                self._announce_until = trio.current_time() + ANNOUNCE_HOLD
                if transient and not self._nursery_soon(self._end_transient_shadow):
                    self.transient_shadow = False
                    await self._reconfigure("rarp injected")

    async def _end_transient_shadow(self) -> None:
        while True:
            await trio.sleep_until(self._announce_until)
            async with self._locked():
                if not self.transient_shadow:
                    return
                if trio.current_time() < self._announce_until:
                    continue  # another RARP came: hold on
                self.transient_shadow = False
                if not self.configured or self._want_shadow() == self.shadow_active:
                    return
                try:
                    await self._reconfigure("rarp injected")
                except (DeviceError, SvqError, CvqError) as exc:
                    self.log.error("restart_after_rarp_failed", error=str(exc))
                return

    def save_state(self, frontend: FrontendSnapshot) -> bytes:
        carried = self.session.net_state
        rings = [r for r in frontend.rings if r.num]
        pairs = len({r.index // 2 for r in rings}) or 1
        vrings = []
        for r in rings:
            used = r.base
            if self.mem is not None and r.used_gpa is not None:
                used = int.from_bytes(self.mem.read(r.used_gpa + 2, 2), "little")
            vrings.append(SavedVring(index=r.index, num=r.num, base=r.base, used_idx=used, enabled=r.enabled))
        config_mac = self.info.mac or bytes(6)
        state = DeviceState(
            guest_features=frontend.guest_features,
            protocol_features=frontend.protocol_features,
            pairs=pairs,
            max_pairs=frontend.max_pairs,
            vrings=tuple(vrings),
            mtu=frontend.mtu,
            mac=self.mac or config_mac,
            config_mac=config_mac,
            learned_mac=self.mac,
            learned_from=MAC_SOURCES.get(self.mac_source, MacSource.NONE) if self.mac else MacSource.NONE,
            rx_mode=carried.rx_mode if carried else RX_MODE_DEFAULT,
            uc_macs=carried.uc_macs if carried else (),
            mc_macs=carried.mc_macs if carried else (),
            uc_overflow=carried.uc_overflow if carried else False,
            mc_overflow=carried.mc_overflow if carried else False,
            vlans=carried.vlans if carried else frozenset(),
            guest_offloads=carried.guest_offloads if carried else 0,
            source=device_summary(self.dev),
        )
        blob = state.to_bytes()
        self.log.info("device_state_saved", bytes=len(blob), mac=state.mac.hex(":"), vrings=len(vrings))
        return blob

    def load_state(self, blob: bytes) -> None:
        try:
            self.session.load_state(blob)
        except StateError as exc:
            raise StateTransferError(str(exc)) from exc

    async def close(self) -> None:
        self.rings.clear()
        # a background task (a restart after a stop, a RARP) may be half-way through the device: let it finish
        with trio.CancelScope(shield=True):
            async with self._locked():
                self._close_locked()

    def _close_locked(self) -> None:
        try:
            self._stop_device()
        except DeviceError as exc:
            self.log.error("device_stop_failed", error=str(exc))
        self._forget_configuration()
        try:
            self.session.reset()
        except DeviceError as exc:
            self.log.error("device_reset_failed", error=str(exc))
        # A reset leaves the device holding the last kick/call eventfds it was given (vhost-vdpa and the sim
        # alike): unbind them, or a finished connection's eventfds stay pinned until the next configuration.
        for idx in sorted(self._fd_vqs):
            for unbind in (self.dev.set_vring_kick, self.dev.set_vring_call):
                try:
                    unbind(idx, -1)
                except DeviceError as exc:
                    self.log.debug("eventfd_unbind_failed", vq=idx, error=str(exc))
        self._fd_vqs.clear()
        if self.svq is not None:
            self.svq.close()
            self.svq = None
        if self.log_mm is not None:
            self.log_mm.close()
            self.log_mm = None

    # --- operator / test hooks -----------------------------------------------------------------------------
    async def force_mode(self, shadow: bool | None) -> None:
        """Force SVQ on/off (None: back to the --svq policy). Applied at once when rings run."""
        self.forced_shadow = shadow
        if self.configured and self._want_shadow() != self.shadow_active:
            await self._reconfigure("mode forced")

    def stats(self) -> dict[int, dict[str, object]]:
        if self._lock.locked() and self._last_stats is not None:
            return self._last_stats  # mid-reconfiguration the device is half set up: report the last whole view
        self._last_stats = self._stats_now()
        return self._last_stats

    def _stats_now(self) -> dict[int, dict[str, object]]:
        out: dict[int, dict[str, object]] = {}
        for idx in sorted(self.configured):
            dev = self.dev.vq_stats(idx)
            entry: dict[str, object] = {
                "mode": "svq" if self.shadow_active else "passthrough",
                "device_packets": dev.packets, "device_bytes": dev.bytes, "faults": dev.faults,
            }  # fmt: skip
            if self.shadow_active and self.svq is not None:
                s = self.svq.stats(idx)
                entry.update(
                    packets=s.packets, bytes=s.bytes, kicks=s.guest_kicks, calls=s.guest_calls,
                    dirty_pages=s.dirty_pages, svq_faults=s.faults, broken=s.broken,
                )  # fmt: skip
            out[idx] = entry
        return out

    # --- mode -------------------------------------------------------------------------------------------------
    def _want_shadow(self) -> bool:
        if self.transient_shadow:
            return True
        if self._needs_bridge():
            if self.forced_shadow is False:
                self.log.warning("passthrough_impossible", bridged=hex(self._needs_bridge()))
            return True
        if self.forced_shadow is not None:
            return self.forced_shadow
        if self.mode_policy == "always":
            return True
        if self.mode_policy == "never":
            return False
        if self.info.features & NetF.CTRL_VQ and self._needs_cvq() and not self._cvq_isolated():
            # the proxy must drive the device's CVQ, which would be within the guest's reach in passthrough
            return True
        if self.mode_policy == "never":
            return False
        return bool(self.guest_features & VHOST_F_LOG_ALL)

    # --- device programming ------------------------------------------------------------------------------------
    def _device_features(self) -> int:
        wanted = self.guest_features & ~(VHOST_F_LOG_ALL | VHOST_USER_F_PROTOCOL_FEATURES)
        own = NetF.ACCESS_PLATFORM | NetF.VERSION_1 | PROXY_DEVICE_FEATURES
        return (wanted | own) & self.info.features

    def _alloc_iova(self, size: int) -> int:
        """Top-down IOVA for the proxy's own memory (shadow rings, CVQ): above guest RAM, never overlapping it."""
        size = (size + PAGE - 1) & ~(PAGE - 1)
        iova = self._iova_next - size
        guest_top = max((r.gpa + r.size for r in self.mem.regions), default=0) if self.mem else 0
        if iova < max(guest_top, self.info.iova_first):
            raise DeviceError("iova", "no IOVA space above guest memory for the proxy's rings")
        self._iova_next = iova
        return iova

    @property
    def _persist(self) -> bool:
        return bool(self.info.backend_features & BackendF.IOTLB_PERSIST)

    def _reset_device(self) -> None:
        try:
            self.dev.set_status(0)
        finally:
            if not self._persist:
                self._maps.clear()  # the reset dropped them

    def _sync_maps(self, wanted: dict[tuple[int, int], tuple[int, int]]) -> None:
        """Make the device's ASID-0 maps made by this connection exactly `wanted` (stale ones first: a new range
        may overlap an old one, and vhost-vdpa refuses an overlapping update)."""
        for key, (size, uaddr) in list(self._maps.items()):
            if wanted.get(key) != (size, uaddr):
                del self._maps[key]
                self.dev.iotlb_invalidate(key[1], size, key[0])
        for key, (size, uaddr) in wanted.items():
            if key not in self._maps:
                self.dev.iotlb_update(key[1], size, uaddr, Perm.RW, key[0])
                self._maps[key] = (size, uaddr)

    def _drop_maps(self) -> None:
        """Invalidate every map this connection made: a persisted map would otherwise pin (kernel) or point at
        (sim) memory the connection is about to release."""
        maps, self._maps = self._maps, {}
        for (asid, iova), (size, _uaddr) in maps.items():
            try:
                self.dev.iotlb_invalidate(iova, size, asid)
            except DeviceError as exc:
                self.log.warning("iotlb_invalidate_failed", iova=hex(iova), error=str(exc))

    def _stop_device(self, *, keep: bool = False) -> None:
        """Stop the SVQ thread, suspend, record each running ring's exact base (draining the SVQ), reset.

        keep: the next configuration follows at once, so what a persistent IOTLB kept stays set up."""
        if not self.configured:
            return
        if self.svq is not None and self.shadow_active:
            self.svq.stop()
        if self.info.backend_features & BackendF.SUSPEND:
            try:
                self.dev.suspend()
            except DeviceError as exc:
                self.log.warning("suspend_failed", error=str(exc))
        for idx, ring in sorted(self.configured.items()):
            try:
                dev_base = self.dev.get_vring_base(idx)
            except DeviceError as exc:
                self.log.error("get_vring_base_failed", vq=idx, error=str(exc))
                continue
            if self.shadow_active and self.svq is not None and idx in self.shadows:
                try:
                    ring.base = self.svq.drain(idx, dev_base)
                except SvqError as exc:
                    # A broken vq cannot be drained exactly; the guest will resync from its used index.
                    self.log.error("svq_drain_failed", vq=idx, error=str(exc))
            else:
                ring.base = dev_base
        keep = keep and self._persist
        try:
            self._reset_device()
        except BaseException:
            self._forget_configuration()
            raise
        self._forget_configuration(keep=keep)

    def _forget_configuration(self, *, keep: bool = False) -> None:
        """Release what the last configuration held (also after a device error half-way).

        keep: the device was reset with its IOTLB kept; the shadow area and the CVQ (memory and maps) stay for
        the next configuration, which reuses or releases them."""
        if self.svq is not None:
            with contextlib.suppress(SvqError):
                self.svq.stop()
            for idx in list(self.shadows):
                with contextlib.suppress(SvqError):
                    self.svq.detach(idx)
            with contextlib.suppress(SvqError):
                self.svq.set_inject_area(0, 0, 0)
        for sh in self.shadows.values():
            os.close(sh.kick)
            os.close(sh.call)
        self.shadows.clear()
        self.configured = {}
        self.shadow_active = False
        if keep:
            return
        if self.cvq is not None:
            self.cvq.close()
            self.cvq = None
        self._drop_maps()
        if self.area is not None:
            self.area.close()
            self.area = None

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """The data-plane lock, re-entered freely by the task that holds it (a reconfigure that injects)."""
        if self._lock.statistics().owner is trio.lowlevel.current_task():
            yield
            return
        async with self._lock:
            yield

    async def _reconfigure(self, why: str) -> None:
        # The data path is interrupted until the reconfiguration ends: its log lines (a CVQ command's trace,
        # device_started) are written right after, in one go, not one reader wake-up at a time inside it.
        async with self._locked():
            self._generation += 1
            try:
                with held():
                    await self._reconfigure_locked(why)
            except BaseException:
                # never leave the device half-configured (status bits set, maps in place): the next attempt
                # starts from a reset device
                with contextlib.suppress(DeviceError):
                    self._reset_device()
                self._forget_configuration()
                raise

    async def _reconfigure_locked(self, why: str) -> None:
        t0 = time.perf_counter()
        # Where a reconfiguration spends its time (logged with device_started): what an operator or the bench
        # needs to tell a slow device from a slow proxy.
        phases: dict[str, int] = {}
        mark = t0

        def phase(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            phases[name] = round((now - mark) * 1e6)
            mark = now

        was_shadow = self.shadow_active if self.configured else None
        self._stop_device(keep=True)
        phase("stop")
        if self.mem is None:
            self._forget_configuration()
            return
        if not self.rings:
            return  # QEMU stops and restarts rings one by one: what the IOTLB kept is reused on the next start
        shadow = self._want_shadow()
        self._iova_next = min(self.info.iova_last, IOVA_CEILING) + 1
        if self.info.features & NetF.CTRL_VQ and self._cvq_index() < self.info.vqs:
            # The CVQ's slot first, at the top whatever the mode: a kept CVQ never collides with the shadow area.
            self._cvq_iova = self._alloc_iova(CVQ_AREA)
        dev = self.dev
        status = Status.ACKNOWLEDGE | Status.DRIVER
        dev.set_status(status)
        features = self._device_features()
        dev.set_features(features)
        status |= Status.FEATURES_OK
        dev.set_status(status)
        if not dev.get_status() & Status.FEATURES_OK:
            raise DeviceError("set_status", f"device refused features {features:#x}")
        wanted: dict[tuple[int, int], tuple[int, int]] = {}
        for region in self.mem.regions:
            end = region.gpa + region.size - 1
            if not (self.info.iova_first <= region.gpa and end <= self.info.iova_last):
                raise DeviceError("iotlb_update", f"guest range {region.gpa:#x}-{end:#x} outside IOVA range")
            wanted[(0, region.gpa)] = (region.size, region.local_addr)
        if shadow:
            self._prepare_shadow_area()
            assert self.area is not None
            wanted[(0, self.area_iova)] = (self.area.size, self.area.local)
        # In passthrough the shadow area is left unmapped (ASID 0 is the guest's: it could point descriptors at it).
        with dev.iotlb_batch():
            self._sync_maps(wanted)
        phase("features_maps")
        pending = self.session.pending_state
        # What goes through the CVQ (a restored state, the queue pairs, the MAC filter) is in the device before
        # any data queue runs. In SVQ mode the shadow rings are enabled before DRIVER_OK and stay empty until the SVQ
        # starts, after the commands. In passthrough the guest's rings hold frames: with ENABLE_AFTER_DRIVER_OK they
        # are enabled only after the commands (which also keeps the CVQ round trips off a CPU busy with traffic);
        # without it they are enabled before DRIVER_OK (vhost-vdpa cannot enable later) and the device may see
        # guest frames during the (sub-millisecond) commands.
        defer_enable = (
            not shadow
            and bool(self.info.backend_features & BackendF.ENABLE_AFTER_DRIVER_OK)
            and bool(features & NetF.CTRL_VQ)
            and (pending is not None or self._needs_cvq())
        )
        self._fd_vqs.update(self.rings)
        if shadow:
            self._configure_shadow_rings(enable=not defer_enable)
        else:
            for idx, ring in sorted(self.rings.items()):
                assert ring.desc_gpa is not None and ring.avail_gpa is not None and ring.used_gpa is not None
                program_vq(
                    dev, idx, num=ring.num, desc=ring.desc_gpa, avail=ring.avail_gpa, used=ring.used_gpa,
                    base=ring.base, kick=ring.kick_fd, call=ring.call_fd, enable=not defer_enable,
                )  # fmt: skip
        if features & NetF.CTRL_VQ:
            self._setup_cvq(shadow)
        elif self.cvq is not None:
            self.cvq.close()
            self.cvq = None
        dev.set_status(status | Status.DRIVER_OK)
        self.configured = dict(self.rings)
        self.shadow_active = shadow
        phase("rings_driver_ok")
        if pending is not None:
            await self._restore(pending, features)
        await self._program_cvq(features)
        phase("cvq")
        if defer_enable:
            for idx in sorted(self.rings):
                dev.set_vring_enable(idx, True)
            phase("enable")
        if shadow:
            self._attach_guest_rings()
            phase("svq_start")
        await self._after_driver_ok(features)
        took = (time.perf_counter() - t0) * 1e6
        if was_shadow is not None and was_shadow != shadow:
            self.switches += 1
            self.last_switch_us = took
        self.log.info(
            "device_started", vqs=sorted(self.configured), mode="svq" if shadow else "passthrough",
            features=hex(features), why=why, took_us=round(took), phases_us=phases,
        )  # fmt: skip

    def _prepare_shadow_area(self) -> None:
        """The shadow rings' memory: the kept area when the rings still fit it (the SVQ clears each shadow ring
        when it attaches), else a new one."""
        layouts = {}
        offset = 0
        for idx, ring in sorted(self.rings.items()):
            num = min(ring.num, self.info.ring_max)
            layout = RingLayout.for_num(num, offset)
            layouts[idx] = (num, layout)
            offset += layout.size
        self.inject_off = offset  # proxy-owned frames (a RARP) the SVQ puts on a TX ring
        offset += (INJECT_SLOT + PAGE - 1) & ~(PAGE - 1)
        if self.area is not None and self.area.size != offset:
            old, self.area = self.area, None
            key = (0, self.area_iova)
            if self._maps.get(key, (0, 0))[1] == old.local:
                del self._maps[key]
                self.dev.iotlb_invalidate(self.area_iova, old.size, 0)
            old.close()
        if self.area is None:
            self.area = _Area(offset, "vduproxy-shadow")
        self.area_iova = self._alloc_iova(self.area.size)
        for idx, (num, layout) in layouts.items():
            self.shadows[idx] = _Shadow(idx, num, layout, _eventfd(), _eventfd())

    async def _restore(self, state: DeviceState, features: int) -> None:
        """Replay a saved net state through the device's CVQ; a refused command fails loudly."""
        try:
            steps = plan_restore(state, features, cvq_caps(self.dev, features))
            if steps:
                if self.cvq is None or not self.cvq.ready:
                    raise RestoreError(f"{len(steps)} control commands to replay but the device has no usable CVQ")
                await apply_restore(self.cvq, steps)
        except RestoreError as exc:
            self.log.error("device_state_restore_failed", error=str(exc))
            raise DeviceError("restore", str(exc)) from exc
        self.session.pending_state = None
        self.session.net_state = state
        if self.mac is None or self.mac_source == "state":
            self.mac, self.mac_source = state.mac, "state"
        self.log.info("device_state_restored", steps=len(steps), mac=state.mac.hex(":"), pairs=state.pairs)

    def _configure_shadow_rings(self, *, enable: bool = True) -> None:
        assert self.area is not None
        if self.svq is None:
            self.svq = Svq(self.info.vqs)
            if self.session.svq_busy_poll_us:
                self.svq.set_busy_poll(self.session.svq_busy_poll_us)
            if self.log_mm is not None:
                self.svq.set_log(self.log_local, self.log_size)
        dev = self.dev
        features = self._device_features()
        dev_flags = (DevFlags.EVENT_IDX if features & NetF.RING_EVENT_IDX else 0) | (
            DevFlags.INDIRECT if features & NetF.RING_INDIRECT_DESC else 0
        )
        # num_buffers: written by the SVQ (1) for a device without MRG_RXBUF under a guest that has it; a device
        # merging buffers under a guest that cannot is refused by the SVQ.
        guest_mrg = bool(self.guest_features & NetF.MRG_RXBUF)
        dev_mrg = bool(features & NetF.MRG_RXBUF)
        rx_flags = (
            DevFlags.NO_MRG_RXBUF
            if guest_mrg and not dev_mrg
            else DevFlags.MRG_RXBUF
            if dev_mrg and not guest_mrg
            else 0
        )
        for idx, sh in sorted(self.shadows.items()):
            ring = self.rings[idx]
            lay = sh.layout
            base_local = self.area.local
            self.svq.attach_shadow(
                idx, num=sh.num, desc=base_local + lay.desc_off, avail=base_local + lay.avail_off,
                used=base_local + lay.used_off, base=ring.base, kick_fd=sh.kick, call_fd=sh.call,
                flags=dev_flags | (rx_flags if idx % 2 == 0 else 0),
            )  # fmt: skip
            iova = self.area_iova
            program_vq(
                dev, idx, num=sh.num, desc=iova + lay.desc_off, avail=iova + lay.avail_off, used=iova + lay.used_off,
                base=ring.base, kick=sh.kick, call=sh.call, enable=enable,
            )  # fmt: skip

    def _attach_guest_rings(self) -> None:
        assert self.svq is not None and self.mem is not None
        self.svq.set_regions([Region(r.gpa, r.size, r.local_addr, r.gpa) for r in self.mem.regions])
        g = self.guest_features
        common = (
            (GuestFlags.EVENT_IDX if g & NetF.RING_EVENT_IDX else 0)
            | (GuestFlags.INDIRECT if g & NetF.RING_INDIRECT_DESC else 0)
            | (GuestFlags.MRG_RXBUF if g & NetF.MRG_RXBUF else 0)
            # the guest's virtio-net header: 12 bytes with VERSION_1 or MRG_RXBUF, else 10 (where the MAC starts)
            | (GuestFlags.NET_HDR_12 if g & (NetF.VERSION_1 | NetF.MRG_RXBUF) else 0)
        )
        logging = bool(g & VHOST_F_LOG_ALL) and self.log_mm is not None
        assert self.area is not None
        self.svq.set_inject_area(self.area.local + self.inject_off, self.area_iova + self.inject_off, INJECT_SLOT)
        for idx, ring in sorted(self.rings.items()):
            assert ring.desc_gpa is not None and ring.avail_gpa is not None and ring.used_gpa is not None
            flags = common | (GuestFlags.RX if idx % 2 == 0 else GuestFlags.LEARN_MAC)
            log_used = 0
            if logging and ring.addr_flags & 1:
                flags |= GuestFlags.LOG
                log_used = ring.log_gpa
            self.svq.attach_guest(
                idx, num=ring.num, desc=ring.desc_gpa, avail=ring.avail_gpa, used=ring.used_gpa,
                last_avail=ring.base, kick_fd=ring.kick_fd, call_fd=ring.call_fd, flags=flags, log_used=log_used,
            )  # fmt: skip
        self.svq.start()

    def _cvq_index(self) -> int:
        return 2 * self.info.max_pairs if self.info.features & NetF.MQ else 2

    def _cvq_isolated(self) -> bool:
        """Whether the proxy's CVQ memory can live in an address space of its own. If not, it shares ASID 0 with
        guest memory, and in passthrough a guest descriptor could point at it: then only the SVQ (which checks
        every guest address) may run alongside the proxy's CVQ."""
        idx = self._cvq_index()
        key = (idx, self._device_features())
        known = self.session.cvq_isolation.get(key)
        if known is not None:
            return known
        dev = self.dev
        try:
            asids = dev.get_as_num() if self.info.backend_features & BackendF.IOTLB_ASID else 1
            if asids < 2 or dev.get_groups_num() < 2:
                isolated = False
            else:
                group = dev.get_vring_group(idx)
                isolated = all(dev.get_vring_group(i) != group for i in range(idx))
        except DeviceError:
            return False  # asked again next time
        self.session.cvq_isolation[key] = isolated
        return isolated

    def _needs_cvq(self) -> bool:
        pairs = len({idx // 2 for idx in self.rings if idx < 2 * self.info.max_pairs})
        return (
            self.session.pending_state is not None or self.mac is not None or self.pending_rarp is not None or pairs > 1
        )

    def _setup_cvq(self, shadow: bool) -> None:
        cvq_index = self._cvq_index()
        if cvq_index >= self.info.vqs or (not shadow and not self._cvq_isolated()):
            if self.cvq is not None:  # kept from an SVQ configuration: its map must not stay within the guest's reach
                self.cvq.close()
                self.cvq = None
            if cvq_index < self.info.vqs:
                self.log.info("cvq_not_in_passthrough", reason="the device cannot isolate its CVQ from guest memory")
            return
        try:
            if self.cvq is not None and self.cvq.iova == self._cvq_iova:
                self.cvq.rearm()
                return
            if self.cvq is not None:
                self.cvq.close()
            self.cvq = CvqClient(self.dev, vq_index=cvq_index, iova=self._cvq_iova, data_vqs=cvq_index)
            self.cvq.setup()
        except (CvqError, DeviceError) as exc:
            self.log.warning("cvq_unavailable", error=str(exc))
            if self.cvq is not None:
                self.cvq.close()
            self.cvq = None

    async def _after_driver_ok(self, features: int) -> None:
        for ring in self.configured.values():
            # A device that only looks at a ring when kicked (kernel vdpa_sim_net) drops kicks that came while the
            # queue was not ready — the guest may have kicked during the reconfiguration: kick once on its behalf.
            if not self.shadow_active and ring.kick_fd >= 0:
                with contextlib.suppress(OSError):
                    os.eventfd_write(ring.kick_fd, 1)
            # And the other way: with EVENT_IDX a used_event the guest wrote before the rings moved (another device,
            # another host) may never be crossed again, so nothing would ever interrupt it: one spurious call makes
            # the guest look at its used ring now (harmless when there is nothing new).
            if ring.call_fd >= 0:
                with contextlib.suppress(OSError):
                    os.eventfd_write(ring.call_fd, 1)
        if self.pending_rarp is not None and not self.transient_shadow and any(i % 2 == 1 for i in self.configured):
            self._nursery_soon(self._send_pending_rarp)

    async def _program_cvq(self, features: int) -> None:
        """The queue pairs and the MAC filter, through the CVQ (a reset forgot them)."""
        if self.cvq is None:
            return
        pairs = len({idx // 2 for idx in self.rings if idx < 2 * self.info.max_pairs})
        if features & NetF.MQ and pairs > 1:
            try:
                await self.cvq.mq_pairs_set(pairs)
            except CvqError as exc:
                self.log.error("mq_pairs_set_failed", pairs=pairs, error=str(exc))
        await self._program_mac()

    async def _program_mac(self) -> None:
        if self.cvq is None or self.mac is None or not self.cvq.ready:
            return
        with contextlib.suppress(CvqError):
            await self.cvq.mac_addr_set(self.mac)
            self.log.info("mac_programmed", mac=self.mac.hex(":"), source=self.mac_source)


class DataPlaneFactory:
    """Makes one back-end per front-end connection; owns the device across connections."""

    def __init__(
        self, make: Callable[[int], NetBackend], close: Callable[[], None], desc: str,
        session: DeviceSession | None = None,
    ) -> None:  # fmt: skip
        self._make = make
        self._close = close
        self.desc = desc
        self.session = session

    def __call__(self, conn_id: int) -> NetBackend:
        return self._make(conn_id)

    def close(self) -> None:
        self._close()


def open_dataplane_factory(
    device_spec: str, *, queues: int | None = None, svq: str = "auto", mac: bytes | None = None,
    svq_busy_poll_us: int = DEFAULT_BUSY_POLL_US,
) -> tuple[DataPlaneFactory, str]:  # fmt: skip
    if device_spec == "none":
        pairs = queues or 1
        return DataPlaneFactory(lambda cid: NetBackend(cid, NullDataPlane(pairs)), lambda: None, "none"), "none"
    from .vdpa.factory import open_device

    device = open_device(device_spec)
    try:
        session = DeviceSession(device, queues=queues, mac=mac, svq=svq, svq_busy_poll_us=svq_busy_poll_us)
        session.reset()
    except BaseException:
        device.close()
        raise

    def make(cid: int) -> NetBackend:
        backend = NetBackend(cid, DeviceDataPlane(session, cid))
        session.backends[:] = [b for b in session.backends if not b.closed] + [backend]
        return backend

    return DataPlaneFactory(make, session.close, device.name, session), device.name
