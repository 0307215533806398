"""The SVQ core's C test driver (forwarding, drain, dirty log, thread, hostile rings, random rings) built with
AddressSanitizer + UndefinedBehaviorSanitizer must run clean: tests/csan/run.sh exits non-zero on any failed
check or sanitizer report."""

from __future__ import annotations

import pathlib
import subprocess

import pytest

pytestmark = pytest.mark.unit

RUN = pathlib.Path(__file__).resolve().parents[1] / "csan" / "run.sh"


def test_core_clean_under_asan_and_ubsan(tmp_path: pathlib.Path) -> None:
    proc = subprocess.run(
        [str(RUN), str(tmp_path)], capture_output=True, text=True, timeout=600, check=False
    )  # timeout: hang guard only
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-4000:]
    assert "all checks passed" in proc.stdout
    assert "runtime error" not in report and "AddressSanitizer" not in report
