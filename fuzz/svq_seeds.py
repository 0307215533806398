"""Named seed inputs for the SVQ ring fuzzer (fuzz/svq_fuzz.c), one per hostile-ring shape the issue lists.

libFuzzer finds most shapes on its own, but a seed per shape makes every run start from them and documents what
the harness's input program looks like. The encoding mirrors svq_fuzz.c: a 3-byte configuration, the ring
placement and the attach bases, then operations. Usage: `python3 fuzz/svq_seeds.py OUTDIR`.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

GPA0 = 0x100000
REG = 0x8000
MEM = 2 * REG

# operation codes (the harness takes them modulo 16; 0x1f and 0x3f select the race and inject forms of 15)
DESC, OFFER, AVAIL, POKE, TABLE, POLL, COMPLETE, HOSTILE, DRAIN, LOG_OR_REGIONS = 0, 2, 4, 5, 6, 7, 10, 12, 13, 14
RACE, INJECT = 0x1F, 0x3F
F_NEXT, F_WRITE, F_IND = 1, 2, 4


def u8(v: int) -> bytes:
    return struct.pack("<B", v & 0xFF)


def u16(v: int) -> bytes:
    return struct.pack("<H", v & 0xFFFF)


def u32(v: int) -> bytes:
    return struct.pack("<I", v & 0xFFFFFFFF)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)


def mem(off: int) -> bytes:
    """An address inside guest memory, GPA0 + off (gen_addr mode 0)."""
    return u8(0) + u16(off % MEM)


def raw(addr: int) -> bytes:
    """Any 64-bit address (gen_addr mode 5)."""
    return u8(5) + u16(0) + u64(addr)


def below(n: int) -> bytes:
    """GPA0 - 1 - n: just below guest memory (gen_addr mode 4)."""
    return u8(4) + u16(n)


def small(n: int) -> bytes:
    return u8(0) + u8(n)


def big(n: int) -> bytes:
    return u8(3) + u32(n)


def table_len(entries: int) -> bytes:
    """16 * entries (gen_len mode 7)."""
    return u8(7) + u16(entries)


def desc(addr: bytes, length: bytes, flags: int, nxt: int) -> bytes:
    # flags below 0x80 are masked to the known bits, next below 0x8000 to num + 2
    return addr + length + u8(flags) + u16(nxt)


def op_desc(i: int, addr: bytes, length: bytes, flags: int = 0, nxt: int = 0) -> bytes:
    return u8(DESC) + u16(i) + desc(addr, length, flags, nxt)


def op_offer(head: int) -> bytes:
    return u8(OFFER) + u16(head)


def op_table(slot: int, *entries: bytes) -> bytes:
    """An indirect table at GPA0 + 16 * slot."""
    return u8(TABLE) + u16(slot) + u8(len(entries) - 1) + b"".join(entries)


def op_complete(mode: int = 0, extra: bytes = b"") -> bytes:
    """Device completes the next chain: mode 0 = its writable size, 1 = 0, 2 = u32 len, 3 = u8 len."""
    return u8(COMPLETE) + u8(0xA5) + u8(mode) + extra


def config(
    num_log2: int,
    *,
    identity: bool = True,
    adjacent: bool = True,
    event_idx: bool = False,
    indirect: bool = True,
    dev_indirect: bool = False,
    dev_event_idx: bool = False,
    rx: bool = False,
    log: bool = False,
    learn_mac: bool = False,
    tiny_log: bool = False,
    set_log: bool = False,
    region_b: bool = False,
    pipe_call: bool = False,
) -> bytes:
    flags = (0 if identity else 0x10) | (0x20 if adjacent else 0) | (0x40 if event_idx else 0)
    flags |= 0x80 if indirect else 0
    # the harness takes the ring size as 1 << (c1 % 10), flag bits included: pick the low bits to match
    c1 = next(flags | x for x in range(16) if (flags | x) % 10 == num_log2)
    c2 = (1 if dev_indirect else 0) | (2 if dev_event_idx else 0) | (4 if rx else 0) | (8 if log else 0)
    c2 |= 0x40 if learn_mac else 0
    c3 = (2 if tiny_log else 0) | (4 if set_log else 0) | (8 if region_b else 0) | (0x80 if pipe_call else 0)
    # ring at the start of the region, guest and shadow both starting at index 0
    return u8(c1) + u8(c2) + u8(c3) + u16(0) + u16(0) + u16(0)


BUF = 0x1000  # buffers start one page into region A, past any ring of up to 64 entries
SEEDS: dict[str, bytes] = {
    "tx-chain": config(3)
    + op_desc(0, mem(BUF), small(64), F_NEXT, 1)
    + op_desc(1, mem(BUF + 64), small(100))
    + op_offer(0)
    + u8(POLL)
    + op_complete(0)
    + u8(POLL),
    "rx-indirect-flattened": config(3, rx=True)
    + op_table(
        BUF // 16, desc(mem(BUF + 256), small(200), F_WRITE | F_NEXT, 1), desc(mem(BUF + 512), small(64), F_WRITE, 0)
    )
    + op_desc(0, mem(BUF), table_len(2), F_IND)
    + op_offer(0)
    + u8(POLL)
    + op_complete(2, u32(0xFFFFFFFF))
    + u8(POLL),
    "rx-indirect-passed": config(3, rx=True, dev_indirect=True)
    + op_table(BUF // 16, desc(mem(BUF + 256), small(200), F_WRITE, 0))
    + op_desc(0, mem(BUF), table_len(1), F_IND)
    + op_offer(0)
    + u8(POLL)
    + op_complete(0)
    + u8(POLL),
    "loop": config(3)
    + op_desc(0, mem(BUF), small(64), F_NEXT, 1)
    + op_desc(1, mem(BUF), small(64), F_NEXT, 2)
    + op_desc(2, mem(BUF), small(64), F_NEXT, 0)
    + op_offer(0)
    + u8(POLL),
    "whole-ring-chain": config(3)
    + b"".join(op_desc(i, mem(BUF + 16 * i), small(16), F_NEXT if i < 7 else 0, i + 1) for i in range(8))
    + op_offer(0)
    + u8(POLL)
    + op_complete(0)
    + u8(POLL),
    "indirect-too-long": config(3) + op_desc(0, mem(0), table_len(40000), F_IND) + op_offer(0) + u8(POLL),
    "nested-indirect": config(3)
    + op_table(BUF // 16, desc(mem(BUF + 256), small(64), F_NEXT, 1), desc(mem(BUF), table_len(1), F_IND, 0))
    + op_desc(0, mem(BUF), table_len(2), F_IND)
    + op_offer(0)
    + u8(POLL),
    "huge-length": config(3) + op_desc(0, mem(BUF), big(0xFFFFFFF0)) + op_offer(0) + u8(POLL),
    "address-wraps": config(3) + op_desc(0, raw(0xFFFFFFFFFFFFFFF0), small(100)) + op_offer(0) + u8(POLL),
    "below-memory": config(3) + op_desc(0, below(8), small(64)) + op_offer(0) + u8(POLL),
    "across-regions-adjacent": config(3)
    + op_desc(0, mem(REG - 32), small(64), F_WRITE)
    + op_offer(0)
    + u8(POLL)
    + op_complete(0)
    + u8(POLL),
    "across-regions-gap": config(3, identity=False, adjacent=False)
    + op_desc(0, mem(REG - 32), small(64), F_WRITE)
    + op_offer(0)
    + u8(POLL),
    "past-memory-end": config(3) + op_desc(0, mem(MEM - 8), small(64), F_WRITE) + op_offer(0) + u8(POLL),
    "head-out-of-range": config(3) + op_offer(0x8009) + u8(POLL),
    "avail-idx-jump": config(3) + u8(AVAIL) + u16(200) + u8(POLL),
    "racing-avail": config(3, event_idx=True)
    + op_desc(0, mem(BUF), small(64))
    + op_offer(0)
    + u8(RACE)
    + u8(7)  # 8 rounds
    + b"".join(u8(1 + 2 * (k % 4)) for k in range(8)),
    "racing-descriptors": config(3)
    + op_offer(0)
    + op_offer(1)
    + u8(RACE)
    + u8(5)  # 6 rounds
    + b"".join(u8(0) + u16(k % 2) + desc(mem(BUF + 64 * k), small(64), F_NEXT if k % 3 else 0, 1) for k in range(6)),
    "drain-and-reattach": config(3)
    + op_desc(0, mem(BUF), small(64))
    + op_desc(1, mem(BUF + 64), small(64))
    + op_offer(0)
    + op_offer(1)
    + u8(POLL)
    + op_complete(0)
    + u8(DRAIN)
    + u8(5)
    + u16(0x1234)
    + op_desc(0, mem(BUF), small(64))
    + op_offer(0)
    + u8(POLL),
    "device-bad-used-id": config(3)
    + op_desc(0, mem(BUF), small(64))
    + op_offer(0)
    + u8(POLL)
    + u8(HOSTILE)
    + u8(0)
    + u16(5)
    + u32(0)
    + u8(POLL),
    "device-used-idx-jump": config(3) + u8(HOSTILE) + u8(1) + u16(40) + u8(POLL),
    "log-too-small": config(3, rx=True, log=True, tiny_log=True, set_log=True)
    + op_desc(0, mem(BUF), small(64), F_WRITE)
    + op_offer(0)
    + u8(POLL)
    + op_complete(0)
    + u8(POLL),
    "log-on-rx": config(3, rx=True, log=True, set_log=True, event_idx=True)
    + op_desc(0, mem(BUF), small(200), F_WRITE)
    + op_offer(0)
    + u8(POLL)
    + op_complete(0)
    + u8(POLL),
    "regions-unplugged": config(3)
    + op_desc(0, mem(BUF), small(64))
    + op_offer(0)
    + u8(POLL)
    + u8(LOG_OR_REGIONS)
    + u8(2)  # even: a region change, not a log switch
    + u8(2)  # region A (holding the ring) unplugged
    + u8(POLL),
    "inject-tx": config(3, learn_mac=True)
    + u8(INJECT)
    + u8(3)
    + u8(INJECT)
    + u8(0)
    + u8(59)
    + u8(0x52)
    + u8(POLL)
    + op_complete(0)
    + u8(POLL),
    "pipe-call-fd": config(3, pipe_call=True)
    + op_desc(0, mem(BUF), small(64))
    + op_offer(0)
    + u8(POLL)
    + op_complete(0)
    + u8(POLL),
}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUTDIR", file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name, data in SEEDS.items():
        (out / f"seed-{name}").write_bytes(data)
    print(f"wrote {len(SEEDS)} seeds to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
