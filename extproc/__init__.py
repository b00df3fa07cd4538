"""meshkit.extproc: one filter chain served to Envoy over ext_proc, ext_authz (gRPC) and ext_authz (HTTP).

What a filter author needs is importable from here; everything else is an implementation detail.
"""

from meshkit.errors import ClientError, DependencyError
from meshkit.extproc.apis import Api
from meshkit.extproc.filter import PHASES, Exchange, Filter, Phase, Reply
from meshkit.extproc.headers import BODY_HASH
from meshkit.options import option

__all__ = [
    "BODY_HASH",
    "PHASES",
    "Api",
    "ClientError",
    "DependencyError",
    "Exchange",
    "Filter",
    "Phase",
    "Reply",
    "option",
]
