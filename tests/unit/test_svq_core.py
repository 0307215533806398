"""Shadow virtqueue core: forwarding guest <-> shadow byte for byte, notifications, drain, dirty log.

A Python guest (vduproxy.vring.SplitRingDriver over test guest memory) and a Python device (reading the
shadow ring) surround the C core. Most tests run the core's processing round synchronously (`Svq.poll`) so
every step is deterministic; the threaded tests wait on the eventfds the core signals.
"""

from __future__ import annotations

import os

import pytest
import trio
from svq_harness import HDR, PAGE, FakeDevice, Queue, Rig, log_bit, net_hdr, pages, payload, take

from vduproxy.svq import DevFlags, GuestFlags, SvqError, address_of
from vduproxy.vring import Buf

pytestmark = pytest.mark.unit


def send_tx(rig: Rig, q: Queue, frames: list[bytes]) -> None:
    for i, f in enumerate(frames):
        q.driver.add([rig.buf(HDR, net_hdr()), rig.buf(len(f), f)], token=i)
    q.driver.publish()


def post_rx(rig: Rig, q: Queue, count: int, size: int = 2048) -> list[Buf]:
    bufs = [rig.buf(size, writable=True) for _ in range(count)]
    for i, b in enumerate(bufs):
        q.driver.add([b], token=i)
    q.driver.publish()
    return bufs


def test_tx_chains_reach_device_byte_exact_and_complete() -> None:
    with Rig(2) as rig:
        q = rig.add_queue(1, 16, gflags=GuestFlags(0))
        frames = [payload(60 + 17 * i, seed=i) for i in range(5)]
        send_tx(rig, q, frames)
        assert rig.svq.poll() == 5
        chains = q.dev.pop()
        assert [q.dev.read(c) for c in chains] == [net_hdr() + f for f in frames]
        assert all(len(c.bufs) == 2 for c in chains)  # chains keep their shape
        assert take(q.dev_kick) == 1  # one device kick for the whole batch
        for c in chains:
            q.dev.complete(c, 0)
        assert rig.svq.poll() == 5
        done = q.driver.poll_used()
        assert [tok for tok, _, _ in done] == list(range(5))
        assert q.driver.in_flight() == 0
        assert take(q.guest_call) == 1  # one guest call for the whole batch
        st = rig.svq.stats(1)
        assert (st.packets, st.device_kicks, st.guest_calls, st.broken) == (5, 1, 1, False)


def test_rx_device_writes_reach_guest_buffers() -> None:
    with Rig(2) as rig:
        q = rig.add_queue(0, 8, gflags=GuestFlags.RX)
        bufs = post_rx(rig, q, 4, size=1500)
        rig.svq.poll()
        chains = q.dev.pop()
        assert len(chains) == 4
        sent = []
        for i, c in enumerate(chains):
            pkt = net_hdr(1) + payload(100 + 300 * i, seed=i)
            q.dev.complete(c, q.dev.write(c, pkt))
            sent.append(pkt)
        rig.svq.poll()
        got = {tok: ln for tok, _, ln in q.driver.poll_used()}
        assert isinstance(got, dict) and len(got) == 4
        for i, b in enumerate(bufs):
            assert rig.guest.read(b.addr, got[i]) == sent[i]
        assert rig.svq.stats(0).bytes == sum(len(p) for p in sent)


def test_used_len_beyond_writable_is_clamped() -> None:
    with Rig(1) as rig:
        q = rig.add_queue(0, 8, gflags=GuestFlags.RX)
        post_rx(rig, q, 1, size=256)
        rig.svq.poll()
        (c,) = q.dev.pop()
        q.dev.complete(c, 10_000)
        rig.svq.poll()
        ((_, _, ln),) = q.driver.poll_used()
        assert ln == 256
        assert rig.svq.stats(0).clamped == 1


