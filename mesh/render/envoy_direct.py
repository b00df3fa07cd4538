"""An Envoy that answers 200 itself: the benchmark's upstream, cheap enough never to be the bottleneck."""

from __future__ import annotations

from meshkit.extproc.limits import envoy_buffer_limit
from meshkit.render.commented_yaml import to_yaml
from meshkit.render.envoy_front import socket_address
from meshkit.render.meshkit_defaults import DEFAULT_MAX_BODY_BYTES

__all__ = ["upstream_direct"]

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def upstream_direct(
    listen_port: int = 0, admin_port: int = 0, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> str:
    """A fixed `200 ok` from Envoy on 127.0.0.1:`listen_port` (0: any), taking bodies up to the limit."""
    hcm = {
        "@type": _HCM,
        "stat_prefix": "upstream",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "direct",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
                        }
                    ],
                }
            ]
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}],
    }
    listener = {
        "name": "upstream",
        "address": socket_address("127.0.0.1", listen_port),
        "per_connection_buffer_limit_bytes": envoy_buffer_limit(max_body_bytes),
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }
    document = {
        "admin": {"address": socket_address("127.0.0.1", admin_port)},
        "static_resources": {"listeners": [listener]},
    }
    return to_yaml(document, __doc__ or "")
