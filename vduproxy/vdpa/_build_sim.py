"""cffi out-of-line API-mode builder for the software vDPA device's native data path (sim_core.c).

setup.py lists `vduproxy/vdpa/_build_sim.py:ffibuilder`; for an in-place development build:
    python -c "import vduproxy.vdpa._build_sim as b; b.ffibuilder.compile(tmpdir='build/cffi')"
"""

from __future__ import annotations

import os
import pathlib
import re

from cffi import FFI

_HERE = pathlib.Path(__file__).resolve().parent
_HEADER = _HERE / "sim_core.h"
_SOURCE = _HERE / "sim_core.c"


def _cdef_from_header(text: str) -> str:
    """The header minus preprocessor lines, with the array-size macros cffi cannot evaluate substituted."""
    defines = dict(re.findall(r"^#define\s+(SIM_\w+)\s+(\d+)", text, flags=re.M))
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    for name, value in defines.items():
        body = re.sub(rf"\b{name}\b", value, body)
    consts = "\n".join(f"#define {name} {value}" for name, value in defines.items())
    return consts + "\n" + body


# VDUPROXY_SIM_SANITIZE=1 builds with ASan+UBSan (tests/unit/test_sim_sanitizers.py); load it with
# LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0
_SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
_EXTRA = _SANITIZE if os.environ.get("VDUPROXY_SIM_SANITIZE") == "1" else []

ffibuilder = FFI()
ffibuilder.cdef(_cdef_from_header(_HEADER.read_text()))
def _setup_relative(path: pathlib.Path) -> str:
    """setuptools refuses absolute source paths in a wheel/editable build (which runs from the project root, and
    setup.py says so); a direct ffibuilder.compile() changes into its tmpdir, so it needs the absolute path."""
    if os.environ.get("VDUPROXY_SETUPTOOLS_BUILD") != "1":
        return str(path)
    try:
        return str(path.relative_to(pathlib.Path.cwd().resolve()))
    except ValueError:
        return str(path)


ffibuilder.set_source(
    "vduproxy.vdpa._sim_core",
    '#include "sim_core.h"\n',
    sources=[_setup_relative(_SOURCE)],
    include_dirs=[str(_HERE)],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter", *_EXTRA],
    extra_link_args=_EXTRA,
    libraries=["pthread"],
)


def build_inplace() -> pathlib.Path:
    """Compile under build/cffi and copy the extension next to this file (development use, tests)."""
    import shutil

    built = pathlib.Path(ffibuilder.compile(tmpdir=str(_HERE.parent.parent / "build" / "cffi"), verbose=False))
    dest = _HERE / built.name
    shutil.copy2(built, dest)
    return dest


if __name__ == "__main__":
    print(build_inplace())
