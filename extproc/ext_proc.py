"""The ExternalProcessor stream loop: one gRPC stream = one HTTP request = one `Exchange`.

Each message gets exactly one response of the matching type. The loop only dispatches: the chain
decides, `_proto` builds. Rules:

- The first message is `request_headers` (the rendered config always sends them). Anything else first,
  headers twice, an empty or unparsable message is a protocol fault: INVALID_ARGUMENT, counted in
  `meshkit_extproc_errors_total{kind="protocol"}`, logged at most once per 10 s per kind.
- A request without a body costs one message (headers with end_of_stream) and one response.
- The body: Envoy 1.40 says on the first message how it sends it (`protocol_config.request_body_mode`).
  BUFFERED (what meshkit renders, and what we assume when an older Envoy does not say) means ONE
  `request_body` message holds the whole body, even with end_of_stream=false: that is how an HTTP/2
  request with trailers arrives (nothing follows it with `request_trailer_mode: SKIP`). STREAMED means
  chunks, joined until end_of_stream or a `request_trailers` message; each chunk is answered "continue"
  and only the whole body runs the hooks. A body message after the whole body is a protocol fault.
- A body over `max_body_bytes` gets a 413 JSON `ImmediateResponse` (Envoy's buffer limit and gRPC's
  message limit are set above it in the rendered configs, so we are the ones who answer). The size is a
  running total, so a body in many small chunks costs O(1) per chunk.
- After an `ImmediateResponse` the stream keeps nothing (no chunk, no body) and runs no hook: should a
  message still arrive, it gets the same `ImmediateResponse` again.
- A hook that replaced the body (`Exchange.replace_body`, a model alias) gets it sent back in the
  request-body answer's `body_mutation`, with `content-length` set to its length. Only a BUFFERED body
  can be replaced: with STREAMED chunks the earlier ones have gone upstream, so such a request is
  refused with the same 500 JSON as over ext_authz (`body_rewrite_needs_ext_proc`).
- EOF and cancellation end the stream quietly. No exception escapes to grpcio from here except through
  `abort`.

The handler is a coroutine on grpc.aio's reader/writer API (`context.read()` / `context.write()`), with
raw bytes both ways (no serializer calls), registered with the server's core (`grpc_server.Service`):
an async-generator handler makes grpc.aio run two async generators per stream (its request iterator
and ours), each with asyncio's per-generator bookkeeping, and a generic handler is looked up in Python
for every stream. See bench/PROFILE.md for the measurements.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from meshkit.extproc import _proto
from meshkit.extproc.apis import Api
from meshkit.extproc.chain import Chain
from meshkit.extproc.ext_authz import BODY_REWRITE_REFUSED
from meshkit.extproc.filter import PHASES, Exchange, Phase, Reply
from meshkit.extproc.grpc_server import Service
from meshkit.logs import Throttle

log = logging.getLogger("meshkit.extproc.ext_proc")

API = Api.EXT_PROC
SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
_EOF = grpc.aio.EOF


class _Deferred(enum.Enum):
    """A step whose answer is not the phase's own message: the body hooks run on a `request_trailers`
    message (STREAMED chunks that trailers complete), which must be answered with a TrailersResponse."""

    BODY_AT_TRAILERS = "request_trailers"


_Step = Phase | _Deferred | bytes | str  # run a phase | run the body at trailers | ready answer | fault


class ExternalProcessor:
    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self.responses = _proto.ExtProcResponses()
        self._metrics = chain.metrics
        self._histograms = {phase: chain.metrics.phase(API, phase.value) for phase in PHASES}
        self._continue_body = self.responses.phase(Phase.REQUEST_BODY, _NO_MUTATION)
        self._faults = Throttle(log)
        # A chain whose filters may add headers to the answer (answer_headers: x-ratelimit-*) is rendered
        # with response headers SEND; a request that got none tells Envoy to skip them (one message less).
        adds = any(getattr(f, "answer_headers", ()) for f in chain.filters)
        hooks_response = any(p.is_response for p in chain.phases)
        self._skip_response = (
            _proto.skip_response_headers(request_body=Phase.REQUEST_BODY in chain.phases)
            if adds and not hooks_response
            else b""
        )
        # Makes each stream's state; a seam for tests that look at what a stream keeps.
        self.stream_factory: Callable[[], _Stream] = _Stream

    def handler(self) -> Service:
        # No (de)serializers: raw bytes in (parsed in _step: bad bytes -> INVALID_ARGUMENT) and out.
        return Service(SERVICE, {"Process": grpc.stream_stream_rpc_method_handler(self.process)})

    async def process(self, requests: object, context: grpc.aio.ServicerContext) -> None:
        """One stream, read and written through `context` (`requests` is grpc.aio's request iterator,
        left unused: iterating it would start an async generator per stream)."""
        stream = self.stream_factory()
        self._metrics.in_flight += 1
        read, write = context.read, context.write
        try:
            while (data := await read()) is not _EOF:
                step = self._step(stream, data)
                if isinstance(step, Phase):
                    await write(await self._round(stream, step))
                elif isinstance(step, bytes):
                    await write(step)
                elif step is _Deferred.BODY_AT_TRAILERS:
                    await write(await self._round(stream, Phase.REQUEST_BODY, step.value))
                else:
                    self._fault_logged(step)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, step)
        finally:
            self._done(stream)

    async def _round(self, stream: _Stream, phase: Phase, answer_as: str | None = None) -> bytes:
        """Run one phase's hooks (a new deadline: Envoy's message_timeout is per message) and answer;
        `answer_as`: the message kind to answer instead of the phase's own (trailers)."""
        started = time.perf_counter()
        ex = stream.exchange
        self.chain.new_round(ex)
        reply = await self.chain.run(phase, ex)
        if reply is None and ex.body_replaced and (stream.streamed or answer_as is not None):
            # STREAMED: the earlier chunks have gone upstream already; only a BUFFERED body can be replaced
            ex.take_body()
            reply = self.chain.reject(ex, BODY_REWRITE_REFUSED, "body-rewrite")
        if reply is not None:
            data = self._replied(stream, reply)
        elif answer_as is not None:
            ex.take_mutations()  # a TrailersResponse cannot carry header changes: the headers have gone
            data = self.responses.trailers(answer_as)
        elif phase is Phase.REQUEST_BODY and ex.body_replaced:
            body = ex.take_body()
            assert body is not None
            data = self.responses.body_replaced(ex.take_mutations(), body)
        else:
            data = self.responses.phase(phase, ex.take_mutations())
            if self._skip_response and phase is Phase.REQUEST_HEADERS and not ex.answer_headers:
                data += self._skip_response
        self._histograms[phase].observe(time.perf_counter() - started)
        return data

    # -- one message -----------------------------------------------------------------------------------
    def _step(self, stream: _Stream, data: bytes) -> _Step:
        """Take one message: the phase the chain must run, a ready answer, or a protocol fault (str)."""
        try:
            message = _proto.ProcessingRequest.FromString(data)
        except _proto.DecodeError:
            return "malformed ProcessingRequest"
        kind = message.WhichOneof("request")
        if kind == "request_headers":
            return self._request_headers(stream, message)
        if kind is None:
            return "a ProcessingRequest without a request phase"
        if not stream.started:
            # Envoy's own reply to a request it refused before any filter ran (a `#` in the path: 400)
            # still passes the response phases: it goes on to the client unchanged.
            unchanged = _proto.response_unchanged(kind)
            return unchanged if unchanged is not None else f"{kind} before request_headers"
        if stream.replied is not None:
            return stream.replied
        if kind == "request_body":
            return self._body(stream, message.request_body)
        if kind == "response_headers":
            msg = message.response_headers
            stream.exchange.set_response_header_source(lambda: _proto.headers_of(msg))
            stream.exchange.end_of_stream = msg.end_of_stream
            return Phase.RESPONSE_HEADERS
        if kind == "response_body":
            stream.exchange.response_body = message.response_body.body
            return Phase.RESPONSE_BODY
        if kind == "request_trailers" and stream.body_parts:
            return self._body_at_trailers(stream)
        return self.responses.trailers(kind)

    @staticmethod
    def _request_headers(stream: _Stream, message: Any) -> Phase | str:
        if stream.started:
            return "request_headers arrived twice on one stream"
        msg = message.request_headers
        ex = stream.exchange
        ex.set_header_source(lambda: _proto.headers_of(msg))
        ex.end_of_stream = msg.end_of_stream
        # Absent (an older Envoy): NONE, read as BUFFERED, which is what meshkit renders.
        stream.streamed = message.protocol_config.request_body_mode == _proto.STREAMED
        stream.started = True
        return Phase.REQUEST_HEADERS

    def _body(self, stream: _Stream, msg: Any) -> Phase | bytes | str:
        if stream.body_done:
            return "request_body after the whole body"
        if stream.streamed and not msg.end_of_stream:
            return self._chunk(stream, msg.body)
        return self._whole_body(stream, msg.body)

    def _chunk(self, stream: _Stream, chunk: bytes) -> bytes:
        """STREAMED: keep the chunk (or answer 413 and keep nothing) and let Envoy send the next."""
        size = stream.body_size + len(chunk)
        reply = self.chain.check_size(stream.exchange, size)
        if reply is not None:
            return self._replied(stream, reply)
        stream.body_parts.append(chunk)
        stream.body_size = size
        return self._continue_body

    def _whole_body(self, stream: _Stream, last: bytes) -> Phase | bytes:
        """The body is complete with `last` (BUFFERED's one message, or STREAMED's final chunk)."""
        stream.body_done = True
        ex = stream.exchange
        reply = self.chain.check_size(ex, stream.body_size + len(last))
        if reply is not None:
            return self._replied(stream, reply)
        if stream.body_parts:
            stream.body_parts.append(last)
            last = b"".join(stream.body_parts)
            stream.drop_body()
        ex.body = last
        ex.end_of_stream = True
        return Phase.REQUEST_BODY

    def _body_at_trailers(self, stream: _Stream) -> _Deferred | bytes:
        """STREAMED chunks with `request_trailer_mode: SEND`: the trailers end the body."""
        step = self._whole_body(stream, b"")
        return step if isinstance(step, bytes) else _Deferred.BODY_AT_TRAILERS

    def _replied(self, stream: _Stream, reply: Reply) -> bytes:
        """The stream's answer from now on: the reply; whatever body it held is dropped."""
        stream.drop_body()
        stream.replied = self.responses.immediate(reply)
        return stream.replied

    def _done(self, stream: _Stream) -> None:
        self._metrics.in_flight -= 1
        if stream.started:
            self.chain.finish(stream.exchange, API)

    def _fault_logged(self, message: str) -> None:
        """Count every fault; log one line per kind per 10 s (a fuzzer or a broken client must not flood
        the log: 10,527 lines were seen in one fuzzing run)."""
        self._metrics.error("protocol")
        self._faults.warning(f"ext_proc:{message}", "ext_proc protocol fault: %s", message)


_NO_MUTATION: _proto.Mutation = ({}, set(), False)


class _Stream:
    """Per-stream state: the exchange, how Envoy sends the body, and STREAMED body chunks so far."""

    __slots__ = ("body_done", "body_parts", "body_size", "exchange", "replied", "started", "streamed")

    def __init__(self) -> None:
        self.exchange = Exchange()
        self.started = False  # request_headers arrived
        self.streamed = False  # protocol_config says STREAMED: chunks until end_of_stream or trailers
        self.body_parts: list[bytes] = []
        self.body_size = 0  # running total of body_parts (the size check is O(1) per chunk)
        self.body_done = False  # the whole body arrived (or was refused)
        self.replied: bytes | None = None  # the ImmediateResponse, once the stream has one

    @property
    def buffered_bytes(self) -> int:
        """Body bytes this stream holds, waiting for the rest of the body."""
        return self.body_size

    def drop_body(self) -> None:
        self.body_parts = []
        self.body_size = 0
