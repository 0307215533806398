"""Control plane of the software vDPA device: profiles, spec parsing, status machine, config, IOTLB rules."""

from __future__ import annotations

import ctypes
import errno
import gc
import mmap
import os
import pathlib
from collections.abc import Iterator

import pytest

from vduproxy.vdpa.device import BackendF, DeviceError, Perm, VdpaDevice
from vduproxy.vdpa.factory import open_device
from vduproxy.vdpa.sim import SimConfigError, SimDevice, list_profiles, load_profile, parse_sim_spec
from vduproxy.virtio import NetF, Status

pytestmark = pytest.mark.unit

S_AD = Status.ACKNOWLEDGE | Status.DRIVER
MODERN = NetF.VERSION_1 | NetF.ACCESS_PLATFORM


@pytest.fixture
def dev() -> Iterator[SimDevice]:
    d = SimDevice("sim")
    yield d
    d.close()


@pytest.fixture
def buf() -> Iterator[tuple[int, int]]:
    """(uaddr, size) of 1 MiB of shared memory in this process."""
    fd = os.memfd_create("sim-test")
    os.ftruncate(fd, 1 << 20)
    mm = mmap.mmap(fd, 1 << 20)
    anchor = ctypes.c_char.from_buffer(mm)
    addr = ctypes.addressof(anchor)
    del anchor
    yield addr, 1 << 20
    mm.close()
    os.close(fd)


# ---------------------------------------------------------------- profiles and specs


def test_packaged_profiles_load() -> None:
    assert {"rich", "vdpasim", "basic"} <= set(list_profiles())
    for name in list_profiles():
        assert load_profile(name).name == name


def test_vdpasim_profile_matches_the_kernel_device() -> None:
    with SimDevice("sim:profile=vdpasim") as dev:
        assert dev.get_features() == 0x308820028
        assert dev.get_backend_features() == 0x1E
        assert dev.get_vqs_count() == 3
        assert dev.get_vring_num_max() == 256
        assert (dev.get_groups_num(), dev.get_as_num()) == (2, 2)
        assert [dev.get_vring_group(i) for i in range(3)] == [0, 0, 1]
        assert dev.get_iova_range().first == 0 and dev.get_iova_range().last == (1 << 64) - 1
        assert dev.get_config(0, 12) == bytes.fromhex("00e8ca33ba0501000000dc05")
        with pytest.raises(DeviceError) as e:
            dev.resume()
        assert e.value.errno == errno.EOPNOTSUPP


def test_rich_profile_topology(dev: SimDevice) -> None:
    f = dev.get_features()
    for bit in (NetF.MRG_RXBUF, NetF.RING_INDIRECT_DESC, NetF.RING_EVENT_IDX, NetF.MQ, NetF.CTRL_VLAN):
        assert f & bit
    assert dev.get_vqs_count() == 9
    assert dev.get_vring_group(8) == 1 and dev.get_vring_group(7) == 0
    cfg = dev.get_config(0, 12)
    assert int.from_bytes(cfg[8:10], "little") == 4  # max_virtqueue_pairs
    assert int.from_bytes(cfg[10:12], "little") == 9000  # jumbo frames for the data-path tests
    assert dev.get_backend_features() & BackendF.RESUME


