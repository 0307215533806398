"""Long-run fuzzer for the vhost-user wire parser and connection state machine (vduproxy/vhost_user).

Each input is turned into a byte stream of vhost-user messages (mostly well framed: a real request number, valid
flags, a body of the size its codec wants; sometimes anything), cut into chunks at fuzzer-chosen points with
fuzzer-chosen fds attached, and fed to a BackendConnection whose requests are answered as a correct handler
would. Checked on every input:
  - nothing but ProtocolError escapes (a parse error, an IndexError, a construct error... all fail);
  - every fd given to the connection is either handed to the handler exactly once (and still open) or closed;
  - the connection buffers no more than its documented bound.

Engines: atheris (coverage-guided libFuzzer for Python, `pip install atheris`) when it imports, else hypothesis
with random inputs. Stops after --messages messages (default 10**6) and prints the totals.
Usage: .venv/bin/python fuzz/run_wire.py [--messages N] [--engine atheris|hypothesis] [libFuzzer flags...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vduproxy.vhost_user import wire
from vduproxy.vhost_user.connection import (
    MAX_BUFFERED_MESSAGES,
    MAX_HELD_FDS,
    BackendConnection,
    ProtocolError,
    Request,
)
from vduproxy.vhost_user.wire import HEADER_SIZE, SPECS, ConfigSpace, Inflight, Opaque, Req, VringState
from vduproxy.virtio import VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, NetF

REQS = list(Req)
FEATURES = int(NetF.VERSION_1 | NetF.ACCESS_PLATFORM) | VHOST_F_LOG_ALL | VHOST_USER_F_PROTOCOL_FEATURES
PROTO = wire.ALL_PROTOCOL_FEATURES & ~wire.ProtocolF.INBAND_NOTIFICATIONS
MAX_FDS_PER_INPUT = 24


class Stats:
    def __init__(self) -> None:
        self.inputs = 0
        self.messages = 0  # framed messages put into streams
        self.requests = 0  # requests the connection validated and handed out
        self.protocol_errors = 0
        self.fds = 0
        self.start = time.monotonic()

    def line(self) -> str:
        took = time.monotonic() - self.start
        return (
            f"inputs={self.inputs} messages={self.messages} requests={self.requests} "
            f"protocol_errors={self.protocol_errors} fds={self.fds} seconds={took:.0f} "
            f"messages_per_s={self.messages / max(took, 1e-9):.0f}"
        )


class Reader:
    """Fuzzer bytes consumed front to back; zeros once they run out."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def u8(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out + bytes(n - len(out))

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "little")


def framed(req: int, flags: int, body: bytes) -> bytes:
    return wire.build_header(req, flags, len(body)) + body


NEGOTIATION = b"".join(
    [
        framed(Req.GET_FEATURES, 1, b""),
        framed(Req.GET_PROTOCOL_FEATURES, 1, b""),
        framed(Req.SET_PROTOCOL_FEATURES, 1, PROTO.to_bytes(8, "little")),
        framed(Req.SET_FEATURES, 1, FEATURES.to_bytes(8, "little")),
    ]
)


def build_message(r: Reader) -> bytes:
    mode = r.u8()
    req = int(REQS[r.u8() % len(REQS)]) if mode & 0x80 == 0 else r.u32()
    flags = (1, 9, 1, 9, 0, 5, 0x11)[mode % 7] if mode & 0x40 == 0 else r.u32()
    codec = SPECS[Req(req)].request if req in wire.Req._value2member_map_ else None
    if codec is not None and codec.size is not None and mode & 0x20 == 0:
        body = r.take(codec.size)
    elif codec is wire.MEMORY_TABLE and mode & 0x20 == 0:
        n = r.u8() % 10
        body = n.to_bytes(4, "little") + bytes(4) + r.take(32 * n)
    elif codec is not None and codec in (wire.CONFIG,) and mode & 0x20 == 0:
        payload = r.take(r.u8() % 40)
        body = r.take(4) + len(payload).to_bytes(4, "little") + r.take(4) + payload
    else:
        body = r.take(r.u8() % 64)
    if mode & 0x10:
        # a header whose size field lies about the body that follows
        return wire.build_header(req, flags, r.u32() % 8192) + body
    return framed(req, flags, body)


def reply_for(req: Request) -> wire.Body:
    body = req.body
    fixed: dict[Req, wire.Body] = {
        Req.GET_FEATURES: FEATURES,
        Req.GET_PROTOCOL_FEATURES: PROTO,
        Req.GET_QUEUE_NUM: 1,
        Req.GET_MAX_MEM_SLOTS: 8,
        Req.GET_STATUS: 0,
        Req.GET_INFLIGHT_FD: Inflight(4096, 0, 1, 256),
    }
    if req.req in fixed:
        return fixed[req.req]
    if req.req is Req.GET_VRING_BASE and isinstance(body, VringState):
        return VringState(body.index, 0)
    if req.req in (Req.GET_CONFIG, Req.CREATE_CRYPTO_SESSION) and isinstance(body, ConfigSpace | Opaque):
        return body
    return None


