"""`meshkit render`: print the Envoy config a user deploys in front of `meshkit extproc`.

    meshkit render --api ext_authz_http|ext_authz|ext_proc --filters body-hash,... > envoy.yaml

Every address has a default, so the bare command already prints a config Envoy accepts:

    --listen    127.0.0.1:10000   Envoy's ingress (0.0.0.0:10000 to take traffic from other hosts)
    --admin     127.0.0.1:9901    Envoy's admin
    --meshkit   127.0.0.1:50051   meshkit's --listen (ext_proc, ext_authz);
                127.0.0.1:50052   its --http-listen (ext_authz_http; off in meshkit unless given)
    --upstream  127.0.0.1:8080    the pods behind Envoy; a DNS name (a Kubernetes Service) is resolved
                                  by Envoy (STRICT_DNS)

`--path-route PATH=PORT,...` (the cache tier: `/v1/embeddings=6081,6082`, ring-hashed on the chain's
hash header) and `--model-route MODEL=PORT,...` (on `x-model`, which model-router sets) add routes,
each to its own cluster of ports on `--upstream`'s host, before the default route.

`--filters`, `--max-body-bytes` and `--filter-timeout` default to what `meshkit extproc` runs with and
must match how it is started (the printed header shows that command line); Envoy's timeouts are derived
from `--filter-timeout`; the route has no timeout unless `--route-timeout` gives one (an LLM answer can
take minutes). `--failure-mode-allow true|false` overrides what the chain implies. Problems are
reported together as a ConfigError (the CLI exits 2).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from meshkit.errors import ConfigError
from meshkit.extproc.apis import Api
from meshkit.options import parse_host_port, parse_seconds, parse_size, parse_str_tuple
from meshkit.render.front_config import FrontConfig
from meshkit.render.meshkit_defaults import (
    DEFAULT_FILTER_TIMEOUT,
    DEFAULT_FILTERS,
    DEFAULT_GRPC_PORT,
    DEFAULT_HTTP_CHECK_PORT,
    DEFAULT_MAX_BODY_BYTES,
)

__all__ = ["add_arguments", "run"]

DEFAULT_API = Api.EXT_AUTHZ_HTTP
DEFAULT_LISTEN = "127.0.0.1:10000"
DEFAULT_ADMIN = "127.0.0.1:9901"  # Envoy's usual admin port; the harness uses 0 instead
DEFAULT_UPSTREAM = "127.0.0.1:8080"
DEFAULT_MESHKIT_HOST = "127.0.0.1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api",
        choices=[a.value for a in Api],
        default=DEFAULT_API.value,
        help=f"how Envoy calls meshkit (default: {DEFAULT_API.value}, the cheapest path per request)",
    )
    parser.add_argument(
        "--filters",
        default=",".join(DEFAULT_FILTERS),
        metavar="NAME,...",
        help=f"the chain meshkit runs, in order (default: {','.join(DEFAULT_FILTERS)})",
    )
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"Envoy's ingress (default: {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--admin",
        default=DEFAULT_ADMIN,
        metavar="HOST:PORT",
        help=f"Envoy's admin (default: {DEFAULT_ADMIN})",
    )
    parser.add_argument(
        "--meshkit",
        metavar="HOST:PORT",
        help=f"where meshkit answers (default: {DEFAULT_MESHKIT_HOST}:{DEFAULT_GRPC_PORT}, its --listen; "
        f"ext_authz_http: {DEFAULT_MESHKIT_HOST}:{DEFAULT_HTTP_CHECK_PORT}, its --http-listen)",
    )
    parser.add_argument(
        "--upstream",
        default=DEFAULT_UPSTREAM,
        metavar="HOST:PORT",
        help=f"the upstream pods; a DNS name is resolved by Envoy (default: {DEFAULT_UPSTREAM})",
    )
    parser.add_argument(
        "--path-route",
        action="append",
        metavar="PATH=PORT,...",
        help="a route for PATH and everything under it to its own cluster of these ports on --upstream's "
        "host, hashed like the default route (the cache tier: /v1/embeddings=6081,6082); repeatable",
    )
    parser.add_argument(
        "--model-route",
        action="append",
        metavar="MODEL=PORT,...",
        help="a route per model (x-model, set by model-router) to these ports on --upstream's host; "
        "repeatable",
    )
    parser.add_argument(
        "--max-body-bytes",
        default=str(DEFAULT_MAX_BODY_BYTES),
        metavar="BYTES",
        help=f"meshkit's --max-body-bytes: Envoy's buffers follow it (default: {DEFAULT_MAX_BODY_BYTES})",
    )
    parser.add_argument(
        "--filter-timeout",
        default=str(DEFAULT_FILTER_TIMEOUT),
        metavar="SECONDS",
        help=f"meshkit's --filter-timeout: Envoy's timeouts sit above it (default: {DEFAULT_FILTER_TIMEOUT})",
    )
    parser.add_argument(
        "--route-timeout",
        metavar="SECONDS",
        help="Envoy's limit on the upstream's whole answer (default: 0, none: LLM answers take minutes)",
    )
    parser.add_argument(
        "--failure-mode-allow",
        choices=("true", "false"),
        help="let requests through when meshkit fails (default: true only if every filter is fail_open)",
    )


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = parse_host_port(value).rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _upstream(value: str) -> tuple[str, tuple[int, ...]]:
    host, port = _host_port(value)
    return host, (port,)


def _routes(values: list[str]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """`NAME=PORT,PORT` flags as FrontConfig's routes; a name given twice is refused."""
    routes: dict[str, tuple[int, ...]] = {}
    for value in values:
        name, sep, ports = value.partition("=")
        if not sep or not name or not ports:
            raise ValueError(f"{value!r} is not NAME=PORT,PORT...")
        if name in routes:
            raise ValueError(f"{name!r} is given twice")
        try:
            routes[name] = tuple(int(p) for p in ports.split(","))
        except ValueError:
            raise ValueError(f"{ports!r} is not a comma-separated list of ports") from None
    return tuple(routes.items())


