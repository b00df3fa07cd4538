"""The three ways Envoy calls meshkit's filter chain, by the names used in flags, metrics and configs."""

from __future__ import annotations

import enum


class Api(enum.StrEnum):
    EXT_PROC = "ext_proc"  # envoy.service.ext_proc.v3.ExternalProcessor/Process on --listen
    EXT_AUTHZ = "ext_authz"  # envoy.service.auth.v3.Authorization/Check (gRPC) on --listen
    EXT_AUTHZ_HTTP = "ext_authz_http"  # Envoy's ext_authz HTTP protocol on --http-listen

    @property
    def request_phases_only(self) -> bool:
        """ext_authz (either transport) never sees the response: response-phase filters need ext_proc."""
        return self is not Api.EXT_PROC
