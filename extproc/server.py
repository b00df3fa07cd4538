"""The ExternalProcessor stream loop: one gRPC stream = one HTTP request = one `Exchange`.

Each message gets exactly one response of the matching type. The loop only dispatches: the chain
decides, `_proto` builds. Rules:

- A request without a body costs one message (headers with end_of_stream) and one response.
- A body over `max_body_bytes` gets a 413 JSON `ImmediateResponse` (Envoy's buffer limit and gRPC's
  message limit are set above it in the rendered configs, so we are the ones who answer).
- After an `ImmediateResponse` the stream is finished; anything Envoy still sends is answered empty.
- Protocol faults (an empty message, headers twice) end the stream with INVALID_ARGUMENT. EOF and
  cancellation end it quietly. No exception escapes to grpcio from here except through `abort`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc

from meshkit.extproc import _proto
from meshkit.extproc.chain import Chain
from meshkit.extproc.filter import PHASES, Exchange, Phase, Reply

log = logging.getLogger("meshkit.extproc.server")

API = "ext_proc"
SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
_TRAILERS = frozenset({"request_trailers", "response_trailers"})


def too_large(limit: int) -> Reply:
    return Reply.error(413, "request_too_large", f"request body exceeds the limit of {limit} bytes")


class ExternalProcessor:
    def __init__(self, chain: Chain, *, max_body_bytes: int) -> None:
        self.chain = chain
        self.max_body_bytes = max_body_bytes
        self.responses = _proto.ExtProcResponses()
        self._too_large = too_large(max_body_bytes)
        self._metrics = chain.metrics
        self._sync = not chain.is_async
        self._histograms = {phase: chain.metrics.phase(API, phase.value) for phase in PHASES}

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Process": grpc.stream_stream_rpc_method_handler(
                    self.process,
                    request_deserializer=_proto.identity,  # parsed in the loop: bad bytes -> INVALID_ARGUMENT
                    response_serializer=_proto.identity,
                )
            },
        )

    async def _phase(self, phase: Phase, exchange: Exchange) -> bytes:
        started = time.perf_counter()
        chain = self.chain
        if phase in chain.phases:
            reply = chain.run(phase, exchange) if self._sync else await chain.run_async(phase, exchange)
        else:
            reply = exchange.reply
        if reply is not None:
            data = self.responses.immediate(reply)
        else:
            data = self.responses.phase(phase, exchange.take_mutations())
        self._histograms[phase].observe(time.perf_counter() - started)
        return data

    async def process(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        exchange: Exchange | None = None
        body_parts: list[bytes] = []
        metrics = self._metrics
        metrics.in_flight += 1
        try:
            async for data in requests:
                try:
                    message = _proto.ProcessingRequest.FromString(data)
                except _proto.DecodeError:
                    await self._fault(context, "malformed ProcessingRequest")
                kind = message.WhichOneof("request")
                if kind == "request_headers":
                    if exchange is not None:
                        await self._fault(context, "request_headers arrived twice on one stream")
                    msg = message.request_headers
                    exchange = Exchange(lambda msg=msg: _proto.headers_of(msg))  # type: ignore[misc]
                    exchange.end_of_stream = msg.end_of_stream
                    yield await self._phase(Phase.REQUEST_HEADERS, exchange)
                elif kind == "request_body":
                    exchange = exchange or Exchange()
                    yield await self._body(exchange, message.request_body, body_parts)
                elif kind == "response_headers":
                    exchange = exchange or Exchange()
                    exchange.end_of_stream = message.response_headers.end_of_stream
                    yield await self._phase(Phase.RESPONSE_HEADERS, exchange)
                elif kind == "response_body":
                    exchange = exchange or Exchange()
                    exchange.body = message.response_body.body
                    yield await self._phase(Phase.RESPONSE_BODY, exchange)
                elif kind in _TRAILERS:
                    yield self.responses.trailers(kind)
                else:
                    await self._fault(context, "a ProcessingRequest without a request phase")
        finally:
            metrics.in_flight -= 1
            if exchange is not None:
                self.chain.finish(exchange, API)

    async def _body(self, exchange: Exchange, msg: object, parts: list[bytes]) -> bytes:
        body: bytes = msg.body  # type: ignore[attr-defined]
        if not msg.end_of_stream:  # type: ignore[attr-defined]
            # STREAMED/partial delivery: keep the pieces, answer "continue", hash at the end.
            parts.append(body)
            if sum(map(len, parts)) > self.max_body_bytes:
                exchange.reply = exchange.reply or self.chain.reject(
                    exchange, self._too_large, "max-body-bytes"
                )
                return self.responses.immediate(exchange.reply)
            return self.responses.phase(Phase.REQUEST_BODY, ({}, set(), False))
        if parts:
            parts.append(body)
            body = b"".join(parts)
            parts.clear()
        if len(body) > self.max_body_bytes and exchange.reply is None:
            self.chain.reject(exchange, self._too_large, "max-body-bytes")
        exchange.body = body
        exchange.end_of_stream = True
        return await self._phase(Phase.REQUEST_BODY, exchange)

    async def _fault(self, context: grpc.aio.ServicerContext, message: str) -> NoReturn:
        self._metrics.error("protocol")
        log.warning("ext_proc protocol fault: %s", message)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        raise AssertionError("unreachable: abort raises")