def _parsed(args: argparse.Namespace) -> dict[str, Any]:
    """FrontConfig's keyword arguments from the flags; every bad flag in one ConfigError."""
    problems: list[str] = []
    values: dict[str, Any] = {"api": Api(args.api), "filters": parse_str_tuple(args.filters)}

    def take(flag: str, parse: Any, *names: str) -> None:
        raw = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if raw is None:
            return
        try:
            parsed = parse(raw)
        except ValueError as exc:
            problems.append(f"{flag} {raw!r}: {exc}")
            return
        if len(names) == 1:
            values[names[0]] = parsed
        else:
            values.update(zip(names, parsed, strict=True))

    take("--listen", _host_port, "listen_address", "listen_port")
    take("--admin", _host_port, "admin_address", "admin_port")
    take("--meshkit", _host_port, "extproc_host", "extproc_port")
    take("--upstream", _upstream, "upstream_host", "upstream_ports")
    take("--path-route", _routes, "path_routes")
    take("--model-route", _routes, "model_routes")
    take("--max-body-bytes", parse_size, "max_body_bytes")
    take("--filter-timeout", parse_seconds, "filter_timeout")
    take("--route-timeout", parse_seconds, "route_timeout")
    take("--failure-mode-allow", lambda v: v == "true", "failure_mode_allow")
    if getattr(args, "config", None) is not None:
        problems.append("--config: render reads flags only (pass --filters, --max-body-bytes, ...)")
    if problems:
        raise ConfigError(problems)
    return values


def config_from(args: argparse.Namespace) -> FrontConfig:
    """The FrontConfig the flags describe (ConfigError listing every problem)."""
    return FrontConfig(**_parsed(args))


def run(args: argparse.Namespace) -> int:
    """Print the config on stdout; a bad flag or chain raises ConfigError (the CLI prints it, exits 2)."""
    sys.stdout.write(config_from(args).render())
    sys.stdout.flush()
    return 0
