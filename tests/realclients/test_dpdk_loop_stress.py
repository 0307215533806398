"""DPDK testpmd io closed loops through `vduproxy serve --svq never` and the sim loopback keep moving.

Regression test for loops that ran 1–2 M packets and then stopped for good (the benchmark's loop-passthrough
case, 1 run in 3). Nothing was asleep by mistake, the loop had run out of frames: the sim published a round's
RX frames before the TX completions of the same round, so testpmd, forwarding them at once, found its TX ring
full and dropped them (with tx_first 8 the whole loop at once); and the sim dropped frames that found the RX
ring empty. Now TX completions are published first and the rich profile holds TX while RX is full
(rx_full=wait).

Several short loops per burst size, since a loop stopped only every few runs. No timing is asserted: each
sample must show RX moving, with a generous bound on how long that may take; and with tx_first 8 (the whole
loop fits in the TX ring) not one frame may be lost.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from vduproxy.testing.dpdk import Testpmd, TestpmdConfig, VirtioUserVdev, open_testpmd
from vduproxy.testing.proxy import open_proxy

pytestmark = pytest.mark.realclient

LOOPS = 4  # fresh proxy and testpmd each time: one loop in three stopped before the fix
SAMPLES = 4  # RX counter readings per loop, at least SAMPLE_S apart
SAMPLE_S = 1.0
STALL_S = 20.0  # a loop whose RX stands still this long has stopped (a loaded machine is slow, not stopped)
DEVICE = "sim:profile=rich,backend=loopback"
BURST = 32  # testpmd's default burst: `start tx_first N` puts N * BURST frames in flight
RING = 256  # virtio-user's queue_size


async def rx_packets(pmd: Testpmd) -> int:
    return (await pmd.port_stats())[0].rx_packets


async def wait_rx_past(pmd: Testpmd, count: int, what: str) -> int:
    with trio.move_on_after(STALL_S) as scope:
        while (now := await rx_packets(pmd)) <= count:
            await trio.sleep(0.2)
    if scope.cancelled_caught:
        port = (await pmd.port_stats())[0]
        fwd = await pmd.command("show fwd stats all")
        pytest.fail(f"{what}: RX stopped at {count} packets\n{port}\n{fwd}", pytrace=False)
    return now


@pytest.mark.parametrize("tx_first", [8, 32])
async def test_closed_loop_keeps_moving(sock_dir: Path, log_dir: Path, tx_first: int) -> None:
    for loop in range(LOOPS):
        sock = sock_dir / f"loop{loop}.sock"
        what = f"tx_first {tx_first}, loop {loop + 1} of {LOOPS}"
        async with open_proxy(sock, DEVICE, ["--svq", "never"], log_dir=log_dir, name=f"vduproxy-{loop}") as proxy:
            cfg = TestpmdConfig(vdevs=[VirtioUserVdev(sock)], forward_mode="io")
            async with open_testpmd(cfg, log_dir=log_dir, name=f"testpmd-{loop}") as pmd:
                await proxy.wait_event("device_started", timeout=60, vqs=[0, 1])
                await pmd.start_forwarding(tx_first=tx_first)
                seen = 0
                for _ in range(SAMPLES):
                    await trio.sleep(SAMPLE_S)
                    seen = await wait_rx_past(pmd, seen, what)
                await pmd.stop_forwarding()
                # let what is still in the loop come back: every frame sent gets its chance
                await pmd.command("set fwd rxonly")
                await pmd.start_forwarding()
                await trio.sleep(1)
                fwd = await pmd.stop_forwarding()
                port = (await pmd.port_stats())[0]
                assert port.rx_errors == 0 and port.tx_errors == 0 and port.rx_missed == 0, port
                if tx_first * BURST <= RING:
                    # all in flight fits in the TX ring: testpmd never finds it full, the sim never drops
                    assert port.rx_packets == port.tx_packets, f"{what}: frames lost\n{port}\n{fwd}"
            assert proxy.proc.running, "the proxy died under the loop"
