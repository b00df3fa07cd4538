"""The ext_proc stream loop on its own: what one stream keeps, costs, answers and logs.

Most tests drive `ExternalProcessor.process` directly (no socket, no gRPC threads), so memory and CPU
can be measured for the loop alone; the ones about wire answers go through a real in-process gRPC
channel like test_servicers.py.
"""

from __future__ import annotations

import logging
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any, ClassVar

import grpc
import pytest
import xxhash
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from meshkit.extproc import ext_proc
from meshkit.extproc.chain import Chain
from meshkit.extproc.ext_authz_grpc import Authorization
from meshkit.extproc.ext_proc import ExternalProcessor
from meshkit.extproc.filter import Exchange, Filter
from meshkit.extproc.filters.body_hash import BodyHashFilter, BodyHashOptions

MiB = 1 << 20
STREAMED = ProcessingMode.STREAMED
BUFFERED = ProcessingMode.BUFFERED


# -- messages -------------------------------------------------------------------------------------
def headers(end_of_stream: bool = False, mode: int | None = None, **values: str) -> ep.ProcessingRequest:
    """A request_headers message; `mode`: the request_body_mode Envoy 1.40 announces in protocol_config."""
    hm = HeaderMap(
        headers=[HeaderValue(key=k.replace("_", "-"), raw_value=v.encode()) for k, v in values.items()]
    )
    msg = ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=hm, end_of_stream=end_of_stream))
    if mode is not None:
        msg.protocol_config.request_body_mode = mode
    return msg


def body(data: bytes, end_of_stream: bool = True) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=data, end_of_stream=end_of_stream))


def trailers() -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_trailers=ep.HttpTrailers())


def wire(*messages: ep.ProcessingRequest) -> list[bytes]:
    return [m.SerializeToString() for m in messages]


def body_hash_of(response: ep.ProcessingResponse) -> bytes | None:
    sets = response.request_body.response.header_mutation.set_headers
    return next((o.header.raw_value for o in sets if o.header.key == "x-body-hash"), None)


# -- driving the loop directly -----------------------------------------------------------------------
class Aborted(Exception):
    """What grpc.aio's `context.abort` does: raise out of the handler."""


class FakeContext:
    """grpc.aio's reader/writer API over `messages`; answers are kept, or only counted by kind."""

    code: grpc.StatusCode | None = None

    def __init__(self, messages: Iterable[bytes], *, keep: bool = True) -> None:
        self._messages = iter(messages)
        self._keep = keep
        self.written: list[ep.ProcessingResponse] = []
        self.counts: dict[str, int] = {}

    async def read(self) -> object:
        return next(self._messages, grpc.aio.EOF)

    async def write(self, data: bytes) -> None:
        response = ep.ProcessingResponse.FromString(data)
        kind = response.WhichOneof("response") or ""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self._keep:
            self.written.append(response)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        raise Aborted(details)


class Recorder:
    """The stream factory seam: keeps every stream the servicer made."""

    def __init__(self) -> None:
        self.streams: list[Any] = []

    def __call__(self) -> Any:
        stream = ext_proc._Stream()
        self.streams.append(stream)
        return stream


def servicer(max_body_bytes: int = 1000, filters: Iterable[Any] | None = None) -> ExternalProcessor:
    chain = Chain(list(filters or [BodyHashFilter(BodyHashOptions())]), max_body_bytes=max_body_bytes)
    return ExternalProcessor(chain)


async def drive(proc: ExternalProcessor, messages: Iterable[bytes]) -> list[ep.ProcessingResponse]:
    context = FakeContext(messages)
    await proc.process(None, context)
    return context.written


async def drive_counting(proc: ExternalProcessor, messages: Iterable[bytes]) -> dict[str, int]:
    """Like `drive`, but only counts the answers by kind (keeps no response alive)."""
    context = FakeContext(messages, keep=False)
    await proc.process(None, context)
    return context.counts


# -- defect 2: after its own 413, a stream keeps nothing --------------------------------------------
async def test_after_its_413_the_stream_keeps_no_body_chunks() -> None:
    limit, chunks = 4 * MiB, 200
    proc = servicer(max_body_bytes=limit)
    recorder = Recorder()
    proc.stream_factory = recorder
    chunk = body(b"x" * MiB, end_of_stream=False).SerializeToString()

    def messages() -> Iterator[bytes]:
        yield headers(mode=STREAMED).SerializeToString()
        for _ in range(chunks):
            yield chunk

    tracemalloc.start()
    try:
        counts = await drive_counting(proc, messages())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert counts == {"request_headers": 1, "request_body": 4, "immediate_response": chunks - 4}
    (stream,) = recorder.streams
    assert stream.buffered_bytes == 0
    # At most the limit's worth of chunks plus the one being parsed, never the 200 MiB sent.
    assert peak < limit + 4 * MiB, f"the stream held {peak / MiB:.0f} MiB"


