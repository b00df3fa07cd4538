"""Routes per path (`FrontConfig.path_routes`): the cache tier's `/v1/embeddings` to its own ring-hashed
Varnish cluster, before the model routes; checked by Envoy itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meshkit.errors import ConfigError
from meshkit.extproc.apis import Api
from meshkit.render import FrontConfig

from .conftest import cluster, routes_after_refusals, validate

PATHS = (("/v1/embeddings", (6081, 6082)),)


def config(api: Api | None = Api.EXT_AUTHZ_HTTP, **kw: Any) -> FrontConfig:
    kw.setdefault("filters", ("model-router", "body-hash"))
    kw.setdefault("path_routes", PATHS)
    return FrontConfig(upstream_ports=(8080,), extproc_port=50052, api=api, **kw)


def ports_of(doc: dict[str, Any], name: str) -> list[int]:
    endpoints = cluster(doc, name)["load_assignment"]["endpoints"][0]["lb_endpoints"]
    return [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints]


@pytest.mark.parametrize("api", [Api.EXT_PROC, Api.EXT_AUTHZ, Api.EXT_AUTHZ_HTTP, None])
def test_a_path_route_comes_before_the_model_routes_and_hashes_like_the_default(
    api: Api | None, tmp_path: Path
) -> None:
    cfg = config(api, model_routes=(("gpt-4o", (8090,)),))
    text = cfg.render()
    validate(text, tmp_path)
    doc = cfg.document()
    got = routes_after_refusals(doc)
    assert [r["route"]["cluster"] for r in got] == ["path_0", "model_0", "upstream"]
    assert got[0]["match"] == {"path_separated_prefix": "/v1/embeddings"}
    assert ports_of(doc, "path_0") == [6081, 6082]
    if api is not None:
        assert got[0]["route"]["hash_policy"] == got[-1]["route"]["hash_policy"]
        assert got[0]["route"]["hash_policy"] == [{"header": {"header_name": "x-body-hash"}}]
        assert cluster(doc, "path_0")["lb_policy"] == "RING_HASH"
    assert "A route per path" in text


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("v1/embeddings", "is not a path"),
        ("/v1/embeddings/", "is not a path"),
        ("/v1/../admin", "is not a path"),
        ("/v1/emb eddings", "is not a path"),
        ("/", "is not a path"),
    ],
)
def test_bad_paths_are_config_errors(path: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        config(path_routes=((path, (6081,)),))


def test_a_path_route_needs_ports_that_envoy_can_connect_to() -> None:
    with pytest.raises(ConfigError, match="name at least one upstream port"):
        config(path_routes=(("/v1/embeddings", ()),))
    with pytest.raises(ConfigError, match="cannot be 0"):
        config(path_routes=(("/v1/embeddings", (0,)),))
