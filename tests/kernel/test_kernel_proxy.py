"""Tier 4: the proxy itself against kernel vdpa_sim_net (/dev/vhost-vdpa-0) in the TCG guest.

One boot runs tests/kernel/inner/test_proxy_inner.py there with the device set to the kernel's: the Python
front-end replays QEMU 7.2 against the proxy, in passthrough and SVQ modes (loopback byte for byte, frames
queued while the proxy is still starting, the MAC programmed through the CVQ from --mac / SEND_RARP / the
guest's frames, SUSPEND and exact GET_VRING_BASE with frames in flight, the dirty log during a migration).
The same module runs on the host against `sim:profile=vdpasim` in tier 2. `VDUPROXY_KERNEL_PYTEST_ARGS` adds
arguments to the inner run (e.g. `-x`, or `-k loopback`).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest

from vduproxy.testing.kernelvm.build import KernelImage
from vduproxy.testing.kernelvm.junit import parse_junit
from vduproxy.testing.kernelvm.vm import GUEST_OUT_DIR, run_in_kernel_vm

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
INNER = "tests/kernel/inner/test_proxy_inner.py"
KERNEL_DEVICE = "/dev/vhost-vdpa-0"
# Each inner test starts the proxy and moves a few hundred frames on one emulated CPU; a hang is still caught.
RUN_TIMEOUT_S = 1200
# Every inner test, so a test that silently stopped being collected is noticed.
INNER_TESTS = (
    "test_loopback_byte_exact",
    "test_traffic_right_after_start_is_not_lost",
    "test_proxy_programs_the_guest_mac_through_the_cvq",
    "test_stop_with_frames_in_flight_returns_exact_bases",
    "test_dirty_log_covers_every_page_the_device_wrote",
    "test_vdpa_sim_net_features_reach_the_front_end",
)


def tail(text: str, lines: int = 80) -> str:
    return "\n".join(text.splitlines()[-lines:])


def test_proxy_against_kernel_vdpa_sim_net(
    kernel_image: KernelImage, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    extra = shlex.split(os.environ.get("VDUPROXY_KERNEL_PYTEST_ARGS", ""))
    command = [
        sys.executable, "-m", "pytest", INNER,
        "-q", "-rs", "-p", "no:cacheprovider",
        "--junitxml", f"{GUEST_OUT_DIR}/junit.xml",
        *extra,
    ]  # fmt: skip
    env = {
        "VDUPROXY_PROXY_DEVICE": KERNEL_DEVICE,
        # Deadlines for a device that stopped answering; TCG is many times slower than the host.
        "VDUPROXY_TEST_TIMEOUT": "60",
    }
    rc, output = run_in_kernel_vm(
        command, kernel=kernel_image, cwd=REPO, env=env, outdir=tmp_path, timeout=RUN_TIMEOUT_S
    )
    junit = tmp_path / "junit.xml"
    assert junit.is_file(), f"the inner pytest wrote no junit xml (rc {rc}):\n{tail(output)}"
    result = parse_junit(junit)

    terminal = request.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"kernel proxy tier: {result.summary()} on {KERNEL_DEVICE} (kernel {kernel_image.key})"]
    lines += [f"kernel proxy tier: skipped {t}: {why}" for t, why in result.skipped.items()]
    lines += [f"kernel proxy tier: FAILED {t}: {why}" for t, why in result.failed.items()]
    for line in lines:  # seen in the CI log even when the test passes (output capture hides print)
        if terminal is not None:
            terminal.ensure_newline()
            terminal.write_line(line)

    assert rc == 0 and not result.failed, (
        f"inner pytest rc {rc}; failed:\n"
        + "".join(f"  {t}: {m}\n" for t, m in result.failed.items())
        + f"--- inner output (tail) ---\n{tail(output)}"
    )
    assert not result.skipped, f"inner tests skipped: {result.skipped}"
    on_device = [t for t in result.passed if KERNEL_DEVICE in t]
    elsewhere = sorted(set(result.passed) - set(on_device))
    assert not elsewhere, f"tests that did not run on {KERNEL_DEVICE}: {elsewhere}"
    if not extra:
        missing = [name for name in INNER_TESTS if not any(f"::{name}[" in t for t in on_device)]
        assert not missing, f"inner tests that did not run: {missing}\n{tail(output)}"
