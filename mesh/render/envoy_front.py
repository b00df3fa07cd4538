"""The ingress Envoy's bootstrap, built from one structure for every API (and for Envoy alone).

    admin
    listener "ingress"      buffer limit from --max-body-bytes; HTTP connection manager with
                            local-reply mappers (meshkit's JSON for Envoy's own 413/500/504), the routes
                            (first a 405 for client PURGE; per model; the default with hash_policy and
                            the response echo for each hash_header), the filters:
                            header_mutation (removes what filters set), meshkit's filter, router
    cluster meshkit_extproc HTTP/2 for the gRPC APIs; HTTP/1.1 with an idle timeout below meshkit's
                            keep-alive for ext_authz over HTTP
    cluster upstream        RING_HASH when a filter declares a hash_header, else ROUND_ROBIN

Only the meshkit filter block differs per API (`envoy_meshkit_filter`).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from meshkit.errors import error_body
from meshkit.extproc.apis import Api
from meshkit.extproc.ext_authz_http import KEEPALIVE_SECONDS
from meshkit.extproc.limits import envoy_buffer_limit
from meshkit.render.commented_yaml import Why, plain, to_yaml
from meshkit.render.envoy_local_replies import local_reply_mappers
from meshkit.render.envoy_meshkit_filter import MESHKIT_CLUSTER, header_removal, meshkit_filter, uri_host
from meshkit.render.envoy_timeouts import duration
from meshkit.render.front_config import FrontConfig

__all__ = ["front_document", "front_tree", "front_yaml", "socket_address"]

CONNECT_TIMEOUT = 1.0
UNLIMITED = 4294967295  # a circuit breaker threshold (uint32) that never trips, as Istio renders it
# Envoy closes an idle connection to meshkit's HTTP check server before meshkit would.
HTTP_IDLE_TIMEOUT = min(30.0, KEEPALIVE_SECONDS / 2)

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

_TITLES = {
    None: "Envoy alone, no call to meshkit (the benchmark's ceiling)",
    Api.EXT_PROC: "meshkit's filter chain over ext_proc (one gRPC stream a request)",
    Api.EXT_AUTHZ: "meshkit's filter chain over ext_authz gRPC (one unary Check call a request)",
    Api.EXT_AUTHZ_HTTP: "meshkit's filter chain over ext_authz HTTP (one keep-alive HTTP/1.1 check)",
}


def socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _addressing(host: str) -> dict[str, Any]:
    """A cluster's `type`, and for a name how Envoy resolves it."""
    kind = _cluster_type(host)
    if kind == "STATIC":
        return {"type": kind}
    return {
        "type": kind,
        "dns_lookup_family": Why(
            "V4_PREFERRED",
            f"{host} is resolved by Envoy: its IPv4 address first, as meshkit and most servers listen on "
            "IPv4 (Envoy's default AUTO tries IPv6 first: localhost became ::1, and no connection got "
            "through to a server on 127.0.0.1).",
        ),
    }


