"""The test bed works on its own, before vduproxy is put in the middle.

- A QEMU TCG guest (slirp networking) boots to the marker, answers over the serial agent, pings slirp's
  gateway, sends a TCP stream whose checksum matches what the host received, and is torn down by PID.
- dpdk-testpmd virtio-user (front-end) and dpdk-testpmd vhost PMD (back-end) exchange packets in both
  directions, and their DPDK runtime directories are gone afterwards.
- A TAP in the host namespace reaches an address in a fresh network namespace and back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from vduproxy.testing.dpdk import DPDK_RUN_DIR, TestpmdConfig, VhostVdev, VirtioUserVdev, open_testpmd
from vduproxy.testing.initramfs import GuestImage, build_initramfs
from vduproxy.testing.netns import close_tap, open_tap, open_tap_peer, read_frame, write_frame
from vduproxy.testing.procs import ProcessExited
from vduproxy.testing.qemu import GuestConfig, free_tcp_port, open_guest

pytestmark = pytest.mark.realclient

VIRTIO_F_VERSION_1 = 32
GUEST_MAC = "52:54:00:12:34:56"


def test_initramfs_is_cached_and_complete(guest_image: GuestImage, tmp_path: Path) -> None:
    assert guest_image.initrd.stat().st_size > 0
    assert guest_image.modules[-1] == "virtio_net.ko"  # dependencies load first
    assert "virtio_pci.ko" in guest_image.modules
    # The same inputs hit the cache; a different /init gets its own archive.
    assert build_initramfs(guest_image.kver).initrd == guest_image.initrd
    other = build_initramfs(guest_image.kver, init="#!/bin/sh\nexec sh\n", cache=tmp_path)
    assert other.initrd != guest_image.initrd
    assert other.initrd.parent == tmp_path


async def test_qemu_guest_boots_and_talks(guest_image: GuestImage, log_dir: Path) -> None:
    received: list[bytes] = []
    done = trio.Event()

    async def receive_one(stream: trio.SocketStream) -> None:
        chunks = []
        async for chunk in stream:
            chunks.append(bytes(chunk))
        received.append(b"".join(chunks))
        done.set()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    # slirp answers ARP for its gateway 10.0.2.2 and maps it to the host's 127.0.0.1.
    config = GuestConfig(guest_image.kernel, guest_image.initrd, net="user", mac=GUEST_MAC, peermac=None)
    with trio.fail_after(180):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, receive_one, listeners)
            async with open_guest(config, log_dir=log_dir) as guest:
                marker = await guest.wait_marker()
                assert marker.driver == "virtio_net"
                assert marker.carrier
                assert marker.mac == GUEST_MAC
                assert marker.ip == config.ip
                assert marker.has_feature(VIRTIO_F_VERSION_1)
                assert (marker.rx_queues, marker.tx_queues) == (1, 1)

                res = await guest.run("echo hello from $(uname -r); false")
                assert res.rc == 1
                assert res.output == f"hello from {guest_image.kver}"

                ping = await guest.ping(3)
                assert ping.sent == 3
                assert ping.received == 3

                sent = await guest.run(f"vdup_send 10.0.2.2 {port} 100000")
                await done.wait()
                assert "VDUP-SENT rc=0" in sent.output
                assert f"VDUP-MD5 {hashlib.md5(received[0]).hexdigest()} bytes=100000" in sent.output

                assert await guest.query_status() == "running"
                pid = guest.pid
            nursery.cancel_scope.cancel()
    assert guest.process.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_qemu_guest_runs_boot_command_and_powers_off(guest_image: GuestImage, log_dir: Path) -> None:
    config = GuestConfig(
        guest_image.kernel,
        guest_image.initrd,
        net="user",
        peermac=None,
        boot_cmd="echo boot-cmd-ran; cat /proc/cmdline",
        poweroff=True,
    )
    with trio.fail_after(180):
        async with open_guest(config, log_dir=log_dir) as guest:
            await guest.wait_for(r"^VDUP-BEGIN boot$")
            await guest.wait_for(r"^boot-cmd-ran$")
            await guest.wait_for(r"^VDUP-END boot rc=0$")
            assert await guest.wait_exit() == 0
            # The agent never starts on a powered-off guest: run() reports the exit instead of hanging.
            with pytest.raises(ProcessExited):
                await guest.run("true")


async def test_testpmd_virtio_user_exchanges_packets_with_vhost_pmd(sock_dir: Path, log_dir: Path) -> None:
    sock = sock_dir / "vhu.sock"
    backend = TestpmdConfig(vdevs=[VhostVdev(sock)], forward_mode="io")
    frontend = TestpmdConfig(vdevs=[VirtioUserVdev(sock)], forward_mode="io")
    with trio.fail_after(90):
        async with open_testpmd(backend, name="be", log_dir=log_dir) as be:
            async with open_testpmd(frontend, name="fe", log_dir=log_dir) as fe:
                await be.start_forwarding()
                # io <-> io is a closed loop: the front-end's first burst keeps circulating.
                await fe.start_forwarding(tx_first=1)
                while True:
                    fe_stats, be_stats = (await fe.port_stats())[0], (await be.port_stats())[0]
                    if fe_stats.rx_packets > 0 and be_stats.rx_packets > 0:
                        break
                    await trio.sleep(0.2)
                await fe.stop_forwarding()
                await be.stop_forwarding()
                fe_stats, be_stats = (await fe.port_stats())[0], (await be.port_stats())[0]
            prefixes = [be.file_prefix, fe.file_prefix]
    # Everything the front-end sent, the back-end received, and vice versa (nothing invented on the way).
    assert 0 < be_stats.rx_packets <= fe_stats.tx_packets
    assert 0 < fe_stats.rx_packets <= be_stats.tx_packets
    assert be_stats.rx_bytes > 0 and fe_stats.rx_bytes > 0
    assert fe.process.returncode == 0 and be.process.returncode == 0
    assert not any((DPDK_RUN_DIR / p).exists() for p in prefixes)


async def test_qemu_guest_over_vhost_user_to_testpmd_and_migration(
    guest_image: GuestImage, sock_dir: Path, log_dir: Path
) -> None:
    """The reference the vduproxy tests replace: DPDK's vhost PMD (5tswap echo) as back-end of both ends."""
    src_sock, dst_sock = sock_dir / "src.sock", sock_dir / "dst.sock"
    backend = TestpmdConfig(vdevs=[VhostVdev(src_sock), VhostVdev(dst_sock)], forward_mode="5tswap", auto_start=True)
    src_cfg = GuestConfig(guest_image.kernel, guest_image.initrd, socket=src_sock, mac=GUEST_MAC, loop=True)
    port = free_tcp_port()
    dst_cfg = dataclasses.replace(src_cfg, socket=dst_sock, incoming=f"tcp:127.0.0.1:{port}")
    with trio.fail_after(240):
        async with (
            open_testpmd(backend, name="be", log_dir=log_dir) as pmd,
            open_guest(src_cfg, name="src", log_dir=log_dir) as src,
        ):
            marker = await src.wait_marker()
            assert marker.driver == "virtio_net" and marker.carrier
            assert marker.has_feature(VIRTIO_F_VERSION_1)
            ping = await src.ping(5)
            assert ping.received == ping.sent == 5
            async with open_guest(dst_cfg, name="dst", log_dir=log_dir) as dst:
                assert await dst.query_status() == "inmigrate"
                info = await src.migrate(f"tcp:127.0.0.1:{port}")
                assert info["status"] == "completed"
                assert await src.query_status() == "postmigrate"
                assert await dst.query_status() == "running"
                # The guest carries on at the destination: its pings are answered, its agent replies.
                since = dst.output.mark()
                await dst.wait_for(r"^VDUP-TICK .*ping=ok", since=since)
                assert (await dst.run("echo still here")).output == "still here"
            stats = await pmd.port_stats()
    assert stats[0].rx_packets > 0  # the source's back-end port
    assert stats[1].rx_packets > 0  # the destination's, after the switchover
    assert stats[1].tx_packets > 0


