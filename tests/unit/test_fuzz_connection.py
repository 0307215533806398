"""Property fuzzing of the vhost-user connection state machine and the net back-end, with a short budget.

- BackendConnection fed arbitrary byte streams, cut anywhere, with fds attached anywhere: only ProtocolError
  escapes, every fd is either handed out exactly once or closed by the connection, buffering stays bounded.
- NetBackend (no device, and the software device through open_dataplane_factory("sim")) fed random sequences of
  valid-framed requests in random orders, with fds of the right and the wrong kinds: only ProtocolError escapes
  (everything else is answered with an error code), and no fd is left open afterwards (/proc/self/fd).
The long run is fuzz/run_wire.py.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vduproxy.backend import NetBackend, NullDataPlane, Reply
from vduproxy.vhost_user import wire
from vduproxy.vhost_user.connection import (
    MAX_BUFFERED_MESSAGES,
    MAX_HELD_FDS,
    BackendConnection,
    ProtocolError,
    Request,
)
from vduproxy.vhost_user.wire import (
    FLAG_NEED_REPLY,
    HEADER_SIZE,
    SPECS,
    ConfigSpace,
    DeviceStateTransfer,
    Fd,
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
    VringFile,
    VringState,
)
from vduproxy.virtio import VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, NetF

pytestmark = pytest.mark.unit

FEATURES = (
    int(NetF.VERSION_1 | NetF.MRG_RXBUF | NetF.ACCESS_PLATFORM) | VHOST_F_LOG_ALL | VHOST_USER_F_PROTOCOL_FEATURES
)
ALL_PROTO = wire.ALL_PROTOCOL_FEATURES & ~ProtocolF.INBAND_NOTIFICATIONS
REGION_SIZE = 0x10000
UVA0 = 0x7F00_0000_0000


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def make_fd(kind: str, size: int = REGION_SIZE) -> int:
    """One fd of a kind a front-end sends: guest memory, an eventfd, or one end of a pipe whose other end is gone
    (so a transfer over it ends at once instead of waiting for a peer that will never write)."""
    if kind == "memfd":
        fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return fd
    if kind == "eventfd":
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    r, w = os.pipe()
    os.close(w if kind == "pipe_r" else r)
    return r if kind == "pipe_r" else w


# --- 1. the connection alone: arbitrary streams --------------------------------------------------------------


def reply_for(req: Request, conn: BackendConnection) -> Any:
    """A well-formed reply body for a request the back-end answers, as a correct handler would give it."""
    body = req.body
    values: dict[Req, Any] = {
        Req.GET_FEATURES: FEATURES,
        Req.GET_PROTOCOL_FEATURES: ALL_PROTO,
        Req.GET_QUEUE_NUM: 1,
        Req.GET_MAX_MEM_SLOTS: 8,
        Req.GET_STATUS: 0,
        Req.GET_INFLIGHT_FD: Inflight(4096, 0, 1, 256),
    }
    if req.req in values:
        return values[req.req]
    if req.req is Req.GET_VRING_BASE and isinstance(body, VringState):
        return VringState(body.index, 0)
    if req.req is Req.GET_CONFIG and isinstance(body, ConfigSpace):
        return body
    if req.req is Req.CREATE_CRYPTO_SESSION and isinstance(body, Opaque):
        return body
    return None


def pull_all(conn: BackendConnection, taken: list[int], take_first: bool, error: int) -> None:
    """Handle every complete request: keep fd 0 of some (as handlers do), answer, let complete() close the rest."""
    while (req := conn.next_request()) is not None:
        if take_first and len(req.fds):
            taken.append(req.fds.take(0))
        conn.complete(req, reply_for(req, conn), error=error)


def framed(req: int, flags: int, body: bytes) -> bytes:
    return wire.build_header(req, flags, len(body)) + body


KNOWN = {int(x) for x in Req}


def message() -> st.SearchStrategy[bytes]:
    """Mostly plausible messages (a real request number and flags, a body of the right size), sometimes not."""
    req = st.one_of(st.sampled_from(list(Req)), st.integers(0, 2**32 - 1))
    flags = st.one_of(st.sampled_from([1, 1 | FLAG_NEED_REPLY]), st.integers(0, 2**32 - 1))

    def body_for(r: int) -> st.SearchStrategy[bytes]:
        if r not in KNOWN:
            return st.binary(max_size=64)
        codec = SPECS[Req(r)].request
        if codec.size is not None:
            return st.one_of(st.binary(min_size=codec.size, max_size=codec.size), st.binary(max_size=64))
        return st.binary(max_size=300)

    return st.tuples(req, flags).flatmap(lambda t: body_for(t[0]).map(lambda b: framed(t[0], t[1], b)))


def negotiation() -> bytes:
    """What a front-end sends first, so gated requests get past the gate."""
    return b"".join(
        [
            framed(Req.GET_FEATURES, 1, b""),
            framed(Req.GET_PROTOCOL_FEATURES, 1, b""),
            framed(Req.SET_PROTOCOL_FEATURES, 1, ALL_PROTO.to_bytes(8, "little")),
            framed(Req.SET_FEATURES, 1, FEATURES.to_bytes(8, "little")),
        ]
    )


chunked_stream = st.tuples(
    st.booleans(),  # negotiate first
    st.lists(st.one_of(message(), st.binary(max_size=40)), max_size=12),
    st.lists(st.integers(1, 64), max_size=20),  # cut points
    st.lists(st.integers(0, 3), max_size=20),  # fds per chunk
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=chunked_stream, take_first=st.booleans(), error=st.sampled_from([0, 0, 1]), end=st.booleans())
def test_arbitrary_stream(
    stream: tuple[bool, list[bytes], list[int], list[int]], take_first: bool, error: int, end: bool
) -> None:
    nego, messages, cuts, nfds = stream
    data = (negotiation() if nego else b"") + b"".join(messages)
    conn = BackendConnection()
    given_fds: list[int] = []
    taken: list[int] = []
    before = open_fds()
    try:
        pos = 0
        for i, cut in enumerate([*cuts, len(data)]):
            if pos >= len(data):
                break
            chunk = data[pos : pos + cut]
            pos += len(chunk)
            fds = [make_fd("eventfd") for _ in range(nfds[i] if i < len(nfds) else 0)]
            given_fds += fds
            conn.receive_data(chunk, fds)  # from here on the connection owns them
            pull_all(conn, taken, take_first, error)
        if end:
            conn.close()
    except ProtocolError as e:
        assert e.reason
        assert conn.dead
    finally:
        conn.abort()
    assert conn.held_fds == 0
    assert len(taken) == len(set(taken)), "an fd was handed out twice"
    assert set(taken) <= set(given_fds)
    for fd in taken:
        assert is_open(fd), "an fd handed to the handler was closed behind its back"
        os.close(fd)
    assert open_fds() == before


@settings(max_examples=30, deadline=None)
@given(size=st.integers(0, 4096), per_chunk=st.integers(1, 4096))
def test_buffering_is_bounded(size: int, per_chunk: int) -> None:
    """A peer that pipelines without waiting can make the connection buffer only so much."""
    conn = BackendConnection(max_body=size)
    bound = MAX_BUFFERED_MESSAGES * (HEADER_SIZE + size)
    msg = framed(Req.SET_OWNER, 1, b"")
    fed = 0
    with pytest.raises(ProtocolError, match="unprocessed"):
        while fed <= bound + len(msg) * per_chunk:
            conn.receive_data(msg * per_chunk)
            fed += len(msg) * per_chunk
    assert fed <= bound + len(msg) * per_chunk


def test_held_fds_are_bounded() -> None:
    conn = BackendConnection()
    before = open_fds()
    with pytest.raises(ProtocolError, match="unprocessed fds"):
        for _ in range(MAX_HELD_FDS + 1):
            conn.receive_data(b"\x01", [make_fd("eventfd")])
    assert conn.held_fds == 0
    assert open_fds() == before


# --- 2. the back-end: valid-framed requests in random orders --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Step:
    req: Req
    body: wire.Body
    need_reply: bool
    fds: tuple[tuple[str, int], ...]  # (kind, size) of each fd to send


def u(bits: int) -> st.SearchStrategy[int]:
    return st.integers(0, (1 << bits) - 1)


vring_index = st.one_of(st.integers(0, 3), st.integers(0, 255))
ring_num = st.one_of(st.sampled_from([0, 1, 3, 8, 64, 256, 1024, 32768, 65536]), u(32))


def uva(region: int, limit: int = REGION_SIZE) -> st.SearchStrategy[int]:
    return st.integers(0, limit // 16 - 1).map(lambda k: UVA0 + region * 0x100000 + 16 * k)


any_uva = st.one_of(uva(0, 0x4000), uva(1, 0x4000), u(64))
mem_region = st.tuples(st.integers(0, 3), st.sampled_from([0x1000, REGION_SIZE, 0x100000])).map(
    lambda t: MemRegion(t[0] * 0x100000, t[1], UVA0 + t[0] * 0x100000, 0)
)


def mem_table() -> st.SearchStrategy[tuple[MemoryTable, tuple[tuple[str, int], ...]]]:
    def fds_for(t: MemoryTable) -> st.SearchStrategy[tuple[tuple[str, int], ...]]:
        # an fd as large as its region, or smaller (mapping past its end must be refused, not SIGBUS later)
        sizes = [st.sampled_from([r.memory_size + r.mmap_offset, r.memory_size // 2]) for r in t.regions]
        return st.tuples(*sizes).map(lambda ss: tuple(("memfd", s) for s in ss))

    tables = st.lists(mem_region, min_size=1, max_size=3, unique_by=lambda r: r.guest_phys_addr).map(
        lambda rs: MemoryTable(tuple(rs))
    )
    return tables.flatmap(lambda t: fds_for(t).map(lambda f: (t, f)))


def body_and_fds(req: Req) -> st.SearchStrategy[tuple[wire.Body, tuple[tuple[str, int], ...]]]:
    spec = SPECS[req]
    none: tuple[tuple[str, int], ...] = ()

    def with_fds(body: st.SearchStrategy[Any], kind: str = "eventfd", size: int = REGION_SIZE) -> Any:
        if spec.fds in (Fd.ONE,):
            return body.map(lambda b: (b, ((kind, size),)))
        if spec.fds is Fd.ZERO_OR_ONE:
            return st.tuples(body, st.sampled_from([none, ((kind, size),)]))
        if spec.fds is Fd.VRING_FILE:
            return body.map(lambda b: (b, none if b.nofd else ((kind, size),)))
        return body.map(lambda b: (b, none))

    u64_feature = st.one_of(st.just(FEATURES), st.just(ALL_PROTO), u(64))
    bodies: dict[Req, Any] = {
        Req.SET_FEATURES: with_fds(u64_feature),
        Req.SET_PROTOCOL_FEATURES: with_fds(u64_feature),
        Req.SET_MEM_TABLE: mem_table(),
        Req.SET_LOG_BASE: with_fds(
            st.builds(LogArea, st.sampled_from([4096, 0x10000, 1 << 20]), st.sampled_from([0, 4096])), "memfd", 4096
        ),
        Req.SET_LOG_FD: with_fds(st.none(), "memfd"),
        Req.SET_VRING_NUM: with_fds(st.builds(VringState, vring_index, ring_num)),
        Req.SET_VRING_BASE: with_fds(st.builds(VringState, vring_index, u(32))),
        Req.GET_VRING_BASE: with_fds(st.builds(VringState, vring_index, u(32))),
        Req.SET_VRING_ENABLE: with_fds(st.builds(VringState, vring_index, st.sampled_from([0, 1, 2]))),
        Req.SET_VRING_ADDR: with_fds(
            st.builds(VringAddr, vring_index, st.sampled_from([0, 1]), any_uva, any_uva, any_uva, u(64))
        ),
        Req.SET_VRING_KICK: with_fds(st.builds(VringFile, vring_index, st.booleans())),
        Req.SET_VRING_CALL: with_fds(st.builds(VringFile, vring_index, st.booleans())),
        Req.SET_VRING_ERR: with_fds(st.builds(VringFile, vring_index, st.booleans())),
        Req.SEND_RARP: with_fds(st.builds(Rarp, st.binary(min_size=6, max_size=6))),
        Req.NET_SET_MTU: with_fds(st.one_of(st.integers(0, 70000), u(64))),
        Req.SET_DEVICE_STATE_FD: st.tuples(
            st.builds(DeviceStateTransfer, st.sampled_from([0, 1]), st.just(0)),
            st.sampled_from(["pipe_r", "pipe_w", "eventfd"]),
        ).map(lambda t: (t[0], ((t[1] if t[0].direction else "pipe_w", 0),))),
        Req.IOTLB_MSG: with_fds(st.builds(IotlbMsg, u(64), u(64), u(64), st.integers(0, 3), st.integers(1, 4))),
        Req.GET_CONFIG: with_fds(st.builds(ConfigSpace, u(8), st.just(0), st.binary(max_size=16))),
        Req.SET_CONFIG: with_fds(st.builds(ConfigSpace, u(8), st.just(0), st.binary(max_size=16))),
        Req.SET_INFLIGHT_FD: with_fds(st.builds(Inflight, u(16), st.just(0), u(4), u(8)), "memfd"),
        Req.GET_INFLIGHT_FD: with_fds(st.builds(Inflight, u(16), st.just(0), u(4), u(8))),
        Req.ADD_MEM_REG: with_fds(st.builds(SingleRegion, mem_region), "memfd"),
        Req.REM_MEM_REG: with_fds(st.builds(SingleRegion, mem_region), "memfd"),
        Req.GET_SHARED_OBJECT: with_fds(st.builds(SharedObject, st.binary(min_size=16, max_size=16))),
        Req.CREATE_CRYPTO_SESSION: with_fds(st.builds(Opaque, st.binary(max_size=32))),
    }
    if req in bodies:
        return bodies[req]  # type: ignore[no-any-return]
    codec = spec.request
    if codec is wire.EMPTY:
        return with_fds(st.none())  # type: ignore[no-any-return]
    if codec is wire.U64:
        return with_fds(u(64))  # type: ignore[no-any-return]
    if codec is wire.VRING_STATE:
        return with_fds(st.builds(VringState, vring_index, u(32)))  # type: ignore[no-any-return]
    raise AssertionError(f"no body strategy for {req.name}")


# what QEMU and DPDK send most, weighted up so sequences reach running rings
COMMON = [
    Req.GET_FEATURES,
    Req.SET_FEATURES,
    Req.GET_PROTOCOL_FEATURES,
    Req.SET_PROTOCOL_FEATURES,
    Req.SET_OWNER,
    Req.SET_MEM_TABLE,
    Req.SET_VRING_NUM,
    Req.SET_VRING_ADDR,
    Req.SET_VRING_BASE,
    Req.GET_VRING_BASE,
    Req.SET_VRING_KICK,
    Req.SET_VRING_CALL,
    Req.SET_VRING_ENABLE,
    Req.SET_LOG_BASE,
    Req.SEND_RARP,
]
step_req = st.one_of(*[st.sampled_from(COMMON)] * 4, st.sampled_from(list(Req)))


def step_for(r: Req) -> st.SearchStrategy[Step]:
    def make(t: tuple[tuple[wire.Body, tuple[tuple[str, int], ...]], bool, int]) -> Step:
        (body, fds), need_reply, extra = t
        # one step in forty carries an fd too many: framing stays valid, the fd count does not
        return Step(r, body, need_reply, fds + ((("eventfd", 0),) if extra == 0 else ()))

    return st.tuples(body_and_fds(r), st.booleans(), st.integers(0, 39)).map(make)


step = step_req.flatmap(step_for)


def ring_setup(index: int) -> list[Step]:
    """A ring brought up the way QEMU does it: enough for the back-end to start it on the data plane."""
    e: tuple[tuple[str, int], ...] = (("eventfd", 0),)
    base = UVA0 + 0x2000 * (index + 1)
    return [
        Step(Req.SET_VRING_NUM, VringState(index, 256), False, ()),
        Step(Req.SET_VRING_BASE, VringState(index, 0), False, ()),
        Step(Req.SET_VRING_ADDR, VringAddr(index, 0, base, base + 0x1000 + 0x208, base + 0x1000, 0), False, ()),
        Step(Req.SET_VRING_KICK, VringFile(index), False, e),
        Step(Req.SET_VRING_CALL, VringFile(index), False, e),
        Step(Req.SET_VRING_ENABLE, VringState(index, 1), False, ()),
    ]


def prefix(offered_proto: int) -> list[Step]:
    table = MemoryTable((MemRegion(0, REGION_SIZE, UVA0, 0),))
    features = int(NetF.VERSION_1) | VHOST_USER_F_PROTOCOL_FEATURES
    return [
        Step(Req.GET_FEATURES, None, False, ()),
        Step(Req.GET_PROTOCOL_FEATURES, None, False, ()),
        Step(Req.SET_PROTOCOL_FEATURES, offered_proto, False, ()),
        Step(Req.SET_OWNER, None, False, ()),
        Step(Req.SET_FEATURES, features, False, ()),
        Step(Req.SET_MEM_TABLE, table, True, (("memfd", REGION_SIZE),)),
        *ring_setup(0),
        *ring_setup(1),
    ]


def encode_step(s: Step) -> bytes:
    flags = 1 | (FLAG_NEED_REPLY if s.need_reply else 0)
    payload = SPECS[s.req].request.encode(s.body)
    return wire.build_header(int(s.req), flags, len(payload)) + payload


async def run_session(backend: NetBackend, steps: list[Step]) -> list[str]:
    """Drive one connection in process the way vduproxy.server does; returns the errors the back-end answered.
    Anything but ProtocolError propagates (and fails the test)."""
    conn = BackendConnection(offered_protocol_features=backend.offered_protocol_features())
    answered: list[str] = []
    try:
        async with trio.open_nursery() as nursery:
            bind = getattr(backend, "bind_nursery", None)
            if bind is not None:
                bind(nursery)
            try:
                for s in steps:
                    try:
                        data = encode_step(s)
                    except (wire.WireError, TypeError):
                        continue  # a value the strategy made that no front-end could even send
                    fds = [make_fd(kind, size) for kind, size in s.fds]
                    conn.receive_data(data, fds)
                    req = conn.next_request()
                    assert req is not None, "a whole message was buffered but not returned"
                    try:
                        reply: Reply = await backend.handle(req)
                    finally:
                        req.fds.close_rest()
                    conn.complete(req, reply.value, error=reply.error)
                    for fd in reply.fds:  # what the server would have sent, then closed
                        os.close(fd)
                    if reply.error:
                        answered.append(req.req.name)
            except ProtocolError as e:
                assert e.reason
            nursery.cancel_scope.cancel()  # the server ends the connection's background work with it
    finally:
        conn.abort()
        with trio.CancelScope(shield=True):
            await backend.close()
    return answered


sequences = st.tuples(st.booleans(), st.lists(step, max_size=25))


def run(backend: NetBackend, with_prefix: bool, steps: list[Step]) -> None:
    full = (prefix(backend.offered_protocol_features()) if with_prefix else []) + steps
    # timeouts (CHECK_DEVICE_STATE waits for a transfer) pass in virtual time: no example sleeps for real
    trio.run(run_session, backend, full, clock=trio.testing.MockClock(autojump_threshold=0))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(seq=sequences)
def test_backend_without_device(seq: tuple[bool, list[Step]]) -> None:
    before = open_fds()
    run(NetBackend(1, NullDataPlane(2)), *seq)
    assert open_fds() == before


@pytest.fixture(scope="module")
def sim_factory() -> Iterator[Callable[[int], NetBackend]]:
    from vduproxy.dataplane import open_dataplane_factory

    factory, _ = open_dataplane_factory("sim")
    try:
        # one full session first: whatever the device keeps open for its lifetime is open before any count
        run(factory(0), True, [])
        yield factory
    finally:
        factory.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(seq=sequences)
def test_backend_with_sim_device(sim_factory: Callable[[int], NetBackend], seq: tuple[bool, list[Step]]) -> None:
    # the device may replace an fd it holds for its lifetime (a reset): count, not compare numbers
    before = len(open_fds())
    run(sim_factory(1), seq[0], seq[1])
    assert len(open_fds()) == before


def test_postcopy_advise_can_be_answered() -> None:
    conn = BackendConnection()
    conn.receive_data(negotiation())
    pull_all(conn, [], False, 0)
    conn.receive_data(framed(Req.POSTCOPY_ADVISE, 1, b""))
    req = conn.next_request()
    assert req is not None and req.req is Req.POSTCOPY_ADVISE
    assert conn.complete(req, None)  # raised ValueError("POSTCOPY_ADVISE needs a reply body")


def test_bad_vring_num_on_running_ring_is_handled(sim_factory: Callable[[int], NetBackend]) -> None:
    steps = [
        Step(Req.SET_VRING_NUM, VringState(0, 0), False, ()),
        Step(Req.GET_VRING_BASE, VringState(1, 0), False, ()),
    ]
    run(sim_factory(1), True, steps)  # raised DeviceError("set_vring_num: 0 is not a power of two")


def test_log_larger_than_its_fd_is_handled(sim_factory: Callable[[int], NetBackend]) -> None:
    steps = [Step(Req.SET_LOG_BASE, LogArea(4096, 4096), False, (("memfd", 4096),))]
    run(sim_factory(1), True, steps)  # raised ValueError("log of 4096 bytes at offset 4096 does not fit its fd")
