"""The virtio-net control virtqueue: command formats, decoding for tracing, and the proxy's own CVQ client.

Formats are virtio 1.3 §5.1.6.5: a command is `{u8 class; u8 command; command-specific-data}` in
device-readable buffers followed by one device-writable `u8 ack` (OK 0 / ERR 1). The proxy both sends
commands (QEMU's vhost-user net never forwards the guest's CVQ, so the proxy programs the device itself) and
parses commands a front-end hands over, so every definition here encodes and decodes.

Decoding is strict: a payload must be consumed exactly, and sizes a peer controls (MAC table entries, RSS
table and key lengths) are bounded by the bytes actually present, never trusted for allocation.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import enum
import mmap
import os
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import construct as cs
import trio

from ..log import get_logger
from ..virtio import Status
from ..vring import Buf, RingLayout, SplitRingDriver
from .device import BackendF, DeviceError, Perm, VdpaDevice, program_vq

log = get_logger(__name__)


class CtrlClass(enum.IntEnum):
    RX = 0
    MAC = 1
    VLAN = 2
    ANNOUNCE = 3
    MQ = 4
    GUEST_OFFLOADS = 5
    NOTF_COAL = 6
    STATS = 8


class RxCmd(enum.IntEnum):
    PROMISC = 0
    ALLMULTI = 1
    ALLUNI = 2  # the four below need CTRL_RX_EXTRA
    NOMULTI = 3
    NOUNI = 4
    NOBCAST = 5


class MacCmd(enum.IntEnum):
    TABLE_SET = 0
    ADDR_SET = 1


class VlanCmd(enum.IntEnum):
    ADD = 0
    DEL = 1


class AnnounceCmd(enum.IntEnum):
    ACK = 0


class MqCmd(enum.IntEnum):
    VQ_PAIRS_SET = 0
    RSS_CONFIG = 1
    HASH_CONFIG = 2


class GuestOffloadsCmd(enum.IntEnum):
    SET = 0


class NotfCoalCmd(enum.IntEnum):
    TX_SET = 0
    RX_SET = 1
    VQ_SET = 2
    VQ_GET = 3


class StatsCmd(enum.IntEnum):
    QUERY = 0
    GET = 1


class Ack(enum.IntEnum):
    OK = 0
    ERR = 1


COMMANDS: dict[CtrlClass, type[enum.IntEnum]] = {
    CtrlClass.RX: RxCmd,
    CtrlClass.MAC: MacCmd,
    CtrlClass.VLAN: VlanCmd,
    CtrlClass.ANNOUNCE: AnnounceCmd,
    CtrlClass.MQ: MqCmd,
    CtrlClass.GUEST_OFFLOADS: GuestOffloadsCmd,
    CtrlClass.NOTF_COAL: NotfCoalCmd,
    CtrlClass.STATS: StatsCmd,
}

VQ_PAIRS_MIN = 1
VQ_PAIRS_MAX = 0x8000
VLAN_MAX = 4095

# ------------------------------------------------------------------------------------------------ formats
CtrlHeader = cs.Struct("cls" / cs.Int8ul, "cmd" / cs.Int8ul)
MacAddr = cs.Bytes(6)
# struct virtio_net_ctrl_mac {le32 entries; u8 macs[entries][6]}: PrefixedArray keeps entries == len(macs)
MacTable = cs.PrefixedArray(cs.Int32ul, MacAddr)
Coal = cs.Struct("max_packets" / cs.Int32ul, "max_usecs" / cs.Int32ul)

RssConfig = cs.Struct(
    "hash_types" / cs.Int32ul,
    "indirection_table_mask" / cs.Rebuild(cs.Int16ul, cs.len_(cs.this.indirection_table) - 1),
    "unclassified_queue" / cs.Int16ul,
    "indirection_table" / cs.Array(cs.this.indirection_table_mask + 1, cs.Int16ul),
    "max_tx_vq" / cs.Int16ul,
    "hash_key_data" / cs.Prefixed(cs.Int8ul, cs.GreedyBytes),
)
HashConfig = cs.Struct(
    "hash_types" / cs.Int32ul,
    cs.Padding(8),  # le16 reserved[4]
    "hash_key_data" / cs.Prefixed(cs.Int8ul, cs.GreedyBytes),
)

_EMPTY = cs.Struct()
PAYLOADS: dict[tuple[int, int], cs.Construct] = {
    **{(CtrlClass.RX, c): cs.Struct("on" / cs.Flag) for c in RxCmd},
    (CtrlClass.MAC, MacCmd.TABLE_SET): cs.Struct("unicast" / MacTable, "multicast" / MacTable),
    (CtrlClass.MAC, MacCmd.ADDR_SET): cs.Struct("mac" / MacAddr),
    (CtrlClass.VLAN, VlanCmd.ADD): cs.Struct("vid" / cs.Int16ul),
    (CtrlClass.VLAN, VlanCmd.DEL): cs.Struct("vid" / cs.Int16ul),
    (CtrlClass.ANNOUNCE, AnnounceCmd.ACK): _EMPTY,
    (CtrlClass.MQ, MqCmd.VQ_PAIRS_SET): cs.Struct("pairs" / cs.Int16ul),
    (CtrlClass.MQ, MqCmd.RSS_CONFIG): RssConfig,
    (CtrlClass.MQ, MqCmd.HASH_CONFIG): HashConfig,
    (CtrlClass.GUEST_OFFLOADS, GuestOffloadsCmd.SET): cs.Struct("offloads" / cs.Int64ul),
    (CtrlClass.NOTF_COAL, NotfCoalCmd.TX_SET): Coal,
    (CtrlClass.NOTF_COAL, NotfCoalCmd.RX_SET): Coal,
    # struct virtio_net_ctrl_coal_vq {le16 vq_index; le16 reserved; struct virtio_net_ctrl_coal coal}
    (CtrlClass.NOTF_COAL, NotfCoalCmd.VQ_SET): cs.Struct(
        "vq_index" / cs.Int16ul, cs.Padding(2), "max_packets" / cs.Int32ul, "max_usecs" / cs.Int32ul
    ),
    # the device-written reply of VQ_GET (and of STATS) is not modelled: the proxy never sends them
    (CtrlClass.NOTF_COAL, NotfCoalCmd.VQ_GET): cs.Struct("vq_index" / cs.Int16ul, cs.Padding(2)),
}


class CvqError(Exception):
    """A control-queue operation failed (bad command, device not ready, no answer)."""


class CvqFormatError(CvqError, ValueError):
    """Bytes that are not a well-formed command, or arguments that cannot be encoded."""


class CvqTimeout(CvqError):
    """The device did not complete a command in time; the client refuses further commands."""


class CvqCommandError(CvqError):
    """The device answered VIRTIO_NET_ERR (or an invalid ack) to a command."""

    def __init__(self, command: CtrlCommand, ack: int) -> None:
        super().__init__(f"device refused {command.describe()} (ack {ack})")
        self.command = command
        self.ack = ack


def class_name(cls: int) -> str:
    try:
        return CtrlClass(cls).name
    except ValueError:
        return f"class{cls}"


def command_name(cls: int, cmd: int) -> str:
    try:
        return COMMANDS[CtrlClass(cls)](cmd).name
    except (ValueError, KeyError):
        return f"cmd{cmd}"


def mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(mac: bytes | str) -> bytes:
    if isinstance(mac, str):
        parts = mac.split(":")
        if len(parts) != 6 or not all(len(p) == 2 for p in parts):
            raise CvqFormatError(f"bad MAC address {mac!r}")
        try:
            return bytes(int(p, 16) for p in parts)
        except ValueError as exc:
            raise CvqFormatError(f"bad MAC address {mac!r}") from exc
    if len(mac) != 6:
        raise CvqFormatError(f"a MAC address is 6 bytes, got {len(mac)}")
    return bytes(mac)


def _plain(obj: Any) -> Any:
    """construct Containers/ListContainers to dicts/lists, dropping construct's private keys."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _loggable(key: str, value: Any) -> Any:
    """Arguments as a trace reader wants them: MACs in colon form, keys in hex, offloads in hex."""
    if isinstance(value, bytes):
        return mac_str(value) if len(value) == 6 and key != "hash_key_data" else value.hex()
    if isinstance(value, list):
        return [_loggable(key, v) for v in value]
    if isinstance(value, dict):
        return {k: _loggable(k, v) for k, v in value.items()}
    if key in ("offloads", "hash_types") and isinstance(value, int):
        return hex(value)
    return value


