"""The vhost-user socket: a trio unix listener (or a reconnecting client), one nursery per connection.

The protocol itself is sans-IO (vduproxy.vhost_user.connection); this module only moves bytes and fds, bounds
every wait, and guarantees cleanup (the back-end is closed under a shielded scope on every path).
"""

from __future__ import annotations

import array
import errno
import grp
import itertools
import os
import signal
import socket as pysocket
import stat
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from .log import get_logger
from .vhost_user.connection import BackendConnection, ProtocolError, Request, describe
from .vhost_user.wire import HEADER_SIZE

log = get_logger(__name__)

# A message whose header arrived must be complete within this time, so a peer that stalls mid-message cannot
# hold the connection (and its resources) forever.
MESSAGE_TIMEOUT = 10.0
MAX_FDS_PER_MSG = 32  # vhost-user allows 8 (memory table); anything beyond is truncated and rejected
_conn_ids = itertools.count(1)


class Reply(Protocol):
    value: Any
    error: int
    fds: list[int]


class Backend(Protocol):
    """What the server drives: one instance per front-end connection."""

    def offered_protocol_features(self) -> int: ...
    async def handle(self, req: Request) -> Reply: ...
    async def close(self) -> None: ...


BackendFactory = Callable[[int], Backend]


class ServerError(Exception):
    pass


def _recv_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == pysocket.SOL_SOCKET and kind == pysocket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
            fds.extend(arr)
    return fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