# -- defect 3: many small chunks cost linear CPU --------------------------------------------------
class CountingList(list[bytes]):
    """A list that counts the elements handed out by iterating it (what re-summing costs)."""

    iterated = 0

    def __iter__(self) -> Iterator[bytes]:
        for item in super().__iter__():
            CountingList.iterated += 1
            yield item


async def test_many_small_chunks_are_counted_in_constant_time_each() -> None:
    chunks = 20_000
    proc = servicer(max_body_bytes=1 << 30)

    def counting_stream() -> Any:
        stream = ext_proc._Stream()
        stream.body_parts = CountingList()
        return stream

    proc.stream_factory = counting_stream
    CountingList.iterated = 0
    messages = wire(headers(mode=STREAMED), *[body(b"a", end_of_stream=False)] * chunks, body(b"b"))
    started = time.process_time()
    responses = await drive(proc, messages)
    cpu = time.process_time() - started
    assert body_hash_of(responses[-1]) == xxhash.xxh3_128_hexdigest(b"a" * chunks + b"b").encode()
    # Re-summing every earlier chunk on each new one walks ~chunks²/2 = 200 million elements.
    assert CountingList.iterated <= chunks + 1
    assert cpu < 5.0, f"{chunks} chunks took {cpu:.2f} s of CPU"  # generous: about 0.3 s here


# -- defect 4: nothing may come before request_headers ---------------------------------------------
@pytest.mark.parametrize(
    "first",
    [
        body(b"early"),
        body(b"early", end_of_stream=False),
        trailers(),
    ],
    ids=["request_body", "request_body-chunk", "request_trailers"],
)
async def test_a_message_before_request_headers_is_invalid_argument(first: ep.ProcessingRequest) -> None:
    seen: list[dict[str, str]] = []

    class Peek(Filter):
        name: ClassVar[str] = "peek"
        Options: ClassVar[type[Any]] = dict

        def on_request_body(self, exchange: Exchange) -> None:
            seen.append(dict(exchange.headers))

        def on_response_headers(self, exchange: Exchange) -> None:
            seen.append(dict(exchange.headers))

    proc = servicer(filters=[Peek({})])
    context = FakeContext(wire(first, headers(x_a="1")))
    with pytest.raises(Aborted, match="before request_headers"):
        await proc.process(None, context)
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    assert seen == []  # no hook ran on a request without headers
    assert proc.chain.metrics.errors == {"protocol": 1}
    assert proc.chain.metrics.requests == {}  # not counted as a request either


@pytest.mark.parametrize(
    "first",
    [
        ep.ProcessingRequest(response_headers=ep.HttpHeaders(end_of_stream=False)),
        ep.ProcessingRequest(response_body=ep.HttpBody(body=b"x", end_of_stream=True)),
    ],
    ids=["response_headers", "response_body"],
)
async def test_envoys_own_reply_passes_the_response_phases_unchanged(first: ep.ProcessingRequest) -> None:
    """Envoy refuses some requests before any filter runs (a `#` in the path: its own 400) and still
    sends that reply through ext_proc's response phases, without request headers: it goes on to the
    client unchanged (not a protocol fault, which Envoy would turn into a 500), and no hook runs."""
    seen: list[str] = []

    class Peek(Filter):
        name: ClassVar[str] = "peek"
        Options: ClassVar[type[Any]] = dict

        def on_response_headers(self, exchange: Exchange) -> None:
            seen.append("response_headers")

        def on_response_body(self, exchange: Exchange) -> None:
            seen.append("response_body")

    proc = servicer(filters=[Peek({})])
    context = FakeContext(wire(first))
    await proc.process(None, context)
    kind = first.WhichOneof("request")
    (answer,) = context.written
    assert answer.WhichOneof("response") == kind
    assert answer == ep.ProcessingResponse(**{kind: getattr(answer, kind)})
    assert not getattr(answer, kind).HasField("response")  # no change at all
    assert seen == []
    assert proc.chain.metrics.errors == {}


