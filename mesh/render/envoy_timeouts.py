"""How long Envoy waits for meshkit: always longer than meshkit's own `--filter-timeout`.

meshkit bounds each round of hooks (one check, one ext_proc message) by `--filter-timeout` and then
answers itself: a JSON 504, or the request goes on for a fail-open filter. That answer can only reach
the client if Envoy is still waiting, so every Envoy-side timeout on a call to meshkit sits above it by
`HEADROOM` (carrying a body of a few MiB to meshkit, parsing it, carrying the answer back), or, when
longer, by the time a whole `--max-body-bytes` body takes at `TRANSFER_BYTES_PER_SECOND`: Envoy's timer
runs while the body travels, meshkit's only once it is there (a fixed 1 s let 150 MiB checks through
unhashed at --max-body-bytes 160MiB).
"""

from __future__ import annotations

from meshkit.extproc.ext_authz_http import TRANSFER_BYTES_PER_SECOND

__all__ = ["HEADROOM", "TRANSFER_BYTES_PER_SECOND", "above_filter_timeout", "duration"]

HEADROOM = 0.5  # seconds: enough for bodies up to 16 MiB at TRANSFER_BYTES_PER_SECOND


def above_filter_timeout(filter_timeout: float, max_body_bytes: int = 0) -> float:
    """The default Envoy-side timeout for a call to a meshkit running with `filter_timeout` that takes
    bodies up to `max_body_bytes`."""
    return filter_timeout + max(HEADROOM, max_body_bytes / TRANSFER_BYTES_PER_SECOND)


def duration(seconds: float) -> str:
    """Envoy's duration syntax: `0.5s` (Envoy rejects `500ms`; no exponent, at most nanoseconds)."""
    text = f"{seconds:.9f}".rstrip("0").rstrip(".")
    return f"{text}s"
