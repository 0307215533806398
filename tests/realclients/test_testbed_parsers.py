"""The test bed's parsers and argument builders, without starting any process."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from vduproxy.testing.dpdk import TestpmdConfig, VhostVdev, VirtioUserVdev, parse_port_stats
from vduproxy.testing.procs import LineLog, OutputTimeout, ProcessExited
from vduproxy.testing.qemu import GuestConfig, GuestError, GuestMarker, PingResult

pytestmark = pytest.mark.realclient

# As dpdk-testpmd 22.11 prints it (two ports, the second block with throughput since the last show).
STATS = """
  ######################## NIC statistics for port 0  ########################
  RX-packets: 4598080    RX-missed: 3          RX-bytes:  294277120
  RX-errors: 1
  RX-nombuf:  2
  TX-packets: 4598112    TX-errors: 0          TX-bytes:  294279168

  Throughput (since last show)
  Rx-pps:            5          Rx-bps:            6
  Tx-pps:            7          Tx-bps:            8
  ############################################################################

  ######################## NIC statistics for port 1  ########################
  RX-packets: 19         RX-missed: 0          RX-bytes:  1450
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: 20         TX-errors: 0          TX-bytes:  1500

  Throughput (since last show)
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:            0          Tx-bps:            0
  ############################################################################
"""


def test_port_stats_keep_counters_and_rates_apart() -> None:
    stats = parse_port_stats(STATS)
    assert sorted(stats) == [0, 1]
    p0 = stats[0]
    assert (p0.rx_packets, p0.rx_missed, p0.rx_bytes, p0.rx_errors, p0.rx_nombuf) == (4598080, 3, 294277120, 1, 2)
    assert (p0.tx_packets, p0.tx_errors, p0.tx_bytes) == (4598112, 0, 294279168)
    assert (p0.rx_pps, p0.rx_bps, p0.tx_pps, p0.tx_bps) == (5, 6, 7, 8)
    assert (stats[1].rx_packets, stats[1].tx_bytes) == (19, 1500)


def test_port_stats_later_block_wins_and_truncated_block_is_ignored() -> None:
    later = STATS.replace("RX-packets: 19 ", "RX-packets: 99 ")
    truncated = later.rsplit("  ####", 1)[0]  # port 1's closing banner not printed yet
    stats = parse_port_stats(STATS + truncated)
    assert stats[1].rx_packets == 19
    assert parse_port_stats(STATS + later)[1].rx_packets == 99
    assert parse_port_stats("no stats here") == {}


def test_marker_decodes_sysfs_feature_bits() -> None:
    bits = ["0"] * 64
    for b in (0, 5, 32):
        bits[b] = "1"
    line = (
        "VDUP-MARKER eth0 up ip=10.0.2.15/24 mac=52:54:00:12:34:56 driver=virtio_net carrier=1 mtu=1500 "
        f"rx_queues=2 tx_queues=2 features={''.join(bits)} uptime=2.26"
    )
    m = GuestMarker.parse(line)
    assert m.features == (1 << 0) | (1 << 5) | (1 << 32)
    assert m.has_feature(32) and not m.has_feature(1)
    assert (m.rx_queues, m.carrier, m.mac) == (2, True, "52:54:00:12:34:56")
    with pytest.raises(GuestError, match="unparsable marker"):
        GuestMarker.parse("VDUP-MARKER eth0 up ip=10.0.2.15/24")


def test_ping_result_requires_the_summary_line() -> None:
    assert PingResult.parse("x\nVDUP-PING-RESULT sent=3 received=2 peer=10.0.2.2\n") == PingResult(3, 2, "10.0.2.2")
    with pytest.raises(GuestError):
        PingResult.parse("ping: sendto: Network unreachable")


def test_qemu_argv_carries_the_vhost_user_workarounds() -> None:
    cfg = GuestConfig(Path("/k"), Path("/i"), socket=Path("/tmp/s.sock"), queues=2, peermac=None, ping=3)
    argv = cfg.argv(Path("/tmp/q.sock"))
    joined = " ".join(argv)
    assert "-accel tcg" in joined and "kvm" not in joined
    assert "memory-backend-memfd,id=mem,size=512M,share=on" in argv
    assert "vhost-user,id=n0,chardev=c0,queues=2" in argv
    device = argv[argv.index("-device") + 1]
    assert "vectors=0" in device and "mq=on" in device
    append = argv[argv.index("-append") + 1]
    assert "lab.peermac=none" in append and "lab.ping=3" in append
    with pytest.raises(ValueError, match="107 bytes"):
        GuestConfig(Path("/k"), Path("/i"), socket=Path("/tmp/" + "x" * 120)).argv(Path("/tmp/q.sock"))
    with pytest.raises(ValueError, match="socket"):
        GuestConfig(Path("/k"), Path("/i")).argv(Path("/tmp/q.sock"))


def test_testpmd_argv() -> None:
    cfg = TestpmdConfig(
        vdevs=[VirtioUserVdev(Path("/tmp/a.sock"), queues=2, server=True, mrg_rxbuf=False), VhostVdev(Path("/tmp/b"))]
    )
    argv = cfg.argv("pfx")
    assert argv[:2] == ["env", "--ignore-signal=PIPE"]
    assert "net_virtio_user0,path=/tmp/a.sock,queues=2,queue_size=256,server=1,mrg_rxbuf=0" in argv
    assert "net_vhost1,iface=/tmp/b,queues=1" in argv
    assert "--file-prefix=pfx" in argv and "--no-huge" in argv and "--rxq=2" in argv
    with pytest.raises(ValueError):
        TestpmdConfig(vdevs=[], stats_period=1).argv("p")
    with pytest.raises(ValueError, match="non-interactive"):
        TestpmdConfig(vdevs=[VhostVdev(Path("/tmp/b"))], stats_period=1).argv("p")


async def test_line_log_waits_times_out_and_reports_eof() -> None:
    log = LineLog("t")
    log.feed(b"\x1bc\x1b[?7lboot\r\nhalf")
    assert log.lines[0].text == "boot"  # terminal control sequences and \r stripped
    idx, m = await log.wait_for(r"^ha(lf)$", 1, partial=True)
    assert (idx, m[1]) == (1, "lf")
    with pytest.raises(OutputTimeout) as timed_out:
        await log.wait_for("never", 0.05)
    assert "boot" in str(timed_out.value)  # the tail comes with the error

    async def feed_later() -> None:
        await trio.sleep(0.01)
        log.feed(b" done\nnext\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed_later)
        idx, _ = await log.wait_for("^next$", 10, since=1)
    assert log.lines[1].text == "half done" and idx == 2
    log.close()
    with pytest.raises(ProcessExited):
        await log.wait_for("never", 10)
