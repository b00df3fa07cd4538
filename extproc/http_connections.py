"""The connections of the ext_authz HTTP check port: what each one is doing, the header timeout and the
connection limit (with its eviction order). `meshkit.extproc.ext_authz_http` serves the checks on them.

aiohttp's low-level server has no header-read timeout and no bound on connections of its own: a client
that sends its headers one byte a second, or opens connections and sits on them, would keep a file
descriptor each until the 75 s keep-alive timer, and 20,000 of them (the fd limit here) made every new
check fail. `Connection` is aiohttp's HTTP/1.1 protocol reporting its state to the `Connections` table,
which closes slow connections at `HEADER_TIMEOUT_SECONDS` and, at the limit, the one least likely to be
Envoy's.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from meshkit.extproc import replies
from meshkit.extproc.filter import Reply
from meshkit.extproc.metrics import Metrics
from meshkit.logs import Throttle

__all__ = [
    "EVICTION_GRACE_SECONDS",
    "HEADER_TIMEOUT_SECONDS",
    "MAX_CONNECTIONS",
    "MIN_CONNECTIONS",
    "Connection",
    "Connections",
    "default_max_connections",
]

log = logging.getLogger("meshkit.extproc.ext_authz_http")

# A request's line and headers must be whole within this (see ext_authz_http's timeouts comment).
HEADER_TIMEOUT_SECONDS = 10.0

# Open connections, whatever the file-descriptor limit allows (`default_max_connections`). One Envoy
# holds at most 1024 connections to a cluster (its default circuit breaker) and far fewer in practice
# (a check takes well under a millisecond): room for several Envoys at full concurrency, at a few KiB
# of memory each.
MAX_CONNECTIONS = 8192
MIN_CONNECTIONS = 16
# At the connection limit, a connection that has been in its state (headers on their way, body on its
# way, idle) for less than this is most likely Envoy's: its new connection, its check in transit (Envoy
# writes a check whole: even 8 MiB take milliseconds on a pod network) or the pooled connection it has
# just used and may use again now. The limit closes one in its state for longer first: a slow client's,
# or an idle one nobody uses.
EVICTION_GRACE_SECONDS = 0.25


def default_max_connections() -> int:
    """Half the process's file descriptors (its soft RLIMIT_NOFILE), within [MIN_CONNECTIONS,
    MAX_CONNECTIONS]: the other half stays for gRPC, the admin port and the filters' own clients, so a
    flood on this port never makes `accept()` or anything else in the process fail for want of one."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(MIN_CONNECTIONS, min(MAX_CONNECTIONS, soft // 2))


# -- the connections ----------------------------------------------------------------------------------
# What a connection is doing. HEADERS: a request has begun (or the connection is new) and its headers
# are on their way; BODY: they are whole (parsed) and its body is on its way; DECIDING: the chain runs;
# IDLE: between requests; GONE: closed.
_HEADERS, _BODY, _DECIDING, _IDLE, _GONE = range(5)


