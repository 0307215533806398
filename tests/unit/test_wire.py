"""Wire format: every request and reply round-trips byte for byte, layouts match vhost-user.rst."""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vduproxy.vhost_user import wire
from vduproxy.vhost_user.wire import (
    BACKEND_SPECS,
    HEADER_SIZE,
    REPLY_FLAGS,
    SPECS,
    BackendReq,
    ConfigSpace,
    DeviceStateTransfer,
    Inflight,
    IotlbMsg,
    LogArea,
    MemoryTable,
    MemRegion,
    Opaque,
    ProtocolF,
    Rarp,
    Req,
    SharedObject,
    SingleRegion,
    VringAddr,
    VringArea,
    VringFile,
    VringState,
    WireError,
)

pytestmark = pytest.mark.unit

REGION = MemRegion(guest_phys_addr=0, memory_size=0x2000_0000, userspace_addr=0x7F00_0000_0000, mmap_offset=0)
REGION2 = MemRegion(0x1_0000_0000, 0x1000_0000, 0x7F10_0000_0000, 0x2000_0000)

# one realistic value per codec
SAMPLE: dict[str, Any] = {
    "empty": None,
    "u64": 0x1_4000_0000,
    "vring state": VringState(1, 256),
    "vring address": VringAddr(1, 1, 0x7F00_0000_1000, 0x7F00_0000_3000, 0x7F00_0000_2000, 0x3000),
    "vring file": VringFile(3, False),
    "memory table": MemoryTable((REGION, REGION2)),
    "single memory region": SingleRegion(REGION2),
    "log": LogArea(0x4000, 0),
    "iotlb": IotlbMsg(0x1000, 0x2000, 0x7F00_0000_0000, 3, 2),
    "config": ConfigSpace(0, 0, bytes(range(10))),
    "config reply": ConfigSpace(0, 0, bytes(range(10))),
    "vring area": VringArea(0x101, 4096, 0),
    "inflight": Inflight(0, 0, 2, 256),
    "shared object": SharedObject(bytes(range(16))),
    "device state transfer": DeviceStateTransfer(1, 0),
    "rarp": Rarp(bytes.fromhex("525400123456")),
    "opaque": Opaque(b"\x01" * 40),
}


def test_every_codec_has_a_sample() -> None:
    codecs = {s.request.name for s in SPECS.values()} | {s.reply.name for s in SPECS.values() if s.reply}
    codecs |= {s.request.name for s in BACKEND_SPECS.values()}
    assert codecs <= set(SAMPLE)


@pytest.mark.parametrize("req", list(Req), ids=lambda r: r.name)
def test_request_round_trip(req: Req) -> None:
    body = SAMPLE[SPECS[req].request.name]
    data = wire.encode(req, body)
    request, flags, size = wire.parse_header(data)
    assert (request, flags, size) == (int(req), 0x1, len(data) - HEADER_SIZE)
    decoded = wire.decode_body(req, data[HEADER_SIZE:], reply=False)
    assert decoded == body
    assert wire.encode(req, decoded) == data


@pytest.mark.parametrize("req", [r for r in Req if SPECS[r].reply is not None], ids=lambda r: r.name)
def test_reply_round_trip(req: Req) -> None:
    spec = SPECS[req]
    assert spec.reply is not None
    body = SAMPLE[spec.reply.name]
    data = wire.encode(req, body, reply=True)
    assert wire.parse_header(data)[:2] == (int(req), REPLY_FLAGS)
    decoded = wire.decode_body(req, data[HEADER_SIZE:], reply=True)
    assert decoded == body
    assert wire.encode(req, decoded, reply=True) == data


@pytest.mark.parametrize("req", list(Req), ids=lambda r: r.name)
def test_ack_round_trip(req: Req) -> None:
    data = wire.encode(req, 1, reply=True)
    assert len(data) == HEADER_SIZE + 8
    assert wire.parse_header(data) == (int(req), 0x5, 8)
    assert wire.decode_body(req, data[HEADER_SIZE:], reply=True, ack=True) == 1


@pytest.mark.parametrize("req", list(BackendReq), ids=lambda r: r.name)
def test_backend_request_round_trip(req: BackendReq) -> None:
    body = SAMPLE[BACKEND_SPECS[req].request.name]
    data = wire.encode(req, body)
    assert wire.decode_backend_body(req, data[HEADER_SIZE:], reply=False) == body
    assert wire.encode(req, wire.decode_backend_body(req, data[HEADER_SIZE:], reply=False)) == data


def test_header_layout_and_reply_flags() -> None:
    data = wire.encode(Req.SET_VRING_NUM, VringState(2, 256), flags=wire.VERSION | wire.FLAG_NEED_REPLY)
    assert struct.unpack("<III", data[:12]) == (8, 0x9, 8)
    reply = wire.encode(Req.GET_FEATURES, 0, reply=True)
    assert struct.unpack("<III", reply[:12]) == (1, 0x5, 8)


