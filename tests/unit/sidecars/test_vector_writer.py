"""Write-behind: a bounded queue (drops counted), pending items readable, a deadline per write, a flush
on close with its own deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from meshkit.sidecars.vector_store import FileStore
from meshkit.sidecars.vector_writer import WriteBehind


class SlowStore(FileStore):
    """A real file store whose writes wait on a gate (or forever)."""

    def __init__(self, root: Path, gate: asyncio.Event) -> None:
        super().__init__(root)
        self.gate = gate

    async def write(self, model: str, key: str, data: bytes) -> int:
        await self.gate.wait()
        return await super().write(model, key, data)

    async def get_many(self, model: str, keys: Sequence[str]) -> list[bytes | OSError | None]:
        return await super().get_many(model, keys)


def test_full_queue_drops_and_counts_pending_is_readable_close_flushes(tmp_path: Path) -> None:
    async def run() -> None:
        gate = asyncio.Event()
        store = SlowStore(tmp_path, gate)
        store.open()
        written: list[int] = []
        dropped: list[int] = []
        writer = WriteBehind(
            store, capacity=2, workers=1, timeout=5, on_written=written.append, on_dropped=dropped.append
        )
        await writer.start()
        assert writer.submit("m", "k1", b"\0\0\0\1")
        await asyncio.sleep(0)  # the worker takes k1 and waits on the gate
        assert writer.submit("m", "k2", b"\0\0\0\2") and writer.submit("m", "k3", b"\0\0\0\3")
        assert not writer.submit("m", "k4", b"\0\0\0\4")  # queue (2) full: dropped
        assert not writer.submit("m", "k2", b"\0\0\0\2")  # already pending: not queued twice
        assert dropped == [1]
        assert writer.pending["k1"] == b"\0\0\0\1" and set(writer.pending) == {"k1", "k2", "k3"}
        gate.set()
        await writer.close(5)
        assert written == [4, 4, 4] and writer.pending == {}
        assert store.get("m", "k3") == b"\0\0\0\3" and store.get("m", "k4") is None

    asyncio.run(run())


def test_a_write_past_its_deadline_is_an_error_and_close_gives_up_in_time(tmp_path: Path) -> None:
    async def run() -> None:
        store = SlowStore(tmp_path, asyncio.Event())  # never opens
        errors: list[OSError] = []
        dropped: list[int] = []
        writer = WriteBehind(
            store, capacity=10, workers=1, timeout=0.05, on_error=errors.append, on_dropped=dropped.append
        )
        await writer.start()
        writer.submit("m", "a", b"\0\0\0\0")
        await asyncio.sleep(0.2)
        assert len(errors) == 1 and "within 0.05 s" in str(errors[0]) and writer.pending == {}
        writer.timeout = 30
        for key in ("b", "c", "d"):
            writer.submit("m", key, b"\0\0\0\0")
        loop = asyncio.get_running_loop()
        began = loop.time()
        await writer.close(0.1)
        assert loop.time() - began < 1
        assert dropped == [2]  # c and d abandoned in the queue (b was being written)

    asyncio.run(run())
