"""Control-queue formats (virtio 1.3 §5.1.6.5) and the proxy's CVQ client.

The client runs against a small fake device defined here: it translates IOVAs through its own IOTLB (per
ASID), walks the split ring in the client's memory the way a device does, and answers like vdpa_sim_net
(only MAC_ADDR_SET is accepted). When the software device (vduproxy.vdpa.sim) exists, the device suite
covers the client against it too.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from vduproxy.vdpa import cvq
from vduproxy.vdpa.cvq import (
    Ack,
    CtrlClass,
    CvqClient,
    CvqCommandError,
    CvqError,
    CvqFormatError,
    CvqTimeout,
    MacCmd,
    MqCmd,
    RxCmd,
    VlanCmd,
)
from vduproxy.vdpa.device import BackendF, DeviceError, DeviceFault, IovaRange, Perm, VdpaDevice, VqStats
from vduproxy.virtio import Status

pytestmark = pytest.mark.unit

MAC_A = bytes.fromhex("02aabbccddee")
MAC_B = bytes.fromhex("0200000000b2")


# --- formats: bytes a device sees, straight from the spec's struct definitions
def test_mac_addr_set_bytes() -> None:
    c = cvq.make_command(CtrlClass.MAC, MacCmd.ADDR_SET, {"mac": "02:aa:bb:cc:dd:ee"})
    assert c.encode() == bytes([1, 1]) + MAC_A


def test_mac_table_set_bytes() -> None:
    c = cvq.make_command(CtrlClass.MAC, MacCmd.TABLE_SET, {"unicast": [MAC_A], "multicast": [MAC_B, MAC_A]})
    # two struct virtio_net_ctrl_mac {le32 entries; u8 macs[entries][6]} back to back
    assert c.payload == struct.pack("<I", 1) + MAC_A + struct.pack("<I", 2) + MAC_B + MAC_A


@pytest.mark.parametrize(
    ("cls", "cmd", "args", "payload"),
    [
        (CtrlClass.RX, RxCmd.PROMISC, {"on": True}, b"\x01"),
        (CtrlClass.RX, RxCmd.NOBCAST, {"on": False}, b"\x00"),
        (CtrlClass.VLAN, VlanCmd.ADD, {"vid": 0x123}, b"\x23\x01"),
        (CtrlClass.VLAN, VlanCmd.DEL, {"vid": 4095}, b"\xff\x0f"),
        (CtrlClass.ANNOUNCE, 0, {}, b""),
        (CtrlClass.MQ, MqCmd.VQ_PAIRS_SET, {"pairs": 4}, b"\x04\x00"),
        (CtrlClass.GUEST_OFFLOADS, 0, {"offloads": 0x182}, struct.pack("<Q", 0x182)),
        (CtrlClass.NOTF_COAL, 0, {"max_packets": 32, "max_usecs": 100}, struct.pack("<II", 32, 100)),
        (
            CtrlClass.NOTF_COAL,
            2,
            {"vq_index": 3, "max_packets": 1, "max_usecs": 2},
            struct.pack("<HHII", 3, 0, 1, 2),
        ),
        (
            CtrlClass.MQ,
            MqCmd.HASH_CONFIG,
            {"hash_types": 0x3F, "hash_key_data": b"\x01\x02"},
            struct.pack("<I8xB", 0x3F, 2) + b"\x01\x02",
        ),
    ],
)
def test_fixed_layouts_round_trip(cls: int, cmd: int, args: dict[str, Any], payload: bytes) -> None:
    c = cvq.make_command(cls, cmd, args)
    assert c.payload == payload
    back = cvq.decode(c.encode())
    assert (back.cls, back.cmd, back.args) == (cls, cmd, args)


def test_rss_config_layout() -> None:
    args = {
        "hash_types": 0x1FF,
        "unclassified_queue": 0,
        "indirection_table": [0, 2, 4, 6],
        "max_tx_vq": 4,
        "hash_key_data": bytes(range(40)),
    }
    c = cvq.make_command(CtrlClass.MQ, MqCmd.RSS_CONFIG, args)
    # le32 hash_types; le16 indirection_table_mask; le16 unclassified_queue; le16 table[mask + 1];
    # le16 max_tx_vq; u8 hash_key_length; u8 hash_key_data[]
    expected = struct.pack("<IHH4HHB", 0x1FF, 3, 0, 0, 2, 4, 6, 4, 40) + bytes(range(40))
    assert c.payload == expected
    assert cvq.decode(c.encode()).args == {**args, "indirection_table_mask": 3}


@given(
    uni=st.lists(st.binary(min_size=6, max_size=6), max_size=20),
    multi=st.lists(st.binary(min_size=6, max_size=6), max_size=20),
)
def test_mac_tables_round_trip(uni: list[bytes], multi: list[bytes]) -> None:
    c = cvq.make_command(CtrlClass.MAC, MacCmd.TABLE_SET, {"unicast": uni, "multicast": multi})
    assert cvq.decode(c.encode()).args == {"unicast": uni, "multicast": multi}


@given(st.binary(max_size=64))
def test_decode_never_fails_with_anything_but_a_format_error(data: bytes) -> None:
    try:
        c = cvq.decode(data)
    except CvqFormatError:
        return
    assert c.encode() == data
    assert isinstance(cvq.describe(data), str)


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"\x01", "no header"),
        (bytes([1, 1]) + MAC_A[:4], "ADDR_SET"),  # truncated
        (bytes([1, 1]) + MAC_A + b"\x00", "ADDR_SET"),  # trailing byte
        (bytes([1, 0]) + struct.pack("<I", 0xFFFFFFFF) + MAC_A, "TABLE_SET"),  # entries beyond the data
        (bytes([4, 1]) + struct.pack("<IHH", 0, 0xFFFF, 0), "RSS_CONFIG"),
    ],
)
def test_malformed_commands_are_refused(data: bytes, what: str) -> None:
    with pytest.raises(CvqFormatError, match=what):
        cvq.decode(data)
    assert "malformed" in cvq.describe(data)


@pytest.mark.parametrize(
    ("cls", "cmd", "args"),
    [
        (CtrlClass.MAC, MacCmd.ADDR_SET, {"mac": "02:aa"}),
        (CtrlClass.MAC, MacCmd.ADDR_SET, {"mac": b"\x00" * 7}),
        (CtrlClass.VLAN, VlanCmd.ADD, {"vid": 4096}),
        (CtrlClass.MQ, MqCmd.VQ_PAIRS_SET, {"pairs": 0}),
        (CtrlClass.MQ, MqCmd.VQ_PAIRS_SET, {"pairs": 0x8001}),
        (CtrlClass.RX, RxCmd.PROMISC, {}),
        (CtrlClass.STATS, 0, {}),
    ],
)
def test_bad_arguments_are_refused(cls: int, cmd: int, args: dict[str, Any]) -> None:
    with pytest.raises(CvqFormatError):
        cvq.make_command(cls, cmd, args)


def test_describe_is_readable() -> None:
    assert cvq.describe(bytes([1, 1]) + MAC_A) == "MAC.ADDR_SET mac=02:aa:bb:cc:dd:ee"
    assert cvq.describe(bytes([0, 0, 1])) == "RX.PROMISC on=True"
    assert cvq.describe(bytes([5, 0]) + struct.pack("<Q", 0x3)) == "GUEST_OFFLOADS.SET offloads=0x3"
    assert cvq.describe(bytes([3, 0])) == "ANNOUNCE.ACK"
    assert cvq.describe(bytes([0x77, 9, 0xAB])) == "class119.cmd9 raw=ab"


# --- a fake device for the client
class FakeCvqDevice:
    """Just enough of a vDPA net device to serve a CVQ: IOTLB per ASID, vring state, a device-side walk."""

    name = "fake-cvq"

    def __init__(self, *, cvq_group: int = 1, backend: int = 0x1E, respond: bool = True, signal: bool = True):
        self.status = 0
        self.config = bytearray(MAC_B + bytes(18))
        self.cvq_group = cvq_group
        self.backend = backend
        self.respond = respond
        self.signal = signal
        self.maps: dict[int, list[tuple[int, int, int, Perm]]] = {0: [], 1: []}
        self.group_asid = {0: 0, 1: 0}
        self.vq: dict[int, dict[str, Any]] = {}
        self.seen: list[bytes] = []
        self.accept: set[tuple[int, int]] = {(CtrlClass.MAC, MacCmd.ADDR_SET)}

    # protocol surface
    def close(self) -> None: ...
    def get_device_id(self) -> int:
        return 1

    def get_features(self) -> int:
        return 0

    def set_features(self, features: int) -> None: ...
    def get_backend_features(self) -> int:
        return self.backend

    def set_backend_features(self, features: int) -> None: ...
    def get_status(self) -> int:
        return self.status

    def set_status(self, status: int) -> None:
        self.status = status

    def get_config(self, offset: int, length: int) -> bytes:
        return bytes(self.config[offset : offset + length])

    def set_config(self, offset: int, data: bytes) -> None: ...
    def get_vqs_count(self) -> int:
        return 3

    def get_vring_num_max(self) -> int:
        return 256

    def get_groups_num(self) -> int:
        return 2

    def get_as_num(self) -> int:
        return 2

    def get_vring_group(self, index: int) -> int:
        return self.cvq_group if index == 2 else 0

    def set_group_asid(self, group: int, asid: int) -> None:
        self.group_asid[group] = asid

    def get_iova_range(self) -> IovaRange:
        return IovaRange(0x1000, (1 << 48) - 1)

    def set_vring_num(self, index: int, num: int) -> None:
        self.vq.setdefault(index, {})["num"] = num

    def set_vring_addr(self, index: int, desc: int, avail: int, used: int) -> None:
        self.vq.setdefault(index, {}).update(desc=desc, avail=avail, used=used)

    def set_vring_base(self, index: int, base: int) -> None:
        self.vq.setdefault(index, {}).update(last_avail=base, used_idx=base)

    def get_vring_base(self, index: int) -> int:
        return int(self.vq[index]["last_avail"])

    def set_vring_kick(self, index: int, fd: int) -> None:
        self.vq.setdefault(index, {})["kick"] = fd

    def set_vring_call(self, index: int, fd: int) -> None:
        self.vq.setdefault(index, {})["call"] = fd

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.vq.setdefault(index, {})["enabled"] = enable

    def suspend(self) -> None: ...
    def resume(self) -> None: ...
    def iotlb_update(self, iova: int, size: int, uaddr: int, perm: Perm, asid: int = 0) -> None:
        self.maps[asid].append((iova, size, uaddr, perm))

    def iotlb_invalidate(self, iova: int, size: int, asid: int = 0) -> None:
        before = len(self.maps[asid])
        self.maps[asid] = [m for m in self.maps[asid] if not (m[0] == iova and m[1] == size)]
        if len(self.maps[asid]) == before:
            raise DeviceError("IOTLB_INVALIDATE", "no such map")

    def iotlb_batch(self) -> AbstractContextManager[None]:
        @contextmanager
        def batch() -> Iterator[None]:
            yield

        return batch()

    def vq_stats(self, index: int) -> VqStats:
        return VqStats()

    def fault_fd(self) -> int:
        return -1

    def take_faults(self) -> list[DeviceFault]:
        return []

    # device side
    def _translate(self, iova: int, length: int) -> int:
        asid = self.group_asid[self.get_vring_group(2)]
        for start, size, uaddr, _perm in self.maps[asid]:
            if start <= iova and iova + length <= start + size:
                return uaddr + (iova - start)
        raise AssertionError(f"device access to unmapped IOVA {iova:#x} in ASID {asid}")

    def _read(self, iova: int, n: int) -> bytes:
        return ctypes.string_at(self._translate(iova, n), n)

    def _write(self, iova: int, data: bytes) -> None:
        ctypes.memmove(self._translate(iova, len(data)), data, len(data))

    def process(self) -> None:
        q = self.vq[2]
        if not (q.get("enabled") and self.status & Status.DRIVER_OK):
            return
        num = q["num"]
        avail_idx = struct.unpack("<H", self._read(q["avail"] + 2, 2))[0]
        while q["last_avail"] != avail_idx:
            head = struct.unpack("<H", self._read(q["avail"] + 4 + 2 * (q["last_avail"] % num), 2))[0]
            readable, writable, i = b"", [], head
            while True:
                addr, length, flags, nxt = struct.unpack("<QIHH", self._read(q["desc"] + 16 * i, 16))
                if flags & 2:
                    writable.append(addr)
                else:
                    readable += self._read(addr, length)
                if not flags & 1:
                    break
                i = nxt
            self.seen.append(readable)
            ok = (readable[0], readable[1]) in self.accept
            if ok and readable[:2] == bytes([CtrlClass.MAC, MacCmd.ADDR_SET]):
                self.config[0:6] = readable[2:8]
            self._write(writable[0], bytes([Ack.OK if ok else Ack.ERR]))
            slot = q["used"] + 4 + 8 * (q["used_idx"] % num)
            self._write(slot, struct.pack("<II", head, 1))
            q["used_idx"] = (q["used_idx"] + 1) & 0xFFFF
            self._write(q["used"] + 2, struct.pack("<H", q["used_idx"]))
            q["last_avail"] = (q["last_avail"] + 1) & 0xFFFF
        if self.signal:
            os.eventfd_write(q["call"], 1)

    async def serve(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.vq[2]["kick"])
            os.eventfd_read(self.vq[2]["kick"])
            if self.respond:
                self.process()


def _ready(dev: FakeCvqDevice) -> None:
    dev.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)


@pytest.fixture
async def running() -> AsyncIterator[tuple[FakeCvqDevice, CvqClient]]:
    dev = FakeCvqDevice()
    _ready(dev)
    client = CvqClient(dev, vq_index=2, iova=0x40000000, data_vqs=2)
    client.setup()
    dev.set_status(dev.status | Status.DRIVER_OK)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dev.serve)
        yield dev, client
        nursery.cancel_scope.cancel()
    client.close()


def test_fake_device_satisfies_the_protocol() -> None:
    assert isinstance(FakeCvqDevice(), VdpaDevice)


async def test_mac_addr_set_reaches_the_device_and_is_traced(
    running: tuple[FakeCvqDevice, CvqClient],
) -> None:
    dev, client = running
    with capture_logs() as logs:
        await client.mac_addr_set("02:aa:bb:cc:dd:ee")
    assert dev.get_config(0, 6) == MAC_A
    assert dev.seen == [bytes([1, 1]) + MAC_A]
    (entry,) = [e for e in logs if e["event"] == "cvq_command"]
    assert entry["cls"] == "MAC" and entry["cmd"] == "ADDR_SET"
    assert entry["args"] == {"mac": "02:aa:bb:cc:dd:ee"}
    assert entry["ack"] == "ok"
    assert isinstance(entry["latency_us"], int) and entry["latency_us"] >= 0


async def test_refused_command_raises_and_is_traced(running: tuple[FakeCvqDevice, CvqClient]) -> None:
    dev, client = running
    with capture_logs() as logs, pytest.raises(CvqCommandError) as ei:
        await client.vlan_add(100)
    assert ei.value.ack == Ack.ERR
    assert "VLAN.ADD vid=100" in str(ei.value)
    (entry,) = [e for e in logs if e["event"] == "cvq_command"]
    assert (entry["cls"], entry["cmd"], entry["args"], entry["ack"]) == ("VLAN", "ADD", {"vid": 100}, "err")
    # a refusal does not break the queue
    await client.mac_addr_set(MAC_A)
    assert dev.get_config(0, 6) == MAC_A


async def test_every_helper_sends_its_command(running: tuple[FakeCvqDevice, CvqClient]) -> None:
    dev, client = running
    dev.accept = {(c, m) for c in CtrlClass for m in range(8)}
    await client.rx_mode(RxCmd.ALLMULTI, True)
    await client.promisc(False)
    await client.mac_table_set([MAC_A], [])
    await client.vlan_del(7)
    await client.mq_pairs_set(2)
    await client.guest_offloads_set(0x3)
    await client.announce_ack()
    assert await client.command(CtrlClass.RX, RxCmd.NOBCAST, b"\x01") == Ack.OK
    described = [cvq.describe(b) for b in dev.seen]
    assert described == [
        "RX.ALLMULTI on=True",
        "RX.PROMISC on=False",
        "MAC.TABLE_SET unicast=['02:aa:bb:cc:dd:ee'] multicast=[]",
        "VLAN.DEL vid=7",
        "MQ.VQ_PAIRS_SET pairs=2",
        "GUEST_OFFLOADS.SET offloads=0x3",
        "ANNOUNCE.ACK",
        "RX.NOBCAST on=True",
    ]


async def test_many_commands_wrap_the_ring(running: tuple[FakeCvqDevice, CvqClient]) -> None:
    dev, client = running
    for i in range(3 * client.ring_num):
        mac = bytes([2, 0, 0, 0, i >> 8, i & 0xFF])
        await client.mac_addr_set(mac)
        assert dev.get_config(0, 6) == mac


async def test_cvq_gets_its_own_address_space() -> None:
    dev = FakeCvqDevice(cvq_group=1)
    _ready(dev)
    with CvqClient(dev, vq_index=2, iova=0x40000000, data_vqs=2) as client:
        assert client.asid == 1
        assert dev.group_asid[1] == 1
        assert dev.maps[0] == [] and len(dev.maps[1]) == 1
    assert dev.maps[1] == []  # unmapped on close


@pytest.mark.parametrize(
    ("group", "backend"), [(0, 0x1E), (1, int(BackendF.IOTLB_MSG_V2 | BackendF.IOTLB_BATCH))]
)
async def test_cvq_stays_in_asid_0_when_it_cannot_be_isolated(group: int, backend: int) -> None:
    dev = FakeCvqDevice(cvq_group=group, backend=backend)
    _ready(dev)
    with CvqClient(dev, vq_index=2, iova=0x40000000, data_vqs=2) as client:
        assert client.asid == 0
        assert len(dev.maps[0]) == 1 and dev.group_asid == {0: 0, 1: 0}


async def test_completion_without_call_signal_is_still_seen() -> None:
    dev = FakeCvqDevice(signal=False)
    _ready(dev)
    with CvqClient(dev, vq_index=2, iova=0x40000000, data_vqs=2) as client:
        dev.set_status(dev.status | Status.DRIVER_OK)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dev.serve)
            await client.mac_addr_set(MAC_A)
            nursery.cancel_scope.cancel()
    assert dev.get_config(0, 6) == MAC_A


async def test_silent_device_times_out_and_the_client_stops() -> None:
    dev = FakeCvqDevice(respond=False)
    _ready(dev)
    with CvqClient(dev, vq_index=2, iova=0x40000000, data_vqs=2, timeout=0.2) as client:
        dev.set_status(dev.status | Status.DRIVER_OK)
        with capture_logs() as logs, pytest.raises(CvqTimeout):
            await client.mac_addr_set(MAC_A)
        assert [e["ack"] for e in logs if e["event"] == "cvq_command"] == ["timeout"]
        assert not client.ready
        with pytest.raises(CvqError, match="unusable"):
            await client.mac_addr_set(MAC_A)


async def test_setup_needs_features_ok_and_commands_need_driver_ok() -> None:
    dev = FakeCvqDevice()
    with pytest.raises(CvqError, match="FEATURES_OK"):
        CvqClient(dev, vq_index=2, iova=0x40000000).setup()
    _ready(dev)
    with (
        CvqClient(dev, vq_index=2, iova=0x40000000, data_vqs=2) as client,
        pytest.raises(CvqError, match="DRIVER_OK"),
    ):
        await client.mac_addr_set(MAC_A)
    with pytest.raises(CvqError, match="not set up"):
        await client.mac_addr_set(MAC_A)


async def test_bad_setup_arguments_leave_nothing_behind() -> None:
    dev = FakeCvqDevice()
    _ready(dev)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(CvqError, match="IOVA range"):
        CvqClient(dev, vq_index=2, iova=0).setup()
    with pytest.raises(CvqError, match="vqs"):
        CvqClient(dev, vq_index=9, iova=0x40000000).setup()
    assert set(os.listdir("/proc/self/fd")) == before
    assert dev.maps == {0: [], 1: []}


async def test_close_releases_every_fd() -> None:
    dev = FakeCvqDevice()
    _ready(dev)
    before = set(os.listdir("/proc/self/fd"))
    client = CvqClient(dev, vq_index=2, iova=0x40000000, data_vqs=2)
    client.setup()
    assert dev.vq[2]["enabled"] is True
    client.close()
    client.close()
    assert set(os.listdir("/proc/self/fd")) == before
    assert dev.vq[2]["enabled"] is False and dev.vq[2]["kick"] == -1
