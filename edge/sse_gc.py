"""When the adapter's garbage collector walks its heap: paced by closed streams, not by allocations.

CPython's collector walks every tracked object of the oldest generation once a quarter more have
reached it since the last full collection. With 10,000 open streams that is about 1.5 million objects
(the connections, requests, responses, viewers, subscriptions): a full collection held the event loop
for 290-390 ms (measured with `gc.callbacks` under the issue's load), nine of them while the streams
opened, then one about every minute while tokens flowed (what reaches the old generation then is mostly
nats-py's per-message futures, alive until each conversation's next message): every delivery due in
those 0.4 s waited for it.

`GcPacer` moves everything alive into the permanent generation (`gc.freeze()`) after start-up and
then every `interval` seconds, so the automatic collections only ever walk what was allocated since
(a second's worth: a few thousand objects). Frozen objects are still freed by reference counting the
moment they are unused; what freezing keeps is garbage in reference cycles (what a closed stream leaves
in cycles: a cancelled handler's traceback and frames, aiohttp's and nats-py's own objects; the hub and
the viewer let go of the conversation and the connection when a stream ends, so those are not kept
with it). So once `full_after_closed` streams closed (or as many as are open, when more are) it
unfreezes and collects once, at the end of an interval in which no stream closed (a burst of endings
is not held up by it), or anyway once four times as many closed: one full pause per that many closed
streams instead of one per minute of tokens, and the cycles kept meanwhile bounded by that many
streams' worth.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("meshkit.edge.sse")

__all__ = ["FORCE_FACTOR", "GcPacer"]

FORCE_FACTOR = 4  # a full collection waits for a quiet interval until this many times its due count


class GcPacer:
    def __init__(
        self,
        streams: Callable[[], tuple[int, int]],
        *,
        interval: float = 1.0,
        full_after_closed: int = 5_000,
        collector: Any = gc,
    ) -> None:
        """`streams()`: (streams open now, streams closed so far)."""
        self._streams = streams
        self.interval = interval
        self.full_after_closed = full_after_closed
        self._gc = collector
        self._closed_at_full = 0
        self._closed_at_tick = 0
        self._task: asyncio.Task[None] | None = None

    def tick(self) -> int | None:
        """Freeze what is alive; first a full collection when enough streams closed since the last
        (what it freed, else None)."""
        open_now, closed = self._streams()
        since, freed = closed - self._closed_at_full, None
        due = max(self.full_after_closed, open_now)
        quiet = closed == self._closed_at_tick
        self._closed_at_tick = closed
        if since >= FORCE_FACTOR * due or (since >= due and quiet):
            began = time.monotonic()
            self._gc.unfreeze()
            freed = self._gc.collect()
            self._closed_at_full = closed
            log.info(
                "gc: full collection after %d closed streams (%d open): %d objects freed in %.0f ms",
                since,
                open_now,
                freed,
                (time.monotonic() - began) * 1000,
            )
        self._gc.freeze()
        return freed

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.tick()

    async def start(self) -> None:
        self._gc.freeze()  # the start-up heap (modules, classes, options): never garbage
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._gc.unfreeze()  # an ordinary heap again for the rest of the shutdown
