"""The one place templates under `meshkit/envoy/` are filled: harness, `meshkit up`, tests and bench.

Placeholders are `${name}` (string.Template); a missing value is an error, never an empty string.
Values that are YAML structures (the processing mode, the 413 mapper) are written as JSON, which is
valid YAML flow style.
"""

from __future__ import annotations

import json
import string
from collections.abc import Collection
from dataclasses import dataclass
from importlib import resources
from typing import Literal

from meshkit.extproc.filters import headers_read_by, headers_set_by, phases_of
from meshkit.extproc.limits import envoy_buffer_limit
from meshkit.extproc.replies import INTERNAL_ERROR, too_large

Api = Literal["ext_proc", "ext_authz", "ext_authz_http", "plain"]
TEMPLATES: dict[str, str] = {
    "ext_proc": "front-extproc.yaml",
    "ext_authz": "front-extauthz.yaml",
    "ext_authz_http": "front-extauthz-http.yaml",
    "plain": "front-plain.yaml",
}


def template(name: str) -> str:
    return resources.files("meshkit").joinpath("envoy", name).read_text()


def fill(name: str, values: dict[str, object]) -> str:
    try:
        return string.Template(template(name)).substitute({k: str(v) for k, v in values.items()})
    except KeyError as exc:
        raise ValueError(f"template {name}: no value for ${{{exc.args[0]}}}") from None


def duration(seconds: float) -> str:
    """Envoy's duration syntax: `0.5s` (it rejects `500ms`)."""
    return f"{seconds:g}s"


def processing_mode(phases: Collection[str]) -> dict[str, str]:
    """ext_proc's processing_mode for a chain with hooks in `phases` (Phase values)."""
    return {
        "request_header_mode": "SEND",
        "request_body_mode": "BUFFERED" if "request_body" in phases else "NONE",
        "response_header_mode": "SEND" if "response_headers" in phases else "SKIP",
        "response_body_mode": "BUFFERED" if "response_body" in phases else "NONE",
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SKIP",
    }


_CEL_FILTER = "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter"


def _mapper(cel: str, error: bytes) -> dict[str, object]:
    """A local-reply mapper for the replies Envoy itself makes when `cel` (on `response.code_details`)
    holds. Replies meshkit's filters make go through Envoy's local replies too, so matching on the
    status alone would overwrite a filter's own 413 or 500 body: the details tell them apart."""
    return {
        "filter": {
            "extension_filter": {
                "name": "envoy.access_loggers.extension_filters.cel",
                "typed_config": {"@type": _CEL_FILTER, "expression": cel},
            }
        },
        "body_format_override": {"json_format": json.loads(error), "content_type": "application/json"},
    }


# Envoy's own reply when a body is over its buffer (ext_proc) or max_request_bytes (ext_authz).
ENVOY_TOO_LARGE = "response.code_details == 'request_payload_too_large'"
# meshkit failed (down, error, ext_proc message timeout) and the filter fails closed: 500 via
# status_on_error, or 504 on an ext_proc message timeout.
MESHKIT_FAILED = (
    "response.code_details == 'ext_authz_error' || response.code_details.startsWith('ext_proc_error')"
)


def local_reply_mappers(max_body_bytes: int) -> list[dict[str, object]]:
    """Envoy's own 413 and its fail-closed answers carry meshkit's JSON error body too."""
    return [
        _mapper(ENVOY_TOO_LARGE, too_large(max_body_bytes).body),
        _mapper(MESHKIT_FAILED, INTERNAL_ERROR.body),
    ]


@dataclass(frozen=True)
class FrontConfig:
    """Values for the ingress templates; `render()` turns them into an Envoy bootstrap."""

    upstream_ports: tuple[int, ...]  # the upstream pods; several: ring-hashed on x-body-hash
    extproc_port: int = 0
    api: Api = "ext_proc"
    listen_address: str = "127.0.0.1"
    listen_port: int = 10000
    admin_port: int = 0
    extproc_host: str = "127.0.0.1"
    upstream_host: str = "127.0.0.1"
    max_body_bytes: int = 8 << 20
    failure_mode_allow: bool = True
    message_timeout: float = 1.0
    grpc_timeout: float = 2.0
    filters: tuple[str, ...] = ("body-hash",)  # the chain meshkit runs: its hooks decide processing_mode

    def render(self) -> str:
        if not self.upstream_ports:
            raise ValueError("upstream_ports: name at least one upstream")
        if self.api != "plain" and not self.extproc_port:
            raise ValueError("extproc_port is required for the ext_proc and ext_authz configs")
        return fill(
            TEMPLATES[self.api],
            {
                "admin_port": self.admin_port,
                "listen_address": self.listen_address,
                "listen_port": self.listen_port,
                "buffer_limit_bytes": envoy_buffer_limit(self.max_body_bytes),
                "max_body_bytes": self.max_body_bytes,
                "local_reply_mappers": json.dumps(local_reply_mappers(self.max_body_bytes)),
                "extproc_host": self.extproc_host,
                "extproc_port": self.extproc_port,
                "upstream_endpoints": json.dumps(
                    [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": self.upstream_host, "port_value": p}
                                }
                            }
                        }
                        for p in self.upstream_ports
                    ]
                ),
                "failure_mode_allow": json.dumps(self.failure_mode_allow),
                "message_timeout": duration(self.message_timeout),
                "grpc_timeout": duration(self.grpc_timeout),
                "processing_mode": json.dumps(processing_mode(phases_of(self.filters))),
                "owned_headers": json.dumps([{"exact": h} for h in sorted(headers_set_by(self.filters))]),
                "forwarded_headers": json.dumps(
                    [{"exact": h} for h in sorted({"x-request-id"} | headers_read_by(self.filters))]
                ),
            },
        )


def upstream_direct(
    listen_port: int = 0, admin_port: int = 0, buffer_limit_bytes: int = envoy_buffer_limit(8 << 20)
) -> str:
    return fill(
        "upstream-direct.yaml",
        {
            "listen_address": "127.0.0.1",
            "listen_port": listen_port,
            "admin_port": admin_port,
            "buffer_limit_bytes": buffer_limit_bytes,
        },
    )
