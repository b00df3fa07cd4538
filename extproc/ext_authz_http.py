"""Envoy's ext_authz HTTP protocol on the same chain: one keep-alive HTTP/1.1 request per client request.

Envoy's ext_authz filter with an `http_service` (Istio: an `envoyExtAuthzHttp` provider) sends us the
client's method, path, the headers it is allowed to forward and the buffered body. We answer:

- allowed: `200` with the headers the chain set (Envoy copies the ones its
  `allowed_upstream_headers` lists onto the upstream request, overwriting the client's) and
  `x-envoy-auth-headers-to-remove: a,b` for the ones it removed;
- denied: the `Reply`'s status, headers and JSON body (Envoy passes them to the client).

No gRPC, no HTTP/2 framing, no grpcio thread hops: measured through Envoy, this is meshkit's cheapest
path per request (see the README's benchmark).

The port is a security boundary (auth decisions travel over it), and whatever reaches it may not be
Envoy. What one such client can cost is bounded, each bound counted in
`meshkit_extproc_errors_total{kind="http_..."}`:

- the body is hashed exactly as sent: `Content-Encoding` is never inflated (a gzip bomb stays small);
- a request's headers must be whole `HEADER_TIMEOUT_SECONDS` after its first byte (after the accept,
  for a new connection), else the connection is closed; its body `BODY_TIMEOUT_SECONDS` after the
  headers (longer for a --max-body-bytes over 320 MiB), else 408 and the connection closed. Envoy
  writes a check's headers and its buffered body at once, so for Envoy both take microseconds;
- at most `max_connections` open connections (`meshkit_extproc_http_connections`): one more makes
  room by closing the oldest request whose headers are not whole, else the oldest whose body is on
  its way, else the least recently used idle connection, first among those in that state for
  `EVICTION_GRACE_SECONDS` or more (a slow or idle client's: what Envoy does takes milliseconds); a
  check in transit goes only when nothing else can, a check being decided never (if all are, the new
  connection is refused);
- a check whose client goes away is cancelled (async hooks get CancelledError) and its partial body
  freed at once, not at the cycle collector's next pass;
- a malformed request gets a JSON 400 and a closed connection: a counter, and one log line per kind
  per 10 s (no request bytes in it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestPayloadError

from meshkit.extproc import replies
from meshkit.extproc.apis import Api
from meshkit.extproc.chain import Chain
from meshkit.extproc.ext_authz import OneShot
from meshkit.extproc.filter import UNSAFE_HEADER_CHARS, Exchange, Reply
from meshkit.extproc.http_connections import (
    EVICTION_GRACE_SECONDS,
    HEADER_TIMEOUT_SECONDS,
    Connection,
    Connections,
    default_max_connections,
)
from meshkit.logs import Throttle

log = logging.getLogger("meshkit.extproc.ext_authz_http")

HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"
MAX_HEADER_BYTES = 64 << 10
# Longer than the idle_timeout (30 s) the rendered Envoy cluster uses: Envoy, not meshkit, closes an
# idle connection, so no check is ever sent into a connection that is being closed.
KEEPALIVE_SECONDS = 75.0
# Envoy writes a check's request line and headers in one go, as soon as the connection is up or taken
# from its pool, and its body (buffered whole by `with_request_body`) right behind them. Either limit
# is well above Envoy's own timeout for the whole check (`http_service.server_uri.timeout`: 1 s in the
# rendered configs for bodies up to 16 MiB, --filter-timeout + 0.5 s), after which Envoy has given up
# on the check anyway: nothing Envoy sends is ever cut, with room for a stalled process (GC pause, CPU
# steal); a client that is not Envoy holds a descriptor at most this long (less at the connection
# limit), not aiohttp's 75 s. For a --max-body-bytes over 320 MiB the body timeout grows with it
# (`body_timeout_for`), as Envoy's does.
BODY_TIMEOUT_SECONDS = 10.0
# The slowest a whole body is expected to travel from Envoy to meshkit: measured through Envoy on
# loopback (2 cores), a 1 GiB check took 8.6 s over HTTP and 20 s over gRPC, 50-120 MiB/s. Envoy's
# timeouts in the rendered configs and the body timeout here leave a --max-body-bytes body this rate.
TRANSFER_BYTES_PER_SECOND = 32 << 20


def body_timeout_for(max_body_bytes: int) -> float:
    """The body timeout for bodies up to `max_body_bytes`: `BODY_TIMEOUT_SECONDS`, or the time the
    largest takes at `TRANSFER_BYTES_PER_SECOND` when longer (32 s at 1 GiB)."""
    return max(BODY_TIMEOUT_SECONDS, max_body_bytes / TRANSFER_BYTES_PER_SECOND)


# -- the check ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Unread:
    """The body was not read whole: answer `reply`; `close`: then close the connection at once (the
    framing is lost, or the client stalled), else read and drop the rest (`_send_and_drain`)."""

    reply: Reply
    close: bool


class HttpAuthorization(OneShot):
    api = Api.EXT_AUTHZ_HTTP

    def __init__(self, chain: Chain, *, body_timeout: float | None = None) -> None:
        super().__init__(chain)
        self.body_timeout = body_timeout_for(chain.max_body_bytes) if body_timeout is None else body_timeout
        self._throttled = Throttle(log)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        protocol = request.protocol
        conn = protocol if isinstance(protocol, Connection) else None
        exchange = Exchange(lambda: _headers_of(request))
        self._metrics.in_flight += 1  # from the headers on: a check whose body is on its way is in flight
        reply: Reply | None
        unread: _Unread | None = None
        try:
            if conn is not None:
                conn.headers_parsed()
            body = await self._body(request, exchange)
            if isinstance(body, _Unread):
                unread, reply = body, body.reply
            else:
                if conn is not None:
                    conn.body_read()
                reply = await self._decide(exchange, body)
        except asyncio.CancelledError:
            self._client_gone(request, exchange)
            raise
        finally:
            self._metrics.in_flight -= 1
            if conn is not None:
                conn.answered()
        response = self._sendable(_response(exchange, reply), exchange)
        self.finish(exchange, started)
        if unread is None:
            return response
        if unread.close:
            return await _send_and_close(request, response)
        return await _send_and_drain(request, response, self.body_timeout)

    async def _body(self, request: web.BaseRequest, exchange: Exchange) -> bytes | _Unread:
        """The whole body as sent (never inflated: the server runs with `auto_decompress=False`)."""
        chain = self.chain
        length = request.content_length
        if length is not None and (too_large := chain.check_size(exchange, length)):
            return _Unread(too_large, close=False)  # refused unread; the rest is read and dropped
        content = request.content
        try:
            if content.is_eof():  # the usual case: Envoy wrote the headers and the body at once
                return content.read_nowait(-1)
            if request.version >= (1, 1) and request.headers.get("expect", "").lower() == "100-continue":
                await request.writer.write(_CONTINUE)  # the client waits for it to send its body
            async with asyncio.timeout(self.body_timeout):
                body = await _read_rest(content, chain.max_body_bytes)
        except TimeoutError:
            return self._refuse(
                exchange,
                replies.REQUEST_TIMEOUT,
                "http_body_timeout",
                "body stalled: not whole after %g s",
                self.body_timeout,
            )
        except RequestPayloadError as exc:  # the body's framing is broken
            exc.__traceback__ = None  # the stream keeps `exc`: no cycle through this frame
            return self._refuse(exchange, replies.BAD_REQUEST, "http_malformed_body", "malformed body")
        except ConnectionResetError as exc:  # the client went away mid-body (no cancellation yet)
            exc.__traceback__ = None
            return self._refuse(exchange, replies.INCOMPLETE_BODY, "http_incomplete_body", _ENDED_EARLY)
        if body is None:  # chunked, and over the limit as it arrived: refused without the rest
            too_large = chain.check_size(exchange, chain.max_body_bytes + 1)
            assert too_large is not None  # over the limit by construction
            return _Unread(too_large, close=False)
        return body

    def _refuse(self, exchange: Exchange, reply: Reply, kind: str, what: str, *args: Any) -> _Unread:
        """Answer a check the server itself cannot take (`kind`: the error counter), closing its
        connection; one log line per kind per 10 s."""
        self._metrics.error(kind)
        self._throttled.warning(
            kind,
            f"check request {what}: answered %d, connection closed",
            *args,
            reply.status,
            request_id=exchange.request_id,
        )
        source = kind.removeprefix("http_").replace("_", "-")  # e.g. body-timeout, as max-body-bytes
        return _Unread(self.chain.reject(exchange, reply, source), close=True)

    def _sendable(self, response: web.Response, exchange: Exchange) -> web.Response:
        """`response`, or a 500 if the chain gave it a header aiohttp refuses to write (a control
        character, e.g. CR/LF from a value a filter copied out of the body): aiohttp would fail after the
        check, log a traceback and drop the connection without an answer, once per such request."""
        unsafe = [
            k
            for k, v in response.headers.items()
            if UNSAFE_HEADER_CHARS.search(k) or UNSAFE_HEADER_CHARS.search(v)
        ]
        if not unsafe:
            return response
        self._metrics.error("http_unsafe_header")
        self._throttled.warning(
            "http_unsafe_header",
            "check answered 500: the chain set %s with a control character in it (a filter bug)",
            ", ".join(ascii(name)[:80] for name in unsafe),
            request_id=exchange.request_id,
        )
        return _response(exchange, replies.INTERNAL_ERROR)

    def _client_gone(self, request: web.BaseRequest, exchange: Exchange) -> None:
        """Cancelled because the connection was lost (aiohttp's `handler_cancellation`): counted, one
        line per 10 s. A cancellation with the connection still up is the server stopping: not counted."""
        if request.transport is not None:
            return
        if request.content.is_eof():
            kind, what = "http_abandoned", "check abandoned: its connection closed before the answer"
        else:
            kind, what = "http_incomplete_body", _ENDED_EARLY
        self._metrics.error(kind)
        self._throttled.warning(kind, what, request_id=exchange.request_id)


_ENDED_EARLY = "check request ended before its body did (the client went away)"
# What aiohttp refuses to write in a header name or value (RFC 9110 5.5: no CR, LF, NUL, ...).
# Envoy never sends `Expect` (it answers a client's itself); curl and others do, and wait for this.
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _response(exchange: Exchange, reply: Reply | None) -> web.Response:
    if reply is not None:
        return web.Response(status=reply.status, body=reply.body, headers=dict(reply.headers))
    sets, removes, _ = exchange.take_mutations()
    headers = {**exchange.answer_headers, **sets}
    if removes:
        headers[HEADERS_TO_REMOVE] = ",".join(sorted(removes))
    return web.Response(status=200, headers=headers)


async def _send_and_close(request: web.BaseRequest, response: web.Response) -> web.Response:
    """Send `response`, then close the connection at once: what is left of the body is not coming, or
    cannot be framed (aiohttp would spend up to 10 s reading and dropping it)."""
    response.force_close()
    with contextlib.suppress(ConnectionError):  # the client has gone too: nothing to tell it
        await response.prepare(request)
        await response.write_eof()
    request.protocol.force_close()
    return response  # already sent: aiohttp's own prepare() and write_eof() do nothing more


async def _send_and_drain(request: web.BaseRequest, response: web.Response, within: float) -> web.Response:
    """Send `response` (a 413: the body is refused unread), then read and drop the rest of the body for
    at most `within` seconds, keeping the connection if it ends in time, else closing it.

    Closing at once could reset the connection before the client has read the answer (the unread
    bytes make the kernel send RST). aiohttp would drain it too ("lingering"), but a client that
    goes away meanwhile leaves that request, its headers (up to 128 KiB) and its stream in a cycle only
    the cycle collector frees; here nothing is kept (see `_read_rest`)."""
    with contextlib.suppress(ConnectionError):
        await response.prepare(request)
        await response.write_eof()
    content = request.content
    try:
        async with asyncio.timeout(within):
            while await content.readany():
                pass
    except TimeoutError:
        request.protocol.force_close()  # still coming: not worth reading further
    except (RequestPayloadError, ConnectionResetError) as exc:  # broken framing, or the client left
        exc.__traceback__ = None
        request.protocol.force_close()
    return response


async def _read_rest(content: StreamReader, limit: int) -> bytes | None:
    """The rest of a body still arriving, or None as soon as it exceeds `limit` bytes.

    Whatever happens, the chunks read so far are dropped here and now: when a read fails, the
    exception's traceback holds this frame, and the stream that keeps the exception is reachable from
    it, a cycle only the cycle collector frees, with up to `limit` bytes in it (50 aborted 8 MiB
    bodies held 420 MB until it ran)."""
    parts: list[bytes] = []
    chunk = b""
    size = 0
    try:
        while chunk := await content.readany():
            size += len(chunk)
            if size > limit:
                return None
            parts.append(chunk)
        return b"".join(parts)
    finally:
        parts.clear()
        del chunk


def _headers_of(request: web.BaseRequest) -> dict[str, str]:
    """The check request's headers as the gRPC paths show them: lowercase names (the last value wins),
    and `:method`, `:path`, `:authority` of the client's request (Envoy puts them in the request line)."""
    headers = {k.lower(): v for k, v in request.headers.items()}
    headers[":method"] = request.method
    headers[":path"] = request.raw_path
    headers[":authority"] = headers.get("host", "")
    return headers


class HttpAuthzServer:
    """The aiohttp low-level server (no router, no middleware: every path is a check), with our
    protocol (`Connection`) and the limits above."""

    def __init__(
        self,
        authz: HttpAuthorization,
        *,
        header_timeout: float = HEADER_TIMEOUT_SECONDS,
        max_connections: int | None = None,
        eviction_grace: float = EVICTION_GRACE_SECONDS,
    ) -> None:
        self._table = Connections(
            authz.chain.metrics,
            limit=max_connections or default_max_connections(),
            header_timeout=header_timeout,
            eviction_grace=eviction_grace,
        )
        # The handler, the connection list `shutdown()` walks, and handler_cancellation: a check whose
        # connection is lost is cancelled (else an async hook runs on and stays counted in flight).
        self._handler = web.Server(authz.handle, handler_cancellation=True)
        self._options: dict[str, Any] = {
            "access_log": None,
            # Envoy forwards request lines and headers up to 60 KiB; aiohttp's default cap is 8190 bytes.
            "max_line_size": MAX_HEADER_BYTES,
            "max_field_size": MAX_HEADER_BYTES,
            "keepalive_timeout": KEEPALIVE_SECONDS,
            # Hash the bytes as sent: aiohttp would inflate gzip/deflate bodies (and gzip bombs).
            "auto_decompress": False,
        }
        self._server: asyncio.Server | None = None

    @property
    def max_connections(self) -> int:
        return self._table.limit

    async def start(self, sock: socket.socket) -> None:
        """Serve on `sock` (bound by `meshkit.daemon.bind`)."""
        host = sock.getsockname()[0]
        if host not in {"127.0.0.1", "::1"}:
            log.warning(
                "--http-listen on %s is not loopback: every path on it is a check; keep it off ingress", host
            )
        loop = asyncio.get_running_loop()

        def connection() -> Connection:
            return Connection(self._handler, self._table, loop=loop, **self._options)

        self._server = await loop.create_server(connection, sock=sock)
        self._table.start(loop)

    async def stop(self, grace: float) -> None:
        """Stop accepting, give in-flight checks up to `grace` seconds, close the rest."""
        if self._server is None:
            return
        self._table.stop()
        self._server.close()
        await self._handler.shutdown(grace)
        self._server = None
