"""Devices for the cross-device suite: every software-device profile, plus each path in $VDUPROXY_TEST_VDPA.

    VDUPROXY_TEST_VDPA=/dev/vhost-vdpa-0 pytest tests/device  # also against a kernel device
    VDUPROXY_TEST_VDPA_ONLY=1                                  # ...and only against it (TCG is slow)
    VDUPROXY_TEST_SIM_PROFILES=rich,vdpasim                    # restrict the sim profiles
    VDUPROXY_TEST_TIMEOUT=30                                   # per-wait deadline, seconds (default 10)

Capability checks live in the (synchronous) `harness` fixture, driven by markers, because a skip raised
inside a trio test loses its reason in the report:

    @pytest.mark.needs(NetF.CTRL_VQ, NetF.CTRL_RX)        negotiated features the test needs
    @pytest.mark.needs_backend(BackendF.SUSPEND)          backend features the test needs
    @pytest.mark.needs_pairs(2)                           queue pairs the device must have
    @pytest.mark.needs_fault_events                       the device reports faults (fault_fd() >= 0)
    @pytest.mark.harness(ring_num=64, base=0xFFF0)        DeviceHarness keyword arguments
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from vduproxy.testing.vdpa_harness import DeviceHarness, open_spec, suite_device_specs
from vduproxy.vdpa.device import BackendF, VdpaDevice
from vduproxy.virtio import NetF


def pytest_configure(config: pytest.Config) -> None:
    for line in (
        "needs(*features): NetF bits the device must negotiate, else the test is skipped",
        "needs_backend(*features): BackendF bits the device must offer, else the test is skipped",
        "needs_pairs(n): queue pairs the device must have, else the test is skipped",
        "needs_fault_events: the device must report faults through fault_fd(), else the test is skipped",
        "lacks_backend(*features): BackendF bits the device must not offer (tests of a refusal)",
        "harness(**kwargs): keyword arguments for the DeviceHarness of the `harness` fixture",
    ):
        config.addinivalue_line("markers", line)


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


def _missing(h: DeviceHarness, request: pytest.FixtureRequest) -> str | None:
    """Why this device cannot run the test (None when it can)."""
    for mark in request.node.iter_markers("needs"):
        for f in mark.args:
            if not h.has(f):
                return f"{h.device.name} does not offer {NetF(f).name}"
    for mark in request.node.iter_markers("needs_backend"):
        for f in mark.args:
            if not h.has_backend(f):
                return f"{h.device.name} does not offer backend feature {f.name}"
    mark = request.node.get_closest_marker("needs_pairs")
    if mark is not None:
        have = h.config_max_pairs() if h.has(NetF.MQ) else 1
        if have < mark.args[0]:
            return f"{h.device.name} has {have} queue pair(s), the test needs {mark.args[0]}"
    if request.node.get_closest_marker("needs_fault_events") and h.device.fault_fd() < 0:
        return f"{h.device.name} reports no fault events (fault_fd() is -1)"
    return None


@pytest.fixture
def harness(device: VdpaDevice, request: pytest.FixtureRequest) -> Iterator[DeviceHarness]:
    """A started harness (one queue pair and the CVQ when offered, unless the `harness` marker says
    otherwise); skips with the reason when the device lacks what the test's markers ask for."""
    mark = request.node.get_closest_marker("harness")
    with DeviceHarness(device, **(mark.kwargs if mark else {})) as h:
        h.negotiate_backend()
        h.negotiate()
        reason = _missing(h, request)
        if reason:
            pytest.skip(reason)
        h.bring_up()
        yield h


def _offers(spec: str) -> tuple[int, int, int, bool]:
    """What a device offers: features, backend features, queue pairs, fault events (opened and closed again)."""
    dev = open_spec(spec)
    try:
        features = dev.get_features()
        pairs = int.from_bytes(dev.get_config(8, 2), "little") if features & NetF.MQ else 1
        return features, dev.get_backend_features(), max(pairs, 1), dev.fault_fd() >= 0
    finally:
        dev.close()


def _lacks(item: pytest.Item, offers: tuple[int, int, int, bool]) -> str | None:
    features, backend, pairs, faults = offers
    for mark in item.iter_markers("needs"):
        for f in mark.args:
            if not features & f:
                return f"does not offer {NetF(f).name}"
    for mark in item.iter_markers("needs_backend"):
        for f in mark.args:
            if not backend & f:
                return f"does not offer backend feature {BackendF(f).name}"
    for mark in item.iter_markers("lacks_backend"):
        for f in mark.args:
            if backend & f:
                return f"offers backend feature {BackendF(f).name} (the test is about a device without it)"
    mark = item.get_closest_marker("needs_pairs")
    if mark is not None and pairs < mark.args[0]:
        return f"has {pairs} queue pair(s), the test needs {mark.args[0]}"
    if item.get_closest_marker("needs_fault_events") and not faults:
        return "reports no fault events"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that needs what a device does not offer is not collected for that device (a capability, not a
    failure and not a skip); each such combination is printed with its reason."""
    offers: dict[str, tuple[int, int, int, bool]] = {}
    keep: list[pytest.Item] = []
    dropped: list[tuple[pytest.Item, str]] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        spec = callspec.params.get("device_spec") if callspec is not None else None
        if not isinstance(spec, str):
            keep.append(item)
            continue
        if spec not in offers:
            offers[spec] = _offers(spec)
        reason = _lacks(item, offers[spec])
        if reason is None:
            keep.append(item)
        else:
            dropped.append((item, f"{spec} {reason}"))
    if dropped:
        config.hook.pytest_deselected(items=[i for i, _ in dropped])
        items[:] = keep
        for item, why in dropped:
            print(f"device suite: not applicable: {item.nodeid}: {why}", file=sys.__stderr__, flush=True)
