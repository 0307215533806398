"""Command line: `vduproxy serve …` (the daemon) and the operator's verbs around it.

serve     one socket ↔ device pair from flags, or many from `--config FILE` (TOML)
stats     per pair and queue counters from a running daemon (`--watch` refreshes)
trace     follow the vhost-user conversation and CVQ commands live
state     save / load a pair's migration state blob through the daemon; show a blob file
mode      force the shadow virtqueue on (svq), off (passthrough), or back to the policy (auto)
devices   /dev/vhost-vdpa-* (in use or not) and the software device's profiles
inspect   everything one device reports
compat    would a guest (state blob or profile) work on a destination device?
demo      `demo migrate`: a QEMU guest live-migrating between two daemons on this machine, as a timeline
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from . import __version__
from .config import (
    DEFAULT_BUSY_POLL_US,
    DEFAULT_CONTROL,
    ConfigError,
    DaemonConfig,
    PairConfig,
    load_config,
    parse_listen,
)
from .log import configure, get_logger

log = get_logger(__name__)

MAC_RE = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")
CONTROL_ENV = "VDUPROXY_CONTROL"
SINGLE_PAIR = "default"  # the name of the pair `serve --socket …` runs


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


def _busy_poll(text: str) -> int:
    from .config import MAX_BUSY_POLL_US

    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number of microseconds: {text!r}") from exc
    if not 0 <= value <= MAX_BUSY_POLL_US:
        raise argparse.ArgumentTypeError(f"must be 0..{MAX_BUSY_POLL_US} µs: {text!r}")
    return value


def _listen(text: str) -> tuple[str, int]:
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"interval must be 0.1..3600 seconds, got {text}")
    return value


def _default_control() -> str:
    return os.environ.get(CONTROL_ENV) or DEFAULT_CONTROL


def _add_control(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--control",
        default=None,
        help=f"the daemon's control socket (default: ${CONTROL_ENV} or {DEFAULT_CONTROL})",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vduproxy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"vduproxy {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "console", "json"],
        help="console on a terminal, JSON lines otherwise (auto)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve vhost-user sockets backed by vDPA devices")
    s.add_argument("--config", type=Path, help="TOML file with many socket/device pairs (see contrib/vduproxy.toml)")
    s.add_argument("--socket", help="vhost-user unix socket path (single pair)")
    s.add_argument(
        "--device",
        default=None,
        help="/dev/vhost-vdpa-N, or sim[:key=value,...] for the built-in software device (default: sim)",
    )
    s.add_argument(
        "--client",
        action="store_true",
        help="connect to a front-end listening on --socket (QEMU server=on) instead of listening",
    )
    s.add_argument("--mac", type=_mac, help="MAC to program into the device before any traffic")
    s.add_argument("--queues", type=int, default=None, help="queue pairs to offer (default: what the device has)")
    s.add_argument(
        "--svq",
        default=None,
        choices=["auto", "always", "never"],
        help="shadow virtqueue: auto = only while the front-end asks for dirty logging (default)",
    )
    s.add_argument(
        "--svq-busy-poll", type=_busy_poll, default=None, metavar="USEC",
        help="the SVQ thread may keep polling up to USEC µs after its last work, yielding the CPU, before it "
        "sleeps; it polls only while its sleeps keep ending sooner than that (under load), never at low rates "
        f"(default {DEFAULT_BUSY_POLL_US}; 0: always sleep at once)",
    )  # fmt: skip
    s.add_argument("--socket-mode", type=_mode, default=None, help="octal permissions of the socket (0600)")
    s.add_argument("--socket-group", default=None, help="group owning the socket (e.g. the QEMU user's group)")
    s.add_argument(
        "--restore-state", default=None, metavar="FILE",
        help="a migration state blob (vduproxy state save) replayed into the device before its data queues start",
    )  # fmt: skip
    s.add_argument(
        "--control",
        default=None,
        help=f"control socket; 'none' disables it (default: the config's, else {DEFAULT_CONTROL}; "
        "a single pair from flags has none unless given)",
    )
    s.add_argument("--metrics", type=_listen, default=None, help="serve Prometheus text on HOST:PORT/metrics")
    s.add_argument(
        "--print-qemu-args",
        action="store_true",
        help="print the QEMU options that attach a guest to each socket, then serve",
    )

    st = sub.add_parser("stats", help="counters of a running daemon")
    _add_control(st)
    st.add_argument("--pair", help="only this pair")
    st.add_argument("--json", action="store_true", help="one JSON object (per refresh with --watch)")
    st.add_argument(
        "--watch", nargs="?", type=_positive, const=1.0, default=None, metavar="SECONDS",
        help="refresh every SECONDS (1) until interrupted",
    )  # fmt: skip

    tr = sub.add_parser("trace", help="follow vhost-user and CVQ events live")
    _add_control(tr)
    tr.add_argument("--pair", help="only this pair")
    tr.add_argument("--all", action="store_true", help="every event the daemon logs, not only the protocol's")
    tr.add_argument("--json", action="store_true", help="JSON lines instead of text")

    sa = sub.add_parser("state", help="save/load a pair's migration state through the daemon")
    sa_sub = sa.add_subparsers(dest="state_op", required=True)
    for op, help_text in (("save", "write the state blob to FILE"), ("load", "load the blob in FILE")):
        q = sa_sub.add_parser(op, help=help_text)
        _add_control(q)
        q.add_argument("--pair", help="the pair (optional when the daemon has one)")
        q.add_argument("file", type=Path, help="the blob file ('-' for stdout/stdin)")
    q = sa_sub.add_parser("show", help="decode a state blob file as JSON")
    q.add_argument("file", type=Path)

    m = sub.add_parser("mode", help="force the shadow virtqueue on or off, or back to the --svq policy")
    _add_control(m)
    m.add_argument("mode", choices=["svq", "passthrough", "auto"])
    m.add_argument("--pair", help="the pair (optional when the daemon has one)")

    d = sub.add_parser("devices", help="list /dev/vhost-vdpa-* and the software device's profiles")
    d.add_argument("--json", action="store_true")

    i = sub.add_parser("inspect", help="everything one device reports")
    i.add_argument("--device", required=True, help="/dev/vhost-vdpa-N or sim[:key=value,...]")
    i.add_argument("--json", action="store_true")

    c = sub.add_parser("compat", help="check a source (state blob or profile) against a destination device")
    c.add_argument("source", help="a state blob file, or a sim profile name / .toml")
    c.add_argument("dest", help="a device spec (/dev/vhost-vdpa-N, sim:...) or a sim profile name / .toml")
    c.add_argument("--json", action="store_true")

    dm = sub.add_parser("demo", help="self-contained demonstrations (root; QEMU and iproute2 needed)")
    dm_sub = dm.add_subparsers(dest="demo", required=True)
    dmm = dm_sub.add_parser(
        "migrate",
        help="live-migrate a QEMU guest between two daemons on two sim profiles while it is pinged; print a timeline",
    )
    dmm.add_argument(
        "--keep-going", type=_seconds, default=10.0, metavar="SECONDS",
        help="seconds of pings after each switchover (10)",
    )  # fmt: skip
    dmm.add_argument("--back", action="store_true", help="migrate back to the first daemon as well")
    dmm.add_argument("--json", action="store_true", help="print the timeline as JSON (progress stays on stderr)")
    return p


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be 0..3600 seconds, got {text}")
    return value


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


class UsageError(Exception):
    pass


# ------------------------------------------------------------------------------------------------ serve

_PAIR_FLAGS = (
    "socket", "device", "mac", "queues", "svq", "svq_busy_poll", "socket_mode", "socket_group", "restore_state",
)


def daemon_config(args: argparse.Namespace) -> DaemonConfig:
    """The configuration `serve` runs: the TOML file's, or one pair from the flags."""
    control = None if args.control in (None, "none", "") else args.control
    if args.config is not None:
        given = [f"--{f.replace('_', '-')}" for f in _PAIR_FLAGS if getattr(args, f) is not None]
        if args.client:
            given.append("--client")
        if given:
            raise UsageError(f"{', '.join(given)} cannot be combined with --config (set them per pair in the file)")
        cfg = load_config(args.config)
        if args.control is not None:
            cfg = DaemonConfig(cfg.pairs, control, cfg.metrics)
        if args.metrics is not None:
            cfg = DaemonConfig(cfg.pairs, cfg.control, args.metrics)
        return cfg
    if args.socket is None:
        raise UsageError("serve needs --socket PATH (one pair) or --config FILE (many)")
    pair = PairConfig(
        name=SINGLE_PAIR,
        socket=args.socket,
        device=args.device or "sim",
        svq=args.svq or "auto",
        svq_busy_poll_us=DEFAULT_BUSY_POLL_US if args.svq_busy_poll is None else args.svq_busy_poll,
        mac=args.mac,
        queues=args.queues,
        client=args.client,
        socket_mode=0o600 if args.socket_mode is None else args.socket_mode,
        socket_group=args.socket_group,
        restore_state=args.restore_state,
    )
    return DaemonConfig(pairs=(pair,), control=control, metrics=args.metrics)


