"""The daemon's control socket, driven the way `vduproxy stats|trace|mode|state` drive it.

One in-process daemon with three pairs (two software devices, one device that cannot open), the project's
front-end on pair `a`, and the control socket in a temporary directory.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio

from vduproxy.config import DaemonConfig, PairConfig
from vduproxy.control import MAX_LINE, ControlClient, ControlError, TraceHub, call, install_trace
from vduproxy.daemon import Daemon
from vduproxy.migration.state import DeviceState
from vduproxy.prometheus import render
from vduproxy.testing.frontend import VhostUserFrontend
from vduproxy.testing.guest import GuestMemory, VirtioNetDriver, check_frames, make_frame
from vduproxy.virtio import NetF

pytestmark = pytest.mark.integration

MAC = bytes.fromhex("525400aabbcc")
FEATURES = NetF.VERSION_1 | NetF.MTU | NetF.MRG_RXBUF | NetF.RING_EVENT_IDX


@pytest.fixture
def run_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vdup-c-", dir="/tmp"))  # short: sun_path is 108 bytes
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    saved = structlog.get_config()
    try:
        yield
    finally:
        structlog.configure(**saved)


def config(d: Path) -> DaemonConfig:
    return DaemonConfig(
        pairs=(
            PairConfig("a", str(d / "a.sock"), "sim:profile=rich", mac=MAC),
            PairConfig("b", str(d / "b.sock"), "sim:profile=basic", svq="always"),
            PairConfig("broken", str(d / "c.sock"), str(d / "vhost-vdpa-7")),
        ),
        control=str(d / "control.sock"),
    )


@asynccontextmanager
async def running_daemon(cfg: DaemonConfig) -> AsyncIterator[Daemon]:
    hub = TraceHub()
    install_trace(hub, "info")
    daemon = Daemon(cfg, trace=hub)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        yield daemon
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def attached(path: str) -> AsyncIterator[tuple[VhostUserFrontend, VirtioNetDriver]]:
    with GuestMemory(64 << 20) as mem:
        fe = await VhostUserFrontend.connect(path)
        async with fe:
            await fe.qemu72_connect()
            driver = VirtioNetDriver(mem, features=FEATURES)
            await fe.qemu72_start(driver)
            yield fe, driver


async def roundtrip(driver: VirtioNetDriver, first: int, count: int) -> None:
    """`count` frames out and back through the loopback device, byte-exact."""
    seqs = range(first, first + count)
    driver.post_rx_buffers(0)
    with trio.fail_after(60):
        await driver.send_all([make_frame(200, s) for s in seqs])
        got = await driver.receive_frames(count)
    driver.reclaim_tx()
    report = check_frames(seqs, got)
    assert report.ok, report


async def stats(path: str) -> dict[str, Any]:
    reply = await call(path, {"verb": "stats"})
    return reply["stats"]["pairs"]  # type: ignore[no-any-return]


async def test_stats_trace_and_mode_follow_a_live_frontend(run_dir: Path, restore_logging: None) -> None:
    cfg = config(run_dir)
    ctl = str(cfg.control)
    async with running_daemon(cfg):
        # the control socket is the operator's: nobody else may connect
        assert stat.S_IMODE(os.stat(ctl).st_mode) == 0o600
        pairs = await stats(ctl)
        assert pairs["a"]["state"] == "running" and not pairs["a"]["attached"]
        assert pairs["b"]["state"] == "running"
        assert pairs["broken"]["state"] == "failed"
        assert "vhost-vdpa-7" in pairs["broken"]["error"]

        events: list[dict[str, Any]] = []
        tracer = await ControlClient.connect(ctl)
        feed = tracer.trace("a")

        async def follow() -> None:
            async for ev in feed:
                events.append(ev)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            async with attached(str(run_dir / "a.sock")) as (_fe, driver):
                await roundtrip(driver, 0, 100)
                pairs = await stats(ctl)
                a = pairs["a"]
                assert a["attached"] and a["mode"] == "passthrough"
                # the device counted what went through it: 100 frames out on TX (vq 1), 100 back on RX (vq 0)
                assert a["queues"]["1"]["device_packets"] >= 100
                assert a["queues"]["0"]["device_packets"] >= 100
                assert not pairs["b"]["attached"]

                reply = await call(ctl, {"verb": "mode", "pair": "a", "mode": "svq"})
                assert reply["mode"] == "svq"
                await roundtrip(driver, 100, 100)
                a = (await stats(ctl))["a"]
                assert a["mode"] == "svq" and a["switches"] == 1
                # in SVQ mode the proxy's own core forwarded the second batch
                assert a["queues"]["1"]["packets"] >= 100

                reply = await call(ctl, {"verb": "mode", "pair": "a", "mode": "auto"})
                assert reply["mode"] == "passthrough"
                await roundtrip(driver, 200, 50)

                # the trace saw the vhost-user set-up and the proxy's CVQ command programming the MAC
                with trio.fail_after(30):
                    while not any(e.get("event") == "cvq_command" for e in events):
                        await trio.sleep(0.05)
            await tracer.aclose()
        requests = [e.get("request") for e in events if e.get("event") == "vhost_user_request"]
        assert "SET_MEM_TABLE" in requests and "SET_VRING_KICK" in requests
        assert all(e.get("pair") == "a" for e in events)
        cvq = next(e for e in events if e.get("event") == "cvq_command")
        assert MAC.hex(":") in json.dumps(cvq)

        # a pair with no front-end cannot switch: a clear error, nothing else disturbed
        with pytest.raises(ControlError) as err:
            await call(ctl, {"verb": "mode", "pair": "b", "mode": "passthrough"})
        assert err.value.code == "device"
        with pytest.raises(ControlError) as err:
            await call(ctl, {"verb": "mode", "mode": "svq"})
        assert err.value.code == "unknown_pair" and "a, b, broken" in err.value.message
        with pytest.raises(ControlError) as err:
            await call(ctl, {"verb": "mode", "mode": "svq", "pair": "zzz"})
        assert err.value.code == "unknown_pair"
        assert (await stats(ctl))["b"]["state"] == "running"


async def test_state_save_and_load_through_the_control_socket(run_dir: Path, restore_logging: None) -> None:
    cfg = config(run_dir)
    ctl = str(cfg.control)
    async with running_daemon(cfg):
        with pytest.raises(ControlError) as err:
            await call(ctl, {"verb": "state", "op": "save", "pair": "a"})
        assert err.value.code == "state"  # nothing attached yet: nothing to save
        with pytest.raises(ControlError) as err:
            await call(ctl, {"verb": "state", "op": "save", "pair": "broken"})
        assert err.value.code == "not_running"
        async with attached(str(run_dir / "a.sock")) as (fe, driver):
            await roundtrip(driver, 0, 20)
            with pytest.raises(ControlError) as err:
                await call(ctl, {"verb": "state", "op": "save", "pair": "a"})
            assert err.value.code == "state" and "running" in err.value.message
            await fe.qemu72_stop(driver)
            saved = await call(ctl, {"verb": "state", "op": "save", "pair": "a"})
        assert saved["bytes"] > 0
        state = DeviceState.from_bytes(base64.b64decode(saved["blob"]))
        assert state.mac == MAC  # the MAC the pair programmed travels with the state
        # the CLI's view of the same blob, through a file
        (run_dir / "a.state").write_bytes(base64.b64decode(saved["blob"]))
        res = await trio.run_process(
            [sys.executable, "-m", "vduproxy", "state", "show", str(run_dir / "a.state")], capture_stdout=True
        )
        assert json.loads(res.stdout)["mac"] == MAC.hex(":")
        loaded = await call(ctl, {"verb": "state", "op": "load", "pair": "a", "blob": saved["blob"]})
        assert loaded["bytes"] == saved["bytes"]
        with pytest.raises(ControlError) as err:
            await call(ctl, {"verb": "state", "op": "load", "pair": "a", "blob": base64.b64encode(b"junk").decode()})
        assert err.value.code == "state"


async def raw_exchange(path: str, payload: bytes) -> list[dict[str, Any]]:
    """Send raw bytes, half-close, read every reply line."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        await sock.connect(path)
        view = memoryview(payload)
        while view:
            view = view[await sock.send(view) :]
        sock.shutdown(socket.SHUT_WR)
        data = b""
        with trio.fail_after(30):
            while chunk := await sock.recv(65536):
                data += chunk
    return [json.loads(line) for line in data.splitlines()]


