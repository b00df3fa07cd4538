"""Envoy's own replies get meshkit's JSON error body (local-reply mappers).

Replies meshkit's filters make go through Envoy's local replies too, so matching on the status alone
would overwrite a filter's own 413 or 500 body: a CEL filter on `response.code_details` picks out the
replies Envoy made itself.
"""

from __future__ import annotations

import json
from typing import Any

from meshkit.extproc.replies import INTERNAL_ERROR, too_large

__all__ = ["ENVOY_TOO_LARGE", "MESHKIT_FAILED", "local_reply_mappers"]

_CEL_FILTER = "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter"

# Envoy's own reply when a body is over its buffer (ext_proc) or max_request_bytes (ext_authz).
ENVOY_TOO_LARGE = "response.code_details == 'request_payload_too_large'"
# meshkit failed (down, error, ext_proc message timeout) and the filter fails closed: 500 via
# status_on_error, or 504 on an ext_proc message timeout.
MESHKIT_FAILED = (
    "response.code_details == 'ext_authz_error' || response.code_details.startsWith('ext_proc_error')"
)


def _mapper(cel: str, error: bytes) -> dict[str, Any]:
    """A mapper giving the replies Envoy itself makes when `cel` holds the JSON body `error`."""
    return {
        "filter": {
            "extension_filter": {
                "name": "envoy.access_loggers.extension_filters.cel",
                "typed_config": {"@type": _CEL_FILTER, "expression": cel},
            }
        },
        "body_format_override": {"json_format": json.loads(error), "content_type": "application/json"},
    }


def local_reply_mappers(max_body_bytes: int) -> list[dict[str, Any]]:
    """Envoy's own 413 and its fail-closed answers carry meshkit's JSON error body too."""
    return [
        _mapper(ENVOY_TOO_LARGE, too_large(max_body_bytes).body),
        _mapper(MESHKIT_FAILED, INTERNAL_ERROR.body),
    ]
