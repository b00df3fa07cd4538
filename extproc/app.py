"""`meshkit extproc`: one filter chain served to Envoy over ext_proc, ext_authz gRPC and ext_authz HTTP.

Served on `--listen`: `envoy.service.ext_proc.v3.ExternalProcessor`, `envoy.service.auth.v3.Authorization`,
`grpc.health.v1.Health` and server reflection. On `--http-listen` (optional): Envoy's ext_authz HTTP
protocol. On `--admin-listen`: `/healthz`, `/readyz`, `/metrics`. One filter chain behind all three.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshkit.admin import Readiness, start_admin
from meshkit.daemon import DaemonOptions
from meshkit.errors import MeshkitError
from meshkit.extproc import authz, server
from meshkit.extproc.chain import Chain
from meshkit.extproc.cores import AioCore
from meshkit.extproc.filters import FILTERS, build
from meshkit.extproc.http_authz import HttpAuthorization, HttpAuthzServer
from meshkit.extproc.limits import grpc_message_limit
from meshkit.extproc.metrics import Metrics
from meshkit.options import option, parse_host_port, parse_size, parse_str_tuple

log = logging.getLogger("meshkit.extproc")


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
    max_body_bytes: int = option(
        8 << 20,
        "largest request body accepted (bigger: 413); also sets the gRPC limit",
        parse=parse_size,
        metavar="BYTES",
    )


class ListenError(MeshkitError):
    """The gRPC or admin address cannot be bound."""


async def serve(
    options: ExtprocOptions,
    daemon: DaemonOptions,
    filter_options: Mapping[type[Any], Any],
    *,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
) -> None:
    """Serve until `stop` is set, then drain: readiness off, `drain_delay`, stop with `drain_timeout`."""
    filters = build(options.filters, filter_options)
    metrics = Metrics([f.name for f in filters])
    chain = Chain(filters, metrics)
    limit = grpc_message_limit(options.max_body_bytes)
    handlers = (
        server.ExternalProcessor(chain, max_body_bytes=options.max_body_bytes).handler(),
        authz.Authorization(chain, max_body_bytes=options.max_body_bytes).handler(),
    )
    services = (server.SERVICE, authz.SERVICE)
    core = AioCore(handlers, services, limit)
    try:
        port = core.add_port(options.listen)
    except RuntimeError as exc:
        raise ListenError(f"cannot listen on {options.listen}: {exc}") from None
    host = options.listen.rpartition(":")[0]
    readiness = Readiness()
    try:
        admin_runner, admin_addr = await start_admin(daemon.admin_listen, readiness, metrics.registry)
    except OSError as exc:
        raise ListenError(
            f"cannot listen on {daemon.admin_listen} (--admin-listen): {exc.strerror}"
        ) from None
    http_server: HttpAuthzServer | None = None
    addresses = {"grpc": f"{host}:{port}", "admin": admin_addr}
    if options.http_listen:
        http_server = HttpAuthzServer(HttpAuthorization(chain, max_body_bytes=options.max_body_bytes))
        try:
            addresses["http"] = await http_server.start(options.http_listen)
        except OSError as exc:
            await admin_runner.cleanup()
            raise ListenError(
                f"cannot listen on {options.http_listen} (--http-listen): {exc.strerror}"
            ) from None
    await core.start(services)
    readiness.set(True, "serving")
    log.info("ready", extra={**addresses, "filters": ",".join(options.filters)})
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        readiness.set(False, "draining")
        await core.not_serving()
        if daemon.drain_delay:
            log.info("readiness off; closing the listener in %.1f s (--drain-delay)", daemon.drain_delay)
            await asyncio.sleep(daemon.drain_delay)
        log.info("stopped accepting; in-flight requests get up to %.1f s", daemon.drain_timeout)
        stops = [core.stop(daemon.drain_timeout)]
        if http_server is not None:
            stops.append(http_server.stop(daemon.drain_timeout))
        await asyncio.gather(*stops)
    finally:
        await core.stop(None)
        if http_server is not None:
            await http_server.stop(0)
        await admin_runner.cleanup()
    log.info("stopped")
