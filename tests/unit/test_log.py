"""vduproxy.log: JSON lines, and held() keeping a latency-critical section free of log writes."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import structlog

from vduproxy.log import HOLD_MAX, configure, get_logger, held

pytestmark = pytest.mark.unit


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


@pytest.fixture
def stream() -> Iterator[CountingStream]:
    saved = structlog.get_config()
    out = CountingStream()
    configure("info", json=True, stream=out)
    try:
        yield out
    finally:
        configure("info", json=True)
        structlog.configure(**saved)


def events(out: io.StringIO) -> list[str]:
    return [json.loads(line)["event"] for line in out.getvalue().splitlines()]


def test_lines_are_json_and_written_at_once(stream: CountingStream) -> None:
    log = get_logger("t", pair="a")
    log.info("one", x=1)
    assert events(stream) == ["one"]
    line = json.loads(stream.getvalue())
    assert line["pair"] == "a" and line["x"] == 1 and line["level"] == "info" and line["logger_name"] == "t"
    log.debug("filtered")
    assert events(stream) == ["one"]


def test_held_lines_come_out_in_order_in_one_write_when_the_block_ends(stream: CountingStream) -> None:
    log = get_logger("t")
    log.info("before")
    writes = stream.writes
    with held():
        log.info("a")
        with held():  # nested: released with the outer block
            log.warning("b")
        log.info("c")
        assert events(stream) == ["before"] and stream.writes == writes
    assert events(stream) == ["before", "a", "b", "c"]
    assert stream.writes == writes + 1
    stamps = [json.loads(line)["timestamp"] for line in stream.getvalue().splitlines()]
    assert stamps == sorted(stamps)  # each keeps the time it was logged at


def test_held_lines_are_written_when_the_block_fails(stream: CountingStream) -> None:
    log = get_logger("t")
    with pytest.raises(RuntimeError), held():
        log.error("about to fail")
        raise RuntimeError("boom")
    assert events(stream) == ["about to fail"]


def test_a_long_hold_does_not_grow_without_bound(stream: CountingStream) -> None:
    log = get_logger("t")
    with held():
        for i in range(HOLD_MAX + 5):
            log.info("n", i=i)
        assert len(events(stream)) == HOLD_MAX  # the cap wrote what was held, in order
    order = [json.loads(line)["i"] for line in stream.getvalue().splitlines()]
    assert order == list(range(HOLD_MAX + 5))
