"""The kernel vhost-vdpa driver without a device: ioctl encodings, IOTLB messages, argument packing, errors.

There is no /dev/vhost-vdpa-N on the build host; the kernel tier runs the device suite against vdpa_sim_net.
Here the ioctl layer is replaced by a recording fake so the bytes handed to the kernel can be checked.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vduproxy.vdpa import kernel
from vduproxy.vdpa.device import BackendF, DeviceBusy, DeviceError, Perm, VdpaDevice
from vduproxy.vdpa.kernel import IOTLB_MSG_SIZE, Ioctl, IotlbType, KernelVdpaDevice, pack_iotlb_msg

pytestmark = pytest.mark.unit

# Printed by /work/shared/testbed/vdpa-kernel/tools/ioctl-nums.c against linux-libc-dev 6.1's <linux/vhost.h>
# (tools/ioctl-nums.txt). RESUME and GET_VRING_DESC_GROUP are newer (6.4 / 6.7): values from upstream
# include/uapi/linux/vhost.h, _IO(VHOST_VIRTIO, 0x7E) and _IOWR(VHOST_VIRTIO, 0x7F, struct vhost_vring_state).
KNOWN_NUMBERS = {
    "VHOST_SET_OWNER": 0x0000AF01,
    "VHOST_RESET_OWNER": 0x0000AF02,
    "VHOST_GET_FEATURES": 0x8008AF00,
    "VHOST_SET_FEATURES": 0x4008AF00,
    "VHOST_GET_BACKEND_FEATURES": 0x8008AF26,
    "VHOST_SET_BACKEND_FEATURES": 0x4008AF25,
    "VHOST_SET_VRING_NUM": 0x4008AF10,
    "VHOST_SET_VRING_ADDR": 0x4028AF11,
    "VHOST_SET_VRING_BASE": 0x4008AF12,
    "VHOST_GET_VRING_BASE": 0xC008AF12,
    "VHOST_SET_VRING_KICK": 0x4008AF20,
    "VHOST_SET_VRING_CALL": 0x4008AF21,
    "VHOST_VDPA_GET_DEVICE_ID": 0x8004AF70,
    "VHOST_VDPA_GET_STATUS": 0x8001AF71,
    "VHOST_VDPA_SET_STATUS": 0x4001AF72,
    "VHOST_VDPA_GET_CONFIG": 0x8008AF73,
    "VHOST_VDPA_SET_CONFIG": 0x4008AF74,
    "VHOST_VDPA_SET_VRING_ENABLE": 0x4008AF75,
    "VHOST_VDPA_GET_VRING_NUM": 0x8002AF76,
    "VHOST_VDPA_SET_CONFIG_CALL": 0x4004AF77,
    "VHOST_VDPA_GET_IOVA_RANGE": 0x8010AF78,
    "VHOST_VDPA_GET_CONFIG_SIZE": 0x8004AF79,
    "VHOST_VDPA_GET_VQS_COUNT": 0x8004AF80,
    "VHOST_VDPA_GET_GROUP_NUM": 0x8004AF81,
    "VHOST_VDPA_GET_AS_NUM": 0x8004AF7A,
    "VHOST_VDPA_GET_VRING_GROUP": 0xC008AF7B,
    "VHOST_VDPA_SET_GROUP_ASID": 0x4008AF7C,
    "VHOST_VDPA_SUSPEND": 0x0000AF7D,
    "VHOST_VDPA_RESUME": 0x0000AF7E,
    "VHOST_VDPA_GET_VRING_DESC_GROUP": 0xC008AF7F,
}


@pytest.mark.parametrize("name", sorted(KNOWN_NUMBERS))
def test_ioctl_number_matches_header(name: str) -> None:
    assert Ioctl[name] == KNOWN_NUMBERS[name], f"{name}: {Ioctl[name]:#x} != {KNOWN_NUMBERS[name]:#x}"


def test_every_ioctl_the_protocol_needs_is_defined() -> None:
    assert set(KNOWN_NUMBERS) <= {i.name for i in Ioctl}


def test_ioctl_numbers_against_installed_header(tmp_path: Path) -> None:
    """Whatever this host's <linux/vhost.h> defines must agree with the computed numbers."""
    lines = ["#include <stdio.h>", "#include <linux/vhost.h>", "int main(void) {"]
    for ioc in Ioctl:
        lines += [f"#ifdef {ioc.name}", f'printf("{ioc.name} %lu\\n", (unsigned long){ioc.name});', "#endif"]
    lines += [
        'printf("sizeof_msg_v2 %zu\\n", sizeof(struct vhost_msg_v2));',
        'printf("sizeof_vring_addr %zu\\n", sizeof(struct vhost_vring_addr));',
        "return 0; }",
    ]
    src = tmp_path / "n.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "n"
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True, timeout=60)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=10).stdout
    seen = dict(line.split() for line in out.splitlines())
    assert int(seen.pop("sizeof_msg_v2")) == IOTLB_MSG_SIZE
    assert int(seen.pop("sizeof_vring_addr")) == kernel._VRING_ADDR.size
    assert "VHOST_SET_OWNER" in seen
    for name, value in seen.items():
        assert Ioctl[name] == int(value), name


