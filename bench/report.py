"""Benchmark results: the data model, statistics, ratios to the peer, targets, JSON and Markdown, the chart.

No I/O except `write_*` at the bottom, so every rule here (what a ratio is compared with, when a target counts
as met, how a table reads) is unit-tested without starting a process.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


class Status(enum.StrEnum):
    OK = "ok"
    NOT_AVAILABLE = "not available"
    FAILED = "failed"


@dataclass(frozen=True)
class Summary:
    median: float
    minimum: float
    maximum: float
    count: int

    @property
    def spread(self) -> float | None:
        """(max - min) / median: how far apart the repetitions were, relative to the figure reported."""
        if self.median == 0:
            return None
        return (self.maximum - self.minimum) / self.median


def summarize(samples: Sequence[float]) -> Summary | None:
    if not samples:
        return None
    return Summary(statistics.median(samples), min(samples), max(samples), len(samples))


@dataclass
class Measurement:
    """One row: a case at one frame size (or a control-plane figure), measured `len(samples)` times."""

    case: str
    title: str
    group: str  # "forwarding" | "closed-loop" | "control-plane"
    unit: str
    size: int | None = None
    samples: list[float] = field(default_factory=list)
    peer: str | None = None  # the case (same size) this one is divided by
    status: Status = Status.OK
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    load_before: tuple[float, float, float] | None = None
    load_after: tuple[float, float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int | None]:
        return (self.case, self.size)

    @property
    def summary(self) -> Summary | None:
        return summarize(self.samples) if self.status is Status.OK else None

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["status"] = str(self.status)
        s = self.summary
        out["median"] = None if s is None else s.median
        out["min"] = None if s is None else s.minimum
        out["max"] = None if s is None else s.maximum
        out["spread"] = None if s is None else s.spread
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Measurement:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in names}
        kw["status"] = Status(kw.get("status", "ok"))
        for key in ("load_before", "load_after"):
            if kw.get(key) is not None:
                kw[key] = tuple(kw[key])
        return cls(**kw)


@dataclass(frozen=True)
class Target:
    """A goal from issue 7: `case` (at `size`) divided by `versus` (same size) must lie in [low, high].

    With `versus` None the case's own median is compared (e.g. resident memory in MiB).
    """

    name: str
    case: str
    size: int | None
    versus: str | None
    low: float | None = None
    high: float | None = None


TARGETS: tuple[Target, ...] = (
    Target("SVQ forwarding >= 60 % of the DPDK vhost PMD peer, 64 B", "svq", 64, "peer", low=0.60),
    Target("SVQ forwarding >= 90 % of the DPDK vhost PMD peer, 1500 B", "svq", 1500, "peer", low=0.90),
    Target("Passthrough within 5 % of the sim device alone, 64 B (same C driver)", "c-passthrough", 64, "c-device",
           0.95, 1.05),
    Target("Dirty logging costs <= 10 % of SVQ throughput, 64 B TX (same C driver)", "c-svq-log", 64, "c-svq",
           low=0.90),
    Target("Dirty logging costs <= 10 % of SVQ throughput, 64 B closed loop: RX pages logged (same C driver)",
           "c-svq-log-loop", 64, "c-svq-loop", low=0.90),
    Target("Passthrough → SVQ switch <= 1 ms", "switch", None, None, high=1.0),
    Target("GET_VRING_BASE drain <= 1 ms", "drain", None, None, high=1.0),
    Target("Proxy resident memory (peak) <= 60 MiB", "proxy-rss", None, None, high=60.0),
    Target("Migration downtime within 2 ms of DPDK's back-end (median of 5)", "downtime-diff", None, None, high=2.0),
)


@dataclass(frozen=True)
class Verdict:
    target: Target
    value: float | None
    verdict: str  # "met" | "missed" | "n/a"
    detail: str = ""


@dataclass
class BenchRun:
    started: str
    finished: str = ""
    mode: str = "full"
    settings: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    software: dict[str, Any] = field(default_factory=dict)
    pinning: dict[str, str] = field(default_factory=dict)
    measurements: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def find(self, case: str, size: int | None) -> Measurement | None:
        for m in self.measurements:
            if m.key == (case, size):
                return m
        return None

    def ratio(self, case: str, size: int | None, versus: str) -> float | None:
        """median(case) / median(versus) at the same size, both measured in this run; None if either is
        missing, not OK, or the reference is zero."""
        a, b = self.find(case, size), self.find(versus, size)
        sa = a.summary if a is not None else None
        sb = b.summary if b is not None else None
        if sa is None or sb is None or sb.median == 0:
            return None
        return sa.median / sb.median

    def round_medians(self, m: Measurement) -> list[float]:
        """The median of each round's windows (rounds interleave the cases: each is a new set-up of every
        process); empty when the samples do not split into whole rounds (a round failed)."""
        rounds, repeat = int(self.settings.get("rounds", 0) or 0), int(self.settings.get("repeat", 0) or 0)
        if rounds < 1 or repeat < 1 or len(m.samples) != rounds * repeat:
            return []
        return [statistics.median(m.samples[r * repeat : (r + 1) * repeat]) for r in range(rounds)]

    def ratio_to_best_round(self, case: str, size: int | None, versus: str) -> float | None:
        """median(case) / the reference's fastest round: the stricter reading on a host whose speed changes
        with each process start (the peer's rounds have differed by 3x in one run)."""
        a, b = self.find(case, size), self.find(versus, size)
        sa = a.summary if a is not None else None
        best = max(self.round_medians(b), default=None) if b is not None else None
        if sa is None or not best:
            return None
        return sa.median / best

    def peer_ratio(self, m: Measurement) -> float | None:
        return None if m.peer is None else self.ratio(m.case, m.size, m.peer)

    def evaluate(self, targets: Iterable[Target] = TARGETS) -> list[Verdict]:
        return [self._evaluate(t) for t in targets]

    def _evaluate(self, t: Target) -> Verdict:
        m = self.find(t.case, t.size)
        if m is None:
            return Verdict(t, None, "n/a", f"{t.case} not measured in this run")
        if m.status is not Status.OK:
            return Verdict(t, None, "n/a", f"{t.case} {m.status}: see its row")
        if t.versus is not None:
            ref = self.find(t.versus, t.size)
            if ref is None or ref.status is not Status.OK:
                return Verdict(t, None, "n/a", f"reference {t.versus} not available in this run")
            if ref.extra.get("derived_from") == t.case or m.extra.get("derived_from") == t.versus:
                # Comparing a figure with itself proves nothing: say so rather than claim the target.
                return Verdict(t, self.ratio(t.case, t.size, t.versus), "n/a", "same measurement, see notes")
            value = self.ratio(t.case, t.size, t.versus)
        else:
            s = m.summary
            value = None if s is None else s.median
        if value is None:
            return Verdict(t, None, "n/a", "no samples")
        ok = (t.low is None or value >= t.low) and (t.high is None or value <= t.high)
        return Verdict(t, value, "met" if ok else "missed")

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "started": self.started,
            "finished": self.finished,
            "mode": self.mode,
            "settings": self.settings,
            "machine": self.machine,
            "software": self.software,
            "pinning": self.pinning,
            "notes": self.notes,
            "measurements": [{**m.to_json(), "ratio_to_peer": self.peer_ratio(m)} for m in self.measurements],
            "targets": [
                {
                    "target": v.target.name,
                    "value": v.value,
                    "verdict": v.verdict,
                    "detail": v.detail,
                    "value_vs_fastest_peer_round": (
                        self.ratio_to_best_round(v.target.case, v.target.size, "peer")
                        if v.target.versus == "peer"
                        else None
                    ),
                }
                for v in self.evaluate()
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BenchRun:
        if data.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"unsupported results schema {data.get('schema')!r} (expected {SCHEMA_VERSION})")
        return cls(
            started=data["started"],
            finished=data.get("finished", ""),
            mode=data.get("mode", "full"),
            settings=dict(data.get("settings", {})),
            machine=dict(data.get("machine", {})),
            software=dict(data.get("software", {})),
            pinning=dict(data.get("pinning", {})),
            measurements=[Measurement.from_json(m) for m in data.get("measurements", [])],
            notes=list(data.get("notes", [])),
        )


# ---- small parsers (inputs: /proc files, the proxy's JSON log) -------------------------------------------


def parse_loadavg(text: str) -> tuple[float, float, float]:
    """/proc/loadavg → (1, 5, 15 minute averages)."""
    parts = text.split()
    if len(parts) < 3:
        raise ValueError(f"not a /proc/loadavg line: {text!r}")
    return (float(parts[0]), float(parts[1]), float(parts[2]))


def parse_proc_status_kib(text: str) -> dict[str, int]:
    """/proc/PID/status → every "Name:  N kB" field, in KiB (VmRSS, VmHWM, ...)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if sep and len(fields) == 2 and fields[1] == "kB" and fields[0].isdigit():
            out[name.strip()] = int(fields[0])
    return out


def parse_proc_stat_ticks(text: str) -> int:
    """/proc/PID/stat → utime + stime in clock ticks (all threads). The command name may hold spaces and
    parentheses, so fields are counted from the last ')'."""
    _, sep, rest = text.rpartition(")")
    fields = rest.split()
    if not sep or len(fields) < 13:
        raise ValueError("not a /proc/PID/stat line")
    # After ")": state is field 3 of the man page, so utime (14) and stime (15) are at offsets 11 and 12.
    return int(fields[11]) + int(fields[12])


def parse_stat_busy_ticks(text: str) -> int:
    """/proc/stat → busy clock ticks of all CPUs together (everything but idle and iowait)."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = [int(v) for v in fields[1:]]
            if len(values) < 8:
                break
            # user nice system idle iowait irq softirq steal [guest guest_nice, already inside user/nice]
            return sum(values[:8]) - values[3] - values[4]
    raise ValueError("no aggregate cpu line in /proc/stat")


def parse_cpu_model(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == "model name":
            return value.strip()
    return "unknown"


def parse_timestamp(value: str) -> datetime:
    """structlog's ISO-8601 UTC timestamp (kept as a datetime: differences stay exact to the microsecond)."""
    return datetime.fromisoformat(value)


def connect_to_started_ms(events: Sequence[Mapping[str, Any]], vqs: Sequence[int] = (0, 1)) -> list[float]:
    """For every `frontend_connected` in the proxy's log: milliseconds until the first `device_started` with
    all of `vqs` running (the device at DRIVER_OK with the front-end's rings: traffic can flow)."""
    out: list[float] = []
    connected: datetime | None = None
    want = set(vqs)
    for ev in events:
        name = ev.get("event")
        ts = ev.get("timestamp")
        if not isinstance(ts, str):
            continue
        if name == "frontend_connected":
            connected = parse_timestamp(ts)
        elif name == "device_started" and connected is not None and want <= set(ev.get("vqs") or ()):
            out.append((parse_timestamp(ts) - connected).total_seconds() * 1000.0)
            connected = None
    return out


_SVQ_ON = ("start", "attach", "enable", "active", "install", "switched", "running")
_SVQ_REFUSED = ("unavailable", "unsupported", "not_supported", "not_available", "cannot", "refused", "fallback")


def svq_evidence(events: Iterable[Mapping[str, Any]]) -> tuple[bool | None, str]:
    """Did the proxy run a shadow virtqueue? From its JSON log:

    (True, evidence) on an event with mode "svq"/"shadow", or an svq/shadow event that says it started;
    (False, reason) on a warning/error (or refusal) event about svq/shadow, or a device start in passthrough;
    (None, "") when the log says nothing either way.
    """
    negative: tuple[bool | None, str] = (None, "")
    for ev in events:
        name = str(ev.get("event", ""))
        low = name.lower()
        mode = str(ev.get("mode", "")).lower()
        about_svq = "svq" in low or "shadow" in low
        if mode in ("svq", "shadow"):
            return True, f"{name} mode={mode}"
        if about_svq and (ev.get("level") in ("warning", "error") or any(w in low for w in _SVQ_REFUSED)):
            why = ev.get("reason") or ev.get("error") or ""
            return False, f"proxy logged {name}" + (f": {why}" if why else "")
        if about_svq and any(w in low for w in _SVQ_ON):
            return True, name
        if mode == "passthrough" and negative[0] is None:
            negative = (False, f"proxy logged {name} mode=passthrough")
    return negative


# ---- rendering ------------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value * 100:.{digits}f} %"


def _median(s: Summary | None) -> str:
    return "—" if s is None else _num(s.median)


def _range(s: Summary | None) -> str:
    return "—" if s is None else f"{_num(s.minimum)}..{_num(s.maximum)}"


def _size(size: int | None) -> str:
    return "—" if size is None else f"{size} B"


def _load(load: tuple[float, float, float] | None) -> str:
    return "—" if load is None else f"{load[0]:.2f}"


def render_markdown(run: BenchRun) -> str:
    lines = [f"# vduproxy benchmark ({run.mode} run, {run.started})", ""]
    mach, sw = run.machine, run.software
    lines += [
        f"- machine: {mach.get('cpu_model', '?')}, nproc {mach.get('nproc', '?')}, kernel {mach.get('kernel', '?')}",
        f"- load average (1 min) at start {_load(_tuple(mach.get('load_start')))}, "
        f"at end {_load(_tuple(mach.get('load_end')))}",
        f"- DPDK {sw.get('dpdk', '?')}, vduproxy git {sw.get('git_revision', '?')}"
        + (" (uncommitted changes)" if sw.get("git_dirty") else ""),
        "- settings: " + ", ".join(f"{k}={v}" for k, v in run.settings.items()),
    ]
    lines += [f"- pinning, {k}: {v}" for k, v in run.pinning.items()]
    lines += [
        "",
        "Every figure is divided by the peer (DPDK testpmd's vhost PMD as the back-end) measured in this same run;",
        "absolute Mpps are secondary on this shared 2-core machine. Spread = (max - min) / median.",
        "Others' CPU: median share of a CPU that processes other than the benchmark's took during the windows.",
        "",
    ]
    for group, heading in (
        ("forwarding", "Open loop: virtio-user txonly → back-end"),
        ("closed-loop", "Closed loop"),
        ("same-driver", "Same C driver on every back-end (bench/txgen.c)"),
    ):
        rows = [m for m in run.measurements if m.group == group]
        if not rows:
            continue
        lines += [f"## {heading}", ""]
        lines += [
            "| case | size | median Mpps | min..max | spread | n | ratio | vs | load before/after | others' CPU "
            "| status |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for m in rows:
            s = m.summary
            status = str(m.status) + (f": {m.reason}" if m.status is not Status.OK and m.reason else "")
            ratio = run.peer_ratio(m)
            lines.append(
                f"| {m.title} | {_size(m.size)} | {_median(s)} | {_range(s)} | "
                f"{_pct(None if s is None else s.spread)} | {0 if s is None else s.count} | "
                f"{'100 %' if m.peer is None and m.status is Status.OK else _pct(ratio)} | {_vs(run, m)} | "
                f"{_load(m.load_before)} / {_load(m.load_after)} | {_others(m)} | {_escape(status)} |"
            )
        lines.append("")
    rows = [m for m in run.measurements if m.group == "control-plane"]
    if rows:
        lines += ["## Control plane", "", "| figure | median | min..max | n | status |", "|---|---|---|---|---|"]
        for m in rows:
            s = m.summary
            status = str(m.status) + (f": {m.reason}" if m.status is not Status.OK and m.reason else "")
            lines.append(
                f"| {m.title} ({m.unit}) | {_median(s)} | {_range(s)} | {0 if s is None else s.count} "
                f"| {_escape(status)} |"
            )
        lines.append("")
    lines += [
        "## Targets (issue 7)",
        "",
        "Ratios divide medians over every round. For the targets against the peer, the last column divides by the "
        "peer's fastest round instead: DPDK's speed on this host changes with each process start (up to 3x), and "
        "the median then depends on how many slow set-ups it drew.",
        "",
        "| target | value | verdict | vs the peer's fastest round |",
        "|---|---|---|---|",
    ]
    for v in run.evaluate():
        # one decimal: a verdict must not contradict the figure it shows (94.7 % is not "95 %, missed")
        value = _num(v.value) if v.target.versus is None else _pct(v.value, 1)
        detail = f" ({v.detail})" if v.detail else ""
        strict = "—"
        if v.target.versus == "peer" and v.verdict != "n/a":
            best = run.ratio_to_best_round(v.target.case, v.target.size, v.target.versus)
            if best is not None:
                ok = (v.target.low is None or best >= v.target.low) and (v.target.high is None or best <= v.target.high)
                strict = f"{_pct(best, 1)}: {'met' if ok else 'missed'}"
        lines.append(f"| {v.target.name} | {value} | {v.verdict}{_escape(detail)} | {strict} |")
    lines.append("")
    notes = list(run.notes)
    for m in run.measurements:
        notes += [f"{m.title}{'' if m.size is None else f' {m.size} B'}: {n}" for n in m.notes]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in dict.fromkeys(notes)] + [""]
    return "\n".join(lines)


def _vs(run: BenchRun, m: Measurement) -> str:
    """What the ratio divides by: the reference row's case name (a reference row says so itself)."""
    if m.peer is None:
        return "reference"
    ref = run.find(m.peer, m.size)
    return m.peer if ref is None else ref.case


def _others(m: Measurement) -> str:
    """Median CPU (% of one CPU) other processes took during the windows, if recorded."""
    values = m.extra.get("cpu_percent", {}).get("others") if isinstance(m.extra.get("cpu_percent"), dict) else None
    return "—" if not values else f"{statistics.median(values):.0f} %"


def _tuple(value: Any) -> tuple[float, float, float] | None:
    if isinstance(value, list | tuple) and len(value) == 3:
        return (float(value[0]), float(value[1]), float(value[2]))
    return None


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_summary(run: BenchRun) -> str:
    """A few lines for the terminal: each throughput row's median and ratio to the peer."""
    out = []
    for m in run.measurements:
        s = m.summary
        if m.group == "control-plane":
            figure = f"{_median(s)} {m.unit}"
        else:
            ratio = run.peer_ratio(m)
            figure = f"{_median(s)} Mpps" + ("" if m.peer is None else f", {_pct(ratio)} of {m.peer}")
        tail = "" if m.status is Status.OK else f" [{m.status}: {m.reason}]"
        out.append(f"{m.title:<36} {_size(m.size):>7}  {figure}{tail}")
    return "\n".join(out)


def write_json(run: BenchRun, path: Path) -> None:
    path.write_text(json.dumps(run.to_json(), indent=2) + "\n", encoding="utf-8")


def write_markdown(run: BenchRun, path: Path) -> None:
    path.write_text(render_markdown(run), encoding="utf-8")


COLORS = {"forwarding": "#4c72b0", "closed-loop": "#dd8452", "same-driver": "#55a868"}


def write_chart(run: BenchRun, path: Path) -> str | None:
    """A bar chart of each throughput row's ratio to the peer. Returns why it was skipped, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    # Derived rows repeat another row's samples: charting them twice would suggest two measurements.
    rows = [
        m
        for m in run.measurements
        if m.group in COLORS and m.peer is not None and "derived_from" not in m.extra
    ]
    labels = [f"{m.title}, {_size(m.size)}" + (f" (vs {m.peer})" if m.group == "same-driver" else "") for m in rows]
    values = [(run.peer_ratio(m) or 0.0) * 100 for m in rows]
    fig, ax = plt.subplots(figsize=(9.0, 1.0 + 0.45 * max(1, len(rows))))
    ypos = list(range(len(rows)))[::-1]  # first row on top, as in the table
    ax.barh(ypos, values, color=[COLORS[m.group] for m in rows])
    for y, m, v in zip(ypos, rows, values, strict=True):
        text = _pct(v / 100) if run.peer_ratio(m) is not None else str(m.status)
        ax.annotate(text, (v, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ax.axvline(100, color="grey", linewidth=0.8, linestyle="--")
    ax.set_yticks(ypos, labels, fontsize=8)
    ax.set_xlim(0, max([110.0, *values]) * 1.12)
    ax.set_xlabel(
        "% of the reference, same run (blue: open loop and orange: closed loop, vs DPDK's vhost PMD; "
        "green: same C driver, vs the row named)",
        fontsize=8,
    )
    ax.set_title(f"vduproxy vs DPDK vhost PMD ({run.mode} run, {run.started[:19]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
