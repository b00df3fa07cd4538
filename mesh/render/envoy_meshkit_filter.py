"""meshkit's HTTP filter in Envoy, one block per API, and the header removal in front of it.

    ext_proc        envoy.filters.http.ext_proc, a gRPC stream per request; processing_mode from the
                    chain's phases
    ext_authz       envoy.filters.http.ext_authz with a grpc_service: one unary Check with the body
    ext_authz_http  envoy.filters.http.ext_authz with an http_service: one keep-alive HTTP/1.1 check

Each block takes what it needs from the `FrontConfig` and its `ChainNeeds`; the reasons go into the
rendered YAML as comments.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from meshkit.extproc.apis import Api
from meshkit.render.commented_yaml import Why
from meshkit.render.envoy_timeouts import duration
from meshkit.render.front_config import FrontConfig

__all__ = ["MESHKIT_CLUSTER", "header_removal", "meshkit_filter", "processing_mode", "uri_host"]

MESHKIT_CLUSTER = "meshkit_extproc"
REQUEST_ID = "x-request-id"  # every check carries it, so meshkit's log lines name the request
# A denial keeps its JSON content-type, a 401 its challenge, a 429 or 503 its Retry-After.
CLIENT_HEADERS = ("content-type", "www-authenticate", "retry-after")

_EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
_EXT_AUTHZ = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
_HEADER_MUTATION = "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"


def _names(names: Sequence[str]) -> str:
    return ", ".join(names)


def _they(names: Sequence[str], verb: str, verbs: str) -> str:
    """`auth does` / `auth, limits do`: a reason names the filters behind it."""
    return f"{_names(names)} {verbs if len(names) == 1 else verb}"


def _exact(headers: Sequence[str]) -> dict[str, Any]:
    return {"patterns": [{"exact": h} for h in headers]}


def processing_mode(phases: Collection[str]) -> dict[str, str]:
    """ext_proc's processing_mode for a chain with hooks in `phases` (`Phase` values)."""
    return {
        "request_header_mode": "SEND",
        "request_body_mode": "BUFFERED" if "request_body" in phases else "NONE",
        "response_header_mode": "SEND" if "response_headers" in phases else "SKIP",
        "response_body_mode": "BUFFERED" if "response_body" in phases else "NONE",
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SKIP",
    }


def header_removal(config: FrontConfig) -> Why | None:
    """Envoy's header_mutation removing every header a filter sets, before meshkit's filter runs."""
    owned = config.needs.sets_headers
    if config.api is None or not owned:
        return None
    setters = {name for names in owned.values() for name in names}
    by = [name for name in config.needs.names if name in setters]
    return Why(
        {
            "name": "envoy.filters.http.header_mutation",
            "typed_config": {
                "@type": _HEADER_MUTATION,
                "mutations": {"request_mutations": [{"remove": h} for h in owned]},
            },
        },
        f"A client never sets a header meshkit owns ({_names(list(owned))}: set by {_names(by)}). "
        "Removed here, before meshkit's filter, so that holds while meshkit is down too "
        "(failure_mode_allow).",
    )


def _failure_mode_allow(config: FrontConfig, *, over_http: bool = False) -> Why:
    needs = config.needs
    if needs.fail_open:
        derived = (
            f"every filter declares fail_open ({_names(needs.names)}): if meshkit is down or fails, "
            "requests flow on unprocessed"
        )
    else:
        derived = (
            f"{_they(needs.fail_closed, 'do', 'does')} not declare fail_open: if meshkit is down or "
            "fails, Envoy answers 500 (fail closed)"
        )
    if config.failure_mode_allow is None:
        reason = f"Derived from the chain: {derived}."
    else:
        reason = f"Set explicitly. From the chain alone: {derived}."
    if over_http:
        reason += " Over HTTP a 5xx answer from meshkit (a filter's 503 or 504 too) counts as failing"
        if config.fails_open and needs.fail_closed:
            reason += f": it lets the request through, whatever {_names(needs.fail_closed)} decided"
        reason += "."
    return Why(config.fails_open, reason)


