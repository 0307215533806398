"""Shadow virtqueue core features migration needs: the learned source MAC, proxy frame injection (the RARP
after SEND_RARP), num_buffers bridging across a MRG_RXBUF mismatch, and notification suppression that batches
kicks and calls without losing a wake-up."""

from __future__ import annotations

import errno
import mmap
import os
import select
import struct

import pytest
from svq_harness import HDR, Chain, Queue, Rig, eventfd, log_bit, net_hdr, pages, payload, publish, take

from vduproxy.svq import INJECT_SLOT, DevFlags, GuestFlags, SvqError, address_of
from vduproxy.vring import Buf

pytestmark = pytest.mark.unit

MAC_A = bytes.fromhex("52540012345a")
MAC_B = bytes.fromhex("0200deadbeef")
BROADCAST = b"\xff" * 6
TX_FLAGS = GuestFlags.NET_HDR_12 | GuestFlags.LEARN_MAC
AREA_IOVA = 0x7E00_0000_0000
USED_F_NO_NOTIFY = 1
AVAIL_F_NO_INTERRUPT = 1


def eth(src: bytes, dst: bytes = BROADCAST, body: bytes = b"\x08\x06" + bytes(46)) -> bytes:
    return dst + src + body


def send(rig: Rig, q: Queue, frames: list[bytes], *, hdr: bytes | None = None, split: bool = True) -> None:
    """TX chains: header and frame in two descriptors (split) or in one buffer."""
    h = net_hdr() if hdr is None else hdr
    for i, f in enumerate(frames):
        bufs = [rig.buf(len(h), h), rig.buf(len(f), f)] if split else [rig.buf(len(h) + len(f), h + f)]
        q.driver.add(bufs, token=i)
    q.driver.publish()


def complete_all(rig: Rig, q: Queue) -> list[Chain]:
    rig.svq.poll()
    chains = q.dev.pop()
    for c in chains:
        q.dev.complete(c, 0)
    rig.svq.poll()
    q.driver.poll_used()
    return chains


def u16(mem: memoryview | mmap.mmap, off: int) -> int:
    return int(struct.unpack_from("<H", mem, off)[0])


# ---- learned MAC ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [True, False], ids=["hdr-own-desc", "hdr-with-frame"])
def test_learns_source_mac_after_a_12_byte_header(split: bool) -> None:
    with Rig(2) as rig:
        q = rig.add_queue(1, 16, gflags=TX_FLAGS)
        assert rig.svq.learned_mac(1) is None
        send(rig, q, [eth(MAC_A)], split=split)
        complete_all(rig, q)
        assert rig.svq.learned_mac(1) == MAC_A
        assert rig.svq.stats(1).mac_changes == 1


def test_learns_after_a_10_byte_legacy_header() -> None:
    with Rig(2) as rig:
        q = rig.add_queue(1, 16, gflags=GuestFlags.LEARN_MAC)
        send(rig, q, [eth(MAC_B)], hdr=bytes(10))
        complete_all(rig, q)
        assert rig.svq.learned_mac(1) == MAC_B


def test_learns_through_a_passed_indirect_table() -> None:
    with Rig(2, iova_shift=0) as rig:
        q = rig.add_queue(1, 8, gflags=TX_FLAGS | GuestFlags.INDIRECT, dflags=DevFlags.INDIRECT)
        f = eth(MAC_A)
        bufs = [rig.buf(HDR, net_hdr()), rig.buf(5, f[:5]), rig.buf(len(f) - 5, f[5:])]
        q.driver.add(bufs, indirect_at=rig.table(3))
        q.driver.publish()
        (c,) = complete_all(rig, q)
        assert c.indirect
        assert rig.svq.learned_mac(1) == MAC_A


def test_ignores_multicast_zero_and_short_frames_and_unmarked_queues() -> None:
    with Rig(4) as rig:
        q = rig.add_queue(1, 16, gflags=TX_FLAGS)
        send(rig, q, [eth(BROADCAST), eth(bytes(6)), eth(bytes.fromhex("01005e000001")), b"\x02" * 9])
        complete_all(rig, q)
        assert rig.svq.learned_mac(1) is None
        other = rig.add_queue(3, 16, gflags=GuestFlags.NET_HDR_12)  # not marked LEARN_MAC (a CVQ, say)
        send(rig, other, [eth(MAC_A)])
        complete_all(rig, other)
        assert rig.svq.learned_mac(3) is None
        assert not rig.svq.stats(1).broken and not rig.svq.stats(3).broken


