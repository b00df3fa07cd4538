"""The hub's paced deletion of unwatched conversations' consumers (`sse_consumer_deleter`), on a stand-in
for JetStream's delete request (the real one: tests/integration/test_sse.py, a consumer gone after its
viewers left)."""

from __future__ import annotations

import asyncio
import time

from meshkit.edge.sse_consumer_deleter import ConsumerDeleter


async def test_deletes_go_one_at_a_time_oldest_first_at_most_rate_a_second() -> None:
    deleted: list[tuple[str, float]] = []
    in_flight = 0

    async def delete(name: str) -> None:
        nonlocal in_flight
        in_flight += 1
        assert in_flight == 1
        await asyncio.sleep(0)
        deleted.append((name, time.monotonic()))
        in_flight -= 1

    deleter = ConsumerDeleter(delete, rate=50.0)
    for i in range(5):
        deleter.add(f"c{i}")
    began = time.monotonic()
    while len(deleted) < 5:
        assert time.monotonic() - began < 2
        await asyncio.sleep(0.01)
    assert [n for n, _ in deleted] == ["c0", "c1", "c2", "c3", "c4"]
    assert deleted[-1][1] - deleted[0][1] >= 4 / 50 * 0.9  # paced: 20 ms apart at least
    await deleter.close()


async def test_a_full_backlog_leaves_the_oldest_to_the_server_and_close_tries_the_rest_once() -> None:
    deleted: list[str] = []
    gate = asyncio.Event()

    async def delete(name: str) -> None:
        if name == "stuck":
            await gate.wait()  # never answered: bounded by the timeout
        deleted.append(name)

    deleter = ConsumerDeleter(delete, rate=1.0, backlog=3, timeout=0.2)
    deleter.add("stuck")
    await asyncio.sleep(0)  # the first is under way
    for name in ("a", "b", "c", "d"):
        deleter.add(name)
    assert list(deleter.waiting) == ["b", "c", "d"]  # "a" dropped: the oldest waiting
    await asyncio.sleep(0.3)  # "stuck" timed out; then the pause of 1 s before "b"
    await deleter.close()  # the rest at once, within the timeout
    assert sorted(deleted) == ["b", "c", "d"]
    assert not deleter.waiting