def test_user_profile_file(tmp_path: pathlib.Path) -> None:
    p = tmp_path / "mine.toml"
    p.write_text('features = ["VERSION_1", "ACCESS_PLATFORM", "MAC"]\nring_max = 64\nmac = "02:11:22:33:44:55"\n')
    with SimDevice(f"sim:profile={p}") as dev:
        assert dev.get_vqs_count() == 2
        assert dev.get_vring_num_max() == 64
        assert dev.get_config(0, 6) == bytes.fromhex("021122334455")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('features = ["VERSION_1"]\nqueue_paris = 2\n', "unknown key(s) queue_paris"),
        ('features = ["VERSION_2"]\n', "unknown name 'VERSION_2'"),
        ('features = ["VERSION_1"]\nring_max = 100\n', "power of two"),
        ('features = ["VERSION_1"]\nqueue_pairs = 2\n', "needs MQ"),
        ('features = ["RING_PACKED"]\n', "not implemented"),
        ('features = ["CTRL_RX"]\n', "need CTRL_VQ"),
        ('features = ["MAC"]\nmac = "zz"\n', "not a MAC"),
        ('features = ["MAC"]\niova_range = [10, 5]\n', "iova_range"),
        ('features = ["MAC"]\nbackend_features = ["DESC_ASID"]\n', "not implemented"),
        ("ring_max = 64\n", "'features' is required"),
        ("features = [\n", "not valid TOML"),
    ],
)
def test_bad_profiles_are_rejected_clearly(tmp_path: pathlib.Path, text: str, needle: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(SimConfigError) as e:
        load_profile(str(p))
    assert needle in str(e.value)


def test_missing_profile() -> None:
    with pytest.raises(SimConfigError, match="no profile 'nope'"):
        load_profile("nope")
    with pytest.raises(SimConfigError, match="cannot read"):
        load_profile("/nonexistent/x.toml")


def test_spec_parsing() -> None:
    s = parse_sim_spec("sim:profile=vdpasim,mac=02:00:00:00:00:09,backend=sink")
    assert (s.profile, s.backend, s.mac) == ("vdpasim", "sink", bytes.fromhex("020000000009"))
    assert parse_sim_spec("sim:tap=vdu0").backend == "tap"
    assert parse_sim_spec("sim") == parse_sim_spec("sim:")
    bad_specs = [
        *("sim:colour=red", "sim:backend=tap", "sim:backend=warp", "sim:mac=1:2", "sim:profile"),
        *("sim:tap=x,backend=sink", "simulator", "sim:busy_poll_us=-3", "sim:profile=a,profile=b"),
    ]
    for bad in bad_specs:
        with pytest.raises(SimConfigError):
            parse_sim_spec(bad)


def test_mac_override_reaches_config() -> None:
    with SimDevice("sim:mac=02:de:ad:be:ef:01") as dev:
        assert dev.get_config(0, 6) == bytes.fromhex("02deadbeef01")


def test_factory() -> None:
    dev = open_device("sim:profile=basic")
    try:
        assert isinstance(dev, SimDevice)
        assert isinstance(dev, VdpaDevice)
        assert dev.get_vqs_count() == 2
    finally:
        dev.close()
    with pytest.raises(DeviceError, match="unknown device"):
        open_device("floppy")


def test_close_is_idempotent_and_final() -> None:
    dev = SimDevice("sim")
    fault_fd = dev.fault_fd()
    dev.close()
    dev.close()
    with pytest.raises(DeviceError, match="closed"):
        dev.get_vring_base(0)
    with pytest.raises(OSError):
        os.fstat(fault_fd)  # the native side closed its fds


# ---------------------------------------------------------------- status machine and features


def test_status_bits_only_grow(dev: SimDevice) -> None:
    dev.set_status(S_AD)
    with pytest.raises(DeviceError) as e:
        dev.set_status(Status.ACKNOWLEDGE)
    assert e.value.errno == errno.EINVAL
    assert dev.get_status() == S_AD
    dev.set_status(0)
    assert dev.get_status() == 0


def test_features_ok_needs_version_1_and_access_platform(dev: SimDevice) -> None:
    dev.set_status(S_AD)
    dev.set_features(NetF.VERSION_1 | NetF.MAC)
    dev.set_status(S_AD | Status.FEATURES_OK)
    assert not dev.get_status() & Status.FEATURES_OK  # refused: the driver reads the bit back
    dev.set_features(MODERN | NetF.MAC)
    dev.set_status(S_AD | Status.FEATURES_OK)
    assert dev.get_status() & Status.FEATURES_OK


def test_features_frozen_after_features_ok(dev: SimDevice) -> None:
    dev.set_status(S_AD)
    dev.set_features(MODERN)
    dev.set_status(S_AD | Status.FEATURES_OK)
    with pytest.raises(DeviceError) as e:
        dev.set_features(MODERN | NetF.MAC)
    assert e.value.errno == errno.EBUSY


def test_backend_features_must_be_offered() -> None:
    with SimDevice("sim:profile=vdpasim") as dev:
        dev.set_backend_features(0x1E)
        with pytest.raises(DeviceError) as e:
            dev.set_backend_features(BackendF.RESUME)
        assert e.value.errno == errno.EOPNOTSUPP


def test_config_bounds(dev: SimDevice) -> None:
    assert len(dev.get_config(0, 24)) == 24
    for off, n in ((0, 25), (20, 8), (30, 1), (0, 0)):
        with pytest.raises(DeviceError):
            dev.get_config(off, n)
    dev.set_config(0, bytes.fromhex("020000000005"))
    assert dev.get_config(0, 6) == bytes.fromhex("020000000005")
    with pytest.raises(DeviceError):
        dev.set_config(10, b"\x00\x10")  # MTU is read-only


# ---------------------------------------------------------------- vrings


def test_vring_argument_checks(dev: SimDevice) -> None:
    for call in (
        lambda: dev.set_vring_num(0, 3),
        lambda: dev.set_vring_num(0, 2048),
        lambda: dev.set_vring_num(9, 256),
        lambda: dev.set_vring_base(0, 1 << 16),
        lambda: dev.set_vring_addr(0, 0x1008, 0x2000, 0x3000),  # descriptor table not 16-aligned
        lambda: dev.get_vring_group(9),
        lambda: dev.set_group_asid(2, 0),
        lambda: dev.set_group_asid(1, 2),
    ):
        with pytest.raises(DeviceError):
            call()


def test_kick_must_be_an_eventfd(dev: SimDevice) -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(DeviceError, match="not an eventfd"):
            dev.set_vring_kick(0, r)
    finally:
        os.close(r)
        os.close(w)
    efd = os.eventfd(0)
    dev.set_vring_kick(0, efd)
    os.close(efd)  # the device holds its own reference, like the kernel
    dev.set_vring_kick(0, -1)


def test_suspend_is_an_offered_feature() -> None:
    with SimDevice("sim:profile=basic") as dev:
        dev.suspend()
        dev.resume()


# ---------------------------------------------------------------- IOTLB


def test_iotlb_overlap_and_range(dev: SimDevice, buf: tuple[int, int]) -> None:
    uaddr, size = buf
    dev.iotlb_update(0x10000, size, uaddr, Perm.RW)
    with pytest.raises(DeviceError) as e:
        dev.iotlb_update(0x10000 + size - 4096, 4096, uaddr, Perm.RO)
    assert e.value.errno == errno.EFAULT and "overlaps" in e.value.message
    last = dev.get_iova_range().last
    with pytest.raises(DeviceError) as e:
        dev.iotlb_update(last - 4095, 8192, uaddr, Perm.RW)
    assert e.value.errno == errno.EFAULT and "outside" in e.value.message
    dev.iotlb_invalidate(0x10000, 1)  # drops the whole map that intersects
    assert dev.iotlb_map_count() == 0
    dev.iotlb_update(0x10000, size, uaddr, Perm.RW)


def test_iotlb_refuses_memory_this_process_does_not_have(dev: SimDevice, buf: tuple[int, int]) -> None:
    uaddr, size = buf
    with pytest.raises(DeviceError, match="not mapped"):
        dev.iotlb_update(0x10000, 4096, 0x1000, Perm.RW)  # below mmap_min_addr: never mapped
    with pytest.raises(DeviceError, match="uaddr range"):
        dev.iotlb_update(0x10000, size + (1 << 40), uaddr, Perm.RW)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    ro = libc.mmap(None, 4096, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert ro not in (None, ctypes.c_void_p(-1).value)
    try:
        with pytest.raises(DeviceError, match="not writable"):
            dev.iotlb_update(0x10000, 4096, ro, Perm.RW)
        dev.iotlb_update(0x10000, 4096, ro, Perm.RO)
        assert dev.iotlb_map_count() == 1
        dev.iotlb_invalidate(0x10000, 4096)
    finally:
        libc.munmap(ro, 4096)


def test_a_range_checked_before_is_checked_again_once_unmapped(dev: SimDevice) -> None:
    """The sim remembers ranges it validated (a mode switch maps the same shadow area again and again); memory
    released since must still be refused, not dereferenced."""
    area = mmap.mmap(-1, 3 * 4096)
    uaddr = ctypes.addressof(ctypes.c_char.from_buffer(area))
    dev.iotlb_update(0x10000, 3 * 4096, uaddr, Perm.RW)
    dev.iotlb_invalidate(0x10000, 3 * 4096)
    dev.iotlb_update(0x10000, 3 * 4096, uaddr, Perm.RW)  # the remembered range, still mapped
    dev.iotlb_invalidate(0x10000, 3 * 4096)
    gc.collect()  # the ctypes anchor above keeps no export: the mmap can close
    area.close()
    with pytest.raises(DeviceError, match="not mapped"):
        dev.iotlb_update(0x10000, 3 * 4096, uaddr, Perm.RW)
    assert dev.iotlb_map_count() == 0


def test_iotlb_asid_needs_the_backend_feature(dev: SimDevice, buf: tuple[int, int]) -> None:
    uaddr, size = buf
    with pytest.raises(DeviceError, match="IOTLB_ASID"):
        dev.iotlb_update(0x10000, size, uaddr, Perm.RW, asid=1)
    dev.set_backend_features(BackendF.IOTLB_ASID)
    dev.iotlb_update(0x10000, size, uaddr, Perm.RW, asid=1)
    dev.iotlb_update(0x10000, size, uaddr, Perm.RW, asid=0)  # same IOVA, other address space
    assert (dev.iotlb_map_count(0), dev.iotlb_map_count(1)) == (1, 1)


def test_iotlb_batch_applies_at_end(dev: SimDevice, buf: tuple[int, int]) -> None:
    uaddr, size = buf
    dev.set_backend_features(BackendF.IOTLB_MSG_V2 | BackendF.IOTLB_BATCH)
    with dev.iotlb_batch():
        dev.iotlb_update(0x10000, size // 2, uaddr, Perm.RW)
        dev.iotlb_update(0x10000 + size // 2, size // 2, uaddr + size // 2, Perm.RO)
        with pytest.raises(DeviceError):  # errors still surface at once
            dev.iotlb_update(0x10000, 4096, uaddr, Perm.RW)
        assert dev.iotlb_map_count() == 0
    assert dev.iotlb_map_count() == 2


def test_reset_drops_maps_unless_persist(dev: SimDevice, buf: tuple[int, int]) -> None:
    uaddr, size = buf
    dev.iotlb_update(0x10000, size, uaddr, Perm.RW)
    dev.set_status(0)
    assert dev.iotlb_map_count() == 0
    dev.set_backend_features(BackendF.IOTLB_PERSIST)
    dev.iotlb_update(0x10000, size, uaddr, Perm.RW)
    dev.set_status(0)
    assert dev.iotlb_map_count() == 1
