"""Traffic helpers for tests driving the proxy with the Python virtio-net driver."""

from __future__ import annotations

import random

import trio

from .guest import VirtioNetDriver, check_frames, make_frame

SIZES = (60, 64, 128, 576, 1514, 4000, 9000)


class Pump:
    """Keeps every pair's TX full and its RX drained until all frames are back (or `run` is bounded)."""

    def __init__(self, driver: VirtioNetDriver, count: int, seed: int, *, max_size: int = 9000, first_seq: int = 0):
        rng = random.Random(seed)
        sizes = [s for s in SIZES if s <= max_size]
        self.driver = driver
        self.first_seq = first_seq
        self.sizes = [rng.choice((*sizes, rng.randint(60, max_size))) for _ in range(count)]
        self.next = 0
        self.received: list[bytes] = []

    @property
    def done(self) -> bool:
        return len(self.received) >= len(self.sizes)

    def step(self) -> bool:
        """One non-blocking round over every pair; True when something moved."""
        d = self.driver
        progressed = False
        for pair in range(d.pairs):
            d.post_rx_buffers(pair)
            end = min(self.next + 32, len(self.sizes))
            batch = [make_frame(self.sizes[i], self.first_seq + i) for i in range(self.next, end)]
            if batch:
                n = d.send(batch, pair)
                self.next += n
                progressed |= n > 0
            d.reclaim_tx(pair)
            got = d.receive(pair)
            self.received += got
            progressed |= bool(got)
        return progressed

    async def run(self, timeout: float = 600, *, until: int | None = None) -> None:
        """Pump until every frame is back (or `until` frames were received)."""
        target = len(self.sizes) if until is None else until
        d = self.driver
        with trio.fail_after(timeout):
            while len(self.received) < target:
                if not self.step():
                    with trio.move_on_after(0.01):
                        await d.wait_call(d.rx(0).index)
                await trio.lowlevel.checkpoint()

    def check(self) -> None:
        report = check_frames(range(self.first_seq, self.first_seq + len(self.sizes)), self.received)
        assert report.ok, report
