"""One task checking every conversation's idle heartbeats, instead of nats-py's task per subscription.

nats-py (2.x) starts `_JSI.activity_check` for every push consumer with idle heartbeats: it sleeps two
heartbeat intervals, and when no message (data or heartbeat) came meanwhile an ordered consumer
re-creates itself from the next stream sequence (`reset_ordered_consumer`): how the hub's subscriptions
survive a leaf restart or a partition without losing a token. With 2,000 conversations and the
default `--consumer-heartbeat` 2 s that is 500 timers a second, each alive 4 s (three tracked objects
each: a good part of what the garbage collector's young generations had to walk under the issue's load).

`HeartbeatCheck` applies the same rule to every subscription of the hub from one task, every two
heartbeat intervals: a subscription that saw nothing since the previous round is reset, in a task of
its own (nats-py's read loop marks it active on every message). A subscription made just before a
round counts as active in it (nats-py starts it active), so it is judged over a full interval after,
as nats-py's own check would. `stop(subscription)` cancels nats-py's task after subscribing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from meshkit.edge.sse_flow_control import jetstream_state

log = logging.getLogger("meshkit.edge.hub")

__all__ = ["HeartbeatCheck"]


class HeartbeatCheck:
    def __init__(self, interval: float, subscriptions: Callable[[], Iterable[Any]]) -> None:
        self.interval = interval
        self._subscriptions = subscriptions
        self._task: asyncio.Task[None] | None = None
        self._resets: set[asyncio.Task[Any]] = set()

    @staticmethod
    def stop(subscription: Any) -> bool:
        """Cancel nats-py's own check of `subscription`; whether there was one running."""
        task = getattr(jetstream_state(subscription), "_hbtask", None)
        if task is None or task.done():
            return False
        task.cancel()
        return True

    def start(self) -> None:
        """Run the rounds (again, after `close()`); idempotent."""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.check()

    def check(self) -> int:
        """One round: reset the ordered consumers that saw nothing since the last; how many."""
        reset = 0
        for subscription in list(self._subscriptions()):
            jsi = jetstream_state(subscription)
            if jsi is None or jsi._conn.is_closed:
                continue
            active, jsi._active = jsi._active, False
            if not active and jsi._ordered:
                reset += 1
                task = asyncio.ensure_future(self._reset(jsi))
                self._resets.add(task)
                task.add_done_callback(self._resets.discard)
        return reset

    async def _reset(self, jsi: Any) -> None:
        try:
            await jsi.reset_ordered_consumer(jsi._sseq + 1)
        except Exception as exc:  # nats-py's check would have died of it: say so, the next round retries
            log.warning("re-creating an ordered consumer after missed heartbeats failed: %r", exc)

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._resets) if t is not None]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
