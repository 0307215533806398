"""Bring a destination device to a saved net state through its control queue.

QEMU emulates the guest's control queue for vhost-user net, so the guest will not replay its MAC, RX mode,
filters or offloads after a migration: the destination proxy does it, from the state blob, as CVQ commands
after DRIVER_OK. `plan_restore` turns a state into the ordered commands (pure, so it can be checked before
the device is touched and reused by `vduproxy compat`); `apply_restore` sends them and stops at the first
refusal.

A reset device starts from known defaults (virtio 1.3 §5.1.6.5; QEMU's virtio_net_reset and its vhost-vdpa
CVQ restore rely on the same): one queue pair, promiscuous on and every other RX mode off, empty MAC tables,
no VLAN admitted, every negotiated guest offload on, the config-space MAC. Commands are only planned for
what differs, so a device with a small CVQ (vdpa_sim_net: MAC_ADDR_SET only) can still take a plain guest.
"""

from __future__ import annotations

import dataclasses

from ..log import get_logger
from ..vdpa.cvq import (
    CtrlClass,
    CtrlCommand,
    CvqClient,
    CvqCommandError,
    CvqError,
    CvqFormatError,
    GuestOffloadsCmd,
    MacCmd,
    MqCmd,
    RxCmd,
    VlanCmd,
    mac_str,
    make_command,
)
from ..vdpa.device import DeviceError, VdpaDevice
from ..virtio import NetF
from .state import MAC_TABLE_CAP, RX_MODE_DEFAULT, DeviceState, RxMode

log = get_logger(__name__)

# VIRTIO_NET_F_GUEST_{CSUM,TSO4,TSO6,ECN,UFO,USO4,USO6}: the bits GUEST_OFFLOADS_SET may carry
GUEST_OFFLOAD_MASK = int(
    NetF.GUEST_CSUM | NetF.GUEST_TSO4 | NetF.GUEST_TSO6 | NetF.GUEST_ECN | NetF.GUEST_UFO | (1 << 54) | (1 << 55)
)
# config space offsets (virtio 1.3 §5.1.4)
_CFG_MAC = 0
_CFG_MAX_PAIRS = 8
# a MAC_TABLE_SET with this many entries per list still fits the CVQ client's command buffer (cvq.OUT_MAX)
_TABLE_MAX_LIMIT = 512
_RX_FEATURE = {
    RxCmd.PROMISC: NetF.CTRL_RX,
    RxCmd.ALLMULTI: NetF.CTRL_RX,
    RxCmd.ALLUNI: NetF.CTRL_RX_EXTRA,
    RxCmd.NOMULTI: NetF.CTRL_RX_EXTRA,
    RxCmd.NOUNI: NetF.CTRL_RX_EXTRA,
    RxCmd.NOBCAST: NetF.CTRL_RX_EXTRA,
}


@dataclasses.dataclass(frozen=True)
class CvqCaps:
    """What the destination's control queue starts from and can hold, beyond its negotiated features."""

    max_pairs: int = 1
    mac: bytes | None = None  # its MAC now (config space); None: unknown, so MAC_ADDR_SET is always sent
    rx_defaults: RxMode = RX_MODE_DEFAULT
    # entries the device keeps per MAC table; an overflowed table is re-created by sending one more than this
    mac_table_max: int = MAC_TABLE_CAP

    def __post_init__(self) -> None:
        if not 1 <= self.mac_table_max <= _TABLE_MAX_LIMIT:
            raise ValueError(f"mac_table_max {self.mac_table_max} outside 1..{_TABLE_MAX_LIMIT}")
        if self.max_pairs < 1:
            raise ValueError(f"max_pairs {self.max_pairs} < 1")