def test_follows_a_mac_change_within_the_sample_interval() -> None:
    with Rig(2) as rig:
        q = rig.add_queue(1, 64, gflags=TX_FLAGS)
        send(rig, q, [eth(MAC_A)])
        complete_all(rig, q)
        # once learned, the core looks again every SVQ_MAC_SAMPLE (64) chains: 64 frames of B are enough
        for _ in range(4):
            send(rig, q, [eth(MAC_B)] * 16, split=False)
            complete_all(rig, q)
        assert rig.svq.learned_mac(1) == MAC_B
        st = rig.svq.stats(1)
        assert st.mac_changes == 2 and st.packets == 65


# ---- injection -----------------------------------------------------------------------------------------------


class Area:
    """Proxy memory for injected frames, seen by the fake device at AREA_IOVA."""

    def __init__(self, rig: Rig, slots: int = 4) -> None:
        self.mm = mmap.mmap(-1, slots * INJECT_SLOT)
        rig.svq.set_inject_area(address_of(self.mm), AREA_IOVA, len(self.mm))

    def read(self, c: Chain) -> bytes:
        assert len(c.bufs) == 1 and not c.bufs[0].writable
        off = c.bufs[0].iova - AREA_IOVA
        assert off >= 0 and off + c.bufs[0].length <= len(self.mm), "injected buffer outside the area"
        return bytes(self.mm[off : off + c.bufs[0].length])


def test_injected_frame_reaches_device_and_never_the_guest() -> None:
    with Rig(2) as rig:
        q = rig.add_queue(1, 16, gflags=TX_FLAGS)
        area = Area(rig)
        rarp = eth(MAC_A, body=b"\x80\x35" + payload(46))
        send(rig, q, [payload(60, seed=1)])
        rig.svq.poll()
        rig.svq.inject_tx(1, rarp)
        send(rig, q, [payload(60, seed=2)])
        rig.svq.poll()
        chains = q.dev.pop()
        assert len(chains) == 3
        assert area.read(chains[1]) == bytes(12) + rarp
        assert take(q.dev_kick) >= 1
        for c in reversed(chains):  # completion order differs from offer order
            q.dev.complete(c, 0)
        rig.svq.poll()
        done = q.driver.poll_used()
        assert sorted(int(str(tok)) for tok, _, _ in done) == [0, 0]  # both guest chains, nothing else
        assert len(done) == 2 and q.driver.in_flight() == 0
        st = rig.svq.stats(1)
        assert (st.packets, st.injected, st.broken) == (2, 1, False)
        assert rig.svq.state(1).inflight == 0


def test_inject_errors_are_clear() -> None:
    with Rig(2) as rig:
        rx = rig.add_queue(0, 8, gflags=GuestFlags.RX)
        tx = rig.add_queue(1, 4, gflags=TX_FLAGS)
        with pytest.raises(SvqError) as exc:
            rig.svq.inject_tx(1, eth(MAC_A))
        assert exc.value.errno == errno.ENOBUFS  # no area yet
        one_slot = Area(rig, slots=1)  # kept alive: the core writes into it
        with pytest.raises(SvqError) as exc:
            rig.svq.inject_tx(0, eth(MAC_A))
        assert exc.value.errno == errno.EINVAL  # an RX queue
        with pytest.raises(ValueError):
            rig.svq.inject_tx(1, bytes(INJECT_SLOT))
        rig.svq.inject_tx(1, eth(MAC_A))
        with pytest.raises(SvqError) as exc:
            rig.svq.inject_tx(1, eth(MAC_A))
        assert exc.value.errno == errno.ENOBUFS  # the only slot is in flight
        with pytest.raises(SvqError) as exc:
            rig.svq.set_inject_area(0, 0, 0)
        assert exc.value.errno == errno.EBUSY  # the device may still read it
        complete_all(rig, tx)
        assert rig.svq.stats(1).injected == 1
        two_slots = Area(rig, slots=2)
        send(rig, tx, [payload(20, seed=i) for i in range(2)])  # 4 descriptors: the shadow ring is full
        rig.svq.poll()
        with pytest.raises(SvqError) as exc:
            rig.svq.inject_tx(1, eth(MAC_A))
        assert exc.value.errno == errno.EAGAIN
        assert not rig.svq.stats(1).broken and not rig.svq.stats(0).broken
        rig.svq.detach(1)
        with pytest.raises(SvqError) as exc:
            rig.svq.inject_tx(1, eth(MAC_A))
        assert exc.value.errno == errno.ENOTCONN
        del rx, one_slot, two_slots


