"""Software vDPA device: what happens when a frame finds its RX queue full.

Loopback `rx_full=wait` holds the TX chain (back-pressure, nothing lost) and resumes on an RX kick;
`rx_full=drop` (the vdpasim profile) drops like vdpa_sim_net. A TAP frame stays in the TAP's queue. The
wake-up tests put buffers in exactly when the device is asleep waiting for them and kick only when the device
asked for a kick, as a Linux driver does: a device that asked for the wrong kick never wakes up.
Also here: the guest offloads after feature negotiation.
"""

from __future__ import annotations

import os
import pathlib
import struct
import time
from collections.abc import Iterator

import pytest
from test_sim_datapath import WAIT_S, Guest, drain, frame_to, wait_until

from vduproxy.vdpa.device import BackendF
from vduproxy.vdpa.sim import SimConfigError, SimDevice, load_profile, parse_sim_spec, profile_from_dict
from vduproxy.virtio import NetF, Status
from vduproxy.vring import Buf

pytestmark = pytest.mark.unit

BCAST = b"\xff" * 6


@pytest.fixture
def dev() -> Iterator[SimDevice]:
    d = SimDevice("sim")  # rich: rx_full=wait, mergeable RX, event idx
    yield d
    d.close()


@pytest.fixture
def guest(dev: SimDevice) -> Iterator[Guest]:
    g = Guest(dev)
    yield g
    g.close()


def add_rx(g: Guest, count: int, size: int) -> bool:
    """Add RX buffers and kick only if the device asked for it (event idx / NO_NOTIFY); True if it kicked."""
    ring = g.rings[0]
    old = ring.avail_idx
    for _ in range(count):
        off = g.alloc(size)
        ring.add([Buf(g.iova(off), size, writable=True)], token=off)
    ring.publish()
    kick = ring.needs_kick(old)
    if kick:
        os.eventfd_write(g.kick[0], 1)
    return kick


