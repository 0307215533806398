"""A real QEMU 7.2 TCG guest (Debian's kernel, virtio_net) attached to a real `vduproxy serve`."""

from __future__ import annotations

from pathlib import Path

import pytest

from vduproxy.testing.initramfs import GuestImage
from vduproxy.testing.proxy import open_proxy
from vduproxy.testing.qemu import GuestConfig, open_guest
from vduproxy.virtio import NetF

pytestmark = pytest.mark.realclient

BOOT_TIMEOUT = 180.0  # TCG on a loaded 2-core machine: 5 s when quiet, much more when not


async def test_guest_driver_reaches_driver_ok(guest_image: GuestImage, sock_dir: Path, log_dir: Path) -> None:
    sock = sock_dir / "vdu.sock"
    async with open_proxy(sock, "sim:profile=rich", log_dir=log_dir) as proxy:
        config = GuestConfig(kernel=guest_image.kernel, initrd=guest_image.initrd, socket=sock)
        async with open_guest(config, log_dir=log_dir) as guest:
            marker = await guest.wait_marker(timeout=BOOT_TIMEOUT)
            # the guest sees a working virtio_net eth0 ...
            assert marker.driver == "virtio_net"
            assert marker.carrier
            assert marker.mac == config.mac
            assert marker.has_feature(32)  # VERSION_1
            # ... because QEMU started vhost-net against vduproxy: memory table, both rings, device running
            started = await proxy.wait_event("device_started", timeout=60, vqs=[0, 1])
            assert started["features"]
            seq = proxy.requests()
            for req in ("GET_FEATURES", "SET_FEATURES", "SET_MEM_TABLE", "SET_VRING_ADDR", "SET_VRING_KICK"):
                assert req in seq, seq
            # QEMU 7.2's order: negotiation first, the memory table before any ring address
            assert seq.index("GET_FEATURES") < seq.index("SET_FEATURES") < seq.index("SET_MEM_TABLE")
            assert seq.index("SET_MEM_TABLE") < seq.index("SET_VRING_ADDR")
            acked = [e for e in proxy.events("features_acked")]
            assert acked and int(acked[-1]["features"], 16) & NetF.VERSION_1
    # the proxy shut down cleanly on SIGTERM and removed its socket
    assert proxy.proc.returncode == 0, proxy.proc.output.tail()
    assert not sock.exists()
