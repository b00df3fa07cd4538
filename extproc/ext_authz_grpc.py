"""`envoy.service.auth.v3.Authorization/Check` on the same chain: one unary call per HTTP request.

Envoy's ext_authz filter sends the headers and (with `with_request_body`, `pack_as_bytes`) the whole
body in one `CheckRequest`. Header changes become the OK response's `headers` / `headers_to_remove`; a
`Reply` becomes a denial with the reply's status, headers and JSON body.
"""

from __future__ import annotations

import logging
import time

import grpc

from meshkit.extproc import _proto
from meshkit.extproc.chain import Chain
from meshkit.extproc.ext_authz import OneShot
from meshkit.extproc.filter import Exchange
from meshkit.extproc.grpc_server import Service
from meshkit.logs import Throttle

log = logging.getLogger("meshkit.extproc.ext_authz_grpc")

SERVICE = "envoy.service.auth.v3.Authorization"


class Authorization(OneShot):
    """The gRPC ext_authz service (what Envoy's `grpc_service` and Istio's envoyExtAuthzGrpc call)."""

    def __init__(self, chain: Chain) -> None:
        super().__init__(chain)
        self._faults = Throttle(log)  # every fault counted; one line per 10 s (fuzzers flood otherwise)

    def handler(self) -> Service:
        # Registered with grpc's core (no per-call lookup in Python); no (de)serializers: raw bytes in
        # (parsed in check(): bad bytes -> INVALID_ARGUMENT) and out.
        return Service(SERVICE, {"Check": grpc.unary_unary_rpc_method_handler(self.check)})

    async def check(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started = time.perf_counter()
        begun = self._begin(data)
        if begun is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed CheckRequest")
            raise AssertionError("unreachable: abort raises")
        exchange, body = begun
        reply = await self.decide(exchange, body)
        if reply is None:
            sets, removes, _ = exchange.take_mutations()
            data = _proto.check_ok(sets, removes, exchange.answer_headers)
        else:
            data = _proto.check_denied(reply)
        self.finish(exchange, started)
        return data

    def _begin(self, data: bytes) -> tuple[Exchange, bytes] | None:
        try:
            request = _proto.CheckRequest.FromString(data)
        except _proto.DecodeError:
            self._metrics.error("protocol")
            self._faults.warning(
                "ext_authz:malformed", "ext_authz protocol fault: %s", "malformed CheckRequest"
            )
            return None
        http = request.attributes.request.http
        exchange = Exchange(http.headers)  # request_id: x-request-id, read lazily from these
        body: bytes = http.raw_body or http.body.encode()
        return exchange, body
