"""Fixtures for tier-4 tests: the test kernel (vdpa_sim_net built in), booted under QEMU TCG.

QEMU and the kernel build are requirements of this tier: a missing QEMU, a missing build dependency or a
failed build fails the test, it does not skip. A kernel that is not cached yet is built here (about ten
minutes on two cores; `python -m vduproxy.testing.kernelvm build` does it ahead of time).
"""

from __future__ import annotations

import contextlib
import shutil

import pytest

from vduproxy.testing.kernelvm.build import KernelBuildError, KernelImage, ensure_kernel
from vduproxy.testing.kernelvm.vm import QEMU


@pytest.fixture(scope="session")
def kernel_image(request: pytest.FixtureRequest) -> KernelImage:
    if shutil.which(QEMU) is None:
        pytest.fail(f"{QEMU} not found (apt-get install qemu-system-x86)", pytrace=False)
    capture = request.config.pluginmanager.getplugin("capturemanager")
    # A first build is ten quiet minutes under output capture: let its progress lines reach the terminal.
    uncaptured = capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext()
    try:
        with uncaptured:
            return ensure_kernel()
    except KernelBuildError as e:
        pytest.fail(f"cannot build the test kernel: {e}", pytrace=False)
