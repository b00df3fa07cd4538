"""The load generator's counting (missing, duplicates, out of order) and its mergeable histogram."""

from __future__ import annotations

import random

import pytest

from meshkit.edge.loadgen_stats import Histogram, SequenceTracker, Tally


def tally_of(received: list[int], first: int, last: int) -> Tally:
    tracker = SequenceTracker()
    for seq in received:
        tracker.receive(seq)
    return tracker.tally(first, last)


def test_every_token_once_in_order() -> None:
    t = tally_of(list(range(1, 11)), 1, 10)
    assert t.as_dict() == {
        "expected": 10,
        "delivered": 10,
        "missing": 0,
        "duplicates": 0,
        "out_of_order": 0,
        "unexpected": 0,
    }
    assert t.complete


def test_gaps_are_missing() -> None:
    t = tally_of([1, 2, 5, 6, 9], 1, 10)
    assert (t.delivered, t.missing, t.duplicates, t.out_of_order) == (5, 5, 0, 0)
    assert not t.complete


def test_duplicates_counted_per_extra_reception_and_not_as_out_of_order() -> None:
    t = tally_of([1, 2, 2, 3, 1, 3, 3], 1, 3)
    assert (t.delivered, t.missing, t.duplicates, t.out_of_order) == (3, 0, 4, 0)


def test_a_late_arrival_is_out_of_order_once() -> None:
    t = tally_of([1, 3, 4, 2, 5], 1, 5)
    assert (t.delivered, t.missing, t.duplicates, t.out_of_order) == (5, 0, 0, 1)
    reversed_ = tally_of([5, 4, 3, 2, 1], 1, 5)
    assert (reversed_.out_of_order, reversed_.missing) == (4, 0)


def test_sequences_outside_the_range_are_unexpected_and_zero_based_ranges_work() -> None:
    t = tally_of([0, 1, 2, 40], 0, 2)
    assert (t.expected, t.delivered, t.unexpected, t.missing) == (3, 3, 1, 0)
    t = tally_of([0, 1, 2], 1, 3)  # started at 1: 0 is not ours, 3 never came
    assert (t.expected, t.delivered, t.unexpected, t.missing) == (3, 2, 1, 1)


def test_nothing_received() -> None:
    t = tally_of([], 1, 4)
    assert (t.expected, t.delivered, t.missing) == (4, 0, 4)


def test_tallies_add_up() -> None:
    total = Tally()
    total.add(tally_of([1, 2], 1, 3))
    total.add(tally_of([1, 1, 2, 3], 1, 3))
    assert (total.expected, total.delivered, total.missing, total.duplicates) == (6, 5, 1, 1)


def exact_percentile(values: list[int], p: float) -> int:
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


@pytest.mark.parametrize("p", [50, 90, 99, 99.9, 100])
def test_percentiles_within_the_bucket_precision(p: float) -> None:
    rng = random.Random(7)
    values = [int(rng.lognormvariate(7, 1.2)) for _ in range(20_000)]  # around a ms, long tail
    h = Histogram()
    for v in values:
        h.record(v)
    exact = exact_percentile(values, p)
    got = h.percentile(p)
    assert got is not None
    assert exact <= got <= exact * (1 + 1 / 64) + 1
    assert h.max == max(values) and h.min == min(values) and h.count == len(values)


def test_small_values_are_exact() -> None:
    h = Histogram()
    for v in range(64):
        h.record(v)
    assert [h.percentile(p) for p in (1.5625, 50, 100)] == [0, 31, 63]


def test_merged_across_processes_equals_one_histogram_of_all_samples() -> None:
    rng = random.Random(3)
    parts = [[int(rng.expovariate(1 / (500 * (i + 1)))) for _ in range(3000)] for i in range(3)]
    whole = Histogram()
    merged = Histogram()
    for part in parts:
        h = Histogram()
        for v in part:
            h.record(v)
            whole.record(v)
        merged.merge(Histogram.from_wire(h.to_wire()))  # as it crosses the pipe
    assert merged == whole
    for p in (50, 90, 99):
        assert merged.percentile(p) == whole.percentile(p)
    # and the merge is not "average of percentiles": the slow process dominates the p99
    everything = [v for part in parts for v in part]
    p99 = merged.percentile(99)
    assert p99 is not None and p99 == whole.percentile(99)
    assert p99 >= exact_percentile(everything, 99)


def test_empty_histogram_and_negative_values() -> None:
    h = Histogram()
    assert h.percentile(50) is None and h.summary_ms()["p99"] is None
    h.record(-5)  # a clock step: clamped to 0
    assert h.percentile(50) == 0
    assert h.summary_ms()["count"] == 1
