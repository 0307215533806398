"""The test front-end against a small in-test back-end built on the sans-IO BackendConnection.

The back-end maps the memory table with vduproxy.memory and translates ring addresses, so the sequences are
checked end to end: order of requests, fds, replies, GPA/UVA translation, and the dirty log round trip.
"""

from __future__ import annotations

import array
import contextlib
import mmap
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from vduproxy.memory import MemoryMap, RegionSpec
from vduproxy.testing.frontend import BackendRejected, FrontendError, VhostUserFrontend
from vduproxy.testing.guest import GuestMemory, VirtioNetDriver
from vduproxy.vhost_user.connection import BackendConnection, ProtocolError, Request
from vduproxy.vhost_user.wire import (
    HEADER_SIZE,
    LogArea,
    MemoryTable,
    ProtocolF,
    Req,
    VringAddr,
    VringState,
    parse_header,
)
from vduproxy.virtio import VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, NetF

pytestmark = pytest.mark.unit

MiB = 1 << 20
FEATURES = (
    NetF.VERSION_1
    | NetF.MRG_RXBUF
    | NetF.RING_INDIRECT_DESC
    | NetF.RING_EVENT_IDX
    | NetF.MQ
    | VHOST_F_LOG_ALL
    | VHOST_USER_F_PROTOCOL_FEATURES
)
PROTOCOL = (
    ProtocolF.MQ
    | ProtocolF.LOG_SHMFD
    | ProtocolF.RARP
    | ProtocolF.REPLY_ACK
    | ProtocolF.NET_MTU
    | ProtocolF.BACKEND_REQ
    | ProtocolF.STATUS
    | ProtocolF.CONFIG  # QEMU's net front-end does not ack this one
)


class RecordingBackend:
    """Answers every request, maps memory, remembers what it saw."""

    def __init__(self, sock: trio.socket.SocketType, *, protocol: int = PROTOCOL, reject: Req | None = None):
        self.sock = sock
        self.conn = BackendConnection(offered_features=int(FEATURES), offered_protocol_features=int(protocol))
        self.seen: list[Req] = []
        self.status = 0
        self.bases: dict[int, int] = {}
        self.addrs: dict[int, tuple[int, int, int, bool]] = {}  # vq -> GPAs of desc/avail/used, log flag
        self.memory: MemoryMap | None = None
        self.reject = reject
        self.nfds: list[int] = []
        self.scope = trio.CancelScope()  # cancel to make the back-end hang up

    async def _recv(self, n: int) -> tuple[bytes, list[int]]:
        data, anc, _, _ = await self.sock.recvmsg(n, socket.CMSG_SPACE(8 * 4), socket.MSG_CMSG_CLOEXEC)
        fds = [
            fd
            for lv, ty, p in anc
            if (lv, ty) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            for fd in array.array("i", p)
        ]
        return data, fds

    async def run(self) -> None:
        """Reads one message at a time (header, then body) like libvhost-user: on a stream socket the fds
        arrive with the bytes of the sendmsg that carried them, so a bigger read could mix messages."""
        try:
            with self.scope:
                await self._serve()
        finally:
            with contextlib.suppress(ProtocolError):  # hung up mid-message on purpose
                self.conn.close()
            if self.memory is not None:
                self.memory.close()
            self.sock.close()

    async def _serve(self) -> None:
        while True:
            data, fds = await self._recv(HEADER_SIZE)
            if not data:
                return
            while len(data) < HEADER_SIZE:
                more, more_fds = await self._recv(HEADER_SIZE - len(data))
                if not more:
                    return
                data, fds = data + more, fds + more_fds
            self.conn.receive_data(data, fds)
            size = parse_header(data)[2]
            while size:
                body, fds = await self._recv(size)
                if not body:
                    return
                self.conn.receive_data(body, fds)
                size -= len(body)
            while (req := self.conn.next_request()) is not None:
                out = self.handle(req)
                if out:
                    await self.sock.send(out)

    def handle(self, r: Request) -> bytes:
        self.seen.append(r.req)
        self.nfds.append(len(r.fds))
        if r.req is self.reject:
            return self.conn.complete(r, error=1)
        if r.req is Req.GET_FEATURES:
            return self.conn.complete(r, int(FEATURES))
        if r.req is Req.GET_PROTOCOL_FEATURES:
            return self.conn.complete(r, self.conn.offered_protocol_features)
        if r.req is Req.GET_QUEUE_NUM:
            return self.conn.complete(r, 2)
        if r.req is Req.GET_STATUS:
            return self.conn.complete(r, self.status)
        if r.req is Req.SET_STATUS:
            self.status = r.u64
        elif r.req is Req.SET_MEM_TABLE:
            table = r.body_as(MemoryTable)
            specs = [
                RegionSpec(m.guest_phys_addr, m.memory_size, m.userspace_addr, m.mmap_offset, r.fds.take(i))
                for i, m in enumerate(table.regions)
            ]
            if self.memory is not None:
                self.memory.close()
            self.memory = MemoryMap.build(specs)
        elif r.req is Req.SET_VRING_BASE:
            s = r.body_as(VringState)
            self.bases[s.index] = s.num
        elif r.req is Req.GET_VRING_BASE:
            index = r.body_as(VringState).index
            return self.conn.complete(r, VringState(index, self.bases.get(index, 0)))
        elif r.req is Req.SET_VRING_ADDR:
            a = r.body_as(VringAddr)
            if self.memory is not None:
                t = self.memory.uva_to_gpa
                self.addrs[a.index] = (
                    t(a.desc_user_addr),
                    t(a.avail_user_addr),
                    t(a.used_user_addr),
                    a.log_enabled,
                )
        elif r.req is Req.SET_LOG_BASE:
            area = r.body_as(LogArea)
            fd = r.fds.take(0)
            try:
                with mmap.mmap(fd, area.mmap_size, flags=mmap.MAP_SHARED) as log:
                    log[1] |= 0x04  # page 10 is dirty
            finally:
                os.close(fd)
        return self.conn.complete(r)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def guest() -> Iterator[tuple[GuestMemory, VirtioNetDriver]]:
    with GuestMemory(4 * MiB, regions=2) as mem:
        drv = VirtioNetDriver(mem, queue_size=64)
        yield mem, drv
        drv.close()


