"""Every rendered front config is checked by Envoy itself, and every rule that derives a part of it from
the filter chain has a test here, with small fake filters where the shipped chain cannot show the rule."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from meshkit.errors import ConfigError
from meshkit.extproc.apis import Api
from meshkit.extproc.chain import DEFAULT_FILTER_TIMEOUT, DEFAULT_MAX_BODY_BYTES, Chain
from meshkit.extproc.daemon import ExtprocOptions
from meshkit.extproc.ext_authz_http import KEEPALIVE_SECONDS, TRANSFER_BYTES_PER_SECOND
from meshkit.extproc.filter import Exchange, Filter
from meshkit.extproc.filters.body_hash import BodyHashFilter, BodyHashOptions
from meshkit.extproc.limits import envoy_buffer_limit
from meshkit.extproc.replies import INTERNAL_ERROR, too_large
from meshkit.render import FrontConfig, needs_of, processing_mode, upstream_direct
from meshkit.render.envoy_local_replies import ENVOY_TOO_LARGE, MESHKIT_FAILED

from .conftest import (
    cluster,
    comment_above,
    hcm,
    http_filter_names,
    meshkit_filter,
    route_entry,
    strings_in,
    validate,
)

RENDER_SOURCES = Path(__file__).resolve().parents[2] / "mesh" / "render"
APIS = [Api.EXT_PROC, Api.EXT_AUTHZ, Api.EXT_AUTHZ_HTTP]
AUTHZ_APIS = [Api.EXT_AUTHZ, Api.EXT_AUTHZ_HTTP]


# -- fake filters: each declares one thing the shipped chain does not ---------------------------------
class AuthFilter(Filter):
    """Fails closed (no fail_open), reads and sets headers of its own."""

    name: ClassVar[str] = "fake-auth"
    reads_headers: ClassVar[frozenset[str]] = frozenset({"authorization", "x-api-key"})
    sets_headers: ClassVar[frozenset[str]] = frozenset({"x-subject"})

    def on_request_headers(self, exchange: Exchange) -> None:
        exchange.set_header("x-subject", "someone")


class RouterFilter(Filter):
    """Re-routes (sets x-model and calls clear_route_cache()), fails open."""

    name: ClassVar[str] = "fake-router"
    sets_headers: ClassVar[frozenset[str]] = frozenset({"x-model"})
    fail_open: ClassVar[bool] = True
    reroutes: ClassVar[bool] = True

    def on_request_headers(self, exchange: Exchange) -> None:
        exchange.set_header("x-model", "small")
        exchange.clear_route_cache()


class UsageFilter(Filter):
    """Needs the response: token accounting from `usage`."""

    name: ClassVar[str] = "fake-usage"
    fail_open: ClassVar[bool] = True

    def on_response_body(self, exchange: Exchange) -> None:
        return None


class OtherHashFilter(Filter):
    """Hashes on a header that is not body-hash's."""

    name: ClassVar[str] = "fake-hash"
    sets_headers: ClassVar[frozenset[str]] = frozenset({"x-fake-hash"})
    hash_header: ClassVar[str | None] = "x-fake-hash"
    fail_open: ClassVar[bool] = True

    def on_request_body(self, exchange: Exchange) -> None:
        exchange.set_header("x-fake-hash", "h")


class QuietFilter(Filter):
    """Sets nothing, hashes on nothing, fails open."""

    name: ClassVar[str] = "fake-quiet"
    fail_open: ClassVar[bool] = True

    def on_request_headers(self, exchange: Exchange) -> None:
        return None


def render(**kw: Any) -> dict[str, Any]:
    """The rendered config as Envoy reads it (parsed from the printed YAML)."""
    kw.setdefault("upstream_ports", (8080, 8081))
    kw.setdefault("extproc_port", 50051)
    doc: dict[str, Any] = yaml.safe_load(FrontConfig(**kw).render())
    return doc


