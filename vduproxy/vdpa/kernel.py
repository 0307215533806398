"""The kernel vDPA driver: a /dev/vhost-vdpa-N character device.

Everything goes through ioctls on the fd (include/uapi/linux/vhost.h) except IOTLB updates, which are
`struct vhost_msg_v2` records written to the same fd (include/uapi/linux/vhost_types.h). This is the only
module in vduproxy that issues ioctls.

Facts this module relies on (drivers/vhost/vdpa.c, seen on 6.1 with vdpa_sim_net in the kernel test bed):
- Every vring ioctl goes through vhost_dev_ioctl, which checks the owner: SET_OWNER comes first, at open.
- A second open() of the same device fails with EBUSY.
- The kernel turns every failed IOTLB write (EEXIST, ENOMEM, EINVAL...) into EFAULT, so errors here say
  which checks the kernel applies rather than trusting the errno.
- Pinned pages count against RLIMIT_MEMLOCK (8 MiB by default): it is raised at open.
- BATCH_END commits the mappings of the ASID named in the END message only, so a batch never spans two ASIDs.
"""

from __future__ import annotations

import enum
import errno as errno_mod
import fcntl
import os
import resource
import stat
import struct
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from types import TracebackType

from ..log import get_logger
from .device import BackendF, DeviceBusy, DeviceError, DeviceFault, IovaRange, Perm, VqStats

log = get_logger(__name__)

# asm-generic/ioctl.h: dir:2 | size:14 | type:8 | nr:8
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
VHOST_VIRTIO = 0xAF