QEMU72_CONNECT = [
    Req.GET_FEATURES,
    Req.GET_PROTOCOL_FEATURES,
    Req.SET_PROTOCOL_FEATURES,
    Req.GET_QUEUE_NUM,
    Req.SET_BACKEND_REQ_FD,
    Req.SET_OWNER,
    Req.GET_FEATURES,
    *[Req.SET_VRING_CALL, Req.SET_VRING_ERR] * 2,
    Req.SET_VRING_ENABLE,
    Req.SET_VRING_ENABLE,
]
RING = [Req.SET_VRING_NUM, Req.SET_VRING_BASE, Req.SET_VRING_ADDR, Req.SET_VRING_KICK, Req.SET_VRING_CALL]
QEMU72_START = [
    Req.SET_FEATURES,
    Req.GET_STATUS,
    Req.SET_STATUS,
    Req.SET_MEM_TABLE,
    *RING,
    *RING,
    Req.GET_STATUS,
    Req.SET_STATUS,
    Req.SET_VRING_ENABLE,
    Req.SET_VRING_ENABLE,
]


async def test_qemu72_lifecycle(guest: tuple[GuestMemory, VirtioNetDriver]) -> None:
    _, drv = guest
    before = open_fds()
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = RecordingBackend(b)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.run)
            async with VhostUserFrontend(a) as fe:
                await fe.qemu72_connect()
                await trio.testing.wait_all_tasks_blocked()  # the back-end drained its socket
                assert backend.seen == QEMU72_CONNECT
                assert not backend.conn.negotiated(ProtocolF.CONFIG)
                del backend.seen[:]

                await fe.qemu72_start(drv)
                await trio.testing.wait_all_tasks_blocked()  # the back-end drained its socket
                assert backend.seen == QEMU72_START
                assert backend.status == 0xF  # ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
                assert backend.conn.acked_features == drv.features | VHOST_USER_F_PROTOCOL_FEATURES
                for vq in drv.vqs:  # the back-end found the rings through UVA → GPA
                    assert backend.addrs[vq.index] == (vq.desc_gpa, vq.avail_gpa, vq.used_gpa, False)
                del backend.seen[:]

                log = await fe.migration_start(drv)
                await trio.testing.wait_all_tasks_blocked()  # the back-end drained its socket
                assert backend.seen[:2] == [Req.SET_LOG_BASE, Req.SET_FEATURES]
                await trio.testing.wait_all_tasks_blocked()  # the back-end drained its socket
                assert backend.seen[-2:] == [Req.SET_VRING_ADDR, Req.SET_VRING_ADDR]
                assert backend.conn.acked_features & VHOST_F_LOG_ALL
                assert all(backend.addrs[vq.index][3] for vq in drv.vqs)
                assert log.size == -(-((1 << 32) + 2 * MiB) // 4096 // 64) * 8
                assert log.dirty_pages() == {10}
                del backend.seen[:]

                backend.bases[1] = 7
                bases = await fe.qemu72_stop(drv)
                await trio.testing.wait_all_tasks_blocked()  # the back-end drained its socket
                assert backend.seen == [Req.SET_STATUS, Req.GET_VRING_BASE, Req.GET_VRING_BASE]
                assert bases == {0: 0, 1: 7} and backend.status == 0
    assert open_fds() == before


async def test_dpdk_sequence_with_empty_cmsg() -> None:
    with GuestMemory(4 * MiB, gpa_base=0x7F00_0000_0000, uva_base=0x7F00_0000_0000) as mem:
        drv = VirtioNetDriver(mem, queue_size=64)
        a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        backend = RecordingBackend(b, protocol=int(ProtocolF.MQ | ProtocolF.REPLY_ACK | ProtocolF.STATUS))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(backend.run)
                async with VhostUserFrontend(a, empty_cmsg=True) as fe:
                    await fe.dpdk_start(drv)
                    ring = [Req.SET_VRING_NUM, Req.SET_VRING_BASE, Req.SET_VRING_ADDR, Req.SET_VRING_KICK]
                    await trio.testing.wait_all_tasks_blocked()  # the back-end drained its socket
                    assert backend.seen == [
                        Req.SET_OWNER,
                        Req.GET_FEATURES,
                        Req.GET_PROTOCOL_FEATURES,
                        Req.SET_PROTOCOL_FEATURES,
                        Req.SET_VRING_CALL,
                        Req.SET_VRING_CALL,
                        Req.SET_FEATURES,
                        Req.SET_STATUS,
                        Req.GET_STATUS,
                        Req.GET_STATUS,
                        Req.SET_MEM_TABLE,
                        *ring,
                        *ring,
                        Req.SET_VRING_ENABLE,
                        Req.SET_VRING_ENABLE,
                        Req.SET_STATUS,
                    ]
                    assert backend.status == 0xF
                    assert backend.addrs[0][0] == drv.rx().desc_gpa
                    del backend.seen[:]
                    assert await fe.dpdk_stop(drv) == {0: 0, 1: 0}
                    await trio.testing.wait_all_tasks_blocked()  # the back-end drained its socket
                    assert backend.seen == [Req.SET_VRING_ENABLE] * 2 + [Req.GET_VRING_BASE] * 2
        drv.close()


async def test_rejection_and_close_are_errors() -> None:
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = RecordingBackend(b, reject=Req.SET_STATUS)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.run)
            async with VhostUserFrontend(a) as fe:
                await fe.qemu72_connect()
                with pytest.raises(BackendRejected) as ei:
                    await fe.set_u64(Req.SET_STATUS, 1, need_reply=True)
                assert ei.value.req is Req.SET_STATUS and ei.value.status == 1
                backend.scope.cancel()  # the back-end hangs up
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(FrontendError, match="closed"):
                    await fe.get_u64(Req.GET_FEATURES)
            nursery.cancel_scope.cancel()


