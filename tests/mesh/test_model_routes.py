"""Routes per model (`FrontConfig.model_routes`): one route on `x-model` per model, each to its own
cluster, the default route last; checked by Envoy itself on every API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meshkit.errors import ConfigError
from meshkit.extproc.apis import Api
from meshkit.render import FrontConfig

from .conftest import cluster, hcm, meshkit_filter, routes_after_refusals, validate

APIS = [Api.EXT_PROC, Api.EXT_AUTHZ, Api.EXT_AUTHZ_HTTP]
MODELS = (("gpt-4o", (8081,)), ("org/llama-3:8b", (8082, 8083)))


def config(api: Api | None = Api.EXT_PROC, **kw: Any) -> FrontConfig:
    kw.setdefault("filters", ("model-router",))
    kw.setdefault("model_routes", MODELS)
    return FrontConfig(upstream_ports=(8080,), extproc_port=50051, api=api, **kw)


def routes(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return routes_after_refusals(doc)


def ports_of(doc: dict[str, Any], name: str) -> list[int]:
    endpoints = cluster(doc, name)["load_assignment"]["endpoints"][0]["lb_endpoints"]
    return [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints]


@pytest.mark.parametrize("api", APIS)
def test_a_route_per_model_then_the_default(api: Api, tmp_path: Path) -> None:
    cfg = config(api, filters=("model-router", "body-hash"))
    text = cfg.render()
    validate(text, tmp_path)
    doc = cfg.document()
    got = routes(doc)
    assert [r["match"].get("headers") for r in got] == [
        [{"name": "x-model", "string_match": {"exact": "gpt-4o"}}],
        [{"name": "x-model", "string_match": {"exact": "org/llama-3:8b"}}],
        None,
    ]
    assert [r["route"]["cluster"] for r in got] == ["model_0", "model_1", "upstream"]
    assert all(r["match"]["prefix"] == "/" for r in got)
    # every route keeps what the default one has (hash policy, timeout)
    assert all(r["route"]["hash_policy"] == got[-1]["route"]["hash_policy"] for r in got)
    assert ports_of(doc, "model_0") == [8081]
    assert ports_of(doc, "model_1") == [8082, 8083]
    assert ports_of(doc, "upstream") == [8080]
    assert cluster(doc, "model_1")["lb_policy"] == "RING_HASH"
    assert "A route per model" in text


@pytest.mark.parametrize("api", [Api.EXT_AUTHZ, Api.EXT_AUTHZ_HTTP])
def test_ext_authz_re_picks_the_route_and_forwards_x_model(api: Api) -> None:
    doc = config(api).document()
    block = meshkit_filter(doc)
    assert block["clear_route_cache"] is True
    if api is Api.EXT_AUTHZ_HTTP:
        allowed = block["http_service"]["authorization_response"]["allowed_upstream_headers"]["patterns"]
        assert {"exact": "x-model"} in allowed
        assert {"exact": "x-stream"} in allowed


def test_client_x_model_is_removed_before_meshkit() -> None:
    doc = config().document()
    (removal,) = [f for f in hcm(doc)["http_filters"] if f["name"] == "envoy.filters.http.header_mutation"]
    removed = [m["remove"] for m in removal["typed_config"]["mutations"]["request_mutations"]]
    assert "x-model" in removed
    assert "x-stream" in removed


def test_without_model_routes_the_single_route_stays() -> None:
    doc = FrontConfig(upstream_ports=(8080,), filters=("model-router",)).document()
    assert len(routes(doc)) == 1
    assert [c["name"] for c in doc["static_resources"]["clusters"]] == ["meshkit_extproc", "upstream"]


@pytest.mark.parametrize(
    ("kw", "problem"),
    [
        ({"model_routes": (("bad model", (8081,)),)}, "is not a model name"),
        ({"model_routes": (("gpt-4o", ()),)}, "name at least one upstream port"),
        ({"model_routes": (("gpt-4o", (0,)),)}, "cannot be 0"),
        ({"filters": ("body-hash",)}, "no filter of the chain re-routes"),
    ],
)
def test_bad_model_routes_are_config_errors(kw: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        config(**kw)
