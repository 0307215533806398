"""Kernel test tier: a kernel with vdpa_sim_net built in, booted under QEMU TCG over the host's root.

`ensure_kernel()` builds or fetches the cached kernel; `run_in_kernel_vm(command)` boots it and runs a
command next to /dev/vhost-vdpa-0. `python -m vduproxy.testing.kernelvm build` builds ahead of time.
"""

from .build import KernelBuildError, KernelImage, ensure_kernel
from .vm import KernelVmError, KernelVmSetupError, VmOptions, run_in_kernel_vm

__all__ = [
    "KernelBuildError",
    "KernelImage",
    "KernelVmError",
    "KernelVmSetupError",
    "VmOptions",
    "ensure_kernel",
    "run_in_kernel_vm",
]
