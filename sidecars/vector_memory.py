"""The embedding cache's memory tier: a least-recently-used map of vectors, bounded in bytes.

`VectorMemory(limit)` sits in front of either store: filled on every store read that found a vector and
on every upstream answer, read first. The key is the item key (a SHA-256 over model, dimensions and
item, so model is part of it). Each entry is charged its vector bytes plus `ENTRY_OVERHEAD` (the key
string, the bytes object's header and the ordered dict's slot: 212 bytes per entry measured with
tracemalloc over 10,000 entries on CPython 3.11, charged 232), so `--memory-bytes` bounds what the
tier really holds. Putting an entry over the limit evicts the least recently used ones first; a vector
bigger than the whole limit is not kept. `limit` 0: off (every call a no-op; `get` answers None).

The rendered float text (`get_text`/`put_text`): a `float` answer prints every component of a vector
(0.3 ms per 1536 dims, ~5 ms for a batch of 16: the whole 5 ms budget), so the JSON array text of a
vector (`[0.0123,...]`, about 21 KB for 1536 dims against its 6 KB of float32) is kept beside it once
printed, and printed once per vector while it stays. It lives and dies with its vector (evicted,
replaced or never kept together) and is charged its length plus `TEXT_OVERHEAD` (the bytes object's
header, 33, and its dict slot, 21 on average measured with tracemalloc over 10,000 entries; charged
96), so a tier serving float clients holds about a quarter as many vectors in the same bytes.
`base64` clients never pay for it (their answer is the bytes themselves, 13 us per vector).

Plain and synchronous: it runs on the event loop, where a dict lookup costs less than a hop to a thread.
Counters (`evictions`) and gauges (`bytes`, `items`) are read by the cache's metrics.
"""

from __future__ import annotations

from collections import OrderedDict

ENTRY_OVERHEAD = 232  # bytes per entry beside the vector: 64-char key str 113 + bytes header 33 + slot
TEXT_OVERHEAD = 96  # bytes per rendered text beside its length: bytes header 33 + dict slot


class VectorMemory:
    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("the memory tier's limit is 0 (off) or a positive number of bytes")
        self.limit = limit
        self.bytes = 0
        self.evictions = 0
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._texts: dict[str, bytes] = {}  # key -> its vector's rendered float JSON text

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
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= len(old) + ENTRY_OVERHEAD
            self._drop_text(key)  # it was the old vector's
        self._entries[key] = data
        self.bytes += cost
        return self._evict()

    def get_text(self, key: str) -> bytes | None:
        """The rendered float text kept for `key`'s vector (see the module docstring), else None."""
        return self._texts.get(key)

    def put_text(self, key: str, text: bytes) -> int:
        """Keep `text` beside `key`'s vector (not without it); the number of entries evicted for it."""
        if key not in self._entries or key in self._texts:
            return 0
        cost = len(text) + TEXT_OVERHEAD
        if cost + len(self._entries[key]) + ENTRY_OVERHEAD > self.limit:  # never fits with its vector
            return 0
        self._entries.move_to_end(key)  # evicting for it never evicts its own vector
        self._texts[key] = text
        self.bytes += cost
        return self._evict()

    def _drop_text(self, key: str) -> None:
        text = self._texts.pop(key, None)
        if text is not None:
            self.bytes -= len(text) + TEXT_OVERHEAD

    def _evict(self) -> int:
        evicted_now = 0
        while self.bytes > self.limit:
            key, evicted = self._entries.popitem(last=False)
            self.bytes -= len(evicted) + ENTRY_OVERHEAD
            self._drop_text(key)
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