async def _send(sock: trio.socket.SocketType, data: bytes, fds: list[int]) -> None:
    anc = [(pysocket.SOL_SOCKET, pysocket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    view = memoryview(data)
    first = True
    while view:
        n = await sock.sendmsg([view], anc if first else [])
        first = False
        view = view[n:]


async def _recv_part(sock: trio.socket.SocketType, n: int, conn: BackendConnection) -> bool:
    """Read at most n bytes (and their fds) into `conn`; False on end of stream."""
    data, ancdata, msg_flags, _ = await sock.recvmsg(
        n, pysocket.CMSG_SPACE(MAX_FDS_PER_MSG * 4), pysocket.MSG_CMSG_CLOEXEC
    )
    fds = _recv_fds(ancdata)
    if msg_flags & pysocket.MSG_CTRUNC:
        _close_all(fds)
        raise ProtocolError(None, "too many file descriptors in one message (control data truncated)")
    if not data:
        _close_all(fds)
        return False
    conn.receive_data(data, fds)
    return True


async def _read_request(sock: trio.socket.SocketType, conn: BackendConnection) -> Request | None:
    """One request: header first, then exactly its body, like libvhost-user.

    Never read past a message: a unix stream read may join several messages while the fds arrive with the last
    one, so a large read would attach fds to the wrong message. Reading one message at a time keeps each
    sendmsg's fds with its own message. None = the peer closed the stream between messages.
    """
    if not await _recv_part(sock, HEADER_SIZE, conn):
        conn.close()  # nothing buffered: a clean end of stream
        return None
    # Once a message has started, the rest must come soon: a stalled peer must not hold the connection.
    with trio.move_on_after(MESSAGE_TIMEOUT) as scope:
        while (req := conn.next_request()) is None:
            missing = conn.missing_bytes()
            if not await _recv_part(sock, missing, conn):
                conn.close()  # raises: the stream ended inside a message
                raise ProtocolError(None, "connection closed inside a message")
    if scope.cancelled_caught:
        raise ProtocolError(None, f"incomplete message: no data for {MESSAGE_TIMEOUT:.0f} s")
    return req



async def run_connection(sock: trio.socket.SocketType, backend: Backend, conn_id: int) -> None:
    """Serve one front-end until it disconnects or breaks the protocol. Always closes `backend` and `sock`."""
    clog = log.bind(conn=conn_id)
    conn = BackendConnection(offered_protocol_features=backend.offered_protocol_features())
    try:
        async with trio.open_nursery() as nursery:
            bind = getattr(backend, "bind_nursery", None)
            if bind is not None:
                bind(nursery)
            # Handles (and logs) every error itself; background tasks of the connection end with it.
            await _serve_requests(sock, conn, backend, clog)
            nursery.cancel_scope.cancel()
    finally:
        conn.abort()  # closes any fd still buffered for messages never handled
        with trio.CancelScope(shield=True):
            try:
                await backend.close()
            finally:
                sock.close()
                clog.info("connection_closed")


async def _serve_requests(
    sock: trio.socket.SocketType, conn: BackendConnection, backend: Backend, clog: Any
) -> None:
    try:
        while True:
            req = await _read_request(sock, conn)
            if req is None:
                clog.info("frontend_disconnected")
                return
            clog.debug("vhost_user_request", **describe(req))
            try:
                reply = await backend.handle(req)
            finally:
                req.fds.close_rest()
            out = conn.complete(req, reply.value, error=reply.error)
            if out:
                await _send(sock, out, reply.fds)
            _close_all(reply.fds)  # our copies: the kernel duplicated them into the peer
    except ProtocolError as exc:
        clog.error("vhost_user_protocol_error", **exc.to_event())
    except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as exc:
        clog.warning("frontend_connection_lost", error=str(exc))
    except Exception as exc:
        # A device error or a bug ends this connection only; the listener and other sockets keep serving.
        clog.exception("backend_failure", error=repr(exc))


def _check_socket_path(path: str) -> None:
    """Replace a stale socket file only if nothing listens on it; never touch a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServerError(f"{path} exists and is not a socket; refusing to replace it")
    probe = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        log.info("stale_socket_removed", path=path)
        return
    except OSError as exc:
        raise ServerError(f"cannot probe existing socket {path}: {exc}") from exc
    finally:
        probe.close()
    raise ServerError(f"{path} is in use by another process")


def _bind_listener(path: str, mode: int, group: str | None) -> trio.socket.SocketType:
    _check_socket_path(path)
    raw = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM | pysocket.SOCK_CLOEXEC)
    # The socket must never be reachable with looser permissions, even briefly: bind under a tight umask.
    old = os.umask(0o177)
    try:
        raw.bind(path)
    except OSError as exc:
        raw.close()
        raise ServerError(f"cannot bind {path}: {exc}") from exc
    finally:
        os.umask(old)
    sock = trio.socket.from_stdlib_socket(raw)
    try:
        if group is not None:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        os.chmod(path, mode)
    except (OSError, KeyError) as exc:
        sock.close()
        os.unlink(path)
        raise ServerError(f"cannot set socket ownership/mode on {path}: {exc}") from exc
    sock.listen(4)
    return sock


async def serve_unix(
    path: str,
    factory: BackendFactory,
    *,
    mode: int = 0o600,
    group: str | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on `path`; serve one front-end at a time (a second concurrent one is refused with a reason)."""
    listener = _bind_listener(path, mode, group)
    log.info("listening", socket=path, mode=oct(mode))
    active: set[int] = set()
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                sock, _ = await listener.accept()
                conn_id = next(_conn_ids)
                if active:
                    log.warning(
                        "frontend_refused",
                        conn=conn_id,
                        reason="another front-end is already attached",
                        active=sorted(active),
                    )
                    sock.close()
                    continue
                active.add(conn_id)
                nursery.start_soon(_run_tracked, sock, factory, conn_id, active)
    finally:
        listener.close()
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        log.info("socket_removed", socket=path)


async def _run_tracked(
    sock: trio.socket.SocketType, factory: BackendFactory, conn_id: int, active: set[int]
) -> None:
    try:
        log.info("frontend_connected", conn=conn_id)
        await run_connection(sock, factory(conn_id), conn_id)
    finally:
        active.discard(conn_id)


async def serve_client(
    path: str,
    factory: BackendFactory,
    *,
    max_backoff: float = 5.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Connect to a front-end that listens (QEMU `server=on`), reconnecting with exponential back-off."""
    task_status.started()
    delay = 0.1
    while True:
        sock = trio.socket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
        try:
            await sock.connect(path)
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN):
                log.warning("connect_failed", socket=path, error=str(exc))
            await trio.sleep(delay)
            delay = min(delay * 2, max_backoff)
            continue
        delay = 0.1
        conn_id = next(_conn_ids)
        log.info("connected_to_frontend", socket=path, conn=conn_id)
        await run_connection(sock, factory(conn_id), conn_id)
        await trio.sleep(delay)


async def run_until_signal(main: Callable[[], Awaitable[None]]) -> None:
    """Run `main` until it returns or SIGINT/SIGTERM arrives; then cancel so every cleanup path runs."""
    # A call fd that is a pipe with no reader must not kill the daemon (EPIPE is handled as a broken vq).
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("shutdown", signal=signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

        async def run_main() -> None:
            try:
                await main()
            finally:
                nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        nursery.start_soon(run_main)
