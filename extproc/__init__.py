"""meshkit.extproc: one filter chain served to Envoy over ext_proc, ext_authz (gRPC) and ext_authz (HTTP).

What a filter author needs is importable from here; everything else is an implementation detail.
"""

from meshkit.errors import ClientError
from meshkit.extproc.filter import PHASES, Exchange, Filter, Phase, Reply
from meshkit.extproc.headers import BODY_HASH, OWNED

__all__ = ["BODY_HASH", "OWNED", "PHASES", "ClientError", "Exchange", "Filter", "Phase", "Reply"]
