"""The migration-downtime benchmark's pure parts: query-migrate parsing, the guest's counters, statistics,
the comparison and its text/JSON output, the command-line checks. No QEMU or back-end is started."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any

import pytest

from bench import migration
from bench.migration import (
    TARGET_MS,
    DowntimeComparison,
    DowntimeResult,
    MigrationSample,
    MigrationSettings,
    parse_guest_stats,
    parse_query_migrate,
    render_text,
    rx_delta,
)

pytestmark = pytest.mark.unit

# A completed query-migrate as QEMU 7.2 returns it (trimmed ram block).
COMPLETED: dict[str, Any] = {
    "expected-downtime": 300,
    "status": "completed",
    "setup-time": 5,
    "downtime": 36,
    "total-time": 2829,
    "ram": {
        "total": 537395200,
        "transferred": 88861072,
        "duplicate": 109743,
        "normal": 21489,
        "dirty-sync-count": 3,
        "mbps": 251.7,
    },
}


def sample(index: int, downtime: float, *, rx: int | None = 5, total: float = 1000.0) -> MigrationSample:
    return MigrationSample(
        index=index,
        source="a" if index % 2 else "b",
        destination="b" if index % 2 else "a",
        downtime_ms=downtime,
        total_ms=total,
        setup_ms=4.0,
        transferred_bytes=88_000_000,
        wall_s=1.0,
        console_ok=True,
        rx_frames=rx,
        load1=0.5,
    )


def result(backend: migration.Backend, downtimes: list[float], error: str | None = None) -> DowntimeResult:
    return DowntimeResult(backend, [sample(i + 1, d) for i, d in enumerate(downtimes)], error=error)


# ---- query-migrate ---------------------------------------------------------------------------------------


def test_parse_query_migrate_completed() -> None:
    t = parse_query_migrate(COMPLETED)
    assert (t.downtime_ms, t.total_ms, t.setup_ms) == (36.0, 2829.0, 5.0)
    assert t.transferred_bytes == 88861072
    assert t.ram["dirty-sync-count"] == 3


def test_parse_query_migrate_without_optional_fields() -> None:
    t = parse_query_migrate({"status": "completed", "downtime": 7, "total-time": 900})
    assert (t.downtime_ms, t.setup_ms, t.transferred_bytes, t.ram) == (7.0, None, None, {})


@pytest.mark.parametrize(
    "info, match",
    [
        ({"status": "active", "total-time": 100, "expected-downtime": 300}, "status 'active'"),
        ({"status": "failed", "error-desc": "Unable to write to socket"}, "Unable to write"),
        ({}, "status None"),
        ({"status": "completed", "total-time": 10}, "without downtime"),
        ({"status": "completed", "downtime": "soon", "total-time": 10}, "without downtime"),
        ({"status": "completed", "downtime": -1, "total-time": 10}, "negative"),
    ],
)
def test_parse_query_migrate_rejects(info: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_query_migrate(info)


# ---- the guest's counters --------------------------------------------------------------------------------


def test_guest_stats_and_rx_delta() -> None:
    out = "rx_pkts=12 tx_pkts=30\n[    5.1] virtio_net noise\nrx_pkts=17 tx_pkts=34"
    assert parse_guest_stats(out) == [(12, 30), (17, 34)]
    assert rx_delta(out) == 5


@pytest.mark.parametrize("out", ["", "rx_pkts=3 tx_pkts=4", "no counters at all"])
def test_rx_delta_needs_two_lines(out: str) -> None:
    assert rx_delta(out) is None


def test_alive_command_prints_the_counters_twice() -> None:
    cmd = migration.ALIVE_COMMAND.format(peer="10.0.2.2")
    assert cmd.count("vdup_stats") == 2 and "10.0.2.2" in cmd


def test_sample_net_ok() -> None:
    assert sample(1, 10, rx=3).net_ok
    assert not sample(1, 10, rx=0).net_ok
    assert not sample(1, 10, rx=None).net_ok
    assert sample(1, 10).to_json()["net_ok"] is True


# ---- statistics and the comparison -----------------------------------------------------------------------


def test_result_summaries() -> None:
    r = result("vduproxy", [40, 10, 30, 20, 50])
    d = r.downtime()
    assert d is not None
    assert (d.median, d.minimum, d.maximum, d.count) == (30, 10, 50, 5)
    assert d.spread == pytest.approx(40 / 30)
    assert r.setup() is not None and r.setup().median == 4.0  # type: ignore[union-attr]
    assert result("dpdk", []).downtime() is None


def test_difference_and_target() -> None:
    cmp = DowntimeComparison({"vduproxy": result("vduproxy", [31, 30, 29]), "dpdk": result("dpdk", [28, 29, 40])})
    assert cmp.difference_ms() == pytest.approx(30 - 29)
    assert cmp.target_met() is True
    cmp.results["vduproxy"] = result("vduproxy", [29 + TARGET_MS + 0.5] * 3)
    assert cmp.target_met() is False
    # exactly at the limit still meets "within 2 ms"
    cmp.results["vduproxy"] = result("vduproxy", [29 + TARGET_MS] * 3)
    assert cmp.target_met() is True


def test_difference_needs_both_medians() -> None:
    assert DowntimeComparison({"vduproxy": result("vduproxy", [30])}).difference_ms() is None
    cmp = DowntimeComparison({"vduproxy": result("vduproxy", [30]), "dpdk": result("dpdk", [], error="set-up: x")})
    assert cmp.difference_ms() is None and cmp.target_met() is None


def test_json_round_trips_through_the_json_module() -> None:
    cmp = DowntimeComparison(
        {"vduproxy": result("vduproxy", [30, 32]), "dpdk": result("dpdk", [20, 22])},
        settings=MigrationSettings().describe(),
        machine={"qemu": "QEMU emulator version 7.2.22"},
    )
    data = json.loads(json.dumps(cmp.to_json()))
    assert data["difference_ms"] == pytest.approx(10.0)
    assert data["target_met"] is False and data["target_ms"] == TARGET_MS
    assert data["results"]["dpdk"]["downtime_ms"]["median"] == 21.0
    assert [s["downtime_ms"] for s in data["results"]["vduproxy"]["samples"]] == [30, 32]
    assert data["settings"]["capabilities"] == {"return-path": True}


def test_render_text_lists_every_migration_and_the_verdict() -> None:
    cmp = DowntimeComparison({"vduproxy": result("vduproxy", [31, 30, 29]), "dpdk": result("dpdk", [28, 29, 40])})
    cmp.results["dpdk"].samples[1].rx_frames = 0
    text = render_text(cmp)
    assert text.count("\nvduproxy ") == 3 and text.count("\ndpdk ") == 3
    assert "NO FRAMES RECEIVED" in text
    assert "vduproxy: median downtime 30.0 ms" in text and "dpdk: median downtime 29.0 ms" in text
    assert "difference (vduproxy - dpdk): +1.0 ms" in text and ": met" in text


def test_render_text_reports_a_run_that_stopped() -> None:
    cmp = DowntimeComparison({"vduproxy": result("vduproxy", [], error="RigError: boom"), "dpdk": result("dpdk", [9])})
    text = render_text(cmp)
    assert "vduproxy: no completed migration (RigError: boom)" in text
    assert "difference" not in text


# ---- settings and the command line -----------------------------------------------------------------------


def test_settings_capabilities() -> None:
    assert MigrationSettings().capabilities() == [{"capability": "return-path", "state": True}]
    assert MigrationSettings(return_path=False).describe()["capabilities"] == {"return-path": False}


@pytest.mark.parametrize("argv", [["--backends", "vduproxy,ovs"], ["--count", "0"], ["--backends", ","]])
def test_main_rejects_bad_arguments(argv: list[str]) -> None:
    assert migration.main(argv) == 2


def test_cpu_ms_of_this_process_and_of_a_missing_one() -> None:
    mine = migration.cpu_ms(os.getpid())
    assert mine is not None and mine >= 0
    assert migration.cpu_ms(2**22 + 12345) is None  # above the largest pid_max Linux allows (2^22)


# ---- QEMU trace: where the downtime went -----------------------------------------------------------------

# A QEMU that was first a destination and then the source of the next migration (LineLog text: no prefix),
# with console lines and a migrate_pending line in between; and the next destination.
SOURCE_TRACE = """\
28363@1795734386.718237:migrate_set_state new state active
28363@1795734386.720825:loadvm_state_setup
28363@1795734387.940969:qemu_loadvm_state_post_main 0
28363@1795734387.941141:vhost_dev_start 0x55fe5ef99470:virtio-net vrings:0
28363@1795734387.945020:migrate_set_state new state completed
VDUP-BEGIN 1
rx_pkts=13 tx_pkts=11
28363@1795734391.994084:migrate_set_state new state setup
28370@1795734392.000000:migrate_set_state new state active
28370@1795734392.500000:migrate_pending pending size 1234 max 5678 (pre = 0 compat=1234 post=0)
28370@1795734393.000000:vhost_dev_stop 0x55fe5ef99470:virtio-net vrings:0
28370@1795734393.004500:migration_completion_vm_stop ret 0
28370@1795734393.004600:savevm_state_complete_precopy
28370@1795734393.006100:migration_return_path_end_before
28370@1795734393.050100:migration_return_path_end_after 0
28370@1795734393.050200:migrate_set_state new state completed
"""
DEST_TRACE = """\
28400@1795734392.000100:migrate_set_state new state active
28400@1795734392.000200:loadvm_state_setup
28400@1795734393.040000:qemu_loadvm_state_post_main 0
28400@1795734393.040100:vhost_dev_start 0x55fe5ef99470:virtio-net vrings:0
28400@1795734393.049100:migrate_set_state new state completed
"""


def test_parse_trace() -> None:
    events = migration.parse_trace(SOURCE_TRACE)
    assert len(events) == 14  # console lines skipped
    assert events[1] == migration.TraceEvent(1795734386.720825, "loadvm_state_setup", "")
    assert events[4].args == "new state completed"
    assert migration.parse_trace("[   12.5] rx_pkts=1 tx_pkts=2\nVDUP-READY") == []


def test_switchover_phases_use_the_last_outgoing_migration() -> None:
    phases = migration.switchover_phases(migration.parse_trace(SOURCE_TRACE), migration.parse_trace(DEST_TRACE))
    assert phases == pytest.approx(
        {"vhost_stop": 4.5, "final_pass": 1.5, "vhost_start": 9.0, "return_path": 44.0, "stop_to_done": 50.2}
    )
    assert set(phases) == set(migration.PHASES) - {"ready_after_resume"}  # from the back-end's log, not QEMU's


def test_switchover_phases_leave_out_what_is_missing() -> None:
    # no return path (capability off): final_pass ends at "completed", no return_path phase; no destination
    src = "\n".join(line for line in SOURCE_TRACE.splitlines() if "return_path" not in line)
    phases = migration.switchover_phases(migration.parse_trace(src), [])
    assert phases == pytest.approx({"vhost_stop": 4.5, "final_pass": 45.6, "stop_to_done": 50.2})
    assert migration.switchover_phases([], []) == {}


def test_backend_share_is_the_sum_of_the_median_phases() -> None:
    r = result("dpdk", [90, 100, 110])
    for s, (stop, start) in zip(r.samples, [(1, 50), (2, 80), (3, 60)], strict=True):
        s.phases_ms = {"vhost_stop": stop, "vhost_start": start}
    assert r.backend_share() == 2 + 60
    assert result("dpdk", [1]).backend_share() is None
    cmp = DowntimeComparison({"dpdk": r})
    assert "dpdk: vhost_stop 2.0, vhost_start 60.0, sum 62.0" in render_text(cmp)
    assert r.to_json()["phases_ms"]["vhost_start"]["median"] == 60


# ---- failed attempts, back-end connection accounting -----------------------------------------------------


def test_render_text_lists_failed_attempts() -> None:
    r = result("dpdk", [90])
    r.failures.append(
        {
            "attempt": 2,
            "stage": "checking the guest on the destination",
            "error": "ProcessExited: dpdk-q3: stdin closed\n--- last output ---\n[ 39.7] list_add corruption",
            "query_migrate": {"status": "completed", "downtime": 98},
        }
    )
    text = render_text(DowntimeComparison({"dpdk": r}))
    assert "dpdk      attempt 2 FAILED while checking the guest on the destination (QEMU downtime 98 ms): " in text
    assert "stdin closed" in text and "list_add" not in text  # first line of the error only


def test_dpdk_connection_patterns() -> None:
    log = (
        "testpmd> VHOST_CONFIG: (/tmp/x/a.sock) new vhost user connection is 23\n"
        "VHOST_CONFIG: (/tmp/x/a.sock) read message VHOST_USER_GET_VRING_BASE\n"
        "Port 0: link state change event\n"
        "VHOST_CONFIG: (/tmp/x/a.sock) vhost peer closed\n"
        "VHOST_CONFIG: (/tmp/x/a.sock) new vhost user connection is 23\n"
    )
    assert len(migration._DPDK_OPENED.findall(log)) - len(migration._DPDK_CLOSED.findall(log)) == 1


def test_default_migration_parameters() -> None:
    assert MigrationSettings().parameters == {"downtime-limit": 20}
    assert "-trace" in MigrationSettings().qemu_args() and "timestamp=on" in MigrationSettings().qemu_args()
    assert MigrationSettings(trace=False, qemu_extra_args=("-S",)).qemu_args() == ("-S",)
    args = migration.build_parser().parse_args(["--downtime-limit", "300"])
    assert args.downtime_limit == 300 and args.count == 5


def test_render_text_header_names_settings_and_versions() -> None:
    cmp = DowntimeComparison(
        {"dpdk": result("dpdk", [50])},
        settings=MigrationSettings().describe(),
        machine={
            "qemu": "QEMU emulator version 7.2.22",
            "dpdk": "22.11.11",
            "git": {"revision": "3e23ef4", "modified": ["vduproxy/dataplane.py"]},
        },
    )
    text = render_text(cmp)
    assert "guest 512 MiB; capabilities: return-path=on; parameters: downtime-limit=20" in text
    assert (
        "QEMU emulator version 7.2.22; DPDK 22.11.11; vduproxy git 3e23ef4, uncommitted: vduproxy/dataplane.py" in text
    )


def test_resumed_at_and_proxy_ready_at() -> None:
    assert migration.resumed_at(migration.parse_trace(DEST_TRACE)) == pytest.approx(1795734393.049100)
    # a source-only trace never resumed anything incoming after its own start
    assert migration.resumed_at([]) is None
    events = [
        {"event": "device_started", "vqs": [0], "timestamp": "2026-11-26T23:08:28.152000Z"},
        {"event": "vhost_user_request", "request": "SET_VRING_KICK", "timestamp": "2026-11-26T23:08:28.153000Z"},
        {"event": "device_started", "vqs": [0, 1], "timestamp": "2026-11-26T23:08:28.155500Z"},
        {"event": "device_started", "vqs": [0, 1], "timestamp": "2026-11-26T23:08:28.158000Z"},
    ]
    ready = migration.proxy_ready_at(events)
    assert ready == pytest.approx(datetime(2026, 11, 26, 23, 8, 28, 155500, tzinfo=UTC).timestamp())
    assert migration.proxy_ready_at(events[:2]) is None
    assert migration.proxy_ready_at([{"event": "device_started", "vqs": [0, 1], "timestamp": "bad"}]) is None


def test_dpdk_ready_pattern() -> None:
    line = "VHOST_CONFIG: (/tmp/x/b.sock) virtio is now ready for processing."
    assert migration._DPDK_READY.search(line)
