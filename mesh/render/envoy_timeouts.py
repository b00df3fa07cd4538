"""How long Envoy waits for meshkit: always longer than meshkit's own `--filter-timeout`.

meshkit bounds each round of hooks (one check, one ext_proc message) by `--filter-timeout` and then
answers itself: a JSON 504, or the request goes on for a fail-open filter. That answer can only reach
the client if Envoy is still waiting, so every Envoy-side timeout on a call to meshkit sits above it by
`HEADROOM`: the time to carry a multi-MiB body to meshkit, parse it and carry the answer back.
"""

from __future__ import annotations

__all__ = ["HEADROOM", "above_filter_timeout", "duration"]

HEADROOM = 0.5  # seconds


def above_filter_timeout(filter_timeout: float) -> float:
    """The default Envoy-side timeout for a call to a meshkit running with `filter_timeout`."""
    return filter_timeout + HEADROOM


def duration(seconds: float) -> str:
    """Envoy's duration syntax: `0.5s` (Envoy rejects `500ms`; no exponent, at most nanoseconds)."""
    text = f"{seconds:.9f}".rstrip("0").rstrip(".")
    return f"{text}s"