class Connections:
    """Every open connection, by what it is doing: the header timeout and the connection limit act on
    one connection at a time, with no timer per connection and no scan of the busy ones.

    - `_headers` (HEADERS): oldest first. The sweep walks it from the front while requests are older
      than the header timeout. Envoy writes a check's headers in one go, so it is here only for an
      instant (or a new connection's first round trip): slow or silent clients stay.
    - `_bodies` (BODY): oldest first. Envoy's checks pass through while their body is in transit.
    - `_idle`: least recently used first. Envoy reuses its most recently used connection first, so the
      one closed is the one it is least likely to be about to use.
    - DECIDING connections are in none: a check being decided is never closed here.
    The limit closes the front of the first of the three whose front has been there for
    `eviction_grace` or more, else of the first two the front that has waited longer, else the front
    of `_bodies` (`_make_room`); `since` is when a connection entered its state."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        limit: int,
        header_timeout: float,
        eviction_grace: float = EVICTION_GRACE_SECONDS,
    ) -> None:
        if limit < 1 or header_timeout <= 0:
            raise ValueError("the connection limit must be at least 1 and the header timeout over 0 s")
        self.limit = limit
        self.header_timeout = header_timeout
        self.eviction_grace = eviction_grace
        self._metrics = metrics
        self._headers: dict[Connection, None] = {}
        self._bodies: dict[Connection, None] = {}
        self._idle: dict[Connection, None] = {}
        self._open = 0
        self._throttled = Throttle(log)
        self._sweep_every = min(1.0, header_timeout / 4)  # closed at most 1 s past the timeout
        self._sweeper: asyncio.TimerHandle | None = None

    # -- the header timeout ---------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweeper = loop.call_later(self._sweep_every, self._sweep, loop)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        cutoff = time.monotonic() - self.header_timeout
        late = []
        for conn in self._headers:  # in order of `since`: stop at the first request young enough
            if conn.since > cutoff:
                break
            late.append(conn)  # (BODY has its own timeout, answered 408 by the check)
        for conn in late:
            self._close(
                conn, "http_header_timeout", "request headers not whole after %g s", self.header_timeout
            )
        self._sweeper = loop.call_later(self._sweep_every, self._sweep, loop)

    # -- what the connections report ------------------------------------------------------------------
    def opened(self, conn: Connection) -> None:
        if self._open >= self.limit and not self._make_room():
            self._refused(conn)
            return
        self._open += 1
        self._metrics.http_connections = self._open
        self._begin(conn)

    def closed(self, conn: Connection) -> None:
        if conn.state != _GONE:
            self._forget(conn)

    def began(self, conn: Connection) -> None:
        """IDLE -> HEADERS: the first bytes of its next request."""
        del self._idle[conn]
        self._begin(conn)

    def headers_parsed(self, conn: Connection) -> None:
        """-> BODY, as soon as aiohttp has parsed them (and again when the check starts). From IDLE
        too: a pipelined request whose bytes came with the previous one."""
        if conn.state == _IDLE:
            self.began(conn)
        if conn.state == _HEADERS:
            del self._headers[conn]
            conn.state = _BODY
            conn.since = time.monotonic()
            self._bodies[conn] = None

    def body_read(self, conn: Connection) -> None:
        """BODY -> DECIDING: the chain runs; nothing closes the connection now."""
        if conn.state == _BODY:
            del self._bodies[conn]
            conn.state = _DECIDING

    def answered(self, conn: Connection) -> None:
        """-> IDLE, or HEADERS if bytes of the next request came while this one was decided."""
        if conn.state in (_BODY, _DECIDING):
            self._bodies.pop(conn, None)
            if conn.next_began:
                self._begin(conn)
            else:
                conn.state = _IDLE
                conn.since = time.monotonic()
                self._idle[conn] = None

    def fault(self, status: int, exc: BaseException | None) -> Reply:
        """The reply to a request aiohttp could not hand to the check: a malformed one (counted by kind,
        one line per kind per 10 s, none of its bytes), else a bug (its traceback logged)."""
        if isinstance(exc, HttpProcessingError):
            kind = type(exc).__name__
            self._metrics.error(f"http_malformed:{kind}")
            self._throttled.warning(
                f"malformed:{kind}", "malformed check request (%s): answered 400, connection closed", kind
            )
            return replies.BAD_REQUEST
        self._metrics.error("http_internal")
        log.error("check request failed inside the HTTP server (%d)", status, exc_info=exc)
        return replies.TIMEOUT if status == 504 else replies.INTERNAL_ERROR

    # -- the table ------------------------------------------------------------------------------------
    def _begin(self, conn: Connection) -> None:
        conn.state = _HEADERS
        conn.since = time.monotonic()
        conn.next_began = False
        self._headers[conn] = None

    def _make_room(self) -> bool:
        """Close one connection, preferring one that has been in its state for `eviction_grace` or
        more (a slow or idle client's: not Envoy's new connection, its check in transit or the pooled
        connection it has just used): the oldest whose headers are not whole, else the oldest whose
        body is on its way, else the least recently used idle one. If none has, whichever of the oldest
        not whole and the least recently used idle one has been so longer (under a flood of slow
        clients, one of them; of idle ones, one of those), else (only then) the oldest check in
        transit. False if every connection is deciding a check (the new one is refused)."""
        stale = time.monotonic() - self.eviction_grace
        for table in (self._headers, self._bodies, self._idle):
            victim = next(iter(table), None)
            if victim is not None and victim.since <= stale:
                break
        else:
            fronts = [next(iter(t)) for t in (self._headers, self._idle) if t]
            if fronts:
                victim = min(fronts, key=lambda conn: conn.since)
            elif self._bodies:
                victim = next(iter(self._bodies))
            else:
                return False
        self._close(victim, "http_connection_evicted", "closed: over the limit of %d", self.limit)
        return True

    def _refused(self, conn: Connection) -> None:
        conn.state = _GONE
        conn.force_close()
        self._metrics.error("http_connection_refused")
        self._throttled.warning(
            "http_connection_refused",
            "new connection refused: %d open, every one deciding a check",
            self._open,
        )

    def _close(self, conn: Connection, kind: str, why: str, *args: Any) -> None:
        self._forget(conn)
        conn.force_close()
        self._metrics.error(kind)
        self._throttled.warning(kind, f"connection {why}", *args)

    def _forget(self, conn: Connection) -> None:
        self._headers.pop(conn, None)
        self._bodies.pop(conn, None)
        self._idle.pop(conn, None)
        conn.state = _GONE
        self._open -= 1
        self._metrics.http_connections = self._open


class Connection(RequestHandler):
    """aiohttp's HTTP/1.1 protocol, reporting to the connection table what the connection is doing.

    aiohttp's own events are bytes arriving (`data_received`), the connection opening and closing, and
    the errors it answers itself (`handle_error`: a JSON reply instead of its text); the check reports
    the rest (`headers_parsed`, `body_read`, `answered`)."""

    __slots__ = ("next_began", "since", "state", "table")

    def __init__(self, manager: web.Server, table: Connections, **options: Any) -> None:
        super().__init__(manager, **options)
        self.table = table
        self.state = _HEADERS
        self.since = 0.0  # when it entered its state: the accept, a request's first byte, its headers
        # whole, or its answer (idle)
        self.next_began = False  # bytes of the next request came while this one was being decided

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.table.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.table.closed(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == _IDLE:
            self.table.began(self)
        elif state == _DECIDING:
            self.next_began = True
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:  # a request's headers are whole: it is a check in transit now
            self.table.headers_parsed(self)

    def headers_parsed(self) -> None:
        self.table.headers_parsed(self)

    def body_read(self) -> None:
        self.table.body_read(self)

    def answered(self) -> None:
        self.table.answered(self)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp's: a response has begun, the connection is broken
            raise ConnectionError("a response was sent already; cannot send an error reply")
        reply = self.table.fault(status, exc)
        response = web.Response(status=reply.status, body=reply.body, headers=dict(reply.headers))
        response.force_close()
        return response
