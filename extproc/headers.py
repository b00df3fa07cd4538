"""Headers meshkit's own filters set (each filter also declares them in `sets_headers`).

A client-sent value of any of these is removed by Envoy before meshkit's filter runs (the rendered
configs' `header_mutation`, built from the chain's `sets_headers`) and overwritten or removed again by
the filter.
"""

from __future__ import annotations

BODY_HASH = "x-body-hash"
