"""Build (and cache) the test-bed guest's initramfs: busybox-static, virtio_net with its modules, our /init.

The archive is written in Python (cpio "newc" + gzip), so the only host inputs are the kernel's module tree
and a static busybox. It is cached under $VDUPROXY_CACHE (default ~/.cache/vduproxy), keyed by kernel
version and a hash of everything that goes into it, and replaced atomically so concurrent test runs can
share the cache.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vduproxy.log import get_logger

log = get_logger(__name__)

# Bump when the archive layout changes in a way the content hash cannot see.
FORMAT_VERSION = 1
DEFAULT_MODULES = ("virtio_pci", "virtio_net")
BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))


class InitramfsError(Exception):
    """The initramfs cannot be built on this host (missing kernel, module or busybox)."""


@dataclass(frozen=True)
class GuestImage:
    """A guest kernel and the initramfs built for it."""

    kernel: Path
    initrd: Path
    kver: str
    modules: tuple[str, ...]


def cache_dir() -> Path:
    return Path(os.environ.get("VDUPROXY_CACHE") or Path.home() / ".cache" / "vduproxy")


def guest_init_script() -> str:
    """The guest's /init (package data, so the lead can read the protocol it prints)."""
    return Path(__file__).with_name("guest-init.sh").read_text(encoding="utf-8")


def _version_key(name: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def default_kernel(boot: Path = Path("/boot")) -> tuple[Path, str]:
    """The newest /boot/vmlinuz-KVER that has a module tree: (path, KVER)."""
    found = []
    for k in boot.glob("vmlinuz-*"):
        kver = k.name.removeprefix("vmlinuz-")
        if (Path("/lib/modules") / kver / "modules.dep").exists():
            found.append((k, kver))
    if not found:
        raise InitramfsError(f"no {boot}/vmlinuz-* with /lib/modules/KVER/modules.dep (install linux-image-amd64)")
    return max(found, key=lambda kv: _version_key(kv[1]))


def _module_name(relpath: str) -> str:
    base = relpath.rsplit("/", 1)[-1]
    return re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base).replace("-", "_")


def resolve_modules(moddir: Path, wanted: Iterable[str]) -> list[str]:
    """modules.dep paths for `wanted` (module names) and their dependencies, dependencies first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[_module_name(mod)] = mod
    order: list[str] = []
    visiting: set[str] = set()

    def add(mod: str) -> None:
        if mod in order:
            return
        if mod in visiting:
            raise InitramfsError(f"dependency cycle at {mod} in {moddir}/modules.dep")
        visiting.add(mod)
        for dep in deps.get(mod, []):
            add(dep)
        visiting.discard(mod)
        order.append(mod)

    for name in wanted:
        found = by_name.get(name.replace("-", "_"))
        if found is None:
            # Built into the kernel (modules.builtin) needs nothing in the archive.
            builtin = moddir / "modules.builtin"
            if builtin.exists() and any(_module_name(m) == name for m in builtin.read_text().split()):
                continue
            raise InitramfsError(f"module {name} not found in {moddir}/modules.dep")
        add(found)
    return order


def _read_module(path: Path) -> bytes:
    """A module file, decompressed (the guest's busybox insmod may not read compressed modules)."""
    candidates = [path] if path.exists() else [Path(f"{path}.{z}") for z in ("xz", "zst", "gz")]
    for p in candidates:
        if not p.exists():
            continue
        if p.suffix == ".xz":
            return lzma.decompress(p.read_bytes())
        if p.suffix == ".gz":
            return gzip.decompress(p.read_bytes())
        if p.suffix == ".zst":
            # No zstd in the 3.11 standard library; this runs once per cache miss.
            return subprocess.run(["zstd", "-dc", str(p)], check=True, capture_output=True).stdout
        return p.read_bytes()
    raise InitramfsError(f"module file {path} (or a compressed variant) does not exist")


class _Newc:
    """Writer for the cpio "newc" format the kernel unpacks (see the kernel's early-userspace docs)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        self.buf.write(name.encode() + b"\0")
        self._pad()
        self.buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def _find_busybox(busybox: Path | None) -> Path:
    for p in [busybox] if busybox is not None else BUSYBOX_CANDIDATES:
        if p.exists():
            return p
    raise InitramfsError("no static busybox found (install busybox-static)")


def build_archive(init: str, busybox: bytes, modules: Sequence[tuple[str, bytes]]) -> bytes:
    """The gzip'd newc archive: /init, /bin/busybox (+ sh), /lib/modules/* and their load order."""
    w = _Newc()
    for d in ("bin", "dev", "proc", "sys", "tmp", "run", "etc", "lib", "lib/modules"):
        w.dir(d)
    # The kernel opens /dev/console for init's stdio before /init can mount devtmpfs.
    w.chardev("dev/console", 5, 1)
    w.file("bin/busybox", busybox, 0o755)
    w.symlink("bin/sh", "busybox")
    for name, data in modules:
        w.file(f"lib/modules/{name}", data)
    w.file("lib/modules/load-order", "".join(f"{name}\n" for name, _ in modules).encode())
    w.file("init", init.encode(), 0o755)
    # mtime=0: identical inputs give identical bytes.
    return gzip.compress(w.finish(), compresslevel=6, mtime=0)


def build_initramfs(
    kver: str | None = None,
    *,
    kernel: Path | None = None,
    modules: Sequence[str] = DEFAULT_MODULES,
    init: str | None = None,
    busybox: Path | None = None,
    cache: Path | None = None,
) -> GuestImage:
    """The cached initramfs for `kver` (default: the newest kernel in /boot), building it on a miss."""
    if kver is None:
        default_path, kver = default_kernel()
        kernel = kernel or default_path
    kernel = kernel or Path("/boot") / f"vmlinuz-{kver}"
    if not kernel.exists():
        raise InitramfsError(f"guest kernel {kernel} does not exist")
    moddir = Path("/lib/modules") / kver
    if not (moddir / "modules.dep").exists():
        raise InitramfsError(f"{moddir}/modules.dep does not exist")
    init_text = init if init is not None else guest_init_script()
    bb_path = _find_busybox(busybox)
    bb = bb_path.read_bytes()
    mods = resolve_modules(moddir, modules)

    key = hashlib.sha256()
    for part in (str(FORMAT_VERSION), kver, init_text, "\n".join(mods)):
        key.update(part.encode() + b"\0")
    key.update(hashlib.sha256(bb).digest())
    out_dir = cache if cache is not None else cache_dir()
    out = out_dir / f"initramfs-{kver}-{key.hexdigest()[:16]}.cpio.gz"
    names = tuple(m.rsplit("/", 1)[-1].removesuffix(".xz").removesuffix(".zst").removesuffix(".gz") for m in mods)
    image = GuestImage(kernel=kernel, initrd=out, kver=kver, modules=names)
    if out.exists():
        log.debug("initramfs cache hit", path=str(out))
        return image

    loaded = [(name, _read_module(moddir / m)) for name, m in zip(names, mods, strict=True)]
    data = build_archive(init_text, bb, loaded)
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".initramfs-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("initramfs built", path=str(out), size=len(data), kver=kver, modules=list(names), busybox=str(bb_path))
    return image


def clear_cache(cache: Path | None = None) -> None:
    """Remove every cached initramfs (only files this module writes)."""
    d = cache if cache is not None else cache_dir()
    for p in list(d.glob("initramfs-*.cpio.gz")) + list(d.glob(".initramfs-*")):
        p.unlink(missing_ok=True)
    if d.exists() and not any(d.iterdir()):
        shutil.rmtree(d, ignore_errors=True)
