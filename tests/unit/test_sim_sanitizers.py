"""The native data path under AddressSanitizer + UndefinedBehaviorSanitizer.

Builds a sanitized copy of the package in a temporary directory and runs the sim's own unit tests against it
in a subprocess (libasan must be the first DSO, hence LD_PRELOAD). Any ASan/UBSan report fails the test.
Run alone: `.venv/bin/pytest tests/unit/test_sim_sanitizers.py -q`.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parents[2]
TESTS = ("test_sim_datapath.py", "test_sim_device.py", "test_sim_backpressure.py")


def _libasan() -> str | None:
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    out = subprocess.run([gcc, "-print-file-name=libasan.so"], capture_output=True, text=True, check=False)
    path = out.stdout.strip()
    return path if path.startswith("/") and pathlib.Path(path).exists() else None


def test_sim_core_is_clean_under_asan_and_ubsan(tmp_path: pathlib.Path) -> None:
    libasan = _libasan()
    if libasan is None:
        pytest.fail("gcc with libasan not available: scripts/setup.sh installs build-essential")
    pkg = tmp_path / "vduproxy"
    shutil.copytree(ROOT / "vduproxy", pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for name in TESTS:
        shutil.copy2(ROOT / "tests" / "unit" / name, tmp_path / name)
    # pytest's `pythonpath = ["."]` is relative to the ini file: with the repository's, the unsanitized tree
    # would be imported first. A copy makes "." the temporary tree, and a probe test proves it.
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "test_zz_probe.py").write_text(
        "import vduproxy.vdpa.sim as s\n\n\n"
        "def test_sanitized_build_is_under_test():\n"
        f"    assert s._sim_core.__file__.startswith({str(tmp_path)!r}), s._sim_core.__file__\n"
    )
    build_env = {"PATH": "/usr/bin:/bin", "VDUPROXY_SIM_SANITIZE": "1"}
    built = subprocess.run(
        [sys.executable, "-c", "import vduproxy.vdpa._build_sim as b; b.build_inplace()"],
        cwd=tmp_path, env=build_env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    env = {
        "PATH": "/usr/bin:/bin",
        "LD_PRELOAD": libasan,
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=99",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:exitcode=98",
    }
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(tmp_path / "pyproject.toml"),
         "--rootdir", str(tmp_path), *TESTS, "test_zz_probe.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    report = run.stdout[-4000:] + run.stderr[-4000:]
    assert "_sim_core" in _loaded_from(tmp_path, env), "the sanitized build was not the one imported"
    assert "AddressSanitizer" not in report and "runtime error" not in report, report
    assert run.returncode == 0, report
    assert " passed" in run.stdout, report


def _loaded_from(tmp_path: pathlib.Path, env: dict[str, str]) -> str:
    probe = "import vduproxy.vdpa.sim as s; print(s._sim_core.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert str(tmp_path) in out.stdout, out.stdout + out.stderr
    return out.stdout
