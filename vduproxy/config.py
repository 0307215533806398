"""The daemon's TOML configuration: many vhost-user socket ↔ vDPA device pairs in one process.

    [daemon]                                  # optional
    control = "/run/vduproxy/control.sock"    # control socket ("" disables it)
    metrics = "127.0.0.1:9100"                # Prometheus text endpoint (optional)

    [pairs.guest1]                            # one table per pair; the key is the pair's name
    socket = "/run/vduproxy/guest1.sock"
    device = "/dev/vhost-vdpa-0"              # or sim[:key=value,...]
    svq = "auto"                              # auto | always | never
    svq_busy_poll_us = 50                     # SVQ thread may poll this long after its last work (0: never)
    mac = "52:54:00:12:34:56"                 # optional
    queues = 1                                # optional: default is what the device has
    client = false                            # connect to a listening front-end instead of listening
    socket_mode = "0660"                      # octal, as a string (TOML has no octal strings for modes)
    socket_group = "kvm"

Everything is validated up front and reported with its TOML path, so a typo never half-starts a daemon.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

DEFAULT_CONTROL = "/run/vduproxy/control.sock"
SVQ_MODES = ("auto", "always", "never")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAC_RE = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")
# sun_path is 108 bytes including the terminating NUL
MAX_SOCKET_PATH = 107
MAX_PAIRS = 256

_DAEMON_KEYS = {"control", "metrics"}
_PAIR_KEYS = {
    "socket", "device", "svq", "mac", "queues", "client", "socket_mode", "socket_group", "restore_state",
    "svq_busy_poll_us",
}  # fmt: skip
MAX_BUSY_POLL_US = 1000
# The SVQ thread polls (yielding the CPU) up to this long after its last work, and only while its sleeps keep
# ending sooner than that: under load that replaces two eventfd wake-ups per batch; at low rates it never polls.
DEFAULT_BUSY_POLL_US = 50


class ConfigError(ValueError):
    """A configuration that cannot be used; `where` is the TOML path of the offending value."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where
        self.message = message


@dataclasses.dataclass(frozen=True)
class PairConfig:
    name: str
    socket: str
    device: str = "sim"
    svq: str = "auto"
    mac: bytes | None = None
    queues: int | None = None
    client: bool = False
    socket_mode: int = 0o600
    socket_group: str | None = None
    restore_state: str | None = None  # a migration state blob to replay before the first data queue starts
    svq_busy_poll_us: int = DEFAULT_BUSY_POLL_US

    def describe(self) -> dict[str, object]:
        """JSON-safe view (stats, logs)."""
        return {
            "socket": self.socket,
            "device": self.device,
            "svq": self.svq,
            "mac": self.mac.hex(":") if self.mac else None,
            "queues": self.queues,
            "client": self.client,
            "socket_mode": f"{self.socket_mode:04o}",
            "socket_group": self.socket_group,
            "svq_busy_poll_us": self.svq_busy_poll_us,
        }


@dataclasses.dataclass(frozen=True)
class DaemonConfig:
    pairs: tuple[PairConfig, ...]
    control: str | None = DEFAULT_CONTROL  # None: no control socket
    metrics: tuple[str, int] | None = None

    def pair(self, name: str) -> PairConfig:
        for p in self.pairs:
            if p.name == name:
                return p
        raise KeyError(name)


def parse_mac(text: str) -> bytes:
    if not MAC_RE.match(text):
        raise ValueError(f"not a MAC address: {text!r} (expected aa:bb:cc:dd:ee:ff)")
    return bytes(int(p, 16) for p in text.split(":"))


