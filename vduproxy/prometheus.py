"""Prometheus text exposition (format 0.0.4) of the daemon's counters, served over plain HTTP on GET /metrics."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import trio

from .log import get_logger

log = get_logger(__name__)

REQUEST_TIMEOUT = 5.0
MAX_REQUEST = 8192
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# per-vq counter -> (metric, help)
_VQ_COUNTERS = {
    "packets": ("vduproxy_vq_packets_total", "Packets the shadow virtqueue forwarded"),
    "bytes": ("vduproxy_vq_bytes_total", "Bytes the shadow virtqueue forwarded"),
    "kicks": ("vduproxy_vq_guest_kicks_total", "Guest kicks the shadow virtqueue handled"),
    "calls": ("vduproxy_vq_guest_calls_total", "Interrupts the shadow virtqueue sent to the guest"),
    "dirty_pages": ("vduproxy_vq_dirty_pages_total", "Guest pages logged dirty for migration"),
    "svq_faults": ("vduproxy_vq_svq_faults_total", "Guest ring errors the shadow virtqueue detected"),
    "device_packets": ("vduproxy_vq_device_packets_total", "Packets the device processed"),
    "device_bytes": ("vduproxy_vq_device_bytes_total", "Bytes the device processed"),
    "faults": ("vduproxy_vq_device_faults_total", "Device faults"),
}


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: object) -> str | None:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | float):
        return str(value)
    return None


def render(stats: dict[str, Any]) -> str:
    """The text exposition of a Daemon.stats() snapshot."""
    families: dict[str, tuple[str, str, list[str]]] = {}

    def add(name: str, kind: str, help_text: str, labels: dict[str, object], value: object) -> None:
        text = _num(value)
        if text is None:
            return
        fam = families.setdefault(name, (kind, help_text, []))
        lbl = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        fam[2].append(f"{name}{{{lbl}}} {text}" if lbl else f"{name} {text}")

    daemon = stats.get("daemon", {})
    add("vduproxy_uptime_seconds", "gauge", "Seconds since the daemon started", {}, daemon.get("uptime_s"))
    for pair, p in stats.get("pairs", {}).items():
        add(
            "vduproxy_pair_up",
            "gauge",
            "1 while the pair serves its socket",
            {"pair": pair},
            p.get("state") == "running",
        )
        add(
            "vduproxy_pair_attached", "gauge", "1 while a front-end is attached", {"pair": pair},
            bool(p.get("attached")),
        )  # fmt: skip
        add(
            "vduproxy_pair_shadow",
            "gauge",
            "1 while the shadow virtqueue is on",
            {"pair": pair},
            p.get("mode") == "svq",
        )
        add(
            "vduproxy_pair_mode_switches_total", "counter", "Passthrough/SVQ switches", {"pair": pair},
            p.get("switches", 0),
        )  # fmt: skip
        for vq, q in (p.get("queues") or {}).items():
            for key, (name, help_text) in _VQ_COUNTERS.items():
                add(name, "counter", help_text, {"pair": pair, "vq": vq}, q.get(key))
    out: list[str] = []
    for name, (kind, help_text, samples) in families.items():
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]
    return "\n".join(out) + "\n"


async def _respond(stream: trio.SocketStream, get_stats: Callable[[], dict[str, Any]]) -> None:
    buf = b""
    with trio.move_on_after(REQUEST_TIMEOUT):
        while b"\r\n\r\n" not in buf and b"\n\n" not in buf and len(buf) < MAX_REQUEST:
            data = await stream.receive_some(4096)
            if not data:
                break
            buf += data
    parts = buf.split(b"\r\n", 1)[0].split()
    if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
        status, body = "405 Method Not Allowed", "only GET /metrics\n"
    elif parts[1].split(b"?")[0] not in (b"/metrics", b"/"):
        status, body = "404 Not Found", "try /metrics\n"
    else:
        status, body = "200 OK", render(get_stats())
    data = body.encode()
    head = (
        f"HTTP/1.0 {status}\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    await stream.send_all(head.encode() + (data if parts[:1] != [b"HEAD"] else b""))


async def serve_metrics(
    host: str,
    port: int,
    get_stats: Callable[[], dict[str, Any]],
    *,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve GET /metrics on host:port (every address it resolves to) until cancelled."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    log.info("metrics_listening", address=f"{host}:{port}")

    async def client(stream: trio.SocketStream) -> None:
        try:
            await _respond(stream, get_stats)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # a scraper that hangs up is its own problem
        finally:
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await stream.aclose()

    await trio.serve_listeners(client, listeners, task_status=task_status)