# -- Envoy accepts every variant --------------------------------------------------------------------
VARIANTS: dict[str, dict[str, Any]] = {
    "fail-open-chain": {},
    "fail-closed-override-small-body": {"failure_mode_allow": False, "max_body_bytes": 1024},
    "big-body": {"max_body_bytes": 64 << 20},
    "fail-closed-chain-rerouting": {"filters": ("body-hash", AuthFilter, RouterFilter)},
    "no-headers-set": {"filters": (QuietFilter,)},
}


@pytest.mark.parametrize("api", [*APIS, None], ids=[*(a.value for a in APIS), "envoy-alone"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_front_configs_validate(api: Api | None, variant: str, tmp_path: Path) -> None:
    config = FrontConfig(upstream_ports=(8080, 8081), extproc_port=50051, api=api, **VARIANTS[variant])
    validate(config.render(), tmp_path)
    doc = config.document()
    assert yaml.safe_load(config.render()) == doc  # the comments change nothing Envoy reads
    listener = doc["static_resources"]["listeners"][0]
    assert listener["per_connection_buffer_limit_bytes"] == envoy_buffer_limit(config.max_body_bytes)
    assert cluster(doc, "upstream")["per_connection_buffer_limit_bytes"] == envoy_buffer_limit(
        config.max_body_bytes
    )
    names = http_filter_names(doc)
    assert names[-1] == "envoy.filters.http.router"
    if api is None:
        assert names == ["envoy.filters.http.router"]
        assert [c["name"] for c in doc["static_resources"]["clusters"]] == ["upstream"]
        return
    assert meshkit_filter(doc)["failure_mode_allow"] is config.fails_open
    assert meshkit_filter(doc)["status_on_error"] == {"code": 500}


def test_upstream_direct_validates(tmp_path: Path) -> None:
    validate(upstream_direct(), tmp_path)
    doc = yaml.safe_load(upstream_direct(max_body_bytes=1024))
    assert doc["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] == envoy_buffer_limit(
        1024
    )


def test_a_dns_name_is_resolved_by_envoy(tmp_path: Path) -> None:
    config = FrontConfig(api=Api.EXT_AUTHZ, upstream_host="llm.default.svc", extproc_host="meshkit.local")
    validate(config.render(), tmp_path)
    doc = config.document()
    assert cluster(doc, "upstream")["type"] == "STRICT_DNS"
    assert cluster(doc, "meshkit_extproc")["type"] == "STRICT_DNS"
    assert cluster(render(), "upstream")["type"] == "STATIC"
    # IPv4 first (Envoy's AUTO took localhost to ::1); an address needs no lookup
    assert cluster(doc, "upstream")["dns_lookup_family"] == "V4_PREFERRED"
    assert cluster(doc, "meshkit_extproc")["dns_lookup_family"] == "V4_PREFERRED"
    assert "dns_lookup_family" not in cluster(render(), "upstream")


# -- rule: headers the filters set are removed from the client's request first --------------------------
@pytest.mark.parametrize("api", APIS)
def test_headers_filters_set_are_removed_before_meshkit(api: Api) -> None:
    doc = render(api=api, filters=("body-hash", AuthFilter, RouterFilter))
    names = http_filter_names(doc)
    assert names.index("envoy.filters.http.header_mutation") < names.index(
        "envoy.filters.http.ext_proc" if api is Api.EXT_PROC else "envoy.filters.http.ext_authz"
    )
    (mutation,) = [f for f in hcm(doc)["http_filters"] if f["name"] == "envoy.filters.http.header_mutation"]
    removed = [m["remove"] for m in mutation["typed_config"]["mutations"]["request_mutations"]]
    assert removed == ["x-body-hash", "x-model", "x-subject"]


@pytest.mark.parametrize("api", [*APIS, None])
def test_no_header_removal_when_nothing_is_owned(api: Api | None) -> None:
    doc = render(api=api, filters=(QuietFilter,))
    assert "envoy.filters.http.header_mutation" not in http_filter_names(doc)
    # Envoy alone calls no meshkit, so no header is meshkit's to protect.
    assert "envoy.filters.http.header_mutation" not in http_filter_names(render(api=None))


# -- rule: hash_policy, the response echo and RING_HASH only for a declared hash_header -----------------
@pytest.mark.parametrize("api", [*APIS, None])
def test_hash_header_gives_hash_policy_echo_and_ring_hash(api: Api | None) -> None:
    doc = render(api=api)
    entry = route_entry(doc)
    assert entry["route"]["hash_policy"] == [{"header": {"header_name": "x-body-hash"}}]
    assert entry["response_headers_to_add"] == [
        {
            "header": {"key": "x-body-hash", "value": "%REQ(x-body-hash)%"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    ]
    assert cluster(doc, "upstream")["lb_policy"] == "RING_HASH"


@pytest.mark.parametrize("api", [*APIS, None])
def test_no_hash_header_no_hash_policy_round_robin(api: Api | None) -> None:
    doc = render(api=api, filters=(AuthFilter, RouterFilter))
    entry = route_entry(doc)
    assert "hash_policy" not in entry["route"]
    assert "response_headers_to_add" not in entry
    assert cluster(doc, "upstream")["lb_policy"] == "ROUND_ROBIN"


def test_every_hash_header_is_hashed_and_echoed_in_chain_order() -> None:
    entry = route_entry(render(filters=(OtherHashFilter, "body-hash")))
    assert [p["header"]["header_name"] for p in entry["route"]["hash_policy"]] == [
        "x-fake-hash",
        "x-body-hash",
    ]
    assert [h["header"]["key"] for h in entry["response_headers_to_add"]] == ["x-fake-hash", "x-body-hash"]


def test_x_body_hash_comes_only_from_body_hash_declarations() -> None:
    # Not written anywhere in the rendering code ...
    for source in RENDER_SOURCES.glob("*.py"):
        assert "x-body-hash" not in source.read_text(), source
    # ... so a chain without body-hash never mentions it, comments included.
    for api in [*APIS, None]:
        text = FrontConfig(api=api, filters=(OtherHashFilter, AuthFilter), extproc_port=1).render()
        assert "x-body-hash" not in text
        assert "x-fake-hash" in text

    # body-hash with its declarations taken away: no trace of it either.
    class Undeclared(BodyHashFilter):
        sets_headers: ClassVar[frozenset[str]] = frozenset()
        hash_header: ClassVar[str | None] = None

    assert "x-body-hash" not in FrontConfig(api=Api.EXT_AUTHZ_HTTP, filters=(Undeclared,)).render()
    # With body-hash, it is exactly where its two declarations put it.
    doc = render(api=Api.EXT_AUTHZ_HTTP)
    where = [s for s in strings_in(doc) if "x-body-hash" in s]
    assert sorted(where) == sorted(
        [
            "x-body-hash",  # header_mutation: remove (sets_headers)
            "x-body-hash",  # allowed_upstream_headers (sets_headers)
            "x-body-hash",  # hash_policy header_name (hash_header)
            "x-body-hash",  # response echo key (hash_header)
            "%REQ(x-body-hash)%",  # response echo value (hash_header)
        ]
    )


# -- rule: failure_mode_allow false as soon as one filter does not fail open; override possible ---------
@pytest.mark.parametrize("api", APIS)
def test_failure_mode_allow_follows_the_chain(api: Api) -> None:
    assert meshkit_filter(render(api=api))["failure_mode_allow"] is True  # body-hash: fail_open
    assert meshkit_filter(render(api=api, filters=(RouterFilter, QuietFilter)))["failure_mode_allow"] is True
    closed = render(api=api, filters=("body-hash", AuthFilter))
    assert meshkit_filter(closed)["failure_mode_allow"] is False


@pytest.mark.parametrize("api", APIS)
def test_failure_mode_allow_override(api: Api) -> None:
    assert meshkit_filter(render(api=api, failure_mode_allow=False))["failure_mode_allow"] is False
    opened = render(api=api, filters=(AuthFilter,), failure_mode_allow=True)
    assert meshkit_filter(opened)["failure_mode_allow"] is True
    text = FrontConfig(api=api, filters=(AuthFilter,), failure_mode_allow=True).render()
    reason = comment_above(text, "failure_mode_allow: true")
    assert "Set explicitly" in reason and "fake-auth does not declare fail_open" in reason


def test_over_http_the_comments_say_a_5xx_answer_counts_as_failing() -> None:
    # Envoy's ext_authz HTTP client reads any 5xx of meshkit as "the service failed": with
    # failure_mode_allow true a fail-closed filter's 503 lets the request through (checked with Envoy
    # 1.40), and meshkit's 504 never reaches the client. The comments said it did.
    text = FrontConfig(api=Api.EXT_AUTHZ_HTTP, filters=(AuthFilter,), failure_mode_allow=True).render()
    reason = comment_above(text, "failure_mode_allow: true")
    assert "a 5xx answer from meshkit" in reason and "lets the request through" in reason
    assert "fake-auth" in reason
    timeout = comment_above(text, "timeout: 1s")
    assert "504 counts as a failed check" in timeout and "504 reaches the client" not in timeout
    for api in (Api.EXT_AUTHZ, Api.EXT_PROC):  # the gRPC paths pass meshkit's 5xx on to the client
        grpc = FrontConfig(api=api, filters=(AuthFilter,), failure_mode_allow=True).render()
        assert "5xx" not in comment_above(grpc, "failure_mode_allow: true")
    closed = FrontConfig(api=Api.EXT_AUTHZ_HTTP, filters=(AuthFilter,)).render()
    assert "lets the request through" not in comment_above(closed, "failure_mode_allow: false")


def test_a_filter_without_the_base_class_fails_closed() -> None:
    class Plain:  # no Filter base: nothing declared, so nothing assumed
        name = "plain"

        def on_request_headers(self, exchange: Exchange) -> None:
            return None

    assert FrontConfig(filters=(Plain,)).fails_open is False


# -- rule: ext_authz clear_route_cache when a filter re-routes ---------------------------------------
@pytest.mark.parametrize("api", AUTHZ_APIS)
def test_rerouting_filter_clears_the_route_cache_over_ext_authz(api: Api, tmp_path: Path) -> None:
    config = FrontConfig(api=api, filters=("body-hash", RouterFilter))
    validate(config.render(), tmp_path)
    assert meshkit_filter(config.document())["clear_route_cache"] is True
    assert "clear_route_cache" not in meshkit_filter(render(api=api))


def test_ext_proc_leaves_route_clearing_to_each_response() -> None:
    # ext_proc's default route_cache_action honours clear_route_cache in meshkit's responses.
    ext_proc = meshkit_filter(render(api=Api.EXT_PROC, filters=(RouterFilter,)))
    assert "clear_route_cache" not in ext_proc and "route_cache_action" not in ext_proc


# -- rule: a response-phase filter on ext_authz is a render-time error ------------------------------
@pytest.mark.parametrize("api", AUTHZ_APIS)
def test_response_phase_filter_on_ext_authz_is_an_error(api: Api) -> None:
    with pytest.raises(ConfigError) as excinfo:
        FrontConfig(api=api, filters=("body-hash", UsageFilter))
    (problem,) = excinfo.value.problems
    assert "fake-usage" in problem and "use ext_proc" in problem
    assert isinstance(api.value, str) and api.value in problem


def test_response_phase_filter_runs_on_ext_proc(tmp_path: Path) -> None:
    config = FrontConfig(api=Api.EXT_PROC, filters=("body-hash", UsageFilter))
    validate(config.render(), tmp_path)
    mode = meshkit_filter(config.document())["processing_mode"]
    assert mode["response_body_mode"] == "BUFFERED"
    assert mode["response_header_mode"] == "SKIP"  # no response-headers hook in the chain
    FrontConfig(api=None, filters=(UsageFilter,))  # Envoy alone runs no hook at all: no error


# -- rule: processing_mode from the chain's phases -------------------------------------------------
def test_processing_mode_follows_the_chain() -> None:
    chain = Chain([BodyHashFilter(BodyHashOptions())])
    assert needs_of(["body-hash"]).phases == chain.phases
    mode = processing_mode(needs_of(["body-hash"]).phase_values)
    assert mode["request_header_mode"] == "SEND"  # without SEND the body-phase header is dropped
    assert mode["request_body_mode"] == "BUFFERED"
    assert mode["response_header_mode"] == "SKIP"
    assert mode["response_body_mode"] == "NONE"
    assert processing_mode({"request_headers", "response_body"})["response_body_mode"] == "BUFFERED"
    assert meshkit_filter(render(api=Api.EXT_PROC))["processing_mode"] == mode
    headers_only = meshkit_filter(render(api=Api.EXT_PROC, filters=(QuietFilter,)))["processing_mode"]
    assert headers_only["request_body_mode"] == "NONE"


# -- rule: Envoy-side timeouts above meshkit's --filter-timeout, each its own value ---------------------
def _seconds(duration: str) -> float:
    return float(duration.removesuffix("s"))


def _timeouts(doc: dict[str, Any], api: Api) -> list[float]:
    block = meshkit_filter(doc)
    if api is Api.EXT_PROC:
        assert "timeout" not in block["grpc_service"]  # ignored by ext_proc: not rendered
        return [_seconds(block["message_timeout"])]
    if api is Api.EXT_AUTHZ:
        return [_seconds(block["grpc_service"]["timeout"])]
    return [_seconds(block["http_service"]["server_uri"]["timeout"])]


@pytest.mark.parametrize("api", [*APIS, None])
def test_the_route_has_no_timeout_unless_given(api: Api | None, tmp_path: Path) -> None:
    # An LLM answer, streamed or not, can take minutes: a fixed 30 s cut every longer one with a 504.
    text = FrontConfig(api=api).render()
    assert route_entry(yaml.safe_load(text))["route"]["timeout"] == "0s"
    assert "stream idle timeout" in comment_above(text, "timeout: 0s")
    given = FrontConfig(api=api, route_timeout=600)
    validate(given.render(), tmp_path)
    assert route_entry(given.document())["route"]["timeout"] == "600s"
    with pytest.raises(ConfigError, match="route_timeout"):
        FrontConfig(api=api, route_timeout=-1)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("filter_timeout", [DEFAULT_FILTER_TIMEOUT, 0.05, 2.0, 30.0])
def test_envoy_timeouts_sit_above_the_filter_timeout(api: Api, filter_timeout: float, tmp_path: Path) -> None:
    config = FrontConfig(api=api, filter_timeout=filter_timeout)
    (timeout,) = _timeouts(config.document(), api)
    assert timeout > filter_timeout
    assert filter_timeout < config.message_timeout_seconds
    assert filter_timeout < config.grpc_timeout_seconds
    assert filter_timeout < config.http_timeout_seconds
    if filter_timeout == 0.05:
        validate(config.render(), tmp_path)  # 0.55s: Envoy takes sub-second durations written this way


@pytest.mark.parametrize("api", APIS)
def test_envoy_timeouts_leave_time_for_the_largest_body_to_travel(api: Api, tmp_path: Path) -> None:
    # Envoy's timer runs while the body travels to meshkit: a fixed filter_timeout + 0.5 s let 150 MiB
    # checks through unhashed on both ext_authz paths at --max-body-bytes 160MiB (1 GiB: all three).
    assert _timeouts(render(api=api), api) == [DEFAULT_FILTER_TIMEOUT + 0.5]  # a few MiB: unchanged
    big = FrontConfig(api=api, max_body_bytes=1 << 30)
    validate(big.render(), tmp_path)
    (timeout,) = _timeouts(big.document(), api)
    assert timeout == DEFAULT_FILTER_TIMEOUT + (1 << 30) / TRANSFER_BYTES_PER_SECOND  # 32.5 s
    assert TRANSFER_BYTES_PER_SECOND <= 48 << 20  # measured: a 1 GiB check took 20 s over gRPC here
    assert _timeouts(render(api=api, max_body_bytes=160 << 20), api) == [DEFAULT_FILTER_TIMEOUT + 5]


def test_each_call_timeout_is_its_own_value() -> None:
    config = FrontConfig(api=Api.EXT_AUTHZ_HTTP, grpc_timeout=5.0, message_timeout=4.0)
    assert _timeouts(config.document(), Api.EXT_AUTHZ_HTTP) == [config.http_timeout_seconds]
    assert config.http_timeout_seconds not in (5.0, 4.0)
    explicit = FrontConfig(api=Api.EXT_AUTHZ_HTTP, http_timeout=3.0)
    assert _timeouts(explicit.document(), Api.EXT_AUTHZ_HTTP) == [3.0]
    assert _timeouts(render(api=Api.EXT_AUTHZ, grpc_timeout=2.5), Api.EXT_AUTHZ) == [2.5]
    assert _timeouts(render(api=Api.EXT_PROC, message_timeout=1.5), Api.EXT_PROC) == [1.5]


@pytest.mark.parametrize("name", ["message_timeout", "grpc_timeout", "http_timeout"])
def test_a_timeout_at_or_below_the_filter_timeout_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=f"{name}: 0.5 s must be above filter_timeout"):
        FrontConfig(filter_timeout=0.5).replace(**{name: 0.5})


# -- rule: defaults come from one place ------------------------------------------------------------
def test_defaults_are_meshkits() -> None:
    options = ExtprocOptions()
    config = FrontConfig()
    assert config.max_body_bytes == DEFAULT_MAX_BODY_BYTES == options.max_body_bytes
    assert config.filter_timeout == DEFAULT_FILTER_TIMEOUT == options.filter_timeout
    assert config.filters == options.filters
    assert f"{config.extproc_host}:{config.meshkit_port}" == options.listen
    assert FrontConfig(api=Api.EXT_AUTHZ_HTTP).meshkit_port == config.meshkit_port + 1
    doc = config.document()
    assert meshkit_filter(doc)["message_timeout"] == f"{DEFAULT_FILTER_TIMEOUT + 0.5:g}s"
    assert hcm(doc)["local_reply_config"]["mappers"][0]["body_format_override"]["json_format"] == (
        yaml.safe_load(too_large(options.max_body_bytes).body)
    )


def test_no_module_restates_the_body_limit() -> None:
    """meshkit's default body limit is read (meshkit_defaults), never written again as a literal."""
    for source in [*RENDER_SOURCES.glob("*.py"), RENDER_SOURCES.parent / "up.py"]:
        tree = ast.parse(source.read_text())
        literal = [
            n for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value == DEFAULT_MAX_BODY_BYTES
        ]
        shifted = [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.BinOp)
            and isinstance(n.op, ast.LShift)
            and isinstance(n.left, ast.Constant)
            and isinstance(n.left.value, int)
            and n.left.value << 20 == DEFAULT_MAX_BODY_BYTES
        ]
        assert not literal and not shifted, source
        assert "8 MiB" not in source.read_text() and "9000000" not in source.read_text(), source


# -- what the templates did and still must --------------------------------------------------------------
@pytest.mark.parametrize("api", APIS)
def test_local_reply_mappers_match_envoys_own_replies(api: Api) -> None:
    mappers = hcm(render(api=api, max_body_bytes=4096))["local_reply_config"]["mappers"]
    cel = [m["filter"]["extension_filter"]["typed_config"]["expression"] for m in mappers]
    assert cel == [ENVOY_TOO_LARGE, MESHKIT_FAILED]
    bodies = [m["body_format_override"] for m in mappers]
    assert bodies[0]["json_format"] == yaml.safe_load(too_large(4096).body)
    assert bodies[1]["json_format"] == yaml.safe_load(INTERNAL_ERROR.body)
    assert {b["content_type"] for b in bodies} == {"application/json"}


def test_ext_authz_http_service() -> None:
    doc = render(api=Api.EXT_AUTHZ_HTTP, filters=("body-hash", AuthFilter), max_body_bytes=2048)
    block = meshkit_filter(doc)
    assert block["allowed_headers"]["patterns"] == [
        {"exact": h} for h in ("authorization", "x-api-key", "x-request-id")
    ]
    response = block["http_service"]["authorization_response"]
    assert response["allowed_upstream_headers"]["patterns"] == [
        {"exact": "x-body-hash"},
        {"exact": "x-subject"},
    ]
    assert {"exact": "retry-after"} in response["allowed_client_headers"]["patterns"]
    assert {"exact": "content-type"} in response["allowed_client_headers"]["patterns"]
    assert block["with_request_body"] == {"max_request_bytes": 2048, "allow_partial_message": False}
    assert block["http_service"]["server_uri"]["uri"] == "http://127.0.0.1:50051"
    # A check whose connection closed unanswered is retried; an answer (a 5xx too) never is.
    retry = block["http_service"]["retry_policy"]
    assert set(retry["retry_on"].split(",")) == {"connect-failure", "reset"}
    assert retry["num_retries"] == 1
    meshkit = cluster(doc, "meshkit_extproc")
    options = meshkit["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert _seconds(options["common_http_protocol_options"]["idle_timeout"]) < KEEPALIVE_SECONDS
    assert options["explicit_http_config"] == {"http_protocol_options": {}}
    assert meshkit["per_connection_buffer_limit_bytes"] == envoy_buffer_limit(2048)


def test_ext_authz_http_without_owned_headers_copies_none(tmp_path: Path) -> None:
    config = FrontConfig(api=Api.EXT_AUTHZ_HTTP, filters=(QuietFilter,))
    validate(config.render(), tmp_path)  # an empty pattern list would not validate
    response = meshkit_filter(config.document())["http_service"]["authorization_response"]
    assert "allowed_upstream_headers" not in response


@pytest.mark.parametrize("api", [Api.EXT_PROC, Api.EXT_AUTHZ])
def test_grpc_apis_lift_envoys_default_circuit_breaker(api: Api) -> None:
    # 1,024 requests at once by default; ext_proc holds one for each client request's whole life.
    (thresholds,) = cluster(render(api=api), "meshkit_extproc")["circuit_breakers"]["thresholds"]
    assert thresholds["max_requests"] == thresholds["max_pending_requests"] == 2**32 - 1
    http = cluster(render(api=Api.EXT_AUTHZ_HTTP), "meshkit_extproc")
    assert "circuit_breakers" not in http  # one connection per check: meshkit's connection limit rules


@pytest.mark.parametrize("api", [Api.EXT_PROC, Api.EXT_AUTHZ])
def test_grpc_apis_use_an_http2_cluster(api: Api) -> None:
    doc = render(api=api)
    options = cluster(doc, "meshkit_extproc")["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert options["explicit_http_config"] == {"http2_protocol_options": {}}
    if api is Api.EXT_AUTHZ:
        assert meshkit_filter(doc)["with_request_body"] == {
            "max_request_bytes": DEFAULT_MAX_BODY_BYTES,
            "allow_partial_message": False,
            "pack_as_bytes": True,
        }


def test_printed_config_says_why_and_how_to_run_meshkit() -> None:
    text = FrontConfig(api=Api.EXT_AUTHZ_HTTP, filters=("body-hash", AuthFilter)).render()
    head = text.split("\nadmin:")[0]
    assert all(line.startswith("#") for line in head.splitlines())
    # The meshkit command line on a line of its own, unwrapped, to copy.
    assert (
        "#   meshkit extproc --filters body-hash,fake-auth --max-body-bytes 8388608 --filter-timeout 0.5 "
        "--http-listen 127.0.0.1:50052"
    ) in head.splitlines()
    # The comment above failure_mode_allow names the filter that makes it false.
    above = comment_above(text, "failure_mode_allow: false")
    assert "fake-auth" in above and "fail closed" in above


# -- problems are refused when the config is made, all at once --------------------------------------------
def test_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as excinfo:
        FrontConfig(
            upstream_ports=(),
            api=Api.EXT_AUTHZ,
            filters=("body-hash", "no-such-filter"),
            max_body_bytes=0,
            listen_port=70000,
        )
    text = str(excinfo.value)
    for part in ("upstream_ports", "no-such-filter", "max_body_bytes", "listen_port"):
        assert part in text


def test_a_body_limit_meshkit_would_refuse_is_refused() -> None:
    # Past 4 GiB Envoy's 32-bit buffer fields overflow and Envoy rejects the printed YAML, naming none.
    FrontConfig(max_body_bytes=1 << 30).render()
    with pytest.raises(ConfigError, match="max_body_bytes: 5368709120 must be at most 1073741824"):
        FrontConfig(max_body_bytes=5 << 30)


def test_a_port_envoy_connects_to_cannot_be_0() -> None:
    # Envoy accepts an endpoint on port 0 (`--mode validate` passes) and then never reaches it.
    with pytest.raises(ConfigError) as excinfo:
        FrontConfig(upstream_ports=(0,), extproc_port=0, api=Api.EXT_AUTHZ_HTTP)
    assert [p.split(":")[0] for p in excinfo.value.problems] == ["upstream_ports[0]", "extproc_port"]
    FrontConfig(upstream_ports=(8080,), extproc_port=0, api=None)  # Envoy alone calls no meshkit
    FrontConfig(listen_port=0, admin_port=0)  # listening on any free port is fine


def test_api_given_as_a_string() -> None:
    assert FrontConfig(api="ext_authz").api is Api.EXT_AUTHZ  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="plain"):
        FrontConfig(api="plain")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="at least one filter"):
        FrontConfig(api=Api.EXT_PROC, filters=())
    FrontConfig(api=None, filters=())  # Envoy alone needs no chain


def test_replace_checks_again() -> None:
    config = FrontConfig()
    assert config.replace(api=Api.EXT_AUTHZ).api is Api.EXT_AUTHZ
    with pytest.raises(ConfigError):
        config.replace(api=Api.EXT_AUTHZ, filters=(UsageFilter,))
    assert dataclasses.replace(config) == config


@pytest.mark.parametrize("api", [*APIS, None])
def test_client_purge_is_refused_first_with_405_json(api: Api | None, tmp_path: Path) -> None:
    # Behind Envoy every client reaches the Varnish pods from Envoy's address: their PURGE ACL cannot
    # tell a client from the broadcaster, so the ingress answers PURGE itself, before any other route.
    config = FrontConfig(
        upstream_ports=(8080,),
        extproc_port=50051,
        api=api,
        filters=("model-router", "body-hash"),
        model_routes=(("m", (8081,)),),
    )
    text = config.render()
    validate(text, tmp_path)
    first = hcm(yaml.safe_load(text))["route_config"]["virtual_hosts"][0]["routes"][0]
    assert first["match"] == {
        "prefix": "/",
        "headers": [{"name": ":method", "string_match": {"exact": "PURGE"}}],
    }
    assert first["direct_response"]["status"] == 405
    error = json.loads(first["direct_response"]["body"]["inline_string"])["error"]
    assert error["type"] == "method_not_allowed"
    assert first["response_headers_to_add"][0]["header"] == {
        "key": "content-type",
        "value": "application/json",
    }
    assert "PURGE ACL would let anyone purge" in comment_above(text, first_route_line(text))


def first_route_line(text: str) -> str:
    return next(line.strip() for line in text.splitlines() if line.strip().startswith("- match:"))
