"""CVQ restore: the plan (which commands, in which order, what a destination cannot honour) and its application
to the software device, checked through the device's own filter state and the `cvq_command` trace."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from vduproxy.migration.restore import (
    GUEST_OFFLOAD_MASK,
    CvqCaps,
    CvqStep,
    RestoreError,
    apply_restore,
    check_restore,
    cvq_caps,
    plan_restore,
)
from vduproxy.migration.state import RX_MODE_DEFAULT, DeviceState, DeviceSummary, MacSource, RxMode
from vduproxy.testing.vdpa_harness import DEFAULT_WANTED, DeviceHarness
from vduproxy.vdpa.cvq import CtrlClass, CvqClient, VlanCmd, make_command
from vduproxy.vdpa.device import cvq_index
from vduproxy.vdpa.sim import SimDevice
from vduproxy.virtio import NetF

pytestmark = pytest.mark.unit

GUEST_MAC = bytes.fromhex("02aabbccddee")
DEST_MAC = bytes.fromhex("025d00000001")
ALL_CTRL = int(
    NetF.CTRL_VQ | NetF.CTRL_RX | NetF.CTRL_RX_EXTRA | NetF.CTRL_VLAN | NetF.CTRL_MAC_ADDR | NetF.MQ
    | NetF.CTRL_GUEST_OFFLOADS | NetF.GUEST_CSUM | NetF.VERSION_1
)  # fmt: skip


def make_state(**changes: Any) -> DeviceState:
    """A state that needs nothing on a destination with MAC DEST_MAC: every field at its reset default."""
    base = DeviceState(
        guest_features=int(NetF.VERSION_1 | NetF.GUEST_CSUM),
        mac=DEST_MAC,
        config_mac=DEST_MAC,
        guest_offloads=int(NetF.GUEST_CSUM),
        max_pairs=4,
        source=DeviceSummary("sim:profile=rich", 0, 0, 256, 4, 1500, DEST_MAC),
    )
    return dataclasses.replace(base, **changes)


def rich_state() -> DeviceState:
    return make_state(
        mac=GUEST_MAC,
        learned_mac=GUEST_MAC,
        learned_from=MacSource.TX,
        pairs=2,
        rx_mode=RxMode.ALLMULTI | RxMode.NOBCAST,  # promisc off, allmulti and nobcast on
        uc_macs=(bytes.fromhex("021111111111"),),
        mc_macs=(bytes.fromhex("01005e000001"), bytes.fromhex("333300000001")),
        vlans=frozenset({100, 7, 4000}),
        guest_offloads=0,
    )


def names(steps: list[CvqStep]) -> list[str]:
    return [f"{s.command.class_name}.{s.command.command_name}" for s in steps]


# ---------------------------------------------------------------------- planning (no device)


def test_default_state_needs_no_command() -> None:
    assert plan_restore(make_state(), ALL_CTRL, CvqCaps(max_pairs=4, mac=DEST_MAC)) == []


def test_default_state_needs_no_control_queue_at_all() -> None:
    """A guest that changed nothing moves onto a device without a CVQ (profile basic)."""
    features = int(NetF.VERSION_1)
    assert plan_restore(make_state(guest_offloads=0), features, CvqCaps(mac=DEST_MAC)) == []


def test_full_state_plans_every_command_in_order() -> None:
    state = rich_state()
    steps = plan_restore(state, ALL_CTRL, CvqCaps(max_pairs=4, mac=DEST_MAC))
    assert names(steps) == [
        "MAC.ADDR_SET",
        "MQ.VQ_PAIRS_SET",
        "RX.PROMISC",
        "RX.ALLMULTI",
        "RX.NOBCAST",
        "MAC.TABLE_SET",
        "VLAN.ADD",
        "VLAN.ADD",
        "VLAN.ADD",
        "GUEST_OFFLOADS.SET",
    ]
    args = [s.command.args for s in steps]
    assert args[0] == {"mac": GUEST_MAC}
    assert args[1] == {"pairs": 2}
    assert args[2:5] == [{"on": False}, {"on": True}, {"on": True}]
    assert args[5] == {"unicast": list(state.uc_macs), "multicast": list(state.mc_macs)}
    assert [a["vid"] for a in args[6:9] if a] == [7, 100, 4000]
    assert args[9] == {"offloads": 0}
    assert all(s.why for s in steps)


def test_unknown_destination_mac_is_always_programmed() -> None:
    steps = plan_restore(make_state(), ALL_CTRL, CvqCaps(max_pairs=4, mac=None))
    assert [s.describe() for s in steps] == ["MAC.ADDR_SET mac=02:5d:00:00:00:01"]


def test_rx_defaults_of_the_destination_decide_what_is_sent() -> None:
    """A device that starts non-promiscuous with allmulti (like vdpa_sim_net) needs PROMISC on, ALLMULTI off."""
    caps = CvqCaps(max_pairs=4, mac=DEST_MAC, rx_defaults=RxMode.ALLMULTI)
    steps = plan_restore(make_state(rx_mode=RX_MODE_DEFAULT), ALL_CTRL, caps)
    assert [s.describe() for s in steps] == ["RX.PROMISC on=True", "RX.ALLMULTI on=False"]


def test_overflowed_table_is_recreated_as_an_overflow() -> None:
    caps = CvqCaps(max_pairs=4, mac=DEST_MAC, mac_table_max=8)
    (step,) = plan_restore(make_state(uc_overflow=True), ALL_CTRL, caps)
    assert step.command.args is not None
    assert len(step.command.args["unicast"]) == 9 and step.command.args["multicast"] == []


def test_offloads_the_destination_lacks_are_dropped_not_refused() -> None:
    # the guest allowed GUEST_CSUM|GUEST_TSO4; a destination with only GUEST_CSUM keeps its default (all on)
    state = make_state(guest_offloads=int(NetF.GUEST_CSUM | NetF.GUEST_TSO4))
    assert plan_restore(state, ALL_CTRL, CvqCaps(max_pairs=4, mac=DEST_MAC)) == []


def test_everything_a_destination_cannot_honour_is_named() -> None:
    features = int(NetF.VERSION_1 | NetF.CTRL_VQ | NetF.CTRL_MAC_ADDR)  # what vdpa_sim_net offers
    with pytest.raises(RestoreError) as ei:
        plan_restore(rich_state(), features, CvqCaps(max_pairs=1, mac=DEST_MAC))
    problems = {p.what: p.why for p in ei.value.problems}
    assert "2 queue pairs" in problems and "has 1 queue pair" in problems["2 queue pairs"]
    assert "CTRL_RX" in problems["RX mode promisc off"]
    assert "CTRL_RX_EXTRA" in problems["RX mode nobcast on"]
    assert "CTRL_RX" in problems["MAC table (1 unicast, 2 multicast)"]
    assert "CTRL_VLAN" in problems["3 VLAN filter(s) (7, 100, 4000)"]
    msg = str(ei.value)
    assert "VLAN" in msg and "CTRL_VLAN" in msg and "queue pairs" in msg
    # the MAC alone would have been fine
    assert not any(w.startswith("MAC 02:") for w in problems)


def test_no_control_queue_is_named_as_such() -> None:
    steps, problems = check_restore(make_state(mac=GUEST_MAC), int(NetF.VERSION_1), CvqCaps(mac=DEST_MAC))
    assert steps == []
    assert [str(p) for p in problems] == [
        "MAC 02:aa:bb:cc:dd:ee: the destination has no control queue (CTRL_VQ not negotiated)"
    ]


def test_offloads_off_need_ctrl_guest_offloads() -> None:
    features = int(NetF.VERSION_1 | NetF.CTRL_VQ | NetF.GUEST_CSUM)
    with pytest.raises(RestoreError, match=r"guest offloads 0x0: .*CTRL_GUEST_OFFLOADS"):
        plan_restore(make_state(guest_offloads=0), features, CvqCaps(mac=DEST_MAC))


# ---------------------------------------------------------------------- applied to the software device


@contextlib.contextmanager
def restore_target(spec: str, wanted: int = DEFAULT_WANTED) -> Iterator[tuple[SimDevice, CvqClient, int]]:
    """A device brought up as the destination proxy does: features, then its own CVQ before DRIVER_OK, then
    the data rings and DRIVER_OK. Yields the device, the CVQ client and the negotiated features."""
    dev = SimDevice(spec)
    h = DeviceHarness(dev, wanted=wanted, use_cvq=False)
    client: CvqClient | None = None
    try:
        h.negotiate_backend()
        h.negotiate()
        max_pairs = h.config_max_pairs() if h.has(NetF.MQ) else 1
        client = CvqClient(dev, vq_index=cvq_index(max_pairs), iova=0x4000_0000, data_vqs=2 * max_pairs)
        client.setup()
        h.bring_up()
        yield dev, client, h.features
    finally:
        if client is not None:
            client.close()
        h.close()
        dev.close()


def expected_filter(state: DeviceState) -> dict[str, Any]:
    return {
        "mac": state.mac.hex(":"),
        **{m.name.lower(): bool(state.rx_mode & m) for m in RxMode if m.name},
        "uc_macs": [m.hex(":") for m in state.uc_macs],
        "mc_macs": [m.hex(":") for m in state.mc_macs],
        "vlans": sorted(state.vlans),
        "active_pairs": state.pairs,
    }


async def test_restore_onto_rich_sim_reaches_the_saved_state_in_trace_order() -> None:
    state = rich_state()
    wanted = DEFAULT_WANTED | NetF.CTRL_GUEST_OFFLOADS | NetF.GUEST_CSUM
    with restore_target("sim:profile=rich", wanted) as (dev, client, features):
        before = dev.filter_state()
        assert before["mac"] != state.mac.hex(":")  # the restore has something to do
        steps = plan_restore(state, features, cvq_caps(dev, features))
        with capture_logs() as logs:
            await apply_restore(client, steps)
        after = dev.filter_state()
    assert {k: after[k] for k in expected_filter(state)} == expected_filter(state)
    assert after["guest_offloads"] == state.guest_offloads
    assert after["cvq_commands"] - before["cvq_commands"] == len(steps)
    traced = [(e["cls"], e["cmd"], e["ack"]) for e in logs if e["event"] == "cvq_command"]
    assert traced == [(s.command.class_name, s.command.command_name, "ok") for s in steps]
    # the order the restore promises: MAC, pairs, RX modes, tables, VLANs (ascending), offloads
    assert [f"{c}.{m}" for c, m, _ in traced] == [
        "MAC.ADDR_SET", "MQ.VQ_PAIRS_SET", "RX.PROMISC", "RX.ALLMULTI", "RX.NOBCAST", "MAC.TABLE_SET",
        "VLAN.ADD", "VLAN.ADD", "VLAN.ADD", "GUEST_OFFLOADS.SET",
    ]  # fmt: skip
    vlan_args = [e["args"]["vid"] for e in logs if e["event"] == "cvq_command" and e["cls"] == "VLAN"]
    assert vlan_args == sorted(state.vlans)
    events = [e["event"] for e in logs]
    assert events[0] == "cvq_restore_start" and events[-1] == "cvq_restore_done"


async def test_restore_sets_guest_offloads(tmp_path: Path) -> None:
    """Offloads off the reset default (all negotiated) are programmed, and the device ends up with them."""
    profile = tmp_path / "offloads.toml"
    profile.write_text(
        'features = ["VERSION_1", "ACCESS_PLATFORM", "MAC", "CTRL_VQ", "CTRL_GUEST_OFFLOADS", '
        '"GUEST_CSUM", "GUEST_TSO4", "GUEST_TSO6"]\n'
        'backend_features = ["IOTLB_MSG_V2", "IOTLB_BATCH", "IOTLB_ASID"]\n'
    )
    wanted = DEFAULT_WANTED | NetF.CTRL_GUEST_OFFLOADS | NetF.GUEST_CSUM | NetF.GUEST_TSO4 | NetF.GUEST_TSO6
    with restore_target(f"sim:profile={profile}", wanted) as (dev, client, features):
        assert features & GUEST_OFFLOAD_MASK == NetF.GUEST_CSUM | NetF.GUEST_TSO4 | NetF.GUEST_TSO6
        state = make_state(mac=dev.profile.mac, guest_offloads=int(NetF.GUEST_CSUM | NetF.GUEST_TSO4))
        steps = plan_restore(state, features, cvq_caps(dev, features))
        assert [s.describe() for s in steps] == ["GUEST_OFFLOADS.SET offloads=0x82"]
        await apply_restore(client, steps)
        assert dev.filter_state()["guest_offloads"] == state.guest_offloads


async def test_vdpasim_refuses_rx_mode_and_vlans_but_takes_a_mac() -> None:
    with restore_target("sim:profile=vdpasim") as (dev, client, features):
        caps = cvq_caps(dev, features)
        with pytest.raises(RestoreError) as ei:
            plan_restore(make_state(mac=GUEST_MAC, rx_mode=RxMode.ALLMULTI, vlans=frozenset({42})), features, caps)
        msg = str(ei.value)
        assert "VLAN filter(s) (42)" in msg and "CTRL_VLAN" in msg
        assert "RX mode promisc off" in msg and "CTRL_RX" in msg
        assert dev.filter_state()["cvq_commands"] == 0  # refused at planning: the device saw nothing

        mac_only = make_state(mac=GUEST_MAC, guest_offloads=0)
        steps = plan_restore(mac_only, features, caps)
        with capture_logs() as logs:
            await apply_restore(client, steps)
        assert dev.filter_state()["mac"] == GUEST_MAC.hex(":")
        assert dev.get_config(0, 6) == GUEST_MAC
    assert [(e["cls"], e["cmd"], e["args"]) for e in logs if e["event"] == "cvq_command"] == [
        ("MAC", "ADDR_SET", {"mac": "02:aa:bb:cc:dd:ee"})
    ]


async def test_a_refused_command_fails_the_restore_loudly_and_stops_it() -> None:
    """vdpasim acks only MAC_ADDR_SET: a VLAN step that slipped through (a plan made for another device)
    must fail with the command named, and nothing after it may be sent."""
    with restore_target("sim:profile=vdpasim") as (dev, client, _):
        steps = [
            CvqStep(make_command(CtrlClass.MAC, 1, {"mac": GUEST_MAC}), "test"),
            CvqStep(make_command(CtrlClass.VLAN, VlanCmd.ADD, {"vid": 42}), "test"),
            CvqStep(make_command(CtrlClass.MAC, 1, {"mac": DEST_MAC}), "test"),
        ]
        before = dev.filter_state()["cvq_commands"]
        with capture_logs() as logs, pytest.raises(RestoreError) as ei:
            await apply_restore(client, steps)
        assert "refused restore step 2/3: VLAN.ADD vid=42" in str(ei.value)
        assert ei.value.step is steps[1]
        assert dev.filter_state()["cvq_commands"] - before == 2
        assert dev.filter_state()["mac"] == GUEST_MAC.hex(":")  # step 3 never ran
    acks = [(e["cmd"], e["ack"]) for e in logs if e["event"] == "cvq_command"]
    assert acks == [("ADDR_SET", "ok"), ("ADD", "err")]
    assert any(e["event"] == "cvq_restore_refused" for e in logs)
