"""A bound on the connections of a daemon's HTTP listener and a deadline on each one's first request head.

aiohttp's server has neither: a client that opens sockets and sends nothing, or sends its request line
one byte a second, holds a file descriptor each until aiohttp's keep-alive timer (75 s), and enough of
them (the fd limit) make every real client fail — for the SSE adapter, a flood of half-open `GET
/stream/...` refused the streams it is there to serve. `ConnectionGuard` sits between the event loop and
aiohttp's protocol (`protocol_factory`), so every daemon's listener gets it from `start_app`:

- at most `limit` connections at once (default: the process's file descriptors less a reserve for
  everything else it opens); at the limit a new connection first takes the place of the oldest one
  still without a whole first request head (a slow or silent client's), else it is closed at once;
  both counted (`evicted`, `refused`);
- a new connection's first request head (up to the blank line) must be whole within `header_timeout`
  seconds (10 s, as the ext_authz HTTP port); else it is closed and counted (`header_timeout`).

After its first request a connection is aiohttp's business: an idle keep-alive connection closes after
`KEEPALIVE_SECONDS` (75 s; `start_app` sets it — aiohttp's own default is an hour, which let one cheap
request hold a slot that long), long-lived ones (an SSE stream, a WebSocket) stay as long as they are
used. A client that pre-opens connections and stays silent past the head timeout (browsers' and
Envoy's preconnect) loses them; the rendered Envoy does not preconnect. The extproc check port has its
own, finer table (`extproc/http_connections.py`: eviction order for Envoy's pooled connections); this
is the plain bound for the other listeners.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshkit.logs import Throttle

__all__ = [
    "HEADER_TIMEOUT_SECONDS",
    "KEEPALIVE_SECONDS",
    "ConnectionGuard",
    "default_connection_limit",
]

log = logging.getLogger("meshkit.connections")

HEADER_TIMEOUT_SECONDS = 10.0
KEEPALIVE_SECONDS = 75.0  # an idle keep-alive connection's life (above Envoy's 30 s idle_timeout)
FD_RESERVE = 256  # descriptors kept for everything else: clients of NATS/Redis/S3, files, the admin port
MIN_LIMIT = 16
_HEAD_END = b"\r\n\r\n"


def default_connection_limit() -> int:
    """The soft RLIMIT_NOFILE less `FD_RESERVE` (at least `MIN_LIMIT`)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 16
    return max(MIN_LIMIT, soft - FD_RESERVE)


@dataclass
class ConnectionGuard:
    """The count and the rules of one listener; `on_event(reason)` is told of every connection it closes
    (`refused`, `evicted`, `header_timeout`), for a metric."""

    limit: int = field(default_factory=default_connection_limit)
    header_timeout: float = HEADER_TIMEOUT_SECONDS
    keepalive: float = KEEPALIVE_SECONDS  # aiohttp's keepalive_timeout on this listener (start_app)
    on_event: Callable[[str], None] | None = None
    open: int = 0
    _throttled: Throttle = field(default_factory=lambda: Throttle(log, 10.0))
    _heads: dict[_Guarded, None] = field(default_factory=dict)  # still without a first head, oldest first

    def __post_init__(self) -> None:
        if self.limit < 1 or self.header_timeout <= 0:
            raise ValueError("the connection limit must be at least 1 and the header timeout over 0 s")

    def protocol_factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """What `loop.create_server` calls for each connection: aiohttp's protocol, guarded."""
        return lambda: _Guarded(self, inner())

    def _closed(self, reason: str, message: str, *args: Any) -> None:
        if self.on_event is not None:
            self.on_event(reason)
        self._throttled.warning(reason, message, *args)


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol behind the guard: every event passed on; the count and the head deadline."""

    __slots__ = ("_counted", "_guard", "_inner", "_tail", "_timer", "_transport")

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._counted = False
        self._tail = b""  # the last bytes seen while the first head is on its way (a split \r\n\r\n)
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        if guard.open >= guard.limit:
            oldest = next(iter(guard._heads), None)
            if oldest is None:
                transport.abort()  # type: ignore[attr-defined]
                guard._closed("refused", "new connection closed: %d open, the limit", guard.open)
                return
            oldest._abort("evicted", "connection closed for a new one: no whole request head yet, %d open")
        guard.open += 1
        self._counted = True
        self._transport = transport
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(guard.header_timeout, self._too_slow)
        guard._heads[self] = None
        self._inner.connection_made(transport)

    def _abort(self, reason: str, message: str) -> None:
        self._head_done()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.abort()  # type: ignore[attr-defined]
            self._guard._closed(reason, message, self._guard.open)

    def _head_done(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._guard._heads.pop(self, None)

    def _too_slow(self) -> None:
        self._timer = None
        self._abort("header_timeout", "connection closed: no whole request head in time, %d open")

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            seen = self._tail + data
            if _HEAD_END in seen:
                self._head_done()
                self._tail = b""
            else:
                self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._counted:
            return
        self._counted = False
        self._guard.open -= 1
        self._head_done()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()