def test_drain_rewinds_only_guest_chains_around_injected_ones() -> None:
    with Rig(2) as rig:
        q = rig.add_queue(1, 16, gflags=TX_FLAGS)
        area = Area(rig, slots=2)
        send(rig, q, [payload(30, seed=0)])
        rig.svq.poll()
        rig.svq.inject_tx(1, eth(MAC_A))
        send(rig, q, [payload(30, seed=1)])
        rig.svq.poll()
        rig.svq.inject_tx(1, eth(MAC_B))
        # device consumed guest 0 and the first RARP (completed neither); guest 1 and the second RARP unconsumed
        consumed = q.dev.pop(limit=2)
        assert area.read(consumed[1]) == bytes(12) + eth(MAC_A)
        base = rig.svq.drain(1, q.dev.last_avail)
        assert base == 1  # guest chain 1 goes back to the guest's avail ring; RARPs are not the guest's
        assert q.driver.used_idx() == 1
        assert not rig.svq.state(1).guest_attached
        rig.svq.set_inject_area(0, 0, 0)  # every slot was released


def test_inject_while_the_thread_runs() -> None:
    with Rig(2) as rig:
        q = rig.add_queue(1, 16, gflags=TX_FLAGS)
        area = Area(rig)
        rig.svq.start()
        rig.svq.inject_tx(1, eth(MAC_A))
        assert rig.svq.running
        select.select([q.dev_kick], [], [], 30)  # hang guard only
        (c,) = q.dev.pop()
        assert area.read(c) == bytes(12) + eth(MAC_A)
        q.dev.complete(c, 0)
        os.eventfd_write(q.dev_call, 1)
        for _ in range(3000):  # hang guard only: the thread completes it internally
            if rig.svq.stats(1).injected == 1:
                break
            select.select([], [], [], 0.01)
        rig.svq.stop()
        st = rig.svq.stats(1)
        assert st.injected == 1 and st.packets == 0 and take(q.guest_call) == 0


# ---- num_buffers bridging ------------------------------------------------------------------------------------


def rx_split(rig: Rig, q: Queue, first: int = 8) -> tuple[Buf, Buf]:
    """One RX chain whose header is cut after `first` bytes, so num_buffers lies in the second buffer."""
    a, b = rig.buf(first, writable=True), rig.buf(1600, writable=True)
    q.driver.add([a, b], token="rx")
    q.driver.publish()
    return a, b


def test_num_buffers_written_when_only_the_guest_has_mrg_rxbuf() -> None:
    with Rig(1) as rig:
        q = rig.add_queue(
            0, 8, gflags=GuestFlags.RX | GuestFlags.MRG_RXBUF | GuestFlags.LOG, dflags=DevFlags.NO_MRG_RXBUF
        )
        log = bytearray(128)
        rig.svq.set_log(address_of(log), len(log))
        a, b = rx_split(rig, q)
        rig.svq.poll()
        (c,) = q.dev.pop()
        pkt = net_hdr(0) + payload(200)  # a device without MRG_RXBUF leaves num_buffers at 0
        q.dev.complete(c, q.dev.write(c, pkt))
        rig.svq.poll()
        ((_, _, ln),) = q.driver.poll_used()
        got = rig.guest.read(a.addr, a.length) + rig.guest.read(b.addr, ln - a.length)
        assert int.from_bytes(got[10:12], "little") == 1
        assert got[:10] == pkt[:10] and got[12:] == pkt[12:]
        assert all(log_bit(log, p) for p in pages(b.addr, 4))


