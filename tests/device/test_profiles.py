"""Software-device profiles look different to a client: it reads them through the same `VdpaDevice` calls the
proxy uses (features, config space, topology), and the differences must show there and in behaviour."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from vduproxy.testing.vdpa_harness import (
    CTRL_ERR,
    CTRL_OK,
    CTRL_RX,
    CTRL_RX_PROMISC,
    DeviceHarness,
    make_frame,
    open_spec,
    sim_profile_names,
)
from vduproxy.vdpa.device import BackendF, VdpaDevice
from vduproxy.virtio import NetF

pytestmark = pytest.mark.unit

# what `vdpa dev add ... mgmtdev vdpasim_net` on Linux 6.1 reports (testbed/vdpa-kernel/REPORT.md)
KERNEL_VDPASIM_FEATURES = (
    NetF.MTU | NetF.MAC | NetF.CTRL_VQ | NetF.CTRL_MAC_ADDR | NetF.ANY_LAYOUT | NetF.VERSION_1 | NetF.ACCESS_PLATFORM
)
KERNEL_VDPASIM_BACKEND = BackendF.IOTLB_MSG_V2 | BackendF.IOTLB_BATCH | BackendF.IOTLB_ASID | BackendF.SUSPEND


@dataclass(frozen=True)
class View:
    """What a client learns about a device before driving it."""

    features: int
    backend: int
    pairs: int
    vqs: int
    ring_max: int
    groups: int
    address_spaces: int


def client_view(dev: VdpaDevice) -> View:
    features = dev.get_features()
    pairs = struct.unpack("<H", dev.get_config(8, 2))[0] if features & NetF.MQ else 1
    return View(
        features=features,
        backend=dev.get_backend_features(),
        pairs=int(pairs),
        vqs=dev.get_vqs_count(),
        ring_max=dev.get_vring_num_max(),
        groups=dev.get_groups_num(),
        address_spaces=dev.get_as_num(),
    )


@pytest.fixture
def rich() -> Iterator[VdpaDevice]:
    dev = open_spec("sim:profile=rich")
    try:
        yield dev
    finally:
        dev.close()


@pytest.fixture
def vdpasim() -> Iterator[VdpaDevice]:
    dev = open_spec("sim:profile=vdpasim")
    try:
        yield dev
    finally:
        dev.close()


@pytest.mark.parametrize(("a", "b"), list(itertools.combinations(sim_profile_names(), 2)))
def test_distinct_profiles_look_distinct(a: str, b: str) -> None:
    da, db = open_spec(f"sim:profile={a}"), open_spec(f"sim:profile={b}")
    try:
        assert client_view(da) != client_view(db)
    finally:
        da.close()
        db.close()


def test_rich_and_vdpasim_report_different_capabilities(rich: VdpaDevice, vdpasim: VdpaDevice) -> None:
    r, k = client_view(rich), client_view(vdpasim)

    # the vdpasim profile is what the kernel's vdpa_sim_net shows a client
    assert k.features == KERNEL_VDPASIM_FEATURES
    assert k.backend & ~BackendF.IOTLB_PERSIST == KERNEL_VDPASIM_BACKEND
    assert (k.pairs, k.vqs, k.ring_max) == (1, 3, 256)
    assert (k.groups, k.address_spaces) == (2, 2)
    assert vdpasim.get_vring_group(2) != vdpasim.get_vring_group(0)

    # rich offers what the kernel model lacks
    for f in (
        NetF.MQ,
        NetF.MRG_RXBUF,
        NetF.CTRL_RX,
        NetF.CTRL_VLAN,
        NetF.RING_EVENT_IDX,
        NetF.RING_INDIRECT_DESC,
    ):
        assert r.features & f, f.name
        assert not k.features & f, f.name
    assert r.pairs > k.pairs
    assert r.vqs == 2 * r.pairs + 1
    assert r.ring_max > k.ring_max
    assert r.backend & BackendF.RESUME and not k.backend & BackendF.RESUME


async def test_profiles_behave_differently_on_the_wire(rich: VdpaDevice, vdpasim: VdpaDevice) -> None:
    foreign = make_frame(bytes.fromhex("021234567890"), 100, seq=1)
    with DeviceHarness(rich) as h:
        h.start()
        # rich accepts everything until the driver programs its filter, and has an RX-mode class
        assert await h.roundtrip([foreign]) == [foreign]
        assert await h.ctrl(CTRL_RX, CTRL_RX_PROMISC, b"\x00") == CTRL_OK
        assert await h.roundtrip([foreign]) == []
    with DeviceHarness(vdpasim) as h:
        h.start()
        # like vdpa_sim_net: unicast filtered by its MAC from the start, only MAC_ADDR_SET on the CVQ
        assert await h.roundtrip([foreign]) == []
        assert await h.ctrl(CTRL_RX, CTRL_RX_PROMISC, b"\x00") == CTRL_ERR
        assert h.pairs == 1 and h.max_pairs == 1
