"""The embedding cache's memory tier: a least-recently-used map of vectors, bounded in bytes.

`VectorMemory(limit)` sits in front of either store: filled on every store read that found a vector and
on every upstream answer, read first. The key is the item key (a SHA-256 over model, dimensions and
item, so model is part of it). Each entry is charged its vector bytes plus `ENTRY_OVERHEAD` (the key
string, the bytes object's header and the ordered dict's slot: 212 bytes per entry measured with
tracemalloc over 10,000 entries on CPython 3.11, charged 232), so `--memory-bytes` bounds what the
tier really holds. Putting an entry over the limit evicts the least recently used ones first; a vector
bigger than the whole limit is not kept. `limit` 0: off (every call a no-op; `get` answers None).

Plain and synchronous: it runs on the event loop, where a dict lookup costs less than a hop to a thread.
Counters (`evictions`) and gauges (`bytes`, `items`) are read by the cache's metrics.
"""

from __future__ import annotations

from collections import OrderedDict

ENTRY_OVERHEAD = 232  # bytes per entry beside the vector: 64-char key str 113 + bytes header 33 + slot


class VectorMemory:
    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("the memory tier's limit is 0 (off) or a positive number of bytes")
        self.limit = limit
        self.bytes = 0
        self.evictions = 0
        self._entries: OrderedDict[str, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: str) -> bytes | None:
        data = self._entries.get(key)
        if data is not None:
            self._entries.move_to_end(key)
        return data

    def put(self, key: str, data: bytes) -> int:
        """Keep `data` under `key`; the number of entries evicted to make room."""
        cost = len(data) + ENTRY_OVERHEAD
        if cost > self.limit:  # bigger than the whole tier (or the tier is off)
            return 0
        evicted_now = 0
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= len(old) + ENTRY_OVERHEAD
        self._entries[key] = data
        self.bytes += cost
        while self.bytes > self.limit:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= len(evicted) + ENTRY_OVERHEAD
            self.evictions += 1
            evicted_now += 1
        return evicted_now


def parse_memory_size(value: object) -> int:
    """`--memory-bytes`: `0` (off) or a size like `64MiB` (`meshkit.options.parse_size`)."""
    from meshkit.options import parse_size

    if str(value).strip() == "0":
        return 0
    try:
        return parse_size(value)
    except ValueError as exc:
        if "at most" in str(exc):  # parse_size's cap names Envoy's limits, which mean nothing here
            raise ValueError("must be at most 1GiB (the largest size meshkit's options parse)") from None
        raise
