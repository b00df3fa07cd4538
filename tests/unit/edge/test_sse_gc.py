"""When the adapter collects its whole heap (`sse_gc.GcPacer`), on a stand-in for the `gc` module."""

from __future__ import annotations

import asyncio

from meshkit.edge.sse_gc import FORCE_FACTOR, GcPacer


class Collector:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def freeze(self) -> None:
        self.calls.append("freeze")

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")

    def collect(self) -> int:
        self.calls.append("collect")
        return 7


def test_everything_alive_is_frozen_each_tick_and_the_heap_collected_after_enough_closed_streams() -> None:
    streams = [10, 0]  # open, closed so far
    gc = Collector()
    pacer = GcPacer(lambda: (streams[0], streams[1]), full_after_closed=100, collector=gc)
    assert pacer.tick() is None
    assert gc.calls == ["freeze"]  # nothing closed: only freezing
    streams[1] = 99
    assert pacer.tick() is None  # not enough closed yet
    streams[1] = 150  # enough, but they are closing now: not in the middle of a burst
    assert pacer.tick() is None
    gc.calls.clear()
    assert pacer.tick() == 7  # a quiet interval: one full collection, then frozen again
    assert gc.calls == ["unfreeze", "collect", "freeze"]
    streams[0], streams[1] = 300, 400  # 250 closed since; 300 open: due at 300
    assert pacer.tick() is None
    streams[1] = 400 + FORCE_FACTOR * 300  # closing all the time: collected anyway at 4x
    assert pacer.tick() == 7


async def test_start_freezes_the_start_up_heap_and_stop_unfreezes() -> None:
    gc = Collector()
    pacer = GcPacer(lambda: (0, 0), interval=0.01, collector=gc)
    await pacer.start()
    await asyncio.sleep(0.05)
    await pacer.stop()
    assert gc.calls[0] == "freeze" and gc.calls.count("freeze") >= 2  # at start, then each tick
    assert gc.calls[-1] == "unfreeze" and "collect" not in gc.calls
