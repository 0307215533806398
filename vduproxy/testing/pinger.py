"""ICMP echo at a fixed interval with one line per reply, for loss accounting across a migration.

    python -m vduproxy.testing.pinger TARGET INTERVAL_S COUNT
prints "PING seq=N t=SECONDS ok" per reply, "PING seq=N lost" per echo without a reply within 1 s, and at the end
"PING-SUMMARY sent=N received=M". Needs root (raw socket); run it inside the peer's network namespace.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys
import time


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return int(~s & 0xFFFF)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    target, interval, count = argv[0], float(argv[1]), int(argv[2])
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    sent_at: dict[int, float] = {}
    received: set[int] = set()
    start = time.monotonic()
    next_send = start
    seq = 0
    while seq < count or any(s not in received and time.monotonic() - t < 1.0 for s, t in sent_at.items()):
        now = time.monotonic()
        if seq < count and now >= next_send:
            header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
            payload = struct.pack("!d", now) + b"vduproxy-ping" * 3
            packet = struct.pack("!BBHHH", 8, 0, checksum(header + payload), ident, seq) + payload
            sock.sendto(packet, (target, 0))
            sent_at[seq] = now
            seq += 1
            next_send += interval
        for s, t in list(sent_at.items()):
            if s not in received and now - t >= 1.0:
                print(f"PING seq={s} lost", flush=True)
                del sent_at[s]
        ready, _, _ = select.select([sock], [], [], 0.01)
        if ready:
            data, addr = sock.recvfrom(2048)
            ihl = (data[0] & 0x0F) * 4
            kind, _code, _sum, rid, rseq = struct.unpack_from("!BBHHH", data, ihl)
            if kind == 0 and rid == ident and addr[0] == target and rseq in sent_at and rseq not in received:
                received.add(rseq)
                print(f"PING seq={rseq} t={time.monotonic() - start:.3f} ok", flush=True)
    print(f"PING-SUMMARY sent={seq} received={len(received)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
