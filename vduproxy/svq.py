"""Python face of the shadow virtqueue core (svq_core.c): the only module that imports `vduproxy._svq_core`.

The core moves descriptors guest ring -> shadow ring and used entries shadow -> guest on a native thread and
checks everything a guest or a device controls. This wrapper checks arguments, turns negative errno returns
into `SvqError`, owns the error eventfd and frees the handle (explicitly with `close()`, or when collected).

Addresses: guest ring parts and log positions are GPAs; shadow ring parts, region `local` and the log base are
addresses in this process (`address_of` gives one for a writable buffer). The core keeps its own duplicates of
every fd it is given, so callers may close theirs at any time.
"""

from __future__ import annotations

import dataclasses
import enum
import errno as errno_mod
import os
from collections.abc import Sequence
from typing import Any

from .log import get_logger

try:
    from ._svq_core import ffi, lib
except ImportError as exc:  # pragma: no cover - exercised only on an unbuilt tree
    raise ImportError(
        "vduproxy._svq_core is not built: run `pip install -e .` or "
        "`python -c \"import vduproxy._build_svq as b; b.ffibuilder.compile(tmpdir='build/cffi')\"`"
    ) from exc

log = get_logger(__name__)

ABI_VERSION = 4
if lib.svq_abi_version() != ABI_VERSION:  # pragma: no cover - a stale build
    raise ImportError(f"vduproxy._svq_core ABI {lib.svq_abi_version()} != {ABI_VERSION}: rebuild it")

MAX_VQS: int = lib.SVQ_MAX_VQS
MAX_REGIONS: int = lib.SVQ_MAX_REGIONS
MAX_RING: int = lib.SVQ_MAX_RING
INJECT_SLOT: int = lib.SVQ_INJECT_SLOT  # bytes per injected frame (header included) and per area slot
INJECT_SLOTS: int = lib.SVQ_INJECT_SLOTS  # most injected frames in flight; a larger area is not used beyond
NET_HDR_LEN_DEVICE = 12  # the proxy always negotiates VERSION_1 with the device: virtio_net_hdr_v1
_U16 = 0xFFFF
_U64 = (1 << 64) - 1


class GuestFlags(enum.IntFlag):
    """What the guest negotiated for one vq (svq_attach_guest flags)."""

    EVENT_IDX = lib.SVQ_F_EVENT_IDX
    INDIRECT = lib.SVQ_F_INDIRECT
    MRG_RXBUF = lib.SVQ_F_MRG_RXBUF
    RX = lib.SVQ_F_RX
    LOG = lib.SVQ_F_LOG
    NET_HDR_12 = lib.SVQ_F_NET_HDR_12  # the guest's virtio-net header is 12 bytes (VERSION_1 or MRG_RXBUF)
    LEARN_MAC = lib.SVQ_F_LEARN_MAC  # a net TX queue: learn the source MAC of the guest's frames


class DevFlags(enum.IntFlag):
    """What the device negotiated (svq_attach_shadow dev_flags)."""

    EVENT_IDX = lib.SVQ_DEV_EVENT_IDX
    INDIRECT = lib.SVQ_DEV_INDIRECT
    # The device's MRG_RXBUF when it differs from the guest's (neither: the same, num_buffers passes through).
    MRG_RXBUF = lib.SVQ_DEV_MRG_RXBUF
    NO_MRG_RXBUF = lib.SVQ_DEV_NO_MRG_RXBUF


class SvqError(Exception):
    """A core call failed. `errno` is the positive errno; `reason` the core's explanation when it has one."""

    def __init__(self, op: str, err: int, reason: str = "") -> None:
        name = errno_mod.errorcode.get(err, str(err))
        super().__init__(f"{op}: {name}" + (f": {reason}" if reason else ""))
        self.op = op
        self.errno = err
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Region:
    """One guest memory region: GPA range, where this process mapped it, where the device sees it."""

    gpa: int
    size: int
    local: int
    iova: int


@dataclasses.dataclass(frozen=True)
class SvqStats:
    packets: int
    bytes: int
    guest_kicks: int
    guest_calls: int
    device_kicks: int
    device_calls: int
    batches: int
    faults: int
    dirty_pages: int
    clamped: int
    injected: int  # proxy frames the device completed
    mac_changes: int  # times the learned source MAC was set or changed
    broken: bool
    guest_attached: bool
    shadow_attached: bool


