"""Command line: `vduproxy serve …` and friends."""

from __future__ import annotations

import argparse
import functools
import re
import sys
from collections.abc import Sequence

import trio

from . import __version__
from .log import configure, get_logger

log = get_logger(__name__)

MAC_RE = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")


def _mac(text: str) -> bytes:
    if not MAC_RE.match(text):
        raise argparse.ArgumentTypeError(f"not a MAC address: {text!r} (expected aa:bb:cc:dd:ee:ff)")
    return bytes(int(p, 16) for p in text.split(":"))


def _mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from exc
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"mode out of range: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vduproxy", description=__doc__)
    p.add_argument("--version", action="version", version=f"vduproxy {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "console", "json"],
        help="console on a terminal, JSON lines otherwise (auto)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve one vhost-user socket, backed by one vDPA device")
    s.add_argument("--socket", required=True, help="vhost-user unix socket path")
    s.add_argument(
        "--device",
        default="sim",
        help="/dev/vhost-vdpa-N, or sim[:key=value,...] for the built-in software device (default: sim)",
    )
    s.add_argument(
        "--client",
        action="store_true",
        help="connect to a front-end listening on --socket (QEMU server=on) instead of listening",
    )
    s.add_argument("--mac", type=_mac, help="MAC to program into the device before any traffic")
    s.add_argument(
        "--queues", type=int, default=None, help="queue pairs to offer (default: what the device has)"
    )
    s.add_argument(
        "--svq",
        default="auto",
        choices=["auto", "always", "never"],
        help="shadow virtqueue: auto = only while the front-end asks for dirty logging",
    )
    s.add_argument("--socket-mode", type=_mode, default=0o600, help="octal permissions of the socket (0600)")
    s.add_argument(
        "--socket-group", default=None, help="group owning the socket (e.g. the QEMU user's group)"
    )
    s.add_argument(
        "--print-qemu-args",
        action="store_true",
        help="print the QEMU options that attach a guest to this socket, then serve",
    )
    return p


def qemu_args(socket: str, mac: str = "52:54:00:12:34:56", mem: str = "512M") -> str:
    """QEMU 7.2 options that attach a guest to a vduproxy socket (see contrib/qemu-args/README.md)."""
    return " \\\n  ".join(
        [
            f"-object memory-backend-memfd,id=mem,size={mem},share=on -numa node,memdev=mem",
            f"-chardev socket,id=vdu0,path={socket},reconnect=1",
            "-netdev vhost-user,id=net0,chardev=vdu0",
            f"-device virtio-net-pci,netdev=net0,mac={mac},vectors=0",
        ]
    )


async def _serve(args: argparse.Namespace) -> None:
    from .dataplane import open_dataplane_factory
    from .server import serve_client, serve_unix

    factory, device_desc = open_dataplane_factory(args.device, queues=args.queues, svq=args.svq, mac=args.mac)
    try:
        log.info("device_ready", device=device_desc)
        if args.print_qemu_args:
            print("Attach QEMU with:\n  " + qemu_args(args.socket), file=sys.stderr, flush=True)
        if args.client:
            await serve_client(args.socket, factory)
        else:
            await serve_unix(args.socket, factory, mode=args.socket_mode, group=args.socket_group)
    finally:
        factory.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fmt = args.log_format
    configure(args.log_level, json=None if fmt == "auto" else fmt == "json")
    if args.command == "serve":
        from .server import ServerError, run_until_signal

        try:
            trio.run(run_until_signal, functools.partial(_serve, args))
        except ServerError as exc:
            log.error("serve_failed", error=str(exc))
            return 1
        except KeyboardInterrupt:
            return 130
        return 0
    return 2
