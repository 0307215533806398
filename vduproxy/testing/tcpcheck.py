"""Tiny TCP source/sink for traffic checks from a network namespace (`ip netns exec NS python -m …`).

python -m vduproxy.testing.tcpcheck recv ADDR PORT          → prints "TCPCHECK-MD5 <hex> bytes=N"
python -m vduproxy.testing.tcpcheck send HOST PORT BYTES    → prints "TCPCHECK-MD5 <hex> bytes=N"
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import time


def recv(addr: str, port: int, timeout: float = 300.0) -> str:
    with socket.create_server((addr, port)) as srv:
        srv.settimeout(timeout)
        print("TCPCHECK-LISTENING", flush=True)
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(timeout)
            h = hashlib.md5()
            n = 0
            while chunk := conn.recv(1 << 16):
                h.update(chunk)
                n += len(chunk)
    return f"TCPCHECK-MD5 {h.hexdigest()} bytes={n}"


def send(host: str, port: int, size: int, timeout: float = 300.0) -> str:
    data = os.urandom(size)
    deadline = time.monotonic() + timeout
    while True:  # the guest's listener may not be up yet
        try:
            conn = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with conn:
        conn.settimeout(timeout)
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(4096):
            pass
    return f"TCPCHECK-MD5 {hashlib.md5(data).hexdigest()} bytes={size}"


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "recv":
        print(recv(argv[1], int(argv[2])), flush=True)
        return 0
    if len(argv) == 4 and argv[0] == "send":
        print(send(argv[1], int(argv[2]), int(argv[3])), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
