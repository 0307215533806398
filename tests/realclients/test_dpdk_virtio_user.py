"""DPDK 22.11 testpmd's virtio-user as the front-end of a real `vduproxy serve` on the software device."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from vduproxy.testing.dpdk import TestpmdConfig, VirtioUserVdev, open_testpmd
from vduproxy.testing.proxy import open_proxy

pytestmark = pytest.mark.realclient

PACKETS = 1_000_000


async def test_testpmd_startup_sequence(sock_dir: Path, log_dir: Path) -> None:
    sock = sock_dir / "vdu.sock"
    async with open_proxy(sock, "sim:profile=rich", log_dir=log_dir) as proxy:
        cfg = TestpmdConfig(vdevs=[VirtioUserVdev(sock)])
        async with open_testpmd(cfg, log_dir=log_dir) as pmd:
            await proxy.wait_event("device_started", timeout=60, vqs=[0, 1])
            seq = proxy.requests()
            # virtio-user's own order (test-bed report): SET_OWNER first, CALL fds before SET_FEATURES
            assert seq[0] == "SET_OWNER", seq
            assert seq.index("SET_VRING_CALL") < seq.index("SET_FEATURES") < seq.index("SET_MEM_TABLE")
            stats = await pmd.port_stats()
            assert 0 in stats
        # testpmd quit: the proxy saw the stop sequence and the front-end go away, and keeps serving
        await proxy.wait_event("frontend_disconnected", timeout=30)
        assert "GET_VRING_BASE" in proxy.requests()
        assert proxy.proc.running


async def test_testpmd_closed_loop_million_packets(sock_dir: Path, log_dir: Path) -> None:
    """io forwarding with tx_first through proxy → sim loopback: nothing lost, nothing duplicated."""
    sock = sock_dir / "vdu.sock"
    async with open_proxy(sock, "sim:profile=rich", log_dir=log_dir) as proxy:
        cfg = TestpmdConfig(vdevs=[VirtioUserVdev(sock)], forward_mode="io")
        async with open_testpmd(cfg, log_dir=log_dir) as pmd:
            await proxy.wait_event("device_started", timeout=60, vqs=[0, 1])
            await pmd.start_forwarding(tx_first=1)
            with trio.fail_after(600):
                while (await pmd.port_stats())[0].rx_packets < PACKETS:
                    await trio.sleep(1)
            await pmd.stop_forwarding()
            # Drain what is still in the loop, so every frame sent has had its chance to come back.
            await pmd.command("set fwd rxonly")
            await pmd.start_forwarding()
            await trio.sleep(2)
            await pmd.stop_forwarding()
            port = (await pmd.port_stats())[0]
            assert port.rx_packets >= PACKETS
            assert port.rx_packets == port.tx_packets, port
            assert port.rx_missed == 0 and port.rx_errors == 0 and port.tx_errors == 0, port