def cvq_caps(dev: VdpaDevice, features: int | None = None) -> CvqCaps:
    """CvqCaps of a device from its config space. `features` are the negotiated ones (default: offered);
    config fields are only meaningful when their feature is there."""
    feats = dev.get_features() if features is None else features
    mac = dev.get_config(_CFG_MAC, 6) if feats & NetF.MAC else None
    pairs = int.from_bytes(dev.get_config(_CFG_MAX_PAIRS, 2), "little") if feats & NetF.MQ else 1
    return CvqCaps(max_pairs=max(pairs, 1), mac=mac)


@dataclasses.dataclass(frozen=True)
class CvqStep:
    """One restore command and why it is needed."""

    command: CtrlCommand
    why: str

    def describe(self) -> str:
        return self.command.describe()


@dataclasses.dataclass(frozen=True)
class Unhonoured:
    """A part of the saved state the destination cannot reproduce."""

    what: str
    why: str

    def __str__(self) -> str:
        return f"{self.what}: {self.why}"


class RestoreError(Exception):
    """The destination cannot be brought to the saved state. `problems` lists every part it cannot honour
    (planning); `step` is the command the device refused (applying)."""

    def __init__(self, message: str, *, problems: tuple[Unhonoured, ...] = (), step: CvqStep | None = None) -> None:
        super().__init__(message)
        self.problems = problems
        self.step = step


class _Planner:
    def __init__(self, features: int, caps: CvqCaps) -> None:
        self.features = features
        self.caps = caps
        self.steps: list[CvqStep] = []
        self.problems: list[Unhonoured] = []

    def lacks(self, feature: int) -> str | None:
        """Why a command gated by `feature` cannot be sent, or None when it can."""
        if not self.features & NetF.CTRL_VQ:
            return "the destination has no control queue (CTRL_VQ not negotiated)"
        if not self.features & feature:
            return f"the destination did not negotiate {NetF(feature).name}"
        return None

    def add(self, feature: int, what: str, cls: int, cmd: int, args: dict[str, object], why: str) -> None:
        reason = self.lacks(feature)
        if reason is not None:
            self.problems.append(Unhonoured(what, reason))
            return
        try:
            self.steps.append(CvqStep(make_command(cls, cmd, args), why))
        except CvqFormatError as exc:
            self.problems.append(Unhonoured(what, str(exc)))