# --- IOTLB messages
class _IotlbMsg(ctypes.Structure):
    # struct vhost_iotlb_msg, laid out by ctypes with the platform's C rules
    _fields_ = [
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("uaddr", ctypes.c_uint64),
        ("perm", ctypes.c_uint8),
        ("type", ctypes.c_uint8),
    ]


class _MsgUnion(ctypes.Union):
    _fields_ = [("iotlb", _IotlbMsg), ("padding", ctypes.c_uint8 * 64)]


class _MsgV2(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [("type", ctypes.c_uint32), ("asid", ctypes.c_uint32), ("u", _MsgUnion)]


def test_iotlb_message_layout_matches_c_struct() -> None:
    raw = pack_iotlb_msg(
        IotlbType.UPDATE, iova=0x10000000, size=0x100000, uaddr=0x7F0012345000, perm=Perm.RW, asid=1
    )
    assert len(raw) == ctypes.sizeof(_MsgV2) == 72
    msg = _MsgV2.from_buffer_copy(raw)
    assert msg.type == kernel.VHOST_IOTLB_MSG_V2 == 2
    assert msg.asid == 1
    assert (msg.iotlb.iova, msg.iotlb.size, msg.iotlb.uaddr) == (0x10000000, 0x100000, 0x7F0012345000)
    assert msg.iotlb.perm == 3
    assert msg.iotlb.type == 2
    # the kernel reads the whole union: the tail must be zero
    assert raw[_MsgV2.u.offset + ctypes.sizeof(_IotlbMsg) :] == bytes(72 - 8 - ctypes.sizeof(_IotlbMsg))


def test_iotlb_message_types_are_the_kernel_values() -> None:
    assert (IotlbType.UPDATE, IotlbType.INVALIDATE, IotlbType.BATCH_BEGIN, IotlbType.BATCH_END) == (
        2,
        3,
        5,
        6,
    )


def test_iotlb_message_round_trips() -> None:
    raw = pack_iotlb_msg(IotlbType.INVALIDATE, iova=0x2000, size=0x1000, asid=7)
    assert kernel.unpack_iotlb_msg(raw) == (2, 7, IotlbType.INVALIDATE, 0x2000, 0x1000, 0, 0)


def test_v1_message_cannot_carry_an_asid() -> None:
    assert _MsgV2.from_buffer_copy(pack_iotlb_msg(IotlbType.UPDATE, v2=False)).type == 1
    with pytest.raises(ValueError):
        pack_iotlb_msg(IotlbType.UPDATE, asid=1, v2=False)


# --- open errors
def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_open_missing_path_is_a_clean_error(tmp_path: Path) -> None:
    before = _open_fds()
    with pytest.raises(DeviceError) as ei:
        KernelVdpaDevice(str(tmp_path / "vhost-vdpa-404"))
    assert ei.value.op == "open"
    assert ei.value.errno == errno.ENOENT
    assert "vhost-vdpa-404" in str(ei.value)
    assert _open_fds() == before


def test_open_regular_file_is_refused_without_leaking(tmp_path: Path) -> None:
    f = tmp_path / "not-a-device"
    f.write_bytes(b"x")
    before = _open_fds()
    with pytest.raises(DeviceError) as ei:
        KernelVdpaDevice(str(f))
    assert ei.value.op == "open"
    assert "not a character device" in ei.value.message
    assert _open_fds() == before


def test_open_char_device_that_is_not_vhost_fails_at_set_owner() -> None:
    before = _open_fds()
    with pytest.raises(DeviceError) as ei:
        KernelVdpaDevice("/dev/null")
    assert ei.value.op == "VHOST_SET_OWNER"
    assert ei.value.errno == errno.ENOTTY
    assert "not a vhost device" in str(ei.value)
    assert _open_fds() == before


def test_open_busy_device_raises_device_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    def busy(path: str, flags: int, mode: int = 0o777) -> int:
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)

    monkeypatch.setattr(os, "open", busy)
    with pytest.raises(DeviceBusy) as ei:
        KernelVdpaDevice("/dev/vhost-vdpa-0")
    assert "device in use by another process" in str(ei.value)
    assert ei.value.errno == errno.EBUSY


