"""vhost-user wire format: header, request numbers, protocol feature bits, and one codec per payload.

Everything here is pure: bytes in, typed frozen values out (and back). No sockets, no fds, no state; the
connection layer (connection.py) applies the rules that depend on negotiation.

Sources: QEMU docs/interop/vhost-user.rst (message numbers, payload layouts), QEMU hw/virtio/vhost-user.c
(sizes QEMU really sends), DPDK drivers/net/virtio/virtio_user/vhost_user.c (what virtio-user sends).
All numbers are native byte order; the project runs on little-endian hosts only, so the structs say so.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from construct import Array, Bytes, ConstructError, Int8ul, Int16ul, Int32ul, Int64ul, Padding, Struct, this

# --- header ------------------------------------------------------------------------------------------------

HEADER = Struct("request" / Int32ul, "flags" / Int32ul, "size" / Int32ul)
HEADER_SIZE = 12

VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY
REQUEST_FLAGS = VERSION
# QEMU and virtio-user compare reply flags for equality, not as a mask: anything else aborts the front-end.
REPLY_FLAGS = VERSION | FLAG_REPLY

# --- limits on peer-controlled sizes -----------------------------------------------------------------------

MAX_MEM_REGIONS = 8  # VHOST_MEMORY_BASELINE_NREGIONS: SET_MEM_TABLE carries at most 8 regions (and 8 fds)
MAX_CONFIG_SIZE = 256  # VHOST_USER_MAX_CONFIG_SIZE
CONFIG_HDR_SIZE = 12
MAX_INFLIGHT_QUEUES = 1024  # VIRTIO_QUEUE_MAX: bounds GET_INFLIGHT_FD's num_queues * queue_size allocation
MAX_QUEUE_SIZE = 32768
MAX_LOG_SIZE = 1 << 30  # one bit per 4 KiB page: 1 GiB of log covers 32 TiB of guest memory
MAX_OPAQUE_BODY = 4096
U64_MAX = (1 << 64) - 1

VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100
VHOST_VRING_F_LOG = 0x1  # bit 0 of SET_VRING_ADDR flags: log used-ring writes at log_guest_addr
DEVICE_STATE_NOFD = 0x100  # bit 8 of the SET_DEVICE_STATE_FD reply: no fd returned


class Req(enum.IntEnum):
    """Front-end -> back-end requests (vhost-user.rst "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendReq(enum.IntEnum):
    """Back-end -> front-end requests on the SET_BACKEND_REQ_FD channel."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class ProtocolF(enum.IntFlag):
    """VHOST_USER_PROTOCOL_F_* as masks (bit numbers from vhost-user.rst "Protocol features")."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


ALL_PROTOCOL_FEATURES = (1 << 20) - 1


class IotlbType(enum.IntEnum):
    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4


class TransferDirection(enum.IntEnum):
    SAVE = 0  # back-end -> front-end (migration source)
    LOAD = 1  # front-end -> back-end (migration destination)


class TransferPhase(enum.IntEnum):
    STOPPED = 0


class WireError(ValueError):
    """A payload that does not match its layout or breaks a wire-level rule. `reason` is for humans."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- typed payload values ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VringState:
    """vring state description. For GET_VRING_BASE requests `num` is junk (virtio-user sends garbage)."""

    index: int
    num: int


@dataclasses.dataclass(frozen=True)
class VringAddr:
    """struct vhost_vring_addr. Note the order on the wire: desc, *used*, *avail*, log."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int

    @property
    def log_enabled(self) -> bool:
        return bool(self.flags & VHOST_VRING_F_LOG)


@dataclasses.dataclass(frozen=True)
class VringFile:
    """The u64 of SET_VRING_KICK/CALL/ERR: vring index in bits 0-7, bit 8 set when no fd is attached."""

    index: int
    nofd: bool = False

    def to_u64(self) -> int:
        return (self.index & VRING_IDX_MASK) | (VRING_NOFD_MASK if self.nofd else 0)

    def __int__(self) -> int:
        # handlers that think of the payload as the raw u64 (index | NOFD) can keep doing so
        return self.to_u64()


@dataclasses.dataclass(frozen=True)
class MemRegion:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    @property
    def gpa_end(self) -> int:
        """Exclusive end of the guest-physical range."""
        return self.guest_phys_addr + self.memory_size

    @property
    def uva_end(self) -> int:
        return self.userspace_addr + self.memory_size


@dataclasses.dataclass(frozen=True)
class MemoryTable:
    regions: tuple[MemRegion, ...]
    padding: int = 0


@dataclasses.dataclass(frozen=True)
class SingleRegion:
    """ADD_MEM_REG / REM_MEM_REG payload: u64 padding then one region."""

    region: MemRegion
    padding: int = 0


@dataclasses.dataclass(frozen=True)
class LogArea:
    mmap_size: int
    mmap_offset: int


@dataclasses.dataclass(frozen=True)
class IotlbMsg:
    iova: int
    size: int
    uaddr: int
    perm: int
    type: int


@dataclasses.dataclass(frozen=True)
class ConfigSpace:
    """Virtio config space access; the wire's `size` field is len(payload)."""

    offset: int
    flags: int
    payload: bytes


@dataclasses.dataclass(frozen=True)
class VringArea:
    u64: int
    size: int
    offset: int

    @property
    def index(self) -> int:
        return self.u64 & VRING_IDX_MASK

    @property
    def nofd(self) -> bool:
        return bool(self.u64 & VRING_NOFD_MASK)


@dataclasses.dataclass(frozen=True)
class Inflight:
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


@dataclasses.dataclass(frozen=True)
class SharedObject:
    uuid: bytes


@dataclasses.dataclass(frozen=True)
class DeviceStateTransfer:
    direction: int
    phase: int


@dataclasses.dataclass(frozen=True)
class Rarp:
    """SEND_RARP: the guest MAC in the first 6 bytes of a u64 body."""

    mac: bytes

    def __bytes__(self) -> bytes:
        return bytes(self.mac)


@dataclasses.dataclass(frozen=True)
class Opaque:
    """A payload this back-end never interprets (crypto sessions): kept as bytes."""

    data: bytes


Body = (
    None
    | int
    | VringState
    | VringAddr
    | VringFile
    | MemoryTable
    | SingleRegion
    | LogArea
    | IotlbMsg
    | ConfigSpace
    | VringArea
    | Inflight
    | SharedObject
    | DeviceStateTransfer
    | Rarp
    | Opaque
)

T = TypeVar("T")

# --- construct layouts -------------------------------------------------------------------------------------

_U64 = Int64ul
_VRING_STATE = Struct("index" / Int32ul, "num" / Int32ul)
_VRING_ADDR = Struct(
    "index" / Int32ul,
    "flags" / Int32ul,
    "desc_user_addr" / Int64ul,
    "used_user_addr" / Int64ul,
    "avail_user_addr" / Int64ul,
    "log_guest_addr" / Int64ul,
)
_REGION = Struct(
    "guest_phys_addr" / Int64ul, "memory_size" / Int64ul, "userspace_addr" / Int64ul, "mmap_offset" / Int64ul
)
_MEMORY = Struct("nregions" / Int32ul, "padding" / Int32ul, "regions" / Array(this.nregions, _REGION))
_MEM_REG = Struct("padding" / Int64ul, "region" / _REGION)
_LOG = Struct("mmap_size" / Int64ul, "mmap_offset" / Int64ul)
# struct vhost_iotlb_msg is 8-aligned: 3 u64, 2 u8, 6 bytes of tail padding = 32 bytes (what QEMU sends)
_IOTLB = Struct(
    "iova" / Int64ul, "size" / Int64ul, "uaddr" / Int64ul, "perm" / Int8ul, "type" / Int8ul, Padding(6)
)
_CONFIG = Struct("offset" / Int32ul, "size" / Int32ul, "flags" / Int32ul, "payload" / Bytes(this.size))
_VRING_AREA = Struct("u64" / Int64ul, "size" / Int64ul, "offset" / Int64ul)
# VhostUserInflight is not packed: 2 u64 + 2 u16 + 4 bytes tail padding = 24 bytes (QEMU and DPDK agree)
_INFLIGHT = Struct(
    "mmap_size" / Int64ul, "mmap_offset" / Int64ul, "num_queues" / Int16ul, "queue_size" / Int16ul, Padding(4)
)
_SHARED = Struct("uuid" / Bytes(16))
_TRANSFER = Struct("direction" / Int32ul, "phase" / Int32ul)
_RARP = Struct("mac" / Bytes(6), Padding(2))


# --- codecs ------------------------------------------------------------------------------------------------


class Codec:
    """One payload layout: `decode` checks the exact size and wire-level rules, `encode` builds bytes."""

    def __init__(
        self,
        name: str,
        *,
        size: int | None,
        decode: Callable[[bytes], Body],
        encode: Callable[[Any], bytes],
        value_type: type | None,
        check_size: Callable[[bytes], str | None] | None = None,
        nullable: bool = False,
    ) -> None:
        self.name = name
        self.size = size  # fixed size, or None when the size depends on the content
        self._decode = decode
        self._encode = encode
        self.value_type = value_type
        self._check_size = check_size
        self.nullable = nullable  # None is a valid value too (GET_CONFIG's empty error reply)

    def __repr__(self) -> str:
        return f"Codec({self.name})"

    def size_error(self, data: bytes) -> str | None:
        if self.size is not None and len(data) != self.size:
            return f"{self.name} payload must be {self.size} bytes, got {len(data)}"
        if self._check_size is not None:
            return self._check_size(data)
        return None

    def header_size_error(self, size: int) -> str | None:
        """Size check possible from the header alone (lets a bad size fail before the body arrives)."""
        if self.size is not None and size != self.size:
            return f"{self.name} payload must be {self.size} bytes, got {size}"
        return None

    def decode(self, data: bytes) -> Body:
        err = self.size_error(data)
        if err is not None:
            raise WireError(err)
        try:
            return self._decode(data)
        except (
            ConstructError
        ) as e:  # sizes were checked, so this is a layout bug; still never crash the caller
            raise WireError(f"{self.name} payload cannot be parsed: {e}") from e

    def encode(self, value: Any) -> bytes:
        if (
            isinstance(value, Mapping)
            and self.value_type is not None
            and dataclasses.is_dataclass(self.value_type)
        ):
            # convenience for handlers that answer with {"index": i, "num": n}
            value = self.value_type(**value)
        if value is None and self.nullable:
            pass
        elif self.value_type is None:
            if value is not None:
                raise TypeError(f"{self.name} payload takes no value, got {value!r}")
        elif not isinstance(value, self.value_type) or isinstance(value, bool):
            raise TypeError(
                f"{self.name} payload needs {self.value_type.__name__}, got {type(value).__name__}"
            )
        try:
            data = self._encode(value)
        except ConstructError as e:
            raise WireError(f"{self.name} payload cannot be built: {e}") from e
        # building must produce what decoding accepts: catch out-of-range values at the sender
        self.decode(data)
        return data


def _u64_in_range(value: int) -> bytes:
    if not 0 <= value <= U64_MAX:
        raise WireError(f"u64 value out of range: {value}")
    return bytes(_U64.build(value))


def _check_region(r: MemRegion, what: str) -> None:
    if r.memory_size == 0:
        raise WireError(f"{what}: zero-size memory region at gpa {r.guest_phys_addr:#x}")
    if r.gpa_end > U64_MAX + 1:
        raise WireError(f"{what}: region gpa {r.guest_phys_addr:#x} + size {r.memory_size:#x} overflows")
    if r.uva_end > U64_MAX + 1:
        raise WireError(f"{what}: region user address {r.userspace_addr:#x} + size overflows")
    if r.mmap_offset + r.memory_size > U64_MAX + 1:
        raise WireError(f"{what}: region mmap_offset {r.mmap_offset:#x} + size overflows")


def _region(c: Any) -> MemRegion:
    return MemRegion(int(c.guest_phys_addr), int(c.memory_size), int(c.userspace_addr), int(c.mmap_offset))


def _region_dict(r: MemRegion) -> dict[str, int]:
    return dataclasses.asdict(r)


def _memory_size_error(data: bytes) -> str | None:
    if len(data) < 8:
        return f"memory table payload too short: {len(data)} bytes"
    n = int.from_bytes(data[:4], "little")
    if not 1 <= n <= MAX_MEM_REGIONS:
        return f"memory table has {n} regions, must be 1..{MAX_MEM_REGIONS}"
    if len(data) != 8 + 32 * n:
        return f"memory table with {n} regions must be {8 + 32 * n} bytes, got {len(data)}"
    return None


def _decode_memory(data: bytes) -> MemoryTable:
    c = _MEMORY.parse(data)
    regions = tuple(_region(r) for r in c.regions)
    for r in regions:
        _check_region(r, "memory table")
    ordered = sorted(regions, key=lambda r: r.guest_phys_addr)
    for a, b in itertools.pairwise(ordered):
        if b.guest_phys_addr < a.gpa_end:
            raise WireError(
                f"memory regions overlap: gpa [{a.guest_phys_addr:#x}, {a.gpa_end:#x}) "
                f"and [{b.guest_phys_addr:#x}, {b.gpa_end:#x})"
            )
    return MemoryTable(regions, int(c.padding))


def _encode_memory(v: MemoryTable) -> bytes:
    return bytes(
        _MEMORY.build(
            {
                "nregions": len(v.regions),
                "padding": v.padding,
                "regions": [_region_dict(r) for r in v.regions],
            }
        )
    )


def _decode_mem_reg(data: bytes) -> SingleRegion:
    c = _MEM_REG.parse(data)
    r = _region(c.region)
    _check_region(r, "memory region")
    return SingleRegion(r, int(c.padding))


def _decode_vring_file(data: bytes) -> VringFile:
    v = int(_U64.parse(data))
    if v & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
        # QEMU and virtio-user mask the index to 8 bits; anything above bit 8 is not a vring file we know
        raise WireError(f"vring file u64 {v:#x} has bits set above bit 8")
    return VringFile(v & VRING_IDX_MASK, bool(v & VRING_NOFD_MASK))


def _encode_vring_file(v: VringFile) -> bytes:
    if not 0 <= v.index <= VRING_IDX_MASK:
        raise WireError(f"vring index {v.index} does not fit in 8 bits")
    return bytes(_U64.build(v.to_u64()))


def _decode_log(data: bytes) -> LogArea:
    c = _LOG.parse(data)
    v = LogArea(int(c.mmap_size), int(c.mmap_offset))
    if v.mmap_size == 0 or v.mmap_size > MAX_LOG_SIZE:
        raise WireError(f"dirty log size {v.mmap_size} must be 1..{MAX_LOG_SIZE}")
    if v.mmap_offset + v.mmap_size > U64_MAX + 1:
        raise WireError("dirty log mmap_offset + mmap_size overflows")
    return v


def _decode_iotlb(data: bytes) -> IotlbMsg:
    c = _IOTLB.parse(data)
    v = IotlbMsg(int(c.iova), int(c.size), int(c.uaddr), int(c.perm), int(c.type))
    if v.type not in {t.value for t in IotlbType}:
        raise WireError(f"unknown IOTLB message type {v.type}")
    if v.perm > 3:
        raise WireError(f"IOTLB permission {v.perm} is not 0..3")
    return v


def _config_size_error(data: bytes) -> str | None:
    if len(data) < CONFIG_HDR_SIZE:
        return f"config payload too short: {len(data)} bytes"
    size = int.from_bytes(data[4:8], "little")
    if size > MAX_CONFIG_SIZE:
        return f"config size {size} exceeds {MAX_CONFIG_SIZE}"
    if len(data) != CONFIG_HDR_SIZE + size:
        return f"config size field {size} does not match payload of {len(data)} bytes"
    return None


def _decode_config(data: bytes) -> ConfigSpace:
    c = _CONFIG.parse(data)
    return ConfigSpace(int(c.offset), int(c.flags), bytes(c.payload))


def _encode_config(v: ConfigSpace) -> bytes:
    return bytes(
        _CONFIG.build({"offset": v.offset, "size": len(v.payload), "flags": v.flags, "payload": v.payload})
    )


def _config_reply_size_error(data: bytes) -> str | None:
    # a back-end signals a failed GET_CONFIG with an empty payload
    return None if len(data) == 0 else _config_size_error(data)


def _decode_config_reply(data: bytes) -> ConfigSpace | None:
    return None if len(data) == 0 else _decode_config(data)


def _encode_config_reply(v: ConfigSpace | None) -> bytes:
    return b"" if v is None else _encode_config(v)


def _decode_inflight(data: bytes) -> Inflight:
    c = _INFLIGHT.parse(data)
    v = Inflight(int(c.mmap_size), int(c.mmap_offset), int(c.num_queues), int(c.queue_size))
    if v.num_queues > MAX_INFLIGHT_QUEUES:
        raise WireError(f"inflight num_queues {v.num_queues} exceeds {MAX_INFLIGHT_QUEUES}")
    if v.queue_size > MAX_QUEUE_SIZE:
        raise WireError(f"inflight queue_size {v.queue_size} exceeds {MAX_QUEUE_SIZE}")
    if v.mmap_offset + v.mmap_size > U64_MAX + 1:
        raise WireError("inflight mmap_offset + mmap_size overflows")
    return v


def _decode_transfer(data: bytes) -> DeviceStateTransfer:
    c = _TRANSFER.parse(data)
    v = DeviceStateTransfer(int(c.direction), int(c.phase))
    if v.direction not in (TransferDirection.SAVE, TransferDirection.LOAD):
        raise WireError(f"unknown device state transfer direction {v.direction}")
    if v.phase != TransferPhase.STOPPED:
        raise WireError(f"unknown device state transfer phase {v.phase}")
    return v


def _opaque_size_error(data: bytes) -> str | None:
    if len(data) > MAX_OPAQUE_BODY:
        return f"payload of {len(data)} bytes exceeds {MAX_OPAQUE_BODY}"
    return None


def _simple(name: str, layout: Any, cls: type[T]) -> Codec:
    """Codec for a fixed-size Struct whose fields map 1:1 onto a frozen dataclass."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    def dec(data: bytes) -> Any:
        c = layout.parse(data)
        return cls(*(int(c[n]) if isinstance(c[n], int) else bytes(c[n]) for n in names))

    def enc(v: Any) -> bytes:
        return bytes(layout.build(dataclasses.asdict(v)))

    return Codec(name, size=layout.sizeof(), decode=dec, encode=enc, value_type=cls)


EMPTY = Codec("empty", size=0, decode=lambda d: None, encode=lambda v: b"", value_type=None, nullable=True)
U64 = Codec("u64", size=8, decode=lambda d: int(_U64.parse(d)), encode=_u64_in_range, value_type=int)
VRING_STATE = _simple("vring state", _VRING_STATE, VringState)
VRING_ADDR = _simple("vring address", _VRING_ADDR, VringAddr)
VRING_FILE = Codec(
    "vring file", size=8, decode=_decode_vring_file, encode=_encode_vring_file, value_type=VringFile
)
MEMORY_TABLE = Codec(
    "memory table",
    size=None,
    decode=_decode_memory,
    encode=_encode_memory,
    value_type=MemoryTable,
    check_size=_memory_size_error,
)
SINGLE_REGION = Codec(
    "single memory region",
    size=_MEM_REG.sizeof(),
    decode=_decode_mem_reg,
    encode=lambda v: bytes(_MEM_REG.build({"padding": v.padding, "region": _region_dict(v.region)})),
    value_type=SingleRegion,
)
LOG = Codec(
    "log",
    size=_LOG.sizeof(),
    decode=_decode_log,
    encode=lambda v: bytes(_LOG.build(dataclasses.asdict(v))),
    value_type=LogArea,
)
IOTLB = Codec(
    "iotlb",
    size=_IOTLB.sizeof(),
    decode=_decode_iotlb,
    encode=lambda v: bytes(_IOTLB.build(dataclasses.asdict(v))),
    value_type=IotlbMsg,
)
CONFIG = Codec(
    "config",
    size=None,
    decode=_decode_config,
    encode=_encode_config,
    value_type=ConfigSpace,
    check_size=_config_size_error,
)
CONFIG_REPLY = Codec(
    "config reply",
    size=None,
    decode=_decode_config_reply,
    encode=_encode_config_reply,
    value_type=ConfigSpace,
    check_size=_config_reply_size_error,
    nullable=True,
)
VRING_AREA = _simple("vring area", _VRING_AREA, VringArea)
INFLIGHT = Codec(
    "inflight",
    size=_INFLIGHT.sizeof(),
    decode=_decode_inflight,
    encode=lambda v: bytes(_INFLIGHT.build(dataclasses.asdict(v))),
    value_type=Inflight,
)
SHARED_OBJECT = _simple("shared object", _SHARED, SharedObject)
DEVICE_STATE_TRANSFER = Codec(
    "device state transfer",
    size=_TRANSFER.sizeof(),
    decode=_decode_transfer,
    encode=lambda v: bytes(_TRANSFER.build(dataclasses.asdict(v))),
    value_type=DeviceStateTransfer,
)
RARP = _simple("rarp", _RARP, Rarp)
OPAQUE = Codec(
    "opaque",
    size=None,
    decode=lambda d: Opaque(bytes(d)),
    encode=lambda v: bytes(v.data),
    value_type=Opaque,
    check_size=_opaque_size_error,
)


# --- the message table -------------------------------------------------------------------------------------


class ReplyKind(enum.Enum):
    ACK = "ack"  # a u64 status only when NEED_REPLY is set and REPLY_ACK was negotiated
    ALWAYS = "always"  # an explicit reply body, whatever the flags
    LOG_SHMFD = "log_shmfd"  # SET_LOG_BASE: a u64 whenever LOG_SHMFD is negotiated, else like ACK
    POSTCOPY = "postcopy"  # SET_MEM_TABLE/ADD_MEM_REG: the mapped bases after POSTCOPY_LISTEN, else like ACK


class Fd(enum.Enum):
    NONE = "none"
    ONE = "one"
    PER_REGION = "per_region"  # exactly one per memory-table region
    VRING_FILE = "vring_file"  # one unless the NOFD bit is set, then none
    ZERO_OR_ONE = "zero_or_one"
    DEVICE_STATE_REPLY = "device_state_reply"  # reply u64 bit 8 clear <=> one fd


@dataclasses.dataclass(frozen=True)
class MsgSpec:
    request: Codec
    reply: Codec | None  # body of a non-ack reply (ALWAYS / LOG_SHMFD / POSTCOPY)
    reply_kind: ReplyKind = ReplyKind.ACK
    fds: Fd = Fd.NONE
    gate: ProtocolF | None = None  # protocol feature that must be negotiated before the request is legal
    reply_fds: Fd = Fd.NONE
    status_reply: bool = False  # the reply u64 is itself a status (0 ok): `error=` fills it in


_RK = ReplyKind
_P = ProtocolF

SPECS: dict[Req, MsgSpec] = {
    Req.GET_FEATURES: MsgSpec(EMPTY, U64, _RK.ALWAYS),
    Req.SET_FEATURES: MsgSpec(U64, None),
    Req.SET_OWNER: MsgSpec(EMPTY, None),
    Req.RESET_OWNER: MsgSpec(EMPTY, None),
    Req.SET_MEM_TABLE: MsgSpec(MEMORY_TABLE, MEMORY_TABLE, _RK.POSTCOPY, Fd.PER_REGION),
    Req.SET_LOG_BASE: MsgSpec(LOG, U64, _RK.LOG_SHMFD, Fd.ONE, _P.LOG_SHMFD, status_reply=True),
    Req.SET_LOG_FD: MsgSpec(EMPTY, None, fds=Fd.ONE),
    Req.SET_VRING_NUM: MsgSpec(VRING_STATE, None),
    Req.SET_VRING_ADDR: MsgSpec(VRING_ADDR, None),
    Req.SET_VRING_BASE: MsgSpec(VRING_STATE, None),
    Req.GET_VRING_BASE: MsgSpec(VRING_STATE, VRING_STATE, _RK.ALWAYS),
    Req.SET_VRING_KICK: MsgSpec(VRING_FILE, None, fds=Fd.VRING_FILE),
    Req.SET_VRING_CALL: MsgSpec(VRING_FILE, None, fds=Fd.VRING_FILE),
    Req.SET_VRING_ERR: MsgSpec(VRING_FILE, None, fds=Fd.VRING_FILE),
    Req.GET_PROTOCOL_FEATURES: MsgSpec(EMPTY, U64, _RK.ALWAYS),
    Req.SET_PROTOCOL_FEATURES: MsgSpec(U64, None),
    Req.GET_QUEUE_NUM: MsgSpec(EMPTY, U64, _RK.ALWAYS, gate=_P.MQ),
    # not gated: virtio-user in server mode sends SET_VRING_ENABLE 0 on reconnect before any negotiation
    Req.SET_VRING_ENABLE: MsgSpec(VRING_STATE, None),
    Req.SEND_RARP: MsgSpec(RARP, None, gate=_P.RARP),
    Req.NET_SET_MTU: MsgSpec(U64, None, gate=_P.NET_MTU),
    Req.SET_BACKEND_REQ_FD: MsgSpec(EMPTY, None, fds=Fd.ONE, gate=_P.BACKEND_REQ),
    # QEMU always sets NEED_REPLY on IOTLB_MSG and waits for the u64, REPLY_ACK or not
    Req.IOTLB_MSG: MsgSpec(IOTLB, U64, _RK.ALWAYS, status_reply=True),
    Req.SET_VRING_ENDIAN: MsgSpec(VRING_STATE, None, gate=_P.CROSS_ENDIAN),
    Req.GET_CONFIG: MsgSpec(CONFIG, CONFIG_REPLY, _RK.ALWAYS, gate=_P.CONFIG),
    Req.SET_CONFIG: MsgSpec(CONFIG, None, gate=_P.CONFIG),
    Req.CREATE_CRYPTO_SESSION: MsgSpec(OPAQUE, OPAQUE, _RK.ALWAYS, gate=_P.CRYPTO_SESSION),
    Req.CLOSE_CRYPTO_SESSION: MsgSpec(U64, None, gate=_P.CRYPTO_SESSION),
    Req.POSTCOPY_ADVISE: MsgSpec(EMPTY, EMPTY, _RK.ALWAYS, gate=_P.PAGEFAULT, reply_fds=Fd.ONE),
    Req.POSTCOPY_LISTEN: MsgSpec(EMPTY, None, gate=_P.PAGEFAULT),
    Req.POSTCOPY_END: MsgSpec(EMPTY, U64, _RK.ALWAYS, gate=_P.PAGEFAULT, status_reply=True),
    Req.GET_INFLIGHT_FD: MsgSpec(INFLIGHT, INFLIGHT, _RK.ALWAYS, gate=_P.INFLIGHT_SHMFD, reply_fds=Fd.ONE),
    Req.SET_INFLIGHT_FD: MsgSpec(INFLIGHT, None, fds=Fd.ONE, gate=_P.INFLIGHT_SHMFD),
    Req.GPU_SET_SOCKET: MsgSpec(EMPTY, None, fds=Fd.ONE),
    Req.RESET_DEVICE: MsgSpec(EMPTY, None, gate=_P.RESET_DEVICE),
    Req.VRING_KICK: MsgSpec(VRING_STATE, None, gate=_P.INBAND_NOTIFICATIONS),
    Req.GET_MAX_MEM_SLOTS: MsgSpec(EMPTY, U64, _RK.ALWAYS, gate=_P.CONFIGURE_MEM_SLOTS),
    Req.ADD_MEM_REG: MsgSpec(SINGLE_REGION, SINGLE_REGION, _RK.POSTCOPY, Fd.ONE, _P.CONFIGURE_MEM_SLOTS),
    # QEMU attaches the region's fd to REM_MEM_REG; the spec says accept it and close it unused
    Req.REM_MEM_REG: MsgSpec(SINGLE_REGION, None, fds=Fd.ZERO_OR_ONE, gate=_P.CONFIGURE_MEM_SLOTS),
    Req.SET_STATUS: MsgSpec(U64, None, gate=_P.STATUS),
    Req.GET_STATUS: MsgSpec(EMPTY, U64, _RK.ALWAYS, gate=_P.STATUS),
    Req.GET_SHARED_OBJECT: MsgSpec(
        SHARED_OBJECT, U64, _RK.ALWAYS, gate=_P.SHARED_OBJECT, reply_fds=Fd.ZERO_OR_ONE, status_reply=True
    ),
    Req.SET_DEVICE_STATE_FD: MsgSpec(
        DEVICE_STATE_TRANSFER,
        U64,
        _RK.ALWAYS,
        Fd.ONE,
        _P.DEVICE_STATE,
        reply_fds=Fd.DEVICE_STATE_REPLY,
        status_reply=True,
    ),
    Req.CHECK_DEVICE_STATE: MsgSpec(EMPTY, U64, _RK.ALWAYS, gate=_P.DEVICE_STATE, status_reply=True),
}

BACKEND_SPECS: dict[BackendReq, MsgSpec] = {
    BackendReq.IOTLB_MSG: MsgSpec(IOTLB, None),
    BackendReq.CONFIG_CHANGE_MSG: MsgSpec(EMPTY, None, gate=_P.CONFIG),
    BackendReq.VRING_HOST_NOTIFIER_MSG: MsgSpec(VRING_AREA, None, fds=Fd.ZERO_OR_ONE, gate=_P.HOST_NOTIFIER),
    BackendReq.VRING_CALL: MsgSpec(VRING_STATE, None, gate=_P.INBAND_NOTIFICATIONS),
    BackendReq.VRING_ERR: MsgSpec(VRING_STATE, None, gate=_P.INBAND_NOTIFICATIONS),
    BackendReq.SHARED_OBJECT_ADD: MsgSpec(SHARED_OBJECT, None, gate=_P.SHARED_OBJECT),
    BackendReq.SHARED_OBJECT_REMOVE: MsgSpec(SHARED_OBJECT, None, gate=_P.SHARED_OBJECT),
    BackendReq.SHARED_OBJECT_LOOKUP: MsgSpec(
        SHARED_OBJECT, U64, _RK.ALWAYS, gate=_P.SHARED_OBJECT, reply_fds=Fd.ZERO_OR_ONE, status_reply=True
    ),
}

assert set(SPECS) == set(Req), "every request needs a spec"
assert set(BACKEND_SPECS) == set(BackendReq), "every back-end request needs a spec"


# --- helpers -----------------------------------------------------------------------------------------------


def req_name(request: int) -> str:
    """The vhost-user.rst name of a request number, or "UNKNOWN(n)"."""
    try:
        return Req(request).name
    except ValueError:
        return f"UNKNOWN({request})"


def parse_header(data: bytes) -> tuple[int, int, int]:
    """(request, flags, size) of the first HEADER_SIZE bytes."""
    if len(data) < HEADER_SIZE:
        raise WireError(f"header needs {HEADER_SIZE} bytes, got {len(data)}")
    c = HEADER.parse(data[:HEADER_SIZE])
    return int(c.request), int(c.flags), int(c.size)


def build_header(request: int, flags: int, size: int) -> bytes:
    return bytes(HEADER.build({"request": request, "flags": flags, "size": size}))


def reply_codec(req: Req, body: Body) -> Codec:
    """The codec of a reply to `req`: its explicit body, or a u64 ack when `body` is an int and the request's
    reply is not itself a u64 (acks for SET_* requests, and for SET_MEM_TABLE outside postcopy)."""
    spec = SPECS[req]
    if spec.reply is None or (isinstance(body, int) and spec.reply is not U64):
        return U64
    return spec.reply


def encode(
    req: Req | BackendReq, body: Body = None, flags: int = REQUEST_FLAGS, *, reply: bool = False
) -> bytes:
    """One full message. Requests use the request layout; with reply=True the reply layout (see reply_codec)
    and flags default to exactly REPLY_FLAGS when the caller left the request default."""
    if isinstance(req, BackendReq):
        spec = BACKEND_SPECS[req]
        codec = (spec.reply or U64) if reply else spec.request
    else:
        codec = reply_codec(req, body) if reply else SPECS[req].request
    if reply and flags == REQUEST_FLAGS:
        flags = REPLY_FLAGS
    payload = codec.encode(body)
    return build_header(int(req), flags, len(payload)) + payload


def decode_body(req: Req, data: bytes, reply: bool, *, ack: bool = False) -> Body:
    """Decode and validate one payload. `ack` selects the u64 ack layout for a reply that has no explicit
    body (or a postcopy-conditional one that is being used as an ack)."""
    spec = SPECS[req]
    if not reply:
        return spec.request.decode(data)
    return (U64 if (ack or spec.reply is None) else spec.reply).decode(data)


def decode_backend_body(req: BackendReq, data: bytes, reply: bool) -> Body:
    spec = BACKEND_SPECS[req]
    codec = (spec.reply or U64) if reply else spec.request
    return codec.decode(data)
