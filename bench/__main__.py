"""`python -m bench`: measure vduproxy against DPDK's vhost PMD in one run; see bench/README.md."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from vduproxy.log import configure

from . import report
from .runner import ALL_CASES, DEFAULT_OUT, Settings, run, write_results

# Two interleaved rounds rather than more windows in one: a burst of load from another job then hits one
# round of every case instead of all the windows of one case.
QUICK: dict[str, Any] = {
    "repeat": 2, "rounds": 2, "duration": 1.0, "warmup": 1.0, "connect_cycles": 2, "switch_cycles": 5,
    "migrations": 2,
}  # fmt: skip


def _cases(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in ALL_CASES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown case(s) {unknown or text!r}; choose from {','.join(ALL_CASES)}")
    return names


def _positive_int(text: str) -> int:
    return int(_positive(text, int))


def _positive_float(text: str) -> float:
    return _positive(text, float)


def _positive(text: str, kind: type[int] | type[float]) -> float:
    try:
        value = kind(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from e
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run (~1.5 min): 2 rounds x 2 windows of 1 s per case")
    p.add_argument("--repeat", type=_positive_int, help="measurement windows per case and round (default 5)")
    p.add_argument("--rounds", type=_positive_int, help="times every case is set up again, interleaved (default 1)")
    p.add_argument("--duration", type=_positive_float, help="seconds per measurement window (default 5)")
    p.add_argument("--warmup", type=_positive_float, help="seconds of traffic before the first window (default 3)")
    p.add_argument("--migrations", type=_positive_int, help="QEMU migrations per back-end for `downtime` (default 5)")
    p.add_argument("--cases", type=_cases, help=f"comma-separated subset of: {','.join(ALL_CASES)}")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results directory (default {DEFAULT_OUT})")
    p.add_argument("--log-dir", type=Path, help="process logs (default: a new /tmp/vdup-bench-logs-* dir)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    s = Settings(out=args.out, log_dir=args.log_dir, quick=args.quick)
    if args.quick:
        s = dataclasses.replace(s, **QUICK)
    for name in ("repeat", "rounds", "duration", "warmup", "cases", "migrations"):
        if getattr(args, name) is not None:
            s = dataclasses.replace(s, **{name: getattr(args, name)})
    return s


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure(args.log_level, json=False)
    settings = settings_from_args(args)
    bench_run = trio.run(run, settings)
    messages = write_results(bench_run, settings.out)
    print(report.render_summary(bench_run))
    for msg in messages:
        print(msg, file=sys.stderr)
    print(f"results: {settings.out}/latest.json, latest.md" + ("" if messages else ", latest.png"))
    print(f"process logs: {bench_run.machine.get('logs')}")
    failed = [m for m in bench_run.measurements if m.status is report.Status.FAILED]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
