"""Envoy's ext_authz HTTP protocol on the same chain: one keep-alive HTTP/1.1 request per client request.

Envoy's ext_authz filter with an `http_service` (Istio: an `envoyExtAuthzHttp` provider) sends us the
client's method, path, the headers it is allowed to forward and the buffered body. We answer:

- allowed: `200` with the headers the chain set (Envoy copies the ones its
  `allowed_upstream_headers` lists onto the upstream request, overwriting the client's) and
  `x-envoy-auth-headers-to-remove: a,b` for the ones it removed;
- denied: the `Reply`'s status, headers and JSON body (Envoy passes them to the client).

No gRPC, no HTTP/2 framing, no grpcio thread hops: measured through Envoy, this is meshkit's cheapest
path per request (see the README's benchmark).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from aiohttp import web

from meshkit.extproc import replies
from meshkit.extproc.apis import Api
from meshkit.extproc.ext_authz import OneShot
from meshkit.extproc.filter import Exchange, Reply

log = logging.getLogger("meshkit.extproc.ext_authz_http")

HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"
MAX_HEADER_BYTES = 64 << 10
# Longer than the idle_timeout (30 s) the rendered Envoy cluster uses: Envoy, not meshkit, closes an
# idle connection, so no check is ever sent into a connection that is being closed.
KEEPALIVE_SECONDS = 75.0


class HttpAuthorization(OneShot):
    api = Api.EXT_AUTHZ_HTTP

    async def handle(self, request: web.BaseRequest) -> web.Response:
        started = time.perf_counter()
        exchange = Exchange(lambda: _headers_of(request))
        reply = await self._decide_request(request, exchange)
        if reply is None:
            sets, removes, _ = exchange.take_mutations()
            headers = dict(sets)
            if removes:
                headers[HEADERS_TO_REMOVE] = ",".join(sorted(removes))
            response = web.Response(status=200, headers=headers)
        else:
            response = web.Response(status=reply.status, body=reply.body, headers=dict(reply.headers))
        self.finish(exchange, started)
        return response

    async def _decide_request(self, request: web.BaseRequest, exchange: Exchange) -> Reply | None:
        try:
            body = await _read_body(request, self.chain.max_body_bytes)
        except (asyncio.IncompleteReadError, ConnectionResetError):  # Envoy went away mid-body
            log.info("check request ended before its body did", extra={"request_id": exchange.request_id})
            return self.chain.reject(exchange, replies.INCOMPLETE_BODY, "incomplete-body")
        if body is None:  # over the limit: refused without reading the rest
            return self.chain.check_size(exchange, self.chain.max_body_bytes + 1)
        return await self.decide(exchange, body)


def _headers_of(request: web.BaseRequest) -> dict[str, str]:
    """The check request's headers as the gRPC paths show them: lowercase names (the last value wins),
    and `:method`, `:path`, `:authority` of the client's request (Envoy puts them in the request line)."""
    headers = {k.lower(): v for k, v in request.headers.items()}
    headers[":method"] = request.method
    headers[":path"] = request.raw_path
    headers[":authority"] = headers.get("host", "")
    return headers


async def _read_body(request: web.BaseRequest, limit: int) -> bytes | None:
    """The whole body, or None as soon as it is known to exceed `limit` bytes."""
    length = request.content_length
    if length is not None:
        if length == 0:  # Envoy sends `content-length: 0` for a request without a body
            return b""
        return None if length > limit else await request.content.readexactly(length)
    parts, size = [], 0
    async for chunk in request.content.iter_any():  # chunked: count as it arrives
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


class HttpAuthzServer:
    """The aiohttp low-level server (no router, no middleware: every path is a check)."""

    def __init__(self, authz: HttpAuthorization) -> None:
        # Envoy forwards request lines and headers up to 60 KiB; aiohttp's default cap is 8190 bytes.
        self._handler = web.Server(
            authz.handle,
            access_log=None,
            max_line_size=MAX_HEADER_BYTES,
            max_field_size=MAX_HEADER_BYTES,
            keepalive_timeout=KEEPALIVE_SECONDS,
        )
        self._server: asyncio.Server | None = None

    async def start(self, sock: socket.socket) -> None:
        """Serve on `sock` (bound by `meshkit.daemon.bind`)."""
        host = sock.getsockname()[0]
        if host not in {"127.0.0.1", "::1"}:
            log.warning(
                "--http-listen on %s is not loopback: every path on it is a check; keep it off ingress", host
            )
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._handler, sock=sock)

    async def stop(self, grace: float) -> None:
        """Stop accepting, give in-flight checks up to `grace` seconds, close the rest."""
        if self._server is None:
            return
        self._server.close()
        await self._handler.shutdown(grace)
        self._server = None
