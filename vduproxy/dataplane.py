"""Data planes: what happens to a vring once the front-end has set it up.

- `DeviceSession` owns one vDPA device for the daemon's lifetime (a second open of /dev/vhost-vdpa-N is EBUSY,
  so it is opened once, probed once, and reset between front-end connections).
- `PassthroughDataPlane` hands the guest's rings to the device: guest memory is mapped into the device
  IOTLB at IOVA = GPA, the device gets the guest's ring addresses and kick/call fds: no per-packet work.

vhost-user has no DRIVER_OK (STATUS is not offered to QEMU 7.2), so the device is (re)started whenever the
set of running rings changes: suspend, read the bases, reset, configure every running ring, DRIVER_OK. Without
ENABLE_AFTER_DRIVER_OK a vhost-vdpa device cannot add rings after DRIVER_OK, so this is the portable way.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Callable

from .backend import NetBackend, NullDataPlane, Vring
from .log import get_logger
from .memory import MemoryMap
from .vdpa.device import BackendF, DeviceError, Perm, VdpaDevice
from .virtio import VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, NetF, Status

log = get_logger(__name__)

WANTED_BACKEND = (
    BackendF.IOTLB_MSG_V2 | BackendF.IOTLB_BATCH | BackendF.IOTLB_ASID | BackendF.SUSPEND | BackendF.RESUME
)


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

    def __init__(self, device: VdpaDevice, *, queues: int | None = None, mac: bytes | None = None) -> None:
        self.device = device
        self.mac_override = mac
        features = device.get_features()
        offered_backend = device.get_backend_features()
        backend = offered_backend & WANTED_BACKEND
        device.set_backend_features(backend)
        cfg = device.get_config(0, 12)
        dev_mac, _status, max_pairs, mtu = struct.unpack_from("<6sHHH", cfg)
        if not features & NetF.MQ:
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
        log.info(
            "device_probed",
            device=device.name,
            features=hex(features),
            backend_features=hex(backend),
            mac=dev_mac.hex(":"),
            max_pairs=self.info.max_pairs,
            ring_max=self.info.ring_max,
            vqs=self.info.vqs,
        )

    def reset(self) -> None:
        self.device.set_status(0)

    def close(self) -> None:
        try:
            self.device.set_status(0)
        finally:
            self.device.close()


class PassthroughDataPlane:
    """The device reads and writes the guest's own rings."""

    def __init__(self, session: DeviceSession, conn_id: int) -> None:
        self.session = session
        self.dev = session.device
        self.info = session.info
        self.log = log.bind(conn=conn_id, device=self.info.name)
        self.mem: MemoryMap | None = None
        self.guest_features = 0
        self.rings: dict[int, Vring] = {}  # rings the front-end has started
        self.configured: dict[int, Vring] = {}  # rings the device was given at the last DRIVER_OK
        self.mapped: list[tuple[int, int]] = []

    # --- DataPlane -----------------------------------------------------------------------------------------
    def device_features(self) -> int:
        # The guest's rings go to the device as they are, so the guest may only use what the device does.
        return self.info.features & ~(
            NetF.ACCESS_PLATFORM
            | NetF.CTRL_VQ
            | NetF.CTRL_RX
            | NetF.CTRL_VLAN
            | NetF.CTRL_MAC_ADDR
            | NetF.CTRL_GUEST_OFFLOADS
            | NetF.GUEST_ANNOUNCE
        )

    def max_pairs(self) -> int:
        return self.info.max_pairs

    def max_ring_size(self) -> int:
        return self.info.ring_max

    def mtu(self) -> int | None:
        return self.info.mtu

    async def set_memory(self, mem: MemoryMap | None) -> None:
        self.mem = mem
        if self.configured:
            self._restart()

    async def set_features(self, features: int) -> None:
        changed = features != self.guest_features
        self.guest_features = features
        if changed and self.configured:
            self._restart()

    async def start_ring(self, ring: Vring) -> None:
        self.rings[ring.index] = ring
        self._restart()

    async def stop_ring(self, ring: Vring) -> int:
        self.rings.pop(ring.index, None)
        self._restart()
        return ring.base

    async def set_log(self, log_fd: int, size: int, offset: int) -> None:
        # Dirty logging needs the shadow virtqueue; passthrough cannot see what the device writes.
        os.close(log_fd)
        self.log.warning("dirty_log_unsupported_in_passthrough")

    async def ring_log_changed(self, ring: Vring) -> None:
        return None

    async def set_mac(self, mac: bytes, source: str) -> None:
        self.log.info("mac_learned", mac=mac.hex(":"), source=source)

    async def close(self) -> None:
        self.rings.clear()
        self._stop_device()
        self.session.reset()

    # --- device programming --------------------------------------------------------------------------------
    def _device_features(self) -> int:
        wanted = self.guest_features & ~(VHOST_F_LOG_ALL | VHOST_USER_F_PROTOCOL_FEATURES)
        return (wanted & self.info.features) | (self.info.features & (NetF.ACCESS_PLATFORM | NetF.VERSION_1))

    def _stop_device(self) -> None:
        """Suspend (when possible), record each running ring's exact base, reset."""
        if not self.configured:
            return
        suspended = False
        if self.info.backend_features & BackendF.SUSPEND:
            try:
                self.dev.suspend()
                suspended = True
            except DeviceError as exc:
                self.log.warning("suspend_failed", error=str(exc))
        for idx, ring in sorted(self.configured.items()):
            try:
                ring.base = self.dev.get_vring_base(idx)
            except DeviceError as exc:
                self.log.error("get_vring_base_failed", vq=idx, error=str(exc))
        if not suspended:
            self.log.debug("device_stopped_without_suspend")
        self.dev.set_status(0)
        self.configured = {}
        self.mapped.clear()

    def _restart(self) -> None:
        self._stop_device()
        if not self.rings or self.mem is None:
            return
        dev = self.dev
        status = Status.ACKNOWLEDGE | Status.DRIVER
        dev.set_status(status)
        dev.set_features(self._device_features())
        status |= Status.FEATURES_OK
        dev.set_status(status)
        if not dev.get_status() & Status.FEATURES_OK:
            raise DeviceError("set_status", f"device refused features {self._device_features():#x}")
        with dev.iotlb_batch():
            for region in self.mem.regions:
                if not (
                    self.info.iova_first <= region.gpa and region.gpa + region.size - 1 <= self.info.iova_last
                ):
                    raise DeviceError(
                        "iotlb_update", f"guest range {region.gpa:#x}+{region.size:#x} outside IOVA range"
                    )
                dev.iotlb_update(region.gpa, region.size, region.local_addr, Perm.RW, 0)
                self.mapped.append((region.gpa, region.size))
        for idx, ring in sorted(self.rings.items()):
            assert ring.desc_gpa is not None and ring.avail_gpa is not None and ring.used_gpa is not None
            dev.set_vring_num(idx, ring.num)
            dev.set_vring_addr(idx, ring.desc_gpa, ring.avail_gpa, ring.used_gpa)
            dev.set_vring_base(idx, ring.base)
            dev.set_vring_kick(idx, ring.kick_fd)
            dev.set_vring_call(idx, ring.call_fd)
            dev.set_vring_enable(idx, True)
        dev.set_status(status | Status.DRIVER_OK)
        self.configured = dict(self.rings)
        self.log.info("device_started", vqs=sorted(self.configured), features=hex(self._device_features()))


class DataPlaneFactory:
    """Makes one back-end per front-end connection; owns the device across connections."""

    def __init__(self, make: Callable[[int], NetBackend], close: Callable[[], None], desc: str) -> None:
        self._make = make
        self._close = close
        self.desc = desc

    def __call__(self, conn_id: int) -> NetBackend:
        return self._make(conn_id)

    def close(self) -> None:
        self._close()


def open_dataplane_factory(
    device_spec: str, *, queues: int | None = None, svq: str = "auto", mac: bytes | None = None
) -> tuple[DataPlaneFactory, str]:
    if device_spec == "none":
        pairs = queues or 1
        return DataPlaneFactory(
            lambda cid: NetBackend(cid, NullDataPlane(pairs)), lambda: None, "none"
        ), "none"
    from .vdpa.factory import open_device

    device = open_device(device_spec)
    try:
        session = DeviceSession(device, queues=queues, mac=mac)
    except BaseException:
        device.close()
        raise
    session.reset()
    factory = DataPlaneFactory(
        lambda cid: NetBackend(cid, PassthroughDataPlane(session, cid)), session.close, device.name
    )
    return factory, device.name
