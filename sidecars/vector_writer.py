"""Write-behind for the embedding cache: vectors reach the store after the answer has gone out.

Decided: write-behind with a bounded queue, not a bounded wait. The answer needs nothing from the
write (the vectors are already in hand and in the memory tier), so making the client wait even a
bounded time for S3 would only add latency; and a bounded wait still needs a policy for the write that
overran it, which is this queue anyway.

- `submit(model, key, data)` never waits: the item joins a queue of at most `capacity` items (about
  6 KiB each for 1536 dimensions: 4096 items are 25 MiB) or, when the queue is full, is dropped and
  counted (`on_dropped`); it will be written the next time it is missed. A key already queued or being
  written is not queued again.
- `workers` tasks take items in order and call `store.write` under a deadline of `timeout` seconds
  each; a failure or a timeout is reported (`on_error`) and the item stays unwritten.
- `pending`: key -> vector of every item queued or being written. The cache reads it before the store,
  so an item answered a moment ago is a hit even when the memory tier is off and S3 has not stored it
  yet.
- `close(deadline)` (SIGTERM, after the listeners drained): the workers get `deadline` seconds to
  empty the queue, then are cancelled; what is left is logged as abandoned, counted as dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from meshkit.sidecars.vector_store import VectorStore

log = logging.getLogger("meshkit.embedding_cache")


class WriteBehind:
    def __init__(
        self,
        store: VectorStore,
        *,
        capacity: int,
        workers: int,
        timeout: float,
        on_written: Callable[[int], None] = lambda _: None,
        on_error: Callable[[OSError], None] = lambda _: None,
        on_dropped: Callable[[int], None] = lambda _: None,
    ) -> None:
        self.store = store
        self.timeout = timeout
        self.pending: dict[str, bytes] = {}
        self._queue: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue(maxsize=capacity)
        self._workers_wanted = workers
        self._workers: list[asyncio.Task[None]] = []
        self._on_written = on_written
        self._on_error = on_error
        self._on_dropped = on_dropped

    def __len__(self) -> int:
        return len(self.pending)

    async def start(self) -> None:
        self._workers = [asyncio.create_task(self._work()) for _ in range(self._workers_wanted)]

    def submit(self, model: str, key: str, data: bytes) -> bool:
        """Queue one write; False when it was dropped (queue full) or is already pending."""
        if key in self.pending:
            return False
        try:
            self._queue.put_nowait((model, key, data))
        except asyncio.QueueFull:
            self._on_dropped(1)
            return False
        self.pending[key] = data
        return True

    async def _work(self) -> None:
        while True:
            model, key, data = await self._queue.get()
            try:
                async with asyncio.timeout(self.timeout):
                    written = await self.store.write(model, key, data)
                self._on_written(written)
            except TimeoutError:
                self._on_error(OSError(f"the write did not finish within {self.timeout:g} s"))
            except OSError as exc:
                self._on_error(exc)
            finally:
                self.pending.pop(key, None)
                self._queue.task_done()

    async def close(self, deadline: float) -> None:
        """Let the workers empty the queue for up to `deadline` seconds, then stop them."""
        if self._workers and self.pending:  # queued or being written
            try:
                async with asyncio.timeout(deadline):
                    await self._queue.join()
            except TimeoutError:
                left = self._queue.qsize()
                log.warning("%d queued store writes abandoned after %g s", left, deadline)
                self._on_dropped(left)
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers = []
