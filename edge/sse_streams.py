"""What the adapter's two transports share: the state handlers see (`Adapter`), its metrics, and the
way every stream opens (`admit`, `watching`) whether it is SSE (`sse.py`) or WebSocket (`sse_ws.py`).

`admit(request)` answers before anything is subscribed (and, for a WebSocket, before the upgrade):

    400  an invalid conversation id, last event id or `?format=`     (JSON, `invalid_request_error`)
    401  auth on and the token missing, malformed, badly signed or expired   (`WWW-Authenticate`)
    403  auth on and the token is for another conversation             (`WWW-Authenticate`)
    503  shutting down, or `--max-connections` streams open            (`Retry-After`)

in that order: a bad request is told so without a token; a refused token learns nothing about the
server's load. `watching()` then counts the stream, joins the hub (503 when NATS cannot make the
subscription), and arms the reauth timer at the token's `exp + leeway` (`StreamGrant.ends_at`, turned
into this process's monotonic clock once); leaving it leaves the hub whatever happened.

Logs: the request URL goes through `stream_auth.loggable_url()` wherever it is logged (a
`?access_token=` never reaches a log line).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from meshkit.edge.conversation_hub import Conversation, ConversationHub
from meshkit.edge.sse_options import SseOptions
from meshkit.edge.stream_auth import StreamAuth, StreamGrant, loggable_url
from meshkit.edge.token_contract import CONVERSATION_ID, TokenMessage, is_conversation_id
from meshkit.edge.viewer import Viewer
from meshkit.errors import ClientError, error_body

__all__ = ["ADAPTER", "Adapter", "Admission", "SseMetrics", "admit", "json_error", "watching"]

log = logging.getLogger("meshkit.edge.sse")

MAX_LAST_EVENT_ID = (1 << 63) - 1


@dataclass
class SseMetrics:
    open_streams: Gauge
    tokens_delivered: Counter
    latency: Histogram
    resets: Counter
    requests: Counter
    reauths: Counter
    ws_rtt: Histogram
    ws_pong_timeouts: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> SseMetrics:
        return cls(
            Gauge("meshkit_sse_open_streams", "Streams open now (SSE and WebSocket)", registry=registry),
            Counter("meshkit_sse_tokens_delivered", "Token messages written to viewers", registry=registry),
            Histogram(
                "meshkit_sse_delivery_latency_seconds",
                "From the message's ts (publish) to its write to a viewer",
                buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
                registry=registry,
            ),
            Counter("meshkit_sse_resets", "event: reset sent (sequences gone)", registry=registry),
            Counter("meshkit_sse_requests", "Requests answered, by result", ["result"], registry=registry),
            Counter(
                "meshkit_sse_reauths", "Streams ended with reauth (their token expired)", registry=registry
            ),
            Histogram(
                "meshkit_sse_ws_rtt_seconds",
                "WebSocket ping -> pong round trip",
                buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
                registry=registry,
            ),
            Counter(
                "meshkit_sse_ws_pong_timeouts",
                "WebSocket clients closed for not answering a ping within --ws-pong-timeout",
                registry=registry,
            ),
        )


@dataclass
class Adapter:
    """What the handlers share: options, the hub (set at start), auth (None: off), metrics, the
    open-stream count."""

    opts: SseOptions
    metrics: SseMetrics
    hub: ConversationHub | None = None
    auth: StreamAuth | None = None
    open_streams: int = 0
    closed_streams: int = 0  # streams that ended, so far (`sse_gc.GcPacer` paces full collections by it)
    closing: bool = False

    def the_hub(self) -> ConversationHub:
        assert self.hub is not None, "the hub starts before the listener"
        return self.hub

    def delivered(self, message: TokenMessage, live: bool) -> None:
        """Counted; its publish -> written latency observed only when it was published after its
        viewer joined (`live`): a resume of an hour-old conversation is not an hour of latency."""
        self.metrics.tokens_delivered.inc()
        if live and message.ts is not None:
            self.metrics.latency.observe(max(0.0, time.time() - message.ts))


ADAPTER = web.AppKey("adapter", Adapter)


def json_error(
    status: int, kind: str, message: str, headers: dict[str, str] | None = None, code: str | None = None
) -> web.Response:
    return web.Response(
        status=status, body=error_body(kind, message, code), content_type="application/json", headers=headers
    )


def _last_event_id(request: web.Request) -> int | None:
    """The sequence the client has, from `Last-Event-ID` or `?last_event_id=`; ValueError if bad."""
    given = request.headers.get("Last-Event-ID")
    where = "Last-Event-ID"
    if given is None or not given.strip():
        given, where = request.query.get("last_event_id"), "last_event_id"
    if given is None or not given.strip():
        return None
    text = given.strip()
    if not (text.isascii() and text.isdigit()) or int(text) > MAX_LAST_EVENT_ID:  # [0-9]+ only
        raise ValueError(f"{where} must be a token sequence (a non-negative integer), not {given[:40]!r}")
    return int(text)


@dataclass(frozen=True)
class Admission:
    """A stream that may open: its conversation, the last sequence the client has, its grant."""

    conversation_id: str
    last: int | None
    grant: StreamGrant | None


async def admit(
    request: web.Request, adapter: Adapter, check: Callable[[], None] = lambda: None
) -> Admission | web.Response:
    """An `Admission`, or the JSON error response to send instead (see the module docstring);
    `check` raises `ValueError` for transport-specific bad parameters (a 400)."""
    metrics = adapter.metrics
    cid = request.match_info["conversation_id"]
    if not is_conversation_id(cid):
        metrics.requests.labels("bad_request").inc()
        shown = cid if len(cid) <= 64 else cid[:64] + "..."
        return json_error(
            400, "invalid_request_error", f"conversation id {shown!r} must match {CONVERSATION_ID.pattern}"
        )
    try:
        last = _last_event_id(request)
        check()
    except ValueError as exc:
        metrics.requests.labels("bad_request").inc()
        return json_error(400, "invalid_request_error", str(exc))
    grant = None
    if adapter.auth is not None:
        try:
            token = adapter.auth.token_from(request.headers, request.query)
            grant = await adapter.auth.authorize(token, cid)
        except ClientError as exc:
            metrics.requests.labels("unauthorized" if exc.status == 401 else "forbidden").inc()
            log.info("%s %s: %d %s", request.method, loggable_url(request.path_qs), exc.status, exc.message)
            return web.Response(
                status=exc.status, body=exc.body(), content_type="application/json", headers=exc.headers
            )
    if adapter.closing:
        metrics.requests.labels("shutting_down").inc()
        return json_error(503, "unavailable", "shutting down: reconnect", {"Retry-After": "1"})
    if adapter.open_streams >= adapter.opts.max_connections:
        metrics.requests.labels("over_capacity").inc()
        return json_error(
            503,
            "over_capacity",
            f"{adapter.opts.max_connections} streams open (--max-connections)",
            {"Retry-After": "1"},
        )
    log.debug("%s %s: stream opens", request.method, loggable_url(request.path_qs))
    return Admission(cid, last, grant)


def _nothing() -> None:
    pass


@contextlib.asynccontextmanager
async def watching(
    adapter: Adapter, admission: Admission, abort: Callable[[], None]
) -> AsyncIterator[tuple[Viewer, Conversation]]:
    """Count the stream, join its conversation (`DependencyError`: NATS could not subscribe) and arm
    the reauth timer; leave it all on the way out."""
    hub = adapter.the_hub()
    last = admission.last
    viewer = Viewer(admission.conversation_id, None if last is None else last + 1, abort=abort)
    if admission.grant is not None and adapter.auth is not None:
        viewer.expire_at(time.monotonic() + adapter.auth.reauth_in(admission.grant))
    adapter.open_streams += 1
    adapter.metrics.open_streams.inc()
    conv = None
    try:
        conv = await hub.join(admission.conversation_id, viewer)
        yield viewer, conv
    finally:
        viewer.cancel_expiry()
        viewer.abort = _nothing  # its connection: not kept by whatever still holds the viewer (sse_gc.py)
        if conv is not None:
            hub.leave(conv, viewer)
        adapter.open_streams -= 1
        adapter.closed_streams += 1
        adapter.metrics.open_streams.dec()
