"""Hostile guests and devices against the shadow virtqueue core.

Every case puts garbage on vq 0 and checks what a user of the proxy would: that vq is broken with a reason,
one fault is counted and signalled on the error fd, nothing of the bad chain reaches the device or the guest's
used ring, and vq 1 keeps forwarding. The C side of the same list runs under ASan/UBSan (test_svq_asan.py).
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from svq_harness import HDR, Queue, Rig, net_hdr, take

from vduproxy.svq import DevFlags, GuestFlags, Region, SvqError
from vduproxy.virtio import VRING_DESC_F_INDIRECT as IND
from vduproxy.virtio import VRING_DESC_F_NEXT as NEXT
from vduproxy.virtio import VRING_DESC_F_WRITE as WRITE

pytestmark = pytest.mark.unit

_U16 = struct.Struct("<H")
_DESC = struct.Struct("<QIHH")


def offer(q: Queue, head: int) -> None:
    """Put `head` on the guest's avail ring and publish it, bypassing the well-behaved driver."""
    d = q.driver
    _U16.pack_into(d.mem, d.layout.avail_off + 4 + 2 * (d.avail_idx % d.num), head)
    d.avail_idx = (d.avail_idx + 1) & 0xFFFF
    _U16.pack_into(d.mem, d.layout.avail_off + 2, d.avail_idx)


def table_at(rig: Rig, entries: list[tuple[int, int, int, int]], room: int | None = None) -> int:
    gpa = rig.guest.alloc(16 * max(room or len(entries), 1))
    for i, e in enumerate(entries):
        _DESC.pack_into(rig.guest.mem, gpa - rig.guest.gpa + 16 * i, *e)
    return gpa


def healthy_still_forwards(rig: Rig, q: Queue) -> None:
    q.driver.add([rig.buf(HDR, net_hdr()), rig.buf(40, b"h" * 40)], token="ok")
    q.driver.publish()
    rig.svq.poll()
    (c,) = q.dev.pop()
    assert q.dev.read(c) == net_hdr() + b"h" * 40
    q.dev.complete(c, 0)
    rig.svq.poll()
    assert [tok for tok, _, _ in q.driver.poll_used()] == ["ok"]


def assert_broken(rig: Rig, bad: Queue, good: Queue, words: str) -> None:
    rig.svq.poll()
    st0 = rig.svq.stats(bad.vq)
    reason = rig.svq.error(bad.vq) or ""
    assert st0.broken, "vq not broken"
    assert words.lower() in reason.lower(), reason
    assert st0.faults == 1
    assert rig.svq.take_error_events() == 1
    assert bad.driver.used_idx() == 0  # nothing completed toward the guest
    rig.svq.poll()
    assert rig.svq.stats(bad.vq).faults == 1  # no further processing of a broken vq
    assert not rig.svq.stats(good.vq).broken
    healthy_still_forwards(rig, good)


Setup = Callable[[Rig, Queue], None]


