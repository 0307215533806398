"""The benchmarks' C-speed front-end (bench/cdriver.py + bench/txgen.c): it builds, and every case moves packets in
the mode it is named after, with the evidence a reader of the benchmark relies on. No speed is asserted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import _txgen_build, cdriver
from bench.cdriver import ALL_CASES, CaseResult, DriverOptions, TxGen, TxGenError, load_txgen, parse_case
from vduproxy.testing.guest import GuestMemory, VirtioNetDriver

pytestmark = pytest.mark.integration

CPUS = sorted(os.sched_getaffinity(0))
SENDER, BACKEND = CPUS[-1], CPUS[0]


async def run(case: str, size: int, tmp_path: Path) -> CaseResult:
    return await cdriver.measure(
        case, size, windows=2, duration=0.3, warmup=0.2, sender_cpu=SENDER, backend_cpu=BACKEND,
        log_dir=tmp_path / "logs",
    )  # fmt: skip


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_driver_builds_into_the_cache_keyed_by_its_source(tmp_path: Path) -> None:
    path = _txgen_build.build(tmp_path)
    assert path.is_file() and path.parent.name == _txgen_build.source_hash()
    assert _txgen_build.build(tmp_path) == path  # built once
    _, lib = load_txgen()
    assert lib.txgen_abi_version() == _txgen_build.ABI_VERSION


@pytest.mark.parametrize("case", ALL_CASES)
async def test_case_moves_packets_in_the_mode_it_names(case: str, tmp_path: Path) -> None:
    c = parse_case(case)
    r = await run(case, 64, tmp_path)
    assert len(r.samples) == 2 and all(w["packets"] > 0 for w in r.windows), r.windows
    assert r.mode == c.expected_mode
    drv = r.evidence["driver"]
    assert drv["tx_packets"] > 0
    if c.target == "device":
        # the device's own counter agrees with the driver's (it may have consumed a last burst after the run)
        assert r.evidence["device_tx_packets"] >= drv["tx_packets"]
        assert r.evidence["device_faults"] == 0
        threads = r.evidence["negotiated"]["threads"]
        main = str(r.pids["driver"])
        assert threads[main] == [SENDER]
        assert [cpus for tid, cpus in threads.items() if tid != main] == [[BACKEND]], threads
    else:
        assert r.evidence["proxy_threads_pinned"] >= 1
        assert r.evidence["proxy_start"]["mode"] == c.expected_mode
    if c.loop:
        # frames that made the round trip: counted, and a sample compared byte for byte with what was sent
        assert drv["rx_packets"] > 0 and all(w["rx_packets"] > 0 for w in r.windows)
        assert drv["rx_verified"] > 0 and drv["rx_mismatch"] == 0 and drv["rx_bad_len"] == 0
        check = r.evidence["rx_check"]
        assert check["checked"] > 0 and check["matched"] == check["checked"], check
    if c.dirty_log:
        assert r.evidence["dirty_log"] is True
        assert True in r.evidence["proxy_events"]["dirty_logging"]
        for w in r.windows:
            # the device path wrote used entries (and, in loop, every RX buffer): those pages are in the log,
            # the TX frames it only read are not
            assert w["dirty_pages"] > 0 and w["used_ring_pages_dirty"] >= 1, w
            assert w["tx_frame_pages_dirty"] == 0, w
            if c.loop:
                assert w["rx_pages_dirty"] == w["rx_pages"] > 0, w
    else:
        assert r.evidence["dirty_log"] is False
        assert r.evidence["negotiated"]["dirty_log_bytes"] is None
        assert not any("dirty_pages" in w for w in r.windows)
    # torn down by PID
    assert all(gone(pid) for pid in r.pids.values()), r.pids


async def test_full_size_frames_come_back_byte_exact_through_the_svq_with_logging(tmp_path: Path) -> None:
    r = await run("svq-log-loop", 1500, tmp_path)
    drv = r.evidence["driver"]
    assert r.mode == "svq" and drv["rx_verified"] > 0 and drv["rx_mismatch"] == 0 and drv["rx_bad_len"] == 0
    assert all(w["rx_pages_dirty"] == w["rx_pages"] for w in r.windows)


# What a broken device writes into the TX used ring (offsets from the used ring's start), and what the driver says.
BAD_DEVICES = {
    # a used id it never posted
    "foreign-id": ({4: (1000).to_bytes(4, "little") + (0).to_bytes(4, "little"), 2: (1).to_bytes(2, "little")},
                   "does not own"),
    # the used index moved past everything in flight
    "index-too-far": ({2: (65).to_bytes(2, "little")}, "more than the ring size"),
}  # fmt: skip


@pytest.mark.parametrize("bad", BAD_DEVICES, ids=list(BAD_DEVICES))
def test_a_device_writing_a_bad_used_ring_stops_the_run(bad: str) -> None:
    """The driver checks what the device writes: a bad used ring is an error, not a crash or a hang."""
    writes, error = BAD_DEVICES[bad]
    with GuestMemory(4 << 20) as mem:
        driver = VirtioNetDriver(mem, queue_size=64, rx_buf_size=64, tx_buf_size=64, tx_chunk=64)
        gen = TxGen(mem, driver, size=64, loop=False, opts=DriverOptions(ring=64))
        try:
            gen.start()  # all 64 TX descriptors posted; nobody consumes them
            used = driver.tx().area.offset + driver.tx().layout.used_off
            for off, data in writes.items():  # the entry before the index, as a device publishes
                mem.buf[used + off : used + off + len(data)] = data
            with pytest.raises(TxGenError, match=error):
                gen.run(0.05)
        finally:
            gen.close()
            driver.close()


def test_bad_parameters_are_refused() -> None:
    with GuestMemory(4 << 20) as mem:
        driver = VirtioNetDriver(mem, queue_size=64, rx_buf_size=64, tx_buf_size=64, tx_chunk=64)
        try:
            with pytest.raises(TxGenError, match="frame length"):
                TxGen(mem, driver, size=40, loop=False, opts=DriverOptions(ring=64))
        finally:
            driver.close()