def test_num_buffers_untouched_when_both_or_neither_negotiated() -> None:
    for gflags, dflags in [
        (GuestFlags.RX | GuestFlags.MRG_RXBUF, DevFlags(0)),  # no flag: the device's MRG_RXBUF is the guest's
        (GuestFlags.RX | GuestFlags.MRG_RXBUF, DevFlags.MRG_RXBUF),
        (GuestFlags.RX | GuestFlags.NET_HDR_12, DevFlags(0)),
        (GuestFlags.RX | GuestFlags.NET_HDR_12, DevFlags.NO_MRG_RXBUF),
    ]:
        with Rig(1) as rig:
            q = rig.add_queue(0, 8, gflags=gflags, dflags=dflags)
            a, _ = rx_split(rig, q, first=12)
            rig.svq.poll()
            (c,) = q.dev.pop()
            q.dev.complete(c, q.dev.write(c, net_hdr(0) + payload(64)))
            rig.svq.poll()
            q.driver.poll_used()
            assert rig.guest.read(a.addr + 10, 2) == b"\x00\x00"


@pytest.mark.parametrize("num_buffers,breaks", [(1, False), (2, True)])
def test_device_spanning_buffers_for_a_guest_without_mrg_rxbuf(num_buffers: int, breaks: bool) -> None:
    with Rig(1) as rig:
        q = rig.add_queue(0, 8, gflags=GuestFlags.RX | GuestFlags.NET_HDR_12, dflags=DevFlags.MRG_RXBUF)
        rx_split(rig, q, first=12)
        rig.svq.poll()
        (c,) = q.dev.pop()
        q.dev.complete(c, q.dev.write(c, net_hdr(num_buffers) + payload(64)))
        rig.svq.poll()
        st = rig.svq.stats(0)
        assert st.broken == breaks
        if breaks:
            assert "MRG_RXBUF" in (rig.svq.error(0) or "")
            assert q.driver.used_idx() == 0  # nothing of it reached the guest
        else:
            assert len(q.driver.poll_used()) == 1


# ---- notification suppression --------------------------------------------------------------------------------


@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event-idx"])
def test_poll_ends_with_both_sides_armed(event_idx: bool) -> None:
    g = GuestFlags.EVENT_IDX if event_idx else GuestFlags(0)
    d = DevFlags.EVENT_IDX if event_idx else DevFlags(0)
    with Rig(1) as rig:
        q = rig.add_queue(0, 16, gflags=g, dflags=d)
        used_flags = q.driver.layout.used_off  # offsets of the harness's rings are into guest memory
        avail_event = used_flags + 4 + 8 * q.driver.num
        # a passthrough device left NO_NOTIFY set in the guest's ring before the switch to SVQ
        struct.pack_into("<H", rig.guest.mem, used_flags, USED_F_NO_NOTIFY)
        send(rig, q, [payload(40, seed=i) for i in range(3)])
        rig.svq.poll()
        assert u16(rig.guest.mem, used_flags) == 0
        assert u16(q.dev.mem, q.dev.layout.avail_off) == 0  # the device may call
        old = q.driver.avail_idx
        assert q.driver.needs_kick(old) is not event_idx  # with EVENT_IDX nothing new means no kick
        send(rig, q, [payload(8)])
        assert q.driver.needs_kick(old) is True  # ... and the next entry kicks, both ways
        for c in q.dev.pop():
            q.dev.complete(c, 0)
        rig.svq.poll()
        if event_idx:
            assert q.dev.used_event() == q.dev.used_idx  # call me at the next used entry
        q.dev.pop()  # the device consumes the last chain, then is suspended
        base = rig.svq.drain(0, q.dev.last_avail - 1)  # ... and reports it did not: it is rewound
        assert base == 3
        assert u16(rig.guest.mem, used_flags) == 0
        if event_idx:  # whoever takes the ring next is kicked by the guest's next entry
            assert u16(rig.guest.mem, avail_event) == base


def dev_needs_call(q: Queue, old_used: int) -> bool:
    if q.dev.event_idx:
        ev, new = q.dev.used_event(), q.dev.used_idx
        return ((new - ev - 1) & 0xFFFF) < ((new - old_used) & 0xFFFF)
    return not u16(q.dev.mem, q.dev.layout.avail_off) & AVAIL_F_NO_INTERRUPT