@pytest.mark.parametrize("dflags", [DevFlags(0), DevFlags.INDIRECT], ids=["flattened", "passed"])
@pytest.mark.parametrize("writable", [False, True], ids=["tx", "rx"])
def test_indirect_tables(dflags: DevFlags, writable: bool) -> None:
    # Passing a guest table to the device needs GPA == IOVA; flattening works with any IOVA layout.
    shift = 0 if dflags & DevFlags.INDIRECT else 0x7F00_0000_0000
    with Rig(1, iova_shift=shift) as rig:
        q = rig.add_queue(0, 8, gflags=GuestFlags.INDIRECT | (GuestFlags.RX if writable else 0), dflags=dflags)
        parts = [payload(n, seed=n) for n in (12, 100, 1400, 33)]
        bufs = [rig.buf(len(p), b"" if writable else p, writable=writable) for p in parts]
        q.driver.add(bufs, token="t", indirect_at=rig.table(len(bufs)))
        q.driver.publish()
        rig.svq.poll()
        (c,) = q.dev.pop()
        assert c.indirect == bool(dflags & DevFlags.INDIRECT)
        assert [b.length for b in c.bufs] == [len(p) for p in parts]
        if writable:
            q.dev.complete(c, q.dev.write(c, b"".join(parts)))
        else:
            assert q.dev.read(c) == b"".join(parts)
            q.dev.complete(c, 0)
        rig.svq.poll()
        ((tok, _, ln),) = q.driver.poll_used()
        assert tok == "t"
        if writable:
            assert ln == sum(map(len, parts))
            assert [rig.guest.read(b.addr, b.length) for b in bufs] == parts


def test_shadow_ring_full_waits_for_device_then_resumes() -> None:
    with Rig(1) as rig:
        # the guest ring is larger than the shadow ring: forwarding must pause, never drop or break
        q = rig.add_queue(0, 16, shadow_num=4)
        send_tx(rig, q, [payload(64, seed=i) for i in range(6)])  # 6 chains x 2 descriptors
        rig.svq.poll()
        first = q.dev.pop()
        assert len(first) == 2
        assert rig.svq.state(0).guest_last_avail == 2
        for c in first:
            q.dev.complete(c, 0)
        rig.svq.poll()
        second = q.dev.pop()
        assert len(second) == 2
        assert [q.dev.read(c)[HDR:] for c in second] == [payload(64, seed=i) for i in (2, 3)]
        assert not rig.svq.stats(0).broken


def test_mergeable_rx_spans_buffers() -> None:
    with Rig(1) as rig:
        # the device has MRG_RXBUF as the guest does: its num_buffers passes through untouched
        q = rig.add_queue(0, 16, gflags=GuestFlags.RX | GuestFlags.MRG_RXBUF)
        bufs = post_rx(rig, q, 6, size=128)
        rig.svq.poll()
        chains = q.dev.pop()
        pkt = net_hdr(3) + payload(300)
        pieces = [pkt[0:128], pkt[128:256], pkt[256:]]
        for c, piece in zip(chains, pieces, strict=False):
            q.dev.complete(c, q.dev.write(c, piece))
        rig.svq.poll()
        used = q.driver.poll_used()
        assert [ln for _, _, ln in used] == [len(p) for p in pieces]
        data = b"".join(rig.guest.read(bufs[int(str(tok))].addr, ln) for tok, _, ln in used)
        assert data == pkt
        assert int.from_bytes(data[10:12], "little") == 3  # num_buffers as the device wrote it


@pytest.mark.parametrize("guest_base,shadow_base", [(0xFFF0, 0xFFFA), (0xFFFF, 0), (5, 0xFFFE)])
def test_index_wrap(guest_base: int, shadow_base: int) -> None:
    with Rig(1) as rig:
        q = rig.add_queue(0, 16, guest_base=guest_base, shadow_base=shadow_base)
        total = 0
        for rnd in range(6):
            frames = [payload(20 + rnd, seed=rnd * 8 + i) for i in range(5)]
            send_tx(rig, q, frames)
            rig.svq.poll()
            chains = q.dev.pop()
            assert [q.dev.read(c)[HDR:] for c in chains] == frames
            for c in chains:
                q.dev.complete(c, 0)
            rig.svq.poll()
            assert len(q.driver.poll_used()) == 5
            total += 5
        st = rig.svq.state(0)
        assert st.guest_last_avail == (guest_base + total) & 0xFFFF == st.guest_used
        assert st.shadow_avail == (shadow_base + total) & 0xFFFF == st.shadow_used


