"""vhost-user connection state machines without I/O (in the style of h11).

The server feeds whatever recvmsg() returned (bytes + fds) into `receive_data`, pulls validated `Request`s
with `next_request`, and sends the bytes `complete` returns. Every rule that depends on negotiation lives
here: fd counts, protocol-feature gating, which requests are answered and how. Any violation raises
`ProtocolError` after closing every fd the connection holds; the connection is dead from then on.

Fd ownership: fds attach to the message whose bytes arrived with them. A `Request` owns its fds through
`Fds`; the handler `take()`s the ones it keeps, and `complete()` closes the rest, so every received fd has
exactly one owner on every path (DPDK leaked fds on rejected messages; we must not).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections import deque
from collections.abc import Sequence
from typing import Any, TypeVar

from vduproxy.vhost_user.wire import (
    DEVICE_STATE_NOFD,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    KNOWN_FLAGS,
    REPLY_FLAGS,
    REQUEST_FLAGS,
    SPECS,
    U64,
    VERSION,
    VERSION_MASK,
    Body,
    ConfigSpace,
    DeviceStateTransfer,
    Fd,
    Inflight,
    IotlbMsg,
    LogArea,
    MemoryTable,
    MsgSpec,
    Opaque,
    ProtocolF,
    Rarp,
    ReplyKind,
    Req,
    SharedObject,
    SingleRegion,
    VringAddr,
    VringArea,
    VringFile,
    VringState,
    WireError,
    build_header,
    parse_header,
    req_name,
)
from vduproxy.virtio import VHOST_USER_F_PROTOCOL_FEATURES, NetF, describe_features

T = TypeVar("T")

# A peer can pipeline messages and fds faster than we handle them; these bound what one connection buffers.
MAX_HELD_FDS = 64
MAX_BUFFERED_MESSAGES = 64


class ProtocolError(Exception):
    """The peer broke the vhost-user protocol. `request` names the offending request (None when it is not
    known, e.g. a truncated stream), `reason` says what was wrong."""

    def __init__(self, request: str | None, reason: str) -> None:
        super().__init__(f"{request}: {reason}" if request else reason)
        self.request = request
        self.reason = reason

    def to_event(self) -> dict[str, Any]:
        """Fields for a structured log line: `log.warning("vhost_user_protocol_error", **err.to_event())`."""
        return {"request": self.request, "reason": self.reason}


def _close_quietly(fd: int) -> None:
    # already closed or never valid: the goal (this fd is not held by us) is met either way
    with contextlib.suppress(OSError):
        os.close(fd)


class Fds:
    """Fds received with one message: `take(i)` hands fd i to the caller, `close_rest()` closes the rest."""

    def __init__(self, fds: Sequence[int] = ()) -> None:
        self._fds: list[int | None] = list(fds)
        self._count = len(self._fds)

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"Fds({self._fds!r})"

    def _get(self, i: int) -> int:
        if not 0 <= i < self._count:
            raise IndexError(f"message carries {self._count} fds, no fd #{i}")
        fd = self._fds[i]
        if fd is None:
            raise ValueError(f"fd #{i} was already taken or closed")
        return fd

    def peek(self, i: int) -> int:
        """Fd i, still owned by this object (for fstat and the like)."""
        return self._get(i)

    def take(self, i: int) -> int:
        """Fd i; the caller now owns it and must close it."""
        fd = self._get(i)
        self._fds[i] = None
        return fd

    @property
    def open_count(self) -> int:
        return sum(1 for fd in self._fds if fd is not None)

    def close_rest(self) -> None:
        for i, fd in enumerate(self._fds):
            if fd is not None:
                self._fds[i] = None
                _close_quietly(fd)


@dataclasses.dataclass(frozen=True)
class Request:
    """One validated front-end request. `body` is the decoded payload (see wire.Body)."""

    req: Req
    flags: int
    need_reply: bool
    body: Body
    raw: bytes
    fds: Fds
    seq: int = 0

    @property
    def name(self) -> str:
        return self.req.name

    def body_as(self, cls: type[T]) -> T:
        """The body, checked to be a `cls` (e.g. `req.body_as(VringState)`)."""
        if not isinstance(self.body, cls):
            raise TypeError(f"{self.req.name} body is {type(self.body).__name__}, not {cls.__name__}")
        return self.body

    @property
    def u64(self) -> int:
        return self.body_as(int)


@dataclasses.dataclass(frozen=True)
class Reply:
    """One validated back-end reply, as seen by a front-end."""

    req: Req
    flags: int
    body: Body
    raw: bytes
    fds: Fds
    ack: bool = False  # a REPLY_ACK status rather than the request's own reply body

    @property
    def name(self) -> str:
        return self.req.name

    def body_as(self, cls: type[T]) -> T:
        if not isinstance(self.body, cls):
            raise TypeError(f"{self.req.name} reply is {type(self.body).__name__}, not {cls.__name__}")
        return self.body

    @property
    def u64(self) -> int:
        return self.body_as(int)


class _Inbox:
    """Buffered stream bytes plus fd batches keyed by the stream offset of the bytes they came with."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.base = 0  # stream offset of buf[0]
        self.batches: deque[tuple[int, list[int]]] = deque()

    def feed(self, data: bytes, fds: Sequence[int]) -> None:
        if fds:
            # fds sent with no bytes (cannot happen on SOCK_STREAM) belong to the next byte's message
            self.batches.append((self.base + len(self.buf), list(fds)))
        self.buf += data

    @property
    def held_fds(self) -> int:
        return sum(len(b) for _, b in self.batches)

    def pop(self, n: int) -> tuple[bytes, list[int]]:
        """The first n bytes and every fd that arrived with any of them."""
        end = self.base + n
        fds: list[int] = []
        while self.batches and self.batches[0][0] < end:
            fds.extend(self.batches.popleft()[1])
        data = bytes(self.buf[:n])
        del self.buf[:n]
        self.base = end
        return data, fds

    def close_all(self) -> None:
        while self.batches:
            for fd in self.batches.popleft()[1]:
                _close_quietly(fd)
        self.base += len(self.buf)
        self.buf.clear()


