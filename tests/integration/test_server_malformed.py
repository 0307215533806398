"""Malformed vhost-user input against the real server on a real unix socket.

Each case: a structured error event, the connection closed by the server, every fd that was sent closed (the
server runs in this process, so /proc/self/fd counts its fds too), and the server then serves a new
connection normally.
"""

from __future__ import annotations

import array
import os
import re
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
import trio
from structlog.testing import capture_logs

from vduproxy import server
from vduproxy.dataplane import open_dataplane_factory
from vduproxy.vhost_user.wire import REQUEST_FLAGS, Req, build_header

pytestmark = pytest.mark.integration


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def memfd(size: int) -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def msg(req: int, body: bytes = b"", flags: int = REQUEST_FLAGS, size: int | None = None) -> bytes:
    return build_header(req, flags, len(body) if size is None else size) + body


def region(gpa: int, size: int, uva: int, off: int = 0) -> bytes:
    return struct.pack("<QQQQ", gpa, size, uva, off)


def mem_table(*regions: bytes, n: int | None = None) -> bytes:
    return msg(Req.SET_MEM_TABLE, struct.pack("<II", len(regions) if n is None else n, 0) + b"".join(regions))


@dataclass
class Case:
    name: str
    data: Callable[[], bytes]
    nfds: int = 0
    fd_size: int = 1 << 20
    fd_kind: str = "memfd"
    reason: str = ""  # a fragment the error's reason must contain
    half_close: bool = False  # stop writing after the data (the server sees EOF)


MB = 1 << 20
CASES = [
    Case("short_header", lambda: b"\x01\x00\x00\x00\x01", half_close=True, reason="ended"),
    Case("bad_version_bits", lambda: msg(Req.GET_FEATURES, flags=0x2), reason="version"),
    Case("reply_bit_from_frontend", lambda: msg(Req.GET_FEATURES, flags=0x5), reason="flag"),
    Case("size_over_limit", lambda: msg(Req.SET_FEATURES, size=1 << 20), reason="limit"),
    Case("wrong_payload_size", lambda: msg(Req.SET_FEATURES, b"\x00" * 4), reason="must be 8 bytes"),
    Case("too_many_fds", lambda: msg(Req.SET_FEATURES, struct.pack("<Q", 1 << 32)), nfds=1, reason="fds"),
    Case("too_few_fds", lambda: mem_table(region(0, MB, 0x7F0000000000)), nfds=0, reason="fds"),
    Case("unknown_request", lambda: msg(99), reason="unknown"),
    Case(
        "gated_get_config",
        lambda: msg(Req.GET_CONFIG, struct.pack("<III", 0, 4, 0) + b"\0" * 4),
        reason="CONFIG",
    ),
    Case(
        "more_than_8_regions",
        lambda: mem_table(*(region(i * MB, MB, 0x7F0000000000 + i * MB) for i in range(9))),
        nfds=9,
        reason="region",
    ),
    Case(
        "overlapping_regions",
        lambda: mem_table(region(0, 2 * MB, 0x7F0000000000), region(MB, 2 * MB, 0x7F1000000000)),
        nfds=2,
        fd_size=2 * MB,
        reason="overlap",
    ),
    Case("zero_size_region", lambda: mem_table(region(0, 0, 0x7F0000000000)), nfds=1, reason="size"),
    Case(
        "region_larger_than_fd",
        lambda: mem_table(region(0, 64 * MB, 0x7F0000000000)),
        nfds=1,
        fd_size=MB,
        reason="map",
    ),
    Case(
        "unmappable_fd",
        lambda: mem_table(region(0, MB, 0x7F0000000000)),
        nfds=1,
        fd_kind="pipe",
        reason="map",
    ),
    Case(
        "header_without_body", lambda: build_header(Req.SET_FEATURES, REQUEST_FLAGS, 8), reason="incomplete"
    ),
]


@pytest.fixture
async def proxy(tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    # A stalled peer is cut off after MESSAGE_TIMEOUT; keep the test short.
    monkeypatch.setattr(server, "MESSAGE_TIMEOUT", 1.0)
    path = os.path.join(str(tmp_path), "vdu.sock")
    factory, _ = open_dataplane_factory("none")
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: server.serve_unix(path, factory, task_status=task_status))
        yield path
        nursery.cancel_scope.cancel()
    assert not os.path.exists(path), "socket file must be removed on shutdown"


async def send_raw(path: str, data: bytes, fds: list[int], half_close: bool) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(path)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    await sock.sendmsg([data], anc)
    if half_close:
        sock.shutdown(socket.SHUT_WR)
    return sock


async def wait_closed(sock: trio.socket.SocketType) -> None:
    # The server may close with unread bytes in its buffer, which the kernel turns into a reset: also closed.
    with trio.fail_after(10):
        while True:
            try:
                data = await sock.recv(4096)
            except ConnectionResetError:
                return
            if not data:
                return


async def get_features(path: str) -> int:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        await sock.connect(path)
        await sock.send(msg(Req.GET_FEATURES))
        with trio.fail_after(10):
            reply = b""
            while len(reply) < 20:
                chunk = await sock.recv(64)
                assert chunk, "server closed a well-formed connection"
                reply += chunk
        req, flags, size = struct.unpack_from("<III", reply)
        assert (req, flags, size) == (Req.GET_FEATURES, 0x5, 8)
        return int(struct.unpack_from("<Q", reply, 12)[0])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_malformed_message_closes_connection_and_fds(proxy: str, case: Case) -> None:
    baseline = fd_count()
    fds: list[int] = []
    for _ in range(case.nfds):
        if case.fd_kind == "pipe":
            r, w = os.pipe()
            os.close(w)
            fds.append(r)
        else:
            fds.append(memfd(case.fd_size))
    with capture_logs() as logs:
        sock = await send_raw(proxy, case.data(), fds, case.half_close)
        for fd in fds:
            os.close(fd)  # the server holds its own copies now
        await wait_closed(sock)
        sock.close()
        await trio.sleep(0.05)
    errors = [e for e in logs if e["event"] == "vhost_user_protocol_error"]
    assert len(errors) == 1, logs
    assert re.search(case.reason, errors[0]["reason"], re.I), errors[0]
    assert fd_count() == baseline, "fds leaked by a rejected message"
    # The server is still healthy: a new front-end is served.
    assert await get_features(proxy) != 0


async def test_second_concurrent_frontend_is_refused(proxy: str) -> None:
    first = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await first.connect(proxy)
    await first.send(msg(Req.GET_FEATURES))
    assert len(await first.recv(64)) == 20
    with capture_logs() as logs:
        second = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await second.connect(proxy)
        await wait_closed(second)
    assert any(e["event"] == "frontend_refused" for e in logs)
    # the first one is untouched
    await first.send(msg(Req.GET_FEATURES))
    assert len(await first.recv(64)) == 20
    first.close()
    second.close()


async def test_socket_file_mode_and_stale_socket(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(str(tmp_path), "s.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # a socket file nobody listens on
    factory, _ = open_dataplane_factory("none")
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: server.serve_unix(path, factory, task_status=task_status))
        assert os.stat(path).st_mode & 0o777 == 0o600
        # a second server on the same live socket must refuse rather than steal it
        with pytest.raises(server.ServerError, match="in use"):
            await server.serve_unix(path, factory)
        nursery.cancel_scope.cancel()
    regular = os.path.join(str(tmp_path), "file")
    open(regular, "w").close()
    with pytest.raises(server.ServerError, match="not a socket"):
        await server.serve_unix(regular, factory)
