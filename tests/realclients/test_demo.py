"""`vduproxy demo migrate` as a user runs it: a subprocess whose JSON timeline tells the live-migration story in
order, and which leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from vduproxy.testing.netns import ip_cmd
from vduproxy.testing.procs import ManagedProcess, open_service_nursery

pytestmark = pytest.mark.realclient

# What the demo must show for one migration, in the order it has to happen.
STORY = ("migration_started", "source_svq", "dirty_pages", "destination_started", "rarp_sent", "first_ping_after")
# Boot, migration and 5 s of pings take ~20 s on a quiet machine; TCG under load is several times slower.
RUN_TIMEOUT = 300


async def run_demo(*args: str) -> tuple[int, str, str]:
    with trio.fail_after(RUN_TIMEOUT):
        res = await trio.run_process(
            [sys.executable, "-m", "vduproxy", "demo", "migrate", *args],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
    return res.returncode, res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace")


def steps_of(doc: dict[str, Any], leg: int) -> list[dict[str, Any]]:
    return [s for s in doc["timeline"] if s["leg"] == leg]


async def test_demo_migrate_prints_the_story_in_order_and_cleans_up(
    require_kernel_feature: Callable[[str], Awaitable[None]],
) -> None:
    for feature in ("tun", "netns", "veth", "bridge"):
        await require_kernel_feature(feature)

    rc, out, err = await run_demo("--json", "--keep-going", "5")
    assert rc == 0, f"demo failed rc={rc}\n--- stdout ---\n{out}\n--- stderr ---\n{err[-4000:]}"
    doc = json.loads(out)
    assert doc["ok"] is True and doc["error"] is None

    leg = steps_of(doc, 1)
    names = [s["step"] for s in leg]
    for step in (*STORY, "migration_completed"):
        assert step in names, f"timeline lacks {step}: {names}"
    # the timeline is chronological, and the story's steps appear in causal order within it
    times = [s["t"] for s in doc["timeline"]]
    assert times == sorted(times)
    positions = [names.index(step) for step in STORY]
    assert positions == sorted(positions), f"steps out of order: {names}"

    by_name = {s["step"]: s for s in leg}
    # rich → vdpasim: the destination lacks what the guest negotiated on the source, so only SVQ can serve it
    assert by_name["destination_started"]["mode"] == "svq"
    assert by_name["source_svq"]["why"], "the switch to SVQ must say why"
    assert by_name["dirty_pages"]["pages"] > 0, "the source's SVQ logged no dirty page during the migration"
    done = by_name["migration_completed"]
    assert isinstance(done["downtime_ms"], int) and isinstance(done["total_ms"], int)
    assert done["downtime_ms"] <= done["total_ms"]
    # the guest acks no GUEST_ANNOUNCE in the demo, so the destination proxy announces it
    assert by_name["rarp_sent"]["sent"] is True

    (summary_leg,) = doc["legs"]
    assert summary_leg["destination_mode"] == "svq"
    assert summary_leg["answered_after_switchover"] > 0, "no ping answered after the switchover"
    summary = doc["summary"]
    assert summary["pings_sent"] == summary["pings_answered"] + summary["pings_lost"]
    assert summary["pings_answered"] > 0

    await assert_network_removed(err)


async def assert_network_removed(progress: str) -> None:
    """The demo's namespace, bridge and TAPs (it names them in its progress output) are gone."""
    m = re.search(r"netns (\S+), bridge (\S+), TAPs (\S+) and (\S+)", progress)
    assert m is not None, f"no network line in the progress output:\n{progress[-2000:]}"
    netns = (await ip_cmd(["ip", "netns", "list"])).stdout.decode()
    assert m[1] not in netns, f"namespace {m[1]} left behind"
    for link in m.groups()[1:]:
        res = await ip_cmd(["ip", "link", "show", link], check=False)
        assert res.returncode != 0, f"{link} still exists after the demo"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_ctrl_c_mid_run_removes_everything(require_kernel_feature: Callable[[str], Awaitable[None]]) -> None:
    for feature in ("tun", "netns", "veth", "bridge"):
        await require_kernel_feature(feature)
    demo = ManagedProcess("demo", [sys.executable, "-m", "vduproxy", "demo", "migrate", "--json"])
    async with open_service_nursery() as nursery:
        await demo.start(nursery)
        try:
            # interrupted with both daemons, QEMU and the pinger running
            await demo.output.wait_for(r"the guest answers pings", timeout=RUN_TIMEOUT)
            text = demo.output.text()
            children = [int(pid) for pid in re.findall(r"proxy-[ab] pid (\d+)", text)]
            os.kill(demo.pid, signal.SIGINT)
            rc = await demo.wait(timeout=120)
        finally:
            await demo.terminate()
    text = demo.output.text()
    assert rc == 130, text[-3000:]
    assert '"interrupted": "SIGINT"' in text
    assert len(children) == 2
    assert not [pid for pid in children if process_alive(pid)], "a daemon outlived the demo"
    await assert_network_removed(text)


async def test_demo_refuses_bad_arguments_with_a_usage_error() -> None:
    rc, _out, err = await run_demo("--keep-going", "soon")
    assert rc == 2
    assert "--keep-going" in err and "not a number" in err
