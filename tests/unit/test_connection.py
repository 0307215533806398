"""Connection state machines: validation, fd ownership, which requests are answered, real sequences."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator

import pytest

from vduproxy.vhost_user import wire
from vduproxy.vhost_user.connection import (
    BackendConnection,
    Fds,
    FrontendConnection,
    ProtocolError,
    Request,
    describe,
)
from vduproxy.vhost_user.wire import (
    HEADER_SIZE,
    ConfigSpace,
    DeviceStateTransfer,
    Inflight,
    LogArea,
    MemoryTable,
    MemRegion,
    ProtocolF,
    Rarp,
    Req,
    SingleRegion,
    VringAddr,
    VringFile,
    VringState,
)
from vduproxy.virtio import VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, NetF

pytestmark = pytest.mark.unit

FEATURES = int(NetF.VERSION_1 | NetF.MRG_RXBUF | NetF.MTU) | VHOST_F_LOG_ALL | VHOST_USER_F_PROTOCOL_FEATURES
ALL_PROTO = wire.ALL_PROTOCOL_FEATURES & ~ProtocolF.INBAND_NOTIFICATIONS


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    before = open_fds()
    yield
    # the directory listing itself used an fd that is closed again by now
    assert open_fds() == before


def pipe_fds(n: int) -> list[int]:
    fds: list[int] = []
    for _ in range(n // 2 + 1):
        fds.extend(os.pipe())
    for fd in fds[n:]:
        os.close(fd)
    return fds[:n]


def hdr(req: int, flags: int, size: int) -> bytes:
    return wire.build_header(req, flags, size)


def serve(
    be: BackendConnection, fe: FrontendConnection, data: bytes, fds: list[int], reply: wire.Body = None
) -> None:
    """Deliver one request to the back-end, complete it, and hand any reply back to the front-end."""
    be.receive_data(data, fds)
    r = be.next_request()
    assert r is not None
    out = be.complete(r, reply)
    if out:
        fe.receive_data(out)
        assert fe.next_reply() is not None


def negotiated(
    proto: int = ALL_PROTO, features: int = FEATURES, acked: int | None = None
) -> tuple[BackendConnection, FrontendConnection]:
    """A back-end/front-end pair past GET_FEATURES / protocol feature negotiation / SET_FEATURES."""
    be = BackendConnection()
    fe = FrontendConnection()
    serve(be, fe, fe.request(Req.GET_FEATURES), [], features)
    serve(be, fe, fe.request(Req.GET_PROTOCOL_FEATURES), [], proto)
    serve(be, fe, fe.request(Req.SET_PROTOCOL_FEATURES, proto), [])
    serve(be, fe, fe.request(Req.SET_FEATURES, features if acked is None else acked), [])
    assert be.acked_protocol_features == proto
    return be, fe


def test_negotiation_tracks_state() -> None:
    be, fe = negotiated(int(ProtocolF.REPLY_ACK | ProtocolF.MQ))
    assert be.offered_features == FEATURES
    assert be.protocol_features_enabled
    assert be.negotiated(ProtocolF.REPLY_ACK) and not be.negotiated(ProtocolF.STATUS)
    assert fe.negotiated(ProtocolF.REPLY_ACK)


# --- table-driven malformed input -------------------------------------------------------------------


def mem_table(*regions: tuple[int, int]) -> bytes:
    body = struct.pack("<II", len(regions), 0)
    for gpa, size in regions:
        body += struct.pack("<QQQQ", gpa, size, 0x7F00_0000_0000 + gpa % (1 << 40), 0)
    return body


def msg(req: int, body: bytes = b"", flags: int = 1) -> bytes:
    return hdr(req, flags, len(body)) + body


U64_0 = struct.pack("<Q", 0)

# (id, protocol features acked, bytes, number of fds, request name in the error, reason fragment)
MALFORMED: list[tuple[str, int, bytes, int, str, str]] = [
    ("version-0", ALL_PROTO, msg(Req.SET_OWNER, flags=0), 0, "SET_OWNER", "version"),
    ("version-2", ALL_PROTO, msg(Req.SET_OWNER, flags=2), 0, "SET_OWNER", "version"),
    ("reply-flag", ALL_PROTO, msg(Req.SET_OWNER, flags=5), 0, "SET_OWNER", "REPLY"),
    ("unknown-flags", ALL_PROTO, msg(Req.SET_OWNER, flags=0x11), 0, "SET_OWNER", "unknown flag"),
    ("size-over-limit", ALL_PROTO, hdr(Req.SET_MEM_TABLE, 1, 1 << 20), 0, "SET_MEM_TABLE", "exceeds"),
    ("short-u64", ALL_PROTO, msg(Req.SET_FEATURES, bytes(4)), 0, "SET_FEATURES", "must be 8 bytes"),
    ("long-state", ALL_PROTO, msg(Req.SET_VRING_NUM, bytes(12)), 0, "SET_VRING_NUM", "must be 8 bytes"),
    ("body-on-empty", ALL_PROTO, msg(Req.SET_OWNER, U64_0), 0, "SET_OWNER", "must be 0 bytes"),
    ("fd-too-many", ALL_PROTO, msg(Req.SET_OWNER), 1, "SET_OWNER", "1 fds, expected 0"),
    ("fd-too-many-num", ALL_PROTO, msg(Req.SET_VRING_NUM, bytes(8)), 2, "SET_VRING_NUM", "expected 0"),
    ("kick-no-fd", ALL_PROTO, msg(Req.SET_VRING_KICK, U64_0), 0, "SET_VRING_KICK", "0 fds, expected 1"),
    ("kick-nofd-with-fd", ALL_PROTO, msg(Req.SET_VRING_KICK, struct.pack("<Q", 0x100)), 1,
     "SET_VRING_KICK", "1 fds"),
    ("call-high-bits", ALL_PROTO, msg(Req.SET_VRING_CALL, struct.pack("<Q", 0x1_0000)), 1,
     "SET_VRING_CALL", "bit 8"),
    ("memtable-too-few-fds", ALL_PROTO, msg(Req.SET_MEM_TABLE, mem_table((0, 4096), (1 << 32, 4096))), 1,
     "SET_MEM_TABLE", "expected 2"),
    ("memtable-too-many-fds", ALL_PROTO, msg(Req.SET_MEM_TABLE, mem_table((0, 4096))), 3, "SET_MEM_TABLE",
     "expected 1"),
    ("memtable-9-regions", ALL_PROTO,
     msg(Req.SET_MEM_TABLE, mem_table(*[(i << 32, 4096) for i in range(9)])), 8,
     "SET_MEM_TABLE", "9 regions"),
    ("memtable-0-regions", ALL_PROTO, msg(Req.SET_MEM_TABLE, mem_table()), 0, "SET_MEM_TABLE", "0 regions"),
    ("memtable-size-mismatch", ALL_PROTO, msg(Req.SET_MEM_TABLE, mem_table((0, 4096), (8192, 4096))[:-32]), 1,
     "SET_MEM_TABLE", "must be 72 bytes"),
    ("memtable-overlap", ALL_PROTO, msg(Req.SET_MEM_TABLE, mem_table((0, 0x10000), (0x8000, 0x10000))), 2,
     "SET_MEM_TABLE", "overlap"),
    ("memtable-zero-size", ALL_PROTO, msg(Req.SET_MEM_TABLE, mem_table((0, 0))), 1,
     "SET_MEM_TABLE", "zero-size"),
    ("memtable-gpa-overflow", ALL_PROTO, msg(Req.SET_MEM_TABLE, mem_table((2**64 - 4096, 8192))), 1,
     "SET_MEM_TABLE", "overflows"),
    ("add-mem-reg-zero", ALL_PROTO, msg(Req.ADD_MEM_REG, bytes(40)), 1, "ADD_MEM_REG", "zero-size"),
    ("add-mem-reg-no-fd", ALL_PROTO, msg(Req.ADD_MEM_REG, U64_0 + mem_table((0, 4096))[8:]), 0, "ADD_MEM_REG",
     "expected 1"),
    ("log-base-no-fd", ALL_PROTO, msg(Req.SET_LOG_BASE, struct.pack("<QQ", 4096, 0)), 0, "SET_LOG_BASE",
     "expected 1"),
    ("log-base-u64-body", ALL_PROTO, msg(Req.SET_LOG_BASE, U64_0), 1, "SET_LOG_BASE", "must be 16 bytes"),
    ("log-size-zero", ALL_PROTO, msg(Req.SET_LOG_BASE, struct.pack("<QQ", 0, 0)), 1,
     "SET_LOG_BASE", "log size"),
    ("unknown-request", ALL_PROTO, msg(99, U64_0), 1, "UNKNOWN(99)", "unknown request"),
    ("request-zero", ALL_PROTO, msg(0), 0, "UNKNOWN(0)", "unknown request"),
    ("config-too-big", ALL_PROTO, msg(Req.GET_CONFIG, struct.pack("<III", 0, 512, 0) + bytes(512)), 0,
     "GET_CONFIG", "exceeds 256"),
    ("config-size-field", ALL_PROTO, msg(Req.SET_CONFIG, struct.pack("<III", 0, 4, 0) + bytes(6)), 0,
     "SET_CONFIG", "does not match"),
    ("inflight-huge", ALL_PROTO, msg(Req.GET_INFLIGHT_FD, struct.pack("<QQHH4x", 0, 0, 65535, 65535)), 0,
     "GET_INFLIGHT_FD", "num_queues"),
    ("device-state-phase", ALL_PROTO, msg(Req.SET_DEVICE_STATE_FD, struct.pack("<II", 0, 7)), 1,
     "SET_DEVICE_STATE_FD", "phase"),
    ("unoffered-protocol-ack", int(ProtocolF.MQ), msg(Req.SET_PROTOCOL_FEATURES, struct.pack("<Q", 0x3)), 0,
     "SET_PROTOCOL_FEATURES", "not offered"),
    ("unoffered-feature-ack", ALL_PROTO, msg(Req.SET_FEATURES, struct.pack("<Q", FEATURES | 1)), 0,
     "SET_FEATURES",
     "not offered"),
    ("inband-alone", wire.ALL_PROTOCOL_FEATURES,
     msg(Req.SET_PROTOCOL_FEATURES, struct.pack("<Q", ProtocolF.INBAND_NOTIFICATIONS)), 0,
     "SET_PROTOCOL_FEATURES", "INBAND_NOTIFICATIONS"),
    # requests gated by a protocol feature that was not negotiated
    ("gate-config", 0, msg(Req.GET_CONFIG, struct.pack("<III", 0, 4, 0) + bytes(4)), 0,
     "GET_CONFIG", "CONFIG"),
    ("gate-status", 0, msg(Req.SET_STATUS, U64_0), 0, "SET_STATUS", "STATUS"),
    ("gate-get-status", int(ProtocolF.REPLY_ACK), msg(Req.GET_STATUS), 0, "GET_STATUS", "STATUS"),
    ("gate-add-mem-reg", 0, msg(Req.ADD_MEM_REG, U64_0 + mem_table((0, 4096))[8:]), 1, "ADD_MEM_REG",
     "CONFIGURE_MEM_SLOTS"),
    ("gate-max-slots", 0, msg(Req.GET_MAX_MEM_SLOTS), 0, "GET_MAX_MEM_SLOTS", "CONFIGURE_MEM_SLOTS"),
    ("gate-inflight", 0, msg(Req.GET_INFLIGHT_FD, struct.pack("<QQHH4x", 0, 0, 65535, 65535)), 0,
     "GET_INFLIGHT_FD", "INFLIGHT_SHMFD"),
    ("gate-set-inflight", 0, msg(Req.SET_INFLIGHT_FD, struct.pack("<QQHH4x", 4096, 0, 2, 256)), 1,
     "SET_INFLIGHT_FD", "INFLIGHT_SHMFD"),
    ("gate-rarp", 0, msg(Req.SEND_RARP, bytes(8)), 0, "SEND_RARP", "RARP"),
    ("gate-mtu", 0, msg(Req.NET_SET_MTU, struct.pack("<Q", 1500)), 0, "NET_SET_MTU", "NET_MTU"),
    ("gate-log-base", 0, msg(Req.SET_LOG_BASE, struct.pack("<QQ", 4096, 0)), 1, "SET_LOG_BASE", "LOG_SHMFD"),
    ("gate-backend-req", 0, msg(Req.SET_BACKEND_REQ_FD), 1, "SET_BACKEND_REQ_FD", "BACKEND_REQ"),
    ("gate-queue-num", 0, msg(Req.GET_QUEUE_NUM), 0, "GET_QUEUE_NUM", "MQ"),
    ("gate-reset-device", 0, msg(Req.RESET_DEVICE), 0, "RESET_DEVICE", "RESET_DEVICE"),
    ("gate-vring-kick", ALL_PROTO, msg(Req.VRING_KICK, bytes(8)), 0, "VRING_KICK", "INBAND_NOTIFICATIONS"),
    ("gate-postcopy", 0, msg(Req.POSTCOPY_ADVISE), 0, "POSTCOPY_ADVISE", "PAGEFAULT"),
    ("gate-device-state", 0, msg(Req.SET_DEVICE_STATE_FD, bytes(8)), 1,
     "SET_DEVICE_STATE_FD", "DEVICE_STATE"),
    ("gate-check-state", 0, msg(Req.CHECK_DEVICE_STATE), 0, "CHECK_DEVICE_STATE", "DEVICE_STATE"),
    ("gate-iotlb", ALL_PROTO, msg(Req.IOTLB_MSG, struct.pack("<QQQBB6x", 0, 4096, 0, 3, 2)), 0, "IOTLB_MSG",
     "IOMMU_PLATFORM"),
    ("gate-crypto", 0, msg(Req.CLOSE_CRYPTO_SESSION, U64_0), 0, "CLOSE_CRYPTO_SESSION", "CRYPTO_SESSION"),
    ("gate-endian", 0, msg(Req.SET_VRING_ENDIAN, bytes(8)), 0, "SET_VRING_ENDIAN", "CROSS_ENDIAN"),
]  # fmt: skip


@pytest.mark.parametrize(("proto", "data", "nfds", "name", "reason"), [c[1:] for c in MALFORMED],
                         ids=[c[0] for c in MALFORMED])  # fmt: skip
def test_malformed_request_is_rejected_and_fds_closed(
    proto: int, data: bytes, nfds: int, name: str, reason: str, no_fd_leak: None
) -> None:
    offered = proto if proto else int(ProtocolF.REPLY_ACK)
    be, _ = negotiated(offered)
    if proto == 0:
        be.acked_protocol_features = 0  # offered REPLY_ACK only, acked nothing
    fds = pipe_fds(nfds)
    be.receive_data(data, fds)
    with pytest.raises(ProtocolError) as info:
        be.next_request()
    assert info.value.request == name
    assert reason in info.value.reason
    assert info.value.to_event() == {"request": name, "reason": info.value.reason}
    assert not any(is_open(fd) for fd in fds)
    assert be.dead
    # the connection stays dead, and fds handed to a dead connection are closed too
    late = pipe_fds(2)
    with pytest.raises(ProtocolError):
        be.receive_data(b"\x00", late)
    assert not any(is_open(fd) for fd in late)
    with pytest.raises(ProtocolError):
        be.next_request()


def test_protocol_features_need_bit_30_offered(no_fd_leak: None) -> None:
    be, fe = BackendConnection(), FrontendConnection()
    serve(be, fe, fe.request(Req.GET_FEATURES), [], int(NetF.VERSION_1))
    be.receive_data(msg(Req.GET_PROTOCOL_FEATURES), [])
    with pytest.raises(ProtocolError, match="bit 30"):
        be.next_request()


def test_partial_header_and_body_need_more_data(no_fd_leak: None) -> None:
    be, fe = negotiated()
    data = fe.request(Req.SET_VRING_ADDR, VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0))
    for i in range(len(data) - 1):
        be.receive_data(data[i : i + 1])
        assert be.next_request() is None
    be.receive_data(data[-1:])
    r = be.next_request()
    assert r is not None and r.body == VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0)
    assert be.complete(r) == b""


def test_truncated_stream_at_close_is_an_error(no_fd_leak: None) -> None:
    be, fe = negotiated()
    fds = pipe_fds(1)
    data = fe.request(Req.SET_VRING_CALL, VringFile(0), fds=fds)
    be.receive_data(data[:14], fds)
    assert be.next_request() is None
    with pytest.raises(ProtocolError) as info:
        be.close()
    assert info.value.request == "SET_VRING_CALL"
    assert "stream ended" in info.value.reason
    assert not is_open(fds[0])


def test_clean_close_releases_outstanding_fds(no_fd_leak: None) -> None:
    be, fe = negotiated()
    fds = pipe_fds(1)
    be.receive_data(fe.request(Req.SET_VRING_KICK, VringFile(1), fds=fds), fds)
    assert be.next_request() is not None
    be.close()
    assert not is_open(fds[0])


def test_bad_size_fails_before_the_body_arrives(no_fd_leak: None) -> None:
    be, _ = negotiated()
    be.receive_data(hdr(Req.SET_VRING_NUM, 1, 400))
    with pytest.raises(ProtocolError, match="must be 8 bytes"):
        be.next_request()


def test_fds_attach_to_the_message_of_their_first_byte(no_fd_leak: None) -> None:
    be, fe = negotiated()
    kick, call = pipe_fds(2)
    m1 = fe.request(Req.SET_VRING_KICK, VringFile(0), fds=[kick])
    m2 = fe.request(Req.SET_VRING_CALL, VringFile(0), fds=[call])
    # first recvmsg: all of m1 and half of m2, with m1's fd; second: the rest of m2, with m2's fd
    be.receive_data(m1 + m2[:5], [kick])
    be.receive_data(m2[5:], [call])
    r1 = be.next_request()
    assert r1 is not None and r1.req is Req.SET_VRING_KICK and r1.fds.peek(0) == kick
    be.complete(r1)
    r2 = be.next_request()
    assert r2 is not None and r2.req is Req.SET_VRING_CALL and r2.fds.peek(0) == call
    be.complete(r2)


def test_fds_arriving_with_a_later_message_are_not_stolen(no_fd_leak: None) -> None:
    be, fe = negotiated()
    (kick,) = pipe_fds(1)
    m1 = fe.request(Req.SET_VRING_NUM, VringState(0, 256))
    m2 = fe.request(Req.SET_VRING_KICK, VringFile(0), fds=[kick])
    be.receive_data(m1)
    be.receive_data(m2, [kick])
    r1 = be.next_request()
    assert r1 is not None and len(r1.fds) == 0
    be.complete(r1)
    r2 = be.next_request()
    assert r2 is not None and len(r2.fds) == 1
    be.complete(r2)


def test_taken_fds_survive_complete_and_the_rest_are_closed(no_fd_leak: None) -> None:
    be, fe = negotiated()
    fds = pipe_fds(2)
    table = MemoryTable((MemRegion(0, 0x1000, 0x7000_0000, 0), MemRegion(0x10_0000, 0x1000, 0x7100_0000, 0)))
    be.receive_data(fe.request(Req.SET_MEM_TABLE, table, fds=fds), fds)
    r = be.next_request()
    assert r is not None and r.body_as(MemoryTable) == table
    kept = r.fds.take(0)
    with pytest.raises(ValueError):
        r.fds.take(0)
    be.complete(r)
    assert is_open(kept) and not is_open(fds[1])
    os.close(kept)


def test_rem_mem_reg_fd_is_accepted_and_closed(no_fd_leak: None) -> None:
    be, fe = negotiated()
    fds = pipe_fds(1)
    body = SingleRegion(MemRegion(0, 0x1000, 0x7000_0000, 0))
    be.receive_data(fe.request(Req.REM_MEM_REG, body, fds=fds), fds)
    r = be.next_request()
    assert r is not None and len(r.fds) == 0
    assert not is_open(fds[0])
    be.complete(r)


def test_too_many_pending_fds_is_an_error(no_fd_leak: None) -> None:
    be, _ = negotiated()
    fds = pipe_fds(80)
    with pytest.raises(ProtocolError, match="unprocessed fds"):
        be.receive_data(b"\x01", fds)
    assert not any(is_open(fd) for fd in fds)


# --- replies ---------------------------------------------------------------------------------------------


def test_get_requests_need_a_reply_body() -> None:
    be, fe = negotiated()
    be.receive_data(fe.request(Req.GET_VRING_BASE, VringState(0, 61504)))
    r = be.next_request()
    assert r is not None
    with pytest.raises(ValueError, match="needs a reply body"):
        be.complete(r)
    out = be.complete(r, VringState(0, 42))
    assert struct.unpack("<IIIII", out) == (Req.GET_VRING_BASE, 0x5, 8, 0, 42)


def test_complete_exactly_once_and_in_order() -> None:
    be, fe = negotiated()
    be.receive_data(fe.request(Req.SET_OWNER) + fe.request(Req.RESET_OWNER))
    r = be.next_request()
    assert r is not None
    with pytest.raises(RuntimeError, match="not completed"):
        be.next_request()
    be.complete(r)
    with pytest.raises(RuntimeError, match="completed twice"):
        be.complete(r)
    r2 = be.next_request()
    assert r2 is not None and r2.req is Req.RESET_OWNER


@pytest.mark.parametrize("reply_ack", [True, False])
@pytest.mark.parametrize("need_reply", [True, False])
def test_ack_only_with_need_reply_and_reply_ack(reply_ack: bool, need_reply: bool) -> None:
    proto = int(ProtocolF.MQ | (ProtocolF.REPLY_ACK if reply_ack else 0))
    be, fe = negotiated(proto)
    be.receive_data(fe.request(Req.SET_VRING_NUM, VringState(0, 256), need_reply=need_reply))
    r = be.next_request()
    assert r is not None and r.need_reply == need_reply
    out = be.complete(r, error=22)
    if reply_ack and need_reply:
        assert struct.unpack("<IIIQ", out) == (Req.SET_VRING_NUM, 0x5, 8, 22)
    else:
        assert out == b""


def test_set_log_base_is_always_answered_with_log_shmfd(no_fd_leak: None) -> None:
    be, fe = negotiated(int(ProtocolF.LOG_SHMFD))
    fds = pipe_fds(1)
    data = fe.request(Req.SET_LOG_BASE, LogArea(0x4000, 0), fds=fds)
    assert wire.parse_header(data)[1] == 0x1  # no NEED_REPLY, as QEMU sends it
    be.receive_data(data, fds)
    r = be.next_request()
    assert r is not None
    log_fd = r.fds.take(0)
    out = be.complete(r)
    os.close(log_fd)
    assert struct.unpack("<IIIQ", out) == (Req.SET_LOG_BASE, 0x5, 8, 0)
    fe.receive_data(out)
    reply = fe.next_reply()
    assert reply is not None and reply.req is Req.SET_LOG_BASE and reply.u64 == 0


def test_requests_without_reply_refuse_a_body() -> None:
    be, fe = negotiated()
    be.receive_data(fe.request(Req.SET_VRING_NUM, VringState(0, 256)))
    r = be.next_request()
    assert r is not None
    with pytest.raises(ValueError, match="no reply body"):
        be.complete(r, 5)


def test_get_config_error_is_an_empty_reply() -> None:
    be, fe = negotiated()
    be.receive_data(fe.request(Req.GET_CONFIG, ConfigSpace(0, 0, bytes(12))))
    r = be.next_request()
    assert r is not None
    out = be.complete(r, error=1)
    assert wire.parse_header(out) == (Req.GET_CONFIG, 0x5, 0)
    fe.receive_data(out)
    reply = fe.next_reply()
    assert reply is not None and reply.body is None


def test_device_state_fd_reply_status(no_fd_leak: None) -> None:
    be, fe = negotiated()
    for error, expected in ((0, 0x100), (5, 0x105)):
        fds = pipe_fds(1)
        be.receive_data(fe.request(Req.SET_DEVICE_STATE_FD, DeviceStateTransfer(0, 0), fds=fds), fds)
        r = be.next_request()
        assert r is not None
        out = be.complete(r, 0x100) if error == 0 else be.complete(r, error=error)
        assert struct.unpack("<IIIQ", out)[3] == expected
        fe.receive_data(out)
        assert fe.next_reply() is not None


# --- sequences real front-ends send (shared/TESTBED.md) ---------------------------------------------------


def test_dpdk_virtio_user_startup_sequence(no_fd_leak: None) -> None:
    offered_proto = int(ProtocolF.MQ | ProtocolF.REPLY_ACK | ProtocolF.STATUS | ProtocolF.LOG_SHMFD)
    features = 0x950008000 | VHOST_USER_F_PROTOCOL_FEATURES
    be, fe = BackendConnection(offered_features=features), FrontendConnection()
    replies: list[wire.Body] = []

    def send(req: Req, body: wire.Body = None, fds: list[int] | None = None, need_reply: bool = False,
             reply: wire.Body = None) -> Request:  # fmt: skip
        be.receive_data(fe.request(req, body, fds=fds or [], need_reply=need_reply), fds or [])
        r = be.next_request()
        assert r is not None
        assert describe(r)["request"] == req.name
        out = be.complete(r, reply)
        if out:
            fe.receive_data(out)
            rep = fe.next_reply()
            assert rep is not None
            replies.append(rep.body)
        return r

    send(Req.SET_OWNER)
    send(Req.GET_FEATURES, reply=features)
    send(Req.GET_PROTOCOL_FEATURES, reply=offered_proto)
    send(Req.SET_PROTOCOL_FEATURES, 0x10009)
    for i in range(2):  # virtio-user sets call fds before SET_FEATURES
        send(Req.SET_VRING_CALL, VringFile(i), fds=pipe_fds(1))
    send(Req.SET_FEATURES, 0x950008000)
    send(Req.SET_STATUS, 0xB, need_reply=True)
    send(Req.GET_STATUS, reply=0xB)
    mem = os.memfd_create("guest")
    os.ftruncate(mem, 1 << 20)
    send(Req.SET_MEM_TABLE, MemoryTable((MemRegion(0x7F00_0000, 1 << 20, 0x7F00_0000, 0),)), fds=[mem],
         need_reply=True)  # fmt: skip
    for i in range(2):
        send(Req.SET_VRING_NUM, VringState(i, 256))
        send(Req.SET_VRING_BASE, VringState(i, 0))
        send(Req.SET_VRING_ADDR, VringAddr(i, 0, 0x7F00_0000, 0x7F00_2000, 0x7F00_1000, 0))
        send(Req.SET_VRING_KICK, VringFile(i), fds=pipe_fds(1))
    for i in range(2):
        send(Req.SET_VRING_ENABLE, VringState(i, 1))
    send(Req.SET_STATUS, 0xF, need_reply=True)
    for i in range(2):
        send(Req.SET_VRING_ENABLE, VringState(i, 0))
        send(Req.GET_VRING_BASE, VringState(i, 5184), reply=VringState(i, 0))
    # replies: features, protocol features, 2 status acks, status, mem table ack, 2 vring bases
    assert replies == [features, offered_proto, 0, 0xB, 0, 0, VringState(0, 0), VringState(1, 0)]
    be.close()


def test_dpdk_server_mode_reconnect_before_negotiation() -> None:
    # virtio-user in server mode sends these to a fresh back-end before any SET_OWNER or feature exchange
    be = BackendConnection()
    be.receive_data(msg(Req.SET_VRING_ENABLE, struct.pack("<II", 0, 0)))
    r = be.next_request()
    assert r is not None
    assert be.complete(r) == b""
    be.receive_data(msg(Req.GET_VRING_BASE, struct.pack("<II", 0, 61504)))
    r = be.next_request()
    assert r is not None and r.body_as(VringState).index == 0
    assert be.complete(r, VringState(0, 17))[-8:] == struct.pack("<II", 0, 17)


def test_qemu_migration_messages(no_fd_leak: None) -> None:
    proto = int(ProtocolF.MQ | ProtocolF.LOG_SHMFD | ProtocolF.RARP | ProtocolF.REPLY_ACK | ProtocolF.NET_MTU)
    be, fe = negotiated(proto)
    log_fd = pipe_fds(1)
    serve(be, fe, fe.request(Req.SET_LOG_BASE, LogArea(0x4000, 0), fds=log_fd), log_fd)
    serve(be, fe, fe.request(Req.SET_FEATURES, FEATURES), [])
    assert be.acked_features is not None and be.acked_features & VHOST_F_LOG_ALL
    serve(be, fe, fe.request(Req.SET_VRING_ADDR, VringAddr(0, wire.VHOST_VRING_F_LOG, 1, 3, 2, 0x5000)), [])
    serve(be, fe, fe.request(Req.SEND_RARP, Rarp(bytes.fromhex("525400123456"))), [])
    serve(be, fe, fe.request(Req.NET_SET_MTU, 1500, need_reply=True), [])
    assert fe.pending_replies == 0


def test_inflight_with_negotiated_feature(no_fd_leak: None) -> None:
    be, fe = negotiated()
    be.receive_data(fe.request(Req.GET_INFLIGHT_FD, Inflight(0, 0, 2, 256)))
    r = be.next_request()
    assert r is not None
    out = be.complete(r, Inflight(8192, 0, 2, 256))
    fds = pipe_fds(1)
    fe.receive_data(out, fds)
    reply = fe.next_reply()
    assert reply is not None and reply.body == Inflight(8192, 0, 2, 256) and len(reply.fds) == 1
    reply.fds.close_rest()


# --- front-end side -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: hdr(Req.GET_FEATURES, 0x1, 8) + U64_0, "must be exactly 0x5"),
        (lambda: hdr(Req.GET_FEATURES, 0xD, 8) + U64_0, "must be exactly 0x5"),
        (lambda: hdr(Req.GET_PROTOCOL_FEATURES, 0x5, 8) + U64_0, "while waiting for GET_FEATURES"),
        (lambda: hdr(Req.GET_FEATURES, 0x5, 4) + bytes(4), "must be 8 bytes"),
    ],
)
def test_frontend_rejects_bad_replies(make: Callable[[], bytes], reason: str, no_fd_leak: None) -> None:
    fe = FrontendConnection()
    fe.request(Req.GET_FEATURES)
    fds = pipe_fds(1)
    fe.receive_data(make(), fds)
    with pytest.raises(ProtocolError, match=reason):
        fe.next_reply()
    assert not is_open(fds[0])


def test_frontend_rejects_unsolicited_reply() -> None:
    fe = FrontendConnection()
    fe.request(Req.SET_OWNER)
    assert not fe.expects_reply(Req.SET_OWNER)
    fe.receive_data(hdr(Req.SET_OWNER, 0x5, 8) + U64_0)
    with pytest.raises(ProtocolError, match="no reply is pending"):
        fe.next_reply()


def test_frontend_refuses_wrong_fd_count() -> None:
    fe = FrontendConnection()
    with pytest.raises(ValueError, match="expected 1"):
        fe.request(Req.SET_VRING_KICK, VringFile(0))


def test_fds_object() -> None:
    fds = Fds(pipe_fds(2))
    assert len(fds) == 2 and fds.open_count == 2
    with pytest.raises(IndexError):
        fds.peek(2)
    fd = fds.take(1)
    fds.close_rest()
    assert fds.open_count == 0 and is_open(fd)
    os.close(fd)


def test_describe_gives_decoded_fields() -> None:
    be, fe = negotiated()
    fds = pipe_fds(1)
    be.receive_data(
        fe.request(Req.SET_MEM_TABLE, MemoryTable((MemRegion(0, 0x1000, 0x7000, 0),)), fds=fds), fds
    )
    r = be.next_request()
    assert r is not None
    d = describe(r)
    assert d["request"] == "SET_MEM_TABLE" and d["nfds"] == 1 and d["nregions"] == 1
    assert d["regions"][0]["userspace_addr"] == "0x7000"
    be.complete(r)
    assert HEADER_SIZE == 12


# --- conveniences the server and back-end rely on ----------------------------------------------------------


def test_has_partial_and_abort_release_everything(no_fd_leak: None) -> None:
    be, fe = negotiated()
    assert not be.has_partial()
    kick, call = pipe_fds(2)
    m1 = fe.request(Req.SET_VRING_KICK, VringFile(0), fds=[kick])
    m2 = fe.request(Req.SET_VRING_CALL, VringFile(0), fds=[call])
    be.receive_data(m1, [kick])
    be.receive_data(m2[:-3], [call])
    assert be.next_request() is not None  # outstanding, its fd not taken
    assert be.has_partial()
    be.abort()
    assert be.dead and not is_open(kick) and not is_open(call)
    be.abort()  # idempotent, never raises


def test_unanswerable_error_closes_the_connection(no_fd_leak: None) -> None:
    be, fe = negotiated()
    be.receive_data(fe.request(Req.GET_VRING_BASE, VringState(0, 0)))
    r = be.next_request()
    assert r is not None
    with pytest.raises(ProtocolError) as info:
        be.complete(r, error=1)
    assert info.value.request == "GET_VRING_BASE" and be.dead


def test_handler_friendly_body_forms() -> None:
    be, fe = negotiated()
    (fd,) = pipe_fds(1)
    be.receive_data(fe.request(Req.SET_VRING_CALL, VringFile(3), fds=[fd]), [fd])
    r = be.next_request()
    assert r is not None and int(r.body_as(VringFile)) == 3
    be.complete(r)
    be.receive_data(fe.request(Req.SEND_RARP, Rarp(bytes.fromhex("525400000001"))))
    r = be.next_request()
    assert r is not None and bytes(r.body_as(Rarp))[:6] == bytes.fromhex("525400000001")
    be.complete(r)
    be.receive_data(fe.request(Req.GET_VRING_BASE, VringState(1, 0)))
    r = be.next_request()
    assert r is not None
    out = be.complete(r, {"index": 1, "num": 99})  # type: ignore[arg-type]
    assert struct.unpack("<IIIII", out)[3:] == (1, 99)