@dataclasses.dataclass(frozen=True)
class ThreadStats:
    sleeps: int  # blocking epoll_waits (notifications armed)
    polls: int  # busy-poll periods started
    yields: int  # idle rounds spent polling


@dataclasses.dataclass(frozen=True)
class VqState:
    guest_last_avail: int
    guest_used: int
    shadow_avail: int
    shadow_used: int
    inflight: int
    guest_attached: bool
    shadow_attached: bool


def address_of(buf: Any) -> int:
    """Address of a writable buffer (mmap, bytearray); valid while the buffer stays alive and unresized."""
    return int(ffi.cast("uintptr_t", ffi.from_buffer(buf, require_writable=True)))


def _u(name: str, value: int, bits: int) -> int:
    if not isinstance(value, int) or value < 0 or value >> bits:
        raise ValueError(f"{name}={value!r} is not a {bits}-bit unsigned integer")
    return value


def _fd(name: str, fd: int) -> int:
    if not isinstance(fd, int) or fd < -1:
        raise ValueError(f"{name}={fd!r} is not an fd or -1")
    return fd


class Svq:
    """One shadow-virtqueue handle serving `nvqs` vqs of one device (net: RX 2i, TX 2i+1)."""

    def __init__(self, nvqs: int) -> None:
        if not 1 <= nvqs <= MAX_VQS:
            raise ValueError(f"nvqs={nvqs} outside 1..{MAX_VQS}")
        self.nvqs = nvqs
        self._error_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        raw = lib.svq_new(nvqs, self._error_fd)
        if raw == ffi.NULL:
            err = ffi.errno
            os.close(self._error_fd)
            raise SvqError("svq_new", err)
        self._h: Any = ffi.gc(raw, lib.svq_free)

    # ---- lifetime ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the thread, free the core (its fd duplicates with it) and close the error fd. Idempotent."""
        if self._h is None:
            return
        h, self._h = self._h, None
        ffi.release(h)  # runs svq_free now: stops and joins the thread
        os.close(self._error_fd)
        self._error_fd = -1

    def __enter__(self) -> Svq:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def error_fd(self) -> int:
        """Eventfd the core signals when a vq breaks; read it with `take_error_events()`."""
        return self._error_fd

    def take_error_events(self) -> int:
        """Clear the error eventfd; returns how many faults were signalled since the last call."""
        try:
            return int.from_bytes(os.read(self._error_fd, 8), "little")
        except BlockingIOError:
            return 0

    # ---- plumbing ------------------------------------------------------------------------------------------
    def _handle(self) -> Any:
        if self._h is None:
            raise SvqError("svq", errno_mod.EBADF, "handle is closed")
        return self._h

    def _vq(self, vq: int) -> int:
        if not isinstance(vq, int) or not 0 <= vq < self.nvqs:
            raise ValueError(f"vq={vq!r} outside 0..{self.nvqs - 1}")
        return vq

    def _check(self, op: str, rc: int, vq: int | None = None) -> int:
        if rc >= 0:
            return rc
        reason = self._reason(vq) if vq is not None else ""
        log.debug("svq_call_failed", op=op, vq=vq, errno=-rc, reason=reason)
        raise SvqError(op, -rc, reason)

    def _reason(self, vq: int) -> str:
        buf = ffi.new("char[]", lib.SVQ_REASON_LEN)
        n = lib.svq_vq_error(self._handle(), vq, buf, lib.SVQ_REASON_LEN)
        return ffi.string(buf).decode(errors="replace") if n > 0 else ""

    # ---- configuration -------------------------------------------------------------------------------------
    def set_regions(self, regions: Sequence[Region]) -> None:
        """Replace the guest memory table. Attached rings are re-resolved; one that no longer fits breaks.
        Old mappings may be unmapped once this returns."""
        if len(regions) > MAX_REGIONS:
            raise ValueError(f"{len(regions)} regions > {MAX_REGIONS}")
        arr = ffi.new("struct svq_region[]", max(len(regions), 1))
        for i, r in enumerate(regions):
            arr[i].gpa = _u("gpa", r.gpa, 64)
            arr[i].size = _u("size", r.size, 64)
            arr[i].local = _u("local", r.local, 64)
            arr[i].iova = _u("iova", r.iova, 64)
        self._check("svq_set_regions", lib.svq_set_regions(self._handle(), arr, len(regions)))

    def attach_guest(
        self,
        vq: int,
        *,
        num: int,
        desc: int,
        avail: int,
        used: int,
        last_avail: int,
        kick_fd: int,
        call_fd: int,
        flags: GuestFlags | int = 0,
        log_used: int = 0,
    ) -> None:
        """Attach the guest's ring (GPAs). With GuestFlags.LOG, `log_used` is the used ring's log address."""
        rc = lib.svq_attach_guest(
            self._handle(), self._vq(vq), _u("num", num, 32), _u("desc", desc, 64), _u("avail", avail, 64),
            _u("used", used, 64), _u("last_avail", last_avail, 16), _fd("kick_fd", kick_fd),
            _fd("call_fd", call_fd), int(flags), _u("log_used", log_used, 64),
        )  # fmt: skip
        self._check("svq_attach_guest", rc, vq)

    def attach_shadow(
        self,
        vq: int,
        *,
        num: int,
        desc: int,
        avail: int,
        used: int,
        base: int,
        kick_fd: int,
        call_fd: int,
        flags: DevFlags | int = 0,
    ) -> None:
        """Attach a shadow ring at local addresses; it is reset to start at `base` (the device's base)."""
        rc = lib.svq_attach_shadow(
            self._handle(), self._vq(vq), _u("num", num, 32), ffi.cast("void *", _u("desc", desc, 64)),
            ffi.cast("void *", _u("avail", avail, 64)), ffi.cast("void *", _u("used", used, 64)),
            _u("base", base, 16), _fd("kick_fd", kick_fd), _fd("call_fd", call_fd), int(flags),
        )  # fmt: skip
        self._check("svq_attach_shadow", rc, vq)

    def detach(self, vq: int) -> None:
        """Forget both rings of a vq (without draining) and clear its broken state."""
        self._check("svq_detach", lib.svq_detach(self._handle(), self._vq(vq)), vq)

    def set_log(self, base: int, size: int) -> None:
        """Use the dirty log at local address `base` (`size` bytes, one bit per 4 KiB page)."""
        if (base == 0) != (size == 0):
            raise ValueError("log base and size must both be set or both be 0")
        self._check(
            "svq_set_log",
            lib.svq_set_log(self._handle(), ffi.cast("void *", _u("base", base, 64)), _u("size", size, 64)),
        )

    def clear_log(self) -> None:
        self.set_log(0, 0)

    def set_vq_log(self, vq: int, on: bool, log_used: int = 0) -> None:
        self._check(
            "svq_set_vq_log",
            lib.svq_set_vq_log(self._handle(), self._vq(vq), int(on), _u("log_used", log_used, 64)),
            vq,
        )

    def set_guest_call(self, vq: int, call_fd: int) -> None:
        """Signal the guest through `call_fd` (dup'ed) from now on; it is signalled once right away."""
        rc = lib.svq_set_guest_call(self._handle(), self._vq(vq), _fd("call_fd", call_fd))
        self._check("svq_set_guest_call", rc, vq)

    def set_busy_poll(self, usec: int) -> None:
        self._check("svq_set_busy_poll", lib.svq_set_busy_poll(self._handle(), _u("usec", usec, 32)))

    def set_inject_area(self, local: int, iova: int, size: int) -> None:
        """Proxy memory the device can read (`local` here, `iova` for the device) for injected frames, at least
        INJECT_SLOT bytes; refused (EBUSY) while an injected frame is in flight. (0, 0, 0) removes it."""
        rc = lib.svq_set_inject_area(
            self._handle(), ffi.cast("void *", _u("local", local, 64)), _u("iova", iova, 64), _u("size", size, 64)
        )
        self._check("svq_set_inject_area", rc)

    def inject_tx(self, vq: int, frame: bytes, *, hdr_len: int = NET_HDR_LEN_DEVICE) -> None:
        """Send a proxy-owned Ethernet frame (a RARP) on TX vq `vq`, behind a zeroed virtio-net header of
        `hdr_len` bytes. Its completion never reaches the guest. EAGAIN: the shadow ring is full right now."""
        if hdr_len not in (10, 12):
            raise ValueError(f"hdr_len={hdr_len!r} is not a virtio-net header length (10 or 12)")
        data = bytes(hdr_len) + bytes(frame)
        if not frame or len(data) > INJECT_SLOT:
            raise ValueError(f"frame of {len(frame)} bytes does not fit an inject slot of {INJECT_SLOT}")
        rc = lib.svq_inject_tx(self._handle(), self._vq(vq), data, len(data))
        self._check("svq_inject_tx", rc, vq)

    def learned_mac(self, vq: int) -> bytes | None:
        """The latest unicast source MAC seen on a GuestFlags.LEARN_MAC vq (sampled: every frame until one is
        known, then every SVQ_MAC_SAMPLE-th), or None before the first."""
        out = ffi.new("uint8_t[6]")
        have = self._check("svq_get_learned_mac", lib.svq_get_learned_mac(self._handle(), self._vq(vq), out))
        return bytes(ffi.buffer(out, 6)) if have else None

    # ---- running -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._check("svq_start", lib.svq_start(self._handle()))

    def stop(self) -> None:
        self._check("svq_stop", lib.svq_stop(self._handle()))

    @property
    def running(self) -> bool:
        return bool(self._check("svq_running", lib.svq_running(self._handle())))

    def poll(self) -> int:
        """One processing round in the calling thread (thread stopped); returns the entries moved."""
        return self._check("svq_poll", lib.svq_poll(self._handle()))

    def drain(self, vq: int, device_last_avail: int) -> int:
        """With the thread stopped and the device suspended: finish the vq and return the guest base for
        GET_VRING_BASE. The vq is detached afterwards; nothing touches guest memory for it again."""
        out = ffi.new("uint16_t *")
        rc = lib.svq_drain_vq(self._handle(), self._vq(vq), _u("device_last_avail", device_last_avail, 16), out)
        self._check("svq_drain_vq", rc, vq)
        return int(out[0])

    # ---- observation ---------------------------------------------------------------------------------------
    def stats(self, vq: int) -> SvqStats:
        st = ffi.new("struct svq_stats *")
        self._check("svq_get_stats", lib.svq_get_stats(self._handle(), self._vq(vq), st))
        return SvqStats(
            packets=st.packets, bytes=st.bytes, guest_kicks=st.guest_kicks, guest_calls=st.guest_calls,
            device_kicks=st.dev_kicks, device_calls=st.dev_calls, batches=st.batches, faults=st.faults,
            dirty_pages=st.dirty_pages, clamped=st.clamped, injected=st.injected, mac_changes=st.mac_changes,
            broken=bool(st.broken),
            guest_attached=bool(st.attached & 1), shadow_attached=bool(st.attached & 2),
        )  # fmt: skip

    def thread_stats(self) -> ThreadStats:
        st = ffi.new("struct svq_thread_stats *")
        self._check("svq_get_thread_stats", lib.svq_get_thread_stats(self._handle(), st))
        return ThreadStats(sleeps=st.sleeps, polls=st.polls, yields=st.yields)

    def state(self, vq: int) -> VqState:
        s = ffi.new("struct svq_vq_state *")
        self._check("svq_get_vq_state", lib.svq_get_vq_state(self._handle(), self._vq(vq), s))
        return VqState(
            guest_last_avail=s.guest_last_avail, guest_used=s.guest_used, shadow_avail=s.shadow_avail,
            shadow_used=s.shadow_used, inflight=s.inflight, guest_attached=bool(s.attached & 1),
            shadow_attached=bool(s.attached & 2),
        )  # fmt: skip

    def error(self, vq: int) -> str | None:
        """Why the vq is broken (or why its last attach failed); None when there is nothing to report."""
        return self._reason(self._vq(vq)) or None

    def broken(self) -> list[int]:
        """Indices of broken vqs."""
        return [vq for vq in range(self.nvqs) if self.stats(vq).broken]