# -- defect 1 (the stream side; tests/integration/test_ext_proc_envoy.py drives real Envoy) -----
@pytest.mark.parametrize("mode", [BUFFERED, None], ids=["buffered", "no-protocol-config"])
async def test_buffered_body_without_end_of_stream_is_the_whole_body(mode: int | None) -> None:
    """HTTP/2 with trailers, BUFFERED, trailers SKIP: Envoy's one body message has end_of_stream=false."""
    responses = await drive(servicer(), wire(headers(mode=mode), body(b"whole", end_of_stream=False)))
    assert [r.WhichOneof("response") for r in responses] == ["request_headers", "request_body"]
    assert body_hash_of(responses[1]) == xxhash.xxh3_128_hexdigest(b"whole").encode()


async def test_buffered_body_then_trailers_gets_the_hash_and_an_empty_trailers_answer() -> None:
    """Trailers SEND: the body message (end_of_stream=false) is whole; the trailers get their answer."""
    responses = await drive(
        servicer(), wire(headers(mode=BUFFERED), body(b"whole", end_of_stream=False), trailers())
    )
    assert [r.WhichOneof("response") for r in responses] == [
        "request_headers",
        "request_body",
        "request_trailers",
    ]
    assert body_hash_of(responses[1]) == xxhash.xxh3_128_hexdigest(b"whole").encode()


async def test_streamed_chunks_are_joined_until_end_of_stream() -> None:
    messages = wire(headers(mode=STREAMED), body(b"ab", False), body(b"cd", False), body(b"ef"))
    responses = await drive(servicer(), messages)
    assert [r.WhichOneof("response") for r in responses] == ["request_headers"] + ["request_body"] * 3
    assert [body_hash_of(r) for r in responses[1:3]] == [None, None]
    assert body_hash_of(responses[3]) == xxhash.xxh3_128_hexdigest(b"abcdef").encode()


async def test_streamed_chunks_completed_by_trailers_run_the_body_hooks() -> None:
    bodies: list[bytes | None] = []

    class Peek(Filter):
        name: ClassVar[str] = "peek"
        Options: ClassVar[type[Any]] = dict

        def on_request_body(self, exchange: Exchange) -> None:
            bodies.append(exchange.body)

    messages = wire(headers(mode=STREAMED), body(b"ab", False), body(b"cd", False), trailers())
    responses = await drive(servicer(filters=[Peek({})]), messages)
    assert [r.WhichOneof("response") for r in responses] == [
        "request_headers",
        "request_body",
        "request_body",
        "request_trailers",
    ]
    assert bodies == [b"abcd"]


async def test_streamed_chunks_over_the_limit_completed_by_trailers_get_413() -> None:
    messages = wire(headers(mode=STREAMED), body(b"a" * 600, False), trailers())
    responses = await drive(servicer(max_body_bytes=1000), messages)
    assert responses[-1].WhichOneof("response") == "request_trailers"
    messages = wire(headers(mode=STREAMED), body(b"a" * 600, False), body(b"a" * 600, False), trailers())
    responses = await drive(servicer(max_body_bytes=1000), messages)
    assert [r.WhichOneof("response") for r in responses] == [
        "request_headers",
        "request_body",
        "immediate_response",
        "immediate_response",
    ]
    assert responses[2].immediate_response.status.code == 413


async def test_a_second_body_after_a_buffered_one_is_invalid_argument() -> None:
    proc = servicer()
    with pytest.raises(Aborted, match="after the whole body"):
        await drive(proc, wire(headers(mode=BUFFERED), body(b"one", False), body(b"two", False)))
    assert proc.chain.metrics.errors == {"protocol": 1}


# -- defect 5: protocol faults are counted, and logged at most once per 10 s per kind --------------
@pytest.fixture
async def channel() -> AsyncIterator[tuple[grpc.aio.Channel, Chain]]:
    chain = Chain([BodyHashFilter(BodyHashOptions())], max_body_bytes=1000)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((ExternalProcessor(chain).handler(), Authorization(chain).handler()))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch, chain
    await server.stop(None)


def warnings_of(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]


