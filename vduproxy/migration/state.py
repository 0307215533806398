"""The device-state blob a migration destination needs: versioned, length-prefixed and CRC-checked.

The proxy is the only party that knows the device side of a guest's NIC (QEMU emulates the guest's control
queue for vhost-user, and the vDPA device has no state save of its own), so it carries that state across a
migration itself: through vhost-user SET_DEVICE_STATE_FD where the front-end has it, and out of band (file,
control socket) for QEMU 7.2. The bytes may sit in a file for days and be read by another vduproxy version,
hence a fixed header that is checked before anything else:

    magic "VDUPSTAT" | u16 version | u16 flags (0) | u32 body length | u32 CRC32 | body

All integers little-endian. The CRC covers the first 16 header bytes and the body, so a corrupt version or
length is caught as surely as a corrupt body. A reader refuses any version it does not know: a newer layout
may carry state the destination would silently drop.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import zlib
from collections.abc import Iterable
from typing import Any

import construct as cs

from ..virtio import MAX_RING_SIZE, VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, NetF, describe_features, is_pow2

MAGIC = b"VDUPSTAT"
FORMAT_VERSION = 1
HEADER_SIZE = 20
# Like QEMU's MAC_TABLE_ENTRIES: more entries than a device keeps is "overflow", which means "accept all" and
# is carried as a flag rather than as a list nobody can program
MAC_TABLE_CAP = 64
VLAN_COUNT = 4096
MAX_PAIRS = 0x8000  # virtio-net max_virtqueue_pairs upper bound
MAX_BODY = 1 << 20  # a v1 body is a few KiB even with every vring; this bounds what a reader allocates
NAME_MAX = 255


class StateError(ValueError):
    """A state blob (or a DeviceState about to become one) that cannot be used; the message says why."""


class RxMode(enum.IntFlag):
    """RX filter modes; bit n is VIRTIO_NET_CTRL_RX command n, so `1 << RxCmd.X` names the same mode."""

    PROMISC = 1 << 0
    ALLMULTI = 1 << 1
    ALLUNI = 1 << 2
    NOMULTI = 1 << 3
    NOUNI = 1 << 4
    NOBCAST = 1 << 5


RX_MODE_ALL = RxMode(0x3F)
# What a virtio-net device does after reset: promiscuous "for compatibility", everything else off (QEMU's
# virtio_net_reset). Restores only send commands for modes that differ from this.
RX_MODE_DEFAULT = RxMode.PROMISC


class MacSource(enum.IntEnum):
    """Where the proxy learned the guest's MAC (DESIGN §3: QEMU never forwards the guest's CVQ)."""

    NONE = 0
    CONFIG = 1  # the device's own config-space MAC
    CLI = 2  # --mac
    RARP = 3  # SEND_RARP from the front-end
    TX = 4  # source address of the guest's own frames (SVQ mode)
    STATE = 5  # an earlier migration's state blob


@dataclasses.dataclass(frozen=True)
class DeviceSummary:
    """What a device offers, as far as moving a guest onto it is concerned."""

    name: str
    features: int
    backend_features: int
    ring_max: int
    max_pairs: int
    mtu: int | None = None  # None: the device does not offer VIRTIO_NET_F_MTU
    mac: bytes | None = None  # config-space MAC; None when the device does not offer VIRTIO_NET_F_MAC

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "features": hex(self.features),
            "features_names": describe_features(self.features),
            "backend_features": hex(self.backend_features),
            "ring_max": self.ring_max,
            "max_pairs": self.max_pairs,
            "mtu": self.mtu,
            "mac": _mac(self.mac) if self.mac is not None else None,
        }


@dataclasses.dataclass(frozen=True)
class VringState:
    """One vring as the destination must start it. `base` is the next avail index the device will read
    (vhost GET_VRING_BASE); `used_idx` is the used index already published to the guest."""

    index: int
    num: int
    base: int
    used_idx: int
    enabled: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceState:
    """Everything a destination proxy needs to continue a guest's NIC where the source stopped."""

    guest_features: int  # as negotiated with the front-end (SET_FEATURES)
    protocol_features: int = 0
    pairs: int = 1  # queue pairs in use
    max_pairs: int = 1  # queue pairs the front-end was given (GET_QUEUE_NUM)
    vrings: tuple[VringState, ...] = ()
    mtu: int | None = None  # NET_SET_MTU from the front-end, None when it never sent one
    mac: bytes  # the MAC the device filter uses (programmed, or the config MAC when never programmed)
    config_mac: bytes  # the source device's own config-space MAC
    learned_mac: bytes | None = None
    learned_from: MacSource = MacSource.NONE
    rx_mode: RxMode = RX_MODE_DEFAULT
    uc_macs: tuple[bytes, ...] = ()
    mc_macs: tuple[bytes, ...] = ()
    uc_overflow: bool = False
    mc_overflow: bool = False
    vlans: frozenset[int] = frozenset()
    guest_offloads: int = 0
    source: DeviceSummary

    def __post_init__(self) -> None:
        # normalise the containers so that equality after a round trip does not depend on what the caller
        # passed (a list of vlans, a tuple of vrings in any order)
        object.__setattr__(self, "vrings", tuple(sorted(self.vrings, key=lambda v: v.index)))
        object.__setattr__(self, "vlans", frozenset(self.vlans))
        object.__setattr__(self, "uc_macs", tuple(bytes(m) for m in self.uc_macs))
        object.__setattr__(self, "mc_macs", tuple(bytes(m) for m in self.mc_macs))
        object.__setattr__(self, "rx_mode", RxMode(self.rx_mode))
        try:
            object.__setattr__(self, "learned_from", MacSource(self.learned_from))
        except ValueError:
            raise StateError(f"unknown learned-MAC source {self.learned_from!r}") from None

    # ------------------------------------------------------------------ checks

    def validate(self) -> None:
        """Raise StateError for anything a destination could not act on; `to_bytes` and `from_bytes` call it."""
        _u64("guest_features", self.guest_features)
        _u64("protocol_features", self.protocol_features)
        _u64("guest_offloads", self.guest_offloads)
        if int(self.rx_mode) & ~int(RX_MODE_ALL):
            raise StateError(f"unknown RX mode bits {int(self.rx_mode):#x}")
        if not 1 <= self.max_pairs <= MAX_PAIRS:
            raise StateError(f"max_pairs {self.max_pairs} outside 1..{MAX_PAIRS}")
        if not 1 <= self.pairs <= self.max_pairs:
            raise StateError(f"{self.pairs} queue pairs in use, but max_pairs is {self.max_pairs}")
        if self.mtu is not None and not 68 <= self.mtu <= 0xFFFF:
            raise StateError(f"MTU {self.mtu} outside 68..65535")
        for name in ("mac", "config_mac"):
            _mac_bytes(name, getattr(self, name))
        if (self.learned_mac is None) != (self.learned_from == MacSource.NONE):
            raise StateError("learned_mac and learned_from must be both set or both empty")
        if self.learned_mac is not None:
            _mac_bytes("learned_mac", self.learned_mac)
        for name, macs in (("uc_macs", self.uc_macs), ("mc_macs", self.mc_macs)):
            if len(macs) > MAC_TABLE_CAP:
                raise StateError(f"{name} has {len(macs)} entries, the cap is {MAC_TABLE_CAP} (use the overflow flag)")
            for m in macs:
                _mac_bytes(name, m)
        bad_vlans = sorted(v for v in self.vlans if not 0 <= v < VLAN_COUNT)
        if bad_vlans:
            raise StateError(f"VLAN ids outside 0..{VLAN_COUNT - 1}: {bad_vlans[:8]}")
        max_index = 2 * self.max_pairs  # data vqs 0..2*max_pairs-1, then the CVQ
        packed = bool(self.guest_features & NetF.RING_PACKED)
        seen: set[int] = set()
        for v in self.vrings:
            if not 0 <= v.index <= max_index:
                raise StateError(f"vring {v.index} outside 0..{max_index} for {self.max_pairs} queue pair(s)")
            if v.index in seen:
                raise StateError(f"vring {v.index} appears twice")
            seen.add(v.index)
            # packed rings may have any size; split rings must be a power of two
            if not 1 <= v.num <= MAX_RING_SIZE or (not packed and not is_pow2(v.num)):
                raise StateError(f"vring {v.index}: size {v.num} is not a valid ring size")
            if not (0 <= v.base <= 0xFFFF and 0 <= v.used_idx <= 0xFFFF):
                raise StateError(f"vring {v.index}: base {v.base} / used {v.used_idx} are not 16-bit indices")
        src = self.source
        _u64("source.features", src.features)
        _u64("source.backend_features", src.backend_features)
        if len(src.name.encode()) > NAME_MAX:
            raise StateError(f"source name longer than {NAME_MAX} bytes")
        if not 1 <= src.ring_max <= MAX_RING_SIZE:
            raise StateError(f"source ring_max {src.ring_max} outside 1..{MAX_RING_SIZE}")
        if not 1 <= src.max_pairs <= MAX_PAIRS:
            raise StateError(f"source max_pairs {src.max_pairs} outside 1..{MAX_PAIRS}")
        if src.mtu is not None and not 68 <= src.mtu <= 0xFFFF:
            raise StateError(f"source MTU {src.mtu} outside 68..65535")
        if src.mac is not None:
            _mac_bytes("source.mac", src.mac)

    @property
    def device_features(self) -> int:
        """The guest's features without the vhost-user transport bits (LOG_ALL, PROTOCOL_FEATURES)."""
        return self.guest_features & ~(VHOST_F_LOG_ALL | VHOST_USER_F_PROTOCOL_FEATURES)

    # ------------------------------------------------------------------ bytes

    def to_bytes(self) -> bytes:
        self.validate()
        body = bytes(
            _BODY_V1.build(
                {
                    "guest_features": self.guest_features,
                    "protocol_features": self.protocol_features,
                    "pairs": self.pairs,
                    "max_pairs": self.max_pairs,
                    "mtu": self.mtu or 0,
                    "mac": self.mac,
                    "config_mac": self.config_mac,
                    "learned_mac": self.learned_mac or bytes(6),
                    "learned_from": int(self.learned_from),
                    "rx_mode": int(self.rx_mode),
                    "table_flags": (_UC_OVERFLOW if self.uc_overflow else 0)
                    | (_MC_OVERFLOW if self.mc_overflow else 0),
                    "uc_macs": list(self.uc_macs),
                    "mc_macs": list(self.mc_macs),
                    "vlans": vlan_bitmap(self.vlans),
                    "guest_offloads": self.guest_offloads,
                    "vrings": [
                        {
                            "index": v.index,
                            "num": v.num,
                            "base": v.base,
                            "used_idx": v.used_idx,
                            "flags": _VRING_ENABLED if v.enabled else 0,
                        }
                        for v in self.vrings
                    ],
                    "source": {
                        "name": self.source.name,
                        "features": self.source.features,
                        "backend_features": self.source.backend_features,
                        "ring_max": self.source.ring_max,
                        "max_pairs": self.source.max_pairs,
                        "mtu": self.source.mtu or 0,
                        "mac": self.source.mac or bytes(6),
                        "has_mac": self.source.mac is not None,
                    },
                }
            )
        )
        head = MAGIC + FORMAT_VERSION.to_bytes(2, "little") + bytes(2) + len(body).to_bytes(4, "little")
        return head + zlib.crc32(head + body).to_bytes(4, "little") + body

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> DeviceState:
        data = bytes(data)
        if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
            raise StateError(f"not a vduproxy device-state blob (magic {data[: len(MAGIC)]!r}, want {MAGIC!r})")
        if len(data) < HEADER_SIZE:
            raise StateError(f"state blob truncated: {len(data)} bytes, the header alone is {HEADER_SIZE}")
        hdr = _HEADER.parse(data)
        if hdr.version > FORMAT_VERSION:
            raise StateError(
                f"state format version {hdr.version} is newer than this vduproxy understands "
                f"(up to {FORMAT_VERSION}): upgrade the destination"
            )
        if hdr.version == 0:
            raise StateError("state format version 0 is not a valid version")
        if hdr.length > MAX_BODY:
            raise StateError(f"state body length {hdr.length} exceeds the {MAX_BODY}-byte limit")
        have = len(data) - HEADER_SIZE
        if have < hdr.length:
            raise StateError(f"state blob truncated: header says {hdr.length} body bytes, {have} present")
        if have > hdr.length:
            raise StateError(f"{have - hdr.length} bytes after the end of the state blob")
        body = data[HEADER_SIZE:]
        crc = zlib.crc32(data[:16] + body)
        if crc != hdr.crc32:
            raise StateError(f"state blob CRC mismatch (stored {hdr.crc32:#010x}, computed {crc:#010x}): corrupt")
        if hdr.flags != 0:
            raise StateError(f"state header flags {hdr.flags:#x} are not defined in version {hdr.version}")
        try:
            b = _BODY_V1.parse(body)
        except (cs.ConstructError, UnicodeDecodeError) as exc:
            # the CRC matched, so the writer built a malformed body: say so rather than "corrupt"
            raise StateError(f"malformed version {hdr.version} state body: {_first_line(exc)}") from None
        if b.rx_mode & ~int(RX_MODE_ALL):
            raise StateError(f"unknown RX mode bits {b.rx_mode:#x}")
        if b.table_flags & ~(_UC_OVERFLOW | _MC_OVERFLOW):
            raise StateError(f"unknown MAC table flags {b.table_flags:#x}")
        try:
            learned_from = MacSource(b.learned_from)
        except ValueError:
            raise StateError(f"unknown learned-MAC source {b.learned_from}") from None
        if any(v.flags & ~_VRING_ENABLED for v in b.vrings):
            raise StateError("unknown vring flags")
        state = cls(
            guest_features=b.guest_features,
            protocol_features=b.protocol_features,
            pairs=b.pairs,
            max_pairs=b.max_pairs,
            vrings=tuple(
                VringState(v.index, v.num, v.base, v.used_idx, bool(v.flags & _VRING_ENABLED)) for v in b.vrings
            ),
            mtu=b.mtu or None,
            mac=b.mac,
            config_mac=b.config_mac,
            learned_mac=b.learned_mac if learned_from != MacSource.NONE else None,
            learned_from=learned_from,
            rx_mode=RxMode(b.rx_mode),
            uc_macs=tuple(b.uc_macs),
            mc_macs=tuple(b.mc_macs),
            uc_overflow=bool(b.table_flags & _UC_OVERFLOW),
            mc_overflow=bool(b.table_flags & _MC_OVERFLOW),
            vlans=vlans_from_bitmap(b.vlans),
            guest_offloads=b.guest_offloads,
            source=DeviceSummary(
                name=b.source.name,
                features=b.source.features,
                backend_features=b.source.backend_features,
                ring_max=b.source.ring_max,
                max_pairs=b.source.max_pairs,
                mtu=b.source.mtu or None,
                mac=b.source.mac if b.source.has_mac else None,
            ),
        )
        state.validate()
        return state

    # ------------------------------------------------------------------ humans

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "guest_features": hex(self.guest_features),
            "guest_features_names": describe_features(self.guest_features),
            "protocol_features": hex(self.protocol_features),
            "pairs": self.pairs,
            "max_pairs": self.max_pairs,
            "mtu": self.mtu,
            "mac": _mac(self.mac),
            "config_mac": _mac(self.config_mac),
            "learned_mac": _mac(self.learned_mac) if self.learned_mac is not None else None,
            "learned_from": self.learned_from.name.lower(),
            "rx_mode": {m.name.lower(): bool(self.rx_mode & m) for m in RxMode if m.name},
            "mac_table": {
                "unicast": [_mac(m) for m in self.uc_macs],
                "multicast": [_mac(m) for m in self.mc_macs],
                "unicast_overflow": self.uc_overflow,
                "multicast_overflow": self.mc_overflow,
            },
            "vlans": sorted(self.vlans),
            "guest_offloads": hex(self.guest_offloads),
            "vrings": [dataclasses.asdict(v) for v in self.vrings],
            "source": self.source.to_dict(),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