async def test_server_mode_and_reconnect(tmp_path: Path, guest: tuple[GuestMemory, VirtioNetDriver]) -> None:
    """The back-end connects to the front-end (proxy --client); after it goes away QEMU's replay runs on the
    next connection with SET_VRING_BASE = used index."""
    mem, drv = guest
    path = str(tmp_path / "fe.sock")

    async def backend_client() -> RecordingBackend:
        s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await s.connect(path)
        return RecordingBackend(s)

    with trio.fail_after(10):
        async with await VhostUserFrontend.serve(path) as listener, trio.open_nursery() as nursery:
            first = await backend_client()
            nursery.start_soon(first.run)
            fe = await listener.accept()
            await fe.qemu72_connect()
            await fe.qemu72_start(drv)
            # the guest made progress: 3 used entries on RX, so the replay must start there
            drv.post_rx_buffers()
            os.pwrite(mem.fd, (3).to_bytes(2, "little"), mem.offset_of_gpa(drv.rx().used_gpa + 2))
            await trio.testing.wait_all_tasks_blocked()
            first.scope.cancel()  # the back-end dies
            await trio.testing.wait_all_tasks_blocked()

            second = await backend_client()
            nursery.start_soon(second.run)
            fe = await fe.reconnect(drv)
            await trio.testing.wait_all_tasks_blocked()
            assert second.seen == QEMU72_CONNECT + QEMU72_START
            assert second.bases == {0: 3, 1: 0}
            await fe.aclose()
