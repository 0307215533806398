"""The QEMU command lines in contrib/qemu-args/ as written, so the documentation cannot rot.

`guest.args` is read, its placeholders filled, and QEMU started with exactly those options; the guest must
bring eth0 up through vduproxy and ping a real peer (a network namespace behind the software device's TAP).
The migration pair must describe the same machine on both ends, differing only by `-incoming`.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest

from vduproxy.testing.initramfs import GuestImage
from vduproxy.testing.netns import open_tap_peer
from vduproxy.testing.procs import ManagedProcess, open_service_nursery
from vduproxy.testing.proxy import open_proxy
from vduproxy.testing.qemu import QEMU_BINARY, GuestConfig, GuestMarker, PingResult

pytestmark = pytest.mark.realclient

ARGS_DIR = Path(__file__).resolve().parents[2] / "contrib" / "qemu-args"
BOOT_TIMEOUT = 180.0
MAC = "52:54:00:12:34:56"


def read_args(path: Path, values: dict[str, str]) -> list[str]:
    """One option (and its value) per line, `#` comments, `${NAME}` placeholders: the README's format."""
    argv: list[str] = []
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        option, _, value = line.partition(" ")
        if not option.startswith("-"):
            raise ValueError(f"{path.name}:{lineno}: {line!r} does not start with an option")
        argv.append(option)
        if value.strip():
            try:
                # the value stays one argument, whatever the placeholder expands to (e.g. a kernel command line)
                argv.append(string.Template(value.strip()).substitute(values))
            except KeyError as exc:
                raise ValueError(f"{path.name}:{lineno}: no value for placeholder {exc}") from None
    return argv


def placeholders(path: Path) -> set[str]:
    return set(re.findall(r"\$\{(\w+)\}", path.read_text()))


def test_migration_ends_describe_the_same_machine() -> None:
    src, dst = ARGS_DIR / "migration-source.args", ARGS_DIR / "migration-destination.args"
    values = {name: f"<{name}>" for name in placeholders(src) | placeholders(dst)}
    a, b = read_args(src, values), read_args(dst, values)
    # QEMU refuses (or corrupts) a migration between differently configured machines
    assert b[: len(a)] == a
    assert b[len(a) :] == ["-incoming", "<INCOMING>"]
    assert read_args(ARGS_DIR / "guest.args", values) == a


async def test_guest_args_boot_and_ping_through_vduproxy(
    guest_image: GuestImage, sock_dir: Path, log_dir: Path
) -> None:
    sock = sock_dir / "vdu.sock"
    async with open_tap_peer("10.0.2.2/24") as peer:
        device = f"sim:profile=vdpasim,backend=tap,tap={peer.tap}"
        async with open_proxy(sock, device, ["--mac", MAC], log_dir=log_dir) as proxy:
            append = GuestConfig(kernel=guest_image.kernel, initrd=guest_image.initrd, peermac=None, ping=5).cmdline()
            values = {
                "SOCKET": str(sock),
                "MAC": MAC,
                "KERNEL": str(guest_image.kernel),
                "INITRD": str(guest_image.initrd),
                "APPEND": append,
                "QMP": str(sock_dir / "qmp.sock"),
            }
            assert placeholders(ARGS_DIR / "guest.args") <= set(values), "guest.args grew a placeholder"
            argv = [QEMU_BINARY, *read_args(ARGS_DIR / "guest.args", values)]
            qemu = ManagedProcess("qemu", argv, log_path=log_dir / "qemu.log")
            async with open_service_nursery() as nursery:
                await qemu.start(nursery)
                try:
                    _, m = await qemu.output.wait_for(r"^VDUP-(MARKER .*|ERROR: no eth0)$", BOOT_TIMEOUT)
                    assert m[1].startswith("MARKER"), qemu.output.tail(60)
                    marker = GuestMarker.parse(m[0])
                    assert marker.carrier and marker.mac == MAC and marker.driver == "virtio_net"
                    _, m = await qemu.output.wait_for(r"VDUP-PING-RESULT .*", BOOT_TIMEOUT)
                    ping = PingResult.parse(m[0])
                finally:
                    await qemu.terminate()
            assert (ping.sent, ping.received) == (5, 5), qemu.output.tail(60)
            # the frames went through vduproxy's socket and device, not some fallback path
            assert any(ev["vqs"] == [0, 1] for ev in proxy.events("device_started"))
