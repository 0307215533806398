"""Cross-device compatibility: a profile or a state blob against a destination device."""

from __future__ import annotations

from pathlib import Path

import pytest

from vduproxy.migration.compat import (
    DeviceSummary,
    Problem,
    Severity,
    check_compat,
    device_summary,
    exit_code,
    format_problems,
    load_destination,
    load_source,
    profile_summary,
)
from vduproxy.migration.state import DeviceState, StateError, VringState
from vduproxy.vdpa.sim import SimDevice, load_profile
from vduproxy.virtio import NetF

pytestmark = pytest.mark.unit

MAC = bytes.fromhex("02aabbccddee")
BASE = int(NetF.VERSION_1 | NetF.ACCESS_PLATFORM | NetF.MAC | NetF.MTU)
VDPASIM_LIKE = DeviceSummary(
    "dest",
    BASE | NetF.CTRL_VQ | NetF.CTRL_MAC_ADDR | NetF.ANY_LAYOUT,
    0x1E,
    ring_max=256,
    max_pairs=1,
    mtu=1500,
    mac=MAC,
)


def by_what(problems: list[Problem]) -> dict[str, Problem]:
    return {p.what: p for p in problems}


def state(**kw: object) -> DeviceState:
    args: dict[str, object] = {
        "guest_features": int(NetF.VERSION_1),
        "mac": MAC,
        "config_mac": MAC,
        "source": DeviceSummary("src", 0, 0, 1024, 4),
    }
    args.update(kw)
    return DeviceState(**args)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- summaries


@pytest.mark.parametrize("name", ["rich", "vdpasim", "basic"])
def test_device_summary_matches_the_profile_it_was_built_from(name: str) -> None:
    profile = load_profile(name)
    with SimDevice(f"sim:profile={name}") as dev:
        got = device_summary(dev)
    want = profile_summary(profile)
    assert got.name == dev.name
    assert (got.features, got.backend_features, got.ring_max, got.max_pairs, got.mtu, got.mac) == (
        want.features,
        want.backend_features,
        want.ring_max,
        want.max_pairs,
        want.mtu,
        want.mac,
    )


# ---------------------------------------------------------------------- profile → device


def test_rich_to_vdpasim_lists_what_breaks_and_what_is_bridged() -> None:
    rich = load_profile("rich")
    problems = check_compat(rich, load_destination("sim:profile=vdpasim"))
    p = by_what(problems)
    for feature in ("MQ", "CTRL_VLAN", "CTRL_RX"):
        assert p[f"feature {feature}"].severity is Severity.ERROR
    for feature in ("MRG_RXBUF", "RING_INDIRECT_DESC", "RING_EVENT_IDX"):
        assert p[f"feature {feature}"].severity is Severity.BRIDGED
    assert p[f"{rich.queue_pairs} queue pairs"].severity is Severity.ERROR
    assert p[f"ring size {rich.ring_max}"].severity is Severity.BRIDGED
    # nothing vdpasim offers is reported missing
    assert "feature CTRL_MAC_ADDR" not in p and "feature VERSION_1" not in p
    assert exit_code(problems) == 1


def test_a_device_offering_everything_the_source_offers_is_compatible() -> None:
    problems = check_compat(load_profile("vdpasim"), load_destination("rich"))
    assert problems == []
    assert exit_code(problems) == 0
    assert format_problems(problems) == ["compatible: nothing would break"]


def test_only_bridged_differences_do_not_fail() -> None:
    problems = check_compat(load_source("basic"), load_destination("vdpasim"))
    assert [(x.what, x.severity) for x in problems] == [("feature MRG_RXBUF", Severity.BRIDGED)]
    assert "num_buffers" in problems[0].why
    assert exit_code(problems) == 0


def test_larger_mtu_and_missing_host_offload_are_errors() -> None:
    src = DeviceSummary("src", BASE | NetF.HOST_TSO4 | NetF.GUEST_TSO4, 0, 256, 1, mtu=9000)
    p = by_what(check_compat(src, VDPASIM_LIKE))
    assert p["MTU 9000"].severity is Severity.ERROR and "1500" in p["MTU 9000"].why
    assert p["feature HOST_TSO4"].severity is Severity.ERROR
    assert p["feature GUEST_TSO4"].severity is Severity.BRIDGED