def _call_timeout(seconds: float, config: FrontConfig, what: str, *, over_http: bool = False) -> Why:
    answer = (
        # Envoy's ext_authz HTTP client reads every 5xx of the check service as "the service failed".
        "meshkit's own answer (its 504 counts as a failed check here: failure_mode_allow decides) reaches "
        "Envoy before Envoy gives up."
        if over_http
        else "meshkit's own 504 reaches the client before Envoy gives up."
    )
    return Why(
        duration(seconds),
        f"{what}: above meshkit's --filter-timeout ({duration(config.filter_timeout)}) by the time a "
        f"--max-body-bytes body takes to reach it (Envoy's timer runs meanwhile; 0.5s at least), so "
        f"{answer}",
    )


def _clear_route_cache(config: FrontConfig) -> dict[str, Why]:
    reroutes = config.needs.reroutes
    if not reroutes:
        return {}
    return {
        "clear_route_cache": Why(
            True,
            f"{_they(reroutes, 're-route', 're-routes')} (reroutes = True). ext_authz re-picks the route "
            "after a check only when its config says so: the per-request clear_route_cache() does not "
            "travel over ext_authz.",
        )
    }


_STATUS_ON_ERROR = Why(
    {"code": 500},
    "meshkit failed and the filter fails closed: 500, with meshkit's JSON body (local_reply_config).",
)


def _with_request_body(config: FrontConfig, *, pack_as_bytes: bool) -> dict[str, Why]:
    """The body in the check, when a filter has a request-body hook; without one the check is
    headers only (a rejected request's body is never read)."""
    if "request_body" not in config.needs.phase_values:
        return {}
    body: dict[str, Any] = {"max_request_bytes": config.max_body_bytes, "allow_partial_message": False}
    reason = "The whole body travels in the one check; bigger than --max-body-bytes: Envoy answers 413."
    if pack_as_bytes:
        body["pack_as_bytes"] = True
        reason += " pack_as_bytes: the body arrives as the client's bytes (raw_body), UTF-8 or not."
    return {"with_request_body": Why(body, reason)}


def ext_proc(config: FrontConfig) -> dict[str, Any]:
    needs = config.needs
    hooked = sorted(needs.phase_values)
    sent = set(needs.phase_values)
    why_answer = ""
    if needs.answer_headers:
        sent.add("response_headers")
        adders = sorted({n for names in needs.answer_headers.values() for n in names})
        why_answer = (
            f" response_header_mode is SEND because {_names(adders)} add headers to successful answers "
            f"({_names(list(needs.answer_headers))}): over ext_proc that is the only way to reach them."
        )
    override: dict[str, Why] = {}
    if needs.answer_headers and not needs.response_phase:
        override["allow_mode_override"] = Why(
            True,
            "A request none of them added a header to is answered with mode_override: response "
            "headers SKIP, so it costs no extra message.",
        )
    return {
        "@type": _EXT_PROC,
        "grpc_service": Why(
            {"envoy_grpc": {"cluster_name": MESHKIT_CLUSTER}},
            "No timeout here: for ext_proc it bounds neither the stream nor a message (Envoy 1.40); "
            "message_timeout does.",
        ),
        "failure_mode_allow": _failure_mode_allow(config),
        "status_on_error": _STATUS_ON_ERROR,
        "message_timeout": _call_timeout(
            config.message_timeout_seconds, config, "Each message's answer (Envoy's default is 200 ms)"
        ),
        "processing_mode": Why(
            processing_mode(sent),
            f"From the phases the chain has hooks for ({_names(hooked)}), so config and code cannot "
            "disagree. request_header_mode is always SEND: Envoy holds the headers until the body is "
            "answered, which is what lets a header computed from a BUFFERED body apply (with SKIP it "
            "is silently dropped)." + why_answer,
        ),
        **override,
    }


