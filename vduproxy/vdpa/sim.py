"""The software vDPA net device ("sim"): control plane in Python, data path in C (sim_core.c, own thread).

It behaves like Linux vhost-vdpa over a virtio-net device (drivers/vhost/vdpa.c + vdpa_sim_net.c) so the proxy
runs unchanged against it and against /dev/vhost-vdpa-N. This is the only module importing `_sim_core`.

Device spec: `sim[:key=value,...]` with keys
  profile=NAME_OR_PATH   a packaged profile (rich, vdpasim, basic) or a TOML file; default rich
  backend=loopback|tap|sink   TX looped to RX of the same pair (default), written to a TAP, or counted
  tap=IFNAME             TAP interface for backend=tap (implies it)
  mac=02:00:00:00:00:01  overrides the profile's MAC
  busy_poll_us=N         keep polling N µs after the last work before sleeping in epoll
  rx_full=wait|drop      RX out of buffers: wait (loopback: the TX chain stays un-consumed until RX buffers
                         come, nothing lost; TAP: frames stay queued in the TAP) or drop (vdpa_sim_net's
                         loopback; a NIC). Default: the profile's with backend=loopback, drop otherwise
  fault=KIND@TARGET[+...]  faults injected at open, for tests (see `SimDevice.inject_fault`):
                         iotlb_miss@vqN, stuck@vqN, ioctl@OP (OP fails once), vanish@device
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import pathlib
import tomllib
from collections.abc import Iterator
from typing import Any

from ..log import get_logger
from ..virtio import NetF, Status, is_pow2
from .device import VIRTIO_ID_NET, BackendF, DeviceError, DeviceFault, IovaRange, Perm, VqStats

try:
    from . import _sim_core  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "vduproxy.vdpa._sim_core is not built: run `python setup.py build_ext --inplace` "
        "or `python vduproxy/vdpa/_build_sim.py`"
    ) from exc

ffi: Any = _sim_core.ffi
lib: Any = _sim_core.lib

ABI_VERSION = 3
if lib.sim_abi_version() != ABI_VERSION:  # pragma: no cover - stale build
    raise ImportError(f"vduproxy.vdpa._sim_core ABI {lib.sim_abi_version()} != {ABI_VERSION}: rebuild the extension")

log = get_logger(__name__)

PROFILE_DIR = pathlib.Path(__file__).resolve().parent / "profiles"
DEFAULT_PROFILE = "rich"
BACKENDS = {"loopback": lib.SIM_BACKEND_LOOPBACK, "tap": lib.SIM_BACKEND_TAP, "sink": lib.SIM_BACKEND_SINK}
CONFIG_SIZE = lib.SIM_CONFIG_SIZE
MAX_PAIRS = (lib.SIM_MAX_VQS - 1) // 2

# What the data path implements. Guest offloads can be offered because the device never sends GSO or
# partially-checksummed frames (the RX header is always zero), so accepting them costs nothing.
SUPPORTED_FEATURES = (
    NetF.GUEST_CSUM | NetF.CTRL_GUEST_OFFLOADS | NetF.MTU | NetF.MAC | NetF.GUEST_TSO4 | NetF.GUEST_TSO6
    | NetF.GUEST_ECN | NetF.GUEST_UFO | NetF.MRG_RXBUF | NetF.STATUS | NetF.CTRL_VQ | NetF.CTRL_RX
    | NetF.CTRL_VLAN | NetF.CTRL_RX_EXTRA | NetF.GUEST_ANNOUNCE | NetF.MQ | NetF.CTRL_MAC_ADDR
    | NetF.ANY_LAYOUT | NetF.RING_INDIRECT_DESC | NetF.RING_EVENT_IDX | NetF.VERSION_1 | NetF.ACCESS_PLATFORM
)  # fmt: skip
SUPPORTED_BACKEND = (
    BackendF.IOTLB_MSG_V2 | BackendF.IOTLB_BATCH | BackendF.IOTLB_ASID | BackendF.SUSPEND | BackendF.RESUME
    | BackendF.ENABLE_AFTER_DRIVER_OK | BackendF.IOTLB_PERSIST
)  # fmt: skip
_NEEDS_CVQ = (
    NetF.CTRL_RX | NetF.CTRL_VLAN | NetF.CTRL_RX_EXTRA | NetF.GUEST_ANNOUNCE | NetF.MQ | NetF.CTRL_MAC_ADDR
    | NetF.CTRL_GUEST_OFFLOADS
)  # fmt: skip
# FEATURES_OK is refused without these: rings are reached through the IOTLB and laid out as virtio 1.x
_REQUIRED_FOR_FEATURES_OK = NetF.VERSION_1 | NetF.ACCESS_PLATFORM
_VIRTIO_NET_S_LINK_UP = 1


class SimConfigError(DeviceError):
    """A bad device spec or profile (unknown key, bad value, unreadable file)."""

    def __init__(self, message: str) -> None:
        super().__init__("sim", message, errno.EINVAL)


# ---------------------------------------------------------------- profiles


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    description: str
    features: int
    backend_features: int
    queue_pairs: int
    ring_max: int
    cvq_own_group: bool
    address_spaces: int
    iova_first: int
    iova_last: int
    mac: bytes
    mtu: int
    link_up: bool
    rx_filter: str  # "all": accept everything until the driver programs the filter; "mac": like vdpa_sim_net
    max_iotlb_entries: int
    busy_poll_us: int
    rx_full: str  # "wait": frames wait for RX buffers (back-pressure); "drop": dropped like vdpa_sim_net

    @property
    def has_cvq(self) -> bool:
        return bool(self.features & NetF.CTRL_VQ)


_PROFILE_DEFAULTS: dict[str, Any] = {
    "description": "",
    "backend_features": 0,
    "queue_pairs": 1,
    "ring_max": 256,
    "cvq_own_group": True,
    "address_spaces": 2,
    "iova_range": [0, (1 << 64) - 1],
    "mac": "02:00:00:00:00:01",
    "mtu": 1500,
    "link_up": True,
    "rx_filter": "all",
    "max_iotlb_entries": 2048,
    "busy_poll_us": 0,
    "rx_full": "wait",
}
RX_FULL_MODES = ("wait", "drop")
_PROFILE_KEYS = {"features", *_PROFILE_DEFAULTS}


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    try:
        mac = bytes(int(p, 16) for p in parts) if len(parts) == 6 and all(len(p) == 2 for p in parts) else b""
    except ValueError:
        mac = b""
    if len(mac) != 6:
        raise SimConfigError(f"{text!r} is not a MAC address like 02:00:00:00:00:01")
    return mac


def _flags(what: str, value: Any, names: type[NetF] | type[BackendF]) -> int:
    if isinstance(value, bool) or not isinstance(value, int | list):
        raise SimConfigError(f"{what} must be an integer or a list of names")
    if isinstance(value, int):
        if not 0 <= value < 1 << 64:
            raise SimConfigError(f"{what} {value:#x} is not a 64-bit mask")
        return value
    mask = 0
    for name in value:
        if not isinstance(name, str) or name not in names.__members__:
            known = ", ".join(names.__members__)
            raise SimConfigError(f"{what}: unknown name {name!r} (known: {known})")
        mask |= int(names[name])
    return mask


def _int(data: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SimConfigError(f"{key} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _bool(data: dict[str, Any], key: str) -> bool:
    value = data[key]
    if not isinstance(value, bool):
        raise SimConfigError(f"{key} must be true or false, got {value!r}")
    return value


def profile_from_dict(name: str, raw: dict[str, Any]) -> Profile:
    """Validate a profile table (as parsed from TOML)."""
    unknown = sorted(set(raw) - _PROFILE_KEYS)
    if unknown:
        raise SimConfigError(
            f"profile {name}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_PROFILE_KEYS))})"
        )
    if "features" not in raw:
        raise SimConfigError(f"profile {name}: 'features' is required")
    data = {**_PROFILE_DEFAULTS, **raw}
    try:
        features = _flags("features", data["features"], NetF)
        backend = _flags("backend_features", data["backend_features"], BackendF)
        if features & ~SUPPORTED_FEATURES:
            raise SimConfigError(f"features not implemented by the sim: {NetF(features & ~SUPPORTED_FEATURES)!r}")
        if backend & ~SUPPORTED_BACKEND:
            raise SimConfigError(
                f"backend features not implemented by the sim: {BackendF(backend & ~SUPPORTED_BACKEND)!r}"
            )
        if features & _NEEDS_CVQ and not features & NetF.CTRL_VQ:
            raise SimConfigError("control features need CTRL_VQ")
        pairs = _int(data, "queue_pairs", 1, MAX_PAIRS)
        if pairs > 1 and not features & NetF.MQ:
            raise SimConfigError("queue_pairs > 1 needs MQ")
        ring_max = _int(data, "ring_max", 1, 32768)
        if not is_pow2(ring_max):
            raise SimConfigError(f"ring_max must be a power of two, got {ring_max}")
        iova = data["iova_range"]
        if (
            not isinstance(iova, list)
            or len(iova) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64 for v in iova)
            or iova[0] > iova[1]
        ):
            raise SimConfigError(f"iova_range must be [first, last] with 0 <= first <= last < 2**64, got {iova!r}")
        if not isinstance(data["mac"], str):
            raise SimConfigError("mac must be a string like 02:00:00:00:00:01")
        if not isinstance(data["description"], str):
            raise SimConfigError("description must be a string")
        if data["rx_filter"] not in ("all", "mac"):
            raise SimConfigError(f"rx_filter must be 'all' or 'mac', got {data['rx_filter']!r}")
        if data["rx_full"] not in RX_FULL_MODES:
            raise SimConfigError(f"rx_full must be 'wait' or 'drop', got {data['rx_full']!r}")
        return Profile(
            name=name,
            description=data["description"],
            features=features,
            backend_features=backend,
            queue_pairs=pairs,
            ring_max=ring_max,
            cvq_own_group=_bool(data, "cvq_own_group"),
            address_spaces=_int(data, "address_spaces", 1, lib.SIM_MAX_AS),
            iova_first=iova[0],
            iova_last=iova[1],
            mac=parse_mac(data["mac"]),
            mtu=_int(data, "mtu", 68, 65535),
            link_up=_bool(data, "link_up"),
            rx_filter=data["rx_filter"],
            max_iotlb_entries=_int(data, "max_iotlb_entries", 1, 1 << 20),
            busy_poll_us=_int(data, "busy_poll_us", 0, 1_000_000),
            rx_full=data["rx_full"],
        )
    except SimConfigError as exc:
        if exc.message.startswith(f"profile {name}"):
            raise
        raise SimConfigError(f"profile {name}: {exc.message}") from None


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name_or_path: str) -> Profile:
    """A packaged profile by name, or a TOML file by path (anything with a '/' or ending in .toml)."""
    if "/" in name_or_path or name_or_path.endswith(".toml"):
        path = pathlib.Path(name_or_path)
    else:
        path = PROFILE_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise SimConfigError(f"no profile {name_or_path!r} (packaged: {', '.join(list_profiles())})")
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise SimConfigError(f"cannot read profile {str(path)!r}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SimConfigError(f"profile {str(path)!r} is not valid TOML: {exc}") from None
    return profile_from_dict(path.stem, raw)


# ---------------------------------------------------------------- spec


@dataclasses.dataclass(frozen=True)
class SimSpec:
    profile: str = DEFAULT_PROFILE
    backend: str = "loopback"
    tap: str | None = None
    mac: bytes | None = None
    busy_poll_us: int | None = None
    rx_full: str | None = None
    faults: tuple[tuple[str, str], ...] = ()  # (kind, target) injected at open

    def __str__(self) -> str:
        parts = [f"profile={self.profile}", f"backend={self.backend}"]
        if self.tap:
            parts.append(f"tap={self.tap}")
        if self.mac:
            parts.append(f"mac={self.mac.hex(':')}")
        if self.busy_poll_us is not None:
            parts.append(f"busy_poll_us={self.busy_poll_us}")
        if self.rx_full is not None:
            parts.append(f"rx_full={self.rx_full}")
        if self.faults:
            parts.append("fault=" + "+".join(f"{kind}@{target}" for kind, target in self.faults))
        return "sim:" + ",".join(parts)


_SPEC_KEYS = ("profile", "backend", "tap", "mac", "busy_poll_us", "rx_full", "fault")


def parse_sim_spec(spec: str) -> SimSpec:
    """`sim` or `sim:key=value,...` → SimSpec; SimConfigError on anything else."""
    if spec == "sim":
        return SimSpec()
    if not spec.startswith("sim:"):
        raise SimConfigError(f"{spec!r} is not a sim device spec (sim[:key=value,...])")
    values: dict[str, str] = {}
    for item in spec[4:].split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise SimConfigError(f"{item!r} in {spec!r} is not key=value")
        if key not in _SPEC_KEYS:
            raise SimConfigError(f"unknown sim option {key!r} (known: {', '.join(_SPEC_KEYS)})")
        if key in values:
            raise SimConfigError(f"sim option {key!r} given twice")
        values[key] = value
    tap = values.get("tap")
    backend = values.get("backend", "tap" if tap else "loopback")
    if backend not in BACKENDS:
        raise SimConfigError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    if backend == "tap":
        if not tap:
            raise SimConfigError("backend=tap needs tap=IFNAME")
        if len(tap.encode()) >= lib.SIM_TAP_NAME_LEN or "/" in tap:
            raise SimConfigError(f"{tap!r} is not a valid interface name")
    elif tap:
        raise SimConfigError(f"tap= only goes with backend=tap, not {backend}")
    busy: int | None = None
    if "busy_poll_us" in values:
        try:
            busy = int(values["busy_poll_us"])
        except ValueError:
            busy = -1
        if not 0 <= busy <= 1_000_000:
            raise SimConfigError(f"busy_poll_us must be 0..1000000, got {values['busy_poll_us']!r}")
    mac = parse_mac(values["mac"]) if "mac" in values else None
    rx_full = values.get("rx_full")
    if rx_full is not None and rx_full not in RX_FULL_MODES:
        raise SimConfigError(f"rx_full must be 'wait' or 'drop', got {rx_full!r}")
    faults = _parse_faults(values["fault"]) if "fault" in values else ()
    return SimSpec(values.get("profile", DEFAULT_PROFILE), backend, tap, mac, busy, rx_full, faults)


# ---------------------------------------------------------------- fault injection (tests only)

# kind -> what its target names: a vq index, a device operation, or the whole device
FAULT_KINDS = {"iotlb_miss": "vq", "stuck": "vq", "ioctl": "op", "vanish": "device", "clear": "vq"}
_INJECT = {"iotlb_miss": lib.SIM_INJECT_IOTLB_MISS, "stuck": lib.SIM_INJECT_STUCK, "clear": lib.SIM_INJECT_CLEAR}


def _parse_faults(text: str) -> tuple[tuple[str, str], ...]:
    out = []
    for item in text.split("+"):
        kind, sep, target = item.partition("@")
        what = FAULT_KINDS.get(kind)
        if what is None or kind == "clear" or not sep:
            raise SimConfigError(f"fault {item!r}: expected iotlb_miss@vqN, stuck@vqN, ioctl@OP or vanish@device")
        if what == "vq" and not (target.startswith("vq") and target[2:].isdigit()):
            raise SimConfigError(f"fault {item!r}: the target of {kind} is a vq like vq1")
        if what == "op" and not target.isidentifier():
            raise SimConfigError(f"fault {item!r}: the target of ioctl is an operation like set_vring_addr")
        if what == "device" and target != "device":
            raise SimConfigError(f"fault {item!r}: the target of vanish is 'device'")
        out.append((kind, target))
    return tuple(out)


# ---------------------------------------------------------------- device


def _user_range_problem(uaddr: int, size: int, perm: Perm) -> tuple[str | None, list[tuple[int, int]]]:
    """Why [uaddr, uaddr+size) cannot back a map with `perm` in this process (None: it can), and the mappings
    (start, end) that cover it.

    The kernel pins the pages of every map (and fails with EFAULT); the sim dereferences uaddr directly, so
    it checks the range is mapped with the access the device will do instead of crashing later.
    """
    vmas: list[tuple[int, int]] = []
    pos, end = uaddr, uaddr + size
    with open("/proc/self/maps") as maps:
        for line in maps:
            rng, perms = line.split(maxsplit=2)[:2]
            lo_s, hi_s = rng.split("-")
            lo, hi = int(lo_s, 16), int(hi_s, 16)
            if hi <= pos:
                continue
            if lo > pos:
                break
            if perm & Perm.RO and perms[0] != "r":
                return f"{pos:#x} is not readable", vmas
            if perm & Perm.WO and perms[1] != "w":
                return f"{pos:#x} is not writable", vmas
            vmas.append((lo, hi))
            pos = hi
            if pos >= end:
                return None, vmas
    return f"{pos:#x} is not mapped in this process", vmas


def _mapping_ids(vmas: list[tuple[int, int]]) -> tuple[tuple[int, int], ...] | None:
    """(st_dev, st_ino) of the file behind each mapping, found by its exact bounds in /proc/self/map_files; None
    for anonymous memory or a mapping that is gone. The same file at the same bounds is the same mapping."""
    ids = []
    for lo, hi in vmas:
        try:
            st = os.stat(f"/proc/self/map_files/{lo:x}-{hi:x}")
        except OSError:
            return None
        ids.append((st.st_dev, st.st_ino))
    return tuple(ids)


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


class SimDevice:
    """In-process software vDPA net device; satisfies `VdpaDevice`."""

    def __init__(self, spec: str | SimSpec = "sim") -> None:
        self.spec = parse_sim_spec(spec) if isinstance(spec, str) else spec
        profile = load_profile(self.spec.profile)
        if self.spec.mac is not None:
            profile = dataclasses.replace(profile, mac=self.spec.mac)
        if self.spec.busy_poll_us is not None:
            profile = dataclasses.replace(profile, busy_poll_us=self.spec.busy_poll_us)
        if self.spec.rx_full is not None:
            profile = dataclasses.replace(profile, rx_full=self.spec.rx_full)
        elif self.spec.backend != "loopback":
            # Back-pressure is for a loopback (a lossless test wire); a TAP is a network, and a NIC drops what its
            # full RX cannot take rather than stop listening until the driver kicks.
            profile = dataclasses.replace(profile, rx_full="drop")
        self.profile = profile
        self.name = str(self.spec)
        self.log = log.bind(device=self.name)
        self._status = 0
        self._features = 0
        self._backend_features = 0
        # Ranges the full check accepted, with the identity of the file mappings behind them: a mode switch maps
        # the same shadow area again and again, and the /proc/self/maps walk costs hundreds of µs on a busy CPU.
        self._checked_ranges: dict[tuple[int, int, int], tuple[list[tuple[int, int]], tuple[tuple[int, int], ...]]] = {}
        self._batch_depth = 0
        self._pairs = profile.queue_pairs
        self._nvqs = 2 * self._pairs + (1 if profile.has_cvq else 0)
        self._cvq = 2 * self._pairs if profile.has_cvq else -1

        params = ffi.new("struct sim_params *")
        params.pairs = self._pairs
        params.has_cvq = int(profile.has_cvq)
        params.cvq_group = 1 if profile.has_cvq and profile.cvq_own_group else 0
        params.ngroups = self.get_groups_num()
        params.nas = profile.address_spaces
        params.ring_max = profile.ring_max
        params.backend = BACKENDS[self.spec.backend]
        params.filter_mac_only = int(profile.rx_filter == "mac")
        params.busy_poll_us = profile.busy_poll_us
        params.rx_full_wait = int(profile.rx_full == "wait")
        params.max_iotlb_entries = profile.max_iotlb_entries
        params.tap_name = (self.spec.tap or "").encode()
        ffi.memmove(params.config, self._initial_config(), CONFIG_SIZE)
        out = ffi.new("struct sim_dev **")
        self._check("open", lib.sim_create(params, out))
        self._dev: Any = ffi.gc(out[0], lib.sim_destroy)
        self._failing: dict[str, int] = {}  # injected: operation -> how many more calls fail
        self._vanished = False
        try:
            for kind, target in self.spec.faults:
                if FAULT_KINDS[kind] == "vq":
                    self.inject_fault(kind, vq=int(target[2:]))
                else:
                    self.inject_fault(kind, op=target if kind == "ioctl" else None)
        except DeviceError:
            self.close()  # a fault naming a vq the device does not have: nothing half-open is left behind
            raise
        self.log.info(
            "sim_opened", features=hex(profile.features), backend_features=hex(profile.backend_features),
            pairs=self._pairs, vqs=self._nvqs, mac=profile.mac.hex(":"), rx_full=profile.rx_full,
        )  # fmt: skip

    def _initial_config(self) -> bytes:
        p = self.profile
        cfg = bytearray(CONFIG_SIZE)
        cfg[0:6] = p.mac
        cfg[6:8] = (_VIRTIO_NET_S_LINK_UP if p.link_up else 0).to_bytes(2, "little")
        # like vdpa_sim_net on 6.1: the field is only filled when MQ makes it meaningful
        cfg[8:10] = (p.queue_pairs if p.features & NetF.MQ else 0).to_bytes(2, "little")
        cfg[10:12] = p.mtu.to_bytes(2, "little")
        return bytes(cfg)

    # ------------------------------------------------------------ plumbing

    @staticmethod
    def _check(op: str, rc: int) -> None:
        if rc < 0:
            raise DeviceError(op, os.strerror(-rc), -rc)

    def _handle(self, op: str) -> Any:
        if self._dev is None:
            raise DeviceError(op, "device is closed", errno.EBADF)
        if self._vanished:
            raise DeviceError(op, "device vanished (injected)", errno.ENODEV)
        left = self._failing.get(op, 0)
        if left:
            if left == 1:
                del self._failing[op]
            else:
                self._failing[op] = left - 1
            raise DeviceError(op, "injected failure", errno.EIO)
        return self._dev

    def _vq(self, op: str, index: int) -> int:
        if not 0 <= index < self._nvqs:
            raise DeviceError(op, f"vq {index} out of range (device has {self._nvqs})", errno.ENOBUFS)
        return index

    def close(self) -> None:
        dev, self._dev = getattr(self, "_dev", None), None
        if dev is not None:
            ffi.release(dev)  # joins the native thread and closes its fds
            self.log.info("sim_closed")

    def __enter__(self) -> SimDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ identity and negotiation

    def get_device_id(self) -> int:
        return VIRTIO_ID_NET

    def get_features(self) -> int:
        return self.profile.features

    def set_features(self, features: int) -> None:
        self._handle("set_features")
        if self._status & Status.FEATURES_OK:
            raise DeviceError("set_features", "features are frozen after FEATURES_OK", errno.EBUSY)
        if not 0 <= features < 1 << 64:
            raise DeviceError("set_features", f"{features:#x} is not a 64-bit mask", errno.EINVAL)
        dropped = features & ~self.profile.features
        if dropped:
            # vdpa_sim masks unoffered bits silently; say so, since it is usually a caller bug
            self.log.warning("features_not_offered_dropped", dropped=hex(dropped))
        self._features = features & self.profile.features

    def get_backend_features(self) -> int:
        return self.profile.backend_features

    def set_backend_features(self, features: int) -> None:
        self._handle("set_backend_features")
        extra = features & ~self.profile.backend_features
        if extra or features < 0:
            raise DeviceError("set_backend_features", f"not offered: {extra:#x}", errno.EOPNOTSUPP)
        self._backend_features = features

    def get_status(self) -> int:
        return self._status

    def set_status(self, status: int) -> None:
        dev = self._handle("set_status")
        if status == 0:
            self._reset(dev)
            return
        old = self._status
        if not 0 < status <= 0xFF:
            raise DeviceError("set_status", f"{status:#x} is not a status byte", errno.EINVAL)
        if old & ~status:
            raise DeviceError(
                "set_status", f"status {old:#x} -> {status:#x} clears bits (only reset may)", errno.EINVAL
            )
        new = status
        if new & Status.FEATURES_OK and not old & Status.FEATURES_OK:
            missing = _REQUIRED_FOR_FEATURES_OK & ~self._features
            if missing:
                self.log.warning("features_ok_refused", missing=repr(NetF(missing)), features=hex(self._features))
                new &= ~Status.FEATURES_OK
            else:
                self._check("set_status", lib.sim_set_features(dev, self._features))
        if new & Status.DRIVER_OK and not new & Status.FEATURES_OK:
            self.log.warning("driver_ok_refused", reason="FEATURES_OK not set")
            new &= ~Status.DRIVER_OK
        if new & Status.DRIVER_OK and not old & Status.DRIVER_OK:
            self._check("set_status", lib.sim_set_driver_ok(dev))
        self._status = new
        self.log.debug("status", old=hex(old), new=hex(new))

    def _reset(self, dev: Any) -> None:
        keep = bool(self._backend_features & BackendF.IOTLB_PERSIST)
        self._check("reset", lib.sim_reset(dev, int(keep)))
        self._status = 0
        self._features = 0
        self._batch_depth = 0
        self.log.debug("reset", iotlb_kept=keep)

    def get_config(self, offset: int, length: int) -> bytes:
        dev = self._handle("get_config")
        if not (0 <= offset <= CONFIG_SIZE and 0 < length <= CONFIG_SIZE):
            raise DeviceError("get_config", f"offset {offset} length {length} outside {CONFIG_SIZE}", errno.EINVAL)
        buf = ffi.new("uint8_t[]", length)
        self._check("get_config", lib.sim_get_config(dev, offset, buf, length))
        return bytes(ffi.buffer(buf, length))

    def set_config(self, offset: int, data: bytes) -> None:
        dev = self._handle("set_config")
        if not (0 <= offset < CONFIG_SIZE and 0 < len(data) <= CONFIG_SIZE):
            raise DeviceError("set_config", f"offset {offset} length {len(data)} outside the MAC", errno.EINVAL)
        self._check("set_config", lib.sim_set_config(dev, offset, data, len(data)))

    # ------------------------------------------------------------ topology

    def get_vqs_count(self) -> int:
        return self._nvqs

    def get_vring_num_max(self) -> int:
        return self.profile.ring_max

    def get_groups_num(self) -> int:
        return 2 if self.profile.has_cvq and self.profile.cvq_own_group else 1

    def get_as_num(self) -> int:
        return self.profile.address_spaces

    def get_vring_group(self, index: int) -> int:
        self._vq("get_vring_group", index)
        return 1 if index == self._cvq and self.get_groups_num() == 2 else 0

    def set_group_asid(self, group: int, asid: int) -> None:
        dev = self._handle("set_group_asid")
        if not (0 <= group < self.get_groups_num() and 0 <= asid < self.get_as_num()):
            raise DeviceError("set_group_asid", f"group {group} / asid {asid} out of range", errno.EINVAL)
        self._check("set_group_asid", lib.sim_set_group_asid(dev, group, asid))

    def get_iova_range(self) -> IovaRange:
        return IovaRange(self.profile.iova_first, self.profile.iova_last)

    # ------------------------------------------------------------ vrings

    def set_vring_num(self, index: int, num: int) -> None:
        dev = self._handle("set_vring_num")
        self._vq("set_vring_num", index)
        if not (is_pow2(num) and num <= self.profile.ring_max):
            raise DeviceError("set_vring_num", f"{num} is not a power of two <= {self.profile.ring_max}", errno.EINVAL)
        self._check("set_vring_num", lib.sim_set_vring_num(dev, index, num))

    def set_vring_addr(self, index: int, desc: int, avail: int, used: int) -> None:
        dev = self._handle("set_vring_addr")
        self._vq("set_vring_addr", index)
        if not all(0 <= a < 1 << 64 for a in (desc, avail, used)):
            raise DeviceError("set_vring_addr", "address is not a 64-bit IOVA", errno.EINVAL)
        self._check("set_vring_addr", lib.sim_set_vring_addr(dev, index, desc, avail, used))

    def set_vring_base(self, index: int, base: int) -> None:
        dev = self._handle("set_vring_base")
        self._vq("set_vring_base", index)
        if not 0 <= base <= 0xFFFF:
            raise DeviceError("set_vring_base", f"{base} is not a 16-bit ring index", errno.EINVAL)
        self._check("set_vring_base", lib.sim_set_vring_base(dev, index, base))

    def get_vring_base(self, index: int) -> int:
        dev = self._handle("get_vring_base")
        self._vq("get_vring_base", index)
        out = ffi.new("uint32_t *")
        self._check("get_vring_base", lib.sim_get_vring_base(dev, index, out))
        return int(out[0])

    def _set_fd(self, op: str, index: int, fd: int) -> int:
        self._vq(op, index)
        if fd != -1 and not (fd >= 0 and _is_eventfd(fd)):
            raise DeviceError(op, f"fd {fd} is not an eventfd", errno.EINVAL)
        return fd

    def set_vring_kick(self, index: int, fd: int) -> None:
        dev = self._handle("set_vring_kick")
        self._check("set_vring_kick", lib.sim_set_vring_kick(dev, index, self._set_fd("set_vring_kick", index, fd)))

    def set_vring_call(self, index: int, fd: int) -> None:
        dev = self._handle("set_vring_call")
        self._check("set_vring_call", lib.sim_set_vring_call(dev, index, self._set_fd("set_vring_call", index, fd)))

    def set_vring_enable(self, index: int, enable: bool) -> None:
        dev = self._handle("set_vring_enable")
        self._vq("set_vring_enable", index)
        late_ok = bool(self._backend_features & BackendF.ENABLE_AFTER_DRIVER_OK)
        if enable and self._status & Status.DRIVER_OK and not late_ok:
            # without ENABLE_AFTER_DRIVER_OK a device need not start such a vq; this one does not, so that
            # a proxy relying on it fails here rather than on hardware
            self.log.warning("vq_enabled_after_driver_ok_ignored", vq=index)
        self._check("set_vring_enable", lib.sim_set_vring_enable(dev, index, int(enable), int(late_ok)))

    def suspend(self) -> None:
        dev = self._handle("suspend")
        if not self.profile.backend_features & BackendF.SUSPEND:
            raise DeviceError("suspend", "device cannot suspend", errno.EOPNOTSUPP)
        self._check("suspend", lib.sim_suspend(dev))

    def resume(self) -> None:
        dev = self._handle("resume")
        if not self.profile.backend_features & BackendF.RESUME:
            raise DeviceError("resume", "device cannot resume", errno.EOPNOTSUPP)
        self._check("resume", lib.sim_resume(dev))

    # ------------------------------------------------------------ IOTLB

    def _asid(self, op: str, asid: int) -> None:
        # every IOTLB failure is EFAULT, as the kernel's write() on the vhost-vdpa fd reports it
        if not 0 <= asid < self.get_as_num():
            raise DeviceError(op, f"asid {asid} out of range", errno.EFAULT)
        if asid and not self._backend_features & BackendF.IOTLB_ASID:
            raise DeviceError(op, f"asid {asid} needs backend feature IOTLB_ASID acked", errno.EFAULT)

    def iotlb_update(self, iova: int, size: int, uaddr: int, perm: Perm, asid: int = 0) -> None:
        op = "iotlb_update"
        dev = self._handle(op)
        self._asid(op, asid)
        if perm not in (Perm.RO, Perm.WO, Perm.RW):
            raise DeviceError(op, f"bad permission {perm!r}", errno.EFAULT)
        if not self.get_iova_range().contains(iova, size):
            rng = self.get_iova_range()
            raise DeviceError(
                op,
                f"[{iova:#x}, +{size:#x}) outside the IOVA range [{rng.first:#x}, {rng.last:#x}]",
                errno.EFAULT,
            )
        if not 0 < uaddr < 1 << 64 or uaddr + size > 1 << 64:
            raise DeviceError(op, f"uaddr {uaddr:#x} size {size:#x} is not a user range", errno.EFAULT)
        key = (uaddr, size, int(perm))
        problem = None
        known = self._checked_ranges.pop(key, None)
        if known is None or _mapping_ids(known[0]) != known[1]:
            problem, vmas = _user_range_problem(uaddr, size, perm)
            ids = None if problem is not None else _mapping_ids(vmas)
            if ids is not None:
                self._checked_ranges[key] = (vmas, ids)
        else:
            self._checked_ranges[key] = known
        if problem is not None:
            raise DeviceError(op, f"uaddr range [{uaddr:#x}, +{size:#x}): {problem}", errno.EFAULT)
        rc = lib.sim_iotlb_update(dev, asid, iova, size, uaddr, int(perm))
        if rc == -errno.EEXIST:
            raise DeviceError(op, f"[{iova:#x}, +{size:#x}) overlaps an existing map in asid {asid}", errno.EFAULT)
        if rc < 0:
            raise DeviceError(op, os.strerror(-rc), errno.EFAULT)

    def iotlb_invalidate(self, iova: int, size: int, asid: int = 0) -> None:
        op = "iotlb_invalidate"
        dev = self._handle(op)
        self._asid(op, asid)
        if size <= 0 or iova < 0 or iova + size > 1 << 64:
            raise DeviceError(op, f"bad range [{iova:#x}, +{size:#x})", errno.EFAULT)
        rc = lib.sim_iotlb_invalidate(dev, asid, iova, size)
        if rc < 0:
            raise DeviceError(op, os.strerror(-rc), errno.EFAULT)

    @contextlib.contextmanager
    def iotlb_batch(self) -> Iterator[None]:
        """With IOTLB_BATCH acked, updates inside become visible to the data path at the end, all at once."""
        dev = self._handle("iotlb_batch")
        if not self._backend_features & BackendF.IOTLB_BATCH:
            yield
            return
        self._batch_depth += 1
        if self._batch_depth == 1:
            self._check("iotlb_batch", lib.sim_iotlb_batch_begin(dev))
        try:
            yield
        finally:
            self._batch_depth -= 1
            if self._batch_depth == 0 and self._dev is not None:
                self._check("iotlb_batch", lib.sim_iotlb_batch_end(self._dev))

    def iotlb_map_count(self, asid: int = 0) -> int:
        """Number of live maps in an address space (for tests and diagnostics)."""
        dev = self._handle("iotlb_map_count")
        out = ffi.new("uint32_t *")
        self._check("iotlb_map_count", lib.sim_iotlb_count(dev, asid, out))
        return int(out[0])

    # ------------------------------------------------------------ observation

    def vq_stats(self, index: int) -> VqStats:
        dev = self._handle("vq_stats")
        self._vq("vq_stats", index)
        s = ffi.new("struct sim_vq_stats *")
        self._check("vq_stats", lib.sim_vq_stats(dev, index, s))
        error = ffi.string(s.error).decode(errors="replace") if s.has_error else None
        return VqStats(s.packets, s.bytes, s.kicks, s.calls, s.faults, s.dropped, error)

    def vq_waits(self, index: int) -> int:
        """How often frames were held back for lack of RX room instead of dropped: counted on the TX vq of a
        loopback pair (rx_full=wait) and on RX vq 0 for TAP frames; once per episode, not per retry."""
        dev = self._handle("vq_waits")
        self._vq("vq_waits", index)
        s = ffi.new("struct sim_vq_stats *")
        self._check("vq_waits", lib.sim_vq_stats(dev, index, s))
        return int(s.waits)

    def rounds(self) -> int:
        """Processing rounds the data-path thread has run; it only runs one when woken, so an idle device's
        count stands still (tests check a waiting queue does not spin)."""
        out = ffi.new("uint64_t *")
        self._check("rounds", lib.sim_rounds(self._handle("rounds"), out))
        return int(out[0])

    def fault_fd(self) -> int:
        return int(lib.sim_fault_fd(self._handle("fault_fd")))

    def take_faults(self) -> list[DeviceFault]:
        dev = self._handle("take_faults")
        with contextlib.suppress(BlockingIOError):
            os.read(lib.sim_fault_fd(dev), 8)  # re-arm readability before draining the queue
        out = []
        f = ffi.new("struct sim_fault *")
        while lib.sim_take_fault(dev, f) == 1:
            out.append(DeviceFault(vq=f.vq, reason=ffi.string(f.reason).decode(errors="replace"), iova=f.iova))
        for fault in out:
            self.log.warning("device_fault", vq=fault.vq, reason=fault.reason, iova=hex(fault.iova))
        return out

    def filter_state(self) -> dict[str, Any]:
        """The RX filter and other CVQ-programmed state, as plain data."""
        dev = self._handle("filter_state")
        s = ffi.new("struct sim_filter *")
        self._check("filter_state", lib.sim_filter_state(dev, s))

        def macs(table: Any, count: int) -> list[str]:
            return [bytes(ffi.buffer(table[i], 6)).hex(":") for i in range(min(count, lib.SIM_MAC_TABLE_MAX))]

        return {
            "mac": bytes(ffi.buffer(s.mac, 6)).hex(":"),
            "promisc": bool(s.promisc),
            "allmulti": bool(s.allmulti),
            "alluni": bool(s.alluni),
            "nomulti": bool(s.nomulti),
            "nouni": bool(s.nouni),
            "nobcast": bool(s.nobcast),
            "uc_macs": macs(s.uc, s.uc_count),
            "mc_macs": macs(s.mc, s.mc_count),
            "uc_overflow": bool(s.uc_overflow),
            "mc_overflow": bool(s.mc_overflow),
            "vlans": [vid for vid in range(4096) if s.vlans[vid >> 5] & (1 << (vid & 31))],
            "active_pairs": int(s.active_pairs),
            "guest_offloads": int(s.guest_offloads),
            "cvq_commands": int(s.cvq_commands),
        }

    # ------------------------------------------------------------ fault injection (tests only)

    def inject_fault(self, kind: str, vq: int | None = None, *, op: str | None = None, times: int = 1) -> None:
        """Make the device misbehave the way hardware can, so tests can prove the proxy copes:

        - ``iotlb_miss`` (vq): the next chain the vq takes misses the IOTLB; the vq faults (reported through
          `fault_fd`/`take_faults`, `VqStats.error` set) and stops, like an access to an unmapped IOVA.
        - ``stuck`` (vq): the vq is never processed again, silently, until ``clear``; a reset does not help.
        - ``clear`` (vq): forget the vq's injected faults (a fault already raised stays until the vq is
          disabled or the device reset, as for a real fault).
        - ``ioctl`` (op): the next `times` calls of the named operation (``set_status``, ``set_vring_addr``,
          ``iotlb_update``, ...) fail with EIO.
        - ``vanish``: the device is gone: every later operation fails with ENODEV and the data path stops;
          only `close` still works.
        """
        dev = self._handle("inject_fault")
        what = FAULT_KINDS.get(kind)
        if what is None:
            raise DeviceError("inject_fault", f"unknown fault {kind!r} (known: {', '.join(FAULT_KINDS)})", errno.EINVAL)
        if what == "vq":
            if vq is None:
                raise DeviceError("inject_fault", f"{kind} needs a vq", errno.EINVAL)
            self._vq("inject_fault", vq)
            self._check("inject_fault", lib.sim_inject_fault(dev, vq, _INJECT[kind]))
        elif what == "op":
            if not op or times < 1:
                raise DeviceError("inject_fault", "ioctl needs an operation name and times >= 1", errno.EINVAL)
            self._failing[op] = self._failing.get(op, 0) + times
        else:
            # Stop the data path the way a removed device stops: nothing it held is touched again.
            self._check("inject_fault", lib.sim_reset(dev, 0))
            self._vanished = True
        self.log.warning("fault_injected", kind=kind, vq=vq, op=op, times=times if what == "op" else None)