def test_guest_event_idx_suppresses_calls_and_publishes_avail_event() -> None:
    with Rig(1) as rig:
        q = rig.add_queue(0, 16, gflags=GuestFlags.EVENT_IDX)
        send_tx(rig, q, [payload(10, seed=i) for i in range(4)])
        rig.svq.poll()
        # avail_event tells the guest to kick for the next entry after what was consumed
        assert q.driver.needs_kick(q.driver.avail_idx) is False
        q.driver.add([rig.buf(8, b"x" * 8)])
        old = q.driver.avail_idx
        q.driver.publish()
        assert q.driver.needs_kick(old) is True
        # the guest asks to be called only once used passes index 3
        used_event_off = q.driver.layout.avail_off + 4 + 2 * q.driver.num
        rig.guest.mem[used_event_off : used_event_off + 2] = (3).to_bytes(2, "little")
        chains = q.dev.pop()
        for c in chains[:3]:
            q.dev.complete(c, 0)
        rig.svq.poll()
        assert take(q.guest_call) == 0  # used went 0 -> 3: event index 3 not crossed
        q.dev.complete(chains[3], 0)
        rig.svq.poll()
        assert take(q.guest_call) == 1  # used went 3 -> 4: crossed


def test_guest_no_interrupt_flag_suppresses_calls() -> None:
    with Rig(1) as rig:
        q = rig.add_queue(0, 8)
        q.driver.set_no_interrupt(True)
        send_tx(rig, q, [b"a" * 10])
        rig.svq.poll()
        for c in q.dev.pop():
            q.dev.complete(c, 0)
        rig.svq.poll()
        assert take(q.guest_call) == 0
        assert len(q.driver.poll_used()) == 1


def test_device_event_idx_and_no_notify() -> None:
    with Rig(2) as rig:
        q = rig.add_queue(0, 16, dflags=DevFlags.EVENT_IDX)
        q.dev.set_avail_event(2)  # device wants a kick once avail passes index 2
        send_tx(rig, q, [b"a" * 10, b"b" * 10])
        rig.svq.poll()
        assert take(q.dev_kick) == 0
        send_tx(rig, q, [b"c" * 10])
        rig.svq.poll()
        assert take(q.dev_kick) == 1
        # the core asks the device to call as soon as the next used entry lands
        assert q.dev.used_event() == 0
        chains = q.dev.pop()
        for c in chains:
            q.dev.complete(c, 0)
        rig.svq.poll()
        assert q.dev.used_event() == 3

        q2 = rig.add_queue(1, 16)
        q2.dev.set_no_notify(True)
        send_tx(rig, q2, [b"d" * 10])
        rig.svq.poll()
        assert take(q2.dev_kick) == 0
        assert len(q2.dev.pop()) == 1


def test_two_queue_pairs_independent() -> None:
    with Rig(4) as rig:
        qs = [rig.add_queue(v, 8, gflags=GuestFlags.RX if v % 2 == 0 else 0) for v in range(4)]
        rx_bufs = {v: post_rx(rig, qs[v], 2, 512) for v in (0, 2)}
        for v in (1, 3):
            send_tx(rig, qs[v], [payload(50 + v, seed=v)] * (v + 1))
        rig.svq.poll()
        for v in (1, 3):
            chains = qs[v].dev.pop()
            assert [qs[v].dev.read(c)[HDR:] for c in chains] == [payload(50 + v, seed=v)] * (v + 1)
            for c in chains:
                qs[v].dev.complete(c, 0)
            # loop TX back to the RX of the same pair, as vdpa_sim_net does
            rx = qs[v - 1]
            (rc,) = rx.dev.pop(limit=1)
            rx.dev.complete(rc, rx.dev.write(rc, net_hdr(1) + payload(50 + v, seed=v)))
        rig.svq.poll()
        for v in (0, 2):
            ((tok, _, ln),) = qs[v].driver.poll_used()
            got = rig.guest.read(rx_bufs[v][int(str(tok))].addr, ln)
            assert got == net_hdr(1) + payload(51 + v, seed=v + 1)
        assert [rig.svq.stats(v).packets for v in range(4)] == [1, 2, 1, 4]


