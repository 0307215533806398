"""Tier 4: the cross-device suite against a real kernel vDPA device (vdpa_sim_net behind vhost-vdpa).

Each test boots the cached test kernel under QEMU TCG with the host's / as a read-only root, so the guest
runs this checkout with this venv's Python. `VDUPROXY_KERNEL_PYTEST_ARGS` adds arguments to the inner pytest
run (e.g. `-x`; a `-k` there replaces the default `-k vhost-vdpa`).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest

from vduproxy.testing.kernelvm.build import KernelImage
from vduproxy.testing.kernelvm.junit import parse_junit
from vduproxy.testing.kernelvm.vm import (
    GUEST_OUT_DIR,
    KernelVmSetupError,
    VmOptions,
    run_in_kernel_vm,
)

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
KERNEL_DEVICE = "/dev/vhost-vdpa-0"
# Generous: the whole suite runs on one emulated CPU. A hang is still caught, by the VM deadline.
SUITE_TIMEOUT_S = 1500
BOOT_TIMEOUT_S = 180


class Reporter:
    """Writes a line to the terminal even under output capture: the tier's summary and any skip reason must
    be seen by whoever reads the CI log, not only on failure."""

    def __init__(self, config: pytest.Config) -> None:
        self._tr = config.pluginmanager.get_plugin("terminalreporter")

    def line(self, text: str) -> None:
        if self._tr is not None:
            self._tr.ensure_newline()
            self._tr.write_line(text)
        else:
            print(text)


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Reporter:
    return Reporter(request.config)


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def test_guest_offers_the_kernel_device(kernel_image: KernelImage, tmp_path: Path) -> None:
    """What every test in the VM relies on: the vhost-vdpa node, the configured MAC and MTU, unlimited
    memlock, the project importable from the read-only root, and files handed back through the share."""
    mac = "02:00:00:00:a0:42"
    script = (
        f"test -c {KERNEL_DEVICE} || {{ echo 'no {KERNEL_DEVICE}'; exit 1; }}\n"
        "echo memlock=$(ulimit -l)\n"
        'vdpa -j dev config show vdpa0 > "$VDUPROXY_VM_OUT/config.json"\n'
        f"{shlex.quote(sys.executable)} -c 'import vduproxy.vdpa.device; print(\"import-ok\")'\n"
    )
    rc, output = run_in_kernel_vm(
        ["sh", "-c", script],
        kernel=kernel_image,
        cwd=REPO,
        options=VmOptions(mac=mac, mtu=1500),
        outdir=tmp_path,
        timeout=BOOT_TIMEOUT_S,
    )
    assert rc == 0, output
    assert "memlock=unlimited" in output.splitlines()
    assert "import-ok" in output.splitlines()
    config = json.loads((tmp_path / "config.json").read_text())["config"]["vdpa0"]
    assert config["mac"] == mac
    assert config["mtu"] == 1500


def test_command_status_and_output_come_back(kernel_image: KernelImage) -> None:
    rc, output = run_in_kernel_vm(
        ["sh", "-c", 'echo "to stdout $GREETING"; echo to-stderr >&2; exit 7'],
        kernel=kernel_image,
        cwd=REPO,
        env={"GREETING": "it's a 'quoted' value"},
        options=VmOptions(vdpa=False),
        timeout=BOOT_TIMEOUT_S,
    )
    assert rc == 7
    assert output.splitlines() == ["to stdout it's a 'quoted' value", "to-stderr"]


def test_device_setup_failure_is_reported(kernel_image: KernelImage) -> None:
    """A device the guest cannot create is a setup error naming the cause, not a hang or a silent rc."""
    with pytest.raises(KernelVmSetupError, match="vdpa dev add failed"):
        run_in_kernel_vm(
            ["true"],
            kernel=kernel_image,
            cwd=REPO,
            options=VmOptions(mac="not-a-mac"),
            timeout=BOOT_TIMEOUT_S,
        )


def test_device_suite_against_vdpa_sim_net(kernel_image: KernelImage, tmp_path: Path, report: Reporter) -> None:
    """tests/device, parametrized over the kernel device only, inside the guest: it must pass, and the
    kernel-device cases must actually run (a suite that skipped everything would prove nothing)."""
    extra = shlex.split(os.environ.get("VDUPROXY_KERNEL_PYTEST_ARGS", ""))
    command = [
        sys.executable, "-m", "pytest", "tests/device",
        "-q", "-rs", "-p", "no:cacheprovider",
        "--junitxml", f"{GUEST_OUT_DIR}/junit.xml",
        # Only the kernel parametrization: the sim-only cases already run in tier 1, and TCG is slow.
        "-k", "vhost-vdpa",
        *extra,
    ]  # fmt: skip
    env = {
        "VDUPROXY_TEST_VDPA": KERNEL_DEVICE,
        "VDUPROXY_TEST_VDPA_ONLY": "1",
        # Waits in the suite are deadlines for a device that stopped answering; TCG is many times slower.
        "VDUPROXY_TEST_TIMEOUT": "60",
    }
    rc, output = run_in_kernel_vm(
        command, kernel=kernel_image, cwd=REPO, env=env, outdir=tmp_path, timeout=SUITE_TIMEOUT_S
    )
    junit = tmp_path / "junit.xml"
    assert junit.is_file(), f"the inner pytest wrote no junit xml (rc {rc}):\n{tail(output)}"
    result = parse_junit(junit)
    on_device = [t for t in result.passed if KERNEL_DEVICE in t]
    for test_id, reason in result.skipped.items():
        report.line(f"kernel tier: skipped {test_id}: {reason}")
    report.line(
        f"kernel tier: {len(result.passed)} passed ({len(on_device)} on {KERNEL_DEVICE}), "
        f"{len(result.skipped)} skipped, {len(result.failed)} failed; "
        f"vdpa_sim_net on kernel {kernel_image.key}"
    )
    for test_id, message in result.failed.items():
        report.line(f"kernel tier: FAILED {test_id}: {message}")
    assert rc == 0 and not result.failed, (
        f"inner pytest rc {rc}; failed:\n"
        + "".join(f"  {t}: {m}\n" for t, m in result.failed.items())
        + f"--- inner output (tail) ---\n{tail(output)}"
    )
    assert on_device, f"no test ran against {KERNEL_DEVICE} (all skipped or deselected):\n{tail(output)}"