def _cluster_type(host: str) -> str:
    """STATIC for an IP address; STRICT_DNS for a name (a Kubernetes Service): Envoy resolves it."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "STRICT_DNS"
    return "STATIC"


def _endpoints(name: str, host: str, ports: tuple[int, ...]) -> dict[str, Any]:
    return {
        "cluster_name": name,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(host, p)}} for p in ports]}],
    }


def _route_timeout(config: FrontConfig) -> Why:
    if config.route_timeout:
        return Why(duration(config.route_timeout), "The upstream's whole answer, as set (--route-timeout).")
    return Why(
        "0s",
        "No limit on the upstream's whole answer (--route-timeout; Envoy's own default is 15 s): an LLM "
        "answer, streamed or not, can take minutes. An answer that stalls is still ended by the "
        "connection manager's stream idle timeout (5 min without a byte).",
    )


MODEL_HEADER = "x-model"  # what model-router sets and the per-model routes match


def model_cluster(index: int) -> str:
    """The cluster of the `index`-th model route (model names may hold `/` and `:`, so not the name)."""
    return f"model_{index}"


PURGE_REFUSED = error_body(
    "method_not_allowed", "PURGE is not accepted here: cache purges go through the purge broadcaster"
)


def purge_refusal() -> Why:
    """The first route: a client's PURGE gets 405 from Envoy itself, never reaching a cache pod."""
    return Why(
        {
            "match": {"prefix": "/", "headers": [{"name": ":method", "string_match": {"exact": "PURGE"}}]},
            "direct_response": {"status": 405, "body": {"inline_string": PURGE_REFUSED.decode()}},
            "response_headers_to_add": [
                {
                    "header": {"key": "content-type", "value": "application/json"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
        },
        "A client's PURGE is refused here (405): behind Envoy every client reaches a Varnish pod from "
        "Envoy's address, so the pods' PURGE ACL would let anyone purge through the ingress. Only the "
        "purge broadcaster sends PURGE, straight to the pods.",
    )


def path_cluster(index: int) -> str:
    """The cluster of the `index`-th path route."""
    return f"path_{index}"


def _path_routes(config: FrontConfig) -> list[Any]:
    routes: list[Any] = []
    for i, (path, _) in enumerate(config.path_routes):
        entry = _route(config, path_cluster(i))
        entry["match"] = {"path_separated_prefix": path}
        if i == 0:
            routes.append(
                Why(
                    entry,
                    f"A route per path (path_routes): {path} and everything under it (not {path}x) to its "
                    "own pods, hashed like the default route; before the model routes, so the cache tier "
                    "answers a cacheable path whatever its model.",
                )
            )
            continue
        routes.append(entry)
    return routes


def _routes(config: FrontConfig) -> list[Any]:
    """The PURGE refusal, one route per path, one per model (`x-model` exact), the default route."""
    routes: list[Any] = [purge_refusal(), *_path_routes(config)]
    for i, (model, _) in enumerate(config.model_routes):
        entry = _route(config, model_cluster(i))
        entry["match"]["headers"] = [{"name": MODEL_HEADER, "string_match": {"exact": model}}]
        if i > 0:
            routes.append(entry)
            continue
        setters = ", ".join(config.needs.sets_headers.get(MODEL_HEADER, ())) or "a re-routing filter"
        routes.append(
            Why(
                entry,
                f"A route per model (model_routes) on {MODEL_HEADER}, which {setters} sets from the "
                "body; Envoy picks the route again after meshkit's answer (clear_route_cache). A client's "
                f"own {MODEL_HEADER} is removed before meshkit's filter, and meshkit has the route picked "
                "again in the headers phase too: header_mutation looks the route up (and Envoy caches "
                "it) before it removes the header.",
            )
        )
    default = _route(config, "upstream")
    if not config.model_routes and not config.path_routes:
        return [*routes, default]
    routes.append(Why(default, "Every other request (no route of its own above)."))
    return routes


def _route(config: FrontConfig, cluster: str = "upstream") -> dict[str, Any]:
    hashes = config.needs.hash_headers
    route: dict[str, Any] = {"cluster": cluster, "timeout": _route_timeout(config)}
    entry: dict[str, Any] = {"match": {"prefix": "/"}, "route": route}
    if not hashes:
        return entry
    hashers = {n for names in hashes.values() for n in names}
    by = [n for n in config.needs.names if n in hashers]
    route["hash_policy"] = Why(
        [{"header": {"header_name": h}} for h in hashes],
        f"The same {', '.join(hashes)} always lands on the same pod ({', '.join(by)}: hash_header). "
        "The router hashes after meshkit's filter has run, so it sees the header meshkit set; a "
        "request without it goes to any pod.",
    )
    entry["response_headers_to_add"] = Why(
        [
            {"header": {"key": h, "value": f"%REQ({h})%"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for h in hashes
        ],
        "The hash goes back to the client for debugging, from Envoy, with no extra round trip.",
    )
    return entry


def _http_filters(config: FrontConfig) -> list[Any]:
    filters: list[Any] = []
    removal = header_removal(config)
    if removal is not None:
        filters.append(removal)
    if config.api is not None:
        filters.append(meshkit_filter(config, config.api))
    filters.append({"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}})
    return filters


def _listener(config: FrontConfig) -> dict[str, Any]:
    buffer = envoy_buffer_limit(config.max_body_bytes)
    hcm = {
        "@type": _HCM,
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        "normalize_path": Why(
            True,
            "Paths are normalised (RFC 3986: `/v1/../admin` is `/admin`) before any filter or route sees "
            "them, so a scope rule on a path prefix cannot be dodged.",
        ),
        "merge_slashes": Why(True, "`//v1//embeddings` is `/v1/embeddings` for filters and routes alike."),
        "path_with_escaped_slashes_action": Why(
            "UNESCAPE_AND_REDIRECT",
            "`%2F` in a path is redirected to `/`: a prefix rule sees the path the upstream sees.",
        ),
        "use_remote_address": Why(
            True,
            "Envoy appends the client's address to x-forwarded-for: its last entry is the peer Envoy saw "
            "(the client_ip of auth events), whatever the client sent.",
        ),
        "local_reply_config": Why(
            {"mappers": local_reply_mappers(config.max_body_bytes)},
            "Envoy's own 413 (body over its buffer) and 500/504 (meshkit failed, the chain fails closed) "
            "get meshkit's JSON error body; matched on response.code_details, so a filter's own "
            "413 or 500 keeps its body.",
        ),
        "route_config": {
            "name": "ingress",
            "virtual_hosts": [{"name": "upstream", "domains": ["*"], "routes": _routes(config)}],
        },
        "http_filters": _http_filters(config),
    }
    return {
        "name": "ingress",
        "address": socket_address(config.listen_address, config.listen_port),
        "per_connection_buffer_limit_bytes": Why(
            buffer,
            "Holds a whole buffered body plus headroom (--max-body-bytes + 1 MiB), or Envoy answers "
            "413 before meshkit sees it.",
        ),
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }


def _meshkit_cluster(config: FrontConfig, api: Api) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": MESHKIT_CLUSTER,
        **_addressing(config.extproc_host),
        "connect_timeout": duration(CONNECT_TIMEOUT),
    }
    options: dict[str, Any] = {"@type": f"type.googleapis.com/{_HTTP_OPTIONS}"}
    if api is Api.EXT_AUTHZ_HTTP:
        cluster["per_connection_buffer_limit_bytes"] = Why(
            envoy_buffer_limit(config.max_body_bytes), "The buffered body plus headroom must fit."
        )
        options["common_http_protocol_options"] = Why(
            {"idle_timeout": duration(HTTP_IDLE_TIMEOUT)},
            f"Envoy closes idle connections before meshkit would (its keep-alive is "
            f"{duration(KEEPALIVE_SECONDS)}), so a check never goes out on a connection the server is "
            "closing at that moment.",
        )
        options["explicit_http_config"] = Why(
            {"http_protocol_options": {}}, "Plain HTTP/1.1 with keep-alive."
        )
    else:
        options["explicit_http_config"] = Why(
            {"http2_protocol_options": {}},
            "gRPC needs HTTP/2: without it the config validates but every request fails with 500.",
        )
        cluster["circuit_breakers"] = Why(
            {"thresholds": [{"max_requests": UNLIMITED, "max_pending_requests": UNLIMITED}]},
            "Envoy's default circuit breaker allows 1,024 requests at once to a cluster, and each gRPC "
            "stream to meshkit is one: ext_proc holds its stream for the whole client request (the "
            "upstream's answer included), so the 1,025th concurrent request failed (let through "
            "unprocessed, or 500). No limit here, as in Istio: meshkit is not the bottleneck to guard.",
        )
    cluster["typed_extension_protocol_options"] = {_HTTP_OPTIONS: options}
    cluster["load_assignment"] = _endpoints(MESHKIT_CLUSTER, config.extproc_host, (config.meshkit_port,))
    return cluster


def _upstream_cluster(
    config: FrontConfig, name: str = "upstream", ports: tuple[int, ...] | None = None
) -> dict[str, Any]:
    hashes = config.needs.hash_headers
    if hashes:
        lb = Why("RING_HASH", f"Consistent hashing on {', '.join(hashes)} (the route's hash_policy).")
    else:
        lb = Why("ROUND_ROBIN", "No filter declares a hash_header: nothing to hash on.")
    return {
        "name": name,
        **_addressing(config.upstream_host),
        "connect_timeout": duration(CONNECT_TIMEOUT),
        "per_connection_buffer_limit_bytes": envoy_buffer_limit(config.max_body_bytes),
        "lb_policy": lb,
        "load_assignment": _endpoints(
            name, config.upstream_host, config.upstream_ports if ports is None else ports
        ),
    }


def front_tree(config: FrontConfig) -> dict[str, Any]:
    """The bootstrap, with the reasons (`Why`) still attached."""
    clusters = [_upstream_cluster(config)]
    clusters += [
        _upstream_cluster(config, path_cluster(i), ports) for i, (_, ports) in enumerate(config.path_routes)
    ]
    clusters += [
        _upstream_cluster(config, model_cluster(i), ports) for i, (_, ports) in enumerate(config.model_routes)
    ]
    if config.api is not None:
        clusters.insert(0, _meshkit_cluster(config, config.api))
    tree: dict[str, Any] = {
        "admin": {"address": socket_address(config.admin_address, config.admin_port)},
        "static_resources": {"listeners": [_listener(config)], "clusters": clusters},
    }
    inline = _inline_headers(config)
    if inline is not None:
        tree["inline_headers"] = inline
    return tree


# Not inline, ever: a cookie's repeats are joined with "; ", Host is :authority.
_NOT_INLINED = frozenset({"cookie", "host"})


def _inline_headers(config: FrontConfig) -> Why | None:
    """The headers filters read, registered as Envoy inline headers: a repeated one is then one header
    with the values joined by commas, as every path shows it to meshkit (ext_authz joins them itself;
    ext_proc would otherwise send each, and meshkit keep the last)."""
    if config.api is None:
        return None
    names = sorted(h for h in config.needs.reads_headers if h not in _NOT_INLINED and not h.startswith(":"))
    if not names:
        return None
    return Why(
        [{"inline_header_name": h, "inline_header_type": "REQUEST_HEADER"} for h in names],
        f"The headers filters read ({', '.join(names)}) arrive at meshkit the same way on every API: a "
        "repeated one as one value, joined with commas. ext_authz joins repeats itself; ext_proc sends "
        "each, and meshkit keeps the last: `x-api-key: junk` + `x-api-key: <good key>` passed over "
        "ext_proc alone (ext_authz refused the joined value), and the upstream got both.",
    )


def front_document(config: FrontConfig) -> dict[str, Any]:
    result: dict[str, Any] = plain(front_tree(config))
    return result


def _bind_host(host: str) -> str:
    """The host meshkit listens on for Envoy to reach it at `host`: an address as it is; localhost as
    127.0.0.1, the address Envoy connects to (V4_PREFERRED; meshkit would bind whichever address the
    system lists first); any other name (a Kubernetes Service) every interface of its own pod, since a
    Service name is not an address a process can bind."""
    if _cluster_type(host) == "STATIC":
        return host
    return "127.0.0.1" if host == "localhost" else "0.0.0.0"


def _meshkit_command(config: FrontConfig) -> str:
    """The `meshkit extproc` command line this config agrees with."""
    if config.api is None:
        return ""
    parts = [
        "meshkit extproc",
        f"--filters {','.join(config.needs.names)}",
        f"--max-body-bytes {config.max_body_bytes}",
        f"--filter-timeout {config.filter_timeout:g}",
    ]
    address = f"{uri_host(_bind_host(config.extproc_host))}:{config.meshkit_port}"
    if config.api is Api.EXT_AUTHZ_HTTP:
        parts.append(f"--http-listen {address}")
    else:
        parts.append(f"--listen {address}")
    return " ".join(parts)


def header(config: FrontConfig) -> str:
    """The comment block on top: what this is and the meshkit it must be run with."""
    lines = [
        f"Envoy ingress: {_TITLES[config.api]}.",
        "Built by meshkit.render from the filter chain's own declarations (meshkit.extproc.filter.Filter):",
        "every derived part says why in a comment above it.",
    ]
    command = _meshkit_command(config)
    if command:
        lines += [
            f"Filter chain: {', '.join(config.needs.names)}. Run meshkit with the same chain and limits:",
            f"  {command}",
        ]
        if _bind_host(config.extproc_host) == "0.0.0.0" != config.extproc_host:
            lines.append(
                f"(Envoy reaches it as {config.extproc_host}:{config.meshkit_port}; it listens on every "
                "interface of its pod.)"
            )
        if config.api is Api.EXT_AUTHZ_HTTP:
            lines.append("(--http-listen is off unless given: this config needs it.)")
    return "\n".join(lines)


def front_yaml(config: FrontConfig) -> str:
    return to_yaml(front_tree(config), header(config))
