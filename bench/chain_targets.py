"""The issue's targets for the auth chains, at 1 KiB, on the best path (the one where the full chain
with an API key has the most req/s):

    key          req/s >= 0.35x envoy-alone, server CPU <= 250 µs per request
    key-redis    server CPU - key's <= 100 µs per request (the Redis round trip)
    hs256/es256  server CPU - key's <= 20 µs per request (a cached JWT)

Every path's value is shown; the verdict is the best path's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from chains import PATHS, row_label

TIMES = "\u00d7"
VS_ENVOY = 0.35
CPU_US = 250.0
REDIS_EXTRA_US = 100.0
JWT_EXTRA_US = 20.0


class Measured(Protocol):
    @property
    def config(self) -> str: ...
    @property
    def rps(self) -> float | None: ...
    @property
    def server_cpu_us(self) -> float | None: ...
    @property
    def redis_cpu_us(self) -> float | None: ...


def _extra(rows: dict[str, Measured], chain: str, path: str, with_redis: bool = False) -> float | None:
    """Server CPU per request of `chain`'s row minus the key row's (plus Redis's own, if asked)."""
    row, key = rows.get(row_label(chain, path)), rows.get(row_label("key", path))
    if row is None or key is None or row.rps is None or key.rps is None:
        return None
    if row.server_cpu_us is None or key.server_cpu_us is None:
        return None
    redis = row.redis_cpu_us if with_redis else 0.0
    return None if redis is None else row.server_cpu_us + redis - key.server_cpu_us


def best_path(rows: dict[str, Measured]) -> str | None:
    measured = {p: rows[row_label("key", p)].rps for p in PATHS if row_label("key", p) in rows}
    ranked = sorted(((rps, p) for p, rps in measured.items() if rps is not None), reverse=True)
    return ranked[0][1] if ranked else None


def chain_checks(rows: Sequence[Measured], baseline: str) -> list[dict[str, object]]:
    """One dict per target: its name, each path's value and the best path's verdict."""
    by_name = {row.config: row for row in rows}
    base = by_name[baseline].rps if baseline in by_name else None

    def vs_envoy(path: str) -> float | None:
        row = by_name.get(row_label("key", path))
        return row.rps / base if row is not None and row.rps is not None and base else None

    def cpu(path: str) -> float | None:
        row = by_name.get(row_label("key", path))
        return row.server_cpu_us if row is not None and row.rps is not None else None

    targets: list[tuple[str, Callable[[str], float | None], float | None, str]] = [
        (f"key: req/s >= {VS_ENVOY:.2f}{TIMES} envoy-alone", vs_envoy, VS_ENVOY, "ratio"),
        (f"key: server CPU <= {CPU_US:.0f} µs/req", cpu, CPU_US, "us"),
        (
            f"key-redis - key: server CPU <= +{REDIS_EXTRA_US:.0f} µs/req",
            lambda p: _extra(by_name, "key-redis", p),
            REDIS_EXTRA_US,
            "delta",
        ),
        (
            "(info) key-redis - key, Redis's own CPU included",
            lambda p: _extra(by_name, "key-redis", p, with_redis=True),
            None,
            "delta",
        ),
        (
            f"hs256 - key: server CPU <= +{JWT_EXTRA_US:.0f} µs/req",
            lambda p: _extra(by_name, "hs256", p),
            JWT_EXTRA_US,
            "delta",
        ),
        (
            f"es256 - key: server CPU <= +{JWT_EXTRA_US:.0f} µs/req",
            lambda p: _extra(by_name, "es256", p),
            JWT_EXTRA_US,
            "delta",
        ),
    ]
    best = best_path(by_name)
    out: list[dict[str, object]] = []
    for name, value_of, limit, unit in targets:
        values = {path: value_of(path) for path in PATHS}
        value = values[best] if best is not None else None
        if limit is None:
            verdict = "info"
        else:
            ok = value is not None and (value >= limit if unit == "ratio" else value <= limit)
            verdict = "n/a" if value is None else ("met" if ok else "missed")
        shown = {p: _shown(v, unit) for p, v in values.items()}
        out.append({"target": name, "best_path": best, "values": values, "shown": shown, "verdict": verdict})
    return out


def _shown(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ratio":
        return f"{value:.2f}{TIMES}"
    return f"{value:+.0f} µs" if unit == "delta" else f"{value:.0f} µs"


def render_checks(checks: list[dict[str, object]]) -> str:
    """The targets table: one line per target, a column per path, the best path's verdict."""
    if not checks:
        return "  not evaluated"
    best = checks[0]["best_path"]
    header = ["target", *(f"{p}{' (best)' if p == best else ''}" for p in PATHS), "verdict"]
    lines = [header]
    for check in checks:
        shown = check["shown"]
        assert isinstance(shown, dict)
        lines.append([str(check["target"]), *(str(shown[p]) for p in PATHS), str(check["verdict"])])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = []
    for i, line in enumerate(lines):
        cells = [
            line[0].ljust(widths[0]),
            *(c.rjust(w) for c, w in zip(line[1:-1], widths[1:-1], strict=True)),
        ]
        text.append("  " + " | ".join([*cells, line[-1]]))
        if i == 0:
            text.append("  " + "-+-".join("-" * w for w in widths))
    return "\n".join(text)
