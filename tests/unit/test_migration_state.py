"""The device-state blob: round trips, and every kind of damage refused with a StateError that says why."""

from __future__ import annotations

import dataclasses
import json
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vduproxy.migration.state import (
    FORMAT_VERSION,
    HEADER_SIZE,
    MAC_TABLE_CAP,
    MAGIC,
    DeviceState,
    DeviceSummary,
    MacSource,
    RxMode,
    StateError,
    VringState,
    vlan_bitmap,
    vlans_from_bitmap,
)
from vduproxy.virtio import NetF

pytestmark = pytest.mark.unit

macs = st.binary(min_size=6, max_size=6)
u64 = st.integers(0, (1 << 64) - 1)
u16 = st.integers(0, 0xFFFF)


@st.composite
def device_states(draw: st.DrawFn) -> DeviceState:
    max_pairs = draw(st.integers(1, 8))
    indices = draw(st.lists(st.integers(0, 2 * max_pairs), unique=True, max_size=2 * max_pairs + 1))
    vrings = tuple(
        VringState(i, 1 << draw(st.integers(0, 15)), draw(u16), draw(u16), draw(st.booleans())) for i in indices
    )
    learned_from = draw(st.sampled_from(MacSource))
    features = draw(u64) & ~int(NetF.RING_PACKED)
    return DeviceState(
        guest_features=features,
        protocol_features=draw(u64),
        pairs=draw(st.integers(1, max_pairs)),
        max_pairs=max_pairs,
        vrings=vrings,
        mtu=draw(st.none() | st.integers(68, 0xFFFF)),
        mac=draw(macs),
        config_mac=draw(macs),
        learned_mac=None if learned_from == MacSource.NONE else draw(macs),
        learned_from=learned_from,
        rx_mode=RxMode(draw(st.integers(0, 0x3F))),
        uc_macs=tuple(draw(st.lists(macs, max_size=MAC_TABLE_CAP))),
        mc_macs=tuple(draw(st.lists(macs, max_size=4))),
        uc_overflow=draw(st.booleans()),
        mc_overflow=draw(st.booleans()),
        vlans=frozenset(draw(st.lists(st.integers(0, 4095), max_size=20))),
        guest_offloads=draw(u64),
        source=DeviceSummary(
            name=draw(st.text(max_size=20)),
            features=draw(u64),
            backend_features=draw(u64),
            ring_max=1 << draw(st.integers(0, 15)),
            max_pairs=draw(st.integers(1, 0x8000)),
            mtu=draw(st.none() | st.integers(68, 0xFFFF)),
            mac=draw(st.none() | macs),
        ),
    )