def _arp_reply(src_mac: bytes, src_ip: bytes, dst_mac: bytes, dst_ip: bytes) -> bytes:
    eth = dst_mac + src_mac + struct.pack("!H", 0x0806)
    return eth + struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, src_mac, src_ip, dst_mac, dst_ip)


async def test_tap_reaches_namespace_peer(require_kernel_feature: Callable[[str], Awaitable[None]]) -> None:
    for feature in ("tun", "netns", "veth", "bridge"):
        await require_kernel_feature(feature)
    guest_ip, guest_mac = bytes([10, 0, 2, 15]), bytes.fromhex("525400123456")
    with trio.fail_after(60):
        async with open_tap_peer("10.0.2.2/24") as peer:
            fd = open_tap(peer.tap)
            try:
                async with trio.open_nursery() as nursery:

                    async def ping_from_namespace() -> None:
                        # busybox (a test-bed requirement) rather than iputils, which the image may lack.
                        argv = ["busybox", "ping", "-c", "30", "-i", "0.2", "-W", "1", "10.0.2.15"]
                        res = await peer.ns.exec(*argv, check=False)
                        # rc 1 is "no reply", expected until the ARP answer; anything else is a broken bed.
                        assert res.returncode in (0, 1), res.stderr

                    nursery.start_soon(ping_from_namespace)
                    # Namespace -> TAP: the peer's ARP request for the "guest" arrives on the TAP.
                    while True:
                        frame = await read_frame(fd)
                        if frame[12:14] == b"\x08\x06" and frame[38:42] == guest_ip:
                            break
                    assert frame[6:12] == bytes.fromhex(peer.mac.replace(":", ""))
                    # TAP -> namespace: answer it, and the peer's ICMP echo request follows.
                    write_frame(fd, _arp_reply(guest_mac, guest_ip, frame[6:12], frame[28:32]))
                    while True:
                        frame = await read_frame(fd)
                        if frame[12:14] == b"\x08\x00" and frame[23] == 1 and frame[30:34] == guest_ip:
                            break
                    assert frame[0:6] == guest_mac
                    nursery.cancel_scope.cancel()
            finally:
                close_tap(fd)
        ns_name = peer.ns.name
    # Nothing left behind: namespace and host-side interfaces are gone.
    assert not Path(f"/run/netns/{ns_name}").exists()
    assert not Path(f"/sys/class/net/{peer.tap}").exists()
    assert not Path(f"/sys/class/net/{peer.bridge}").exists()
