"""model-router: what it decides for each body, aliases and the allow-list, parse-once with body-hash,
and how each server carries (or refuses) a rewritten body."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import xxhash
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.auth.v3 import external_auth_pb2 as authz_pb
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from meshkit.errors import ConfigError
from meshkit.extproc import json_body
from meshkit.extproc.chain import Chain
from meshkit.extproc.daemon import ExtprocOptions
from meshkit.extproc.ext_authz_grpc import Authorization
from meshkit.extproc.ext_proc import ExternalProcessor
from meshkit.extproc.filter import Exchange, Phase, Reply
from meshkit.extproc.filters import FILTERS
from meshkit.extproc.filters.body_hash import BodyHashFilter, BodyHashOptions
from meshkit.extproc.filters.model_router import ModelRouterFilter, ModelRouterOptions, rewritten
from meshkit.extproc.routes_file import ModelRules, RoutesOptions

ALIASES = {"fast": "gpt-4o-mini"}
ALLOW = frozenset({"gpt-4o-mini", "gpt-4o", "claude-3-5-sonnet-20241022"})


def router(aliases: dict[str, str] | None = None, allow: frozenset[str] | None = None) -> ModelRouterFilter:
    return ModelRouterFilter(ModelRouterOptions(), ModelRules(aliases=aliases or {}, allow=allow))


async def run(
    chain_filters: list[Any], body: bytes | None, headers: dict[str, str] | None = None
) -> tuple[Exchange, Reply | None]:
    chain = Chain(chain_filters, max_body_bytes=64 << 20)
    ex = Exchange(headers or {})
    reply = await chain.run(Phase.REQUEST_HEADERS, ex)
    if reply is None and body is not None:
        ex.take_mutations()
        ex.body = body
        reply = await chain.run(Phase.REQUEST_BODY, ex)
    return ex, reply


def error_of(reply: Reply | None) -> dict[str, Any]:
    assert reply is not None
    assert ("content-type", "application/json") in reply.headers
    error: dict[str, Any] = json.loads(reply.body)["error"]
    return error


# -- routing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "model", "stream"),
    [
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}', "gpt-4o", "false"),
        (b'{"model": "gpt-4o", "stream": true, "messages": []}', "gpt-4o", "true"),
        (b'{"stream": false, "input": "x", "model": "text-embedding-3"}', "text-embedding-3", "false"),
        (  # Anthropic Messages
            b'{"model": "claude-3-5-sonnet-20241022", "max_tokens": 10, "stream": true, "messages": []}',
            "claude-3-5-sonnet-20241022",
            "true",
        ),
        (b' \n{"model": "org/llama-3:8b_v1.0"}', "org/llama-3:8b_v1.0", "false"),
        # a nested `model` and strings mentioning "model" never count: only the top-level key
        (
            b'{"messages": [{"model": "evil", "content": "\\"model\\": \\"evil\\""}], "model": "gpt-4o"}',
            "gpt-4o",
            "false",
        ),
    ],
)
async def test_routes_on_top_level_model(body: bytes, model: str, stream: str) -> None:
    ex, reply = await run([router()], body, {"x-model": "spoofed", "x-stream": "maybe"})
    assert reply is None
    sets, _, clear = ex.take_mutations()
    assert sets == {"x-model": model, "x-stream": stream}
    assert clear is True
    assert not ex.body_replaced


@pytest.mark.parametrize(
    "body",
    [
        b"plain text",
        b"",
        b"[1, 2, 3]",
        b'[{"model": "gpt-4o"}]',
        b'{"input": "no model here", "messages": [{"model": "nested-only"}]}',
        b'"model"',
        b"{not json",  # without an allow-list: passes like any body that is not JSON
        b'{"model": "gpt-4o", "temperature": NaN}',
        b'{"model": "gpt-4o", "x": "\xff"}',  # not UTF-8
    ],
)
async def test_other_bodies_pass_untouched_and_lose_client_headers(body: bytes) -> None:
    ex, reply = await run([router(aliases=ALIASES)], body, {"x-model": "spoofed", "x-stream": "true"})
    assert reply is None
    sets, _, clear = ex.take_mutations()
    assert sets == {}
    assert clear is False
    assert not ex.body_replaced
    assert ex.body == body


async def test_headers_phase_removes_client_headers() -> None:
    ex, reply = await run([router()], None, {"x-model": "spoofed", "x-stream": "true"})
    assert reply is None
    # the route is picked again: Envoy may have cached one chosen by the client's x-model
    assert ex.take_mutations() == ({}, {"x-model", "x-stream"}, True)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"model": 4}', "invalid_model"),
        (b'{"model": null}', "invalid_model"),
        (b'{"model": ["gpt-4o"]}', "invalid_model"),
        (b'{"model": ""}', "invalid_model"),
        (b'{"model": "gpt 4o"}', "invalid_model"),
        (b'{"model": "gpt-4o\\r\\nx-evil: 1"}', "invalid_model"),
        (('{"model": "' + "a" * 129 + '"}').encode(), "invalid_model"),
        ('{"model": "gpt-4ö"}'.encode(), "invalid_model"),
        (b'{"model": "gpt-4o", "stream": "true"}', "invalid_stream"),
        (b'{"model": "gpt-4o", "stream": 1}', "invalid_stream"),
        (b'{"model": "gpt-4o", "stream": null}', "invalid_stream"),
        (b'{"model": "gpt-4o", "model": "gpt-4o-mini"}', "duplicate_key"),
        (b'{"model": "a", "messages": [], "model": "b"}', "duplicate_key"),
    ],
)
async def test_bad_model_or_stream_is_400_json(body: bytes, code: str) -> None:
    ex, reply = await run([router()], body, {"x-model": "spoofed"})
    error = error_of(reply)
    assert reply is not None and reply.status == 400
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code
    assert ex.take_mutations() == ({}, set(), False)  # a reply drops every pending change


async def test_model_name_at_the_limit_is_valid() -> None:
    name = "m" * 128
    ex, reply = await run([router()], json.dumps({"model": name}).encode())
    assert reply is None
    assert ex.take_mutations()[0]["x-model"] == name


# -- aliases and the allow-list ----------------------------------------------------------------------
async def test_alias_rewrites_header_and_body() -> None:
    body = '{"model": "fast", "messages": [{"role": "user", "content": "héllo"}], "stream": true}'.encode()
    ex, reply = await run([router(ALIASES, ALLOW)], body)
    assert reply is None
    sets, _, clear = ex.take_mutations()
    assert sets == {"x-model": "gpt-4o-mini", "x-stream": "true"}
    assert clear
    new = ex.take_body()
    assert new is not None
    assert json.loads(new) == {**json.loads(body), "model": "gpt-4o-mini"}
    assert list(json.loads(new)) == ["model", "messages", "stream"]  # key order kept
    assert "héllo".encode() in new  # UTF-8, not \\u escapes
    assert ex.body is new


def test_rewritten_keeps_lone_surrogates_as_escapes() -> None:
    doc = json_body.parse(b'{"model": "m", "x": "\\ud800"}')
    assert json.loads(rewritten(doc)) == doc
    assert b"\\ud800" in rewritten(doc)


async def test_target_name_needs_no_rewrite() -> None:
    ex, reply = await run([router(ALIASES, ALLOW)], b'{"model": "gpt-4o-mini"}')
    assert reply is None
    assert not ex.body_replaced


@pytest.mark.parametrize("model", ["gpt-5", "fast2", "GPT-4O"])
async def test_model_outside_allow_list_is_404_model_not_found(model: str) -> None:
    _, reply = await run([router(ALIASES, ALLOW)], json.dumps({"model": model}).encode())
    assert reply is not None and reply.status == 404
    error = error_of(reply)
    assert error["code"] == "model_not_found"
    assert error["type"] == "invalid_request_error"
    assert model in error["message"]


@pytest.mark.parametrize(
    "body", [b"{not json", b'{"model": "gpt-4o", "x": Infinity}', b'{"model": "gpt-4o", "t": 1e400}']
)
async def test_with_allow_list_an_object_that_is_not_strict_json_is_400(body: bytes) -> None:
    # a lenient upstream parser could read a model from it that was never checked
    _, reply = await run([router(allow=ALLOW)], body)
    assert reply is not None and reply.status == 400
    assert error_of(reply)["code"] == "invalid_json"


async def test_with_allow_list_non_object_bodies_still_pass() -> None:
    for body in (b"plain", b"[1]", b'{"input": "x"}'):
        _, reply = await run([router(allow=ALLOW)], body)
        assert reply is None, body


# -- one parse per request, shared with body-hash ---------------------------------------------------
@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    counted: list[int] = []
    real = json_body.parse

    def counting(body: bytes) -> Any:
        counted.append(len(body))
        return real(body)

    monkeypatch.setattr(json_body, "parse", counting)
    return counted


@pytest.mark.parametrize("order", ["router-first", "hash-first"])
async def test_body_is_parsed_once_with_body_hash(parses: list[int], order: str) -> None:
    hasher = BodyHashFilter(BodyHashOptions(canonical_json=True))
    filters = [router(), hasher] if order == "router-first" else [hasher, router()]
    body = b'{"model": "gpt-4o", "input": "x"}'
    ex, reply = await run(filters, body)
    assert reply is None
    assert parses == [len(body)]
    sets, _, _ = ex.take_mutations()
    assert sets["x-model"] == "gpt-4o"
    assert sets["x-body-hash"] == xxhash.xxh3_128_hexdigest(b'{"input":"x","model":"gpt-4o"}')


async def test_body_hash_after_an_alias_hashes_the_rewritten_body(parses: list[int]) -> None:
    hasher = BodyHashFilter(BodyHashOptions(canonical_json=True))
    ex, _ = await run([router(ALIASES), hasher], b'{"model": "fast", "input": "x"}')
    assert len(parses) == 1  # the rewritten body's document is handed on, not parsed again
    sets, _, _ = ex.take_mutations()
    assert sets["x-body-hash"] == xxhash.xxh3_128_hexdigest(b'{"input":"x","model":"gpt-4o-mini"}')
    # the same as a client naming the target itself: one cache key for both spellings
    ex2, _ = await run([router(ALIASES), hasher], b'{"model": "gpt-4o-mini", "input": "x"}')
    assert ex2.take_mutations()[0]["x-body-hash"] == sets["x-body-hash"]


def test_document_is_cached_per_body_object(parses: list[int]) -> None:
    ex = Exchange({})
    ex.body = b'{"a": 1}'
    assert json_body.document(ex) == {"a": 1}
    assert json_body.document(ex) == {"a": 1}
    assert len(parses) == 1
    ex.body = b'{"a": 2}'  # a different body is parsed afresh
    assert json_body.document(ex) == {"a": 2}
    assert len(parses) == 2


# -- large bodies ------------------------------------------------------------------------------------
def big_chat(model: str, size: int = 3 << 20) -> bytes:
    msg = {"role": "user", "content": 'say "model": "evil" ' * 50, "model": "nested"}
    count = size // len(json.dumps(msg))
    return json.dumps({"messages": [msg] * count, "stream": True, "model": model}).encode()


async def test_large_body_with_model_last_is_routed_in_a_thread(parses: list[int]) -> None:
    body = big_chat("gpt-4o")
    assert len(body) >= json_body.THREAD_BYTES
    hasher = BodyHashFilter(BodyHashOptions(canonical_json=True, canonical_json_max_bytes=64 << 20))
    ex, reply = await run([router(allow=ALLOW), hasher], body)
    assert reply is None
    assert parses == [len(body)]
    sets, _, clear = ex.take_mutations()
    assert (sets["x-model"], sets["x-stream"], clear) == ("gpt-4o", "true", True)


async def test_large_body_alias_is_rewritten() -> None:
    body = big_chat("fast")
    ex, reply = await run([router(ALIASES)], body)
    assert reply is None
    new = ex.take_body()
    assert new is not None
    doc = json.loads(new)
    assert doc["model"] == "gpt-4o-mini"
    assert doc["messages"][0]["model"] == "nested"


# -- options -----------------------------------------------------------------------------------------
def routes_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    return str(path)


def test_registered_and_declarations() -> None:
    assert FILTERS["model-router"] is ModelRouterFilter
    assert ModelRouterFilter.sets_headers == {"x-model", "x-stream"}
    assert ModelRouterFilter.reroutes is True
    assert ModelRouterFilter.fail_open is False
    assert RoutesOptions in ModelRouterFilter.extra_sections


def test_from_options_reads_routes_file(tmp_path: Path) -> None:
    path = routes_file(tmp_path, "models:\n  aliases: {fast: gpt-4o-mini}\n  allow: [gpt-4o-mini]\n")
    f = ModelRouterFilter.from_options({RoutesOptions: RoutesOptions(routes_file=path)})
    assert f.rules.aliases == {"fast": "gpt-4o-mini"}
    assert f.rules.allow == frozenset({"gpt-4o-mini"})
    assert ModelRouterFilter.from_options({}).rules == ModelRules()


def test_aliases_with_http_listen_are_a_config_error(tmp_path: Path) -> None:
    path = routes_file(tmp_path, "models:\n  aliases: {fast: gpt-4o-mini}\n")
    options = {
        RoutesOptions: RoutesOptions(routes_file=path),
        ExtprocOptions: ExtprocOptions(http_listen="127.0.0.1:50052"),
    }
    with pytest.raises(ConfigError, match=r"aliases.*ext_authz HTTP service.*drop --http-listen"):
        ModelRouterFilter.from_options(options)
    # an allow-list alone is fine on every path; so are aliases without --http-listen
    ModelRouterFilter.from_options(
        {
            **options,
            RoutesOptions: RoutesOptions(routes_file=routes_file(tmp_path, "models:\n  allow: [gpt-4o]\n")),
        }
    )
    ModelRouterFilter.from_options({**options, ExtprocOptions: ExtprocOptions()})


# -- the servers: ext_proc carries the new body, ext_authz refuses it --------------------------------
@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    chain = Chain([router(ALIASES)], max_body_bytes=1 << 20)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((ExternalProcessor(chain).handler(), Authorization(chain).handler()))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    await server.stop(None)


def headers_message(streamed: bool = False, **values: str) -> ep.ProcessingRequest:
    hm = HeaderMap(
        headers=[HeaderValue(key=k.replace("_", "-"), raw_value=v.encode()) for k, v in values.items()]
    )
    msg = ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=hm, end_of_stream=False))
    if streamed:
        msg.protocol_config.request_body_mode = ProcessingMode.STREAMED
    return msg


async def process(channel: grpc.aio.Channel, *messages: ep.ProcessingRequest) -> list[ep.ProcessingResponse]:
    call = channel.stream_stream(
        "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
        request_serializer=ep.ProcessingRequest.SerializeToString,
        response_deserializer=ep.ProcessingResponse.FromString,
    )
    return [r async for r in call(iter(messages))]


def body_message(data: bytes, end_of_stream: bool = True) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=data, end_of_stream=end_of_stream))


async def test_ext_proc_sends_body_mutation_with_content_length(channel: grpc.aio.Channel) -> None:
    body = b'{"model": "fast", "input": "x"}'
    _, answer = await process(channel, headers_message(content_length=str(len(body))), body_message(body))
    common = answer.request_body.response
    new = common.body_mutation.body
    assert json.loads(new) == {"model": "gpt-4o-mini", "input": "x"}
    sets = {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}
    assert sets == {"x-model": "gpt-4o-mini", "x-stream": "false", "content-length": str(len(new))}
    assert common.clear_route_cache


async def test_ext_proc_without_alias_sends_no_body_mutation(channel: grpc.aio.Channel) -> None:
    _, answer = await process(channel, headers_message(), body_message(b'{"model": "gpt-4o"}'))
    common = answer.request_body.response
    assert not common.HasField("body_mutation")
    assert "content-length" not in {h.header.key for h in common.header_mutation.set_headers}


async def test_ext_proc_streamed_body_cannot_be_rewritten(channel: grpc.aio.Channel) -> None:
    answers = await process(
        channel,
        headers_message(streamed=True),
        body_message(b'{"model": ', end_of_stream=False),
        body_message(b'"fast"}'),
    )
    immediate = answers[-1].immediate_response
    assert immediate.status.code == 500
    assert json.loads(immediate.body)["error"]["code"] == "body_rewrite_needs_ext_proc"


async def check(channel: grpc.aio.Channel, raw_body: bytes) -> authz_pb.CheckResponse:
    call = channel.unary_unary(
        "/envoy.service.auth.v3.Authorization/Check",
        request_serializer=authz_pb.CheckRequest.SerializeToString,
        response_deserializer=authz_pb.CheckResponse.FromString,
    )
    req = authz_pb.CheckRequest()
    req.attributes.request.http.raw_body = raw_body
    return await call(req)


async def test_ext_authz_refuses_an_aliased_request(channel: grpc.aio.Channel) -> None:
    resp = await check(channel, b'{"model": "fast"}')
    assert resp.HasField("denied_response")
    assert resp.denied_response.status.code == 500
    error = json.loads(resp.denied_response.body)["error"]
    assert error["code"] == "body_rewrite_needs_ext_proc"
    assert "ext_proc" in error["message"]


async def test_ext_authz_routes_a_target_name(channel: grpc.aio.Channel) -> None:
    resp = await check(channel, b'{"model": "gpt-4o-mini", "stream": true}')
    assert resp.HasField("ok_response")
    sets = {o.header.key: o.header.value for o in resp.ok_response.headers}
    assert sets == {"x-model": "gpt-4o-mini", "x-stream": "true"}