def check_restore(
    state: DeviceState, device_features: int, caps: CvqCaps | None = None
) -> tuple[list[CvqStep], list[Unhonoured]]:
    """The restore commands in order, and everything the destination cannot honour (empty when it can).

    Order: MAC, queue pairs, RX modes, MAC tables, VLANs, guest offloads. The MAC goes first so that the
    unicast filter admits the guest's traffic as early as possible; pairs before anything per-queue.
    """
    caps = caps or CvqCaps()
    p = _Planner(device_features, caps)

    if caps.mac != state.mac:
        have = mac_str(caps.mac) if caps.mac is not None else "unknown"
        p.add(
            NetF.CTRL_MAC_ADDR,
            f"MAC {mac_str(state.mac)}",
            CtrlClass.MAC,
            MacCmd.ADDR_SET,
            {"mac": state.mac},
            f"destination MAC is {have}",
        )

    if state.pairs > 1:
        if state.pairs > caps.max_pairs:
            p.problems.append(
                Unhonoured(f"{state.pairs} queue pairs", f"the destination has {caps.max_pairs} queue pair(s)")
            )
        else:
            p.add(
                NetF.MQ,
                f"{state.pairs} queue pairs",
                CtrlClass.MQ,
                MqCmd.VQ_PAIRS_SET,
                {"pairs": state.pairs},
                "a reset device uses one pair",
            )

    for rx in RxCmd:
        mode = RxMode(1 << rx)
        want, default = bool(state.rx_mode & mode), bool(caps.rx_defaults & mode)
        if want != default:
            p.add(
                _RX_FEATURE[rx],
                f"RX mode {rx.name.lower()} {'on' if want else 'off'}",
                CtrlClass.RX,
                rx,
                {"on": want},
                f"a reset device has it {'on' if default else 'off'}",
            )

    if state.uc_macs or state.mc_macs or state.uc_overflow or state.mc_overflow:
        # an overflowed table is re-created as one: more entries than the device keeps puts it in the same
        # accept-all mode the source was in (the real addresses were never kept)
        filler = [bytes(6)] * (caps.mac_table_max + 1)
        uc = filler if state.uc_overflow else list(state.uc_macs)
        mc = filler if state.mc_overflow else list(state.mc_macs)
        what = f"MAC table ({len(state.uc_macs)} unicast, {len(state.mc_macs)} multicast"
        what += ", overflowed)" if state.uc_overflow or state.mc_overflow else ")"
        p.add(
            NetF.CTRL_RX,
            what,
            CtrlClass.MAC,
            MacCmd.TABLE_SET,
            {"unicast": uc, "multicast": mc},
            "a reset device has empty tables",
        )

    if state.vlans:
        vids = sorted(state.vlans)
        reason = p.lacks(NetF.CTRL_VLAN)
        if reason is not None:
            shown = ", ".join(map(str, vids[:8])) + (", ..." if len(vids) > 8 else "")
            p.problems.append(Unhonoured(f"{len(vids)} VLAN filter(s) ({shown})", reason))
        else:
            for vid in vids:
                p.add(NetF.CTRL_VLAN, f"VLAN {vid}", CtrlClass.VLAN, VlanCmd.ADD, {"vid": vid}, "no VLAN after reset")

    # Offloads the destination did not negotiate are dropped, not refused: a guest that allows an offload
    # also accepts frames that do not use it, so the device simply never applying it is safe.
    negotiated = int(device_features) & GUEST_OFFLOAD_MASK
    offloads = state.guest_offloads & negotiated
    if offloads != negotiated:
        p.add(
            NetF.CTRL_GUEST_OFFLOADS,
            f"guest offloads {offloads:#x}",
            CtrlClass.GUEST_OFFLOADS,
            GuestOffloadsCmd.SET,
            {"offloads": offloads},
            f"a reset device uses every negotiated offload ({negotiated:#x})",
        )
    return p.steps, p.problems


def plan_restore(state: DeviceState, device_features: int, cvq_caps: CvqCaps | None = None) -> list[CvqStep]:
    """The ordered CVQ commands that bring a device with `device_features` (negotiated) to `state`.

    Raises RestoreError naming everything the destination cannot honour."""
    steps, problems = check_restore(state, device_features, cvq_caps)
    if problems:
        raise RestoreError(
            "destination cannot restore the saved net state: " + "; ".join(map(str, problems)),
            problems=tuple(problems),
        )
    return steps


async def apply_restore(client: CvqClient, steps: list[CvqStep]) -> None:
    """Send the steps in order (each traced as `cvq_command` by the client). The first refusal, timeout or
    broken queue raises RestoreError naming the command; later steps are not sent, since they may depend on
    it (a MAC table without the MAC it goes with)."""
    blog = log.bind(device=client.device.name)
    blog.info("cvq_restore_start", steps=len(steps))
    for n, step in enumerate(steps, 1):
        cmd = step.command
        try:
            await client.command(cmd.cls, cmd.cmd, cmd.payload)
        except CvqCommandError as exc:
            blog.error("cvq_restore_refused", step=n, command=step.describe(), ack=exc.ack)
            raise RestoreError(
                f"destination device refused restore step {n}/{len(steps)}: {step.describe()} (ack {exc.ack})",
                step=step,
            ) from exc
        except (CvqError, DeviceError) as exc:
            blog.error("cvq_restore_failed", step=n, command=step.describe(), error=str(exc))
            raise RestoreError(
                f"restore step {n}/{len(steps)} ({step.describe()}) failed: {exc}",
                step=step,
            ) from exc
    blog.info("cvq_restore_done", steps=len(steps))