async def test_bad_requests_get_structured_errors(run_dir: Path, restore_logging: None) -> None:
    cfg = config(run_dir)
    ctl = str(cfg.control)
    async with running_daemon(cfg):
        lines = [
            b"this is not json",
            b"[1, 2]",
            b'{"verb": 7}',
            b'{"verb": "reboot"}',
            b'{"verb": "mode", "pair": "a", "mode": "fast"}',
            b'{"verb": "mode", "pair": ["a"], "mode": "svq"}',
            b'{"verb": "state", "op": "load", "pair": "a", "blob": "%%%"}',
            b'{"verb": "state", "op": "erase", "pair": "a"}',
            b'{"verb": "stats"}',
        ]
        replies = await raw_exchange(ctl, b"\n".join(lines) + b"\n")
        assert len(replies) == len(lines)
        for reply in replies[:-1]:
            assert reply["ok"] is False and reply["code"] == "bad_request" and reply["error"]
        # the same connection still works after every refusal
        assert replies[-1]["ok"] is True and set(replies[-1]["stats"]["pairs"]) == {"a", "b", "broken"}

        # a line that never ends is cut off at the limit; the client is dropped, the daemon carries on
        replies = await raw_exchange(ctl, b"x" * (MAX_LINE + 70000))
        assert replies[-1]["ok"] is False and "longer than" in replies[-1]["error"]
        assert (await stats(ctl))["a"]["state"] == "running"


