"""The ExternalProcessor stream loop: one gRPC stream = one HTTP request = one `Exchange`.

Each message gets exactly one response of the matching type. The loop only dispatches: the chain
decides, `_proto` builds. Rules:

- A request without a body costs one message (headers with end_of_stream) and one response.
- A body over `max_body_bytes` gets a 413 JSON `ImmediateResponse` (Envoy's buffer limit and gRPC's
  message limit are set above it in the rendered configs, so we are the ones who answer).
- After an `ImmediateResponse` Envoy ends the stream; should a message still arrive, it gets the same
  `ImmediateResponse` again (the chain never runs after a reply).
- Protocol faults (an empty message, headers twice) end the stream with INVALID_ARGUMENT. EOF and
  cancellation end it quietly. No exception escapes to grpcio from here except through `abort`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from meshkit.extproc import _proto
from meshkit.extproc.apis import Api
from meshkit.extproc.chain import Chain
from meshkit.extproc.filter import PHASES, Exchange, Phase, Reply

log = logging.getLogger("meshkit.extproc.ext_proc")

API = Api.EXT_PROC
SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
_TRAILERS = frozenset({"request_trailers", "response_trailers"})


class ExternalProcessor:
    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self.responses = _proto.ExtProcResponses()
        self._metrics = chain.metrics
        self._histograms = {phase: chain.metrics.phase(API, phase.value) for phase in PHASES}

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Process": grpc.stream_stream_rpc_method_handler(
                    self.process,
                    request_deserializer=_proto.identity,  # parsed in _step: bad bytes -> INVALID_ARGUMENT
                    response_serializer=_proto.identity,
                )
            },
        )

    async def process(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        stream = _Stream()
        self._metrics.in_flight += 1
        try:
            async for data in requests:
                step = self._step(stream, data)
                if isinstance(step, Phase):
                    started = time.perf_counter()
                    ex = stream.exchange
                    self.chain.new_round(ex)  # Envoy's message_timeout is per message
                    yield self._answer(step, ex, await self.chain.run(step, ex), started)
                elif isinstance(step, bytes):
                    yield step
                else:
                    self._fault_logged(step)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, step)
        finally:
            self._done(stream)

    # -- one message -----------------------------------------------------------------------------------
    def _step(self, stream: _Stream, data: bytes) -> Phase | bytes | str:
        """Take one message: the phase the chain must run, a ready answer, or a protocol fault (str)."""
        try:
            message = _proto.ProcessingRequest.FromString(data)
        except _proto.DecodeError:
            return "malformed ProcessingRequest"
        kind = message.WhichOneof("request")
        ex = stream.exchange
        if kind == "request_headers":
            if stream.started:
                return "request_headers arrived twice on one stream"
            msg = message.request_headers
            ex.set_header_source(lambda: _proto.headers_of(msg))
            ex.end_of_stream = msg.end_of_stream
            stream.started = True
            return Phase.REQUEST_HEADERS
        stream.started = True
        if kind == "request_body":
            return self._body(stream, message.request_body)
        if kind == "response_headers":
            msg = message.response_headers
            ex.set_response_header_source(lambda: _proto.headers_of(msg))
            ex.end_of_stream = msg.end_of_stream
            return Phase.RESPONSE_HEADERS
        if kind == "response_body":
            ex.response_body = message.response_body.body
            return Phase.RESPONSE_BODY
        if kind in _TRAILERS:
            return self.responses.trailers(kind)
        return "a ProcessingRequest without a request phase"

    def _body(self, stream: _Stream, msg: Any) -> Phase | bytes:
        ex, parts, body = stream.exchange, stream.body_parts, msg.body
        if not msg.end_of_stream:
            # STREAMED/partial delivery: keep the pieces, answer "continue", run the hooks at the end.
            parts.append(body)
            if ex.reply is None:
                self.chain.check_size(ex, sum(map(len, parts)))
            if ex.reply is not None:
                return self.responses.immediate(ex.reply)
            return self.responses.phase(Phase.REQUEST_BODY, _NO_MUTATION)
        if parts:
            parts.append(body)
            body = b"".join(parts)
            parts.clear()
        self.chain.check_size(ex, len(body))
        ex.body = body
        ex.end_of_stream = True
        return Phase.REQUEST_BODY

    def _answer(self, phase: Phase, ex: Exchange, reply: Reply | None, started: float) -> bytes:
        if reply is not None:
            data = self.responses.immediate(reply)
        else:
            data = self.responses.phase(phase, ex.take_mutations())
        self._histograms[phase].observe(time.perf_counter() - started)
        return data

    def _done(self, stream: _Stream) -> None:
        self._metrics.in_flight -= 1
        if stream.started:
            self.chain.finish(stream.exchange, API)

    def _fault_logged(self, message: str) -> None:
        self._metrics.error("protocol")
        log.warning("ext_proc protocol fault: %s", message)


_NO_MUTATION: _proto.Mutation = ({}, set(), False)


class _Stream:
    """Per-stream state: the exchange, and body pieces when Envoy streams the body in chunks."""

    __slots__ = ("body_parts", "exchange", "started")

    def __init__(self) -> None:
        self.exchange = Exchange()
        self.body_parts: list[bytes] = []
        self.started = False
