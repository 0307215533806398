"""Build (or take from the cache) the test-tier kernel: Debian's linux-source-6.1, tinyconfig + vdpa.config.

Debian's packaged 6.1 kernel has CONFIG_VDPA unset, so the kernel tier needs its own kernel. A clean build
takes about ten minutes on two cores, so the result is cached outside the checkout under
`$VDUPROXY_CACHE/kernel/<key>/bzImage` (default `~/.cache/vduproxy`), where the key is the source package
version plus the sha256 of the fragment: a changed fragment or an upgraded source package builds a new kernel,
anything else reuses the cached one. The object tree is kept next to the image so a forced rebuild is
incremental.

Builds of the same key are serialised with a lock file: a background build started early in a CI job and the
test that needs the kernel later can run at the same time, and the second simply waits for the first.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from vduproxy.log import get_logger

log = get_logger(__name__)

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
FRAGMENT_NAME = "vdpa.config"
# How often a running build reports progress: the first build is quiet for minutes otherwise.
PROGRESS_EVERY_S = 30.0
# Host tools the kernel build needs beyond the compiler; checked up front so a missing one is named, rather
# than surfacing as a make error deep in build.log.
BUILD_TOOLS = ("make", "gcc", "bc", "bison", "flex", "perl", "tar", "xz")
_SYMBOL = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
# kbuild's quiet output: "  CC      kernel/fork.o"; counting these is a cheap progress measure.
_STEP = re.compile(rb"^  [A-Z][A-Z0-9_]{1,10} +\S")


class KernelBuildError(Exception):
    """The kernel could not be built; the message names the cause and the log file to read."""


@dataclasses.dataclass(frozen=True)
class KernelImage:
    """A built kernel in the cache."""

    bzimage: Path
    key: str
    config: Path  # the effective .config, for reading which optional features the kernel has
    built: bool  # True when this call compiled it, False when it came from the cache

    def has_symbol(self, symbol: str) -> bool:
        """Whether `symbol` (e.g. "CONFIG_VDPA_SIM_NET") is built in."""
        wanted = f"{symbol}=y"
        return any(line.strip() == wanted for line in self.config.read_text().splitlines())


def cache_root() -> Path:
    """`$VDUPROXY_CACHE`, else `~/.cache/vduproxy`: outside the checkout, shared by every tree on the host."""
    env = os.environ.get("VDUPROXY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vduproxy"


def fragment_text() -> str:
    return resources.files("vduproxy.testing.kernelvm").joinpath(FRAGMENT_NAME).read_text()


def parse_fragment(text: str) -> dict[str, str]:
    """CONFIG_X=value lines of a fragment; comments and blank lines are skipped, anything else is an error."""
    symbols: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _SYMBOL.match(line)
        if m is None:
            raise KernelBuildError(f"{FRAGMENT_NAME}:{n}: not a CONFIG_NAME=value line: {raw!r}")
        symbols[m.group(1)] = m.group(2)
    return symbols


def source_version() -> str:
    """The installed linux-source-6.1 package version: it names the source a cache entry was built from."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as e:
        raise KernelBuildError(f"{SOURCE_PACKAGE} is not installed (apt-get install {SOURCE_PACKAGE}): {e}") from None
    if not out or not SOURCE_TARBALL.is_file():
        raise KernelBuildError(f"{SOURCE_PACKAGE} is not installed: {SOURCE_TARBALL} missing")
    return out


def cache_key(version: str, fragment: str) -> str:
    digest = hashlib.sha256(fragment.encode()).hexdigest()[:16]
    # Debian versions may carry characters ("+", "~", ":") that are awkward in paths.
    safe = re.sub(r"[^A-Za-z0-9.\-]", "_", version)
    return f"{safe}-{digest}"


def cached_kernel() -> KernelImage | None:
    """The cached kernel for the current source and fragment, or None when it has not been built yet."""
    key = cache_key(source_version(), fragment_text())
    entry = cache_root() / "kernel" / key
    image, config = entry / "bzImage", entry / "config"
    if image.is_file() and config.is_file():
        return KernelImage(bzimage=image, key=key, config=config, built=False)
    return None