# --- fake kernel
class FakeKernel:
    """Answers the ioctls a vdpa_sim_net device answers (values seen in the test bed) and records the rest."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.fail: dict[str, int] = {}
        self.config = bytearray(bytes.fromhex("00e8ca33ba05") + struct.pack("<HHH", 1, 0, 1500) + bytes(12))
        self.vring_base = {0: 11, 1: 12, 2: 1}

    def ioctl(self, fd: int, req: int, arg: Any = 0, mutate: bool = True) -> int:
        name = Ioctl(req).name
        self.calls.append((name, bytes(arg) if not isinstance(arg, int) else b""))
        if name in self.fail:
            raise OSError(self.fail[name], os.strerror(self.fail[name]))
        answers: dict[str, bytes] = {
            "VHOST_VDPA_GET_DEVICE_ID": struct.pack("=I", 1),
            "VHOST_GET_FEATURES": struct.pack("=Q", 0x308820028),
            "VHOST_GET_BACKEND_FEATURES": struct.pack("=Q", 0x1E),
            "VHOST_VDPA_GET_CONFIG_SIZE": struct.pack("=I", len(self.config)),
            "VHOST_VDPA_GET_IOVA_RANGE": struct.pack("=QQ", 0, 0xFFFF_FFFF_FFFF),
            "VHOST_VDPA_GET_VRING_NUM": struct.pack("=H", 256),
            "VHOST_VDPA_GET_STATUS": struct.pack("=B", 0xB),
        }
        if name in answers:
            arg[:] = answers[name]
        elif name in ("VHOST_GET_VRING_BASE", "VHOST_VDPA_GET_VRING_GROUP"):
            index = struct.unpack_from("=I", arg)[0]
            value = self.vring_base[index] if name == "VHOST_GET_VRING_BASE" else int(index == 2)
            arg[:] = struct.pack("=II", index, value)
        elif name == "VHOST_VDPA_GET_CONFIG":
            off, length = struct.unpack_from("=II", arg)
            arg[8:] = self.config[off : off + length]
        return 0

    def names(self) -> list[str]:
        return [n for n, _ in self.calls]


@pytest.fixture
def fake() -> FakeKernel:
    return FakeKernel()


@pytest.fixture
def dev(fake: FakeKernel, monkeypatch: pytest.MonkeyPatch) -> Iterator[KernelVdpaDevice]:
    monkeypatch.setattr(fcntl, "ioctl", fake.ioctl)
    d = KernelVdpaDevice("/dev/null")  # a char device: open/fstat are real, ioctls go to the fake
    written: list[bytes] = []
    d.written = written  # type: ignore[attr-defined]

    def write_msg(fd: int, msg: bytes) -> int:
        written.append(msg)
        return len(msg)

    monkeypatch.setattr(d, "_write_msg", write_msg)
    yield d
    d.close()


def _msgs(dev: KernelVdpaDevice) -> list[tuple[IotlbType, int]]:
    return [(kernel.unpack_iotlb_msg(m)[2], kernel.unpack_iotlb_msg(m)[1]) for m in dev.written]  # type: ignore[attr-defined]


def test_device_satisfies_the_protocol(dev: KernelVdpaDevice) -> None:
    assert isinstance(dev, VdpaDevice)


def test_open_takes_ownership_first(dev: KernelVdpaDevice, fake: FakeKernel) -> None:
    assert fake.names()[0] == "VHOST_SET_OWNER"
    assert dev.device_id == 1


def test_queries_decode_kernel_answers(dev: KernelVdpaDevice) -> None:
    assert dev.get_features() == 0x308820028
    assert BackendF(dev.get_backend_features()) == (
        BackendF.IOTLB_MSG_V2 | BackendF.IOTLB_BATCH | BackendF.IOTLB_ASID | BackendF.SUSPEND
    )
    assert dev.get_vring_num_max() == 256
    assert dev.get_config(0, 6) == bytes.fromhex("00e8ca33ba05")
    assert dev.get_vring_base(1) == 12
    assert dev.get_vring_group(2) == 1
    assert dev.get_iova_range().last == 0xFFFF_FFFF_FFFF
    assert dev.get_status() == 0xB


def test_vring_addr_is_packed_in_kernel_field_order(dev: KernelVdpaDevice, fake: FakeKernel) -> None:
    dev.set_vring_addr(2, desc=0x1000, avail=0x2000, used=0x3000)
    name, arg = fake.calls[-1]
    assert name == "VHOST_SET_VRING_ADDR"
    # struct vhost_vring_addr {index, flags, desc_user_addr, used_user_addr, avail_user_addr, log_guest_addr}
    assert struct.unpack("=IIQQQQ", arg) == (2, 0, 0x1000, 0x3000, 0x2000, 0)


def test_vring_file_and_state_arguments(dev: KernelVdpaDevice, fake: FakeKernel) -> None:
    dev.set_vring_kick(1, -1)
    assert fake.calls[-1] == ("VHOST_SET_VRING_KICK", struct.pack("=Ii", 1, -1))
    dev.set_vring_enable(0, True)
    assert fake.calls[-1] == ("VHOST_VDPA_SET_VRING_ENABLE", struct.pack("=II", 0, 1))
    dev.set_group_asid(1, 1)
    assert fake.calls[-1] == ("VHOST_VDPA_SET_GROUP_ASID", struct.pack("=II", 1, 1))


def test_kernel_errno_becomes_device_error_naming_the_ioctl(dev: KernelVdpaDevice, fake: FakeKernel) -> None:
    fake.fail["VHOST_SET_FEATURES"] = errno.EBUSY
    with pytest.raises(DeviceError) as ei:
        dev.set_features(0x300000000)
    assert ei.value.op == "VHOST_SET_FEATURES"
    assert ei.value.errno == errno.EBUSY
    assert "FEATURES_OK" in ei.value.message


@pytest.mark.parametrize(
    ("call", "op"),
    [
        (lambda d: d.get_config(20, 8), "VHOST_VDPA_GET_CONFIG"),
        (lambda d: d.get_config(-1, 2), "VHOST_VDPA_GET_CONFIG"),
        (lambda d: d.set_config(0, bytes(1 << 20)), "VHOST_VDPA_SET_CONFIG"),
        (lambda d: d.set_vring_num(1 << 32, 256), "VHOST_SET_VRING_NUM"),
        (lambda d: d.set_vring_call(0, -5), "VHOST_SET_VRING_CALL"),
        (lambda d: d.set_status(256), "VHOST_VDPA_SET_STATUS"),
        (lambda d: d.iotlb_update(0, 0, 0x1000, Perm.RW), "IOTLB_UPDATE"),
        (lambda d: d.iotlb_update(0xFFFF_FFFF_F000, 0x2000, 0x1000, Perm.RW), "IOTLB_UPDATE"),
        (lambda d: d.iotlb_invalidate(0x1000, 0), "IOTLB_INVALIDATE"),
    ],
)
def test_bad_arguments_are_refused_before_the_kernel(
    dev: KernelVdpaDevice, fake: FakeKernel, call: Any, op: str
) -> None:
    n = len(fake.calls)
    with pytest.raises(DeviceError) as ei:
        call(dev)
    assert ei.value.op == op
    assert ei.value.errno == errno.EINVAL or ei.value.errno == errno.EBADF
    # nothing reached the kernel except (cached) size queries
    assert all(
        name in ("VHOST_VDPA_GET_CONFIG_SIZE", "VHOST_VDPA_GET_IOVA_RANGE") for name, _ in fake.calls[n:]
    )
    assert dev.written == []  # type: ignore[attr-defined]


def test_suspend_needs_the_backend_feature(dev: KernelVdpaDevice, fake: FakeKernel) -> None:
    with pytest.raises(DeviceError) as ei:
        dev.suspend()
    assert ei.value.op == "VHOST_VDPA_SUSPEND"
    assert "SUSPEND" in ei.value.message
    dev.set_backend_features(0x1E)
    dev.suspend()
    assert fake.names()[-1] == "VHOST_VDPA_SUSPEND"
    with pytest.raises(DeviceError, match="RESUME"):
        dev.resume()


def test_iotlb_batch_wraps_updates_and_follows_the_asid(dev: KernelVdpaDevice) -> None:
    dev.set_backend_features(int(BackendF.IOTLB_MSG_V2 | BackendF.IOTLB_BATCH | BackendF.IOTLB_ASID))
    with dev.iotlb_batch():
        dev.iotlb_update(0x10000000, 0x100000, 0x7F0000000000, Perm.RW)
        dev.iotlb_update(0x10100000, 0x100000, 0x7F0000100000, Perm.RO)
        dev.iotlb_update(0x10000000, 0x1000, 0x7F0000200000, Perm.RW, asid=1)
    U, B, E = IotlbType.UPDATE, IotlbType.BATCH_BEGIN, IotlbType.BATCH_END
    # the kernel commits the END's ASID only: a change of ASID closes the batch and opens a new one
    assert _msgs(dev) == [(B, 0), (U, 0), (U, 0), (E, 0), (B, 1), (U, 1), (E, 1)]


def test_empty_batch_and_nested_batches(dev: KernelVdpaDevice) -> None:
    dev.set_backend_features(int(BackendF.IOTLB_MSG_V2 | BackendF.IOTLB_BATCH))
    with dev.iotlb_batch():
        pass
    assert _msgs(dev) == []
    with dev.iotlb_batch():
        with dev.iotlb_batch():
            dev.iotlb_invalidate(0x1000, 0x1000)
        assert _msgs(dev)[-1][0] == IotlbType.INVALIDATE
    assert [t for t, _ in _msgs(dev)] == [IotlbType.BATCH_BEGIN, IotlbType.INVALIDATE, IotlbType.BATCH_END]


def test_batch_end_is_written_when_the_body_fails(dev: KernelVdpaDevice) -> None:
    dev.set_backend_features(int(BackendF.IOTLB_MSG_V2 | BackendF.IOTLB_BATCH))
    with pytest.raises(RuntimeError), dev.iotlb_batch():
        dev.iotlb_update(0x1000, 0x1000, 0x7F0000000000, Perm.RW)
        raise RuntimeError("caller failed")
    assert _msgs(dev)[-1][0] == IotlbType.BATCH_END


def test_no_batch_messages_without_the_feature(dev: KernelVdpaDevice) -> None:
    dev.set_backend_features(int(BackendF.IOTLB_MSG_V2))
    with dev.iotlb_batch():
        dev.iotlb_update(0x1000, 0x1000, 0x7F0000000000, Perm.RW)
    assert [t for t, _ in _msgs(dev)] == [IotlbType.UPDATE]
    with pytest.raises(DeviceError, match="IOTLB_ASID"):
        dev.iotlb_update(0x1000, 0x1000, 0x7F0000000000, Perm.RW, asid=1)


def test_failed_iotlb_write_explains_the_kernel_efault(
    dev: KernelVdpaDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev.set_backend_features(int(BackendF.IOTLB_MSG_V2))

    def efault(fd: int, msg: bytes) -> int:
        raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))

    monkeypatch.setattr(dev, "_write_msg", efault)
    with pytest.raises(DeviceError) as ei:
        dev.iotlb_update(0x1000, 0x1000, 0x7F0000000000, Perm.RW)
    assert ei.value.op == "IOTLB_UPDATE"
    assert ei.value.errno == errno.EFAULT
    assert "overlapping" in ei.value.message


def test_closed_device_refuses_operations(dev: KernelVdpaDevice) -> None:
    dev.close()
    dev.close()  # idempotent
    with pytest.raises(DeviceError) as ei:
        dev.get_features()
    assert ei.value.errno == errno.EBADF


def test_observation_defaults(dev: KernelVdpaDevice) -> None:
    assert dev.vq_stats(0).packets == 0
    assert dev.fault_fd() == -1
    assert dev.take_faults() == []


def test_memlock_is_raised(dev: KernelVdpaDevice) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    assert soft == hard  # raised to the hard limit at least (infinity when root)
