"""The vDPA device interface. Both the kernel driver (/dev/vhost-vdpa-N) and the software device satisfy it,
and nothing above this layer may know which one it drives.

The semantics are those of Linux vhost-vdpa (drivers/vhost/vdpa.c, include/uapi/linux/vhost.h):
- `uaddr` in IOTLB maps is a virtual address in *this* process (the device reads memory the proxy mapped).
- Ring addresses given to `set_vring_addr` are IOVAs, translated through the IOTLB of the vq's group's ASID.
- `set_status` can only add bits or reset to 0; `set_features` after FEATURES_OK fails.
- A reset (status 0) drops all IOTLB maps unless the backend feature IOTLB_PERSIST was acked.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable


class BackendF(enum.IntFlag):
    """VHOST_BACKEND_F_* (bit numbers from linux/vhost_types.h), as masks."""

    IOTLB_MSG_V2 = 1 << 1
    IOTLB_BATCH = 1 << 2
    IOTLB_ASID = 1 << 3
    SUSPEND = 1 << 4
    RESUME = 1 << 5
    ENABLE_AFTER_DRIVER_OK = 1 << 6
    DESC_ASID = 1 << 7
    IOTLB_PERSIST = 1 << 8


class Perm(enum.IntFlag):
    """VHOST_ACCESS_* for IOTLB updates."""

    RO = 1
    WO = 2
    RW = 3


VIRTIO_ID_NET = 1


class DeviceError(Exception):
    """A device operation failed. `op` names the ioctl/operation, `errno` is set for kernel errors."""

    def __init__(self, op: str, message: str, errno: int | None = None) -> None:
        super().__init__(f"{op}: {message}")
        self.op = op
        self.message = message
        self.errno = errno


class DeviceBusy(DeviceError):
    """The device is opened by another process (EBUSY on open)."""


@dataclasses.dataclass(frozen=True)
class IovaRange:
    first: int
    last: int  # inclusive

    def contains(self, iova: int, size: int) -> bool:
        return size > 0 and iova >= self.first and iova + size - 1 <= self.last


@dataclasses.dataclass
class VqStats:
    """Per-vq counters. Fields a device cannot count stay 0."""

    packets: int = 0
    bytes: int = 0
    kicks: int = 0
    calls: int = 0
    faults: int = 0
    dropped: int = 0
    error: str | None = None  # reason of the last device fault; the vq is stopped while set


@dataclasses.dataclass(frozen=True)
class DeviceFault:
    """An asynchronous device-side error event (e.g. an access to an unmapped IOVA)."""

    vq: int
    reason: str
    iova: int = 0


@runtime_checkable
class VdpaDevice(Protocol):
    """What the proxy needs from a vDPA net device."""

    name: str  # "/dev/vhost-vdpa-0" or "sim:profile=…"

    def close(self) -> None: ...

    # identity and negotiation
    def get_device_id(self) -> int: ...
    def get_features(self) -> int: ...
    def set_features(self, features: int) -> None: ...
    def get_backend_features(self) -> int: ...
    def set_backend_features(self, features: int) -> None: ...
    def get_status(self) -> int: ...
    def set_status(self, status: int) -> None: ...
    def get_config(self, offset: int, length: int) -> bytes: ...
    def set_config(self, offset: int, data: bytes) -> None: ...

    # topology
    def get_vqs_count(self) -> int: ...
    def get_vring_num_max(self) -> int: ...
    def get_groups_num(self) -> int: ...
    def get_as_num(self) -> int: ...
    def get_vring_group(self, index: int) -> int: ...
    def set_group_asid(self, group: int, asid: int) -> None: ...
    def get_iova_range(self) -> IovaRange: ...

    # vrings
    def set_vring_num(self, index: int, num: int) -> None: ...
    def set_vring_addr(self, index: int, desc: int, avail: int, used: int) -> None: ...
    def set_vring_base(self, index: int, base: int) -> None: ...
    def get_vring_base(self, index: int) -> int: ...
    def set_vring_kick(self, index: int, fd: int) -> None: ...  # fd -1 detaches
    def set_vring_call(self, index: int, fd: int) -> None: ...  # fd -1 detaches
    def set_vring_enable(self, index: int, enable: bool) -> None: ...
    def suspend(self) -> None: ...
    def resume(self) -> None: ...

    # IOTLB (v2 messages; batched when IOTLB_BATCH is acked)
    def iotlb_update(self, iova: int, size: int, uaddr: int, perm: Perm, asid: int = 0) -> None: ...
    def iotlb_invalidate(self, iova: int, size: int, asid: int = 0) -> None: ...
    def iotlb_batch(self) -> AbstractContextManager[None]: ...

    # observation
    def vq_stats(self, index: int) -> VqStats: ...
    def fault_fd(self) -> int:
        """An fd that becomes readable when device faults are pending (-1 if the device has none)."""
        ...

    def take_faults(self) -> list[DeviceFault]: ...


def program_vq(
    dev: VdpaDevice, index: int, *, num: int, desc: int, avail: int, used: int, base: int, kick: int, call: int,
    enable: bool = True,
) -> None:  # fmt: skip
    """Give the device one virtqueue (addresses are IOVAs) and set it ready — or leave it not ready for an enable
    after DRIVER_OK (BackendF.ENABLE_AFTER_DRIVER_OK)."""
    dev.set_vring_num(index, num)
    dev.set_vring_base(index, base)
    dev.set_vring_addr(index, desc, avail, used)
    dev.set_vring_kick(index, kick)
    dev.set_vring_call(index, call)
    dev.set_vring_enable(index, enable)


def iter_vq_indices(pairs: int) -> Iterator[int]:
    """Data vq indices of `pairs` queue pairs: RX = 2i, TX = 2i+1."""
    yield from range(2 * pairs)


def cvq_index(max_pairs: int) -> int:
    return 2 * max_pairs