# ---------------------------------------------------------------------- helpers


def vlan_bitmap(vlans: Iterable[int]) -> bytes:
    """4096-bit bitmap, bit `vid` = byte vid>>3, bit vid&7 (LSB first)."""
    out = bytearray(VLAN_COUNT // 8)
    for vid in vlans:
        if not 0 <= vid < VLAN_COUNT:
            raise StateError(f"VLAN id {vid} outside 0..{VLAN_COUNT - 1}")
        out[vid >> 3] |= 1 << (vid & 7)
    return bytes(out)


def vlans_from_bitmap(bitmap: bytes) -> frozenset[int]:
    return frozenset(i for i in range(len(bitmap) * 8) if bitmap[i >> 3] & (1 << (i & 7)))


def _mac(mac: bytes) -> str:
    return mac.hex(":")


def _mac_bytes(name: str, value: object) -> None:
    if not isinstance(value, bytes) or len(value) != 6:
        raise StateError(f"{name} must be 6 bytes, got {value!r}")


def _u64(name: str, value: int) -> None:
    if not 0 <= value < 1 << 64:
        raise StateError(f"{name} {value:#x} is not a 64-bit value")


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


_UC_OVERFLOW = 1
_MC_OVERFLOW = 2
_VRING_ENABLED = 1

_HEADER = cs.Struct(
    "magic" / cs.Bytes(8),
    "version" / cs.Int16ul,
    "flags" / cs.Int16ul,
    "length" / cs.Int32ul,
    "crc32" / cs.Int32ul,
)
assert _HEADER.sizeof() == HEADER_SIZE

_MacList = cs.PrefixedArray(cs.Int8ul, cs.Bytes(6))
_Vring = cs.Struct(
    "index" / cs.Int16ul,
    "num" / cs.Int16ul,
    "base" / cs.Int16ul,
    "used_idx" / cs.Int16ul,
    "flags" / cs.Int8ul,
)
_Summary = cs.Struct(
    "name" / cs.PascalString(cs.Int8ul, "utf8"),
    "features" / cs.Int64ul,
    "backend_features" / cs.Int64ul,
    "ring_max" / cs.Int32ul,
    "max_pairs" / cs.Int16ul,
    "mtu" / cs.Int16ul,  # 0: no MTU feature
    "mac" / cs.Bytes(6),
    "has_mac" / cs.Flag,
)
_BODY_V1 = cs.Struct(
    "guest_features" / cs.Int64ul,
    "protocol_features" / cs.Int64ul,
    "pairs" / cs.Int16ul,
    "max_pairs" / cs.Int16ul,
    "mtu" / cs.Int16ul,  # 0: never set
    "mac" / cs.Bytes(6),
    "config_mac" / cs.Bytes(6),
    "learned_mac" / cs.Bytes(6),
    "learned_from" / cs.Int8ul,
    "rx_mode" / cs.Int8ul,
    "table_flags" / cs.Int8ul,
    "uc_macs" / _MacList,
    "mc_macs" / _MacList,
    "vlans" / cs.Bytes(VLAN_COUNT // 8),
    "guest_offloads" / cs.Int64ul,
    "vrings" / cs.PrefixedArray(cs.Int32ul, _Vring),
    "source" / _Summary,
    cs.Terminated,
)