async def test_a_hundred_garbage_streams_log_one_line_and_count_a_hundred(
    channel: tuple[grpc.aio.Channel, Chain], caplog: pytest.LogCaptureFixture
) -> None:
    ch, chain = channel
    raw = ch.stream_stream("/envoy.service.ext_proc.v3.ExternalProcessor/Process")
    caplog.set_level(logging.WARNING)
    for _ in range(100):
        call = raw(iter([b"\xff\xff\xff\xff garbage"]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert chain.metrics.errors == {"protocol": 100}
    assert warnings_of(caplog, "meshkit.extproc.ext_proc") == [
        "ext_proc protocol fault: malformed ProcessingRequest"
    ]


async def test_a_hundred_garbage_checks_log_one_line_and_count_a_hundred(
    channel: tuple[grpc.aio.Channel, Chain], caplog: pytest.LogCaptureFixture
) -> None:
    ch, chain = channel
    check = ch.unary_unary("/envoy.service.auth.v3.Authorization/Check")
    caplog.set_level(logging.WARNING)
    for _ in range(100):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await check(b"\xff\xff not a CheckRequest")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert chain.metrics.errors == {"protocol": 100}
    assert warnings_of(caplog, "meshkit.extproc.ext_authz_grpc") == [
        "ext_authz protocol fault: malformed CheckRequest"
    ]


# -- 6: response phases change the response's headers -------------------------------------------
class ResponseHeaderFilter(Filter):
    name: ClassVar[str] = "response-header"
    Options: ClassVar[type[Any]] = dict

    def on_response_headers(self, exchange: Exchange) -> None:
        exchange.set_response_header("x-served-by", "meshkit é")
        exchange.remove_response_header("server")


class WrongSideFilter(Filter):
    name: ClassVar[str] = "wrong-side"
    Options: ClassVar[type[Any]] = dict

    def on_response_headers(self, exchange: Exchange) -> None:
        exchange.set_header("x-too-late", "1")  # a request header, once the request has gone upstream


def response_headers(**values: str) -> ep.ProcessingRequest:
    hm = HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()])
    return ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=hm, end_of_stream=True))


async def grpc_process(ch: grpc.aio.Channel, *messages: ep.ProcessingRequest) -> list[ep.ProcessingResponse]:
    call = ch.stream_stream(
        "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
        request_serializer=ep.ProcessingRequest.SerializeToString,
        response_deserializer=ep.ProcessingResponse.FromString,
    )
    return [r async for r in call(iter(messages))]


@pytest.fixture
async def servicer_channel(request: pytest.FixtureRequest) -> AsyncIterator[grpc.aio.Channel]:
    chain = Chain([request.param({})])
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((ExternalProcessor(chain).handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    await server.stop(None)


@pytest.mark.parametrize("servicer_channel", [ResponseHeaderFilter], indirect=True)
async def test_response_header_changes_become_the_response_headers_mutation(
    servicer_channel: grpc.aio.Channel,
) -> None:
    responses = await grpc_process(servicer_channel, headers(True), response_headers(server="upstream"))
    assert [r.WhichOneof("response") for r in responses] == ["request_headers", "response_headers"]
    assert not responses[0].request_headers.response.HasField("header_mutation")
    mutation = responses[1].response_headers.response.header_mutation
    assert [(o.header.key, o.header.raw_value, o.header.value) for o in mutation.set_headers] == [
        ("x-served-by", "meshkit é".encode(), "")  # raw_value: what Envoy 1.40 reads
    ]
    assert list(mutation.remove_headers) == ["server"]


@pytest.mark.parametrize("servicer_channel", [WrongSideFilter], indirect=True)
async def test_set_header_in_a_response_phase_is_a_500(
    servicer_channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    responses = await grpc_process(servicer_channel, headers(True), response_headers())
    reply = responses[1].immediate_response
    assert reply.status.code == 500
    assert b"internal" in reply.body.lower()
    assert "use set_response_header" in caplog.text  # the RuntimeError, logged with its traceback


# -- served by GrpcServer: the ext_proc method is registered with grpc's core ------------------------
async def test_grpc_server_registers_the_ext_proc_service_and_serves_it() -> None:
    from meshkit.extproc.grpc_server import GrpcServer, Service

    handler = ExternalProcessor(Chain([BodyHashFilter(BodyHashOptions())])).handler()
    assert isinstance(handler, Service)
    assert set(handler.methods) == {"Process"}
    server = GrpcServer([handler], [ext_proc.SERVICE], message_limit=1 << 20)
    address = server.listen("127.0.0.1:0")
    await server.start([ext_proc.SERVICE])
    try:
        async with grpc.aio.insecure_channel(address) as ch:
            first, second = await grpc_process(ch, headers(), body(b"registered"))
    finally:
        await server.stop(0)
    assert first.WhichOneof("response") == "request_headers"
    assert body_hash_of(second) == xxhash.xxh3_128_hexdigest(b"registered").encode()
