"""`meshkit extproc`: one filter chain served to Envoy over ext_proc, ext_authz gRPC and ext_authz HTTP.

Served on `--listen`: `envoy.service.ext_proc.v3.ExternalProcessor`, `envoy.service.auth.v3.Authorization`,
`grpc.health.v1.Health` and server reflection. On `--http-listen` (optional): Envoy's ext_authz HTTP
protocol. The admin port, readiness, the ready line and the stop order are `meshkit.daemon`'s. Start-up:
bind every address (a taken port fails at once), start the filters in chain order (`start()`: the
daemon is ready only after all of them), then serve; at shutdown the filters close in reverse order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshkit.daemon import Daemon, Lifecycle, Resolved, bind, bound_address
from meshkit.extproc import ext_authz_grpc, ext_proc
from meshkit.extproc.chain import DEFAULT_FILTER_TIMEOUT, DEFAULT_MAX_BODY_BYTES, Chain
from meshkit.extproc.ext_authz_http import HttpAuthorization, HttpAuthzServer
from meshkit.extproc.filter import lifecycle_of
from meshkit.extproc.filters import FILTERS, build, option_groups, option_sections
from meshkit.extproc.grpc_server import GrpcServer
from meshkit.extproc.limits import grpc_message_limit
from meshkit.extproc.metrics import Metrics
from meshkit.options import (
    option,
    parse_host_port,
    parse_non_negative_int,
    parse_seconds,
    parse_size,
    parse_str_tuple,
)


def _parse_filters(value: Any) -> tuple[str, ...]:
    names = parse_str_tuple(value)
    unknown = [n for n in names if n not in FILTERS]
    if unknown:
        raise ValueError(f"unknown filter {', '.join(unknown)}; available: {', '.join(FILTERS)}")
    if not names:
        raise ValueError(f"name at least one filter; available: {', '.join(FILTERS)}")
    if len(set(names)) != len(names):
        raise ValueError("a filter is named twice")
    return names


def _parse_filter_timeout(value: Any) -> float:
    seconds = parse_seconds(value)
    if seconds <= 0:
        raise ValueError("must be more than 0 seconds")
    return seconds


@dataclass(frozen=True)
class ExtprocOptions:
    listen: str = option(
        "127.0.0.1:50051",
        "HOST:PORT of the gRPC server (port 0: any free port)",
        parse=parse_host_port,
        metavar="HOST:PORT",
    )
    filters: tuple[str, ...] = option(
        ("body-hash",),
        f"filter chain, in order ({', '.join(FILTERS)})",
        parse=_parse_filters,
        metavar="NAME,...",
    )
    http_listen: str = option(
        "",
        "HOST:PORT for Envoy's ext_authz HTTP protocol (http_service), the cheapest path; empty: off",
        parse=lambda v: parse_host_port(v) if str(v).strip() else "",
        metavar="HOST:PORT",
    )
    http_max_connections: int = option(
        0,
        "most open connections on --http-listen; beyond it the connection whose request began longest ago "
        "and has not arrived whole is closed first, then the least recently used idle one "
        "(0: half the file-descriptor limit, at most 8192)",
        parse=parse_non_negative_int,
        metavar="N",
    )
    max_body_bytes: int = option(
        DEFAULT_MAX_BODY_BYTES,
        "largest request body accepted (bigger: 413); also sets the gRPC limit",
        parse=parse_size,
        metavar="BYTES",
    )
    filter_timeout: float = option(
        DEFAULT_FILTER_TIMEOUT,
        "deadline for the hooks of one check / one ext_proc message: an async hook still running is "
        "cancelled (504, or let through by a fail-open filter); keep it below Envoy's timeout",
        parse=_parse_filter_timeout,
        metavar="SECONDS",
    )


async def serve(options: Resolved, life: Lifecycle) -> None:
    opts: ExtprocOptions = options[ExtprocOptions]
    filters = build(opts.filters, options)
    for f in filters:
        for collector in getattr(f, "collectors", tuple)():
            life.registry.register(collector)
    metrics = Metrics([f.name for f in filters], registry=life.registry)
    chain = Chain(filters, metrics, max_body_bytes=opts.max_body_bytes, filter_timeout=opts.filter_timeout)
    services = (ext_proc.SERVICE, ext_authz_grpc.SERVICE)
    grpc_server = GrpcServer(
        (ext_proc.ExternalProcessor(chain).handler(), ext_authz_grpc.Authorization(chain).handler()),
        services,
        grpc_message_limit(opts.max_body_bytes),
    )
    grpc_address = grpc_server.listen(opts.listen)  # bound now, served once the filters have started
    http_sock = bind(opts.http_listen, what="--http-listen") if opts.http_listen else None
    try:
        for f in filters:
            start, close = lifecycle_of(f)
            await life.start(f"filter {f.name}", start, close)
        await grpc_server.start(services)
        life.add_listener("grpc", grpc_address, grpc_server)
        life.on_draining(grpc_server.not_serving)
        if http_sock is not None:
            http_server = HttpAuthzServer(
                HttpAuthorization(chain), max_connections=opts.http_max_connections or None
            )
            await http_server.start(http_sock)
            life.add_listener("http", bound_address(opts.http_listen, http_sock), http_server)
            http_sock = None
    finally:
        if http_sock is not None:
            http_sock.close()
    life.readiness.details["filters"] = ",".join(opts.filters)


def _sections() -> list[type[Any]]:
    return [ExtprocOptions, *option_sections()]


DAEMON = Daemon(
    name="extproc",
    help="the ext_proc / ext_authz server: one filter chain, three APIs",
    sections=_sections,
    serve=serve,
    groups=option_groups,
)