def test_drain_moves_completes_and_rewinds_exactly() -> None:
    with Rig(1) as rig:
        q = rig.add_queue(0, 16, guest_base=0xFFFC, shadow_base=100, gflags=GuestFlags.RX)
        post_rx(rig, q, 6, 256)
        rig.svq.poll()
        consumed = q.dev.pop(limit=4)  # the device took 4 of the 6 before it was suspended
        q.dev.complete(consumed[2], q.dev.write(consumed[2], b"z" * 40))
        q.dev.complete(consumed[0], q.dev.write(consumed[0], b"y" * 30))
        base = rig.svq.drain(0, q.dev.last_avail)
        assert base == (0xFFFC + 4) & 0xFFFF
        used = q.driver.poll_used()
        # completed entries first in device order, then the consumed-but-unfinished ones with len 0
        assert [(tok, ln) for tok, _, ln in used] == [(2, 40), (0, 30), (1, 0), (3, 0)]
        assert q.driver.used_idx() == base  # the next owner finds nothing in flight before base
        assert q.driver.in_flight() == 2  # the two rewound chains still belong to the guest
        st = rig.svq.state(0)
        assert not st.guest_attached and not st.shadow_attached
        # nothing is written to guest memory after the drain: a late device completion goes nowhere
        snapshot = bytes(rig.guest.mem)
        q.dev.complete(consumed[1], 0)
        assert rig.svq.poll() == 0
        assert bytes(rig.guest.mem) == snapshot

        # the next owner (a fresh shadow ring) is offered exactly the rewound chains again
        q.dev = FakeDevice(rig.guest, rig.iova_shift, 16, 7, event_idx=False)
        rig.attach_guest(q, base, GuestFlags.RX)
        rig.svq.attach_shadow(
            0, num=16, desc=q.dev.desc, avail=q.dev.avail, used=q.dev.used, base=7, kick_fd=q.dev_kick,
            call_fd=q.dev_call,
        )  # fmt: skip
        rig.svq.poll()
        again = q.dev.pop()
        assert len(again) == 2
        for c in again:
            q.dev.complete(c, 0)
        rig.svq.poll()
        assert sorted(int(str(tok)) for tok, _, _ in q.driver.poll_used()) == [4, 5]


def test_drain_rejects_inconsistent_device_base_and_keeps_state() -> None:
    with Rig(1) as rig:
        q = rig.add_queue(0, 16)
        send_tx(rig, q, [b"a" * 10] * 3)
        rig.svq.poll()
        q.dev.pop()
        with pytest.raises(SvqError) as ei:
            rig.svq.drain(0, (q.dev.last_avail + 1) & 0xFFFF)  # claims to have consumed more than offered
        assert "last_avail" in ei.value.reason
        assert rig.svq.state(0).inflight == 3
        assert rig.svq.drain(0, q.dev.last_avail) == 3


def test_drain_while_running_is_refused() -> None:
    with Rig(1) as rig:
        rig.add_queue(0, 8)
        rig.svq.start()
        with pytest.raises(SvqError) as ei:
            rig.svq.drain(0, 0)
        assert ei.value.errno == 16  # EBUSY
        rig.svq.stop()