def _fd_count_error(rule: Fd, body: Body, nfds: int) -> str | None:
    if rule is Fd.NONE:
        expected: tuple[int, ...] = (0,)
    elif rule is Fd.ONE:
        expected = (1,)
    elif rule is Fd.ZERO_OR_ONE:
        expected = (0, 1)
    elif rule is Fd.PER_REGION:
        assert isinstance(body, MemoryTable)
        expected = (len(body.regions),)
    elif rule is Fd.VRING_FILE:
        assert isinstance(body, VringFile)
        expected = (0,) if body.nofd else (1,)
    else:  # Fd.DEVICE_STATE_REPLY
        assert isinstance(body, int)
        expected = (0,) if body & DEVICE_STATE_NOFD else (1,)
    if nfds in expected:
        return None
    want = " or ".join(str(e) for e in expected)
    return f"carries {nfds} fds, expected {want}"


class _Base:
    def __init__(self, max_body: int) -> None:
        if max_body < 0:
            raise ValueError("max_body must be >= 0")
        self.max_body = max_body
        self._inbox = _Inbox()
        self._dead: ProtocolError | None = None
        self.acked_features: int | None = None
        self.acked_protocol_features = 0
        self.postcopy_listening = False

    @property
    def dead(self) -> bool:
        return self._dead is not None

    def negotiated(self, feature: ProtocolF) -> bool:
        return bool(self.acked_protocol_features & feature)

    @property
    def held_fds(self) -> int:
        """Fds received but not yet handed out with a message."""
        return self._inbox.held_fds

    def has_partial(self) -> bool:
        """Bytes of a message that is not complete yet are buffered (the server bounds how long it waits)."""
        return len(self._inbox.buf) > 0

    def missing_bytes(self) -> int:
        """How many more bytes complete the message being buffered (a header first, then its body). Reading
        exactly this much keeps every recvmsg inside one message, so fds arrive with their own message."""
        buf = self._inbox.buf
        if len(buf) < HEADER_SIZE:
            return HEADER_SIZE - len(buf)
        size = int.from_bytes(buf[8:12], "little")
        return max(HEADER_SIZE + size - len(buf), 1)

    def describe(self, msg: Request | Reply) -> dict[str, Any]:
        return describe(msg)

    def abort(self) -> None:
        """Tear down on any path (never raises): close every fd the connection still holds; it is dead."""
        self._inbox.close_all()
        if self._dead is None:
            self._dead = ProtocolError(None, "connection aborted")

    def _fail(self, request: str | None, reason: str, fds: Sequence[int] = ()) -> ProtocolError:
        for fd in fds:
            _close_quietly(fd)
        self._inbox.close_all()
        err = ProtocolError(request, reason)
        self._dead = err
        return err

    def _check_alive(self, fds: Sequence[int] = ()) -> None:
        if self._dead is not None:
            for fd in fds:
                _close_quietly(fd)
            raise ProtocolError(self._dead.request, f"connection is dead after: {self._dead.reason}")

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Buffer bytes from the peer. `fds` (from the same recvmsg) now belong to the connection."""
        self._check_alive(fds)
        self._inbox.feed(data, fds)
        if self._inbox.held_fds > MAX_HELD_FDS:
            raise self._fail(None, f"peer sent more than {MAX_HELD_FDS} unprocessed fds")
        if len(self._inbox.buf) > MAX_BUFFERED_MESSAGES * (HEADER_SIZE + self.max_body):
            raise self._fail(
                None, f"peer sent more than {len(self._inbox.buf)} bytes of unprocessed messages"
            )

    def close(self) -> None:
        """The peer closed the stream (or we are tearing down): release every held fd. A message cut short
        by the end of the stream is a ProtocolError."""
        if self._dead is not None:
            self._inbox.close_all()
            return
        partial = len(self._inbox.buf)
        name: str | None = None
        if partial >= 4:
            name = req_name(int.from_bytes(self._inbox.buf[:4], "little"))
        self._inbox.close_all()
        if partial:
            raise self._fail(name, f"stream ended inside a message ({partial} bytes buffered)")
        self._dead = ProtocolError(None, "connection closed")


class BackendConnection(_Base):
    """The back-end side: requests in, replies out."""

    def __init__(
        self,
        *,
        max_body: int = 4096,
        offered_features: int | None = None,
        offered_protocol_features: int | None = None,
    ) -> None:
        super().__init__(max_body)
        # what this back-end offers; GET_FEATURES / GET_PROTOCOL_FEATURES replies update them too
        self.offered_features = offered_features
        self.offered_protocol_features = offered_protocol_features
        self._outstanding: Request | None = None
        self._seq = 0

    @property
    def protocol_features_enabled(self) -> bool:
        """VHOST_USER_F_PROTOCOL_FEATURES (bit 30) was acked by SET_FEATURES."""
        return self.acked_features is not None and bool(self.acked_features & VHOST_USER_F_PROTOCOL_FEATURES)

    @property
    def outstanding(self) -> Request | None:
        return self._outstanding

    def _gate_error(self, req: Req, spec: MsgSpec) -> str | None:
        offered = self.offered_features or 0
        if (
            req in (Req.GET_PROTOCOL_FEATURES, Req.SET_PROTOCOL_FEATURES)
            and not offered & VHOST_USER_F_PROTOCOL_FEATURES
        ):
            return "PROTOCOL_FEATURES (feature bit 30) was not offered"
        if spec.gate is not None and not self.negotiated(spec.gate):
            return f"protocol feature {spec.gate.name} was not negotiated"
        if req is Req.IOTLB_MSG and not (self.acked_features or 0) & NetF.ACCESS_PLATFORM:
            return "IOMMU_PLATFORM (ACCESS_PLATFORM) was not negotiated"
        return None

    def _semantic_error(self, req: Req, body: Body) -> str | None:
        if req is Req.SET_PROTOCOL_FEATURES:
            assert isinstance(body, int)
            if self.offered_protocol_features is not None and body & ~self.offered_protocol_features:
                extra = body & ~self.offered_protocol_features
                return f"acks protocol features that were not offered: {describe_features(extra, ProtocolF)}"
            needed = ProtocolF.BACKEND_REQ | ProtocolF.REPLY_ACK
            if body & ProtocolF.INBAND_NOTIFICATIONS and (body & needed) != needed:
                # vhost-user.rst: the back-end should close the connection in this case
                return "INBAND_NOTIFICATIONS without BACKEND_REQ and REPLY_ACK"
        if req is Req.SET_FEATURES:
            assert isinstance(body, int)
            if self.offered_features is not None and body & ~self.offered_features:
                return (
                    f"acks features that were not offered: {describe_features(body & ~self.offered_features)}"
                )
        return None

    def next_request(self) -> Request | None:
        """The next complete, validated request, or None if more data is needed."""
        self._check_alive()
        if self._outstanding is not None:
            raise RuntimeError(f"{self._outstanding.name} was not completed; call complete() first")
        buf = self._inbox.buf
        if len(buf) < HEADER_SIZE:
            return None
        request, flags, size = parse_header(bytes(buf[:HEADER_SIZE]))
        name = req_name(request)
        try:
            req = Req(request)
        except ValueError:
            raise self._fail(name, f"unknown request number {request}") from None
        if flags & VERSION_MASK != VERSION:
            raise self._fail(name, f"bad version bits in flags {flags:#x}")
        if flags & FLAG_REPLY:
            raise self._fail(name, f"request carries the REPLY flag (flags {flags:#x})")
        if flags & ~KNOWN_FLAGS:
            raise self._fail(name, f"unknown flag bits {flags & ~KNOWN_FLAGS:#x}")
        if size > self.max_body:
            raise self._fail(name, f"payload size {size} exceeds the limit of {self.max_body}")
        spec = SPECS[req]
        # reject what the header already shows, so a bad message never waits for a body that may not come
        err = spec.request.header_size_error(size) or self._gate_error(req, spec)
        if err is not None:
            raise self._fail(name, err)
        if len(buf) < HEADER_SIZE + size:
            return None
        raw, fds = self._inbox.pop(HEADER_SIZE + size)
        try:
            body = spec.request.decode(raw[HEADER_SIZE:])
        except WireError as e:
            raise self._fail(name, e.reason, fds) from None
        err = _fd_count_error(spec.fds, body, len(fds)) or self._semantic_error(req, body)
        if err is not None:
            raise self._fail(name, err, fds)
        if req is Req.REM_MEM_REG and fds:
            # vhost-user.rst: accept the fd QEMU attaches, close it without using it
            for fd in fds:
                _close_quietly(fd)
            fds = []
        self._seq += 1
        r = Request(req, flags, bool(flags & FLAG_NEED_REPLY), body, raw, Fds(fds), self._seq)
        self._outstanding = r
        return r

    def reply_expected(self, request: Request) -> bool:
        """Whether `complete(request)` will produce bytes (for a successful completion without a body)."""
        kind = SPECS[request.req].reply_kind
        if kind is ReplyKind.ALWAYS:
            return True
        if kind is ReplyKind.LOG_SHMFD and self.negotiated(ProtocolF.LOG_SHMFD):
            return True
        return request.need_reply and self.negotiated(ProtocolF.REPLY_ACK)

    def complete(self, request: Request, reply: Body = None, *, error: int = 0) -> bytes:
        """The bytes answering `request` (maybe b""). Requests with a reply body need `reply`; status-only
        replies take `error` (0 = success). Fds the handler did not take are closed here. Fds that a reply
        carries (GET_INFLIGHT_FD, POSTCOPY_ADVISE, SET_DEVICE_STATE_FD) are sent by the caller with the bytes.
        """
        if self._outstanding is None or request is not self._outstanding:
            raise RuntimeError(
                f"{request.name} #{request.seq} is not the outstanding request (completed twice?)"
            )
        if not 0 <= error <= (1 << 64) - 1:
            raise ValueError(f"error {error} does not fit a u64")
        spec = SPECS[request.req]
        if error == 0:
            self._commit(request, reply)
        out = self._reply_bytes(request, spec, reply, error)
        self._outstanding = None
        request.fds.close_rest()
        return out

    def _reply_bytes(self, request: Request, spec: MsgSpec, reply: Body, error: int) -> bytes:
        req = request.req
        kind = spec.reply_kind
        if kind is ReplyKind.ALWAYS:
            assert spec.reply is not None
            if spec.status_reply and reply is None:
                reply = error | DEVICE_STATE_NOFD if req is Req.SET_DEVICE_STATE_FD and error else error
            elif error and req is Req.GET_CONFIG:
                reply = None  # an empty GET_CONFIG reply is the protocol's error signal
            elif error and reply is None:
                # the reply has no way to say "failed" and a made-up body would lie to the front-end:
                # vhost-user.rst lets a back-end close the connection on such errors
                request.fds.close_rest()
                self._outstanding = None
                raise self._fail(
                    req.name, f"back-end failed the request (error {error}) and its reply cannot say so"
                )
            elif reply is None and not spec.reply.nullable:
                raise ValueError(f"{req.name} needs a reply body")
            return self._encode_reply(req, spec.reply.encode(reply))
        if kind is ReplyKind.LOG_SHMFD and self.negotiated(ProtocolF.LOG_SHMFD):
            # QEMU blocks reading this reply whether or not it set NEED_REPLY
            return self._encode_reply(req, U64.encode(error if reply is None else reply))
        if kind is ReplyKind.POSTCOPY and self.postcopy_listening and reply is not None and not error:
            assert spec.reply is not None
            return self._encode_reply(req, spec.reply.encode(reply))
        if reply is not None:
            raise ValueError(f"{req.name} has no reply body (got {reply!r})")
        if request.need_reply and self.negotiated(ProtocolF.REPLY_ACK):
            return self._encode_reply(req, U64.encode(error))
        return b""

    @staticmethod
    def _encode_reply(req: Req, payload: bytes) -> bytes:
        return build_header(int(req), REPLY_FLAGS, len(payload)) + payload

    def _commit(self, request: Request, reply: Body) -> None:
        req, body = request.req, request.body
        if req is Req.GET_FEATURES and isinstance(reply, int):
            self.offered_features = reply
        elif req is Req.GET_PROTOCOL_FEATURES and isinstance(reply, int):
            self.offered_protocol_features = reply
        elif req is Req.SET_FEATURES and isinstance(body, int):
            self.acked_features = body
        elif req is Req.SET_PROTOCOL_FEATURES and isinstance(body, int):
            self.acked_protocol_features = body
        elif req is Req.POSTCOPY_LISTEN:
            self.postcopy_listening = True
        elif req is Req.POSTCOPY_END:
            self.postcopy_listening = False

    def close(self) -> None:
        if self._outstanding is not None:
            self._outstanding.fds.close_rest()
        super().close()

    def abort(self) -> None:
        if self._outstanding is not None:
            self._outstanding.fds.close_rest()
        super().abort()


class FrontendConnection(_Base):
    """The front-end side (test front-end, benchmarks): requests out, replies in, same rules."""

    def __init__(self, *, max_body: int = 4096) -> None:
        super().__init__(max_body)
        self._expected: deque[tuple[Req, bool]] = deque()  # (request, answered by an ack u64)

    def expects_reply(self, req: Req, need_reply: bool = False) -> bool:
        return self._reply_mode(req, need_reply) is not None

    def _reply_mode(self, req: Req, need_reply: bool) -> bool | None:
        """None: no reply; False: the request's own reply body; True: a u64 ack."""
        kind = SPECS[req].reply_kind
        if kind is ReplyKind.ALWAYS:
            return False
        if kind is ReplyKind.LOG_SHMFD and self.negotiated(ProtocolF.LOG_SHMFD):
            return False
        if kind is ReplyKind.POSTCOPY and self.postcopy_listening:
            return False
        if need_reply and self.negotiated(ProtocolF.REPLY_ACK):
            return True
        return None

    @property
    def pending_replies(self) -> int:
        return len(self._expected)

    def request(
        self, req: Req, body: Body = None, *, fds: Sequence[int] = (), need_reply: bool = False
    ) -> bytes:
        """Bytes of one request; the caller sends `fds` with them (they stay the caller's)."""
        self._check_alive()
        spec = SPECS[req]
        payload = spec.request.encode(body)
        err = _fd_count_error(spec.fds, body, len(fds))
        if err is not None:
            raise ValueError(f"{req.name} {err}")
        flags = REQUEST_FLAGS | (FLAG_NEED_REPLY if need_reply else 0)
        if req is Req.SET_PROTOCOL_FEATURES and isinstance(body, int):
            # the back-end applies it before answering, so its own ack (if any) follows the new rules
            self.acked_protocol_features = body
        elif req is Req.SET_FEATURES and isinstance(body, int):
            self.acked_features = body
        elif req is Req.POSTCOPY_END:
            self.postcopy_listening = False
        mode = self._reply_mode(req, need_reply)
        if req is Req.POSTCOPY_LISTEN:
            self.postcopy_listening = True
        if mode is not None:
            self._expected.append((req, mode))
        return build_header(int(req), flags, len(payload)) + payload

    def next_reply(self) -> Reply | None:
        self._check_alive()
        buf = self._inbox.buf
        if len(buf) < HEADER_SIZE:
            return None
        request, flags, size = parse_header(bytes(buf[:HEADER_SIZE]))
        name = req_name(request)
        if not self._expected:
            raise self._fail(name, "reply received but no reply is pending")
        want, ack = self._expected[0]
        if request != want:
            raise self._fail(name, f"reply for {name} while waiting for {want.name}")
        if flags != REPLY_FLAGS:
            raise self._fail(name, f"reply flags {flags:#x}, must be exactly {REPLY_FLAGS:#x}")
        if size > self.max_body:
            raise self._fail(name, f"payload size {size} exceeds the limit of {self.max_body}")
        spec = SPECS[want]
        codec = U64 if ack or spec.reply is None else spec.reply
        err = codec.header_size_error(size)
        if err is not None:
            raise self._fail(name, err)
        if len(buf) < HEADER_SIZE + size:
            return None
        raw, fds = self._inbox.pop(HEADER_SIZE + size)
        try:
            body = codec.decode(raw[HEADER_SIZE:])
        except WireError as e:
            raise self._fail(name, e.reason, fds) from None
        err = _fd_count_error(Fd.NONE if ack else spec.reply_fds, body, len(fds))
        if err is not None:
            raise self._fail(name, err, fds)
        self._expected.popleft()
        return Reply(want, flags, body, raw, Fds(fds), ack)


