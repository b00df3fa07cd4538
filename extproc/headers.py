"""Headers meshkit owns. A client-sent value of any of these is removed or overwritten."""

from __future__ import annotations

BODY_HASH = "x-body-hash"

OWNED: frozenset[str] = frozenset({BODY_HASH})
