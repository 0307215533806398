"""The SVQ ring fuzzer (fuzz/svq_fuzz.c, libFuzzer + ASan + UBSan) in CI: the committed corpus plus a short
fresh run must be clean, and the harness must really fail on a contract violation (else a clean run proves
nothing)."""

from __future__ import annotations

import glob
import os
import pathlib
import re
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parents[2]
RUN = ROOT / "fuzz" / "run_svq.sh"
CORPUS = ROOT / "fuzz" / "corpus" / "svq"
SECONDS = 20

HAVE_LIBFUZZER = shutil.which("clang") is not None and bool(
    glob.glob("/usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a")
)
# scripts/setup.sh installs clang and the libFuzzer runtime: without them the install is broken, not optional
needs_libfuzzer = pytest.mark.usefixtures("_libfuzzer_installed")


@pytest.fixture
def _libfuzzer_installed() -> None:
    if not HAVE_LIBFUZZER:
        pytest.fail("clang with the libFuzzer runtime is missing (apt: clang libclang-rt-14-dev; scripts/setup.sh)")


def run_fuzzer(out: pathlib.Path, seconds: int, *flags: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = subprocess.run(
        [str(RUN), str(seconds), *flags],
        env={**os.environ, "FUZZ_OUT": str(out), **(env or {})},
        capture_output=True,
        text=True,
        timeout=seconds + 300,  # hang guard only (the build takes part of it)
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def executed(report: str) -> int:
    m = re.search(r"stat::number_of_executed_units: (\d+)", report)
    assert m, report[-3000:]
    return int(m.group(1))


def test_corpus_covers_the_hostile_shapes() -> None:
    names = {p.name for p in CORPUS.iterdir()}
    for shape in ("loop", "whole-ring-chain", "nested-indirect", "huge-length", "below-memory", "racing-avail"):
        assert f"seed-{shape}" in names


@needs_libfuzzer
def test_short_run_is_clean(tmp_path: pathlib.Path) -> None:
    rc, report = run_fuzzer(tmp_path, SECONDS)
    assert rc == 0, report[-6000:]
    assert "ERROR:" not in report and "runtime error" not in report and "contract violated" not in report
    # every committed input ran, then fresh ones on top
    assert executed(report) > len(list(CORPUS.iterdir()))
    assert not list((tmp_path / "artifacts").iterdir())


@needs_libfuzzer
def test_harness_fails_on_a_violation(tmp_path: pathlib.Path) -> None:
    # the self-test makes the harness's device believe no guest memory exists, so the first forwarded chain is
    # "outside guest memory": the run must stop with a report and keep the input that caused it
    rc, report = run_fuzzer(tmp_path, SECONDS, env={"SVQ_FUZZ_SELFTEST": "1"})
    assert rc != 0
    assert "contract violated" in report and "outside guest memory" in report
    assert list((tmp_path / "artifacts").iterdir())