def _desc(q: Queue, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
    q.driver.write_desc(i, addr, length, flags, nxt)


def _buf(rig: Rig) -> int:
    return rig.buf(64).addr


GUEST_CASES: dict[str, tuple[str, Setup]] = {}


def case(words: str) -> Callable[[Setup], Setup]:
    """Register a hostile setup for vq 0 and the words its breakage reason must contain."""

    def register(fn: Setup) -> Setup:
        GUEST_CASES[fn.__name__] = (words, fn)
        return fn

    return register


@case("head 8 is not below")
def head_out_of_range(rig: Rig, q: Queue) -> None:
    offer(q, 8)


@case("next 9 is not below")
def next_out_of_range(rig: Rig, q: Queue) -> None:
    _desc(q, 0, _buf(rig), 64, NEXT, 9)
    offer(q, 0)


@case("loops")
def chain_loop(rig: Rig, q: Queue) -> None:
    _desc(q, 0, _buf(rig), 64, NEXT, 1)
    _desc(q, 1, _buf(rig), 64, NEXT, 0)
    offer(q, 0)


@case("wraps")
def len_wraps(rig: Rig, q: Queue) -> None:
    _desc(q, 0, 0xFFFF_FFFF_FFFF_FF00, 0x1000)
    offer(q, 0)


@case("outside guest memory")
def addr_outside(rig: Rig, q: Queue) -> None:
    _desc(q, 0, 0x10, 64)
    offer(q, 0)


@case("outside guest memory")
def addr_crosses_region_end(rig: Rig, q: Queue) -> None:
    _desc(q, 0, rig.guest.gpa + rig.guest.size - 100, 200)
    offer(q, 0)


@case("inside an indirect")
def indirect_in_indirect(rig: Rig, q: Queue) -> None:
    inner = table_at(rig, [(_buf(rig), 64, 0, 0)])
    _desc(q, 0, table_at(rig, [(inner, 16, IND, 0)]), 16, IND)
    offer(q, 0)


@case("multiple of 16")
def indirect_len_not_multiple(rig: Rig, q: Queue) -> None:
    _desc(q, 0, table_at(rig, [(_buf(rig), 64, 0, 0)], 2), 24, IND)
    offer(q, 0)


@case("multiple of 16")
def indirect_len_zero(rig: Rig, q: Queue) -> None:
    _desc(q, 0, table_at(rig, []), 0, IND)
    offer(q, 0)


@case("longer than")
def indirect_too_long(rig: Rig, q: Queue) -> None:
    _desc(q, 0, table_at(rig, [], 32769), 16 * 32769, IND)
    offer(q, 0)


@case("loops")
def indirect_table_loops(rig: Rig, q: Queue) -> None:
    _desc(q, 0, table_at(rig, [(_buf(rig), 64, NEXT, 1), (_buf(rig), 64, NEXT, 0)]), 32, IND)
    offer(q, 0)


@case("beyond a table")
def indirect_next_beyond_table(rig: Rig, q: Queue) -> None:
    _desc(q, 0, table_at(rig, [(_buf(rig), 64, NEXT, 5)]), 16, IND)
    offer(q, 0)


@case("outside guest memory")
def indirect_table_outside(rig: Rig, q: Queue) -> None:
    _desc(q, 0, rig.guest.gpa + rig.guest.size - 16, 32, IND)
    offer(q, 0)


@case("both INDIRECT and NEXT")
def indirect_with_next(rig: Rig, q: Queue) -> None:
    _desc(q, 0, table_at(rig, [(_buf(rig), 64, 0, 0)]), 16, IND | NEXT, 1)
    offer(q, 0)


@case("outside guest memory")
def indirect_buffer_outside(rig: Rig, q: Queue) -> None:
    _desc(q, 0, table_at(rig, [(0x20, 64, WRITE, 0)]), 16, IND)
    offer(q, 0)


@case("ahead")
def avail_idx_jump(rig: Rig, q: Queue) -> None:
    _U16.pack_into(q.driver.mem, q.driver.layout.avail_off + 2, q.driver.num + 1)


@pytest.mark.parametrize("case", list(GUEST_CASES))
@pytest.mark.parametrize("dflags", [DevFlags(0), DevFlags.INDIRECT], ids=["flatten", "pass"])
def test_hostile_guest_breaks_only_its_vq(case: str, dflags: DevFlags) -> None:
    words, setup = GUEST_CASES[case]
    # identity IOVAs so that the "pass" variant really passes tables through
    with Rig(2, iova_shift=0) as rig:
        bad = rig.add_queue(0, 8, gflags=GuestFlags.INDIRECT | GuestFlags.RX, dflags=dflags)
        good = rig.add_queue(1, 8)
        setup(rig, bad)
        assert_broken(rig, bad, good, words)
        assert bad.dev.pop() == []  # the bad chain never reached the device


def test_indirect_without_negotiation() -> None:
    with Rig(2) as rig:
        bad = rig.add_queue(0, 8)
        good = rig.add_queue(1, 8)
        _desc(bad, 0, table_at(rig, [(_buf(rig), 64, 0, 0)]), 16, IND)
        offer(bad, 0)
        assert_broken(rig, bad, good, "not negotiated")


def test_chain_longer_than_shadow_ring() -> None:
    with Rig(2) as rig:
        bad = rig.add_queue(0, 16, shadow_num=4)
        good = rig.add_queue(1, 8)
        bad.driver.add([rig.buf(16, b"x" * 16) for _ in range(6)])
        bad.driver.publish()
        assert_broken(rig, bad, good, "shadow ring")


def test_bad_chain_after_good_ones_keeps_the_good_ones_unpublished() -> None:
    with Rig(2) as rig:
        bad = rig.add_queue(0, 8)
        good = rig.add_queue(1, 8)
        bad.driver.add([rig.buf(16, b"x" * 16)])
        bad.driver.publish()
        offer(bad, 200)
        assert_broken(rig, bad, good, "head 200")
        assert bad.dev.pop() == []  # a broken vq publishes nothing more to the device


def test_device_returns_id_not_in_flight() -> None:
    with Rig(2) as rig:
        bad = rig.add_queue(0, 8)
        good = rig.add_queue(1, 8)
        bad.driver.add([rig.buf(16, b"x" * 16)])
        bad.driver.publish()
        rig.svq.poll()
        (c,) = bad.dev.pop()
        c.head = (c.head + 3) % 8
        bad.dev.complete(c, 0)
        assert_broken(rig, bad, good, "not a chain in flight")


def test_device_used_idx_jump() -> None:
    with Rig(2) as rig:
        bad = rig.add_queue(0, 8)
        good = rig.add_queue(1, 8)
        bad.driver.add([rig.buf(16, b"x" * 16)])
        bad.driver.publish()
        rig.svq.poll()
        _U16.pack_into(bad.dev.mem, bad.dev.layout.used_off + 2, 5)
        assert_broken(rig, bad, good, "ahead")


def test_call_fd_pipe_without_reader() -> None:
    r, w = os.pipe()
    os.close(r)
    try:
        with Rig(2) as rig:
            bad = rig.add_queue(0, 8, call_fd=w)
            good = rig.add_queue(1, 8)
            bad.driver.add([rig.buf(16, b"x" * 16)])
            bad.driver.publish()
            rig.svq.poll()
            (c,) = bad.dev.pop()
            bad.dev.complete(c, 0)
            rig.svq.poll()
            assert "guest call fd" in (rig.svq.error(0) or "")
            assert "pipe" in (rig.svq.error(0) or "").lower()
            assert rig.svq.take_error_events() == 1
            healthy_still_forwards(rig, good)
    finally:
        os.close(w)


def test_call_fd_full_pipe_does_not_block() -> None:
    r, w = os.pipe()
    os.set_blocking(w, True)
    try:
        while True:  # fill the pipe without blocking the test itself
            os.set_blocking(w, False)
            try:
                os.write(w, b"\0" * 65536)
            except BlockingIOError:
                break
        os.set_blocking(w, True)
        with Rig(1) as rig:
            q = rig.add_queue(0, 8, call_fd=w)
            q.driver.add([rig.buf(16, b"x" * 16)])
            q.driver.publish()
            rig.svq.poll()
            (c,) = q.dev.pop()
            q.dev.complete(c, 0)
            rig.svq.poll()  # would hang here if the core wrote to a full blocking pipe
            assert len(q.driver.poll_used()) == 1
            assert not rig.svq.stats(0).broken
    finally:
        os.close(r)
        os.close(w)


async def test_kick_fd_hangup_breaks_vq_in_thread() -> None:
    r, w = os.pipe()
    try:
        with Rig(2) as rig:
            bad = rig.add_queue(0, 8)
            bad.guest_kick = r
            rig.attach_guest(bad, 0, 0)
            good = rig.add_queue(1, 8)
            rig.svq.start()
            os.close(w)
            w = -1
            with trio.fail_after(30):  # hang guard only
                await trio.lowlevel.wait_readable(rig.svq.error_fd)
            assert "hung up" in (rig.svq.error(0) or "")
            rig.svq.stop()
            healthy_still_forwards(rig, good)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


async def test_unpollable_kick_fd_breaks_vq_at_start() -> None:
    with tempfile.TemporaryFile() as f, Rig(2) as rig:
        bad = rig.add_queue(0, 8)
        bad.guest_kick = f.fileno()
        rig.attach_guest(bad, 0, 0)
        good = rig.add_queue(1, 8)
        rig.svq.start()
        rig.svq.stop()
        assert "cannot be polled" in (rig.svq.error(0) or "")
        healthy_still_forwards(rig, good)


def test_used_ring_beyond_region_is_refused_at_attach() -> None:
    with Rig(1) as rig:
        end = rig.guest.gpa + rig.guest.size
        with pytest.raises(SvqError) as ei:
            rig.svq.attach_guest(
                0, num=256, desc=rig.guest.gpa, avail=rig.guest.gpa + 4096, used=end - 1024, last_avail=0,
                kick_fd=-1, call_fd=-1,
            )  # fmt: skip
        assert ei.value.errno == 14  # EFAULT
        assert "not inside guest memory" in ei.value.reason


def test_guest_used_idx_far_from_last_avail_is_refused() -> None:
    with Rig(1) as rig:
        q = rig.add_queue(0, 8)
        q.driver.set_base(0)
        with pytest.raises(SvqError) as ei:
            rig.attach_guest(q, 100, 0)  # used idx 0 is 100 behind: more than the ring holds
        assert ei.value.errno == 34  # ERANGE


@pytest.mark.parametrize("iova_contiguous", [True, False])
def test_buffer_across_two_regions(iova_contiguous: bool) -> None:
    with Rig(2) as rig:
        bad = rig.add_queue(0, 8, gflags=GuestFlags.RX)
        good = rig.add_queue(1, 8)
        g = rig.guest
        half = g.size // 2
        second_iova = g.gpa + half + rig.iova_shift + (0 if iova_contiguous else 0x1000_0000)
        rig.svq.set_regions(
            [
                Region(g.gpa, half, g.local, g.gpa + rig.iova_shift),
                Region(g.gpa + half, half, g.local + half, second_iova),
            ]
        )
        _desc(bad, 0, g.gpa + half - 100, 200, WRITE)
        offer(bad, 0)
        if iova_contiguous:
            rig.svq.poll()
            (c,) = bad.dev.pop()
            assert (c.bufs[0].iova, c.bufs[0].length) == (g.gpa + half - 100 + rig.iova_shift, 200)
        else:
            assert_broken(rig, bad, good, "outside guest memory")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    descs=st.lists(
        st.tuples(
            st.one_of(st.integers(0, 2**64 - 1), st.integers(0x10_0000, 0x30_0000)),
            st.integers(0, 2**32 - 1) | st.integers(0, 5000),
            st.integers(0, 7),
            st.integers(0, 20),
        ),
        min_size=8,
        max_size=8,
    ),
    heads=st.lists(st.integers(0, 12), min_size=1, max_size=8),
    dflags=st.sampled_from([DevFlags(0), DevFlags.INDIRECT]),
)
def test_random_descriptors_never_escape_guest_memory(
    descs: list[tuple[int, int, int, int]], heads: list[int], dflags: DevFlags
) -> None:
    with Rig(1, iova_shift=0) as rig:
        q = rig.add_queue(0, 8, gflags=GuestFlags.INDIRECT, dflags=dflags)
        for i, d in enumerate(descs):
            _desc(q, i, *d)
        for h in heads:
            offer(q, h)
        rig.svq.poll()
        lo, hi = rig.guest.gpa, rig.guest.gpa + rig.guest.size
        for c in q.dev.pop():
            for b in c.bufs:
                assert lo <= b.iova and b.iova + max(b.length, 1) <= hi
        assert rig.svq.stats(0).broken == bool(rig.svq.error(0))
        assert take(q.dev_kick) <= 1  # whatever was forwarded went out in one batch
