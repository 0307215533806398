"""cffi out-of-line API-mode builder for the benchmarks' C driver (bench/txgen.c), compiled at first use.

The extension is built into a cache directory keyed by a hash of everything that goes into it (C source, cdef,
compiler flags, cffi version, Python ABI), so a fresh machine (CI) builds it once and an edited source gets a
fresh build instead of a stale one: `~/.cache/vduproxy/bench-build/<hash>/` (`$XDG_CACHE_HOME` is honoured;
`VDUPROXY_BENCH_BUILD_DIR` overrides the root). Concurrent first uses (the benchmark and its child processes,
parallel tests) are serialised by a lock file, and the built module is moved into place atomically.

Standalone: `python -m bench._txgen_build` builds (if needed) and prints the module path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import cffi
from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "txgen.c"
MODULE = "_bench_txgen"

def _public_structs() -> str:
    """The structs between the cdef markers of txgen.c: the binding cannot drift from the source."""
    text = SOURCE.read_text()
    begin, end = text.index("/* cdef-begin */"), text.index("/* cdef-end */")
    return text[begin + len("/* cdef-begin */") : end]


CDEF = _public_structs() + """
struct txgen;

int txgen_abi_version(void);
int txgen_create(const struct txgen_params *p, struct txgen **out);
int txgen_start(struct txgen *g);
int64_t txgen_run(struct txgen *g, double seconds, struct txgen_result *res);
void txgen_get_stats(const struct txgen *g, struct txgen_stats *out);
const char *txgen_error(const struct txgen *g);
void txgen_destroy(struct txgen *g);
"""

ABI_VERSION = 1
CFLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]


def make_builder() -> FFI:
    ffibuilder = FFI()
    ffibuilder.cdef(CDEF)
    # One translation unit: the cffi wrapper includes the driver, so the structs are defined exactly once.
    ffibuilder.set_source(MODULE, '#include "txgen.c"\n', include_dirs=[str(HERE)], extra_compile_args=CFLAGS)
    return ffibuilder


def source_hash() -> str:
    h = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        CDEF.encode(),
        " ".join(CFLAGS).encode(),
        cffi.__version__.encode(),
        (sysconfig.get_config_var("EXT_SUFFIX") or "").encode(),
        sys.implementation.cache_tag.encode(),
    ):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def cache_root() -> Path:
    override = os.environ.get("VDUPROXY_BENCH_BUILD_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vduproxy" / "bench-build"


def module_path(root: Path | None = None) -> Path:
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return (root or cache_root()) / source_hash() / f"{MODULE}{suffix}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def build(root: Path | None = None) -> Path:
    """The built extension's path, compiling it first if this source hash has not been built yet."""
    target = module_path(root)
    if target.is_file():
        return target
    with _locked(target.parent / ".lock"):
        if target.is_file():  # another process built it while we waited
            return target
        with tempfile.TemporaryDirectory(prefix="build-", dir=target.parent) as tmp:
            built = Path(make_builder().compile(tmpdir=tmp, verbose=False))
            staged = target.with_name(target.name + ".tmp")
            shutil.copy2(built, staged)
            os.replace(staged, target)
    return target


if __name__ == "__main__":
    print(build())