# --- debug description -------------------------------------------------------------------------------------

_HEX_FIELDS = {
    "guest_phys_addr",
    "memory_size",
    "userspace_addr",
    "mmap_offset",
    "mmap_size",
    "desc_user_addr",
    "used_user_addr",
    "avail_user_addr",
    "log_guest_addr",
    "iova",
    "size",
    "uaddr",
    "offset",
    "u64",
}


def _plain(key: str, value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, int) and key in _HEX_FIELDS:
        return hex(value)
    return value


def _body_fields(req: Req, body: Body) -> dict[str, Any]:
    if body is None:
        return {}
    if isinstance(body, int):
        if req in (Req.GET_FEATURES, Req.SET_FEATURES):
            return {"features": hex(body), "names": describe_features(body)}
        if req in (Req.GET_PROTOCOL_FEATURES, Req.SET_PROTOCOL_FEATURES):
            return {"protocol_features": hex(body), "names": describe_features(body, ProtocolF)}
        return {"u64": body}
    if isinstance(body, MemoryTable):
        return {
            "nregions": len(body.regions),
            "regions": [{k: _plain(k, v) for k, v in dataclasses.asdict(r).items()} for r in body.regions],
        }
    if isinstance(body, SingleRegion):
        return {k: _plain(k, v) for k, v in dataclasses.asdict(body.region).items()}
    if isinstance(body, Rarp):
        return {"mac": ":".join(f"{b:02x}" for b in body.mac)}
    if isinstance(body, ConfigSpace):
        return {
            "offset": body.offset,
            "flags": body.flags,
            "size": len(body.payload),
            "payload": body.payload.hex(),
        }
    if isinstance(body, Opaque):
        return {"opaque_len": len(body.data)}
    if isinstance(
        body,
        VringState
        | VringAddr
        | VringFile
        | LogArea
        | IotlbMsg
        | VringArea
        | Inflight
        | SharedObject
        | DeviceStateTransfer,
    ):
        return {k: _plain(k, v) for k, v in dataclasses.asdict(body).items()}
    return {"body": repr(body)}


def describe(msg: Request | Reply) -> dict[str, Any]:
    """Decoded fields of a request or reply for debug logging (JSON-friendly values)."""
    d: dict[str, Any] = {
        "request": msg.req.name,
        "flags": hex(msg.flags),
        "payload_len": len(msg.raw) - HEADER_SIZE,
        "nfds": len(msg.fds),
    }
    if isinstance(msg, Request):
        d["need_reply"] = msg.need_reply
        d["seq"] = msg.seq
    else:
        d["reply"] = True
        if msg.ack:
            d["ack"] = True
    d.update(_body_fields(msg.req, msg.body))
    return d
