"""`python -m vduproxy.testing.kernelvm build|path|run -- CMD...`: the kernel tier from a shell."""

from __future__ import annotations

import argparse
import sys

from vduproxy.log import configure

from .build import KernelBuildError, cached_kernel, ensure_kernel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vduproxy.testing.kernelvm", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the test kernel unless it is cached; print the bzImage path")
    b.add_argument("-j", "--jobs", type=int, default=None, help="make -j (default: number of CPUs)")
    b.add_argument("--rebuild", action="store_true", help="run make again over the kept object tree")
    sub.add_parser("path", help="print the cached bzImage path; exit 1 when it is not built")
    args = parser.parse_args(argv)
    configure("info", stream=sys.stderr)
    try:
        if args.cmd == "build":
            image = ensure_kernel(jobs=args.jobs, rebuild=args.rebuild)
        else:
            cached = cached_kernel()
            if cached is None:
                print("kernel not built: run `python -m vduproxy.testing.kernelvm build`", file=sys.stderr)
                return 1
            image = cached
    except KernelBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(image.bzimage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
