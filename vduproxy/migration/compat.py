"""Cross-device compatibility: what would break when a guest moves from one device (or a saved state) to another.

The source is either a state blob (what a guest actually negotiated and programmed) or a device profile (what
a guest *could* have negotiated on it); the destination is a `DeviceSummary` from any `VdpaDevice` or
profile. Differences the shadow virtqueue absorbs are reported as `bridged`: the guest keeps working, but
the destination must keep the SVQ on for that guest. Everything else is an `error`.

`vduproxy compat` prints `format_problems()` and exits with `exit_code()`.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from typing import TYPE_CHECKING

from ..vdpa.device import VdpaDevice
from ..virtio import NetF
from .restore import GUEST_OFFLOAD_MASK, CvqCaps, check_restore
from .state import HEADER_SIZE, MAGIC, MAX_BODY, DeviceState, DeviceSummary, StateError

if TYPE_CHECKING:
    from ..vdpa.sim import Profile

__all__ = [
    "DeviceSummary",
    "Problem",
    "Severity",
    "check_compat",
    "device_summary",
    "exit_code",
    "format_problems",
    "load_destination",
    "load_source",
    "profile_summary",
]

# config space offsets (virtio 1.3 §5.1.4)
_CFG_MAC = 0
_CFG_MAX_PAIRS = 8
_CFG_MTU = 10
# what a device without VIRTIO_NET_F_MTU is assumed to carry: plain Ethernet
DEFAULT_MTU = 1500
# control features the proxy negotiates with the device for itself (it owns the device's CVQ), whatever the
# guest negotiated with QEMU
_PROXY_CONTROL = (
    NetF.CTRL_VQ | NetF.CTRL_RX | NetF.CTRL_RX_EXTRA | NetF.CTRL_VLAN | NetF.CTRL_MAC_ADDR | NetF.MQ
    | NetF.CTRL_GUEST_OFFLOADS | NetF.GUEST_ANNOUNCE
)  # fmt: skip


class Severity(enum.StrEnum):
    ERROR = "error"
    BRIDGED = "bridged"


@dataclasses.dataclass(frozen=True)
class Problem:
    what: str
    why: str
    severity: Severity

    def __str__(self) -> str:
        return f"{self.severity.value}: {self.what}: {self.why}"


_SVQ = "the destination must keep the shadow virtqueue on for this guest"
_BRIDGED_WHY: dict[int, str] = {
    NetF.RING_INDIRECT_DESC: f"the shadow virtqueue flattens the guest's indirect tables; {_SVQ}",
    NetF.MRG_RXBUF: f"the shadow virtqueue writes num_buffers into the guest's RX header; {_SVQ}",
    NetF.RING_EVENT_IDX: f"the shadow virtqueue handles notification suppression per side; {_SVQ}",
}
# device-to-guest offloads: the device may use them, never must, so a device without them is still correct
for _f in (NetF.GUEST_CSUM, NetF.GUEST_TSO4, NetF.GUEST_TSO6, NetF.GUEST_ECN, NetF.GUEST_UFO):
    _BRIDGED_WHY[_f] = "the device delivers complete frames, which a guest allowing this offload also accepts"
_ERROR_WHY: dict[int, str] = {
    NetF.MQ: "the guest may spread traffic over several queue pairs",
    NetF.RING_PACKED: "the guest's rings are packed; the destination only drives split rings",
}
for _f in (NetF.CSUM, NetF.HOST_TSO4, NetF.HOST_TSO6, NetF.HOST_ECN, NetF.HOST_UFO):
    _ERROR_WHY[_f] = "the guest may send frames that need this offload, which the destination cannot complete"
for _f in (
    NetF.CTRL_VQ, NetF.CTRL_RX, NetF.CTRL_RX_EXTRA, NetF.CTRL_VLAN, NetF.CTRL_MAC_ADDR, NetF.CTRL_GUEST_OFFLOADS
):  # fmt: skip
    _ERROR_WHY[_f] = "net state programmed through the control queue with it could not be restored"


def _bit_name(bit: int) -> str:
    try:
        return NetF(bit).name or f"bit{bit.bit_length() - 1}"
    except ValueError:
        return f"bit{bit.bit_length() - 1}"


# ---------------------------------------------------------------------- summaries


def device_summary(dev: VdpaDevice) -> DeviceSummary:
    """What `dev` offers (features, backend features, ring max, queue pairs, MTU, MAC) from its config."""
    feats = dev.get_features()
    pairs = int.from_bytes(dev.get_config(_CFG_MAX_PAIRS, 2), "little") if feats & NetF.MQ else 1
    mtu = int.from_bytes(dev.get_config(_CFG_MTU, 2), "little") if feats & NetF.MTU else None
    mac = dev.get_config(_CFG_MAC, 6) if feats & NetF.MAC else None
    return DeviceSummary(
        name=dev.name,
        features=feats,
        backend_features=dev.get_backend_features(),
        ring_max=dev.get_vring_num_max(),
        max_pairs=max(pairs, 1),
        mtu=mtu,
        mac=mac,
    )


def profile_summary(profile: Profile) -> DeviceSummary:
    return DeviceSummary(
        name=f"profile:{profile.name}",
        features=profile.features,
        backend_features=profile.backend_features,
        ring_max=profile.ring_max,
        max_pairs=profile.queue_pairs,
        mtu=profile.mtu if profile.features & NetF.MTU else None,
        mac=profile.mac if profile.features & NetF.MAC else None,
    )


def load_source(spec: str) -> DeviceState | DeviceSummary:
    """A state blob file (recognised by its magic) or a sim profile name/path."""
    if os.path.isfile(spec):
        with open(spec, "rb") as f:
            head = f.read(len(MAGIC))
            if head == MAGIC:
                f.seek(0)
                data = f.read(HEADER_SIZE + MAX_BODY + 1)
                return DeviceState.from_bytes(data)
        if not spec.endswith(".toml"):
            raise StateError(f"{spec!r} is neither a vduproxy state blob nor a .toml profile")
    from ..vdpa.sim import load_profile

    return profile_summary(load_profile(spec))


def load_destination(spec: str) -> DeviceSummary:
    """A device spec (`sim:...`, /dev/vhost-vdpa-N: opened, summarised, closed) or a profile name/path."""
    if spec == "sim" or spec.startswith(("sim:", "/dev/", "vhost-vdpa-")):
        from ..vdpa.factory import open_device

        dev = open_device(spec)
        try:
            return device_summary(dev)
        finally:
            dev.close()
    from ..vdpa.sim import load_profile

    return profile_summary(load_profile(spec))


# ---------------------------------------------------------------------- the check


def check_compat(source: DeviceState | DeviceSummary | Profile, dest: DeviceSummary) -> list[Problem]:
    """Everything that would break (error) or only work through the SVQ (bridged) moving `source` to `dest`."""
    if isinstance(source, DeviceState):
        return _check_state(source, dest)
    if not isinstance(source, DeviceSummary):
        source = profile_summary(source)
    return _check_summary(source, dest)


def _feature_problems(features: int, dest: DeviceSummary, verb: str) -> list[Problem]:
    out = []
    missing = features & ~dest.features
    for bit in (1 << i for i in range(64)):
        if not missing & bit:
            continue
        name = _bit_name(bit)
        if bit in _BRIDGED_WHY:
            out.append(Problem(f"feature {name}", f"{verb}; {_BRIDGED_WHY[bit]}", Severity.BRIDGED))
        else:
            why = _ERROR_WHY.get(bit)
            text = f"{verb}, the destination lacks it" + (f": {why}" if why else "")
            out.append(Problem(f"feature {name}", text, Severity.ERROR))
    return out


def _ring_problem(num: int, dest: DeviceSummary, verb: str) -> list[Problem]:
    if num <= dest.ring_max:
        return []
    why = f"{verb}; the destination's shadow rings are clamped to {dest.ring_max}: {_SVQ}"
    return [Problem(f"ring size {num}", why, Severity.BRIDGED)]


def _mtu_problem(mtu: int | None, dest: DeviceSummary) -> list[Problem]:
    dest_mtu = dest.mtu if dest.mtu is not None else DEFAULT_MTU
    if mtu is None or mtu <= dest_mtu:
        return []
    shown = f"{dest_mtu}" if dest.mtu is not None else f"{DEFAULT_MTU} (no MTU feature)"
    why = f"the destination carries frames up to MTU {shown}: larger frames would be dropped"
    return [Problem(f"MTU {mtu}", why, Severity.ERROR)]


def _pairs_problem(pairs: int, dest: DeviceSummary, why: str) -> list[Problem]:
    if pairs <= dest.max_pairs:
        return []
    return [Problem(f"{pairs} queue pairs", f"{why}; the destination has {dest.max_pairs}", Severity.ERROR)]


def _check_summary(src: DeviceSummary, dest: DeviceSummary) -> list[Problem]:
    verb = f"{src.name} offers it to the guest"
    return [
        *_feature_problems(src.features, dest, verb),
        *_ring_problem(src.ring_max, dest, f"{src.name} allows rings up to {src.ring_max}"),
        *_pairs_problem(src.max_pairs, dest, f"{src.name} gives the guest {src.max_pairs}"),
        *_mtu_problem(src.mtu, dest),
    ]


def _check_state(state: DeviceState, dest: DeviceSummary) -> list[Problem]:
    guest = state.device_features
    problems = _feature_problems(guest, dest, "the guest negotiated it")
    if state.vrings:
        largest = max(v.num for v in state.vrings)
        problems += _ring_problem(largest, dest, f"the guest uses rings of {largest}")
    problems += _pairs_problem(state.pairs, dest, "the guest uses them")
    if state.max_pairs > state.pairs:
        problems += _pairs_problem(state.max_pairs, dest, "the front-end was given them")
    problems += _mtu_problem(state.mtu, dest)
    # the net state must also be reproducible through the destination's control queue
    would_negotiate = dest.features & (_PROXY_CONTROL | (guest & GUEST_OFFLOAD_MASK))
    caps = CvqCaps(max_pairs=dest.max_pairs, mac=dest.mac)
    _, unhonoured = check_restore(state, would_negotiate, caps)
    seen = {p.what for p in problems}
    problems += [Problem(u.what, u.why, Severity.ERROR) for u in unhonoured if u.what not in seen]
    return problems


# ---------------------------------------------------------------------- output


def format_problems(problems: list[Problem]) -> list[str]:
    """One line per problem, errors first; a single 'compatible' line when there is none."""
    if not problems:
        return ["compatible: nothing would break"]
    ordered = sorted(problems, key=lambda p: p.severity != Severity.ERROR)
    return [f"{p.severity.value:<7} {p.what}: {p.why}" for p in ordered]


def exit_code(problems: list[Problem]) -> int:
    """1 when anything would break, 0 when everything works (bridged differences included)."""
    return 1 if any(p.severity == Severity.ERROR for p in problems) else 0