def frames(n: int, size: int = 200) -> list[bytes]:
    return [frame_to(BCAST, f"frame {i:04} ".encode() * (size // 11)) for i in range(n)]


def wait_tx_held(dev: SimDevice, g: Guest, sent: int) -> None:
    """Until the device has seen every TX kick and is waiting for RX room."""
    wait_until(lambda: dev.vq_waits(1) >= 1 and dev.vq_stats(1).kicks >= sent, "TX waiting for RX room")


# ---------------------------------------------------------------- configuration


def test_rx_full_per_profile_and_spec() -> None:
    assert load_profile("rich").rx_full == "wait"
    assert load_profile("basic").rx_full == "wait"
    assert load_profile("vdpasim").rx_full == "drop"  # what the kernel's vdpa_sim_net does
    spec = parse_sim_spec("sim:profile=vdpasim,rx_full=wait")
    assert spec.rx_full == "wait" and "rx_full=wait" in str(spec)
    assert parse_sim_spec(str(spec)) == spec
    with SimDevice(spec) as dev:
        assert dev.profile.rx_full == "wait"
    with pytest.raises(SimConfigError, match="rx_full"):
        parse_sim_spec("sim:rx_full=maybe")
    with pytest.raises(SimConfigError, match="rx_full"):
        profile_from_dict("x", {"features": ["VERSION_1"], "rx_full": "block"})


# ---------------------------------------------------------------- loopback, rx_full=wait


def test_wait_holds_tx_until_rx_buffers_come(guest: Guest, dev: SimDevice) -> None:
    guest.start()
    sent = frames(6)
    add_rx(guest, 2, 2048)  # room for two: the rest waits
    for f in sent:
        guest.send(f)
    wait_tx_held(dev, guest, len(sent))
    got = guest.wait_used(0, count=2)
    # the third chain is neither completed nor consumed: a suspend now would hand it back to the driver
    assert guest.rings[1].used_idx() == 2
    assert dev.get_vring_base(1) == 2
    assert dev.vq_stats(0).dropped == 0 and dev.vq_stats(1).packets == 2
    assert add_rx(guest, 8, 2048), "the device must ask for a kick when it waits for RX buffers"
    got += guest.wait_used(0, count=4)
    guest.wait_used(1, count=4)
    assert [guest.received(e)[1] for e in got] == sent
    assert dev.vq_stats(0).dropped == 0
    assert dev.vq_stats(1).packets == len(sent)
    assert dev.vq_waits(1) == 1  # one episode, however many retries
    assert dev.get_vring_base(1) == len(sent)


def test_buffers_added_after_a_partial_wait_wake_the_device(guest: Guest, dev: SimDevice) -> None:
    """The lost wake-up: a frame needs three mergeable buffers, one is there. The device must ask for a kick
    on the *next* buffer (avail_event = what it saw), not on the one it already saw but could not use."""
    assert guest.features & NetF.RING_EVENT_IDX and guest.features & NetF.MRG_RXBUF
    guest.start()
    add_rx(guest, 1, 256)
    [big] = frames(1, size=600)
    guest.send(big)
    wait_tx_held(dev, guest, 1)
    assert guest.rings[0].used_idx() == 0  # nothing of a partial frame is published
    assert add_rx(guest, 2, 256), "no kick asked for: the device would sleep forever"
    used = guest.wait_used(0, count=3)
    nbuf, first = guest.received(used[0])
    rest = b"".join(bytes(guest.mv[off : off + n]) for off, _h, n in used[1:] if isinstance(off, int))
    assert nbuf == 3 and first + rest == big
    guest.wait_used(1)


def test_waiting_tx_sleeps(guest: Guest, dev: SimDevice) -> None:
    """Waiting must not busy-poll: with nothing happening, the thread runs no rounds."""
    guest.start()
    guest.send(frame_to(BCAST))
    wait_tx_held(dev, guest, 1)
    guest.send(frame_to(BCAST))  # a TX kick while waiting: one more look, then back to sleep
    wait_until(lambda: dev.vq_stats(1).kicks >= 2, "second TX kick")
    before = dev.rounds()
    time.sleep(0.3)
    # a spinning thread runs thousands of rounds meanwhile; a sleeping one none (one if a kick was late)
    assert dev.rounds() - before <= 1
    assert guest.rings[1].used_idx() == 0
    add_rx(guest, 2, 2048)
    assert len(guest.wait_used(0, count=2)) == 2


def test_wait_drops_what_no_buffer_can_ever_hold(dev: SimDevice) -> None:
    """Waiting is for room that will come; a frame too big for the driver's buffers is dropped instead of
    blocking the queue for good."""
    g = Guest(dev, features=dev.get_features() & ~NetF.MRG_RXBUF)
    try:
        g.start()
        add_rx(g, 1, 128)
        g.send(frame_to(BCAST, b"x" * 600))  # one buffer must hold it all without MRG_RXBUF
        g.wait_used(1)
        assert dev.vq_stats(0).dropped == 1 and dev.vq_waits(1) == 0
        small = frame_to(BCAST, b"fits")
        g.send(small)
        [rx] = g.wait_used(0)
        assert g.received(rx)[1] == small
    finally:
        g.close()


def test_wait_drops_a_frame_larger_than_the_whole_ring(guest: Guest, dev: SimDevice) -> None:
    guest.start()
    num = guest.rings[0].num
    add_rx(guest, num, 64)  # every slot holds a buffer and together they are still too small
    guest.send(frame_to(BCAST, b"y" * (num * 64)))
    guest.wait_used(1)
    assert dev.vq_stats(0).dropped == 1 and dev.vq_waits(1) == 0


def test_suspend_keeps_a_waiting_chain_for_the_driver(guest: Guest, dev: SimDevice) -> None:
    guest.start()
    f = frame_to(BCAST, b"kept across suspend")
    guest.send(f)
    wait_tx_held(dev, guest, 1)
    dev.suspend()
    assert dev.get_vring_base(1) == 0  # not consumed: a restarted device sends it again
    add_rx(guest, 1, 2048)
    dev.resume()
    [rx] = guest.wait_used(0)
    assert guest.received(rx)[1] == f


def test_every_pair_waits_on_its_own_rx(guest: Guest, dev: SimDevice) -> None:
    guest.start()
    assert guest.cvq_command(4, 0, struct.pack("<H", 2)) == 0  # MQ VQ_PAIRS_SET 2
    guest.send(frame_to(BCAST, b"pair 0"), vq=1)
    guest.send(frame_to(BCAST, b"pair 1"), vq=3)
    wait_until(lambda: dev.vq_waits(1) == 1 and dev.vq_waits(3) == 1, "both pairs waiting")
    guest.post_rx(2, count=1)
    [rx] = guest.wait_used(2)
    assert guest.received(rx)[1].endswith(b"pair 1")
    assert guest.rings[1].used_idx() == 0  # pair 0 still waits
    guest.post_rx(0, count=1)
    [rx] = guest.wait_used(0)
    assert guest.received(rx)[1].endswith(b"pair 0")


@pytest.mark.parametrize("spec", ["sim", "sim:profile=vdpasim"])
def test_tx_waits_while_rx_is_not_started(spec: str) -> None:
    """Like vdpa_sim_net (which leaves TX alone until RX is ready), in either rx_full mode."""
    with SimDevice(spec) as dev:
        g = Guest(dev)
        try:
            dev.set_vring_enable(0, False)
            g.start()
            f = frame_to(dev.get_config(0, 6), b"before RX started")
            g.send(f)
            wait_until(lambda: dev.vq_stats(1).kicks >= 1, "TX kick seen")
            assert g.rings[1].used_idx() == 0 and dev.get_vring_base(1) == 0
            assert dev.vq_stats(0).dropped == 0
            if dev.get_backend_features() & BackendF.ENABLE_AFTER_DRIVER_OK:  # rich: start RX late, then it flows
                g.post_rx(count=1)
                dev.set_vring_enable(0, True)
                [rx] = g.wait_used(0)
                assert g.received(rx)[1] == f
        finally:
            g.close()


# ---------------------------------------------------------------- loopback, rx_full=drop


def test_vdpasim_drops_and_completes_tx_when_rx_is_full() -> None:
    with SimDevice("sim:profile=vdpasim") as dev:
        g = Guest(dev)
        try:
            g.start()
            mac = dev.get_config(0, 6)
            g.send(frame_to(mac, b"nowhere to go"))
            g.wait_used(1)
            assert dev.vq_stats(0).dropped == 1 and dev.vq_waits(1) == 0
            assert dev.vq_stats(0).packets == 0
        finally:
            g.close()


# ---------------------------------------------------------------- TAP


def _tap_usable() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/net/tun")


class TapPeer:
    """The host side of the sim's TAP: the interface up without IPv6 chatter, and a raw socket on it."""

    def __init__(self, ifname: str) -> None:
        import fcntl
        import socket

        # no IPv6 autoconfiguration traffic: only the test's frames reach the device
        no_v6 = pathlib.Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6")
        if no_v6.exists():
            no_v6.write_text("1")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ctl:
            req = struct.pack("16sH14x", ifname.encode(), 0)
            flags = struct.unpack_from("<H", fcntl.ioctl(ctl, 0x8913, req), 16)[0]  # SIOCGIFFLAGS
            fcntl.ioctl(ctl, 0x8914, struct.pack("16sH14x", ifname.encode(), flags | 1))  # IFF_UP
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        self.sock.bind((ifname, 0))

    def close(self) -> None:
        self.sock.close()


def receive_ours(g: Guest, count: int) -> list[bytes]:
    """The test's frames (ethertype 0x88b5) among what RX 0 delivers, until `count` or the wait bound."""
    ours: list[bytes] = []
    deadline = time.monotonic() + WAIT_S
    while len(ours) < count and time.monotonic() < deadline:
        got = [g.received(e)[1] for e in g.rings[0].poll_used()]
        ours += [f for f in got if f[12:14] == b"\x88\xb5"]
        time.sleep(0.01)
        drain(g.call[0])
    return ours


@pytest.mark.skipif(not _tap_usable(), reason="needs root and /dev/net/tun")
def test_tap_frames_wait_in_the_tap_queue_while_rx_is_full() -> None:
    ifname = f"vdubp{os.getpid() % 100000}"
    with SimDevice(f"sim:profile=basic,tap={ifname},rx_full=wait") as dev:
        g = Guest(dev)
        peer = TapPeer(ifname)
        try:
            g.start()
            sent = [frame_to(BCAST, f"tap frame {i}".encode()) for i in range(8)]
            peer.sock.send(sent[0])
            wait_until(lambda: dev.vq_waits(0) == 1, "the device noticing a frame it has no room for")
            for f in sent[1:]:
                peer.sock.send(f)
            # the queued frames must not keep the thread busy: it stops polling the TAP until RX has room
            before = dev.rounds()
            time.sleep(0.3)
            assert dev.rounds() - before <= 1
            g.post_rx(count=2 * len(sent))  # room for whatever else the kernel sends out of the TAP
            assert receive_ours(g, len(sent)) == sent
            assert dev.vq_stats(0).dropped == 0
        finally:
            peer.close()
            g.close()


@pytest.mark.skipif(not _tap_usable(), reason="needs root and /dev/net/tun")
def test_tap_drops_like_a_nic_by_default() -> None:
    """A TAP is a network: by default a full RX drops what arrives, and later frames still get through."""
    ifname = f"vdubq{os.getpid() % 100000}"
    with SimDevice(f"sim:profile=basic,tap={ifname}") as dev:
        assert dev.profile.rx_full == "drop"
        g = Guest(dev)
        peer = TapPeer(ifname)
        try:
            g.start()
            lost = frame_to(BCAST, b"arrives while RX is full")
            peer.sock.send(lost)
            wait_until(lambda: dev.vq_stats(0).dropped >= 1, "the frame dropped")
            g.post_rx(count=8)
            later = frame_to(BCAST, b"arrives with room")
            peer.sock.send(later)
            assert receive_ours(g, 1) == [later]
            assert dev.vq_waits(0) == 0
        finally:
            peer.close()
            g.close()


# ---------------------------------------------------------------- guest offloads


OFFLOADS = NetF.GUEST_CSUM | NetF.GUEST_TSO4 | NetF.GUEST_TSO6 | NetF.GUEST_ECN | NetF.GUEST_UFO


def test_negotiated_guest_offloads_are_on_after_features_ok(tmp_path: pathlib.Path) -> None:
    """virtio 1.3 5.1.6.5.6.2: after feature negotiation every negotiated guest offload is enabled."""
    profile = tmp_path / "offloads.toml"
    profile.write_text(
        'features = ["VERSION_1", "ACCESS_PLATFORM", "MAC", "CTRL_VQ", "CTRL_GUEST_OFFLOADS", '
        '"GUEST_CSUM", "GUEST_TSO4", "GUEST_TSO6", "GUEST_ECN", "GUEST_UFO"]\n'
    )
    with SimDevice(f"sim:profile={profile}") as dev:
        base = NetF.VERSION_1 | NetF.ACCESS_PLATFORM | NetF.CTRL_VQ | NetF.CTRL_GUEST_OFFLOADS
        for negotiated in (OFFLOADS, NetF.GUEST_CSUM | NetF.GUEST_TSO6, NetF(0)):
            dev.set_status(0)
            assert dev.filter_state()["guest_offloads"] == 0  # nothing negotiated yet
            dev.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
            dev.set_features(int(base | negotiated))
            dev.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
            assert dev.filter_state()["guest_offloads"] == int(negotiated)


def test_guest_offloads_set_narrows_the_negotiated_default(dev: SimDevice) -> None:
    g = Guest(dev)
    try:
        g.start()
        assert dev.filter_state()["guest_offloads"] == int(NetF.GUEST_CSUM)  # rich offers GUEST_CSUM only
        assert g.cvq_command(5, 0, struct.pack("<Q", 0)) == 0  # GUEST_OFFLOADS_SET: all off
        assert dev.filter_state()["guest_offloads"] == 0
    finally:
        g.close()
