"""What `meshkit extproc` runs with when it is not told otherwise, read from its own options.

A rendered config must agree with the server it calls: the same filter chain, the same body limit, and
Envoy-side timeouts above the server's `--filter-timeout`. So the defaults are taken from
`ExtprocOptions` (whose own defaults are the chain's `DEFAULT_*` constants), never written twice.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from meshkit.extproc.apis import Api
from meshkit.extproc.daemon import ExtprocOptions

__all__ = [
    "DEFAULT_FILTERS",
    "DEFAULT_FILTER_TIMEOUT",
    "DEFAULT_GRPC_PORT",
    "DEFAULT_HTTP_CHECK_PORT",
    "DEFAULT_MAX_BODY_BYTES",
    "default_port",
]


def _default(name: str) -> Any:
    (field,) = [f for f in dataclasses.fields(ExtprocOptions) if f.name == name]
    return field.default


DEFAULT_FILTERS: tuple[str, ...] = tuple(_default("filters"))
DEFAULT_MAX_BODY_BYTES: int = int(_default("max_body_bytes"))
DEFAULT_FILTER_TIMEOUT: float = float(_default("filter_timeout"))
# `--listen`'s port: ext_proc and ext_authz over gRPC.
DEFAULT_GRPC_PORT: int = int(str(_default("listen")).rpartition(":")[2])
# `--http-listen` is off unless given, so it has no default port; configs and docs use this one
# (`meshkit extproc --http-listen 127.0.0.1:50052`): the gRPC port's neighbour.
DEFAULT_HTTP_CHECK_PORT = DEFAULT_GRPC_PORT + 1


def default_port(api: Api) -> int:
    """The port meshkit answers `api` on by default."""
    return DEFAULT_HTTP_CHECK_PORT if api is Api.EXT_AUTHZ_HTTP else DEFAULT_GRPC_PORT