def parse_mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise ValueError(f"not an octal mode: {text!r}") from None
    if not 0 <= value <= 0o777:
        raise ValueError(f"mode out of range: {text!r}")
    return value


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`) for the metrics endpoint."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range 1..65535")
    return host, port


def _str(where: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(where, f"must be a string, got {type(value).__name__}")
    return value


def _unknown(where: str, table: dict[str, Any], known: set[str]) -> None:
    extra = sorted(set(table) - known)
    if extra:
        raise ConfigError(where, f"unknown key(s) {', '.join(extra)} (known: {', '.join(sorted(known))})")


def _pair(name: str, raw: object) -> PairConfig:
    where = f"pairs.{name}"
    if not NAME_RE.match(name):
        raise ConfigError(where, "pair names are 1-63 characters of letters, digits, '_', '.', '-'")
    if not isinstance(raw, dict):
        raise ConfigError(where, "must be a table")
    _unknown(where, raw, _PAIR_KEYS)
    if "socket" not in raw:
        raise ConfigError(where, "'socket' is required")
    socket = _str(f"{where}.socket", raw["socket"])
    if not socket or len(socket.encode()) > MAX_SOCKET_PATH or "\0" in socket:
        raise ConfigError(f"{where}.socket", f"must be a path of 1..{MAX_SOCKET_PATH} bytes")
    device = _str(f"{where}.device", raw.get("device", "sim"))
    if not device:
        raise ConfigError(f"{where}.device", "must not be empty")
    svq = _str(f"{where}.svq", raw.get("svq", "auto"))
    if svq not in SVQ_MODES:
        raise ConfigError(f"{where}.svq", f"must be one of {', '.join(SVQ_MODES)}, got {svq!r}")
    mac = None
    if "mac" in raw:
        try:
            mac = parse_mac(_str(f"{where}.mac", raw["mac"]))
        except ValueError as exc:
            raise ConfigError(f"{where}.mac", str(exc)) from None
    queues = raw.get("queues")
    if queues is not None and (not isinstance(queues, int) or isinstance(queues, bool) or not 1 <= queues <= 128):
        raise ConfigError(f"{where}.queues", f"must be an integer 1..128, got {queues!r}")
    client = raw.get("client", False)
    if not isinstance(client, bool):
        raise ConfigError(f"{where}.client", "must be true or false")
    mode_raw = raw.get("socket_mode", "0600")
    try:
        mode = parse_mode(_str(f"{where}.socket_mode", mode_raw))
    except ValueError as exc:
        raise ConfigError(f"{where}.socket_mode", f'{exc} (write it as a string, e.g. "0660")') from None
    group = raw.get("socket_group")
    if group is not None:
        group = _str(f"{where}.socket_group", group)
    restore = raw.get("restore_state")
    if restore is not None:
        restore = _str(f"{where}.restore_state", restore)
    poll = raw.get("svq_busy_poll_us", DEFAULT_BUSY_POLL_US)
    if not isinstance(poll, int) or isinstance(poll, bool) or not 0 <= poll <= MAX_BUSY_POLL_US:
        raise ConfigError(f"{where}.svq_busy_poll_us", f"must be an integer 0..{MAX_BUSY_POLL_US}, got {poll!r}")
    return PairConfig(name, socket, device, svq, mac, queues, client, mode, group, restore, poll)


def config_from_dict(raw: dict[str, Any]) -> DaemonConfig:
    _unknown("", raw, {"daemon", "pairs"})
    daemon = raw.get("daemon", {})
    if not isinstance(daemon, dict):
        raise ConfigError("daemon", "must be a table")
    _unknown("daemon", daemon, _DAEMON_KEYS)
    control: str | None = _str("daemon.control", daemon.get("control", DEFAULT_CONTROL))
    if control is not None and len(control.encode()) > MAX_SOCKET_PATH:
        raise ConfigError("daemon.control", f"longer than {MAX_SOCKET_PATH} bytes")
    metrics = None
    if "metrics" in daemon:
        try:
            metrics = parse_listen(_str("daemon.metrics", daemon["metrics"]))
        except ValueError as exc:
            raise ConfigError("daemon.metrics", str(exc)) from None
    pairs_raw = raw.get("pairs")
    if not isinstance(pairs_raw, dict) or not pairs_raw:
        raise ConfigError("pairs", "at least one [pairs.NAME] table is required")
    if len(pairs_raw) > MAX_PAIRS:
        raise ConfigError("pairs", f"at most {MAX_PAIRS} pairs per daemon")
    pairs = tuple(_pair(name, table) for name, table in pairs_raw.items())
    seen: dict[str, str] = {}
    for p in pairs:
        # Two pairs on one socket, or one kernel device given to two pairs, can never both work.
        for kind, key in (("socket", p.socket), ("device", p.device)):
            if kind == "device" and not key.startswith("/"):
                continue  # every sim spec is its own device
            other = seen.get(f"{kind}:{key}")
            if other is not None:
                raise ConfigError(f"pairs.{p.name}.{kind}", f"{key!r} is already used by pairs.{other}")
            seen[f"{kind}:{key}"] = p.name
    if control is not None and f"socket:{control}" in seen:
        raise ConfigError("daemon.control", f"{control!r} is also a pair's vhost-user socket")
    return DaemonConfig(pairs=pairs, control=control or None, metrics=metrics)


def load_config(path: str | Path) -> DaemonConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(p), "not UTF-8 text") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), f"not valid TOML: {exc}") from None
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc.where}" if exc.where else str(p), exc.message) from None
