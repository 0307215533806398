"""The benchmark's report code: statistics, ratios to the peer, targets, parsers, JSON, Markdown and the chart.

No process is started and nothing is timed: the inputs are made-up samples and captured /proc and log text.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

from bench import report
from bench.__main__ import QUICK, build_parser, settings_from_args
from bench.report import BenchRun, Measurement, Status, Target
from bench.runner import CDRIVER_NOTE, Context, Settings, finish_rows

pytestmark = pytest.mark.unit


def fwd(case: str, size: int, samples: list[float], peer: str | None = "peer") -> Measurement:
    return Measurement(case=case, title=case, group="forwarding", unit="Mpps", size=size, samples=samples, peer=peer)


def sample_run() -> BenchRun:
    run = BenchRun(started="2026-01-01T00:00:00+00:00", mode="quick", settings={"repeat": 3})
    run.measurements = [
        fwd("peer", 64, [10.0, 12.0, 11.0], peer=None),
        fwd("peer", 1500, [4.0, 6.0, 5.0], peer=None),
        fwd("svq", 64, [7.0, 6.0, 8.0]),
        fwd("svq", 1500, [4.9, 4.5, 4.7]),
        fwd("passthrough", 64, [9.0, 10.0, 11.0]),
    ]
    return run


# ---- statistics and ratios -----------------------------------------------------------------------------------


def test_summary_of_samples() -> None:
    samples = [3.0, 1.0, 2.0, 10.0]
    s = report.summarize(samples)
    assert s is not None
    assert (s.median, s.minimum, s.maximum, s.count) == (statistics.median(samples), 1.0, 10.0, 4)
    assert s.spread == pytest.approx((10.0 - 1.0) / statistics.median(samples))


def test_summary_edge_cases() -> None:
    assert report.summarize([]) is None
    zero = report.summarize([0.0, 0.0])
    assert zero is not None and zero.spread is None  # no division by zero for a dead case


def test_ratio_is_median_over_median_at_the_same_size() -> None:
    run = sample_run()
    assert run.ratio("svq", 64, "peer") == pytest.approx(statistics.median([7, 6, 8]) / statistics.median([10, 12, 11]))
    assert run.ratio("svq", 1500, "peer") == pytest.approx(statistics.median([4.9, 4.5, 4.7]) / 5.0)
    # Never divided by another size's peer, nor by a case absent from the run.
    assert run.ratio("passthrough", 1500, "peer") is None
    assert run.ratio("svq", 64, "missing") is None


def test_stricter_ratio_divides_by_the_references_fastest_round() -> None:
    run = BenchRun(started="2026-01-01T00:00:00+00:00", settings={"repeat": 2, "rounds": 3})
    run.measurements = [
        fwd("peer", 64, [16.0, 17.0, 5.0, 5.2, 5.1, 5.3], peer=None),  # fast set-up, then two slow ones
        fwd("svq", 64, [12.0, 12.2, 12.1, 11.9, 12.0, 12.3]),
    ]
    peer = run.find("peer", 64)
    assert peer is not None
    assert run.round_medians(peer) == pytest.approx([16.5, 5.1, 5.2])
    assert run.ratio("svq", 64, "peer") == pytest.approx(12.05 / 5.25)  # the median flatters the case ...
    assert run.ratio_to_best_round("svq", 64, "peer") == pytest.approx(12.05 / 16.5)  # ... this does not
    md = report.render_markdown(run)
    row = next(line for line in md.splitlines() if line.startswith("| SVQ forwarding >= 60 %"))
    assert row.endswith("| 73.0 %: met |")
    # Samples that do not split into whole rounds (a round failed) give no stricter ratio.
    peer.samples = peer.samples[:5]
    assert run.round_medians(peer) == [] and run.ratio_to_best_round("svq", 64, "peer") is None


def test_ratio_needs_an_ok_reference() -> None:
    run = sample_run()
    peer = run.find("peer", 64)
    assert peer is not None
    peer.status, peer.reason = Status.FAILED, "testpmd died"
    assert run.ratio("svq", 64, "peer") is None
    run.measurements.append(fwd("zero", 64, [0.0, 0.0], peer=None))
    assert run.ratio("svq", 64, "zero") is None


def test_not_ok_rows_have_no_summary_even_with_samples() -> None:
    m = fwd("svq", 64, [1.0, 2.0])
    m.status = Status.NOT_AVAILABLE
    assert m.summary is None


# ---- targets -------------------------------------------------------------------------------------------------


def test_targets_met_missed_and_not_available() -> None:
    run = sample_run()
    targets = [
        Target("svq 64 >= 60 %", "svq", 64, "peer", low=0.60),
        Target("svq 1500 >= 99 %", "svq", 1500, "peer", low=0.99),
        Target("log cost", "svq-log", 64, "svq", low=0.90),
        Target("rss", "rss", None, None, high=60.0),
    ]
    run.measurements.append(
        Measurement(case="rss", title="rss", group="control-plane", unit="MiB", samples=[30.0, 70.0, 40.0])
    )
    verdicts = {v.target.name: v for v in run.evaluate(targets)}
    assert verdicts["svq 64 >= 60 %"].verdict == "met"
    assert verdicts["svq 64 >= 60 %"].value == pytest.approx(run.ratio("svq", 64, "peer"))
    assert verdicts["svq 1500 >= 99 %"].verdict == "missed"
    assert verdicts["log cost"].verdict == "n/a" and "not measured" in verdicts["log cost"].detail
    assert verdicts["rss"].verdict == "met" and verdicts["rss"].value == statistics.median([30.0, 70.0, 40.0])


def test_target_against_a_derived_copy_is_not_claimed() -> None:
    run = sample_run()
    device = fwd("device", 64, [9.0, 10.0, 11.0])
    device.extra["derived_from"] = "passthrough"
    run.measurements.append(device)
    (v,) = run.evaluate([Target("pt vs device", "passthrough", 64, "device", 0.95, 1.05)])
    assert v.verdict == "n/a" and "same measurement" in v.detail


def test_not_available_case_gives_na_with_its_reason() -> None:
    run = sample_run()
    svq = run.find("svq", 64)
    assert svq is not None
    svq.status, svq.reason = Status.NOT_AVAILABLE, "proxy logged svq_unavailable"
    (v,) = run.evaluate([Target("t", "svq", 64, "peer", low=0.6)])
    assert v.verdict == "n/a" and str(Status.NOT_AVAILABLE) in v.detail and v.value is None


# ---- JSON and Markdown ---------------------------------------------------------------------------------------


def test_json_round_trip_keeps_the_report(tmp_path: Path) -> None:
    run = sample_run()
    run.measurements[2].load_before = (1.0, 2.0, 3.0)
    run.notes.append("a note")
    report.write_json(run, tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    back = BenchRun.from_json(data)
    assert report.render_markdown(back) == report.render_markdown(run)
    rows = {(m["case"], m["size"]): m for m in data["measurements"]}
    assert rows[("svq", 64)]["ratio_to_peer"] == pytest.approx(run.ratio("svq", 64, "peer"))
    assert rows[("svq", 64)]["median"] == statistics.median([7.0, 6.0, 8.0])
    assert rows[("peer", 64)]["ratio_to_peer"] is None  # the peer is the reference, not compared


def test_json_with_another_schema_is_refused() -> None:
    data = sample_run().to_json()
    data["schema"] = report.SCHEMA_VERSION + 1
    with pytest.raises(ValueError, match="schema"):
        BenchRun.from_json(data)


def _table_row(md: str, title: str, size: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 2 and cells[0] == title and cells[1] == size:
            return cells
    raise AssertionError(f"no row {title!r} {size!r} in:\n{md}")


def test_markdown_table_shows_median_spread_and_ratio() -> None:
    run = sample_run()
    md = report.render_markdown(run)
    cells = _table_row(md, "svq", "64 B")
    ratio = run.ratio("svq", 64, "peer")
    assert ratio is not None
    assert cells[2] == f"{statistics.median([7.0, 6.0, 8.0]):.2f}"
    assert cells[3] == "6.00..8.00"
    assert cells[5] == "3"
    assert cells[6] == f"{ratio * 100:.0f} %"
    assert cells[7] == "peer"  # what it was divided by
    assert _table_row(md, "peer", "64 B")[7] == "reference"


def test_markdown_says_why_a_case_is_missing_and_escapes_pipes() -> None:
    run = sample_run()
    svq = run.find("svq", 1500)
    assert svq is not None
    svq.status, svq.reason = Status.NOT_AVAILABLE, "a | b"
    md = report.render_markdown(run)
    line = next(x for x in md.splitlines() if x.startswith("| svq | 1500 B"))
    assert "not available: a \\| b" in line
    assert _table_row(md, "svq", "1500 B")[2] == "—"


def test_markdown_records_machine_and_versions() -> None:
    run = sample_run()
    run.machine = {"cpu_model": "Test CPU 9000", "nproc": 2, "kernel": "6.1", "load_start": [0.5, 0.4, 0.3]}
    run.software = {"dpdk": "22.11.11", "git_revision": "abc123", "git_dirty": True}
    md = report.render_markdown(run)
    for text in ("Test CPU 9000", "nproc 2", "DPDK 22.11.11", "abc123", "uncommitted", "0.50"):
        assert text in md


def test_chart_written_as_png(tmp_path: Path) -> None:
    import matplotlib  # noqa: F401  (the bench extra installs it: a missing one is a broken install)
    path = tmp_path / "c.png"
    assert report.write_chart(sample_run(), path) is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chart_skipped_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    path = tmp_path / "c.png"
    reason = report.write_chart(sample_run(), path)
    assert reason is not None and "matplotlib" in reason
    assert not path.exists()


# ---- parsers -------------------------------------------------------------------------------------------------


def test_parse_loadavg() -> None:
    assert report.parse_loadavg("0.52 1.25 3.00 2/345 6789\n") == (0.52, 1.25, 3.0)
    with pytest.raises(ValueError):
        report.parse_loadavg("garbage")


def test_parse_proc_status() -> None:
    text = "Name:\tpython3\nState:\tS (sleeping)\nVmHWM:\t   40960 kB\nVmRSS:\t   20480 kB\nThreads:\t3\n"
    fields = report.parse_proc_status_kib(text)
    assert fields == {"VmHWM": 40960, "VmRSS": 20480}


def test_parse_proc_stat_ticks_with_a_hostile_command_name() -> None:
    # comm may contain spaces and ')': fields are counted from the last ')'.
    rest = ["S"] + [str(i) for i in range(4, 14)] + ["700", "23"] + ["0"] * 30
    text = "1234 (evil) (name x) " + " ".join(rest)
    assert report.parse_proc_stat_ticks(text) == 700 + 23
    with pytest.raises(ValueError):
        report.parse_proc_stat_ticks("1234 (short) S 1")


def test_parse_stat_busy_ticks() -> None:
    text = "cpu  100 5 50 1000 7 3 2 1 0 0\ncpu0 50 2 25 500 3 1 1 0 0 0\nintr 12345\n"
    assert report.parse_stat_busy_ticks(text) == 100 + 5 + 50 + 3 + 2 + 1  # idle and iowait left out
    with pytest.raises(ValueError):
        report.parse_stat_busy_ticks("intr 1\n")


def test_markdown_shows_what_other_processes_took() -> None:
    run = sample_run()
    svq = run.find("svq", 64)
    assert svq is not None
    svq.extra["cpu_percent"] = {"sender": [99.0, 98.0, 99.5], "others": [10.0, 40.0, 20.0]}
    assert _table_row(report.render_markdown(run), "svq", "64 B")[9] == f"{statistics.median([10, 40, 20]):.0f} %"
    assert _table_row(report.render_markdown(run), "svq", "1500 B")[9] == "—"


def test_parse_cpu_model() -> None:
    assert report.parse_cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t: fpu\n") == "AMD EPYC 7B13"
    assert report.parse_cpu_model("processor\t: 0\n") == "unknown"


def ev(name: str, t: str, **kw: object) -> dict[str, object]:
    return {"event": name, "timestamp": f"2026-11-26T20:00:{t}Z", **kw}


def test_connect_to_started_from_log_timestamps() -> None:
    events = [
        ev("listening", "00.000000"),
        ev("frontend_connected", "01.000000"),
        ev("device_started", "01.004000", vqs=[0]),  # only RX: not ready for traffic yet
        ev("device_started", "01.012500", vqs=[0, 1]),
        ev("device_started", "05.000000", vqs=[0, 1]),  # a restart in the same connection: not a new sample
        ev("frontend_connected", "10.000000"),
        ev("device_started", "10.250000", vqs=[0, 1]),
        ev("frontend_connected", "20.000000"),  # never started: no sample
    ]
    assert report.connect_to_started_ms(events) == pytest.approx([12.5, 250.0])


def test_svq_evidence() -> None:
    assert report.svq_evidence([ev("device_started", "01.0", mode="svq")])[0] is True
    assert report.svq_evidence([ev("svq_started", "01.0", vq=1)])[0] is True
    refused = report.svq_evidence([ev("svq_unavailable", "01.0", level="warning", reason="no SUSPEND")])
    assert refused == (False, "proxy logged svq_unavailable: no SUSPEND")
    assert report.svq_evidence([ev("device_started", "01.0", mode="passthrough")])[0] is False
    assert report.svq_evidence([ev("device_started", "01.0"), ev("listening", "00.0")]) == (None, "")
    # A later positive sign wins over an earlier passthrough start (e.g. a switch to SVQ).
    later = [ev("device_started", "01.0", mode="passthrough"), ev("device_started", "02.0", mode="svq")]
    assert report.svq_evidence(later)[0] is True


# ---- rows the runner derives, and the command line -----------------------------------------------------------


def test_finish_rows_fills_control_rows_and_fails_empty_ones(tmp_path: Path) -> None:
    settings = Settings(sizes=(64,), cases=("peer", "passthrough", "c-device", "c-passthrough", "control"))
    run = BenchRun(started="x")
    ctx = Context(settings, tmp_path, tmp_path, sender_cpu=1, backend_cpu=0, run=run)
    pt = ctx.row("passthrough", 64, "forwarding", peer="peer")
    pt.samples = [3.0, 4.0]
    ctx.row("c-device", 64, "same-driver").samples = [5.0]
    ctx.row("c-passthrough", 64, "same-driver", peer="c-device")  # never measured
    ctx.connect_ms = [11.0, 13.0]
    ctx.hwm_mib = [30.0]
    finish_rows(ctx)
    assert CDRIVER_NOTE in run.notes
    c_pt = run.find("c-passthrough", 64)
    assert c_pt is not None and c_pt.status is Status.FAILED and c_pt.reason == "no samples"
    connect = run.find("connect", None)
    assert connect is not None and connect.samples == [11.0, 13.0]
    rss = run.find("proxy-rss", None)
    assert rss is not None and rss.samples == [30.0]


def test_same_driver_rows_divide_by_their_reference() -> None:
    run = BenchRun(started="x")
    dev = Measurement(case="c-device", title="dev", group="same-driver", unit="Mpps", size=64)
    dev.samples = [10.0]
    pt = Measurement(case="c-passthrough", title="pt", group="same-driver", unit="Mpps", size=64, peer="c-device")
    pt.samples = [9.7]
    run.measurements += [dev, pt]
    (v,) = [v for v in run.evaluate() if v.target.case == "c-passthrough"]
    assert v.verdict == "met" and v.value == pytest.approx(0.97)
    md = report.render_markdown(run)
    assert "| 97 % | c-device |" in md.replace("97.0 %", "97 %")


def test_cli_quick_and_overrides(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--quick", "--repeat", "7", "--cases", "peer,svq", "--out", str(tmp_path)])
    s = settings_from_args(args)
    assert s.quick and s.repeat == 7 and s.duration == QUICK["duration"] and s.cases == ("peer", "svq")
    assert s.out == tmp_path


@pytest.mark.parametrize("argv", [["--cases", "peer,bogus"], ["--repeat", "0"], ["--duration", "-1"]])
def test_cli_rejects_bad_values(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_switch_samples_from_proxy_events() -> None:
    from bench.runner import switch_samples

    def started(mode: str, why: str, us: int) -> dict[str, object]:
        return {"event": "device_started", "mode": mode, "why": why, "took_us": us, "phases_us": {"stop": us // 10}}

    events = [
        started("passthrough", "vring 1 started", 900),  # start-up: not a switch
        started("svq", "mode forced", 400),
        started("passthrough", "mode forced", 600),
        started("passthrough", "mode forced", 50),  # forced into the mode it was in: no switch
        {"event": "vring_stopped", "was_running": True, "took_us": 70},  # passthrough: not an SVQ drain
        started("svq", "mode forced", 500),
        {"event": "vring_stopped", "was_running": True, "took_us": 300},
        {"event": "vring_stopped", "was_running": False, "took_us": 3},  # answered for a stopped ring
    ]
    samples, phases = switch_samples(events)
    assert samples == {"switch": [0.4, 0.5], "switch-back": [0.6], "drain": [0.3]}
    assert phases == {"switch": {"stop": 45.0}, "switch-back": {"stop": 60.0}}  # medians over the switches only
