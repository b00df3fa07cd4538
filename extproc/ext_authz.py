"""What both ext_authz adapters share: the request phases back to back, in one call.

Envoy's ext_authz filter (gRPC `Check` or its HTTP protocol) hands over the headers and the whole
buffered body at once. The chain's request-headers hooks run, the body size is checked, the
request-body hooks run, all on one `Exchange`; the adapter turns the outcome into its own wire format.
Response phases do not exist in ext_authz: a chain that needs them runs over ext_proc. Neither does a
body rewrite (`Exchange.replace_body`, a model alias): ext_authz's answer carries headers only, so a
check whose chain replaced the body is refused (`BODY_REWRITE_REFUSED`, 500 JSON) rather than let the
upstream get the old body.
"""

from __future__ import annotations

import time

from meshkit.extproc.apis import Api
from meshkit.extproc.chain import Chain
from meshkit.extproc.filter import Exchange, Phase, Reply

__all__ = ["BODY_REWRITE_REFUSED", "OneShot"]

BODY_REWRITE_REFUSED = Reply.error(
    500,
    "server_error",
    "this request needs its body rewritten (a model alias), which ext_authz cannot do: "
    "route it through meshkit over ext_proc, or send the model's own name",
    "body_rewrite_needs_ext_proc",
)


class OneShot:
    """Base of the ext_authz adapters: `decide()`, then `finish()`."""

    api: Api = Api.EXT_AUTHZ

    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self._metrics = chain.metrics
        self._histogram = chain.metrics.phase(self.api, "check")
        self._has_headers_phase = Phase.REQUEST_HEADERS in chain.phases
        self._has_body_phase = Phase.REQUEST_BODY in chain.phases

    async def decide(self, exchange: Exchange, body: bytes) -> Reply | None:
        """Run the request phases on `exchange`, counted in flight until they end (also when Envoy's
        timeout cancels the call during an async hook)."""
        self._metrics.in_flight += 1
        try:
            return await self._decide(exchange, body)
        finally:
            self._metrics.in_flight -= 1

    async def _decide(self, exchange: Exchange, body: bytes) -> Reply | None:
        """`decide` without the in-flight count, for an adapter that counts the check from earlier on
        (the HTTP one: from its request headers, while the body may still be on its way)."""
        exchange.end_of_stream = not body
        chain = self.chain
        chain.new_round(exchange)  # one deadline for both phases: Envoy waits for one answer
        if self._has_headers_phase and (reply := await chain.run(Phase.REQUEST_HEADERS, exchange)):
            return reply
        if not body:
            return None
        if reply := chain.check_size(exchange, len(body)):
            return reply
        exchange.body = body
        if not self._has_body_phase:
            return None
        reply = await chain.run(Phase.REQUEST_BODY, exchange)
        if reply is None and exchange.take_body() is not None:
            return chain.reject(exchange, BODY_REWRITE_REFUSED, "body-rewrite")
        return reply

    def finish(self, exchange: Exchange, started: float) -> None:
        self.chain.finish(exchange, self.api)
        self._histogram.observe(time.perf_counter() - started)