def test_vring_addr_field_order_is_desc_used_avail_log() -> None:
    data = wire.encode(Req.SET_VRING_ADDR, VringAddr(1, 1, 0xD, 0x55, 0xAA, 0x10))
    assert struct.unpack("<IIQQQQ", data[HEADER_SIZE:]) == (1, 1, 0xD, 0x55, 0xAA, 0x10)


def test_sizes_match_what_qemu_and_dpdk_send() -> None:
    # struct sizes QEMU uses for msg.hdr.size (hw/virtio/vhost-user.c)
    assert wire.IOTLB.size == 32
    assert wire.INFLIGHT.size == 24
    assert wire.SINGLE_REGION.size == 40
    assert wire.LOG.size == 16
    assert wire.RARP.size == 8
    assert wire.VRING_ADDR.size == 40
    for n in range(1, 9):
        table = MemoryTable(tuple(MemRegion(i << 32, 4096, i << 32, 0) for i in range(n)))
        assert len(wire.MEMORY_TABLE.encode(table)) == 8 + 32 * n


def test_protocol_feature_bits_match_spec() -> None:
    expected = {
        "MQ": 0, "LOG_SHMFD": 1, "RARP": 2, "REPLY_ACK": 3, "NET_MTU": 4, "BACKEND_REQ": 5, "CROSS_ENDIAN": 6,
        "CRYPTO_SESSION": 7, "PAGEFAULT": 8, "CONFIG": 9, "BACKEND_SEND_FD": 10, "HOST_NOTIFIER": 11,
        "INFLIGHT_SHMFD": 12, "RESET_DEVICE": 13, "INBAND_NOTIFICATIONS": 14, "CONFIGURE_MEM_SLOTS": 15,
        "STATUS": 16, "XEN_MMAP": 17, "SHARED_OBJECT": 18, "DEVICE_STATE": 19,
    }  # fmt: skip
    assert {f.name: f.value.bit_length() - 1 for f in ProtocolF} == expected
    assert Req.SET_BACKEND_REQ_FD.value == 21 and Req.CHECK_DEVICE_STATE.value == 43 and len(Req) == 43


def test_vring_file_bits() -> None:
    assert wire.encode(Req.SET_VRING_CALL, VringFile(5, nofd=True))[HEADER_SIZE:] == struct.pack("<Q", 0x105)
    with pytest.raises(WireError, match="above bit 8"):
        wire.decode_body(Req.SET_VRING_CALL, struct.pack("<Q", 0x205), reply=False)


def test_rarp_keeps_the_mac() -> None:
    data = wire.encode(Req.SEND_RARP, Rarp(bytes.fromhex("525400abcdef")))
    assert data[HEADER_SIZE:] == bytes.fromhex("525400abcdef0000")


def test_get_config_error_reply_is_empty() -> None:
    data = wire.encode(Req.GET_CONFIG, None, reply=True)
    assert wire.parse_header(data) == (24, 0x5, 0)