async def test_prometheus_text_carries_the_pairs(run_dir: Path, restore_logging: None) -> None:
    cfg = config(run_dir)
    async with running_daemon(cfg) as daemon, attached(str(run_dir / "a.sock")) as (_fe, driver):
        await roundtrip(driver, 0, 30)
        text = render(daemon.stats())
    assert 'vduproxy_pair_up{pair="a"} 1' in text
    assert 'vduproxy_pair_up{pair="broken"} 0' in text
    assert 'vduproxy_pair_attached{pair="a"} 1' in text
    tx = [ln for ln in text.splitlines() if ln.startswith('vduproxy_vq_device_packets_total{pair="a",vq="1"}')]
    assert tx and int(tx[0].rsplit(" ", 1)[1]) >= 30
    for line in text.splitlines():  # every sample line is `name{labels} number`
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


async def test_cli_stats_against_the_daemon(run_dir: Path, restore_logging: None) -> None:
    cfg = config(run_dir)
    ctl = str(cfg.control)
    async with running_daemon(cfg):
        res = await trio.run_process(
            [sys.executable, "-m", "vduproxy", "stats", "--control", ctl, "--json"], capture_stdout=True,
            capture_stderr=True, check=False,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        assert out["pairs"]["broken"]["state"] == "failed" and out["pairs"]["a"]["state"] == "running"
        res = await trio.run_process(
            [sys.executable, "-m", "vduproxy", "stats", "--control", ctl], capture_stdout=True, check=False
        )
        text = res.stdout.decode()
        assert "pair a: running waiting for a front-end" in text and "pair broken: failed" in text
        res = await trio.run_process(
            [sys.executable, "-m", "vduproxy", "mode", "svq", "--control", ctl], capture_stdout=True,
            capture_stderr=True, check=False,
        )  # fmt: skip
        assert res.returncode == 1 and b"unknown_pair" in res.stderr
    res = await trio.run_process(
        [sys.executable, "-m", "vduproxy", "stats", "--control", ctl], capture_stderr=True, check=False
    )
    assert res.returncode == 1 and b"no vduproxy daemon" in res.stderr


async def test_serve_restore_state_file_replays_into_the_device(tmp_path: Path) -> None:
    """`serve --restore-state FILE`: the blob is checked at start-up (a corrupt one fails the pair loudly) and a
    good one is replayed through the device's CVQ when the front-end starts the rings."""
    from vduproxy.migration.compat import device_summary
    from vduproxy.migration.state import DeviceState
    from vduproxy.testing.guest import GUEST_MAC, GuestMemory, VirtioNetDriver
    from vduproxy.testing.proxy import open_proxy
    from vduproxy.vdpa.factory import open_device
    from vduproxy.virtio import NetF

    dev = open_device("sim:profile=vdpasim")
    try:
        summary = device_summary(dev)
    finally:
        dev.close()
    good = DeviceState(
        guest_features=int(NetF.VERSION_1), mac=GUEST_MAC, config_mac=summary.mac or bytes(6), source=summary
    ).to_bytes()
    (tmp_path / "good.state").write_bytes(good)
    (tmp_path / "bad.state").write_bytes(good[:-3])
    sock = tmp_path / "r.sock"
    async with open_proxy(sock, "sim:profile=vdpasim", ["--restore-state", str(tmp_path / "bad.state")],
                          wait_listening=False) as proxy:  # fmt: skip
        failed = await proxy.wait_event("pair_failed", timeout=30)
        assert "restore state" in failed["error"]
    async with open_proxy(sock, "sim:profile=vdpasim", ["--restore-state", str(tmp_path / "good.state")]) as proxy:
        from vduproxy.testing.frontend import VhostUserFrontend

        with GuestMemory(32 << 20) as mem:
            fe = await VhostUserFrontend.connect(str(sock))
            async with fe:
                await fe.qemu72_connect()
                await fe.qemu72_start(VirtioNetDriver(mem, queue_size=256))
                restored = await proxy.wait_event("device_state_restored", timeout=30)
                assert restored["mac"] == GUEST_MAC.hex(":")
                cvq = proxy.events("cvq_command")
                assert cvq and (cvq[0]["cls"], cvq[0]["cmd"], cvq[0]["ack"]) == ("MAC", "ADDR_SET", "ok")