async def _serve(cfg: DaemonConfig, log_level: str, print_args: bool, result: list[int]) -> None:
    from .control import TraceHub, install_trace
    from .daemon import Daemon

    hub = TraceHub()
    install_trace(hub, log_level)
    daemon = Daemon(cfg, trace=hub, print_qemu_args=print_args)
    await daemon.run()
    if daemon.all_failed:
        result.append(1)


def _run_serve(args: argparse.Namespace) -> int:
    from .server import ServerError, run_until_signal

    try:
        cfg = daemon_config(args)
    except (ConfigError, UsageError) as exc:
        log.error("bad_configuration", error=str(exc))
        return 2
    result: list[int] = []
    try:
        trio.run(run_until_signal, functools.partial(_serve, cfg, args.log_level, args.print_qemu_args, result))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        leaves = _leaves(exc)
        if not all(isinstance(e, ServerError | OSError) for e in leaves):
            raise
        # the control or metrics socket could not be bound: another daemon, or a bad address
        for e in leaves:
            log.error("serve_failed", error=str(e))
        return 1
    return result[0] if result else 0


def _leaves(exc: BaseException) -> list[BaseException]:
    """The real errors inside the exception groups trio's nurseries wrap them in."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


# ------------------------------------------------------------------------------------------------ control verbs


def _control(args: argparse.Namespace) -> str:
    return str(args.control or _default_control())


def _fmt(value: object) -> str:
    return "-" if value is None else str(value)


def format_stats(stats: dict[str, Any], only: str | None = None) -> str:
    """The human view of a stats snapshot."""
    d = stats.get("daemon", {})
    lines = [f"vduproxy {d.get('version')} pid {d.get('pid')} up {float(d.get('uptime_s', 0)):.0f}s"]
    cols = ("packets", "bytes", "kicks", "calls", "dirty_pages", "device_packets", "device_bytes", "faults")
    for name, p in stats.get("pairs", {}).items():
        if only is not None and name != only:
            continue
        state = p.get("state")
        head = f"pair {name}: {state}"
        if state == "running":
            head += " attached" if p.get("attached") else " waiting for a front-end"
            head += f" mode={_fmt(p.get('mode'))} svq={p.get('svq_policy')} switches={p.get('switches', 0)}"
        lines.append(head)
        lines.append(f"  socket {p.get('socket')}  device {p.get('device')}")
        if p.get("error"):
            lines.append(f"  error: {p['error']}")
        queues = p.get("queues") or {}
        if queues:
            lines.append("  " + "  ".join(f"{c:>14}" for c in ("vq", "mode", *cols)))
            for vq, q in queues.items():
                row = [vq, q.get("mode"), *(q.get(c) for c in cols)]
                lines.append("  " + "  ".join(f"{_fmt(v):>14}" for v in row))
    return "\n".join(lines)


async def _stats(args: argparse.Namespace) -> int:
    from .control import ControlClient

    path = _control(args)
    async with await ControlClient.connect(path) as client:
        while True:
            stats = (await client.request({"verb": "stats"}))["stats"]
            if args.pair is not None and args.pair not in stats.get("pairs", {}):
                log.error("unknown_pair", pair=args.pair, pairs=sorted(stats.get("pairs", {})))
                return 2
            if args.json:
                if args.pair is not None:
                    stats = {**stats, "pairs": {args.pair: stats["pairs"][args.pair]}}
                print(json.dumps(stats, sort_keys=True), flush=True)
            else:
                if args.watch is not None and sys.stdout.isatty():
                    print("\x1b[H\x1b[2J", end="")
                print(format_stats(stats, args.pair), flush=True)
            if args.watch is None:
                return 0
            if not args.json and not sys.stdout.isatty():
                print(flush=True)
            await trio.sleep(args.watch)


def format_event(ev: dict[str, Any]) -> str:
    ts = ev.get("timestamp")
    when = (
        time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"
        if isinstance(ts, float)
        else _fmt(ts)
    )
    skip = {"timestamp", "event", "level", "logger_name", "pair"}
    rest = " ".join(f"{k}={v}" for k, v in ev.items() if k not in skip)
    pair = f"[{ev['pair']}] " if ev.get("pair") else ""
    return f"{when} {pair}{ev.get('level', '')[:4]:<4} {ev.get('event')} {rest}".rstrip()


async def _trace(args: argparse.Namespace) -> int:
    from .control import ControlClient

    async with await ControlClient.connect(_control(args)) as client:
        print(f"tracing {args.pair or 'every pair'} on {client.path} (Ctrl-C stops)", file=sys.stderr, flush=True)
        async for ev in client.trace(args.pair, all_events=args.all):
            print(json.dumps(ev, default=str) if args.json else format_event(ev), flush=True)
    log.warning("trace_ended", reason="the daemon closed the connection")
    return 1


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _state(args: argparse.Namespace) -> int:
    import base64

    from .control import ControlClient

    if args.state_op == "show":
        from .migration.state import DeviceState, StateError

        try:
            data = sys.stdin.buffer.read() if str(args.file) == "-" else args.file.read_bytes()
            print(DeviceState.from_bytes(data).to_json())
        except (OSError, StateError) as exc:
            log.error("state_unreadable", file=str(args.file), error=str(exc))
            return 1
        return 0
    path = _control(args)
    if args.state_op == "save":
        _progress(f"saving the device state of pair {args.pair or '(the only one)'} via {path} ...")
        async with await ControlClient.connect(path) as client:
            reply = await client.request({"verb": "state", "op": "save", "pair": args.pair})
        blob = base64.b64decode(reply["blob"])
        if str(args.file) == "-":
            sys.stdout.buffer.write(blob)
            sys.stdout.buffer.flush()
        else:
            tmp = args.file.with_name(args.file.name + ".tmp")
            tmp.write_bytes(blob)
            tmp.replace(args.file)  # never leave a half-written blob where a destination would load it
        _progress(f"saved {len(blob)} bytes of pair {reply['pair']} to {args.file}")
        return 0
    data = sys.stdin.buffer.read() if str(args.file) == "-" else args.file.read_bytes()
    _progress(f"loading {len(data)} bytes into pair {args.pair or '(the only one)'} via {path} ...")
    async with await ControlClient.connect(path) as client:
        reply = await client.request(
            {"verb": "state", "op": "load", "pair": args.pair, "blob": base64.b64encode(data).decode()}
        )
    _progress(f"loaded {reply['bytes']} bytes into pair {reply['pair']}")
    return 0


async def _set_mode(args: argparse.Namespace) -> int:
    from .control import call

    reply = await call(_control(args), {"verb": "mode", "mode": args.mode, "pair": args.pair})
    print(f"pair {reply['pair']}: {reply['mode']} (requested {reply['requested']})")
    return 0


def _run_client(fn: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    from .control import ControlError, ControlUnavailable

    try:
        rc: int = trio.run(fn, args)
    except ControlUnavailable as exc:
        log.error("control_unavailable", error=str(exc))
        return 1
    except ControlError as exc:
        log.error("request_refused", code=exc.code, error=exc.message)
        return 1
    except OSError as exc:
        log.error("io_error", error=str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    return rc


# ------------------------------------------------------------------------------------------------ devices


_DEVICE_TYPES = {1: "net", 2: "block"}


def describe_device(dev: Any) -> dict[str, Any]:
    """What a VdpaDevice reports, JSON-safe: identity, features decoded, net config, topology."""
    from .vdpa.device import BackendF
    from .virtio import NetF, describe_features

    features = dev.get_features()
    device_id = dev.get_device_id()
    info: dict[str, Any] = {
        "name": dev.name,
        "device_id": device_id,
        "device_type": _DEVICE_TYPES.get(device_id, f"id {device_id}"),
        "features": hex(features),
        "features_names": describe_features(features),
        "backend_features": hex(dev.get_backend_features()),
        "backend_features_names": describe_features(dev.get_backend_features(), BackendF),
        "vqs": dev.get_vqs_count(),
        "ring_max": dev.get_vring_num_max(),
    }
    if device_id == 1:
        mac, status, pairs, mtu = (
            dev.get_config(0, 6),
            dev.get_config(6, 2),
            dev.get_config(8, 2),
            dev.get_config(10, 2),
        )
        info["mac"] = mac.hex(":") if features & NetF.MAC else None
        info["link_up"] = bool(int.from_bytes(status, "little") & 1) if features & NetF.STATUS else None
        info["max_pairs"] = int.from_bytes(pairs, "little") if features & NetF.MQ else 1
        info["mtu"] = int.from_bytes(mtu, "little") if features & NetF.MTU else None
    groups = dev.get_groups_num()
    info["groups"] = groups
    info["address_spaces"] = dev.get_as_num()
    info["vq_groups"] = [dev.get_vring_group(i) for i in range(info["vqs"])]
    rng = dev.get_iova_range()
    info["iova_range"] = f"{rng.first:#x}-{rng.last:#x}"
    return info


def list_devices(dev_dir: Path = Path("/dev")) -> list[dict[str, Any]]:
    """Every vhost-vdpa node: described when free, `in use` when another process holds it (EBUSY on open)."""
    from .vdpa.device import DeviceBusy, DeviceError
    from .vdpa.kernel import KernelVdpaDevice

    out: list[dict[str, Any]] = []
    nodes = sorted(
        dev_dir.glob("vhost-vdpa-*"),
        key=lambda p: int(p.name.rsplit("-", 1)[1]) if p.name.rsplit("-", 1)[1].isdigit() else -1,
    )
    for node in nodes:
        entry: dict[str, Any] = {"path": str(node)}
        try:
            dev = KernelVdpaDevice(str(node))
        except DeviceBusy:
            entry.update(status="in use", error="opened by another process (EBUSY)")
        except DeviceError as exc:
            entry.update(status="unusable", error=str(exc))
        else:
            try:
                entry.update(status="free", **describe_device(dev))
            except DeviceError as exc:
                entry.update(status="unusable", error=str(exc))
            finally:
                dev.close()
        out.append(entry)
    return out


def sim_profiles() -> list[dict[str, Any]]:
    from .vdpa.sim import SimConfigError, list_profiles, load_profile
    from .virtio import describe_features

    out: list[dict[str, Any]] = []
    for name in list_profiles():
        try:
            prof = load_profile(name)
        except SimConfigError as exc:
            out.append({"name": name, "description": f"unusable: {exc}"})
            continue
        out.append({
            "name": name, "description": prof.description, "features": hex(prof.features),
            "features_names": describe_features(prof.features), "queue_pairs": prof.queue_pairs,
            "ring_max": prof.ring_max, "mtu": prof.mtu,
        })  # fmt: skip
    return out


def _run_devices(args: argparse.Namespace) -> int:
    kernel = list_devices()
    profiles = sim_profiles()
    if args.json:
        print(json.dumps({"devices": kernel, "sim_profiles": profiles}, indent=2))
        return 0
    if not kernel:
        print("no /dev/vhost-vdpa-* devices (needs CONFIG_VHOST_VDPA and `vdpa dev add ...`)")
    for dev in kernel:
        if dev.get("error"):
            print(f"{dev['path']}: {dev['status']}: {dev['error']}")
            continue
        print(
            f"{dev['path']}: {dev['status']} {dev['device_type']} mac={_fmt(dev.get('mac'))} "
            f"max_pairs={_fmt(dev.get('max_pairs'))} mtu={_fmt(dev.get('mtu'))} vqs={dev['vqs']} "
            f"ring_max={dev['ring_max']}"
        )
        print(f"  features {dev['features']}: {dev['features_names']}")
    print("sim profiles (--device sim:profile=NAME):")
    for prof in profiles:
        print(f"  {prof['name']:<10} {prof['description']}")
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from .vdpa.device import DeviceError
    from .vdpa.factory import open_device

    try:
        dev = open_device(args.device)
        try:
            info = describe_device(dev)
        finally:
            dev.close()
    except DeviceError as exc:
        log.error("device_unavailable", device=args.device, error=str(exc))
        return 1
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:<20} {value}")
    return 0


def _run_compat(args: argparse.Namespace) -> int:
    from .migration.compat import check_compat, exit_code, format_problems, load_destination, load_source
    from .migration.state import StateError
    from .vdpa.device import DeviceError

    try:
        source = load_source(args.source)
        dest = load_destination(args.dest)
    except (StateError, DeviceError, OSError) as exc:
        log.error("compat_input_unusable", error=str(exc))
        return 2
    problems = check_compat(source, dest)
    if args.json:
        out = [{"severity": p.severity.value, "what": p.what, "why": p.why} for p in problems]
        print(json.dumps({"compatible": exit_code(problems) == 0, "problems": out}, indent=2))
    else:
        print("\n".join(format_problems(problems)))
    return exit_code(problems)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fmt = args.log_format
    configure(args.log_level, json=None if fmt == "auto" else fmt == "json")
    if args.command == "serve":
        return _run_serve(args)
    clients: dict[str, Callable[[argparse.Namespace], Any]] = {
        "stats": _stats, "trace": _trace, "state": _state, "mode": _set_mode,
    }  # fmt: skip
    if args.command in clients:
        return _run_client(clients[args.command], args)
    if args.command == "devices":
        return _run_devices(args)
    if args.command == "inspect":
        return _run_inspect(args)
    if args.command == "compat":
        return _run_compat(args)
    if args.command == "demo":
        from .demo import DemoOptions, run_migrate

        if args.log_level == "info":
            # The demo narrates each step itself; the test bed's info lines (every process started, every
            # namespace created) would drown that. `--log-level debug` brings them back.
            configure("warning", json=None if fmt == "auto" else fmt == "json")
        return run_migrate(DemoOptions(keep_going=args.keep_going, back=args.back, json=args.json))
    return 2
