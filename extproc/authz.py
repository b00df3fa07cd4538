"""`envoy.service.auth.v3.Authorization/Check` on the same chain: one unary call per HTTP request.

Envoy's ext_authz filter sends the headers and (with `with_request_body`, `pack_as_bytes`) the whole
body in one `CheckRequest`. The chain's request phases run back to back on one `Exchange`; their header
changes become the OK response's `headers` / `headers_to_remove`, a `Reply` becomes a denial with the
reply's status, headers and JSON body. Response phases do not exist in ext_authz: a chain that needs
them must run over ext_proc.
"""

from __future__ import annotations

import time

import grpc

from meshkit.extproc import _proto
from meshkit.extproc.chain import Chain
from meshkit.extproc.filter import Exchange, Phase, Reply
from meshkit.extproc.server import too_large

API = "ext_authz"
SERVICE = "envoy.service.auth.v3.Authorization"


class Authorization:
    def __init__(self, chain: Chain, *, max_body_bytes: int) -> None:
        self.chain = chain
        self.max_body_bytes = max_body_bytes
        self._too_large = too_large(max_body_bytes)
        self._metrics = chain.metrics
        self._sync = not chain.is_async
        self._histogram = chain.metrics.phase(API, "check")
        self._has_headers_phase = Phase.REQUEST_HEADERS in chain.phases
        self._has_body_phase = Phase.REQUEST_BODY in chain.phases

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Check": grpc.unary_unary_rpc_method_handler(
                    self.check,
                    request_deserializer=_proto.identity,  # parsed below: bad bytes -> INVALID_ARGUMENT
                    response_serializer=_proto.identity,
                )
            },
        )

    async def check(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started = time.perf_counter()
        begun = self._begin(data)
        if begun is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed CheckRequest")
            raise AssertionError("unreachable: abort raises")
        exchange, body = begun
        reply = self._decide(exchange, body) if self._sync else await self._decide_async(exchange, body)
        return self._end(exchange, reply, started)

    def _begin(self, data: bytes) -> tuple[Exchange, bytes] | None:
        try:
            request = _proto.CheckRequest.FromString(data)
        except _proto.DecodeError:
            self._metrics.error("protocol")
            return None
        self._metrics.in_flight += 1
        http = request.attributes.request.http
        exchange = Exchange(http.headers)
        exchange.request_id = http.id
        body: bytes = http.raw_body or http.body.encode()
        exchange.end_of_stream = not body
        return exchange, body

    def _end(self, exchange: Exchange, reply: Reply | None, started: float) -> bytes:
        if reply is None:
            sets, removes, _ = exchange.take_mutations()
            data = _proto.check_ok(sets, removes)
        else:
            data = _proto.check_denied(reply)
        self.chain.finish(exchange, API)
        self._metrics.in_flight -= 1
        self._histogram.observe(time.perf_counter() - started)
        return data

    def _decide(self, exchange: Exchange, body: bytes) -> Reply | None:
        chain = self.chain
        if self._has_headers_phase and (reply := chain.run(Phase.REQUEST_HEADERS, exchange)):
            return reply
        if not body:
            return None
        if len(body) > self.max_body_bytes:
            return chain.reject(exchange, self._too_large, "max-body-bytes")
        exchange.body = body
        return chain.run(Phase.REQUEST_BODY, exchange) if self._has_body_phase else None

    async def _decide_async(self, exchange: Exchange, body: bytes) -> Reply | None:
        chain = self.chain
        if self._has_headers_phase and (reply := await chain.run_async(Phase.REQUEST_HEADERS, exchange)):
            return reply
        if not body:
            return None
        if len(body) > self.max_body_bytes:
            return chain.reject(exchange, self._too_large, "max-body-bytes")
        exchange.body = body
        return await chain.run_async(Phase.REQUEST_BODY, exchange) if self._has_body_phase else None