def ensure_kernel(*, jobs: int | None = None, rebuild: bool = False) -> KernelImage:
    """The kernel for the current source and fragment, building it first when it is not cached.

    `rebuild` runs make again over the kept object tree (seconds when nothing changed).
    """
    version = source_version()
    fragment = fragment_text()
    symbols = parse_fragment(fragment)
    key = cache_key(version, fragment)
    entry = cache_root() / "kernel" / key
    entry.mkdir(parents=True, exist_ok=True)
    image, config = entry / "bzImage", entry / "config"
    with _locked(entry / "lock"):
        if image.is_file() and config.is_file() and not rebuild:
            log.info("kernel cached", bzimage=str(image), key=key)
            return KernelImage(bzimage=image, key=key, config=config, built=False)
        _check_tools()
        src = _unpack_source(version)
        _build(src, entry, fragment, symbols, jobs or os.cpu_count() or 1)
        return KernelImage(bzimage=image, key=key, config=config, built=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building this kernel; waiting for it", lock=str(path))
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _check_tools() -> None:
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    if missing:
        raise KernelBuildError(f"kernel build tools missing from PATH: {', '.join(missing)}")
    # libelf-dev and libssl-dev are headers, not binaries: objtool and the cert tooling include them.
    for header, package in (
        ("/usr/include/gelf.h", "libelf-dev"),
        ("/usr/include/openssl/ssl.h", "libssl-dev"),
    ):
        if not Path(header).is_file():
            raise KernelBuildError(f"{header} missing: apt-get install {package}")


def _unpack_source(version: str) -> Path:
    """Unpack the tarball once per source version, into the cache (15 s; the tree is read-only afterwards)."""
    base = cache_root() / "kernel" / f"src-{cache_key(version, '')}"
    tree = base / "linux-source-6.1"
    done = base / ".unpacked"
    if done.is_file():
        return tree
    with _locked(base.with_name(base.name + ".lock")):
        if done.is_file():
            return tree
        if base.exists():
            shutil.rmtree(base)  # a half-unpacked tree from an interrupted run
        base.mkdir(parents=True)
        log.info("unpacking kernel source", tarball=str(SOURCE_TARBALL), into=str(base))
        # GNU tar over tarfile: it is several times faster on the 140 MB .tar.xz.
        subprocess.run(["tar", "-C", str(base), "-xf", str(SOURCE_TARBALL)], check=True)
        if not (tree / "Makefile").is_file():
            raise KernelBuildError(f"{SOURCE_TARBALL} did not unpack to {tree}")
        done.touch()
    return tree


def _make(src: Path, out: Path, target: str, logf: Path) -> None:
    with logf.open("ab") as f:
        proc = subprocess.run(["make", "-C", str(src), f"O={out}", target], stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise KernelBuildError(f"make {target} failed (rc {proc.returncode}); see {logf}")


def _configure(src: Path, out: Path, symbols: dict[str, str], logf: Path) -> None:
    cfg = out / ".config"
    _make(src, out, "tinyconfig", logf)
    args: list[str] = []
    for sym, value in symbols.items():
        name = sym.removeprefix("CONFIG_")
        if value == "y":
            args += ["--enable", name]
        elif value == "n":
            args += ["--disable", name]
        else:
            args += ["--set-val", name, value]
    # Twice: some symbols only become settable once olddefconfig has turned on the menu they live in.
    for _ in range(2):
        subprocess.run([str(src / "scripts" / "config"), "--file", str(cfg), *args], check=True)
        _make(src, out, "olddefconfig", logf)
    effective = _read_config(cfg)
    wrong = []
    for sym, value in symbols.items():
        got = effective.get(sym, "n")
        if got != value:
            wrong.append(f"{sym}={value} (got {got})")
    if wrong:
        raise KernelBuildError("config fragment symbols did not take (a missing dependency?): " + ", ".join(wrong))


def _read_config(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        m = _SYMBOL.match(line.strip())
        if m:
            values[m.group(1)] = m.group(2)
    return values


def _build(src: Path, entry: Path, fragment: str, symbols: dict[str, str], jobs: int) -> None:
    out = entry / "build"
    out.mkdir(exist_ok=True)
    logf = entry / "build.log"
    logf.write_bytes(b"")
    (entry / FRAGMENT_NAME).write_text(fragment)
    log.info("configuring kernel", key=entry.name, log=str(logf))
    _configure(src, out, symbols, logf)
    log.info("building kernel", jobs=jobs, log=str(logf), note="about 10 minutes on 2 cores when not cached")
    start = last = time.monotonic()
    steps = 0
    with logf.open("ab") as f:
        proc = subprocess.Popen(
            ["make", "-C", str(src), f"O={out}", f"-j{jobs}", "bzImage"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                f.write(line)
                if _STEP.match(line):
                    steps += 1
                now = time.monotonic()
                if now - last >= PROGRESS_EVERY_S:
                    last = now
                    log.info("kernel build progress", steps=steps, elapsed_s=round(now - start))
            rc = proc.wait()
        except BaseException:
            # Interrupted (Ctrl-C, pytest timeout): take the whole make process group down with us.
            os.killpg(proc.pid, 9)
            proc.wait()
            raise
    if rc != 0:
        tail = b"".join(logf.read_bytes().splitlines(keepends=True)[-20:]).decode(errors="replace")
        raise KernelBuildError(f"kernel build failed (make rc {rc}); see {logf}\n{tail}")
    built = out / "arch" / "x86" / "boot" / "bzImage"
    # Publish atomically: a reader that sees bzImage also sees a complete file and its config.
    shutil.copyfile(out / ".config", entry / "config.tmp")
    os.replace(entry / "config.tmp", entry / "config")
    shutil.copyfile(built, entry / "bzImage.tmp")
    os.replace(entry / "bzImage.tmp", entry / "bzImage")
    log.info(
        "kernel built",
        bzimage=str(entry / "bzImage"),
        size=(entry / "bzImage").stat().st_size,
        steps=steps,
        elapsed_s=round(time.monotonic() - start),
    )