@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event-idx"])
@pytest.mark.parametrize("busy_poll", [0, 200], ids=["sleeping", "busy-poll"])
def test_suppressed_notifications_lose_no_wakeup(event_idx: bool, busy_poll: int) -> None:
    """Guest and device notify only when the core asks; every chain still completes, with fewer notifications
    than chains. A lost wake-up shows as a 20 s wait with nothing pending on either side."""
    total, per_publish = 1200, 8
    g = (GuestFlags.EVENT_IDX if event_idx else GuestFlags(0)) | TX_FLAGS
    d = DevFlags.EVENT_IDX if event_idx else DevFlags(0)
    with Rig(2) as rig:
        q = rig.add_queue(1, 64, gflags=g, dflags=d)
        bufs = [rig.buf(HDR + 60, net_hdr() + eth(MAC_A)) for _ in range(64)]
        rig.svq.set_busy_poll(busy_poll)
        rig.svq.start()
        sent = completed = 0
        while completed < total:
            progressed = False
            if sent < total and len(q.driver.free) >= per_publish:
                old = q.driver.avail_idx
                for k in range(per_publish):
                    q.driver.add([bufs[(sent + k) % len(bufs)]])
                publish(q.driver)  # one store: the core's thread reads the index concurrently
                sent += per_publish
                progressed = True
                if q.driver.needs_kick(old):
                    os.eventfd_write(q.guest_kick, 1)
            chains = q.dev.pop()
            if chains:
                old_used = q.dev.used_idx
                for c in chains:
                    q.dev.complete(c, 0)
                progressed = True
                if dev_needs_call(q, old_used):
                    os.eventfd_write(q.dev_call, 1)
            reaped = len(q.driver.poll_used())  # with EVENT_IDX this also asks for a call at the next entry
            completed += reaped
            if progressed or reaped:
                q.dev.set_no_notify(True)
                continue
            # Nothing to do here: ask the core for a kick, look once more, then sleep until notified.
            q.dev.set_avail_event(q.dev.last_avail) if event_idx else q.dev.set_no_notify(False)
            if q.dev.pending() or q.driver.used_idx() != q.driver.last_used:
                continue
            ready, _, _ = select.select([q.dev_kick, q.guest_call], [], [], 20)
            assert ready, f"lost wake-up: {completed}/{total} done, {sent} sent, core {rig.svq.state(1)}"
            for fd in ready:
                take(fd)
        rig.svq.stop()
        st = rig.svq.stats(1)
        assert (st.packets, st.broken) == (total, False)
        assert st.device_kicks < total and st.guest_calls < total  # batched, not one per chain
        assert rig.svq.learned_mac(1) == MAC_A


def test_a_new_guest_call_fd_takes_over_without_reattaching() -> None:
    """SET_VRING_CALL on a running SVQ ring (QEMU masking/unmasking a vector): later completions signal the new
    fd only, and the new fd is signalled once at the swap (an interrupt meant for the old one is not lost)."""
    with Rig(2) as rig:
        q = rig.add_queue(1, 16, gflags=TX_FLAGS)
        send(rig, q, [payload(60, seed=1)])
        rig.svq.poll()
        for c in q.dev.pop():
            q.dev.complete(c, 0)
        rig.svq.poll()
        assert take(q.guest_call) >= 1
        new_call = eventfd()
        try:
            rig.svq.set_guest_call(1, new_call)
            assert take(new_call) == 1  # the one signal at the swap
            send(rig, q, [payload(60, seed=2)])
            rig.svq.poll()
            for c in q.dev.pop():
                q.dev.complete(c, 0)
            rig.svq.poll()
            assert take(new_call) >= 1
            assert take(q.guest_call) == 0, "the old call fd was signalled after the swap"
            assert len(q.driver.poll_used()) == 2 and rig.svq.stats(1).packets == 2
            with pytest.raises(SvqError):
                rig.svq.set_guest_call(0, new_call)  # vq 0 has no guest ring
        finally:
            os.close(new_call)
