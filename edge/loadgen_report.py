"""The load generator's report: worker results merged into one dict (the `--json` file), its verdict on
its own saturation, and the table printed at the end.

Merging: tallies and outcome counts are added; latency histograms are merged bucket by bucket (see
`loadgen_stats.Histogram`), so the percentiles are those of every delivery of every process, not an
average of per-process percentiles.

Saturation (decision): a generator process is called saturated when its event loop woke a 100 ms sleeper
late by SATURATED_LAG_MS or more at the 99th percentile, or it used SATURATED_CPU_PERCENT of a core or
more on average; the publisher also when it achieved less than 95 % of the asked rate. Then the verdict
says the generator, not the target, is the limit, and which process.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meshkit.edge.loadgen_stats import Histogram, Tally

__all__ = [
    "SATURATED_CPU_PERCENT",
    "SATURATED_LAG_MS",
    "merge_results",
    "render_table",
    "verdict",
    "write_json",
]

SATURATED_LAG_MS = 20.0
SATURATED_CPU_PERCENT = 90.0
PUBLISH_RATE_SHORTFALL = 0.95


def merge_results(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The workers' `result` messages as one: totals, outcomes, merged latency, per-process generator rows."""
    tally = Tally()
    latency = Histogram()
    outcomes: dict[str, int] = {}
    events: dict[str, int] = {}
    errors: list[str] = []
    incomplete = unparsable = viewers = 0
    processes = []
    for r in results:
        tally.add(Tally(**r["tally"]))
        latency.merge(Histogram.from_wire(r["latency_us"]))
        for k, v in r["outcomes"].items():
            outcomes[k] = outcomes.get(k, 0) + v
        for k, v in r["events"].items():
            events[k] = events.get(k, 0) + v
        errors += r["error_samples"]
        incomplete += r["incomplete_viewers"]
        unparsable += r["unparsable"]
        viewers += r["viewers"]
        lag = Histogram.from_wire(r["loop_lag_us"]).summary_ms()
        processes.append(
            {
                "role": f"viewers-{r['index']}",
                "pid": r["pid"],
                "streams": r["viewers"],
                "cpu_percent": r["cpu_percent"],
                "peak_cpu_percent": r["peak_cpu_percent"],
                "loop_lag_ms": {k: lag[k] for k in ("p50", "p99", "max")},
            }
        )
    return {
        "viewers": viewers,
        "tally": tally.as_dict(),
        "incomplete_viewers": incomplete,
        "outcomes": outcomes,
        "events": events,
        "unparsable": unparsable,
        "error_samples": errors[:10],
        "latency": latency,
        "processes": processes,
    }


def verdict(processes: Sequence[dict[str, Any]], publish_ratio: float | None) -> tuple[bool, str]:
    """(saturated, one sentence) over the generator's processes (see the module docstring)."""
    reasons = []
    for p in processes:
        lag99 = p["loop_lag_ms"]["p99"] or 0.0
        if lag99 >= SATURATED_LAG_MS:
            reasons.append(f"{p['role']} loop lag p99 {lag99:.0f} ms")
        elif p["cpu_percent"] >= SATURATED_CPU_PERCENT:
            reasons.append(f"{p['role']} at {p['cpu_percent']:.0f} % of a core")
    if publish_ratio is not None and publish_ratio < PUBLISH_RATE_SHORTFALL:
        reasons.append(f"the publisher reached only {publish_ratio:.0%} of the asked rate")
    if reasons:
        return True, "; ".join(reasons) + ": the generator, not the target, is the limit"
    worst = max((p["loop_lag_ms"]["p99"] or 0.0 for p in processes), default=0.0)
    busiest = max((p["cpu_percent"] for p in processes), default=0.0)
    return False, (
        f"generator not saturated (loop lag p99 <= {worst:.1f} ms, CPU <= {busiest:.0f} % of a core "
        "per process): the numbers are the target's"
    )


def write_json(path: Path, report: dict[str, Any]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}{unit}"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return f"{value}{unit}"


def render_table(report: dict[str, Any]) -> str:
    """The end-of-run table (stdout)."""
    config = report["config"]
    m, lat, s, g, t = (
        report["messages"],
        report["latency_ms"],
        report["streams"],
        report["generator"],
        report["target"],
    )
    rows: list[tuple[str, str]] = [
        (
            "target",
            f"{config['target']} {config['url']} (publish: {config['publish']})",
        ),
        (
            "streams",
            f"{s['opened']:,} opened of {s['planned']:,} "
            f"({s['conversations']} conversations x {s['viewers_per_conversation']})",
        ),
        (
            "published",
            f"{report['publish']['published']:,} messages at {report['publish']['achieved_rate']:,.0f}/s "
            f"(asked {report['publish']['asked_rate']:,.0f}/s), errors {report['publish']['errors']}",
        ),
        ("delivered/expected", f"{m['delivered']:,} / {m['expected']:,} ({m['delivered_ratio']:.4%})"),
        ("missing", _fmt(m["missing"])),
        ("duplicates", _fmt(m["duplicates"])),
        ("out of order", _fmt(m["out_of_order"])),
        ("unexpected", _fmt(m["unexpected"])),
        ("incomplete viewers", _fmt(m["incomplete_viewers"])),
        ("latency p50/p90/p99/max", " / ".join(_fmt(lat[k]) for k in ("p50", "p90", "p99", "max")) + " ms"),
        ("errors", ", ".join(f"{k} {v}" for k, v in report["errors"].items() if v) or "none"),
    ]
    if t["pids"]:
        rows += [
            ("target CPU", f"{_fmt(t['cpu_percent'])} % of a core (pids {', '.join(map(str, t['pids']))})"),
            (
                "target RSS",
                f"{_fmt(t['rss_bytes_max'])} B max, {_fmt(t['kb_per_stream'])} KB per open stream "
                f"({_fmt(t['kb_per_stream_delta'])} KB over the idle RSS)",
            ),
        ]
    for p in g["processes"]:
        lag = p["loop_lag_ms"]
        rows.append(
            (
                f"generator {p['role']}",
                f"pid {p['pid']}, CPU {_fmt(p['cpu_percent'])} % (peak {_fmt(p['peak_cpu_percent'])}), "
                f"loop lag p50/p99/max {_fmt(lag['p50'])}/{_fmt(lag['p99'])}/{_fmt(lag['max'])} ms",
            )
        )
    rows.append(("verdict", g["verdict"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