def _ioc(direction: int, nr: int, size: int) -> int:
    if not 0 <= size < (1 << 14):
        raise ValueError(f"ioctl argument size {size} does not fit in 14 bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (size << _IOC_SIZESHIFT)
        | (VHOST_VIRTIO << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
    )


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


# The argument structs, native layout (the kernel ABI is the host's). "=" keeps the sizes standard and adds
# no padding: every struct here is naturally packed, which the ioctl-number test checks via the sizes.
_U8 = struct.Struct("=B")
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_VRING_STATE = struct.Struct("=II")  # struct vhost_vring_state {unsigned int index, num}
_VRING_FILE = struct.Struct("=Ii")  # struct vhost_vring_file {unsigned int index; int fd}
_VRING_ADDR = struct.Struct("=IIQQQQ")  # {index, flags, desc, used, avail, log_guest_addr}
_VDPA_CONFIG = struct.Struct("=II")  # struct vhost_vdpa_config {u32 off, len; u8 buf[]} header
_IOVA_RANGE = struct.Struct("=QQ")  # struct vhost_vdpa_iova_range {u64 first, last}


@enum.unique
class Ioctl(enum.IntEnum):
    """Request numbers, computed the way linux/vhost.h defines them."""

    VHOST_GET_FEATURES = _ior(0x00, _U64.size)
    VHOST_SET_FEATURES = _iow(0x00, _U64.size)
    VHOST_SET_OWNER = _io(0x01)
    VHOST_RESET_OWNER = _io(0x02)
    VHOST_SET_VRING_NUM = _iow(0x10, _VRING_STATE.size)
    VHOST_SET_VRING_ADDR = _iow(0x11, _VRING_ADDR.size)
    VHOST_SET_VRING_BASE = _iow(0x12, _VRING_STATE.size)
    VHOST_GET_VRING_BASE = _iowr(0x12, _VRING_STATE.size)
    VHOST_SET_VRING_KICK = _iow(0x20, _VRING_FILE.size)
    VHOST_SET_VRING_CALL = _iow(0x21, _VRING_FILE.size)
    VHOST_SET_VRING_ERR = _iow(0x22, _VRING_FILE.size)
    VHOST_SET_BACKEND_FEATURES = _iow(0x25, _U64.size)
    VHOST_GET_BACKEND_FEATURES = _ior(0x26, _U64.size)
    VHOST_VDPA_GET_DEVICE_ID = _ior(0x70, _U32.size)
    VHOST_VDPA_GET_STATUS = _ior(0x71, _U8.size)
    VHOST_VDPA_SET_STATUS = _iow(0x72, _U8.size)
    VHOST_VDPA_GET_CONFIG = _ior(0x73, _VDPA_CONFIG.size)
    VHOST_VDPA_SET_CONFIG = _iow(0x74, _VDPA_CONFIG.size)
    VHOST_VDPA_SET_VRING_ENABLE = _iow(0x75, _VRING_STATE.size)
    VHOST_VDPA_GET_VRING_NUM = _ior(0x76, _U16.size)
    VHOST_VDPA_SET_CONFIG_CALL = _iow(0x77, _U32.size)
    VHOST_VDPA_GET_IOVA_RANGE = _ior(0x78, _IOVA_RANGE.size)
    VHOST_VDPA_GET_CONFIG_SIZE = _ior(0x79, _U32.size)
    VHOST_VDPA_GET_AS_NUM = _ior(0x7A, _U32.size)
    VHOST_VDPA_GET_VRING_GROUP = _iowr(0x7B, _VRING_STATE.size)
    VHOST_VDPA_SET_GROUP_ASID = _iow(0x7C, _VRING_STATE.size)
    VHOST_VDPA_SUSPEND = _io(0x7D)
    VHOST_VDPA_RESUME = _io(0x7E)
    VHOST_VDPA_GET_VRING_DESC_GROUP = _iowr(0x7F, _VRING_STATE.size)
    VHOST_VDPA_GET_VQS_COUNT = _ior(0x80, _U32.size)
    VHOST_VDPA_GET_GROUP_NUM = _ior(0x81, _U32.size)


# IOTLB messages (linux/vhost_types.h). struct vhost_msg_v2 is {u32 type; u32 asid; union {struct
# vhost_iotlb_msg iotlb; u8 padding[64]}}: 72 bytes, the kernel answers a good write with 72. The v1
# struct vhost_msg {int type; union {...}} has the same layout with the asid word as alignment padding.
VHOST_IOTLB_MSG = 0x1
VHOST_IOTLB_MSG_V2 = 0x2
IOTLB_MSG_SIZE = 72
_IOTLB_MSG = struct.Struct("=IIQQQBB")  # type, asid, iova, size, uaddr, perm, iotlb type


class IotlbType(enum.IntEnum):
    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4
    BATCH_BEGIN = 5
    BATCH_END = 6


def pack_iotlb_msg(
    kind: IotlbType,
    *,
    iova: int = 0,
    size: int = 0,
    uaddr: int = 0,
    perm: int = 0,
    asid: int = 0,
    v2: bool = True,
) -> bytes:
    """One IOTLB message as written to the vhost-vdpa fd (v2 carries the ASID; v1 leaves the word zero)."""
    if not v2 and asid:
        raise ValueError("an ASID needs IOTLB v2 messages")
    body = _IOTLB_MSG.pack(VHOST_IOTLB_MSG_V2 if v2 else VHOST_IOTLB_MSG, asid, iova, size, uaddr, perm, kind)
    return body.ljust(IOTLB_MSG_SIZE, b"\0")


def unpack_iotlb_msg(data: bytes) -> tuple[int, int, IotlbType, int, int, int, int]:
    """(msg type, asid, iotlb type, iova, size, uaddr, perm) of a packed message (for tests and tracing)."""
    if len(data) != IOTLB_MSG_SIZE:
        raise ValueError(f"IOTLB message is {len(data)} bytes, expected {IOTLB_MSG_SIZE}")
    mtype, asid, iova, size, uaddr, perm, kind = _IOTLB_MSG.unpack_from(data)
    return mtype, asid, IotlbType(kind), iova, size, uaddr, perm


# Hints for errnos whose kernel meaning is not what strerror() says.
_HINTS: dict[tuple[str, int], str] = {
    ("iotlb", errno_mod.EFAULT): (
        "the kernel reports every IOTLB failure as EFAULT: overlapping map, outside GET_IOVA_RANGE, "
        "RLIMIT_MEMLOCK exceeded, unmapped uaddr or unknown ASID"
    ),
    (
        Ioctl.VHOST_SET_FEATURES.name,
        errno_mod.EBUSY,
    ): "features cannot change after FEATURES_OK (reset first)",
    (
        Ioctl.VHOST_SET_BACKEND_FEATURES.name,
        errno_mod.EOPNOTSUPP,
    ): "backend feature not offered by the device",
    (Ioctl.VHOST_VDPA_SET_GROUP_ASID.name, errno_mod.EBUSY): "ASIDs cannot change after DRIVER_OK",
    (Ioctl.VHOST_SET_OWNER.name, errno_mod.ENOTTY): "not a vhost device",
    (Ioctl.VHOST_SET_OWNER.name, errno_mod.EBUSY): "the device already has an owner",
}

_MAX_CONFIG = 4096  # virtio config spaces are a few hundred bytes at most; bounds a caller's length


def _error(op: str, exc: OSError, hint_key: str | None = None) -> DeviceError:
    err = exc.errno if exc.errno is not None else 0
    text = os.strerror(err) if err else str(exc)
    hint = _HINTS.get((hint_key or op, err))
    return DeviceError(op, f"{text} ({hint})" if hint else text, errno=err)


def raise_memlock_limit() -> tuple[int, int]:
    """Lift RLIMIT_MEMLOCK so the kernel can pin mapped memory; returns the (soft, hard) limit in force.

    vhost_vdpa_pa_map() charges every pinned page against it and fails past it (8 MiB by default). Without
    CAP_SYS_RESOURCE the hard limit cannot grow: the soft limit is raised to it and the caller lives with it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):
        if soft != hard:
            try:
                resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
            except (ValueError, OSError) as exc:
                log.warning("memlock_raise_failed", soft=soft, hard=hard, error=str(exc))
        new = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        log.warning("memlock_limited", soft=new[0], hard=new[1])
        return new
    return resource.getrlimit(resource.RLIMIT_MEMLOCK)


class KernelVdpaDevice:
    """A /dev/vhost-vdpa-N device, owned by this process from open to close."""

    def __init__(self, path: str) -> None:
        self.name = path
        self._fd = -1
        self._backend_features = 0
        self._batch_depth = 0
        # Maps we made, per ASID. Linux 6.1 vhost-vdpa keeps its IOTLB across a device reset (the parent's
        # translations go, vhost's record stays, so re-mapping the same IOVA fails); the VdpaDevice contract is
        # that a reset drops maps unless IOTLB_PERSIST was acked, so this driver drops them itself.
        self._maps: dict[int, set[tuple[int, int]]] = {}
        self._batch_asid: int | None = None  # ASID of the open BATCH_BEGIN, None when none was written
        self._iova_range: IovaRange | None = None
        self._config_size: int | None = None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno_mod.EBUSY:
                raise DeviceBusy("open", f"{path}: device in use by another process", errno=exc.errno) from exc
            raise DeviceError("open", f"{path}: {os.strerror(exc.errno or 0)}", errno=exc.errno) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISCHR(st.st_mode):
                raise DeviceError("open", f"{path}: not a character device", errno=errno_mod.ENOTTY)
            self._fd = fd
            self._ioctl_none(Ioctl.VHOST_SET_OWNER)
            device_id = self.get_device_id()
        except BaseException:
            self._fd = -1
            os.close(fd)
            raise
        self.device_id = device_id
        memlock = raise_memlock_limit()
        log.info("kernel_vdpa_open", device=path, fd=fd, device_id=device_id, memlock_soft=memlock[0])

    # ------------------------------------------------------------------ plumbing
    def __enter__(self) -> KernelVdpaDevice:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        os.close(fd)
        log.info("kernel_vdpa_close", device=self.name)

    def _check_open(self, op: str) -> int:
        if self._fd < 0:
            raise DeviceError(op, f"{self.name} is closed", errno=errno_mod.EBADF)
        return self._fd

    def _ioctl_none(self, req: Ioctl) -> None:
        fd = self._check_open(req.name)
        try:
            fcntl.ioctl(fd, req, 0)
        except OSError as exc:
            raise _error(req.name, exc) from exc

    def _ioctl_in(self, req: Ioctl, arg: bytes) -> None:
        fd = self._check_open(req.name)
        try:
            fcntl.ioctl(fd, req, arg)
        except OSError as exc:
            raise _error(req.name, exc) from exc

    def _ioctl_inout(self, req: Ioctl, buf: bytearray) -> bytearray:
        fd = self._check_open(req.name)
        try:
            fcntl.ioctl(fd, req, buf, True)
        except OSError as exc:
            raise _error(req.name, exc) from exc
        return buf

    def _get_scalar(self, req: Ioctl, fmt: struct.Struct) -> int:
        buf = self._ioctl_inout(req, bytearray(fmt.size))
        return int(fmt.unpack(buf)[0])

    def _vring_state(self, req: Ioctl, index: int, num: int = 0) -> int:
        _check_u32(req.name, "index", index)
        _check_u32(req.name, "num", num)
        buf = self._ioctl_inout(req, bytearray(_VRING_STATE.pack(index, num)))
        return int(_VRING_STATE.unpack(buf)[1])

    def _set_vring_state(self, req: Ioctl, index: int, num: int) -> None:
        _check_u32(req.name, "index", index)
        _check_u32(req.name, "num", num)
        self._ioctl_in(req, _VRING_STATE.pack(index, num))

    def _set_vring_file(self, req: Ioctl, index: int, fd: int) -> None:
        _check_u32(req.name, "index", index)
        if fd < -1 or fd > 0x7FFFFFFF:
            raise DeviceError(req.name, f"bad fd {fd}", errno=errno_mod.EBADF)
        self._ioctl_in(req, _VRING_FILE.pack(index, fd))

    # ------------------------------------------------------------------ identity and negotiation
    def get_device_id(self) -> int:
        return self._get_scalar(Ioctl.VHOST_VDPA_GET_DEVICE_ID, _U32)

    def get_features(self) -> int:
        return self._get_scalar(Ioctl.VHOST_GET_FEATURES, _U64)

    def set_features(self, features: int) -> None:
        _check_u64(Ioctl.VHOST_SET_FEATURES.name, "features", features)
        self._ioctl_in(Ioctl.VHOST_SET_FEATURES, _U64.pack(features))
        log.debug("kernel_vdpa_set_features", device=self.name, features=hex(features))

    def get_backend_features(self) -> int:
        return self._get_scalar(Ioctl.VHOST_GET_BACKEND_FEATURES, _U64)

    def set_backend_features(self, features: int) -> None:
        _check_u64(Ioctl.VHOST_SET_BACKEND_FEATURES.name, "features", features)
        if self._batch_depth:
            raise DeviceError(Ioctl.VHOST_SET_BACKEND_FEATURES.name, "inside an IOTLB batch", errno=errno_mod.EBUSY)
        self._ioctl_in(Ioctl.VHOST_SET_BACKEND_FEATURES, _U64.pack(features))
        self._backend_features = features
        log.debug("kernel_vdpa_set_backend_features", device=self.name, features=str(BackendF(features)))

    @property
    def acked_backend_features(self) -> BackendF:
        return BackendF(self._backend_features)

    def get_status(self) -> int:
        return self._get_scalar(Ioctl.VHOST_VDPA_GET_STATUS, _U8)

    def set_status(self, status: int) -> None:
        if not 0 <= status <= 0xFF:
            raise DeviceError(Ioctl.VHOST_VDPA_SET_STATUS.name, f"status {status} is not a u8", errno=errno_mod.EINVAL)
        self._ioctl_in(Ioctl.VHOST_VDPA_SET_STATUS, _U8.pack(status))
        log.debug("kernel_vdpa_set_status", device=self.name, status=hex(status))
        if status == 0 and not self._backend_features & BackendF.IOTLB_PERSIST:
            self._drop_maps()

    def _drop_maps(self) -> None:
        """After a reset: forget every map, as the device contract says (see _maps)."""
        maps, self._maps = self._maps, {}
        for asid, ranges in sorted(maps.items()):
            with self.iotlb_batch():
                for iova, size in sorted(ranges):
                    try:
                        self._before_map(asid)
                        self._write_iotlb(IotlbType.INVALIDATE, iova=iova, size=size, asid=asid)
                    except DeviceError as exc:
                        log.warning(
                            "kernel_vdpa_unmap_on_reset_failed", device=self.name, iova=hex(iova), error=str(exc)
                        )

    def get_config_size(self) -> int:
        if self._config_size is None:
            self._config_size = self._get_scalar(Ioctl.VHOST_VDPA_GET_CONFIG_SIZE, _U32)
        return self._config_size

    def _check_config_window(self, op: str, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or length > _MAX_CONFIG:
            raise DeviceError(op, f"bad config window offset={offset} length={length}", errno=errno_mod.EINVAL)
        size = self.get_config_size()
        if offset + length > size:
            raise DeviceError(
                op,
                f"config window {offset}+{length} beyond the {size}-byte config space",
                errno=errno_mod.EINVAL,
            )

    def get_config(self, offset: int, length: int) -> bytes:
        op = Ioctl.VHOST_VDPA_GET_CONFIG.name
        self._check_config_window(op, offset, length)
        if length == 0:
            return b""
        buf = bytearray(_VDPA_CONFIG.pack(offset, length)) + bytearray(length)
        self._ioctl_inout(Ioctl.VHOST_VDPA_GET_CONFIG, buf)
        return bytes(buf[_VDPA_CONFIG.size :])

    def set_config(self, offset: int, data: bytes) -> None:
        op = Ioctl.VHOST_VDPA_SET_CONFIG.name
        self._check_config_window(op, offset, len(data))
        if not data:
            return
        self._ioctl_in(Ioctl.VHOST_VDPA_SET_CONFIG, _VDPA_CONFIG.pack(offset, len(data)) + bytes(data))

    def set_config_call(self, fd: int) -> None:
        """Eventfd signalled on config changes (-1 detaches). vdpa_sim never signals it."""
        if fd < -1 or fd > 0x7FFFFFFF:
            raise DeviceError(Ioctl.VHOST_VDPA_SET_CONFIG_CALL.name, f"bad fd {fd}", errno=errno_mod.EBADF)
        self._ioctl_in(Ioctl.VHOST_VDPA_SET_CONFIG_CALL, struct.pack("=i", fd))

    def reset_owner(self) -> None:
        """VHOST_RESET_OWNER. Linux vhost-vdpa does not implement it (ENOTTY); kept for completeness."""
        self._ioctl_none(Ioctl.VHOST_RESET_OWNER)

    # ------------------------------------------------------------------ topology
    def get_vqs_count(self) -> int:
        return self._get_scalar(Ioctl.VHOST_VDPA_GET_VQS_COUNT, _U32)

    def get_vring_num_max(self) -> int:
        return self._get_scalar(Ioctl.VHOST_VDPA_GET_VRING_NUM, _U16)

    def get_groups_num(self) -> int:
        return self._get_scalar(Ioctl.VHOST_VDPA_GET_GROUP_NUM, _U32)

    def get_as_num(self) -> int:
        return self._get_scalar(Ioctl.VHOST_VDPA_GET_AS_NUM, _U32)

    def get_vring_group(self, index: int) -> int:
        return self._vring_state(Ioctl.VHOST_VDPA_GET_VRING_GROUP, index)

    def get_vring_desc_group(self, index: int) -> int:
        """Group of the vq's descriptor area (needs backend feature DESC_ASID, Linux 6.7+)."""
        return self._vring_state(Ioctl.VHOST_VDPA_GET_VRING_DESC_GROUP, index)

    def set_group_asid(self, group: int, asid: int) -> None:
        self._set_vring_state(Ioctl.VHOST_VDPA_SET_GROUP_ASID, group, asid)
        log.debug("kernel_vdpa_set_group_asid", device=self.name, group=group, asid=asid)

    def get_iova_range(self) -> IovaRange:
        if self._iova_range is None:
            buf = self._ioctl_inout(Ioctl.VHOST_VDPA_GET_IOVA_RANGE, bytearray(_IOVA_RANGE.size))
            first, last = _IOVA_RANGE.unpack(buf)
            self._iova_range = IovaRange(first, last)
        return self._iova_range

    # ------------------------------------------------------------------ vrings
    def set_vring_num(self, index: int, num: int) -> None:
        self._set_vring_state(Ioctl.VHOST_SET_VRING_NUM, index, num)

    def set_vring_addr(self, index: int, desc: int, avail: int, used: int) -> None:
        op = Ioctl.VHOST_SET_VRING_ADDR.name
        _check_u32(op, "index", index)
        for what, value in (("desc", desc), ("avail", avail), ("used", used)):
            _check_u64(op, what, value)
        # the struct order is desc, used, avail (linux/vhost_types.h struct vhost_vring_addr)
        self._ioctl_in(Ioctl.VHOST_SET_VRING_ADDR, _VRING_ADDR.pack(index, 0, desc, used, avail, 0))
        log.debug(
            "kernel_vdpa_set_vring_addr",
            device=self.name,
            vq=index,
            desc=hex(desc),
            avail=hex(avail),
            used=hex(used),
        )

    def set_vring_base(self, index: int, base: int) -> None:
        self._set_vring_state(Ioctl.VHOST_SET_VRING_BASE, index, base)

    def get_vring_base(self, index: int) -> int:
        return self._vring_state(Ioctl.VHOST_GET_VRING_BASE, index)

    def set_vring_kick(self, index: int, fd: int) -> None:
        self._set_vring_file(Ioctl.VHOST_SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int) -> None:
        self._set_vring_file(Ioctl.VHOST_SET_VRING_CALL, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._set_vring_state(Ioctl.VHOST_VDPA_SET_VRING_ENABLE, index, 1 if enable else 0)
        log.debug("kernel_vdpa_set_vring_enable", device=self.name, vq=index, enable=enable)

    def suspend(self) -> None:
        self._require_backend(Ioctl.VHOST_VDPA_SUSPEND.name, BackendF.SUSPEND)
        self._ioctl_none(Ioctl.VHOST_VDPA_SUSPEND)
        log.debug("kernel_vdpa_suspend", device=self.name)

    def resume(self) -> None:
        self._require_backend(Ioctl.VHOST_VDPA_RESUME.name, BackendF.RESUME)
        self._ioctl_none(Ioctl.VHOST_VDPA_RESUME)
        log.debug("kernel_vdpa_resume", device=self.name)

    def _require_backend(self, op: str, feature: BackendF) -> None:
        if not self._backend_features & feature:
            raise DeviceError(op, f"backend feature {feature.name} not acked", errno=errno_mod.EOPNOTSUPP)

    # ------------------------------------------------------------------ IOTLB
    def _write_iotlb(
        self, kind: IotlbType, *, iova: int = 0, size: int = 0, uaddr: int = 0, perm: int = 0, asid: int = 0
    ) -> None:
        op = f"IOTLB_{kind.name}"
        fd = self._check_open(op)
        v2 = bool(self._backend_features & BackendF.IOTLB_MSG_V2)
        if asid and not self._backend_features & BackendF.IOTLB_ASID:
            raise DeviceError(op, f"ASID {asid} needs backend feature IOTLB_ASID", errno=errno_mod.EOPNOTSUPP)
        if asid and not v2:
            raise DeviceError(op, f"ASID {asid} needs backend feature IOTLB_MSG_V2", errno=errno_mod.EOPNOTSUPP)
        msg = pack_iotlb_msg(kind, iova=iova, size=size, uaddr=uaddr, perm=perm, asid=asid, v2=v2)
        try:
            written = self._write_msg(fd, msg)
        except OSError as exc:
            raise _error(op, exc, "iotlb") from exc
        if written != len(msg):
            raise DeviceError(op, f"short write {written}/{len(msg)}", errno=errno_mod.EIO)

    def _write_msg(self, fd: int, msg: bytes) -> int:
        return os.write(fd, msg)

    def _before_map(self, asid: int) -> None:
        """Inside iotlb_batch(), open (or move) the kernel batch so it names this ASID."""
        if not self._batch_depth or self._batch_asid == asid:
            return
        if self._batch_asid is not None:
            self._write_iotlb(IotlbType.BATCH_END, asid=self._batch_asid)
        self._batch_asid = None
        self._write_iotlb(IotlbType.BATCH_BEGIN, asid=asid)
        self._batch_asid = asid

    def iotlb_update(self, iova: int, size: int, uaddr: int, perm: Perm, asid: int = 0) -> None:
        op = "IOTLB_UPDATE"
        _check_u32(op, "asid", asid)
        for what, value in (("iova", iova), ("size", size), ("uaddr", uaddr)):
            _check_u64(op, what, value)
        if int(perm) not in (Perm.RO, Perm.WO, Perm.RW):
            raise DeviceError(op, f"bad permission {perm!r}", errno=errno_mod.EINVAL)
        rng = self.get_iova_range()
        if not rng.contains(iova, size):
            raise DeviceError(
                op,
                f"[{iova:#x}, +{size:#x}) outside the device IOVA range [{rng.first:#x}, {rng.last:#x}]",
                errno=errno_mod.EINVAL,
            )
        self._before_map(asid)
        self._write_iotlb(IotlbType.UPDATE, iova=iova, size=size, uaddr=uaddr, perm=int(perm), asid=asid)
        self._maps.setdefault(asid, set()).add((iova, size))
        log.debug(
            "kernel_vdpa_iotlb_update",
            device=self.name,
            iova=hex(iova),
            size=hex(size),
            uaddr=hex(uaddr),
            perm=perm.name,
            asid=asid,
        )

    def iotlb_invalidate(self, iova: int, size: int, asid: int = 0) -> None:
        op = "IOTLB_INVALIDATE"
        _check_u32(op, "asid", asid)
        for what, value in (("iova", iova), ("size", size)):
            _check_u64(op, what, value)
        if size == 0:
            raise DeviceError(op, "empty range", errno=errno_mod.EINVAL)
        self._before_map(asid)
        self._write_iotlb(IotlbType.INVALIDATE, iova=iova, size=size, asid=asid)
        end = iova + size
        kept = {(i, n) for i, n in self._maps.get(asid, set()) if i + n <= iova or i >= end}
        self._maps[asid] = kept
        log.debug("kernel_vdpa_iotlb_invalidate", device=self.name, iova=hex(iova), size=hex(size), asid=asid)

    @contextmanager
    def _batch(self) -> Iterator[None]:
        self._batch_depth += 1
        try:
            yield
        except BaseException:
            self._batch_depth -= 1
            try:
                self._end_batch()
            except DeviceError as exc:
                # the body's error is the one to report; this one is only logged
                log.warning("kernel_vdpa_batch_end_failed", device=self.name, error=str(exc))
            raise
        self._batch_depth -= 1
        self._end_batch()

    def _end_batch(self) -> None:
        if self._batch_depth == 0 and self._batch_asid is not None:
            asid, self._batch_asid = self._batch_asid, None
            # END must go out even when the body failed: the kernel stays "in batch" otherwise and
            # silently defers every later map on batch_mapping devices.
            self._write_iotlb(IotlbType.BATCH_END, asid=asid)

    @contextmanager
    def _no_batch(self) -> Iterator[None]:
        yield

    def iotlb_batch(self) -> AbstractContextManager[None]:
        """Group maps into one BATCH_BEGIN/END per ASID when IOTLB_BATCH was acked (a no-op otherwise).

        BEGIN is written lazily with the first map, so an empty batch writes nothing.
        """
        if self._backend_features & BackendF.IOTLB_BATCH:
            return self._batch()
        return self._no_batch()

    # ------------------------------------------------------------------ observation
    def vq_stats(self, index: int) -> VqStats:
        # vhost-vdpa has no per-vq counters; the proxy counts kicks/calls on eventfds it owns
        _check_u32("vq_stats", "index", index)
        return VqStats()

    def fault_fd(self) -> int:
        # VHOST_SET_VRING_ERR is accepted by the generic vhost vring code but vhost-vdpa never signals it
        return -1

    def take_faults(self) -> list[DeviceFault]:
        return []


def _check_u32(op: str, what: str, value: int) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise DeviceError(op, f"{what} {value} is not a u32", errno=errno_mod.EINVAL)


def _check_u64(op: str, what: str, value: int) -> None:
    if not 0 <= value <= 0xFFFFFFFFFFFFFFFF:
        raise DeviceError(op, f"{what} {value} is not a u64", errno=errno_mod.EINVAL)
