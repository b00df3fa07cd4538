"""The load generator's verdict on its own saturation, and the merge of worker results."""

from __future__ import annotations

from typing import Any

from meshkit.edge.loadgen_report import SATURATED_LAG_MS, merge_results, verdict
from meshkit.edge.loadgen_stats import Histogram, Tally


def proc(role: str, lag99: float | None, cpu: float) -> dict[str, Any]:
    return {"role": role, "cpu_percent": cpu, "loop_lag_ms": {"p50": 0.1, "p99": lag99, "max": lag99}}


def test_not_saturated_says_the_numbers_are_the_targets() -> None:
    saturated, sentence = verdict([proc("publisher", 2.0, 30), proc("viewers-0", 4.5, 60)], 0.99)
    assert not saturated and "the numbers are the target's" in sentence and "4.5 ms" in sentence


def test_loop_lag_cpu_or_a_slow_publisher_make_the_generator_the_limit() -> None:
    saturated, sentence = verdict([proc("publisher", 1, 10), proc("viewers-1", 87, 70)], 1.0)
    assert (
        saturated and sentence == "viewers-1 loop lag p99 87 ms: the generator, not the target, is the limit"
    )
    assert verdict([proc("viewers-0", SATURATED_LAG_MS - 1, 95)], 1.0)[0]
    saturated, sentence = verdict([proc("publisher", 1, 10)], 0.5)
    assert saturated and "50% of the asked rate" in sentence
    assert not verdict([proc("publisher", None, 0)], None)[0]  # nothing measured is not saturation


def worker_result(index: int, latencies: list[int], tally: Tally) -> dict[str, Any]:
    h = Histogram()
    for v in latencies:
        h.record(v)
    lag = Histogram()
    lag.record(1000 * (index + 1))
    return {
        "index": index,
        "pid": 100 + index,
        "viewers": 2,
        "tally": tally.as_dict(),
        "incomplete_viewers": int(not tally.complete),
        "outcomes": {"done": 2 - int(not tally.complete), "disconnected": int(not tally.complete)},
        "unparsable": 0,
        "events": {"reset": index},
        "error_samples": [f"e{index}"] if index else [],
        "latency_us": h.to_wire(),
        "loop_lag_us": lag.to_wire(),
        "cpu_percent": 10.0,
        "peak_cpu_percent": 20.0,
    }


def test_merge_adds_counts_and_merges_histograms() -> None:
    merged = merge_results(
        [
            worker_result(0, [100, 200, 300], Tally(expected=6, delivered=6)),
            worker_result(1, [5000], Tally(expected=6, delivered=4, missing=2, duplicates=1)),
        ]
    )
    assert merged["tally"] == {
        "expected": 12,
        "delivered": 10,
        "missing": 2,
        "duplicates": 1,
        "out_of_order": 0,
        "unexpected": 0,
    }
    assert merged["outcomes"] == {"done": 3, "disconnected": 1}
    assert merged["incomplete_viewers"] == 1 and merged["viewers"] == 4
    assert merged["events"] == {"reset": 1} and merged["error_samples"] == ["e1"]
    latency: Histogram = merged["latency"]
    p50 = latency.percentile(50)
    assert latency.count == 4 and latency.max == 5000 and p50 is not None and 200 <= p50 <= 200 * 65 / 64
    assert [p["role"] for p in merged["processes"]] == ["viewers-0", "viewers-1"]
    assert merged["processes"][1]["loop_lag_ms"]["p99"] == 2.0
