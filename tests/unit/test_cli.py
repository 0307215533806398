"""The command line as an operator meets it: argument checks, the device listings, compat, exit codes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from vduproxy import __version__
from vduproxy.cli import UsageError, build_parser, daemon_config, format_event, format_stats, main, qemu_args
from vduproxy.vdpa.sim import list_profiles, load_profile

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    saved = structlog.get_config()
    try:
        yield
    finally:
        structlog.configure(**saved)


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m vduproxy ...` as a user runs it (for commands that start or stop a daemon)."""
    return subprocess.run(
        [sys.executable, "-m", "vduproxy", *argv], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"vduproxy {__version__}"


def test_single_pair_flags_become_one_pair() -> None:
    args = build_parser().parse_args(
        ["serve", "--socket", "/tmp/v.sock", "--device", "sim:profile=basic", "--mac", "52:54:00:00:00:09",
         "--svq", "always", "--socket-mode", "0660", "--queues", "1"]
    )  # fmt: skip
    cfg = daemon_config(args)
    (pair,) = cfg.pairs
    assert (pair.socket, pair.device, pair.svq, pair.socket_mode, pair.queues) == (
        "/tmp/v.sock", "sim:profile=basic", "always", 0o660, 1,
    )  # fmt: skip
    assert pair.mac == bytes.fromhex("525400000009")
    # a single pair from flags gets no control socket unless asked: two test proxies must not collide
    assert cfg.control is None
    args = build_parser().parse_args(["serve", "--socket", "/tmp/v.sock", "--control", "/tmp/c.sock"])
    assert daemon_config(args).control == "/tmp/c.sock"


def test_config_excludes_pair_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "v.toml"
    cfg.write_text('[pairs.a]\nsocket = "/tmp/a.sock"\n[daemon]\ncontrol = "/tmp/c.sock"\n')
    args = build_parser().parse_args(["serve", "--config", str(cfg), "--socket", "/tmp/b.sock", "--client"])
    with pytest.raises(UsageError, match="--socket, --client cannot be combined with --config"):
        daemon_config(args)
    args = build_parser().parse_args(["serve", "--config", str(cfg), "--control", "none"])
    assert daemon_config(args).control is None
    with pytest.raises(UsageError, match="--socket PATH"):
        daemon_config(build_parser().parse_args(["serve"]))


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--socket", "/s", "--mac", "nope"],
        ["serve", "--socket", "/s", "--socket-mode", "8"],
        ["serve", "--socket", "/s", "--metrics", "9100"],
        ["stats", "--watch", "0"],
        ["mode", "turbo"],
        ["state", "save"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_qemu_args_name_the_socket_and_the_required_options() -> None:
    text = qemu_args("/run/vduproxy/g.sock")
    assert "path=/run/vduproxy/g.sock" in text
    for needed in ("memory-backend-memfd", "share=on", "vectors=0", "-netdev vhost-user"):
        assert needed in text


def test_inspect_reports_what_the_profile_defines(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--device", "sim:profile=vdpasim", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    prof = load_profile("vdpasim")
    assert int(info["features"], 16) == prof.features
    assert info["mac"] == prof.mac.hex(":")
    assert (info["mtu"], info["ring_max"], info["max_pairs"]) == (prof.mtu, prof.ring_max, prof.queue_pairs)
    assert "CTRL_VQ" in info["features_names"] and info["device_type"] == "net"
    assert main(["inspect", "--device", "sim:profile=nosuch"]) == 1


def test_devices_lists_profiles_and_vdpa_nodes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in out["sim_profiles"]] == list_profiles()
    nodes = sorted(str(p) for p in Path("/dev").glob("vhost-vdpa-*"))
    assert sorted(d["path"] for d in out["devices"]) == nodes
    assert main(["devices"]) == 0
    text = capsys.readouterr().out
    for name in list_profiles():
        assert name in text


def test_devices_reports_a_node_it_cannot_use(tmp_path: Path) -> None:
    from vduproxy.cli import list_devices

    # a regular file where a char device should be: reported, not a crash
    (tmp_path / "vhost-vdpa-3").write_bytes(b"")
    (entry,) = list_devices(tmp_path)
    assert entry["status"] == "unusable" and "not a character device" in entry["error"]


def test_compat_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    # the same device on both ends: nothing can break
    assert main(["compat", "vdpasim", "vdpasim"]) == 0
    assert "compatible" in capsys.readouterr().out
    # the rich profile offers MQ and 9000-byte frames a vdpa_sim_net destination cannot carry
    assert main(["compat", "rich", "sim:profile=vdpasim", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert not out["compatible"]
    assert any(p["severity"] == "error" and "MQ" in p["what"] for p in out["problems"])
    assert main(["compat", "/nonexistent/blob", "vdpasim"]) == 2


def test_state_show_refuses_what_is_not_a_blob(tmp_path: Path) -> None:
    blob = tmp_path / "s.state"
    blob.write_bytes(b"not a state blob at all")
    assert main(["state", "show", str(blob)]) == 1
    assert main(["state", "show", str(tmp_path / "missing")]) == 1


def test_format_stats_shows_every_pair() -> None:
    stats: dict[str, Any] = {
        "daemon": {"version": "0.1.0", "pid": 1, "uptime_s": 5},
        "pairs": {
            "a": {"state": "running", "attached": True, "mode": "svq", "svq_policy": "auto", "switches": 2,
                  "socket": "/a", "device": "sim",
                  "queues": {"0": {"mode": "svq", "packets": 17, "device_packets": 17}}},
            "b": {"state": "failed", "error": "open: busy", "socket": "/b", "device": "/dev/vhost-vdpa-0"},
        },
    }  # fmt: skip
    text = format_stats(stats)
    assert "pair a: running attached mode=svq svq=auto switches=2" in text
    assert "pair b: failed" in text and "error: open: busy" in text
    assert any(line.split()[:3] == ["0", "svq", "17"] for line in text.splitlines())
    assert "pair b" not in format_stats(stats, "a")


def test_format_event_is_one_readable_line() -> None:
    line = format_event({"event": "vhost_user_request", "pair": "a", "level": "debug", "timestamp": 0.5,
                         "logger_name": "vduproxy.server", "request": "SET_FEATURES"})  # fmt: skip
    assert "[a]" in line and "vhost_user_request" in line and "request=SET_FEATURES" in line
    assert "\n" not in line


@pytest.fixture
def run_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vdup-u-", dir="/tmp"))
    try:
        yield d
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def test_serve_exits_1_when_every_pair_fails(run_dir: Path) -> None:
    cfg = run_dir / "v.toml"
    cfg.write_text(
        f'[daemon]\ncontrol = "{run_dir}/c.sock"\n'
        f'[pairs.x]\nsocket = "{run_dir}/x.sock"\ndevice = "{run_dir}/vhost-vdpa-1"\n'
        f'[pairs.y]\nsocket = "{run_dir}/y.sock"\ndevice = "sim:profile=nosuch"\n'
    )
    res = run("--log-format", "json", "serve", "--config", str(cfg))
    assert res.returncode == 1, res.stderr
    events = [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]
    failed = {e["pair"]: e["error"] for e in events if e["event"] == "pair_failed"}
    assert set(failed) == {"x", "y"} and "nosuch" in failed["y"]
    assert not (run_dir / "c.sock").exists()  # the control socket is removed on the way out


def test_serve_refuses_a_bad_config_and_a_taken_control_socket(run_dir: Path) -> None:
    cfg = run_dir / "v.toml"
    cfg.write_text('[pairs.a]\nsocket = "/tmp/a.sock"\nsvq = "maybe"\n')
    res = run("--log-format", "json", "serve", "--config", str(cfg))
    assert res.returncode == 2 and "pairs.a.svq" in res.stderr
    # another process listens on the control path: refuse before opening any device
    taken = run_dir / "c.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(taken))
        other.listen(1)
        res = run("--log-format", "json", "serve", "--socket", str(run_dir / "a.sock"), "--control", str(taken))
    assert res.returncode == 1 and "in use" in res.stderr
    assert "device_probed" not in res.stderr
    os.unlink(taken)