def test_destination_without_mtu_feature_is_assumed_to_carry_1500() -> None:
    dest = DeviceSummary("d", BASE & ~NetF.MTU, 0, 256, 1, mtu=None)
    assert by_what(check_compat(DeviceSummary("s", BASE, 0, 256, 1, mtu=1500), dest)).keys() == {"feature MTU"}
    p = by_what(check_compat(DeviceSummary("s", BASE, 0, 256, 1, mtu=1501), dest))
    assert "no MTU feature" in p["MTU 1501"].why


# ---------------------------------------------------------------------- state → device


def test_state_bridged_features_and_ring_size() -> None:
    s = state(
        guest_features=int(NetF.VERSION_1 | NetF.RING_INDIRECT_DESC | NetF.MRG_RXBUF | NetF.RING_EVENT_IDX)
        | (1 << 26)  # LOG_ALL: a vhost-user transport bit, never a device feature
        | (1 << 30),
        vrings=(VringState(0, 1024, 5, 5, True), VringState(1, 256, 0, 0, True)),
    )
    problems = check_compat(s, VDPASIM_LIKE)
    assert {(x.what, x.severity) for x in problems} == {
        ("feature RING_INDIRECT_DESC", Severity.BRIDGED),
        ("feature MRG_RXBUF", Severity.BRIDGED),
        ("feature RING_EVENT_IDX", Severity.BRIDGED),
        ("ring size 1024", Severity.BRIDGED),
    }
    assert exit_code(problems) == 0


def test_state_net_state_the_destination_cannot_restore() -> None:
    s = state(pairs=2, max_pairs=2, vlans=frozenset({5}), mtu=9000)
    problems = check_compat(s, VDPASIM_LIKE)
    p = by_what(problems)
    assert p["1 VLAN filter(s) (5)"].severity is Severity.ERROR and "CTRL_VLAN" in p["1 VLAN filter(s) (5)"].why
    assert p["MTU 9000"].severity is Severity.ERROR
    assert [x.what for x in problems].count("2 queue pairs") == 1  # reported once, not by both checks
    assert exit_code(problems) == 1


def test_state_mac_is_only_a_problem_when_it_cannot_be_set() -> None:
    s = state(mac=bytes.fromhex("021234567890"))
    assert check_compat(s, VDPASIM_LIKE) == []  # CTRL_MAC_ADDR programs it
    no_cvq = DeviceSummary("basic", BASE, 0, 256, 1, 1500, MAC)
    (problem,) = check_compat(s, no_cvq)
    assert problem.what == "MAC 02:12:34:56:78:90" and "no control queue" in problem.why


# ---------------------------------------------------------------------- output and inputs


def test_format_is_one_line_per_problem_errors_first() -> None:
    problems = [
        Problem("feature MRG_RXBUF", "bridged by the SVQ", Severity.BRIDGED),
        Problem("MTU 9000", "too large", Severity.ERROR),
    ]
    lines = format_problems(problems)
    assert len(lines) == 2
    assert lines[0].startswith("error") and "MTU 9000: too large" in lines[0]
    assert lines[1].startswith("bridged") and "feature MRG_RXBUF" in lines[1]
    assert all("\n" not in line for line in lines)


def test_load_source_reads_state_blobs_and_profiles(tmp_path: Path) -> None:
    s = state(vlans=frozenset({9}))
    blob = tmp_path / "guest.state"
    blob.write_bytes(s.to_bytes())
    assert load_source(str(blob)) == s
    assert load_source("vdpasim").features == load_profile("vdpasim").features  # type: ignore[union-attr]
    toml = tmp_path / "mine.toml"
    toml.write_text('features = ["VERSION_1", "ACCESS_PLATFORM"]\n')
    src = load_source(str(toml))
    assert isinstance(src, DeviceSummary) and src.features == NetF.VERSION_1 | NetF.ACCESS_PLATFORM


def test_load_source_refuses_junk_and_corrupt_blobs(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello")
    with pytest.raises(StateError, match=r"neither a vduproxy state blob nor a \.toml profile"):
        load_source(str(junk))
    corrupt = tmp_path / "bad.state"
    corrupt.write_bytes(state().to_bytes()[:-3])
    with pytest.raises(StateError, match="truncated"):
        load_source(str(corrupt))
