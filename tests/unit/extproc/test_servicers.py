"""The ext_proc and ext_authz servicers over a real gRPC channel, in-process (no Envoy)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc
import pytest
import xxhash
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.auth.v3 import external_auth_pb2 as authz_pb
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.rpc import code_pb2

from meshkit.daemon import bind, bound_address
from meshkit.extproc.chain import Chain
from meshkit.extproc.ext_authz_grpc import Authorization
from meshkit.extproc.ext_proc import ExternalProcessor
from meshkit.extproc.filters.body_hash import BodyHashFilter, BodyHashOptions

LIMIT = 1000


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    chain = Chain([BodyHashFilter(BodyHashOptions())], max_body_bytes=LIMIT)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            ExternalProcessor(chain).handler(),
            Authorization(chain).handler(),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    await server.stop(None)


async def process(channel: grpc.aio.Channel, *messages: ep.ProcessingRequest) -> list[ep.ProcessingResponse]:
    call = channel.stream_stream(
        "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
        request_serializer=ep.ProcessingRequest.SerializeToString,
        response_deserializer=ep.ProcessingResponse.FromString,
    )
    return [r async for r in call(iter(messages))]


def headers(end_of_stream: bool, **values: str) -> ep.ProcessingRequest:
    hm = HeaderMap(
        headers=[HeaderValue(key=k.replace("_", "-"), raw_value=v.encode()) for k, v in values.items()]
    )
    return ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=hm, end_of_stream=end_of_stream))


def body(data: bytes, end_of_stream: bool = True) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=data, end_of_stream=end_of_stream))


async def test_headers_then_body_sets_hash_with_raw_value(channel: grpc.aio.Channel) -> None:
    first, second = await process(channel, headers(False, x_body_hash="spoof"), body(b"payload"))
    assert list(first.request_headers.response.header_mutation.remove_headers) == ["x-body-hash"]
    (option,) = second.request_body.response.header_mutation.set_headers
    assert option.header.key == "x-body-hash"
    assert option.header.raw_value == xxhash.xxh3_128_hexdigest(b"payload").encode()
    assert option.header.value == ""  # Envoy 1.40 forwards `value` as an empty header
    assert option.append_action == option.OVERWRITE_IF_EXISTS_OR_ADD


async def test_request_without_body_costs_one_message(channel: grpc.aio.Channel) -> None:
    (only,) = await process(channel, headers(True, x_body_hash="spoof"))
    assert only.WhichOneof("response") == "request_headers"
    assert list(only.request_headers.response.header_mutation.remove_headers) == ["x-body-hash"]


async def test_streamed_chunks_are_joined_before_hashing(channel: grpc.aio.Channel) -> None:
    first = headers(False)
    first.protocol_config.request_body_mode = ProcessingMode.STREAMED  # else one message is the body
    responses = await process(channel, first, body(b"ab", False), body(b"cd", False), body(b"ef"))
    assert [r.WhichOneof("response") for r in responses] == ["request_headers"] + ["request_body"] * 3
    (option,) = responses[-1].request_body.response.header_mutation.set_headers
    assert option.header.raw_value == xxhash.xxh3_128_hexdigest(b"abcdef").encode()


async def test_body_over_limit_gets_413_json(channel: grpc.aio.Channel) -> None:
    _, reply = await process(channel, headers(False), body(b"x" * (LIMIT + 1)))
    immediate = reply.immediate_response
    assert immediate.status.code == 413
    assert json.loads(immediate.body)["error"]["type"] == "request_too_large"
    assert [(h.header.key, h.header.raw_value) for h in immediate.headers.set_headers] == [
        ("content-type", b"application/json")
    ]


async def test_trailers_and_response_phases_get_matching_empty_answers(channel: grpc.aio.Channel) -> None:
    responses = await process(
        channel,
        headers(False),
        body(b"x"),
        ep.ProcessingRequest(request_trailers=ep.HttpTrailers()),
        ep.ProcessingRequest(response_headers=ep.HttpHeaders()),
        ep.ProcessingRequest(response_body=ep.HttpBody(body=b"answer", end_of_stream=True)),
    )
    assert [r.WhichOneof("response") for r in responses] == [
        "request_headers",
        "request_body",
        "request_trailers",
        "response_headers",
        "response_body",
    ]
    assert not responses[3].response_headers.response.HasField("header_mutation")


async def check(channel: grpc.aio.Channel, raw_body: bytes, **hdrs: str) -> authz_pb.CheckResponse:
    call = channel.unary_unary(
        "/envoy.service.auth.v3.Authorization/Check",
        request_serializer=authz_pb.CheckRequest.SerializeToString,
        response_deserializer=authz_pb.CheckResponse.FromString,
    )
    req = authz_pb.CheckRequest()
    http = req.attributes.request.http
    http.raw_body = raw_body
    http.id = "req-1"
    for k, v in hdrs.items():
        http.headers[k.replace("_", "-")] = v
    return await call(req)


async def test_check_sets_hash_with_value(channel: grpc.aio.Channel) -> None:
    resp = await check(channel, b"payload", x_body_hash="spoof")
    assert resp.status.code == code_pb2.OK
    (option,) = resp.ok_response.headers
    assert (option.header.key, option.header.value) == ("x-body-hash", xxhash.xxh3_128_hexdigest(b"payload"))
    assert list(resp.ok_response.headers_to_remove) == []


async def test_check_without_body_removes_header(channel: grpc.aio.Channel) -> None:
    resp = await check(channel, b"", x_body_hash="spoof")
    assert resp.status.code == code_pb2.OK
    assert list(resp.ok_response.headers_to_remove) == ["x-body-hash"]
    assert len(resp.ok_response.headers) == 0


async def test_check_over_limit_is_denied_413(channel: grpc.aio.Channel) -> None:
    resp = await check(channel, b"x" * (LIMIT + 1))
    assert resp.status.code != code_pb2.OK
    assert resp.denied_response.status.code == 413
    assert json.loads(resp.denied_response.body)["error"]["type"] == "request_too_large"


# -- ext_authz over HTTP ------------------------------------------------------------------------------
@pytest.fixture
async def http_authz() -> AsyncIterator[str]:
    from meshkit.extproc.ext_authz_http import HttpAuthorization, HttpAuthzServer

    chain = Chain([BodyHashFilter(BodyHashOptions())], max_body_bytes=LIMIT)
    server = HttpAuthzServer(HttpAuthorization(chain))
    sock = bind("127.0.0.1:0")
    await server.start(sock)
    address = bound_address("127.0.0.1:0", sock)
    yield f"http://{address}"
    await server.stop(1)


async def test_http_check_sets_hash(http_authz: str) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{http_authz}/v1/x", data=b"payload", headers={"x-body-hash": "spoof"}
        ) as resp:
            assert resp.status == 200
            assert resp.headers["x-body-hash"] == xxhash.xxh3_128_hexdigest(b"payload")
            assert "x-envoy-auth-headers-to-remove" not in resp.headers
        async with session.get(f"{http_authz}/v1/models", headers={"x-body-hash": "spoof"}) as resp:
            assert resp.status == 200
            assert "x-body-hash" not in resp.headers
            assert resp.headers["x-envoy-auth-headers-to-remove"] == "x-body-hash"


@pytest.mark.parametrize("chunked", [False, True])
async def test_http_check_over_limit_is_413_json(http_authz: str, chunked: bool) -> None:
    import aiohttp

    body = b"x" * (LIMIT + 1)

    async def chunks() -> AsyncIterator[bytes]:
        yield body[:500]
        yield body[500:]

    async with (
        aiohttp.ClientSession() as session,
        session.post(http_authz, data=chunks() if chunked else body) as resp,
    ):
        assert resp.status == 413
        assert resp.headers["content-type"] == "application/json"
        assert (await resp.json())["error"]["type"] == "request_too_large"


async def test_http_check_body_cut_short_logs_no_traceback(
    http_authz: str, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    import logging

    import aiohttp

    host, port = http_authz.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"a" * 10)
    await writer.drain()
    with caplog.at_level(logging.INFO):
        writer.write_eof()  # the peer is gone mid-body: nobody to answer, nothing to crash
        answer = await asyncio.wait_for(reader.read(), timeout=5)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400")
        writer.close()
        async with aiohttp.ClientSession() as session, session.post(http_authz, data=b"next") as resp:
            assert resp.status == 200  # and the server carries on
    assert "ended before its body did" in caplog.text
    assert "Traceback" not in caplog.text


async def test_http_check_shows_headers_like_the_grpc_paths() -> None:
    import aiohttp

    from meshkit.extproc.ext_authz_http import HttpAuthorization, HttpAuthzServer
    from meshkit.extproc.filter import Exchange

    seen: list[dict[str, str]] = []

    class Peek:
        name = "peek"

        def on_request_headers(self, exchange: Exchange) -> None:
            seen.append(dict(exchange.headers))

    server = HttpAuthzServer(HttpAuthorization(Chain([Peek()], max_body_bytes=LIMIT)))
    sock = bind("127.0.0.1:0")
    await server.start(sock)
    address = bound_address("127.0.0.1:0", sock)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"http://{address}/v1/x?y=1", data=b"b", headers={"X-Model": "m1"}) as resp,
        ):
            assert resp.status == 200
    finally:
        await server.stop(1)
    (headers,) = seen
    assert headers["x-model"] == "m1"
    assert (headers[":method"], headers[":path"], headers[":authority"]) == ("POST", "/v1/x?y=1", address)
    assert all(name == name.lower() for name in headers)
