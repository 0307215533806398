"""Guest memory as the front-end describes it (SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG).

Three address spaces stay explicit here and are never mixed:
- GPA: guest physical address, what descriptors and the dirty log speak.
- UVA: the *front-end's* virtual address (QEMU's `userspace_addr`); SET_VRING_ADDR carries these.
- local: where this process mapped the region; what the C data path and the vDPA IOTLB (`uaddr`) get.
IOVA is the device's business and lives elsewhere.

Ownership of fds: every fd handed in (in a `RegionSpec` or to `remove_region`) belongs to the map from the
call on, on every path (the one exception: an fd number the map already owns, which must be a caller bug).
A mapped region keeps its fd until it is unmapped, as DPDK does, so `Region.fd` stays usable (to hand the
memory to another process or device). Python's `mmap` also holds a private duplicate, so a mapped region
costs two fds; `close()` or a failed build brings the process back to its fd count before the call.

Mapping follows libvhost-user (`vu_set_mem_table_exec`) and DPDK (`vhost_user_mmap_region`): `mmap_offset` is
where the region starts inside the fd, which need not be aligned to the page (or huge page) size mmap wants.
We map from the offset rounded down to the fd's page size and add the remainder, which maps the same bytes
as their "map from 0 and add the offset" but without reserving address space for everything before it.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import dataclasses
import itertools
import mmap
import os
import stat
from collections.abc import Sequence
from types import TracebackType

from .log import get_logger

log = get_logger(__name__)

VHOST_MEMORY_BASELINE_NREGIONS = (
    8  # SET_MEM_TABLE's fixed array; also QEMU's limit without CONFIGURE_MEM_SLOTS
)
MAX_MEM_SLOTS = 509  # what libvhost-user and DPDK answer to GET_MAX_MEM_SLOTS (KVM's slot count minus a few)

_U64_END = 1 << 64
_MAX_PAGE = 1 << 30  # largest huge page we honour as an mmap alignment


class MemoryTableError(Exception):
    """A memory table (or a region added/removed from it) was rejected before anything was mapped in."""

    def __init__(self, reason: str, *, index: int | None = None) -> None:
        where = f"region {index}: " if index is not None else ""
        super().__init__(where + reason)
        self.reason = reason
        self.index = index


class MemoryAccessError(Exception):
    """An address range is not fully inside one mapped region."""

    def __init__(self, addr: int, size: int, reason: str) -> None:
        super().__init__(f"{reason}: [{addr:#x}, +{size:#x})")
        self.addr = addr
        self.size = size
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class RegionSpec:
    """One region as the front-end sent it (vhost_user_memory_region + its fd)."""

    gpa: int
    size: int
    uva: int
    mmap_offset: int
    fd: int


@dataclasses.dataclass(frozen=True)
class Region:
    """A mapped region. `local_addr` is valid until the map is closed or the region removed."""

    gpa: int
    size: int
    uva: int
    mmap_offset: int
    local_addr: int
    fd: int  # the fd received for it, owned by the map; valid while mapped

    @property
    def gpa_end(self) -> int:
        return self.gpa + self.size

    @property
    def uva_end(self) -> int:
        return self.uva + self.size


class _Mapping:
    """One mmap and where the region starts inside it."""

    __slots__ = ("delta", "mm", "region")

    def __init__(self, region: Region, mm: mmap.mmap, delta: int) -> None:
        self.region = region
        self.mm = mm
        self.delta = delta

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:
            # Someone still holds a view: unmapping now would turn it into a dangling pointer. Dropping our
            # reference lets the mapping (and mmap's own fd) go when the last view does.
            log.warning("region still has views; unmapped when they are released", gpa=self.region.gpa)
        _close_fd(self.region.fd)


def _close_fd(fd: int) -> None:
    # EBADF only: an fd that was never valid has been reported by validation already
    with contextlib.suppress(OSError):
        os.close(fd)


def _check_ints(spec: RegionSpec, index: int | None) -> None:
    for name in ("gpa", "size", "uva", "mmap_offset"):
        v = getattr(spec, name)
        if not isinstance(v, int) or v < 0 or v >= _U64_END:
            raise MemoryTableError(f"{name} {v!r} is not a u64", index=index)
    if spec.size == 0:
        raise MemoryTableError("size is 0", index=index)
    for name, start in (("gpa", spec.gpa), ("uva", spec.uva), ("mmap_offset", spec.mmap_offset)):
        if start + spec.size > _U64_END:
            raise MemoryTableError(f"{name} {start:#x} + size {spec.size:#x} overflows 64 bits", index=index)


def _check_fd(spec: RegionSpec, index: int | None) -> int:
    """fstat the fd; returns the alignment to map it with. A region past the end of its file would map fine
    and then SIGBUS on first touch, so that is rejected here."""
    if not isinstance(spec.fd, int) or spec.fd < 0:
        raise MemoryTableError(f"fd {spec.fd!r} is not a file descriptor", index=index)
    try:
        st = os.fstat(spec.fd)
    except OSError as e:
        raise MemoryTableError(f"fstat(fd {spec.fd}): {e.strerror}", index=index) from None
    if not stat.S_ISREG(st.st_mode):
        raise MemoryTableError(f"fd {spec.fd} is not a regular file or memfd", index=index)
    if spec.mmap_offset + spec.size > st.st_size:
        raise MemoryTableError(
            f"mmap_offset {spec.mmap_offset:#x} + size {spec.size:#x} exceeds the fd's size {st.st_size:#x}",
            index=index,
        )
    blk = st.st_blksize
    # hugetlbfs reports its page size here and refuses offsets not aligned to it
    if mmap.PAGESIZE < blk <= _MAX_PAGE and blk & (blk - 1) == 0:
        return int(blk)
    return mmap.PAGESIZE


def _overlap(a_start: int, a_size: int, b_start: int, b_size: int) -> bool:
    return a_start < b_start + b_size and b_start < a_start + a_size


def _map(spec: RegionSpec, align: int, index: int | None) -> _Mapping:
    map_off = spec.mmap_offset & ~(align - 1)
    delta = spec.mmap_offset - map_off
    try:
        mm = mmap.mmap(
            spec.fd,
            delta + spec.size,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=map_off,
        )
    except (OSError, ValueError, OverflowError) as e:
        raise MemoryTableError(f"mmap failed: {e}", index=index) from None
    # The address is taken through a temporary ctypes object; it must not outlive this line, or the mmap
    # could never be closed (it would count as exported).
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    region = Region(spec.gpa, spec.size, spec.uva, spec.mmap_offset, base + delta, spec.fd)
    return _Mapping(region, mm, delta)


class MemoryMap:
    """The back-end's view of guest memory: an immutable-shaped set of mapped regions.

    Build a new table with `MemoryMap.build` while the old one keeps serving, then swap and close the old one.
    """

    def __init__(self, *, max_regions: int = VHOST_MEMORY_BASELINE_NREGIONS) -> None:
        if not 1 <= max_regions <= MAX_MEM_SLOTS:
            raise ValueError(f"max_regions {max_regions} not in 1..{MAX_MEM_SLOTS}")
        self._max = max_regions
        self._by_gpa: list[_Mapping] = []
        self._gpa_starts: list[int] = []
        self._by_uva: list[_Mapping] = []
        self._uva_starts: list[int] = []
        self._closed = False

    # construction -------------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls, specs: Sequence[RegionSpec], *, max_regions: int = VHOST_MEMORY_BASELINE_NREGIONS
    ) -> MemoryMap:
        """Validate every region, then map them all. Takes ownership of every spec's fd whatever happens."""
        new = cls(max_regions=max_regions)
        try:
            if len(specs) > max_regions:
                raise MemoryTableError(f"{len(specs)} regions, at most {max_regions} allowed")
            aligns = []
            for i, spec in enumerate(specs):
                _check_ints(spec, i)
                aligns.append(_check_fd(spec, i))
            new._check_no_overlap(specs)
            seen: set[int] = set()
            for i, spec in enumerate(specs):
                if spec.fd in seen:
                    raise MemoryTableError(f"fd {spec.fd} given for two regions", index=i)
                seen.add(spec.fd)
            for i, spec in enumerate(specs):
                new._insert(_map(spec, aligns[i], i))
        except BaseException:
            mapped = len(new._by_gpa)  # specs are mapped in order, and each mapping closes its own fd
            new.close()
            for fd in {s.fd for s in specs[mapped:] if isinstance(s.fd, int) and s.fd >= 0}:
                _close_fd(fd)
            raise
        log.info(
            "memory table mapped",
            regions=len(specs),
            total=sum(s.size for s in specs),
            table=[f"gpa={s.gpa:#x} size={s.size:#x} uva={s.uva:#x} off={s.mmap_offset:#x}" for s in specs],
        )
        return new

    def add_region(self, spec: RegionSpec) -> Region:
        """ADD_MEM_REG: map one more region. Takes ownership of `spec.fd` whatever happens."""
        if any(m.region.fd == spec.fd for m in self._by_gpa):
            # closing it would pull the fd from under a live region
            raise MemoryTableError(f"fd {spec.fd} already belongs to a mapped region")
        try:
            self._check_open()
            if len(self._by_gpa) >= self._max:
                raise MemoryTableError(f"all {self._max} memory slots are in use")
            _check_ints(spec, None)
            align = _check_fd(spec, None)
            self._check_no_overlap([spec])
            mapping = _map(spec, align, None)
        except BaseException:
            if isinstance(spec.fd, int) and spec.fd >= 0:
                _close_fd(spec.fd)
            raise
        self._insert(mapping)
        log.info("memory region added", gpa=spec.gpa, size=spec.size, uva=spec.uva, regions=len(self._by_gpa))
        return mapping.region

    def remove_region(self, gpa: int, size: int, uva: int, fd: int | None = None) -> Region:
        """REM_MEM_REG: unmap the region matching the body QEMU sends (gpa, size and uva must all match, as in
        libvhost-user). QEMU attaches the region's fd to this message too; pass it so it is closed on every
        path. Returns the removed region (its addresses are no longer valid)."""
        try:
            self._check_open()
            for m in self._by_gpa:
                r = m.region
                if r.gpa == gpa and r.size == size and r.uva == uva:
                    break
            else:
                raise MemoryTableError(f"no region gpa={gpa:#x} size={size:#x} uva={uva:#x} to remove")
            self._by_gpa.remove(m)
            self._by_uva.remove(m)
            self._reindex()
            m.close()
        finally:
            if fd is not None and fd >= 0:
                _close_fd(fd)
        log.info("memory region removed", gpa=gpa, size=size, uva=uva, regions=len(self._by_gpa))
        return r

    def close(self) -> None:
        """Unmap everything. Idempotent."""
        for m in self._by_gpa:
            m.close()
        self._by_gpa.clear()
        self._by_uva.clear()
        self._reindex()
        self._closed = True

    def __enter__(self) -> MemoryMap:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # queries ------------------------------------------------------------------------------------------------

    @property
    def max_slots(self) -> int:
        return self._max

    @property
    def regions(self) -> tuple[Region, ...]:
        """Mapped regions in GPA order."""
        return tuple(m.region for m in self._by_gpa)

    def __len__(self) -> int:
        return len(self._by_gpa)

    def gpa_to_local(self, gpa: int, size: int = 1) -> int:
        m = self._find(self._by_gpa, self._gpa_starts, gpa, size, "gpa")
        return m.region.local_addr + (gpa - m.region.gpa)

    def uva_to_gpa(self, uva: int, size: int = 1) -> int:
        m = self._find(self._by_uva, self._uva_starts, uva, size, "uva")
        return m.region.gpa + (uva - m.region.uva)

    def uva_to_local(self, uva: int, size: int = 1) -> int:
        m = self._find(self._by_uva, self._uva_starts, uva, size, "uva")
        return m.region.local_addr + (uva - m.region.uva)

    def view(self, gpa: int, size: int) -> memoryview:
        """A writable view of [gpa, gpa+size). Release it (or drop it) before closing the map."""
        m = self._find(self._by_gpa, self._gpa_starts, gpa, size, "gpa")
        off = m.delta + gpa - m.region.gpa
        return memoryview(m.mm)[off : off + size]

    def read(self, gpa: int, size: int) -> bytes:
        with self.view(gpa, size) as v:
            return bytes(v)

    def write(self, gpa: int, data: bytes) -> None:
        with self.view(gpa, len(data)) as v:
            v[:] = data

    # internals ----------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise MemoryTableError("memory map is closed")

    def _check_no_overlap(self, specs: Sequence[RegionSpec]) -> None:
        """Regions are sorted per space; with no overlap between neighbours there is none at all."""
        single = len(specs) == 1 and len(self._by_gpa) > 0  # ADD_MEM_REG: no index to name
        for space in ("gpa", "uva"):
            items: list[tuple[int, int, int | None]] = [
                (getattr(m.region, space), m.region.size, None) for m in self._by_gpa
            ]
            items += [(getattr(s, space), s.size, None if single else i) for i, s in enumerate(specs)]
            items.sort(key=lambda t: t[0])
            for (a, asz, ai), (b, bsz, bi) in itertools.pairwise(items):
                if _overlap(a, asz, b, bsz):
                    raise MemoryTableError(
                        f"{space} range [{b:#x}, +{bsz:#x}) overlaps [{a:#x}, +{asz:#x})",
                        index=bi if bi is not None else ai,
                    )

    def _insert(self, m: _Mapping) -> None:
        self._by_gpa.append(m)
        self._by_uva.append(m)
        self._reindex()

    def _reindex(self) -> None:
        self._by_gpa.sort(key=lambda m: m.region.gpa)
        self._by_uva.sort(key=lambda m: m.region.uva)
        self._gpa_starts = [m.region.gpa for m in self._by_gpa]
        self._uva_starts = [m.region.uva for m in self._by_uva]

    @staticmethod
    def _find(table: list[_Mapping], starts: list[int], addr: int, size: int, space: str) -> _Mapping:
        if size <= 0 or addr < 0 or addr + size > _U64_END:
            raise MemoryAccessError(addr, size, f"invalid {space} range")
        i = bisect.bisect_right(starts, addr) - 1
        if i < 0:
            raise MemoryAccessError(addr, size, f"{space} not in any region")
        m = table[i]
        start = getattr(m.region, space)
        if addr >= start + m.region.size:
            raise MemoryAccessError(addr, size, f"{space} not in any region")
        if addr + size > start + m.region.size:
            raise MemoryAccessError(addr, size, f"{space} range crosses the end of its region")
        return m