@pytest.mark.parametrize(
    ("codec", "data", "reason"),
    [
        (wire.MEMORY_TABLE, struct.pack("<II", 0, 0), "0 regions"),
        (wire.MEMORY_TABLE, struct.pack("<II", 9, 0) + bytes(32 * 9), "9 regions"),
        (wire.MEMORY_TABLE, struct.pack("<II", 2, 0) + bytes(32), "must be 72 bytes"),
        (wire.MEMORY_TABLE, struct.pack("<II4Q", 1, 0, 0, 0, 0x1000, 0), "zero-size"),
        (wire.MEMORY_TABLE, struct.pack("<II4Q", 1, 0, 2**64 - 4096, 8192, 0, 0), "overflows"),
        (
            wire.MEMORY_TABLE,
            struct.pack("<II8Q", 2, 0, 0, 0x2000, 0x10000, 0, 0x1000, 0x1000, 0x20000, 0),
            "overlap",
        ),
        (wire.SINGLE_REGION, bytes(40), "zero-size"),
        (wire.CONFIG, struct.pack("<III", 0, 300, 0) + bytes(300), "exceeds 256"),
        (wire.CONFIG, struct.pack("<III", 0, 4, 0) + bytes(8), "does not match"),
        (wire.LOG, struct.pack("<QQ", 0, 0), "dirty log size"),
        (wire.INFLIGHT, struct.pack("<QQHH4x", 0, 0, 65535, 65535), "num_queues"),
        (wire.IOTLB, struct.pack("<QQQBB6x", 0, 0, 0, 3, 9), "IOTLB message type"),
        (wire.DEVICE_STATE_TRANSFER, struct.pack("<II", 0, 1), "phase"),
        (wire.DEVICE_STATE_TRANSFER, struct.pack("<II", 2, 0), "direction"),
        (wire.U64, bytes(4), "must be 8 bytes"),
        (wire.EMPTY, bytes(8), "must be 0 bytes"),
    ],
)
def test_invalid_payloads_give_a_reason(codec: wire.Codec, data: bytes, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        codec.decode(data)


def test_encode_rejects_values_that_do_not_fit() -> None:
    with pytest.raises(WireError):
        wire.encode(Req.SET_FEATURES, 1 << 64)
    with pytest.raises(WireError):
        wire.encode(Req.SET_VRING_NUM, VringState(1 << 32, 0))
    with pytest.raises(TypeError):
        wire.encode(Req.SET_VRING_NUM, 5)


# --- hypothesis: generated field values over every message type ----------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 2**64 - 1)


@st.composite
def regions(draw: st.DrawFn, n: int) -> tuple[MemRegion, ...]:
    # disjoint GPA ranges: slot i lives in [i << 40, (i + 1) << 40)
    out = []
    for i in draw(st.permutations(range(n))):
        size = draw(st.integers(1, 1 << 39))
        out.append(
            MemRegion(
                (i << 40) + draw(st.integers(0, 1 << 39)),
                size,
                draw(st.integers(0, 2**64 - size)),
                draw(st.integers(0, 2**64 - size)),
            )
        )
    return tuple(out)


@st.composite
def single_region(draw: st.DrawFn) -> SingleRegion:
    return SingleRegion(draw(regions(1))[0], draw(u64))


STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "empty": st.none(),
    "u64": u64,
    "vring state": st.builds(VringState, u32, u32),
    "vring address": st.builds(VringAddr, u32, u32, u64, u64, u64, u64),
    "vring file": st.builds(VringFile, u8, st.booleans()),
    "memory table": st.integers(1, 8).flatmap(lambda n: st.builds(MemoryTable, regions(n), u32)),
    "single memory region": single_region(),
    "log": st.integers(1, wire.MAX_LOG_SIZE).flatmap(
        lambda s: st.builds(LogArea, st.just(s), st.integers(0, 2**64 - s))
    ),
    "iotlb": st.builds(IotlbMsg, u64, u64, u64, st.integers(0, 3), st.integers(1, 4)),
    "config": st.builds(ConfigSpace, u32, u32, st.binary(max_size=256)),
    "config reply": st.none() | st.builds(ConfigSpace, u32, u32, st.binary(max_size=256)),
    "vring area": st.builds(VringArea, u64, u64, u64),
    "inflight": st.builds(
        Inflight,
        st.integers(0, 2**63),
        st.integers(0, 2**63),
        st.integers(0, 1024),
        u16.filter(lambda q: q <= wire.MAX_QUEUE_SIZE),
    ),
    "shared object": st.builds(SharedObject, st.binary(min_size=16, max_size=16)),
    "device state transfer": st.builds(DeviceStateTransfer, st.integers(0, 1), st.just(0)),
    "rarp": st.builds(Rarp, st.binary(min_size=6, max_size=6)),
    "opaque": st.builds(Opaque, st.binary(max_size=wire.MAX_OPAQUE_BODY)),
}


@st.composite
def any_message(draw: st.DrawFn) -> tuple[Req, bool, Any]:
    req = draw(st.sampled_from(list(Req)))
    spec = SPECS[req]
    reply = spec.reply is not None and draw(st.booleans())
    codec = spec.reply if reply and spec.reply is not None else spec.request
    return req, reply, draw(STRATEGIES[codec.name])


@settings(max_examples=400, deadline=None)
@given(any_message())
def test_round_trip_generated(msg: tuple[Req, bool, Any]) -> None:
    req, reply, body = msg
    data = wire.encode(req, body, reply=reply)
    decoded = wire.decode_body(req, data[HEADER_SIZE:], reply=reply)
    assert decoded == body
    assert wire.encode(req, decoded, reply=reply) == data


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(list(Req)), st.booleans(), st.binary(max_size=300))
def test_arbitrary_payloads_decode_or_raise_wire_error(req: Req, reply: bool, data: bytes) -> None:
    try:
        body = wire.decode_body(req, data, reply=reply)
    except WireError as e:
        assert e.reason
        return
    # what decodes must re-encode to the same bytes, apart from padding that the layout zeroes
    again = wire.encode(req, body, reply=reply)
    assert len(again) - HEADER_SIZE == len(data)
    if dataclasses.is_dataclass(body) and isinstance(body, IotlbMsg | Inflight | Rarp):
        return
    assert again[HEADER_SIZE:] == data
