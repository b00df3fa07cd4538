"""What one viewer received, and latency distributions that merge across processes.

`SequenceTracker` (one per viewer) is fed each received sequence number and, once the publisher says
which range was sent (`first..last`, the final `done` message included), tells:

- delivered: distinct sequences of the range received;
- missing: sequences of the range never received;
- duplicates: receptions of a sequence already received;
- out of order: receptions of a new sequence lower than one already received (each late arrival counts
  once; a duplicate is not also out of order);
- unexpected: distinct sequences outside the range (another run's token, a wrong channel).

It keeps a bitmap (one byte per sequence), so a 10,000-token conversation costs 10 KB per viewer.

`Histogram` is HDR-like: log-linear buckets (each power of two split into 64 linear sub-buckets, so a
value is known to within 1/64 = 1.6 %), counted sparsely in a dict, over integer microseconds. Merging is
adding counts, so P worker processes send their histograms (a few hundred ints) instead of every raw
sample, and the merged percentiles are exactly those of one histogram fed every sample. A percentile
answers the upper edge of its bucket, capped at the exact max; min, max, count and sum are exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["SUB_BUCKETS", "Histogram", "SequenceTracker", "Tally"]

SUB_BUCKET_BITS = 6
SUB_BUCKETS = 1 << SUB_BUCKET_BITS  # 64 linear sub-buckets per power of two


@dataclass
class Tally:
    """Counts of one viewer or, added together, of many."""

    expected: int = 0
    delivered: int = 0
    missing: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    unexpected: int = 0

    def add(self, other: Tally) -> None:
        self.expected += other.expected
        self.delivered += other.delivered
        self.missing += other.missing
        self.duplicates += other.duplicates
        self.out_of_order += other.out_of_order
        self.unexpected += other.unexpected

    @property
    def complete(self) -> bool:
        return self.missing == 0

    def as_dict(self) -> dict[str, int]:
        return {
            "expected": self.expected,
            "delivered": self.delivered,
            "missing": self.missing,
            "duplicates": self.duplicates,
            "out_of_order": self.out_of_order,
            "unexpected": self.unexpected,
        }


class SequenceTracker:
    """The sequences one viewer received (see the module docstring)."""

    __slots__ = ("_seen", "duplicates", "highest", "out_of_order", "received")

    def __init__(self) -> None:
        self._seen = bytearray()
        self.highest = -1
        self.received = 0
        self.duplicates = 0
        self.out_of_order = 0

    def receive(self, sequence: int) -> None:
        self.received += 1
        seen = self._seen
        if sequence >= len(seen):
            seen.extend(bytes(max(sequence + 1 - len(seen), len(seen), 16)))
        elif seen[sequence]:
            self.duplicates += 1
            return
        seen[sequence] = 1
        if sequence < self.highest:
            self.out_of_order += 1
        else:
            self.highest = sequence

    def has(self, sequence: int) -> bool:
        return 0 <= sequence < len(self._seen) and self._seen[sequence] == 1

    def tally(self, first: int, last: int) -> Tally:
        """The counts against the range `first..last` that was published (both included)."""
        window = self._seen[first : last + 1]
        expected = max(0, last - first + 1)
        delivered = window.count(1)
        distinct = self._seen.count(1)
        return Tally(
            expected=expected,
            delivered=delivered,
            missing=expected - delivered,
            duplicates=self.duplicates,
            out_of_order=self.out_of_order,
            unexpected=distinct - delivered,
        )


def _bucket(value: int) -> int:
    if value < SUB_BUCKETS:
        return value
    shift = value.bit_length() - SUB_BUCKET_BITS - 1
    return (shift + 1) * SUB_BUCKETS + ((value >> shift) - SUB_BUCKETS)


def _upper_edge(index: int) -> int:
    """The largest value that falls into bucket `index`."""
    if index < SUB_BUCKETS:
        return index
    shift = index // SUB_BUCKETS - 1
    sub = index % SUB_BUCKETS + SUB_BUCKETS
    return ((sub + 1) << shift) - 1


@dataclass
class Histogram:
    """A mergeable latency histogram over integer units (microseconds here); see the module docstring."""

    counts: dict[int, int] = field(default_factory=dict)
    count: int = 0
    total: int = 0
    min: int | None = None
    max: int | None = None

    def record(self, value: int) -> None:
        value = max(0, int(value))
        index = _bucket(value)
        self.counts[index] = self.counts.get(index, 0) + 1
        self.count += 1
        self.total += value
        if self.min is None or value < self.min:
            self.min = value
        if self.max is None or value > self.max:
            self.max = value

    def merge(self, other: Histogram) -> None:
        for index, n in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + n
        self.count += other.count
        self.total += other.total
        if other.min is not None and (self.min is None or other.min < self.min):
            self.min = other.min
        if other.max is not None and (self.max is None or other.max > self.max):
            self.max = other.max

    def percentile(self, p: float) -> int | None:
        """The value at or below which `p` % of the samples are (nearest rank); None when empty."""
        if self.count == 0 or self.max is None:
            return None
        rank = max(1, -(-self.count * p // 100))  # ceil, at least the first sample
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return min(_upper_edge(index), self.max)
        return self.max

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def to_wire(self) -> dict[str, Any]:
        """A plain dict (pickles and JSON-encodes) that `from_wire` reads back."""
        return {
            "counts": [[k, v] for k, v in sorted(self.counts.items())],
            "count": self.count,
            "total": self.total,
            "min": self.min,
            "max": self.max,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Histogram:
        return cls(
            counts={int(k): int(v) for k, v in data["counts"]},
            count=int(data["count"]),
            total=int(data["total"]),
            min=data["min"],
            max=data["max"],
        )

    def summary_ms(self) -> dict[str, float | int | None]:
        """p50/p90/p99/max/min/mean in milliseconds (the histogram holds microseconds), and the count."""

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value / 1000.0, 3)

        return {
            "count": self.count,
            "p50": ms(self.percentile(50)),
            "p90": ms(self.percentile(90)),
            "p99": ms(self.percentile(99)),
            "max": ms(self.max),
            "min": ms(self.min),
            "mean": ms(self.mean),
        }