class Violation(AssertionError):
    pass


def one_input(data: bytes, stats: Stats, base_fd: int) -> None:
    r = Reader(data)
    cfg = r.u8()
    stream = bytearray(NEGOTIATION if cfg & 1 else b"")
    nmsg = 0
    while r.left and nmsg < 64:
        if r.u8() % 8 == 7:
            stream += r.take(r.u8() % 32)  # raw bytes between messages
        else:
            stream += build_message(r)
            nmsg += 1
    stats.messages += nmsg + (4 if cfg & 1 else 0)
    # every fd of this input is open at once, so each number names one fd for the whole input
    budget = MAX_FDS_PER_INPUT
    cuts: list[tuple[int, list[int]]] = []
    r2 = Reader(data[::-1])  # cut points and fds from the same bytes read backwards
    pos = 0
    while pos < len(stream):
        n = 1 + r2.u8() % 64 if cfg & 2 else len(stream)
        k = min(r2.u8() % 4 if cfg & 4 else 0, budget)
        budget -= k
        cuts.append((n, [os.dup(base_fd) for _ in range(k)]))
        pos += n
    given = [fd for _, fds in cuts for fd in fds]
    stats.fds += len(given)
    conn = BackendConnection(max_body=4096 if cfg & 8 else 256)
    bound = MAX_BUFFERED_MESSAGES * (HEADER_SIZE + conn.max_body)
    taken: list[int] = []
    pos = 0
    fed = 0
    try:
        for n, fds in cuts:
            chunk = bytes(stream[pos : pos + n])
            pos += n
            fed += len(fds)
            conn.receive_data(chunk, fds)
            if conn.held_fds > MAX_HELD_FDS:
                raise Violation(f"connection holds {conn.held_fds} fds")
            while (req := conn.next_request()) is not None:
                stats.requests += 1
                if cfg & 0x10 and len(req.fds):
                    taken.append(req.fds.take(0))
                error = 1 if cfg & 0x20 else 0
                conn.complete(req, reply_for(req), error=error)
            if cfg & 0x40 == 0 and conn.has_partial() and conn.missing_bytes() > bound:
                raise Violation("waiting for more than the buffer bound")
        if cfg & 0x80:
            conn.close()
    except ProtocolError as e:
        stats.protocol_errors += 1
        if not e.reason:
            raise Violation("ProtocolError without a reason") from e
    finally:
        conn.abort()
    for fd in given[fed:]:  # chunks never fed (the stream died first): their fds are still ours
        os.close(fd)
    if len(set(taken)) != len(taken):
        raise Violation(f"fd handed out twice: {taken}")
    for fd in given[:fed]:
        try:
            os.fstat(fd)
            still_open = True
        except OSError:
            still_open = False
        if still_open != (fd in taken):
            raise Violation(f"fd {fd}: open={still_open} handed_out={fd in taken}")
    for fd in taken:
        os.close(fd)


def run_atheris(target: int, extra: list[str]) -> None:
    import atheris  # type: ignore[import-untyped]

    stats = Stats()
    base_fd = os.eventfd(0, os.EFD_CLOEXEC)
    last = [time.monotonic()]

    def test_one(data: bytes) -> None:
        stats.inputs += 1
        one_input(data, stats, base_fd)
        now = time.monotonic()
        if now - last[0] > 30:
            last[0] = now
            print(f"run_wire: {stats.line()}", flush=True)
        if stats.messages >= target:
            print(f"run_wire: done engine=atheris {stats.line()}", flush=True)
            os._exit(0)

    atheris.Setup([sys.argv[0], *extra], test_one)
    atheris.Fuzz()


def run_hypothesis(target: int) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    stats = Stats()
    base_fd = os.eventfd(0, os.EFD_CLOEXEC)

    @settings(
        max_examples=20000, deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=False
    )
    @given(st.binary(min_size=1, max_size=2048))
    def test_one(data: bytes) -> None:
        stats.inputs += 1
        one_input(data, stats, base_fd)

    while stats.messages < target:
        test_one()
    print(f"run_wire: done engine=hypothesis {stats.line()}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=10**6)
    ap.add_argument("--engine", choices=["atheris", "hypothesis", "auto"], default="auto")
    args, extra = ap.parse_known_args()
    engine = args.engine
    if engine == "auto":
        try:
            import atheris

            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    if engine == "atheris":
        import atheris

        atheris.instrument_all()  # coverage feedback from the wire and connection code imported above
        run_atheris(args.messages, extra)
    else:
        run_hypothesis(args.messages)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
