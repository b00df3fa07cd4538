"""`FrontConfig`: the values of one ingress Envoy in front of meshkit, checked once, with what is derived.

Everything a filter needs from Envoy is derived from the chain's filter classes (`needs_of`), and the
defaults a config shares with `meshkit extproc` (chain, body limit, filter timeout, ports) come from
its options (`meshkit_defaults`). What a caller may still set explicitly (`failure_mode_allow`, the
Envoy-side timeouts) defaults to `None`: derived. A bad combination is one `ConfigError` listing every
problem, raised when the `FrontConfig` is made.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Any

from meshkit.errors import ConfigError
from meshkit.extproc.apis import Api
from meshkit.extproc.routes_file import MODEL_NAME
from meshkit.options import MAX_SIZE
from meshkit.render.chain_needs import ChainNeeds, FilterRef, needs_of
from meshkit.render.envoy_timeouts import above_filter_timeout
from meshkit.render.meshkit_defaults import (
    DEFAULT_FILTER_TIMEOUT,
    DEFAULT_FILTERS,
    DEFAULT_MAX_BODY_BYTES,
    default_port,
)

__all__ = ["ROUTE_PATH", "FrontConfig"]

# A route path: segments of URL-safe characters, no trailing slash, no dot segments (Envoy normalises
# those away before routing, so a route on one would never match).
ROUTE_PATH = re.compile(r"(/(?!\.\.?(?:/|$))[A-Za-z0-9._~-]+)+")


@dataclass(frozen=True)
class FrontConfig:
    """An ingress Envoy: client -> Envoy -> meshkit's chain over `api` -> the upstream pods.

    `api=None` is Envoy alone (the benchmark's ceiling): the same listener, route and upstream cluster,
    no call to meshkit (and no header removal: with no meshkit, nothing owns a header). `render()` gives
    the YAML bootstrap, with comments saying why; `document()` the same as plain dicts.
    """

    upstream_ports: tuple[int, ...] = (8080,)  # several: the pods of one ring (or round robin)
    api: Api | None = Api.EXT_PROC  # the one API that runs every phase; None: Envoy alone
    filters: tuple[FilterRef, ...] = DEFAULT_FILTERS  # names from FILTERS, or filter classes
    extproc_port: int | None = None  # None: meshkit's default port for `api` (50051, HTTP 50052)
    extproc_host: str = "127.0.0.1"
    listen_address: str = "127.0.0.1"
    listen_port: int = 10000
    admin_address: str = "127.0.0.1"
    admin_port: int = 0
    upstream_host: str = "127.0.0.1"
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # meshkit's --max-body-bytes
    filter_timeout: float = DEFAULT_FILTER_TIMEOUT  # meshkit's --filter-timeout: Envoy waits longer
    failure_mode_allow: bool | None = None  # None: true only when every filter declares fail_open
    message_timeout: float | None = None  # ext_proc, per message; None: above filter_timeout
    grpc_timeout: float | None = None  # ext_authz over gRPC, the whole Check; None: above filter_timeout
    http_timeout: float | None = None  # ext_authz over HTTP, the whole check; None: above filter_timeout
    route_timeout: float = 0.0  # the upstream's whole answer; 0: none (LLM answers take minutes)
    # model -> the upstream ports serving it: a route per model on `x-model` (model-router), each to its
    # own cluster, before the default route to `upstream_ports`
    model_routes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # path -> the upstream ports serving it (the path and everything under it): a route per path, before
    # the model routes, each to its own cluster ring-hashed like the default (the cache tier:
    # ("/v1/embeddings", (varnish_a, varnish_b)))
    path_routes: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def __post_init__(self) -> None:
        problems: list[str] = []
        api: Any = self.api
        if isinstance(api, str) and not isinstance(api, Api):
            try:
                api = Api(api)
            except ValueError:
                problems.append(f"api: {api!r} is not one of {', '.join(a.value for a in Api)} (or None)")
                api = None
            object.__setattr__(self, "api", api)
        object.__setattr__(self, "filters", tuple(self.filters))
        object.__setattr__(self, "upstream_ports", tuple(self.upstream_ports))
        object.__setattr__(
            self,
            "model_routes",
            tuple((model, tuple(ports)) for model, ports in dict(self.model_routes).items()),
        )
        object.__setattr__(
            self,
            "path_routes",
            tuple((path, tuple(ports)) for path, ports in dict(self.path_routes).items()),
        )
        problems += self._problems()
        if problems:
            raise ConfigError(problems)

    def _problems(self) -> list[str]:
        problems = []
        if not self.upstream_ports:
            problems.append("upstream_ports: name at least one upstream")
        ports = {"listen_port": self.listen_port, "admin_port": self.admin_port}
        ports |= {f"upstream_ports[{i}]": p for i, p in enumerate(self.upstream_ports)}
        for model, model_ports in self.model_routes:
            if not MODEL_NAME.fullmatch(model):
                problems.append(f"model_routes: {model!r} is not a model name ({MODEL_NAME.pattern})")
            if not model_ports:
                problems.append(f"model_routes[{model!r}]: name at least one upstream port")
            ports |= {f"model_routes[{model!r}][{i}]": p for i, p in enumerate(model_ports)}
        for path, path_ports in self.path_routes:
            if not ROUTE_PATH.fullmatch(path):
                problems.append(
                    f"path_routes: {path!r} is not a path such as /v1/embeddings ({ROUTE_PATH.pattern})"
                )
            if not path_ports:
                problems.append(f"path_routes[{path!r}]: name at least one upstream port")
            ports |= {f"path_routes[{path!r}][{i}]": p for i, p in enumerate(path_ports)}
        if self.extproc_port is not None:
            ports["extproc_port"] = self.extproc_port
        problems += [f"{k}: {v} is not a port (0-65535)" for k, v in ports.items() if not 0 <= v <= 65535]
        # Envoy listens on port 0 (any free one), but connects to no such port: it would validate and
        # never reach the server.
        called = {
            k: v for k, v in ports.items() if k.startswith(("upstream_ports", "model_routes", "path_routes"))
        }
        if self.api is not None and self.extproc_port is not None:
            called["extproc_port"] = self.extproc_port
        problems += [f"{k}: Envoy connects to it, so it cannot be 0" for k, v in called.items() if v == 0]
        if self.max_body_bytes <= 0:
            problems.append(f"max_body_bytes: {self.max_body_bytes} must be more than 0")
        elif self.max_body_bytes > MAX_SIZE:  # what meshkit accepts; beyond 4 GiB Envoy's fields overflow
            problems.append(f"max_body_bytes: {self.max_body_bytes} must be at most {MAX_SIZE} (1 GiB)")
        if self.filter_timeout <= 0:
            problems.append(f"filter_timeout: {self.filter_timeout} must be more than 0 seconds")
        if self.route_timeout < 0:
            problems.append(f"route_timeout: {self.route_timeout} must be 0 (none) or more seconds")
        for name in ("message_timeout", "grpc_timeout", "http_timeout"):
            value = getattr(self, name)
            if value is not None and value <= self.filter_timeout:
                problems.append(
                    f"{name}: {value} s must be above filter_timeout ({self.filter_timeout} s), "
                    "or Envoy gives up before meshkit's own 504 can answer"
                )
        try:
            needs = self.needs
        except ConfigError as exc:
            return problems + exc.problems
        if self.api is not None and not needs.names:
            problems.append("filters: name at least one filter (meshkit refuses an empty chain)")
        if self.model_routes and self.api is not None and not needs.reroutes:
            problems.append(
                "model_routes: no filter of the chain re-routes (reroutes = True), so nothing sets x-model "
                "after the route is picked: add model-router to filters"
            )
        if self.api is not None and self.api.request_phases_only:
            problems += [
                f"filters: {name!r} has response-phase hooks, which {self.api.value} never runs "
                f"(it sees only the request): use ext_proc (--api ext_proc) for this chain"
                for name in needs.response_phase
            ]
        return problems

    # -- derived -----------------------------------------------------------------------------------
    @functools.cached_property
    def needs(self) -> ChainNeeds:
        """What the chain's filter classes need from Envoy."""
        return needs_of(self.filters)

    @property
    def fails_open(self) -> bool:
        """`failure_mode_allow` as rendered: the explicit value, else whether every filter fails open."""
        return self.needs.fail_open if self.failure_mode_allow is None else self.failure_mode_allow

    @property
    def meshkit_port(self) -> int:
        """The port Envoy calls meshkit on (0 only for `api=None`, which calls nothing)."""
        if self.extproc_port is not None:
            return self.extproc_port
        return 0 if self.api is None else default_port(self.api)

    @property
    def message_timeout_seconds(self) -> float:
        return self._timeout(self.message_timeout)

    @property
    def grpc_timeout_seconds(self) -> float:
        return self._timeout(self.grpc_timeout)

    @property
    def http_timeout_seconds(self) -> float:
        return self._timeout(self.http_timeout)

    def _timeout(self, explicit: float | None) -> float:
        if explicit is not None:
            return explicit
        return above_filter_timeout(self.filter_timeout, self.max_body_bytes)

    def replace(self, **changes: Any) -> FrontConfig:
        """A copy with `changes` (checked again)."""
        return dataclasses.replace(self, **changes)

    # -- output ------------------------------------------------------------------------------------
    def render(self) -> str:
        """The Envoy bootstrap as YAML, with comments that say why each derived part is there."""
        from meshkit.render.envoy_front import front_yaml

        return front_yaml(self)

    def document(self) -> dict[str, Any]:
        """The same bootstrap as plain dicts (what Envoy reads)."""
        from meshkit.render.envoy_front import front_document

        return front_document(self)
