"""Guest memory mapping: translation in the three address spaces, validation, and fd ownership."""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator

import pytest

from vduproxy.memory import (
    MemoryAccessError,
    MemoryMap,
    MemoryTableError,
    RegionSpec,
)

pytestmark = pytest.mark.unit

PAGE = mmap.PAGESIZE
MiB = 1 << 20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def memfd(size: int) -> int:
    fd = os.memfd_create("test-guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def fill(fd: int, offset: int, data: bytes) -> None:
    os.pwrite(fd, data, offset)


@pytest.fixture
def fd_baseline() -> Iterator[None]:
    """Every test must leave the process with the fds it started with."""
    before = open_fds()
    yield
    assert open_fds() == before


def qemu_like_specs(size: int = 4 * MiB) -> tuple[int, list[RegionSpec]]:
    """One memfd split in two regions like QEMU above 4 GiB: the second region at an mmap_offset, a high GPA,
    and both contiguous in the front-end's address space. Returns (a readable dup of the memfd, specs)."""
    fd = memfd(size)
    half = size // 2
    uva = 0x7F12_3400_0000
    specs = [
        RegionSpec(gpa=0, size=half, uva=uva, mmap_offset=0, fd=os.dup(fd)),
        RegionSpec(gpa=1 << 32, size=half, uva=uva + half, mmap_offset=half, fd=os.dup(fd)),
    ]
    return fd, specs


@pytest.mark.usefixtures("fd_baseline")
class TestTranslate:
    def test_three_spaces(self) -> None:
        fd, specs = qemu_like_specs()
        fill(fd, 2 * MiB + 100, b"second-region")
        fill(fd, 100, b"first-region")
        with MemoryMap.build(specs) as m:
            assert [r.gpa for r in m.regions] == [0, 1 << 32]
            # each space maps to the same byte of the same file
            assert m.read(100, 12) == b"first-region"
            assert m.read((1 << 32) + 100, 13) == b"second-region"
            uva2 = specs[1].uva + 100
            assert m.uva_to_gpa(uva2) == (1 << 32) + 100
            assert m.uva_to_local(uva2) == m.gpa_to_local((1 << 32) + 100)
            local = m.gpa_to_local((1 << 32) + 100, 13)
            assert ctypes.string_at(local, 13) == b"second-region"
        os.close(fd)

    def test_view_is_shared_with_the_front_end(self) -> None:
        fd, specs = qemu_like_specs()
        with MemoryMap.build(specs) as m:
            with m.view((1 << 32) + 8, 4) as v:
                v[:] = b"abcd"
            assert os.pread(fd, 4, 2 * MiB + 8) == b"abcd"
            m.write(0x10, b"xy")
            assert os.pread(fd, 2, 0x10) == b"xy"
        os.close(fd)

    def test_unaligned_mmap_offset(self) -> None:
        fd = memfd(4 * PAGE)
        fill(fd, PAGE + 123, b"hello")
        spec = RegionSpec(gpa=0x1000, size=2 * PAGE, uva=0x5000_0000, mmap_offset=PAGE + 123, fd=os.dup(fd))
        with MemoryMap.build([spec]) as m:
            assert m.read(0x1000, 5) == b"hello"
            assert ctypes.string_at(m.regions[0].local_addr, 5) == b"hello"
            # the whole claimed size is reachable, the end of the file included
            assert m.read(0x1000 + 2 * PAGE - 1, 1) == b"\0"
        os.close(fd)

    @pytest.mark.parametrize(
        ("gpa", "size", "reason"),
        [
            (2 * MiB - 4, 8, "crosses"),  # runs off the end of region 0
            (2 * MiB, 4, "not in any region"),  # the hole between the regions
            ((1 << 32) - 1, 2, "not in any region"),
            ((1 << 32) + 2 * MiB, 1, "not in any region"),  # just past the last region
            (0, 0, "invalid"),
            ((1 << 64) - 1, 2, "invalid"),
        ],
    )
    def test_out_of_region_is_an_error_not_a_fault(self, gpa: int, size: int, reason: str) -> None:
        fd, specs = qemu_like_specs()
        os.close(fd)
        with MemoryMap.build(specs) as m:
            for f in (m.gpa_to_local, m.view):
                with pytest.raises(MemoryAccessError, match=reason) as ei:
                    f(gpa, size)
                assert (ei.value.addr, ei.value.size) == (gpa, size)

    def test_uva_crossing_two_contiguous_regions_is_an_error(self) -> None:
        fd, specs = qemu_like_specs()
        os.close(fd)
        with MemoryMap.build(specs) as m:
            boundary = specs[1].uva
            assert m.uva_to_gpa(boundary - 4, 4) == 2 * MiB - 4
            with pytest.raises(MemoryAccessError, match="crosses"):
                m.uva_to_gpa(boundary - 4, 8)
            with pytest.raises(MemoryAccessError):
                m.uva_to_local(specs[0].uva - 1)


@pytest.mark.usefixtures("fd_baseline")
class TestValidation:
    def spec(
        self, gpa: int = 0, size: int = MiB, uva: int = 0x7000_0000_0000, off: int = 0, fsize: int = MiB
    ):
        return RegionSpec(gpa=gpa, size=size, uva=uva, mmap_offset=off, fd=memfd(fsize))

    def reject(self, specs: list[RegionSpec], match: str, **kw: int) -> MemoryTableError:
        with pytest.raises(MemoryTableError, match=match) as ei:
            MemoryMap.build(specs, **kw)
        for s in specs:  # every fd was closed by the failed build
            with pytest.raises(OSError):
                os.fstat(s.fd)
        return ei.value

    def test_fd_smaller_than_claimed(self) -> None:
        # Mapping this would succeed and SIGBUS on first touch past the end of the file.
        self.reject([self.spec(size=2 * MiB, fsize=MiB)], "exceeds the fd's size")

    def test_offset_pushes_past_the_end(self) -> None:
        self.reject([self.spec(size=MiB, off=PAGE, fsize=MiB)], "exceeds")

    def test_zero_size(self) -> None:
        self.reject([self.spec(size=0)], "size is 0")

    def test_overflow(self) -> None:
        err = self.reject([self.spec(), self.spec(gpa=(1 << 64) - PAGE, uva=0x100, fsize=MiB)], "overflows")
        assert err.index == 1

    def test_gpa_overlap(self) -> None:
        err = self.reject(
            [self.spec(gpa=0), self.spec(gpa=MiB - PAGE, uva=0x1_0000_0000)], r"gpa .* overlaps"
        )
        assert err.index == 1

    def test_uva_overlap(self) -> None:
        self.reject(
            [self.spec(gpa=0, uva=0x1000_0000), self.spec(gpa=4 * MiB, uva=0x1000_0000)], "uva .* overlaps"
        )

    def test_too_many_regions(self) -> None:
        specs = [self.spec(gpa=i * MiB, uva=0x10_0000_0000 + i * MiB) for i in range(9)]
        self.reject(specs, "9 regions, at most 8")

    def test_configurable_cap(self) -> None:
        specs = [
            self.spec(gpa=i * MiB, uva=0x10_0000_0000 + i * MiB, size=PAGE, fsize=PAGE) for i in range(9)
        ]
        with MemoryMap.build(specs, max_regions=16) as m:
            assert len(m.regions) == 9 and m.max_slots == 16

    def test_not_a_file(self) -> None:
        r, w = os.pipe()
        os.close(w)
        self.reject([RegionSpec(0, PAGE, 0x1000, 0, r)], "not a regular file")

    def test_closed_fd(self) -> None:
        fd = memfd(PAGE)
        os.close(fd)
        self.reject([RegionSpec(0, PAGE, 0x1000, 0, fd)], "fstat")

    def test_same_fd_twice(self) -> None:
        fd = memfd(2 * PAGE)
        specs = [RegionSpec(0, PAGE, 0x1000, 0, fd), RegionSpec(PAGE, PAGE, 0x1000 + PAGE, PAGE, fd)]
        self.reject(specs, "two regions")

    def test_failure_after_some_regions_mapped_unmaps_and_closes(self) -> None:
        # The second spec passes validation (regular file, big enough) but mmap refuses a write mapping of a
        # read-only fd: the first region was already mapped and must be undone.
        path = f"/proc/self/fd/{memfd(PAGE)}"
        ro = os.open(path, os.O_RDONLY)
        os.close(int(path.rsplit("/", 1)[1]))
        specs = [self.spec(size=PAGE, fsize=PAGE), RegionSpec(PAGE, PAGE, 0x1000_0000, 0, ro)]
        err = self.reject(specs, "mmap failed")
        assert err.index == 1


@pytest.mark.usefixtures("fd_baseline")
class TestLifecycle:
    def test_build_costs_fds_only_while_mapped(self) -> None:
        fd, specs = qemu_like_specs()
        before = open_fds()
        m = MemoryMap.build(specs)
        assert open_fds() == before + len(specs)  # mmap keeps a private duplicate of each region fd
        m.close()
        assert open_fds() == before - len(specs)  # the specs' fds were the map's to close
        m.close()  # idempotent
        os.close(fd)

    def test_add_and_remove_region(self) -> None:
        fd, specs = qemu_like_specs()
        fill(fd, 2 * MiB, b"top")
        with MemoryMap.build(specs[:1], max_regions=2) as m:
            with pytest.raises(MemoryAccessError):
                m.gpa_to_local(1 << 32)
            r = m.add_region(specs[1])
            assert r.gpa == 1 << 32 and m.read(1 << 32, 3) == b"top"
            extra = RegionSpec(8 << 32, PAGE, 0x1000, 0, memfd(PAGE))
            with pytest.raises(MemoryTableError, match="slots"):
                m.add_region(extra)
            with pytest.raises(OSError):
                os.fstat(extra.fd)  # closed although rejected

            # QEMU's REM_MEM_REG carries an fd for the region; it is closed whether or not the body matches
            wrong = os.dup(fd)
            with pytest.raises(MemoryTableError, match="no region"):
                m.remove_region(1 << 32, 2 * MiB, 0xDEAD, wrong)
            with pytest.raises(OSError):
                os.fstat(wrong)
            removed = m.remove_region(1 << 32, 2 * MiB, specs[1].uva, os.dup(fd))
            assert removed.gpa == 1 << 32
            with pytest.raises(OSError):
                os.fstat(specs[1].fd)  # the region's own fd went with it
            with pytest.raises(MemoryAccessError):
                m.read(1 << 32, 1)
            assert [x.gpa for x in m.regions] == [0]
        os.close(fd)

    def test_add_overlapping_region_rejected(self) -> None:
        fd, specs = qemu_like_specs()
        os.close(fd)
        with MemoryMap.build(specs) as m:
            clash = RegionSpec((1 << 32) + MiB, MiB, 0x1000, 0, memfd(MiB))
            with pytest.raises(MemoryTableError, match=r"gpa .* overlaps"):
                m.add_region(clash)
            assert len(m.regions) == 2

    def test_view_held_across_close_does_not_dangle(self) -> None:
        fd, specs = qemu_like_specs()
        os.close(fd)
        m = MemoryMap.build(specs)
        v = m.view(0, 16)
        m.close()
        v[:4] = b"safe"  # still mapped: the mapping lives as long as the view
        assert bytes(v[:4]) == b"safe"
        v.release()
