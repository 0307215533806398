"""Devices for the cross-device suite: every software-device profile, plus each path in $VDUPROXY_TEST_VDPA.

VDUPROXY_TEST_VDPA=/dev/vhost-vdpa-0 pytest tests/device      # also run against a kernel device
VDUPROXY_TEST_VDPA_ONLY=1                                      # ...and only against it (TCG guests are slow)
VDUPROXY_TEST_SIM_PROFILES=rich,vdpasim                        # restrict the sim profiles
VDUPROXY_TEST_TIMEOUT=30                                       # per-wait deadline in seconds (default 10)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vduproxy.testing.vdpa_harness import DeviceHarness, open_spec, suite_device_specs
from vduproxy.vdpa.device import VdpaDevice


@pytest.fixture(params=suite_device_specs())
def device_spec(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def device(device_spec: str) -> Iterator[VdpaDevice]:
    dev = open_spec(device_spec)
    try:
        yield dev
    finally:
        dev.close()


@pytest.fixture
def harness(device: VdpaDevice) -> Iterator[DeviceHarness]:
    """A started harness with the default options (one queue pair, CVQ when offered)."""
    with DeviceHarness(device) as h:
        h.start()
        yield h
