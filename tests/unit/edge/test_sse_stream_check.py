"""The adapter's readiness check (`edge/sse.py` `_Nats._check`) tells the hub when to read what a lost
link lost (`on_back`): after checks that failed, and after a lost connection even when a check answered
just before the loss, so readiness never changed across it. A fake NATS client stands in (the real
cases, a cut leaf and a restarted one, are test_sse_partition and test_sse_resilience)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from meshkit.admin import Readiness
from meshkit.edge.sse import _Nats
from meshkit.edge.sse_options import SseOptions


class FakeJetStream:
    def __init__(self, client: FakeClient) -> None:
        self.client = client

    async def stream_info(self, name: str) -> Any:
        self.client.checks += 1
        if self.client.failing:
            raise TimeoutError("no answer")
        return object()


class FakeClient:
    def __init__(self) -> None:
        self.is_connected = True
        self.failing = False
        self.checks = 0

    def jetstream(self, **_: Any) -> FakeJetStream:
        return FakeJetStream(self)


class FakeLife:
    def __init__(self) -> None:
        self.readiness = Readiness()


async def checks(conn: _Nats, client: FakeClient, count: int) -> None:
    """Let the check loop run `count` more checks."""
    target = client.checks + count
    for _ in range(200):
        if client.checks >= target:
            await asyncio.sleep(0.01)  # the rest of that round
            return
        conn._poke.set()
        await asyncio.sleep(0.005)
    raise AssertionError("the check loop did not run")


async def test_on_back_after_failed_checks_and_after_a_lost_connection_only() -> None:
    opts = dataclasses.replace(SseOptions(), ready_interval=10.0)
    conn = _Nats(opts, FakeLife())  # type: ignore[arg-type]
    client = FakeClient()
    conn.client = client  # type: ignore[assignment]
    backs: list[int] = []
    conn.on_back = lambda: backs.append(client.checks)
    task = asyncio.ensure_future(conn._check())
    try:
        await checks(conn, client, 2)
        assert backs == []  # ready all along: nothing was lost
        client.failing = True
        await checks(conn, client, 1)
        client.failing = False
        await checks(conn, client, 2)
        assert len(backs) == 1  # the stream answers again after it did not: once
        # a check answered just before the connection went: `_ok` stays True across the loss ...
        conn._resync_due = True  # what the disconnected callback sets (with _ok False; a late
        client.is_connected = False  # check's answer then set it True again)
        await asyncio.sleep(0.02)
        client.is_connected = True  # ... reconnected
        await checks(conn, client, 1)
        assert len(backs) == 2  # read after the reconnect anyway
        await checks(conn, client, 2)
        assert len(backs) == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
