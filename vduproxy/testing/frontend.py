"""A vhost-user *front-end* for tests and benchmarks: trio, a unix socket, SCM_RIGHTS.

The protocol rules (encoding, which requests get replies, fd counts) come from the sans-IO
`FrontendConnection`; this module only moves bytes and fds and knows the *orders* real front-ends send
messages in. Those sequences replay what the test bed recorded (see /work/shared/testbed/*/REPORT.md):

- QEMU 7.2 (`qemu72_connect`, `qemu72_start`, `qemu72_stop`, `migration_start`, `reconnect`): per queue pair a
  full back-end init (GET_FEATURES, protocol features, GET_QUEUE_NUM, SET_OWNER, GET_FEATURES, per vq
  SET_VRING_CALL/ERR with masked-notifier eventfds), then SET_VRING_ENABLE. At start, per pair:
  SET_FEATURES (+ FEATURES_OK status when STATUS was negotiated), SET_MEM_TABLE (pair 0 only), per vq
  NUM/BASE/ADDR/KICK/CALL, DRIVER_OK status after the last pair, SET_VRING_ENABLE. QEMU sends fds without
  an empty cmsg when it has none.
- DPDK 22.11 virtio-user (`dpdk_start`, `dpdk_stop`): SET_OWNER first, SET_VRING_CALL before SET_FEATURES,
  status with NEED_REPLY, every message with an SCM_RIGHTS cmsg even without fds (`empty_cmsg=True`).
  virtio-user uses IOVA-as-VA, so give it a `GuestMemory` whose gpa_base equals its uva_base.

Fd ownership: fds passed to `request` stay the caller's (the kernel duplicates them on send). Fds that come
back in replies are closed unless the caller takes them from `Reply.fds`. The front-end owns what it creates
(masked notifiers, the back-end channel, the dirty log) and closes them in `aclose`.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import mmap
import os
import socket
from collections.abc import Sequence
from types import TracebackType

import trio

from ..log import get_logger
from ..vhost_user.connection import FrontendConnection, ProtocolError, Reply
from ..vhost_user.wire import (
    VHOST_VRING_F_LOG,
    Body,
    DeviceStateTransfer,
    LogArea,
    MemoryTable,
    MemRegion,
    ProtocolF,
    Req,
    VringAddr,
    VringFile,
    VringState,
)
from ..virtio import VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, Status
from .guest import GuestMemory, VirtioNetDriver, Vq

log = get_logger(__name__)

MAX_FDS_PER_MESSAGE = 8  # VHOST_MEMORY_BASELINE_NREGIONS: no reply carries more
_RECV_SIZE = 65536

# What QEMU 7.2's vhost-user net acks of the back-end's protocol features: VHOST_USER_PROTOCOL_FEATURE_MASK
# minus what net does not use (CONFIG, INFLIGHT_SHMFD, PAGEFAULT without postcopy, crypto, in-band notify).
QEMU72_PROTOCOL_FEATURES = (
    ProtocolF.MQ
    | ProtocolF.LOG_SHMFD
    | ProtocolF.RARP
    | ProtocolF.REPLY_ACK
    | ProtocolF.NET_MTU
    | ProtocolF.BACKEND_REQ
    | ProtocolF.CROSS_ENDIAN
    | ProtocolF.BACKEND_SEND_FD
    | ProtocolF.HOST_NOTIFIER
    | ProtocolF.RESET_DEVICE
    | ProtocolF.CONFIGURE_MEM_SLOTS
    | ProtocolF.STATUS
)
# What DPDK 22.11 virtio-user acks (0x10009 in the test bed, plus CONFIGURE_MEM_SLOTS it never used there).
DPDK_PROTOCOL_FEATURES = ProtocolF.MQ | ProtocolF.REPLY_ACK | ProtocolF.STATUS

STATUS_DRIVER = Status.ACKNOWLEDGE | Status.DRIVER


class FrontendError(Exception):
    """The back-end did something a front-end cannot go on with (closed, refused, never answered)."""


class BackendRejected(FrontendError):
    """A REPLY_ACK / status reply carried a non-zero status."""

    def __init__(self, req: Req, status: int) -> None:
        super().__init__(f"{req.name} rejected by the back-end (status {status:#x})")
        self.req = req
        self.status = status


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def dirty_log_size(mem: GuestMemory) -> int:
    """Bytes of dirty log covering every GPA of `mem` (1 bit per 4 KiB page), in whole u64s like QEMU."""
    end = max(r.gpa + r.size for r in mem.regions)
    pages = -(-end // 4096)
    return -(-pages // 64) * 8


@dataclasses.dataclass
class DirtyLog:
    """The front-end's copy of the SET_LOG_BASE memfd: read the bits the back-end set."""

    fd: int
    size: int
    mm: mmap.mmap

    def dirty_pages(self) -> set[int]:
        """Page numbers (gpa >> 12) marked dirty."""
        out: set[int] = set()
        data = self.mm[: self.size]
        for i, byte in enumerate(data):
            if byte:
                out.update(i * 8 + b for b in range(8) if byte >> b & 1)
        return out

    def clear(self) -> None:
        self.mm[: self.size] = bytes(self.size)

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