def ext_authz_grpc(config: FrontConfig) -> dict[str, Any]:
    return {
        "@type": _EXT_AUTHZ,
        "transport_api_version": "V3",
        "grpc_service": {
            "envoy_grpc": {"cluster_name": MESHKIT_CLUSTER},
            "timeout": _call_timeout(config.grpc_timeout_seconds, config, "The whole Check call"),
        },
        "failure_mode_allow": _failure_mode_allow(config),
        "status_on_error": _STATUS_ON_ERROR,
        **_with_request_body(config, pack_as_bytes=True),
        **_clear_route_cache(config),
    }


def uri_host(host: str) -> str:
    """`host` as it goes before `:PORT` in a URI or a HOST:PORT flag (IPv6 in brackets)."""
    return f"[{host}]" if ":" in host else host


def ext_authz_http(config: FrontConfig) -> dict[str, Any]:
    needs = config.needs
    response: dict[str, Any] = {}
    if needs.sets_headers:
        response["allowed_upstream_headers"] = Why(
            _exact(sorted(needs.sets_headers)),
            "Only the headers the filters declare they set (sets_headers) go from a 200 to the upstream.",
        )
    response["allowed_client_headers"] = Why(
        _exact(CLIENT_HEADERS + tuple(h for h in needs.answer_headers if h not in CLIENT_HEADERS)),
        "A denial keeps its JSON content-type, a 401 its challenge, a 429 or 503 its Retry-After"
        + (" and the headers filters add to answers." if needs.answer_headers else "."),
    )
    if needs.answer_headers:
        response["allowed_client_headers_on_success"] = Why(
            _exact(list(needs.answer_headers)),
            "Headers the filters add to a successful answer (answer_headers).",
        )
    allowed = _exact(sorted({REQUEST_ID} | needs.reads_headers))
    allowed["patterns"] += [{"prefix": p} for p in sorted(needs.read_prefixes)]
    return {
        "@type": _EXT_AUTHZ,
        "transport_api_version": "V3",
        "allowed_headers": Why(
            allowed,
            "The headers the filters declare they read (reads_headers, reads_header_prefixes) and "
            "x-request-id; Envoy always adds Host, Method, Path, Content-Length and Authorization.",
        ),
        "http_service": {
            "server_uri": {
                "uri": f"http://{uri_host(config.extproc_host)}:{config.meshkit_port}",
                "cluster": MESHKIT_CLUSTER,
                "timeout": _call_timeout(
                    config.http_timeout_seconds, config, "The whole check request", over_http=True
                ),
            },
            "authorization_response": response,
            "retry_policy": Why(
                {"retry_on": "connect-failure,reset", "num_retries": 1},
                "A check that got no answer because its connection closed under it is sent once more on "
                "another: over HTTP/1.1 a pooled connection meshkit is closing (restarting, idle, or at "
                "its --http-max-connections) looks alive until the check is written. Never on an answer: "
                "a 5xx is the check's outcome.",
            ),
        },
        "failure_mode_allow": _failure_mode_allow(config, over_http=True),
        "status_on_error": _STATUS_ON_ERROR,
        **_with_request_body(config, pack_as_bytes=False),
        **_clear_route_cache(config),
    }


_BLOCKS = {
    Api.EXT_PROC: ("envoy.filters.http.ext_proc", ext_proc),
    Api.EXT_AUTHZ: ("envoy.filters.http.ext_authz", ext_authz_grpc),
    Api.EXT_AUTHZ_HTTP: ("envoy.filters.http.ext_authz", ext_authz_http),
}


def meshkit_filter(config: FrontConfig, api: Api) -> dict[str, Any]:
    """The HTTP filter that calls meshkit over `api`."""
    name, block = _BLOCKS[api]
    return {"name": name, "typed_config": block(config)}