def test_dirty_log_marks_every_page_the_device_or_core_wrote() -> None:
    with Rig(1) as rig:
        log = bytearray(((rig.guest.gpa + rig.guest.size) // PAGE + 7) // 8)
        rig.svq.set_log(address_of(log), len(log))
        q = rig.add_queue(0, 16, gflags=GuestFlags.RX | GuestFlags.LOG | GuestFlags.EVENT_IDX)
        # buffers crossing page boundaries, and a chain of two buffers
        rx = [rig.buf(3 * PAGE, writable=True, align=PAGE) for _ in range(3)]
        q.driver.add([Buf(rx[0].addr + PAGE - 100, 2 * PAGE, True)], token=0)
        q.driver.add([Buf(rx[1].addr + 50, 200, True), Buf(rx[2].addr + PAGE + 1, PAGE, True)], token=1)
        q.driver.publish()
        tx = rig.buf(PAGE, b"r" * PAGE, align=PAGE)  # a readable buffer the device must not dirty
        rig.svq.poll()
        c0, c1 = q.dev.pop()
        q.dev.complete(c0, q.dev.write(c0, b"a" * (PAGE + 10)))  # two pages of the three the buffer spans
        q.dev.complete(c1, q.dev.write(c1, b"b" * 300))  # the whole first buffer, 100 B of the second
        rig.svq.poll()
        assert len(q.driver.poll_used()) == 2
        layout = q.driver.layout
        expected = set(q.dev.pages_written)
        expected |= set(pages(q.driver.used_addr, 4 + 8 * 2))  # used entries and used->idx
        expected |= set(pages(q.driver.used_addr + 4 + 8 * layout.num, 2))  # avail_event
        marked = {p for p in range(len(log) * 8) if log_bit(log, p)}
        assert expected <= marked
        assert (rx[0].addr + 2 * PAGE) // PAGE not in marked  # the part the device never wrote
        assert tx.addr // PAGE not in marked
        assert rig.svq.stats(0).dirty_pages == len(marked)


def test_dirty_log_too_small_breaks_only_that_vq() -> None:
    with Rig(2) as rig:
        log = bytearray(8)  # covers GPAs below 256 KiB only; guest memory starts at 1 MiB
        rig.svq.set_log(address_of(log), len(log))
        q = rig.add_queue(0, 8, gflags=GuestFlags.RX | GuestFlags.LOG)
        other = rig.add_queue(1, 8)
        post_rx(rig, q, 1)
        send_tx(rig, other, [b"t" * 20])
        rig.svq.poll()
        (c,) = q.dev.pop()
        q.dev.complete(c, q.dev.write(c, b"x" * 64))
        rig.svq.poll()
        assert "dirty log" in (rig.svq.error(0) or "")
        assert q.driver.used_idx() == 0  # never published without its log bits
        assert bytes(log) == bytes(8)
        assert len(other.dev.pop()) == 1


def test_set_vq_log_toggles_logging() -> None:
    with Rig(1) as rig:
        log = bytearray(128)
        rig.svq.set_log(address_of(log), len(log))
        q = rig.add_queue(0, 8, gflags=GuestFlags.RX)
        post_rx(rig, q, 2)
        rig.svq.poll()
        c0, c1 = q.dev.pop()
        q.dev.complete(c0, q.dev.write(c0, b"x" * 64))
        rig.svq.poll()
        assert not any(log)
        rig.svq.set_vq_log(0, True, q.driver.used_addr)
        q.dev.complete(c1, q.dev.write(c1, b"y" * 64))
        rig.svq.poll()
        assert any(log)


async def wait_count(fd: int) -> int:
    await trio.lowlevel.wait_readable(fd)
    return take(fd)


async def test_thread_forwards_on_kicks_and_calls() -> None:
    with Rig(2) as rig:
        q = rig.add_queue(1, 64)
        rig.svq.start()
        assert rig.svq.running
        with trio.fail_after(30):  # hang guard only
            for rnd in range(3):
                frames = [payload(64, seed=rnd * 10 + i) for i in range(4)]
                send_tx(rig, q, frames)
                os.eventfd_write(q.guest_kick, 1)
                got: list[bytes] = []
                while len(got) < 4:
                    await wait_count(q.dev_kick)
                    chains = q.dev.pop()
                    got += [q.dev.read(c)[HDR:] for c in chains]
                    for c in chains:
                        q.dev.complete(c, 0)
                assert got == frames
                os.eventfd_write(q.dev_call, 1)
                done: list[int] = []
                while len(done) < 4:
                    await wait_count(q.guest_call)
                    done += [int(str(tok)) for tok, _, _ in q.driver.poll_used()]
                assert sorted(done) == [0, 1, 2, 3]
        rig.svq.stop()
        st = rig.svq.stats(1)
        assert st.packets == 12 and st.guest_kicks >= 3 and st.device_calls >= 3


async def test_thread_busy_poll_needs_no_kicks_once_wake_ups_come_fast() -> None:
    with Rig(1) as rig:
        q = rig.add_queue(0, 16)
        rig.svq.set_busy_poll(1_000_000)  # every wake-up in this test is "fast" (well within 1 s)
        rig.svq.start()
        with trio.fail_after(30):
            # The first packet wakes the thread twice (guest kick, device call): two fast wake-ups in a row.
            send_tx(rig, q, [b"p" * 30])
            os.eventfd_write(q.guest_kick, 1)
            await wait_count(q.dev_kick)
            (c,) = q.dev.pop()
            q.dev.complete(c, 0)
            os.eventfd_write(q.dev_call, 1)
            await wait_count(q.guest_call)
            assert len(q.driver.poll_used()) == 1
            assert rig.svq.thread_stats().polls == 1  # ... so the thread polls after the completion it moved
            send_tx(rig, q, [b"q" * 30])  # no guest kick ...
            await wait_count(q.dev_kick)
            (c,) = q.dev.pop()
            q.dev.complete(c, 0)  # ... and no device call: busy polling must see both
            await wait_count(q.guest_call)
        assert len(q.driver.poll_used()) == 1
        assert rig.svq.thread_stats().yields > 0
        rig.svq.stop()


async def test_thread_does_not_poll_at_a_low_rate() -> None:
    """Packets far apart: every sleep outlasts the poll bound, so the thread sleeps at once each time (no CPU spent
    spinning after a lone packet), however many packets come."""
    with Rig(1) as rig:
        q = rig.add_queue(0, 16)
        rig.svq.set_busy_poll(50)
        rig.svq.start()
        with trio.fail_after(30):
            for i in range(5):
                await trio.sleep(0.02)
                send_tx(rig, q, [b"r" * 30])
                os.eventfd_write(q.guest_kick, 1)
                await wait_count(q.dev_kick)
                (c,) = q.dev.pop()
                await trio.sleep(0.02)
                q.dev.complete(c, 0)
                os.eventfd_write(q.dev_call, 1)
                await wait_count(q.guest_call)
                assert len(q.driver.poll_used()) == 1, i
        ts = rig.svq.thread_stats()
        assert ts.polls == 0 and ts.yields == 0, ts
        assert ts.sleeps >= 10, ts  # asleep between the kick and the call, and between packets
        rig.svq.stop()


async def test_configuration_while_running_pauses_and_resumes() -> None:
    with Rig(2) as rig:
        rig.svq.start()
        q = rig.add_queue(0, 8)  # attach while the thread runs
        log = bytearray(128)
        rig.svq.set_log(address_of(log), len(log))
        assert rig.svq.running
        with trio.fail_after(30):
            send_tx(rig, q, [b"k" * 10])
            os.eventfd_write(q.guest_kick, 1)
            await wait_count(q.dev_kick)
        assert len(q.dev.pop()) == 1
        rig.svq.stop()
        assert not rig.svq.running


def test_attach_rejects_bad_rings_with_reasons() -> None:
    with Rig(1) as rig:
        q = rig.add_queue(0, 8)
        d = q.driver
        end = rig.guest.gpa + rig.guest.size
        bad = {
            "num": dict(num=6),
            "misaligned": dict(desc=d.desc_addr + 8),
            "outside": dict(used=end - 16),
            "beyond": dict(avail=0x10),
        }
        for name, kw in bad.items():
            args = dict(num=8, desc=d.desc_addr, avail=d.avail_addr, used=d.used_addr, last_avail=0, kick_fd=-1,
                        call_fd=-1)  # fmt: skip
            args.update(kw)
            with pytest.raises(SvqError) as ei:
                rig.svq.attach_guest(0, **args)
            assert ei.value.errno in (22, 14), name  # EINVAL / EFAULT
        with pytest.raises(ValueError):
            rig.svq.attach_guest(5, num=8, desc=0, avail=0, used=0, last_avail=0, kick_fd=-1, call_fd=-1)


def test_regions_validated_and_rings_reresolved() -> None:
    from vduproxy.svq import Region

    with Rig(1) as rig:
        q = rig.add_queue(0, 8)
        g = rig.guest
        with pytest.raises(SvqError):
            rig.svq.set_regions([Region(0, 0x2000, g.local, 0), Region(0x1000, 0x2000, g.local, 0)])  # overlap
        with pytest.raises(SvqError):
            rig.svq.set_regions([Region(0, 0, g.local, 0)])  # empty
        # a new table without the ring's memory: the vq breaks instead of touching stale pointers
        rig.svq.set_regions([Region(0x1000_0000, PAGE, g.local, 0)])
        assert rig.svq.stats(0).broken
        assert "region" in (rig.svq.error(0) or "")
        send_tx(rig, q, [b"a"])
        assert rig.svq.poll() == 0


def test_closed_handle_and_fd_ownership() -> None:
    before = len(os.listdir("/proc/self/fd"))
    rig = Rig(2)
    rig.add_queue(0, 8)
    rig.add_queue(1, 8)
    rig.svq.start()
    rig.close()
    assert len(os.listdir("/proc/self/fd")) == before
    with pytest.raises(SvqError):
        rig.svq.poll()
    rig.svq.close()  # idempotent
