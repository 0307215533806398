"""Open a vDPA device from the `--device` spec: `sim[:key=value,...]` or a /dev/vhost-vdpa-N path."""

from __future__ import annotations

import errno

from .device import DeviceError, VdpaDevice


def open_device(spec: str) -> VdpaDevice:
    """The software device for "sim…", the kernel device for a path. Imports lazily: the kernel driver needs
    no C extension and the sim needs no /dev node."""
    if spec == "sim" or spec.startswith("sim:"):
        from .sim import SimDevice

        return SimDevice(spec)
    if spec.startswith("/") or spec.startswith("vhost-vdpa-"):
        from .kernel import KernelVdpaDevice

        return KernelVdpaDevice(spec if spec.startswith("/") else f"/dev/{spec}")
    raise DeviceError(
        "open", f"unknown device {spec!r}: expected sim[:key=value,...] or /dev/vhost-vdpa-N", errno.EINVAL
    )