def sample_state(**changes: object) -> DeviceState:
    base = DeviceState(
        guest_features=int(NetF.VERSION_1 | NetF.MRG_RXBUF | NetF.RING_EVENT_IDX),
        protocol_features=0x8000 | 0x2,
        pairs=2,
        max_pairs=4,
        vrings=(VringState(0, 256, 17, 17, True), VringState(1, 256, 3, 2, True), VringState(8, 64, 0, 0, True)),
        mtu=1500,
        mac=bytes.fromhex("02aabbccddee"),
        config_mac=bytes.fromhex("025d00000001"),
        learned_mac=bytes.fromhex("02aabbccddee"),
        learned_from=MacSource.RARP,
        rx_mode=RxMode.ALLMULTI | RxMode.NOBCAST,
        uc_macs=(bytes.fromhex("021111111111"),),
        mc_macs=(bytes.fromhex("01005e000001"),),
        vlans=frozenset({1, 100, 4095}),
        guest_offloads=int(NetF.GUEST_CSUM),
        source=DeviceSummary("sim:profile=rich", 0x338FF802E, 0x17E, 1024, 4, 1500, bytes.fromhex("025d00000001")),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def _recrc(blob: bytes) -> bytes:
    """Fix the CRC after a deliberate edit, so that the check under test is the one that fires."""
    body = blob[HEADER_SIZE:]
    return blob[:16] + zlib.crc32(blob[:16] + body).to_bytes(4, "little") + body


# ---------------------------------------------------------------------- round trips


@settings(max_examples=200, deadline=None)
@given(device_states())
def test_any_valid_state_round_trips(state: DeviceState) -> None:
    blob = state.to_bytes()
    assert blob.startswith(MAGIC)
    assert DeviceState.from_bytes(blob) == state
    assert DeviceState.from_bytes(bytearray(blob)) == state


def test_sample_round_trip_keeps_every_field() -> None:
    state = sample_state()
    back = DeviceState.from_bytes(state.to_bytes())
    assert back == state
    assert back.vlans == {1, 100, 4095}
    assert back.vrings[1] == VringState(1, 256, 3, 2, True)
    assert back.learned_from is MacSource.RARP
    assert back.rx_mode == RxMode.ALLMULTI | RxMode.NOBCAST


def test_largest_ring_and_unset_optionals_round_trip() -> None:
    state = sample_state(
        vrings=(VringState(0, 32768, 0xFFFF, 0xFFFE, False),), mtu=None, learned_mac=None, learned_from=MacSource.NONE
    )
    back = DeviceState.from_bytes(state.to_bytes())
    assert back.vrings == (VringState(0, 32768, 0xFFFF, 0xFFFE, False),)
    assert back.mtu is None and back.learned_mac is None


@given(st.frozensets(st.integers(0, 4095)))
def test_vlan_bitmap_is_4096_bits(vlans: frozenset[int]) -> None:
    bitmap = vlan_bitmap(vlans)
    assert len(bitmap) == 512
    assert vlans_from_bitmap(bitmap) == vlans


def test_json_view_is_readable() -> None:
    view = json.loads(sample_state().to_json())
    assert view["mac"] == "02:aa:bb:cc:dd:ee"
    assert view["learned_from"] == "rarp"
    assert view["vlans"] == [1, 100, 4095]
    assert view["rx_mode"]["allmulti"] is True and view["rx_mode"]["promisc"] is False
    assert "MRG_RXBUF" in view["guest_features_names"]
    assert view["vrings"][0] == {"index": 0, "num": 256, "base": 17, "used_idx": 17, "enabled": True}
    assert view["source"]["ring_max"] == 1024


# ---------------------------------------------------------------------- damage


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_single_byte_change_is_refused(data: st.DataObject) -> None:
    blob = bytearray(sample_state().to_bytes())
    pos = data.draw(st.integers(0, len(blob) - 1))
    blob[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(StateError):
        DeviceState.from_bytes(bytes(blob))


@pytest.mark.parametrize("cut", [0, 4, 8, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 10, -1])
def test_truncated_blob_is_refused(cut: int) -> None:
    blob = sample_state().to_bytes()
    with pytest.raises(StateError, match=r"truncated|magic"):
        DeviceState.from_bytes(blob[:cut])


def test_truncation_names_the_missing_bytes() -> None:
    blob = sample_state().to_bytes()
    with pytest.raises(StateError, match=rf"says {len(blob) - HEADER_SIZE} body bytes, {len(blob) - HEADER_SIZE - 5}"):
        DeviceState.from_bytes(blob[:-5])


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(StateError, match="after the end"):
        DeviceState.from_bytes(sample_state().to_bytes() + b"\0")


def test_bad_magic() -> None:
    with pytest.raises(StateError, match="not a vduproxy device-state blob"):
        DeviceState.from_bytes(b"QEVMSTAT" + sample_state().to_bytes()[8:])


def test_newer_version_is_refused_even_with_a_valid_crc() -> None:
    blob = bytearray(sample_state().to_bytes())
    blob[8:10] = (FORMAT_VERSION + 1).to_bytes(2, "little")
    with pytest.raises(StateError, match=rf"version {FORMAT_VERSION + 1} is newer.*upgrade"):
        DeviceState.from_bytes(_recrc(bytes(blob)))


def test_crc_mismatch_is_called_corrupt() -> None:
    blob = bytearray(sample_state().to_bytes())
    blob[-1] ^= 0x40
    with pytest.raises(StateError, match=r"CRC mismatch.*corrupt"):
        DeviceState.from_bytes(bytes(blob))


def test_huge_length_is_refused_without_allocating() -> None:
    blob = bytearray(sample_state().to_bytes())
    blob[12:16] = (0xFFFFFFFF).to_bytes(4, "little")
    with pytest.raises(StateError, match="exceeds"):
        DeviceState.from_bytes(bytes(blob))


def test_well_formed_crc_but_bad_content_is_refused() -> None:
    """A writer bug (valid CRC over a nonsense value) is still caught by validation."""
    blob = bytearray(sample_state().to_bytes())
    # pairs (u16 at body offset 16) > max_pairs
    blob[HEADER_SIZE + 16 : HEADER_SIZE + 18] = (9).to_bytes(2, "little")
    with pytest.raises(StateError, match="9 queue pairs in use, but max_pairs is 4"):
        DeviceState.from_bytes(_recrc(bytes(blob)))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"pairs": 5}, "queue pairs in use"),
        ({"vrings": (VringState(9, 256, 0, 0, True),)}, "vring 9 outside"),
        ({"vrings": (VringState(0, 256, 0, 0, True), VringState(0, 256, 0, 0, True))}, "appears twice"),
        ({"vrings": (VringState(0, 100, 0, 0, True),)}, "size 100"),
        ({"vrings": (VringState(0, 256, 0x10000, 0, True),)}, "16-bit"),
        ({"uc_macs": (b"\x02" * 6,) * (MAC_TABLE_CAP + 1)}, "overflow flag"),
        ({"mac": b"\x02" * 5}, "mac must be 6 bytes"),
        ({"vlans": frozenset({4096})}, "VLAN ids outside"),
        ({"learned_mac": None}, "learned_mac and learned_from"),
        ({"mtu": 20}, "MTU 20"),
        ({"guest_features": 1 << 64}, "64-bit"),
        ({"rx_mode": RxMode(0x40)}, "unknown RX mode"),
    ],
)
def test_invalid_state_cannot_be_written(changes: dict[str, object], message: str) -> None:
    with pytest.raises(StateError, match=message):
        sample_state(**changes).to_bytes()


def test_packed_rings_may_have_any_size() -> None:
    state = sample_state(
        guest_features=int(NetF.VERSION_1 | NetF.RING_PACKED), vrings=(VringState(0, 100, 0x8005, 5, True),)
    )
    assert DeviceState.from_bytes(state.to_bytes()).vrings[0].num == 100


def test_source_name_that_is_not_utf8_is_refused() -> None:
    state = sample_state(source=DeviceSummary("ab", 0, 0, 256, 1))
    blob = bytearray(state.to_bytes())
    pos = blob.index(b"\x02ab")  # PascalString: length byte, then the name
    blob[pos + 1 : pos + 3] = b"\xff\xfe"
    with pytest.raises(StateError, match="malformed version 1 state body"):
        DeviceState.from_bytes(_recrc(bytes(blob)))