class VhostUserFrontend:
    """One vhost-user connection, front-end side. Create with `connect(path)` or from `serve(path)`."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        *,
        empty_cmsg: bool = False,
        reply_timeout: float | None = 30.0,
        path: str | None = None,
        listener: FrontendListener | None = None,
    ) -> None:
        self.sock = sock
        self.conn = FrontendConnection()
        self.empty_cmsg = empty_cmsg
        self.reply_timeout = reply_timeout
        self.path = path
        self.listener = listener
        self.offered_features: int | None = None
        self.offered_protocol_features = 0
        self.queue_num: int | None = None
        self.max_mem_slots: int | None = None
        self.pairs = 1
        self.mtu: int | None = None
        self.sent: list[Req] = []  # every request, in order: tests compare it with what the proxy saw
        self.log: DirtyLog | None = None
        self._owned: list[int] = []  # masked notifiers, err fds, back-end channel

    # connection ---------------------------------------------------------------------------------------------

    @classmethod
    async def connect(cls, path: str, **kw: object) -> VhostUserFrontend:
        """Front-end as client (QEMU's `-chardev socket,path=…`): connect to a listening back-end."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock, path=path, **kw)  # type: ignore[arg-type]

    @classmethod
    async def serve(cls, path: str, **kw: object) -> FrontendListener:
        """Front-end as server (QEMU's `server=on`; for the proxy's --client): listen now, accept() later."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(path)
            sock.listen(4)
        except BaseException:
            sock.close()
            raise
        return FrontendListener(sock, path, kw)

    async def aclose(self) -> None:
        self.sock.close()
        with contextlib.suppress(ProtocolError):
            self.conn.close()
        _close_all(self._owned)
        self._owned.clear()
        if self.log is not None:
            self.log.close()
            self.log = None
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> VhostUserFrontend:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # messages -----------------------------------------------------------------------------------------------

    def negotiated(self, feature: ProtocolF) -> bool:
        return self.conn.negotiated(feature)

    async def send(
        self, req: Req, body: Body = None, *, fds: Sequence[int] = (), need_reply: bool = False
    ) -> None:
        """Send one request without waiting for its reply (see `receive_reply`)."""
        data = self.conn.request(req, body, fds=fds, need_reply=need_reply)
        self.sent.append(req)
        log.debug("frontend send", request=req.name, nfds=len(fds), need_reply=need_reply)
        anc = []
        if fds or self.empty_cmsg:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        view = memoryview(data)
        try:
            while view:
                # MSG_NOSIGNAL: a back-end that died must be an error here, not SIGPIPE for the test process
                n = await self.sock.sendmsg([view], anc, socket.MSG_NOSIGNAL)
                view = view[n:]
                anc = []  # the fds went with the first byte
        except OSError as e:
            raise FrontendError(f"the back-end closed the connection ({req.name}: {e.strerror})") from e

    async def receive_reply(self) -> Reply:
        """The next reply; raises FrontendError when the back-end closes or breaks the protocol."""
        with trio.move_on_after(
            self.reply_timeout if self.reply_timeout is not None else float("inf")
        ) as scope:
            while True:
                try:
                    reply = self.conn.next_reply()
                except ProtocolError as e:
                    raise FrontendError(f"bad reply from the back-end: {e}") from e
                if reply is not None:
                    return reply
                await self._receive_some()
        assert scope.cancelled_caught
        raise FrontendError(f"no reply within {self.reply_timeout} s")

    async def _receive_some(self) -> None:
        fd_space = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4)
        try:
            data, anc, flags, _ = await self.sock.recvmsg(_RECV_SIZE, fd_space, socket.MSG_CMSG_CLOEXEC)
        except OSError as e:
            raise FrontendError(f"the back-end closed the connection ({e.strerror})") from e
        fds: list[int] = []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
        if flags & socket.MSG_CTRUNC:
            _close_all(fds)
            raise FrontendError("the back-end sent more fds than any reply carries")
        if not data:
            _close_all(fds)
            with contextlib.suppress(ProtocolError):
                self.conn.close()
            raise FrontendError("the back-end closed the connection")
        try:
            self.conn.receive_data(data, fds)
        except ProtocolError as e:
            raise FrontendError(f"bad data from the back-end: {e}") from e

    async def request(
        self, req: Req, body: Body = None, *, fds: Sequence[int] = (), need_reply: bool = False
    ) -> Reply | None:
        """Send and, if the protocol says one comes, wait for the reply. A non-zero ack raises
        BackendRejected; reply fds nobody takes are closed."""
        expects = self.conn.expects_reply(req, need_reply)
        await self.send(req, body, fds=fds, need_reply=need_reply)
        if not expects:
            return None
        reply = await self.receive_reply()
        if reply.ack and reply.u64 != 0:
            reply.fds.close_rest()
            raise BackendRejected(req, reply.u64)
        return reply

    async def get_u64(self, req: Req) -> int:
        reply = await self.request(req)
        assert reply is not None
        reply.fds.close_rest()
        return reply.u64

    async def set_u64(self, req: Req, value: int, *, need_reply: bool = False) -> None:
        reply = await self.request(req, value, need_reply=need_reply)
        if reply is not None:
            reply.fds.close_rest()
            if reply.u64 != 0:  # status replies without REPLY_ACK (SET_LOG_BASE under LOG_SHMFD)
                raise BackendRejected(req, reply.u64)

    async def get_vring_base(self, index: int) -> int:
        reply = await self.request(Req.GET_VRING_BASE, VringState(index, 0))
        assert reply is not None
        return reply.body_as(VringState).num

    async def add_status(self, bits: int, *, need_reply: bool = False) -> None:
        """QEMU's vhost_user_add_status: GET_STATUS, then SET_STATUS only if a bit is missing."""
        status = await self.get_u64(Req.GET_STATUS)
        if status & bits != bits:
            await self.set_u64(Req.SET_STATUS, status | bits, need_reply=need_reply)

    async def set_mem_table(self, mem: GuestMemory, *, need_reply: bool = False) -> None:
        regions = tuple(MemRegion(r.gpa, r.size, r.uva, r.mmap_offset) for r in mem.regions)
        reply = await self.request(
            Req.SET_MEM_TABLE, MemoryTable(regions), fds=[mem.fd] * len(regions), need_reply=need_reply
        )
        if reply is not None:
            reply.fds.close_rest()

    async def set_vring_addr(self, vq: Vq, *, log: bool = False) -> None:
        # QEMU fills log_guest_addr (the used ring's GPA) whether or not logging is on
        addr = VringAddr(
            vq.index, VHOST_VRING_F_LOG if log else 0, vq.desc_uva, vq.used_uva, vq.avail_uva, vq.used_gpa
        )
        await self.request(Req.SET_VRING_ADDR, addr)

    async def set_vring_fd(self, req: Req, index: int, fd: int | None) -> None:
        await self.request(req, VringFile(index, nofd=fd is None), fds=[] if fd is None else [fd])

    async def set_vring_enable(self, index: int, enable: bool) -> None:
        await self.request(Req.SET_VRING_ENABLE, VringState(index, int(enable)))

    async def setup_vq(
        self, vq: Vq, base: int, *, kick: bool = True, call: bool = True, log: bool = False
    ) -> None:
        await self.request(Req.SET_VRING_NUM, VringState(vq.index, vq.num))
        await self.request(Req.SET_VRING_BASE, VringState(vq.index, base))
        await self.set_vring_addr(vq, log=log)
        if kick:
            await self.set_vring_fd(Req.SET_VRING_KICK, vq.index, vq.kick_fd)
        if call:
            await self.set_vring_fd(Req.SET_VRING_CALL, vq.index, vq.call_fd)

    async def set_features(self, features: int) -> None:
        """SET_FEATURES the way QEMU 7.2 does it: with LOG_ALL it waits for the back-end (NEED_REPLY, or a
        GET_FEATURES round trip without REPLY_ACK), and under STATUS it adds FEATURES_OK."""
        logging_on = bool(features & VHOST_F_LOG_ALL)
        await self.set_u64(Req.SET_FEATURES, features, need_reply=logging_on)
        if logging_on and not self.negotiated(ProtocolF.REPLY_ACK):
            await self.get_u64(Req.GET_FEATURES)
        if self.negotiated(ProtocolF.STATUS):
            await self.add_status(Status.FEATURES_OK)

    # QEMU 7.2 -----------------------------------------------------------------------------------------------

    def _wire_features(self, driver: VirtioNetDriver, extra: int = 0) -> int:
        assert self.offered_features is not None, "connect first"
        proto = self.offered_features & VHOST_USER_F_PROTOCOL_FEATURES
        return driver.features | proto | extra

    async def qemu72_connect(self, pairs: int = 1, *, extra_protocol: int = 0) -> None:
        """The init QEMU 7.2 runs when the socket connects (vhost_user_start → vhost_dev_init per pair).
        `extra_protocol`: protocol features a newer QEMU would also ack (e.g. DEVICE_STATE, QEMU >= 8.2)."""
        self.pairs = pairs
        for pair in range(pairs):
            offered = self.offered_features = await self.get_u64(Req.GET_FEATURES)
            if offered & VHOST_USER_F_PROTOCOL_FEATURES:
                self.offered_protocol_features = await self.get_u64(Req.GET_PROTOCOL_FEATURES)
                await self.set_u64(
                    Req.SET_PROTOCOL_FEATURES,
                    self.offered_protocol_features & (QEMU72_PROTOCOL_FEATURES | extra_protocol),
                )
                if self.negotiated(ProtocolF.MQ):
                    self.queue_num = await self.get_u64(Req.GET_QUEUE_NUM)
                    if self.queue_num < pairs:
                        raise FrontendError(f"back-end has {self.queue_num} queue pairs, {pairs} needed")
                if self.negotiated(ProtocolF.CONFIGURE_MEM_SLOTS):
                    self.max_mem_slots = await self.get_u64(Req.GET_MAX_MEM_SLOTS)
                if pair == 0 and self.negotiated(ProtocolF.BACKEND_REQ):
                    await self._set_backend_req_fd()
            await self.request(Req.SET_OWNER)
            await self.get_u64(Req.GET_FEATURES)
            for index in (2 * pair, 2 * pair + 1):
                for req in (Req.SET_VRING_CALL, Req.SET_VRING_ERR):
                    fd = _eventfd()
                    self._owned.append(fd)
                    await self.set_vring_fd(req, index, fd)
        if (self.offered_features or 0) & VHOST_USER_F_PROTOCOL_FEATURES:
            # virtio-net realize: pair 0 attached, the others detached until the guest asks for them
            for pair in range(pairs):
                for index in (2 * pair, 2 * pair + 1):
                    await self.set_vring_enable(index, pair == 0)

    async def _set_backend_req_fd(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._owned.append(ours.detach())
        try:
            reply = await self.request(
                Req.SET_BACKEND_REQ_FD, fds=[theirs.fileno()], need_reply=self.negotiated(ProtocolF.REPLY_ACK)
            )
        finally:
            theirs.close()
        if reply is not None:
            reply.fds.close_rest()

    async def qemu72_start(
        self, driver: VirtioNetDriver, *, bases: dict[int, int] | None = None, mtu: int | None = None
    ) -> None:
        """What QEMU 7.2 sends when the guest sets DRIVER_OK (vhost_net_start). `bases` default to each ring's
        used index, which is what QEMU restores last_avail to."""
        assert self.offered_features is not None, "qemu72_connect first"
        driver.negotiate(self.offered_features)
        need_ack = self.negotiated(ProtocolF.REPLY_ACK)
        if mtu is not None and self.negotiated(ProtocolF.NET_MTU):
            self.mtu = mtu
            await self.set_u64(Req.NET_SET_MTU, mtu, need_reply=need_ack)
        for pair in range(driver.pairs):
            await self.set_features(self._wire_features(driver))
            if pair == 0:
                await self.set_mem_table(driver.mem, need_reply=need_ack)
            for vq in (driver.rx(pair), driver.tx(pair)):
                await self.setup_vq(vq, vq.used_idx if bases is None else bases[vq.index])
            if pair == driver.pairs - 1 and self.negotiated(ProtocolF.STATUS):
                await self.add_status(STATUS_DRIVER | Status.DRIVER_OK)
            if self.offered_features & VHOST_USER_F_PROTOCOL_FEATURES:
                for vq in (driver.rx(pair), driver.tx(pair)):
                    await self.set_vring_enable(vq.index, True)

    async def qemu72_stop(self, driver: VirtioNetDriver) -> dict[int, int]:
        """vhost_net_stop: SET_STATUS 0 (last pair, under STATUS), GET_VRING_BASE per ring; returns bases."""
        bases: dict[int, int] = {}
        for pair in range(driver.pairs):
            if pair == driver.pairs - 1 and self.negotiated(ProtocolF.STATUS):
                await self.set_u64(Req.SET_STATUS, 0)
            for vq in (driver.rx(pair), driver.tx(pair)):
                bases[vq.index] = await self.get_vring_base(vq.index)
        return bases

    async def migration_start(self, driver: VirtioNetDriver, log_size: int | None = None) -> DirtyLog:
        """The source side when migration starts: per pair SET_LOG_BASE (a shared memfd), SET_FEATURES with
        LOG_ALL, SET_VRING_ADDR with VHOST_VRING_F_LOG. Returns the log to read dirty pages from."""
        size = dirty_log_size(driver.mem) if log_size is None else log_size
        if self.log is None:
            fd = os.memfd_create("vhost-log", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except BaseException:
                os.close(fd)
                raise
            self.log = DirtyLog(fd, size, mm)
        for pair in range(driver.pairs):
            reply = await self.request(Req.SET_LOG_BASE, LogArea(self.log.size, 0), fds=[self.log.fd])
            if reply is not None:
                reply.fds.close_rest()
                if reply.u64 != 0:
                    raise BackendRejected(Req.SET_LOG_BASE, reply.u64)
            await self.set_features(self._wire_features(driver, VHOST_F_LOG_ALL))
            for vq in (driver.rx(pair), driver.tx(pair)):
                await self.set_vring_addr(vq, log=True)
        return self.log

    async def save_device_state(self) -> bytes:
        """QEMU >= 8.2's vhost_user_set_device_state_fd(SAVE, STOPPED) + read until EOF + CHECK_DEVICE_STATE."""
        if not self.negotiated(ProtocolF.DEVICE_STATE):
            raise FrontendError("DEVICE_STATE was not negotiated")
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            reply = await self.request(Req.SET_DEVICE_STATE_FD, DeviceStateTransfer(0, 0), fds=[w])
        finally:
            os.close(w)
        try:
            assert reply is not None
            reply.fds.close_rest()
            if reply.u64 & 0xFF:
                raise BackendRejected(Req.SET_DEVICE_STATE_FD, reply.u64)
            os.set_blocking(r, False)
            chunks = []
            with trio.fail_after(self.reply_timeout or 30.0):
                while True:
                    try:
                        chunk = os.read(r, 65536)
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(r)
                        continue
                    if not chunk:
                        break
                    chunks.append(chunk)
        finally:
            os.close(r)
        check = await self.get_u64(Req.CHECK_DEVICE_STATE)
        if check != 0:
            raise BackendRejected(Req.CHECK_DEVICE_STATE, check)
        return b"".join(chunks)

    async def load_device_state(self, blob: bytes) -> None:
        """The destination side: SET_DEVICE_STATE_FD(LOAD, STOPPED), write the blob, close, CHECK_DEVICE_STATE."""
        if not self.negotiated(ProtocolF.DEVICE_STATE):
            raise FrontendError("DEVICE_STATE was not negotiated")
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            reply = await self.request(Req.SET_DEVICE_STATE_FD, DeviceStateTransfer(1, 0), fds=[r])
        finally:
            os.close(r)
        try:
            assert reply is not None
            reply.fds.close_rest()
            if reply.u64 & 0xFF:
                raise BackendRejected(Req.SET_DEVICE_STATE_FD, reply.u64)
            os.set_blocking(w, False)
            view = memoryview(blob)
            with trio.fail_after(self.reply_timeout or 30.0):
                while view:
                    try:
                        view = view[os.write(w, view) :]
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(w)
        finally:
            os.close(w)
        check = await self.get_u64(Req.CHECK_DEVICE_STATE)
        if check != 0:
            raise BackendRejected(Req.CHECK_DEVICE_STATE, check)

    async def migration_cancel(self, driver: VirtioNetDriver) -> None:
        """Logging off (a cancelled migration): SET_FEATURES without LOG_ALL, addresses without the flag."""
        for pair in range(driver.pairs):
            await self.set_features(self._wire_features(driver))
            for vq in (driver.rx(pair), driver.tx(pair)):
                await self.set_vring_addr(vq, log=False)

    async def reconnect(self, driver: VirtioNetDriver) -> VhostUserFrontend:
        """QEMU after the back-end went away: a new connection (connect again, or accept on the listener), the
        whole init replayed, then the rings restarted from their used index. Returns the new front-end; this
        one is closed."""
        await self.aclose()
        kw: dict[str, object] = {"empty_cmsg": self.empty_cmsg, "reply_timeout": self.reply_timeout}
        if self.listener is not None:
            new = await self.listener.accept()
        elif self.path is not None:
            new = await VhostUserFrontend.connect(self.path, **kw)
        else:
            raise FrontendError("this front-end was built on a bare socket; it cannot reconnect")
        await new.qemu72_connect(self.pairs)
        await new.qemu72_start(driver, mtu=self.mtu)
        return new

    # DPDK 22.11 virtio-user ---------------------------------------------------------------------------------

    async def dpdk_start(self, driver: VirtioNetDriver) -> None:
        """virtio-user's start-up, in the order the test bed captured on the wire."""
        await self.request(Req.SET_OWNER)
        self.offered_features = await self.get_u64(Req.GET_FEATURES)
        if self.offered_features & VHOST_USER_F_PROTOCOL_FEATURES:
            self.offered_protocol_features = await self.get_u64(Req.GET_PROTOCOL_FEATURES)
            await self.set_u64(
                Req.SET_PROTOCOL_FEATURES, self.offered_protocol_features & DPDK_PROTOCOL_FEATURES
            )
        self.pairs = driver.pairs
        for vq in driver.vqs:
            await self.set_vring_fd(Req.SET_VRING_CALL, vq.index, vq.call_fd)
        driver.negotiate(self.offered_features)
        await self.set_u64(Req.SET_FEATURES, self._wire_features(driver))
        status = self.negotiated(ProtocolF.STATUS)
        if status:
            await self.set_u64(Req.SET_STATUS, STATUS_DRIVER | Status.FEATURES_OK, need_reply=True)
            await self.get_u64(Req.GET_STATUS)
            await self.get_u64(Req.GET_STATUS)
        await self.set_mem_table(driver.mem, need_reply=True)
        for vq in driver.vqs:
            await self.setup_vq(vq, 0, call=False)
        enable_now = driver.vqs[:2]
        for vq in enable_now:
            await self.set_vring_enable(vq.index, True)
        if status:
            await self.set_u64(
                Req.SET_STATUS, STATUS_DRIVER | Status.FEATURES_OK | Status.DRIVER_OK, need_reply=True
            )
        for vq in driver.vqs[2:]:  # further pairs are enabled after DRIVER_OK
            await self.set_vring_enable(vq.index, True)

    async def dpdk_stop(self, driver: VirtioNetDriver) -> dict[int, int]:
        """virtio-user's stop: SET_VRING_ENABLE 0 for every ring, then GET_VRING_BASE for every ring."""
        for vq in driver.vqs:
            await self.set_vring_enable(vq.index, False)
        return {vq.index: await self.get_vring_base(vq.index) for vq in driver.vqs}


class FrontendListener:
    """A listening front-end socket: the back-end (the proxy in --client mode) connects to it."""

    def __init__(self, sock: trio.socket.SocketType, path: str, frontend_kw: dict[str, object]) -> None:
        self.sock = sock
        self.path = path
        self._kw = frontend_kw

    async def accept(self) -> VhostUserFrontend:
        conn, _ = await self.sock.accept()
        return VhostUserFrontend(conn, listener=self, **self._kw)  # type: ignore[arg-type]

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def __aenter__(self) -> FrontendListener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
