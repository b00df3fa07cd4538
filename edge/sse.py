"""`meshkit sse`: the SSE adapter at the edge. Tokens from JetStream (through a NATS leaf) to browsers.

    meshkit sse --listen 0.0.0.0:8080 --nats nats://leaf:4222 --js-domain origin --admin-listen :9090
    curl -N localhost:8080/stream/c1                                    # from the start, then live
    curl -N localhost:8080/stream/c1 -H 'Last-Event-ID: 41'             # resume after token 41
    curl -N 'localhost:8080/stream/c1?format=openai'                    # OpenAI chunks
    websocat 'ws://localhost:8080/ws/c1?last_event_id=41'               # the same over a WebSocket

API (the `--listen` port)
- `GET /stream/{conversation_id}` -> `text/event-stream` (`Cache-Control: no-cache`,
  `X-Accel-Buffering: no`): a `retry:` hint, then each token as `id: <sequence>` / `event: token` /
  `data: <the message's JSON, unchanged>`, the `done: true` message as `event: done`, then the response
  ends; `: hb` comments every `--heartbeat` s when nothing else was sent (framing: `sse_format.py`).
- Resume: `Last-Event-ID` (or `?last_event_id=N`; the header wins) -> every token after N, then live,
  no gap, no duplicate. Without it: from the conversation's first stored token (a late viewer gets
  everything so far; a conversation without tokens yet waits for them, with heartbeats). Sequences the
  stream no longer has (its limits removed them) are never skipped silently: `event: reset` with
  `{"requested": N, "available_from": M}` (N the first sequence wanted, `null` without Last-Event-ID;
  also sent for a gap in sequences nobody filled), right before token M. Without Last-Event-ID, a
  conversation whose first stored token is 0 or 1 counts as complete (sequences may start at either:
  a lost token 0 before a stored 1 cannot be told apart). A resume after the `done` token sends
  nothing and ends the response (a client closes on `event: done`).
- `?format=openai`: OpenAI Chat Completions chunks; resume there with `?last_event_id=<x_sequence>`
  (see `sse_format.py`).
- `GET /ws/{conversation_id}`: the same stream over a WebSocket, one JSON text frame per event
  (`{"event": "token"|"done"|"reset"|"blocked"|"reauth"|"reconnect"|"error", "id": <sequence>,
  "data": <the message's JSON>}`), resume with `?last_event_id=`; the same checks, sharing, lag bound,
  `--max-connections` (SSE and WebSocket streams count together) and shutdown. The server pings every
  `--ws-ping` s and exports the round trip (`meshkit_sse_ws_rtt_seconds`); a client that misses a
  pong for `--ws-pong-timeout` s is dropped. Close codes: 1000 done, 1008 reauth, 1012 shutdown,
  1011 error (see `sse_ws.py`).
- Errors before a stream starts (`sse_streams.admit`; a WebSocket gets them before the upgrade):
  400 JSON for an invalid id (`^[A-Za-z0-9_-]{1,128}$`: `a.>`, `*`, dots...), a non-integer or
  negative last event id, an unknown `format`; 401/403 when auth is on (below); 404 JSON for other
  paths; 405 JSON (`Allow: GET`) for other methods; 426 for a GET on `/ws/` that is not a handshake;
  503 JSON with `Retry-After` beyond `--max-connections` open streams, while shutting down, or when
  NATS cannot make the subscription. Errors are `{"error": {"message", "type", "code"}}`. Once a
  stream has started, a failure (a replay JetStream did not answer) is `event: error` (with
  `?format=openai` a `data: {"error": ...}` line only, which the openai client raises; a WebSocket
  `error` frame) and the end.

Auth (off by default; on with `--jwt-secret-file` and/or `--jwks`: `stream_auth.py`, the auth
filter's JWT verifier and options): the token comes as `Authorization: Bearer` or `?access_token=`
(EventSource cannot send headers; `--no-stream-query-token` turns that off) and is checked before
anything is subscribed: 401 JSON with `WWW-Authenticate: Bearer ...` (missing, bad, expired), 403
(a `conv` claim for other conversations, or no `conv` without the `--stream-any-scope` scope). An open
stream ends when its token does (`exp + --jwt-leeway`): `event: reauth` with
`{"reason": "token_expired", "last_event_id": N}` (OpenAI format: an `error` chunk of type `reauth`;
WebSocket: a `reauth` frame, then close 1008), then the end; no token is written after that moment
(checked before every batch). The client comes back with a fresh token and Last-Event-ID N (gap-free);
the old token is refused (401). A browser's EventSource reconnects by itself with the same URL:
listen for `reauth`, close it, and open a new one with the fresh token. Every logged URL goes through
`loggable_url()` (`access_token=***`): a query token never reaches the log.

Token inspection (off by default; `--redact`, `--inspector-subject`, `--audit`: `token_inspection.py`):
once per message in the hub, before it enters the conversation's shared log (`conversation_hub.py`),
so every viewer and every resume gets the same bytes. A redacted or replaced token is delivered with
its new JSON; a blocked one as `event: blocked` (`id:` = its sequence, `data:
{"conversation_id", "sequence", "reason"}`: its text never leaves; keeping the id keeps a resume
after it gap-free; OpenAI format: an empty chunk with `x_blocked`); a blocked `done` is delivered
with its text emptied (the stream must end). The audit tap copies what the hub logged, in order.
Inspection metrics (`meshkit_sse_tokens_inspected_total`, `..._blocked_total{reason}`,
`..._replaced_total{by}`, inspector failures, audit counts) are on the admin registry.

CORS (off by default; `--cors-origin ORIGIN`, repeatable, `*` only without `--cors-credentials`):
`Access-Control-Allow-Origin` on `/stream` responses (and their JSON errors) for allowed origins,
preflight `OPTIONS /stream/{id}` answered (204, or 403 for another origin); a WebSocket from an origin
not allowed is refused (403) before the upgrade (`sse_cors.py`).

Sharing and slow clients: one NATS subscription per conversation, shared by all its viewers (a core
subscription on the stream's republished `chat.<id>.live` copies, or an ordered consumer when the
stream has no such republish or with --mirror-of: `conversation_hub.py`); a viewer is a cursor into
the conversation's shared log, bounded by `--client-queue` live tokens; past that it is cut off
(logged with the reason, counted) and can resume with Last-Event-ID (`viewer.py`). A client that
stops reading when no more tokens come (so it never falls behind) is cut off the same way once one
write has blocked for `--write-timeout` s. A client that disconnects leaves at once (its handler is
cancelled: `serve_app(handler_cancellation=True)`), and the subscription goes with the last one.

Admin port: `/healthz`; `/readyz` is 200 only while NATS is connected and the stream answers
(checked every `--ready-interval` s and right after a reconnect: a leaf cut from its origin keeps its
clients connected, only the check notices); `/metrics`: `meshkit_sse_open_streams`,
`meshkit_sse_conversations_subscribed`, `meshkit_sse_tokens_delivered_total`,
`meshkit_sse_delivery_latency_seconds` (publish -> written, from the message's `ts`),
`meshkit_sse_slow_client_drops_total`, `meshkit_sse_resets_total`, `meshkit_sse_reauths_total`,
`meshkit_sse_ws_rtt_seconds`, `meshkit_sse_ws_pong_timeouts_total`,
`meshkit_sse_requests_total{result=ok|bad_request|unauthorized|forbidden|not_found|method_not_allowed|
over_capacity|...}`, replays, duplicates, gaps, malformed messages, and the inspection ones.

SIGTERM (the shared lifecycle): readiness off -> `--drain-delay` (new streams still served) -> the
listener stops accepting, every open stream gets `retry: <--reconnect-retry-ms>` + `event: reconnect`
(WebSocket: a `reconnect` frame, close 1012) and ends, the streams get up to `--drain-timeout` to
finish writing -> subscriptions dropped -> inspection closed (the audit queue flushed) -> NATS
drained -> exit 0.

Start-up: NATS must be reachable and the stream (created by `meshkit bridge`) must exist within
`--start-timeout` (progress lines meanwhile), else one line and exit 1; a JWKS URL must load. With
`--mirror-of STREAM@DOMAIN` the stream is an edge-local mirror this adapter creates on its leaf's own
JetStream (`edge_mirror.py`): it then reads only that, and stays ready while the link is down.

Modules: options `sse_options.py`; what both transports share (admission, metrics) `sse_streams.py`;
WebSocket `sse_ws.py`; CORS `sse_cors.py`; framing `sse_format.py`; the response's transport as the
hub's direct-write sink `sse_transport.py` (see `viewer.feed`); nats-py's flow-control poller replaced
`sse_flow_control.py`; when the garbage collector walks the whole heap `sse_gc.py`; this module: the
SSE handler, the NATS connection and the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import nats
from aiohttp import web
from nats.aio.client import Client
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from meshkit.connection_guard import default_connection_limit
from meshkit.daemon import Daemon, Lifecycle, Resolved
from meshkit.edge.conversation_hub import ConversationHub, HubMetrics, HubSettings
from meshkit.edge.edge_mirror import MirrorMetrics, ensure_mirror, parse_mirror_of
from meshkit.edge.sse_cors import CORS, Cors
from meshkit.edge.sse_format import Framer, framer_for
from meshkit.edge.sse_gc import GcPacer
from meshkit.edge.sse_options import SseOptions
from meshkit.edge.sse_streams import ADAPTER, Adapter, SseMetrics, admit, json_error, watching
from meshkit.edge.sse_transport import TransportSink
from meshkit.edge.sse_ws import websocket_stream
from meshkit.edge.stream_auth import StreamAuth, StreamAuthOptions
from meshkit.edge.token_contract import LIVE_SUBJECTS
from meshkit.edge.token_inspection import TokenInspection, TokenInspectionOptions
from meshkit.edge.token_stream import republishes_live
from meshkit.edge.viewer import Viewer, ViewerClock, ViewerCut, pump
from meshkit.errors import DependencyError, error_body

__all__ = ["DAEMON", "SseOptions", "serve", "sse_app"]

log = logging.getLogger("meshkit.edge.sse")


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    requests = request.app[ADAPTER].metrics.requests
    try:
        return await handler(request)
    except web.HTTPNotFound:
        requests.labels("not_found").inc()
        return json_error(
            404, "not_found", f"no such path: {request.path} (GET /stream/{{id}} or /ws/{{id}})"
        )
    except web.HTTPMethodNotAllowed:
        requests.labels("method_not_allowed").inc()
        return json_error(405, "method_not_allowed", f"{request.method}: only GET", {"Allow": "GET"})
    except web.HTTPException as exc:
        return json_error(exc.status, "http_error", exc.reason)
    except Exception:  # a bug: its traceback in the log, a JSON 500 to the client (before the stream)
        log.exception("%s %s failed", request.method, request.path)
        requests.labels("error").inc()
        return json_error(500, "server_error", "internal error (logged)")


async def _stream(request: web.Request) -> web.StreamResponse:
    adapter = request.app[ADAPTER]
    opts, metrics = adapter.opts, adapter.metrics
    framers: list[Framer] = []

    def check() -> None:
        framers.append(
            framer_for(
                request.query.get("format", "sse"),
                request.match_info["conversation_id"],
                retry_ms=opts.retry_ms,
                default_model=opts.default_model,
            )
        )

    admission = await admit(request, adapter, check)
    if isinstance(admission, web.Response):
        return admission
    framer, cid = framers[0], admission.conversation_id
    hub = adapter.the_hub()
    transport = request.transport
    response: web.StreamResponse | None = None
    try:
        async with watching(adapter, admission, transport.abort if transport else lambda: None) as (
            viewer,
            conv,
        ):
            metrics.requests.labels("ok").inc()
            stream = response = web.StreamResponse(
                headers={
                    "Content-Type": framer.content_type,
                    "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no",
                }
            )
            await stream.prepare(request)
            sink = None if transport is None else TransportSink(transport, _is_chunked(stream))

            async def write(data: bytes) -> None:
                await stream.write(data)
                if data and sink is not None:
                    sink.armed = True  # the headers went out with it: direct writes may follow

            try:
                await write(framer.preamble())
                ended = await pump(
                    viewer,
                    conv.log,
                    framer,
                    write,
                    sink=sink,
                    replay=hub.replay,
                    heartbeat=opts.heartbeat,
                    retry_ms=opts.reconnect_retry_ms,
                    delivered=adapter.delivered,
                    reset=metrics.resets.inc,
                )
            except DependencyError as exc:
                log.warning("stream %s: %s", cid, exc)
                with contextlib.suppress(ViewerCut, ConnectionError):
                    await stream.write(framer.error(error_body("unavailable", exc.message)))
                ended = "error"
            except (ViewerCut, ConnectionError, asyncio.CancelledError):
                raise
            except Exception:  # a bug, once the stream has started: event: error, then the end
                log.exception("stream %s failed", cid)
                body = error_body("server_error", "internal error (logged)")
                with contextlib.suppress(ViewerCut, ConnectionError):
                    await stream.write(framer.error(body))
                ended = "error"
            if ended == "reauth":
                metrics.reauths.inc()
                log.info("stream %s: its token expired: reauth sent after id %d", cid, viewer.last_sent)
            log.debug("stream %s ended: %s", cid, ended)
            with contextlib.suppress(ConnectionError):
                await stream.write_eof()
            return stream
    except DependencyError as exc:  # the subscription could not be made: nothing was sent yet
        metrics.requests.labels("unavailable").inc()
        return json_error(503, "unavailable", exc.message, {"Retry-After": str(exc.retry_after)})
    except (ViewerCut, ConnectionError):  # cut off, or the client went away: nothing more to write
        return response if response is not None else web.Response(status=499)


def _is_chunked(response: web.StreamResponse) -> bool:
    """Whether aiohttp frames the body in chunks (HTTP/1.1 without a length: yes; HTTP/1.0: no)."""
    return "chunked" in response.headers.get("Transfer-Encoding", "").lower()


def sse_app(adapter: Adapter) -> web.Application:
    app = web.Application(middlewares=[_json_errors])
    app[ADAPTER] = adapter
    app.router.add_get("/stream/{conversation_id}", _stream, allow_head=False)
    app.router.add_get("/ws/{conversation_id}", websocket_stream, allow_head=False)
    cors = Cors(adapter.opts.cors_origin, credentials=adapter.opts.cors_credentials)
    if cors.enabled:
        app.router.add_route("OPTIONS", "/stream/{conversation_id}", cors.preflight)
        app.on_response_prepare.append(cors.on_prepare)
    app[CORS] = cors

    async def on_shutdown(_: web.Application) -> None:
        # The listener no longer accepts: every open stream is told to reconnect (elsewhere) and ends.
        adapter.closing = True
        if adapter.hub is not None:
            told = adapter.hub.close_viewers()
            if told:
                log.info("told %d open stream(s) to reconnect", told)

    app.on_shutdown.append(on_shutdown)
    return app


@dataclass
class _Nats:
    """The NATS connection and what /readyz says about it."""

    opts: SseOptions
    life: Lifecycle
    client: Client | None = None
    draining: bool = False
    _probe: asyncio.Task[None] | None = None
    _poke: asyncio.Event = field(default_factory=asyncio.Event)
    _ok: bool = True  # what the last check found (a change is logged)
    mirror_metrics: MirrorMetrics | None = None  # --mirror-of: the mirror's lag, on each check
    stream_config: StreamConfig | None = None  # what wait_for_stream found (not with --mirror-of)
    on_back: Callable[[], None] | None = None  # the stream answers again after it did not
    _resync_due: bool = False  # the connection was lost: on_back once a check passes connected

    def _set(self, ready: bool, reason: str) -> None:
        if not self.draining:
            self.life.readiness.set(ready, reason)

    async def connect(self) -> None:
        async def disconnected() -> None:
            if self.draining:
                return
            log.warning("NATS connection lost: not ready until it is back")
            self._ok = False
            self._resync_due = True
            self._set(False, "nats disconnected")

        async def reconnected() -> None:
            log.info("NATS connection back")
            self._poke.set()  # check the stream now

        said = False

        async def error(exc: Exception) -> None:
            nonlocal said
            if self.client is None and not said:  # still connecting: say why once (the start may wait)
                said = True
                log.warning("NATS not reachable yet: %r", exc)
            else:
                log.debug("NATS: %r", exc)

        servers = [u.strip() for u in self.opts.nats.split(",") if u.strip()]
        try:
            self.client = await nats.connect(
                servers,
                name="meshkit-sse",
                connect_timeout=2,
                drain_timeout=2,
                reconnect_time_wait=0.25,
                max_reconnect_attempts=-1,
                ping_interval=5,
                max_outstanding_pings=2,
                disconnected_cb=disconnected,
                reconnected_cb=reconnected,
                error_cb=error,
            )
        except Exception as exc:
            raise DependencyError("nats", f"cannot connect: {exc!r}") from None

    def js(self) -> Any:
        assert self.client is not None
        return self.client.jetstream(domain=self.opts.js_domain or None, timeout=self.opts.nats_timeout)

    async def wait_for_stream(self) -> None:
        """Until the stream exists (the bridge creates it; with --mirror-of, this creates the edge
        mirror); the lifecycle bounds it (--start-timeout)."""
        mirror = parse_mirror_of(self.opts.mirror_of) if self.opts.mirror_of else None
        said = False
        while True:
            try:
                if mirror is not None:
                    await ensure_mirror(self.js(), self.opts.stream, mirror)
                    log.info("stream %s: the edge mirror of %s", self.opts.stream, mirror)
                else:
                    self.stream_config = (await self.js().stream_info(self.opts.stream)).config
                return
            except NotFoundError:
                if not said:
                    log.warning(
                        "stream %s does not exist yet (meshkit bridge creates it): waiting", self.opts.stream
                    )
                    said = True
            except ValueError as exc:  # a stream of that name that is no such mirror: an operator's fix
                if not said:
                    log.warning("%s: waiting", exc)
                    said = True
            except Exception as exc:
                if not said:
                    log.warning("stream %s not reachable yet: %r", self.opts.stream, exc)
                    said = True
            await asyncio.sleep(0.5)

    async def _check(self) -> None:
        """Every --ready-interval (and at once after a reconnect): does the stream answer? /readyz
        follows (a leaf cut from its origin keeps its clients connected: only this notices)."""
        while True:
            if self.client is not None and self.client.is_connected:
                try:
                    async with asyncio.timeout(min(self.opts.nats_timeout, self.opts.ready_interval + 1)):
                        info = await self.js().stream_info(self.opts.stream)
                    if self.mirror_metrics is not None:
                        self.mirror_metrics.observe(info)
                    problem = None
                except Exception as exc:
                    problem = exc
                # What the link lost meanwhile is read once the stream answers again: after checks that
                # failed, and after a lost connection even when a check answered just before the loss
                # (so `_ok` did not change across it).
                back = problem is None and (not self._ok or self._resync_due) and self.client.is_connected
                if (problem is None) != self._ok:
                    if problem is None:
                        log.info("stream %s reachable again: ready", self.opts.stream)
                    else:
                        log.warning("stream %s not reachable: not ready (%r)", self.opts.stream, problem)
                self._ok = problem is None
                self._set(self._ok, "serving" if self._ok else f"stream {self.opts.stream} not reachable")
                if back:
                    self._resync_due = False
                    if self.on_back is not None:
                        self.on_back()
            self._poke.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.opts.ready_interval):
                    await self._poke.wait()

    async def start_checks(self) -> None:
        self._probe = asyncio.ensure_future(self._check())

    async def stop_checks(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)

    async def close(self) -> None:
        if self.client is not None and not self.client.is_closed:
            with contextlib.suppress(Exception):
                await self.client.drain()
            with contextlib.suppress(Exception):
                await self.client.close()


async def serve(options: Resolved, life: Lifecycle) -> None:
    opts: SseOptions = options[SseOptions]
    adapter = Adapter(opts, SseMetrics.create(life.registry))
    adapter.auth = auth = StreamAuth.from_options(options)
    if auth is not None:
        for collector in auth.collectors():
            life.registry.register(collector)
        await life.start("stream auth (JWT keys)", auth.start, auth.close)
    inspection = TokenInspection.from_options(options)
    for collector in inspection.collectors():
        life.registry.register(collector)
    conn = _Nats(opts, life)
    if opts.mirror_of:
        conn.mirror_metrics = MirrorMetrics.create(life.registry)
    await life.start("nats", conn.connect, conn.close)
    await life.start(f"stream {opts.stream}", conn.wait_for_stream)
    if inspection.enabled:

        async def start_inspection() -> None:
            await inspection.start(conn.client)

        await life.start("token inspection", start_inspection, inspection.close)
    log.info(
        "stream auth %s; %s",
        "on (JWT)" if auth is not None else "off",
        inspection.summary(),
    )
    live = conn.stream_config is not None and republishes_live(conn.stream_config)
    if live:
        log.info("stream %s republishes on %s: live tokens by core subscription", opts.stream, LIVE_SUBJECTS)
    elif not opts.mirror_of:
        log.warning(
            "stream %s does not republish stored tokens on %s (streams meshkit bridge creates do): one "
            "JetStream consumer per conversation instead, slower (see token_stream.py)",
            opts.stream,
            LIVE_SUBJECTS,
        )
    settings = HubSettings(
        live=live,
        stream=opts.stream,
        history=opts.history,
        client_queue=opts.client_queue,
        gap_timeout=opts.gap_timeout,
        consumer_heartbeat=opts.consumer_heartbeat,
        request_timeout=opts.nats_timeout,
    )

    def on_cut(viewer: Viewer, reason: str) -> None:
        log.warning(
            "stream %s: cut off: %s (it may resume after id %d)",
            viewer.conversation_id,
            reason,
            viewer.last_sent,
        )

    hub = ConversationHub(
        conn.js(), settings, HubMetrics.create(life.registry), on_cut=on_cut, inspection=inspection
    )

    def on_back() -> None:
        if count := hub.resync():
            log.info("catching up %d conversation(s) on what the stream stored meanwhile", count)

    conn.on_back = on_back

    async def start_hub() -> None:
        adapter.hub = hub

    await life.start("conversation hub", start_hub, hub.close)

    def stalled(viewer: Viewer) -> None:
        reason = f"stalled client: a write blocked for {opts.write_timeout:g} s (--write-timeout)"
        hub.metrics.slow_drops.inc()
        on_cut(viewer, reason)
        viewer.cut(reason)

    clock = ViewerClock(
        lambda: hub.viewers, heartbeat=opts.heartbeat, write_timeout=opts.write_timeout, stalled=stalled
    )
    await life.start("viewer clock", clock.start, clock.stop)
    pacer = GcPacer(lambda: (adapter.open_streams, adapter.closed_streams))
    await life.start("gc pacer", pacer.start, pacer.stop)

    async def draining() -> None:
        conn.draining = True

    life.on_draining(draining)
    # streams beyond --max-connections get their 503; the connection bound sits above that, within
    # the file descriptors the process has (else say so: past them, clients are refused, not 503)
    budget = default_connection_limit()
    if opts.max_connections > budget:
        log.warning(
            "--max-connections %d is over the %d connections the file-descriptor limit allows: "
            "raise RLIMIT_NOFILE (ulimit -n) or lower it",
            opts.max_connections,
            budget,
        )
    connections = min(budget, opts.max_connections + 1024)
    await life.serve_app(
        "http", opts.listen, sse_app(adapter), handler_cancellation=True, max_connections=connections
    )
    await life.start("readiness checks", conn.start_checks, conn.stop_checks)


def _sections() -> list[type[Any]]:
    return [SseOptions, StreamAuthOptions, TokenInspectionOptions]


DAEMON = Daemon(
    name="sse",
    help="the SSE adapter: conversations' tokens from JetStream (a NATS leaf) as resumable SSE",
    sections=_sections,
    serve=serve,
)