@dataclasses.dataclass(frozen=True)
class CtrlCommand:
    """One control command: class, command, decoded arguments (None when the format is unknown) and the
    raw command-specific bytes."""

    cls: int
    cmd: int
    args: dict[str, Any] | None
    payload: bytes

    @property
    def class_name(self) -> str:
        return class_name(self.cls)

    @property
    def command_name(self) -> str:
        return command_name(self.cls, self.cmd)

    def loggable_args(self) -> dict[str, Any]:
        if self.args is None:
            return {"raw": self.payload.hex()}
        return {k: _loggable(k, v) for k, v in self.args.items()}

    def describe(self) -> str:
        """One line for traces, e.g. `MAC.ADDR_SET mac=02:aa:bb:cc:dd:ee`."""
        head = f"{self.class_name}.{self.command_name}"
        args = self.loggable_args()
        if not args:
            return head
        return head + " " + " ".join(f"{k}={v}" for k, v in args.items())

    def encode(self) -> bytes:
        """Header and payload: everything the device reads, in one buffer."""
        return bytes((self.cls, self.cmd)) + self.payload


def _validate(cls: int, cmd: int, args: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(args)
    if cls == CtrlClass.MAC and cmd == MacCmd.ADDR_SET:
        out["mac"] = parse_mac(out["mac"])
    elif cls == CtrlClass.MAC and cmd == MacCmd.TABLE_SET:
        out["unicast"] = [parse_mac(m) for m in out["unicast"]]
        out["multicast"] = [parse_mac(m) for m in out["multicast"]]
    elif cls == CtrlClass.VLAN and not 0 <= int(out["vid"]) <= VLAN_MAX:
        raise CvqFormatError(f"VLAN id {out['vid']} outside 0..{VLAN_MAX}")
    elif (
        cls == CtrlClass.MQ
        and cmd == MqCmd.VQ_PAIRS_SET
        and not VQ_PAIRS_MIN <= int(out["pairs"]) <= VQ_PAIRS_MAX
    ):
        raise CvqFormatError(f"queue pairs {out['pairs']} outside {VQ_PAIRS_MIN}..{VQ_PAIRS_MAX}")
    elif cls == CtrlClass.MQ and cmd == MqCmd.RSS_CONFIG:
        n = len(out["indirection_table"])
        if n == 0 or n & (n - 1) or n > 0x10000:
            raise CvqFormatError(f"RSS indirection table length {n} is not a power of two <= 65536")
    return out


def encode_payload(cls: int, cmd: int, args: Mapping[str, Any] | None = None) -> bytes:
    """The command-specific bytes of a known command built from its arguments."""
    fmt = PAYLOADS.get((cls, cmd))
    if fmt is None:
        raise CvqFormatError(f"no format for {class_name(cls)}.{command_name(cls, cmd)}")
    try:
        return bytes(fmt.build(_validate(cls, cmd, args or {})))
    except (cs.ConstructError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, CvqFormatError):
            raise
        raise CvqFormatError(f"cannot encode {class_name(cls)}.{command_name(cls, cmd)}: {exc}") from exc


def make_command(cls: int, cmd: int, args: Mapping[str, Any] | None = None) -> CtrlCommand:
    if not (0 <= cls <= 0xFF and 0 <= cmd <= 0xFF):
        raise CvqFormatError(f"class {cls} / command {cmd} is not a u8")
    payload = encode_payload(cls, cmd, args)
    return CtrlCommand(cls, cmd, decode_payload(cls, cmd, payload), payload)


def decode_payload(cls: int, cmd: int, payload: bytes) -> dict[str, Any] | None:
    """Arguments of a known command (None for an unknown class/command); malformed bytes raise."""
    fmt = PAYLOADS.get((cls, cmd))
    if fmt is None:
        return None
    try:
        parsed = (fmt + cs.Terminated).parse(payload)
    except cs.ConstructError as exc:
        raise CvqFormatError(
            f"malformed {class_name(cls)}.{command_name(cls, cmd)} payload ({len(payload)} bytes): {exc}"
        ) from exc
    args = _plain(parsed)
    if isinstance(args, list):  # fmt + Terminated parses to a list [struct, None]
        args = args[0]
    return dict(args) if args else {}


def decode(data: bytes) -> CtrlCommand:
    """A command from all of its device-readable bytes (header + payload, descriptors concatenated)."""
    if len(data) < CtrlHeader.sizeof():
        raise CvqFormatError(f"control command of {len(data)} bytes has no header")
    hdr = CtrlHeader.parse(data)
    payload = bytes(data[CtrlHeader.sizeof() :])
    return CtrlCommand(hdr.cls, hdr.cmd, decode_payload(hdr.cls, hdr.cmd, payload), payload)


def describe(data: bytes) -> str:
    """Trace text of raw command bytes; never raises, malformed input is described as such."""
    try:
        return decode(data).describe()
    except CvqFormatError as exc:
        return f"<malformed control command: {exc}>"


# ------------------------------------------------------------------------------------------------ client
_PAGE = 4096
OUT_MAX = 2 * _PAGE  # header + payload capacity: a MAC table of ~1360 entries
_ACK_PENDING = 0xFF  # not a valid ack: tells "device never wrote" from ERR
# A command is first waited for by polling the used ring, yielding the CPU, for at most this long (as QEMU's
# vhost-vdpa CVQ polls): a device completes in tens of µs, and two eventfd + event-loop wake-ups would cost more
# than that on a busy CPU (a mode switch sends its MAC on the CPU the data path runs on). Bounded, so a slow device
# holds the event loop no longer than this before the wait becomes an await.
SPIN_S = 200e-6


class CvqClient:
    """The proxy's driver for the device's control queue: one command at a time, trio-awaitable.

    Ring and buffers live in a memfd mapped MAP_SHARED (VA-mode vDPA drivers skip anonymous private memory)
    and are mapped through the IOTLB at `iova` in `asid`. With `asid=None` the client picks ASID 1 when the
    device puts the CVQ in a group of its own and offers IOTLB_ASID (the owner must have acked it), moving
    that group to ASID 1 as QEMU does; otherwise ASID 0, where `iova` must not collide with other maps.

    `setup()` needs the device at FEATURES_OK and before DRIVER_OK (the ring is configured like any other
    vq); commands need DRIVER_OK. `close()` disables the queue, unmaps and frees everything.
    """

    def __init__(
        self,
        device: VdpaDevice,
        *,
        vq_index: int,
        iova: int,
        asid: int | None = None,
        data_vqs: int | None = None,
        ring_num: int = 64,
        timeout: float = 2.0,
    ) -> None:
        self.device = device
        self.vq_index = vq_index
        self.iova = iova
        self.requested_asid = asid
        self.data_vqs = data_vqs if data_vqs is not None else vq_index
        self.requested_ring_num = ring_num
        self.timeout = timeout
        self.asid = 0
        self.ring_num = 0
        self.log = log.bind(device=device.name, vq=vq_index)
        self._lock = trio.Lock()
        self._memfd = -1
        self._mm: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._ring: SplitRingDriver | None = None
        self._size = 0
        self._out_off = 0
        self._ack_off = 0
        self._kick = -1
        self._call = -1
        self._mapped = False
        self._vq_set = False
        self._broken: str | None = None

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> CvqClient:
        self.setup()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def ready(self) -> bool:
        return self._ring is not None and self._broken is None

    def _choose_asid(self) -> int:
        if self.requested_asid is not None:
            return self.requested_asid
        dev = self.device
        try:
            if not dev.get_backend_features() & BackendF.IOTLB_ASID or dev.get_as_num() < 2:
                return 0
            if dev.get_groups_num() < 2:
                return 0
            group = dev.get_vring_group(self.vq_index)
            if any(dev.get_vring_group(i) == group for i in range(self.data_vqs)):
                return 0
        except DeviceError as exc:
            self.log.debug("cvq_asid_probe_failed", error=str(exc))
            return 0
        return 1

    def setup(self) -> None:
        if self._ring is not None:
            return
        dev = self.device
        status = dev.get_status()
        if not status & Status.FEATURES_OK:
            raise CvqError(f"device status {status:#x} is not FEATURES_OK: negotiate features before the CVQ")
        if self.vq_index >= dev.get_vqs_count():
            raise CvqError(f"CVQ index {self.vq_index} but the device has {dev.get_vqs_count()} vqs")
        if status & Status.DRIVER_OK:
            self.log.warning("cvq_setup_after_driver_ok", status=hex(status))
        self.ring_num = min(self.requested_ring_num, dev.get_vring_num_max())
        layout = RingLayout.for_num(self.ring_num)
        self._out_off = layout.size
        self._ack_off = layout.size + OUT_MAX
        self._size = layout.size + OUT_MAX + _PAGE
        if not dev.get_iova_range().contains(self.iova, self._size):
            raise CvqError(f"CVQ area [{self.iova:#x}, +{self._size:#x}) outside the device IOVA range")
        try:
            self._memfd = os.memfd_create("vduproxy-cvq", os.MFD_CLOEXEC)
            os.ftruncate(self._memfd, self._size)
            self._mm = mmap.mmap(self._memfd, self._size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            anchor = ctypes.c_char.from_buffer(self._mm)
            uaddr = ctypes.addressof(anchor)
            del anchor  # the address stays valid while mapped; the export would block mmap.close()
            self._view = memoryview(self._mm)
            ring = SplitRingDriver(self._view, layout, self.iova)
            self.asid = self._choose_asid()
            if self.asid != 0:
                dev.set_group_asid(dev.get_vring_group(self.vq_index), self.asid)
            with dev.iotlb_batch():
                dev.iotlb_update(self.iova, self._size, uaddr, Perm.RW, asid=self.asid)
            self._mapped = True
            self._kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._program_vq(ring)
        except BaseException:
            self.close()
            raise
        self._ring = ring
        self._broken = None
        self.log.info(
            "cvq_setup", iova=hex(self.iova), size=self._size, asid=self.asid, ring_num=self.ring_num
        )

    def rearm(self) -> None:
        """After a device reset that kept the IOTLB (IOTLB_PERSIST acked): the same memory and map, a fresh ring.

        Cheaper than close() + setup(), which a mode switch would otherwise pay for a map that never moved."""
        if self._ring is None or self._view is None or not self._mapped:
            raise CvqError("rearm needs a CVQ that was set up")
        dev = self.device
        status = dev.get_status()
        if not status & Status.FEATURES_OK:
            raise CvqError(f"device status {status:#x} is not FEATURES_OK: negotiate features before the CVQ")
        layout = RingLayout.for_num(self.ring_num)
        self._view[: layout.size] = bytes(layout.size)
        ring = SplitRingDriver(self._view, layout, self.iova)
        for fd in (self._kick, self._call):
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(fd)  # a count left from before the reset would look like a completion
        try:
            if self.asid != 0:
                dev.set_group_asid(dev.get_vring_group(self.vq_index), self.asid)
            self._program_vq(ring)
        except BaseException:
            self.close()
            raise
        self._ring = ring
        self._broken = None
        self.log.debug("cvq_rearmed", iova=hex(self.iova), asid=self.asid)

    def _program_vq(self, ring: SplitRingDriver) -> None:
        self._vq_set = True
        program_vq(
            self.device, self.vq_index, num=self.ring_num, desc=ring.desc_addr, avail=ring.avail_addr,
            used=ring.used_addr, base=0, kick=self._kick, call=self._call,
        )  # fmt: skip

    def close(self) -> None:
        """Undo setup. Device errors are logged, not raised: the device may have been reset already."""
        dev = self.device
        if self._vq_set:
            steps: list[tuple[str, Callable[[], None]]] = [
                ("set_vring_enable", lambda: dev.set_vring_enable(self.vq_index, False)),
                ("set_vring_kick", lambda: dev.set_vring_kick(self.vq_index, -1)),
                ("set_vring_call", lambda: dev.set_vring_call(self.vq_index, -1)),
            ]
            for name, step in steps:
                try:
                    step()
                except DeviceError as exc:
                    self.log.debug("cvq_close_step_failed", step=name, error=str(exc))
            self._vq_set = False
        if self._mapped:
            try:
                dev.iotlb_invalidate(self.iova, self._size, asid=self.asid)
            except DeviceError as exc:
                # a reset without IOTLB_PERSIST already dropped the map
                self.log.debug("cvq_unmap_failed", error=str(exc))
            self._mapped = False
        for name in ("_kick", "_call", "_memfd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        self._ring = None
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    # ---------------------------------------------------------------- commands
    async def command(self, cls: int, cmd: int, payload: bytes | Mapping[str, Any] = b"") -> Ack:
        """Send one command and return the device's ack; ERR raises CvqCommandError."""
        if isinstance(payload, Mapping):
            command = make_command(cls, cmd, payload)
        else:
            try:
                args = decode_payload(cls, cmd, bytes(payload))
            except CvqFormatError:
                args = None  # sent as given: the device is the judge of raw payloads
            command = CtrlCommand(cls, cmd, args, bytes(payload))
        async with self._lock:
            return await self._send(command)

    async def _send(self, command: CtrlCommand) -> Ack:
        ring, view = self._ring, self._view
        if ring is None or view is None:
            raise CvqError("CVQ client is not set up")
        if self._broken is not None:
            raise CvqError(f"CVQ unusable: {self._broken}")
        data = command.encode()
        if len(data) > OUT_MAX:
            raise CvqFormatError(f"command of {len(data)} bytes exceeds the {OUT_MAX}-byte buffer")
        status = self.device.get_status()
        if not status & Status.DRIVER_OK:
            raise CvqError(f"device status {status:#x} is not DRIVER_OK")
        view[self._out_off : self._out_off + len(data)] = data
        view[self._ack_off] = _ACK_PENDING
        start = time.monotonic()
        ring.add_and_publish(
            [Buf(self.iova + self._out_off, len(data)), Buf(self.iova + self._ack_off, 1, writable=True)],
            token=command,
        )
        os.eventfd_write(self._kick, 1)
        done = await self._wait_used(ring)
        latency_us = int((time.monotonic() - start) * 1e6)
        fields = {
            "cls": command.class_name,
            "cmd": command.command_name,
            "args": command.loggable_args(),
            "latency_us": latency_us,
        }
        if not done:
            self._broken = f"{command.describe()} not completed within {self.timeout} s"
            self.log.warning("cvq_command", ack="timeout", **fields)
            raise CvqTimeout(self._broken)
        ack = view[self._ack_off]
        self.log.info("cvq_command", ack="ok" if ack == Ack.OK else "err", **fields)
        if ack != Ack.OK:
            raise CvqCommandError(command, ack)
        return Ack.OK

    def _poll_used(self, ring: SplitRingDriver) -> bool:
        try:
            return bool(ring.poll_used())
        except RuntimeError as exc:
            self._broken = f"device corrupted the used ring: {exc}"
            raise CvqError(self._broken) from exc

    async def _wait_used(self, ring: SplitRingDriver) -> bool:
        """Wait for our one chain: polled for up to SPIN_S, then woken by the call eventfd, re-checking the used
        ring every few ms in case the device completes without signalling."""
        deadline = time.perf_counter() + SPIN_S
        while time.perf_counter() < deadline:
            if self._poll_used(ring):
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._call)  # the call it may have sent: not a wake-up for the next command
                return True
            os.sched_yield()  # the device's thread may share this CPU
        with trio.move_on_after(self.timeout):
            while True:
                if self._poll_used(ring):
                    return True
                with trio.move_on_after(0.005):
                    await trio.lowlevel.wait_readable(self._call)
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._call)
        return False

    # ---------------------------------------------------------------- typed helpers
    async def rx_mode(self, mode: RxCmd, on: bool) -> None:
        await self.command(CtrlClass.RX, mode, {"on": on})

    async def promisc(self, on: bool) -> None:
        await self.rx_mode(RxCmd.PROMISC, on)

    async def allmulti(self, on: bool) -> None:
        await self.rx_mode(RxCmd.ALLMULTI, on)

    async def mac_addr_set(self, mac: bytes | str) -> None:
        await self.command(CtrlClass.MAC, MacCmd.ADDR_SET, {"mac": parse_mac(mac)})

    async def mac_table_set(self, unicast: list[bytes | str], multicast: list[bytes | str]) -> None:
        await self.command(CtrlClass.MAC, MacCmd.TABLE_SET, {"unicast": unicast, "multicast": multicast})

    async def vlan_add(self, vid: int) -> None:
        await self.command(CtrlClass.VLAN, VlanCmd.ADD, {"vid": vid})

    async def vlan_del(self, vid: int) -> None:
        await self.command(CtrlClass.VLAN, VlanCmd.DEL, {"vid": vid})

    async def mq_pairs_set(self, pairs: int) -> None:
        await self.command(CtrlClass.MQ, MqCmd.VQ_PAIRS_SET, {"pairs": pairs})

    async def guest_offloads_set(self, offloads: int) -> None:
        await self.command(CtrlClass.GUEST_OFFLOADS, GuestOffloadsCmd.SET, {"offloads": offloads})

    async def announce_ack(self) -> None:
        await self.command(CtrlClass.ANNOUNCE, AnnounceCmd.ACK, {})
