"""`meshkit sse`: the SSE adapter at the edge. Tokens from JetStream (through a NATS leaf) to browsers.

    meshkit sse --listen 0.0.0.0:8080 --nats nats://leaf:4222 --js-domain origin --admin-listen :9090
    curl -N localhost:8080/stream/c1                                    # from the start, then live
    curl -N localhost:8080/stream/c1 -H 'Last-Event-ID: 41'             # resume after token 41
    curl -N 'localhost:8080/stream/c1?format=openai'                    # OpenAI chunks

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
- 400 JSON before any subscription for an invalid id (`^[A-Za-z0-9_-]{1,128}$`: `a.>`, `*`, dots...),
  a non-integer or negative last event id, an unknown `format`; 404 JSON for other paths; 405 JSON
  (`Allow: GET`) for other methods; 503 JSON with `Retry-After` beyond `--max-connections` open streams,
  while shutting down, or when NATS cannot make the subscription. Errors are
  `{"error": {"message", "type", "code"}}`. Once a stream has started, a failure (a replay JetStream
  did not answer) is `event: error` and the end of the response.

Sharing and slow clients: one JetStream subscription per conversation, shared by all its viewers
(`conversation_hub.py`); a viewer is a cursor into the conversation's shared log, bounded by
`--client-queue` live tokens; past that it is cut off (logged with the reason, counted) and can resume
with Last-Event-ID (`viewer.py`). A client that stops reading when no more tokens come (so it never
falls behind) is cut off the same way once one write has blocked for `--write-timeout` s. A client
that disconnects leaves at once (its handler is cancelled), and the subscription goes with the last
one.

Admin port: `/healthz`; `/readyz` is 200 only while NATS is connected and the stream answers
(checked every `--ready-interval` s and right after a reconnect: a leaf cut from its origin keeps its
clients connected, only the check notices); `/metrics`: `meshkit_sse_open_streams`,
`meshkit_sse_conversations_subscribed`, `meshkit_sse_tokens_delivered_total`,
`meshkit_sse_delivery_latency_seconds` (publish -> written, from the message's `ts`),
`meshkit_sse_slow_client_drops_total`, `meshkit_sse_resets_total`,
`meshkit_sse_requests_total{result=ok|bad_request|not_found|method_not_allowed|over_capacity|...}`,
replays, duplicates, gaps, malformed messages.

SIGTERM (the shared lifecycle): readiness off -> `--drain-delay` (new streams still served) -> the
listener stops accepting, every open stream gets `retry: <--reconnect-retry-ms>` + `event: reconnect`
and ends, the streams get up to `--drain-timeout` to finish writing -> subscriptions dropped -> NATS
drained -> exit 0.

Start-up: NATS must be reachable and the stream (created by `meshkit bridge`) must exist within
`--start-timeout` (progress lines meanwhile), else one line and exit 1.

NOT DONE in this slice: WebSocket (`/ws/{id}`), JWT auth and `event: reauth`, inspection hooks (they
fit as a framer beside `sse_format.py` and a step in `ConversationHub.deliver`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import nats
from aiohttp import web
from nats.aio.client import Client
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from meshkit.daemon import Daemon, Lifecycle, Resolved, bind, bound_address
from meshkit.edge.conversation_hub import ConversationHub, HubMetrics, HubSettings
from meshkit.edge.sse_format import framer_for
from meshkit.edge.token_contract import CONVERSATION_ID, DEFAULT_STREAM, TokenMessage, is_conversation_id
from meshkit.edge.viewer import Viewer, ViewerClock, ViewerCut, pump
from meshkit.errors import DependencyError, error_body
from meshkit.options import option, parse_host_port, parse_non_negative_int, parse_seconds

log = logging.getLogger("meshkit.edge.sse")

MAX_LAST_EVENT_ID = (1 << 63) - 1


@dataclass(frozen=True)
class SseOptions:
    listen: str = option(
        "127.0.0.1:8080",
        "HOST:PORT for GET /stream/{id} (port 0: any free port)",
        parse=parse_host_port,
        metavar="HOST:PORT",
    )
    nats: str = option(
        "nats://127.0.0.1:4222",
        "NATS server URL(s), comma-separated (the edge leaf; may hold credentials: never logged)",
        metavar="URL",
        secret=True,
    )
    js_domain: str = option("", "JetStream domain of the origin (a leaf's clients reach it only so)")
    stream: str = option(DEFAULT_STREAM, "JetStream stream holding chat.*.tokens")
    heartbeat: float = option(
        15.0, "seconds without an event before a `: hb` comment", parse=parse_seconds, metavar="SECONDS"
    )
    max_connections: int = option(10_000, "open streams at most (beyond: 503)", parse=parse_non_negative_int)
    client_queue: int = option(
        1024, "live tokens a viewer may be behind before it is cut off", parse=parse_non_negative_int
    )
    history: int = option(
        1024,
        "tokens kept in memory per subscribed conversation (older ones are replayed from JetStream)",
        parse=parse_non_negative_int,
    )
    gap_timeout: float = option(
        1.0,
        "seconds a gap in sequences may stay open before JetStream is asked and it is skipped (reset)",
        parse=parse_seconds,
        metavar="SECONDS",
    )
    consumer_heartbeat: float = option(
        2.0,
        "idle heartbeat of each conversation's ordered consumer (a dead one is re-created after 2 missed)",
        parse=parse_seconds,
        metavar="SECONDS",
    )
    nats_timeout: float = option(
        5.0,
        "seconds one JetStream request (subscribe, replay) may take",
        parse=parse_seconds,
        metavar="SECONDS",
    )
    retry_ms: int = option(
        1000, "the `retry:` hint sent first on every stream (ms)", parse=parse_non_negative_int
    )
    reconnect_retry_ms: int = option(
        250, "the `retry:` sent with `event: reconnect` at shutdown (ms)", parse=parse_non_negative_int
    )
    default_model: str = option("meshkit", "`model` of ?format=openai chunks when the message has none")
    ready_interval: float = option(
        2.0,
        "seconds between two checks that the stream answers through NATS (/readyz)",
        parse=parse_seconds,
        metavar="SECONDS",
    )
    write_timeout: float = option(
        30.0,
        "seconds one write to a client may block (a client that stopped reading) before it is cut off",
        parse=parse_seconds,
        metavar="SECONDS",
    )

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_connections", "client_queue", "history"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')}: must be at least 1")
        for name in ("heartbeat", "consumer_heartbeat", "nats_timeout", "write_timeout", "ready_interval"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')}: must be more than 0 seconds")
        if not self.stream or any(c in self.stream for c in ".*> "):
            problems.append(f"--stream {self.stream!r}: a JetStream stream name (no dots, *, > or spaces)")
        if not [u for u in self.nats.split(",") if u.strip()]:
            problems.append("--nats: at least one URL")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class SseMetrics:
    open_streams: Gauge
    tokens_delivered: Counter
    latency: Histogram
    resets: Counter
    requests: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> SseMetrics:
        return cls(
            Gauge("meshkit_sse_open_streams", "Streams open now", registry=registry),
            Counter("meshkit_sse_tokens_delivered", "Token messages written to viewers", registry=registry),
            Histogram(
                "meshkit_sse_delivery_latency_seconds",
                "From the message's ts (publish) to its write to a viewer",
                buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
                registry=registry,
            ),
            Counter("meshkit_sse_resets", "event: reset sent (sequences gone)", registry=registry),
            Counter("meshkit_sse_requests", "Requests answered, by result", ["result"], registry=registry),
        )


@dataclass
class Adapter:
    """What the handlers share: options, the hub (set at start), metrics, the open-stream count."""

    opts: SseOptions
    metrics: SseMetrics
    hub: ConversationHub | None = None
    open_streams: int = 0
    closing: bool = False

    def the_hub(self) -> ConversationHub:
        assert self.hub is not None, "the hub starts before the listener"
        return self.hub

    def delivered(self, message: TokenMessage) -> None:
        self.metrics.tokens_delivered.inc()
        if message.ts is not None:
            self.metrics.latency.observe(max(0.0, time.time() - message.ts))


ADAPTER = web.AppKey("adapter", Adapter)


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=error_body(kind, message), content_type="application/json", headers=headers
    )


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    requests = request.app[ADAPTER].metrics.requests
    try:
        return await handler(request)
    except web.HTTPNotFound:
        requests.labels("not_found").inc()
        return _error(404, "not_found", f"no such path: {request.path} (GET /stream/{{conversation_id}})")
    except web.HTTPMethodNotAllowed:
        requests.labels("method_not_allowed").inc()
        return _error(405, "method_not_allowed", f"{request.method}: only GET", {"Allow": "GET"})
    except web.HTTPException as exc:
        return _error(exc.status, "http_error", exc.reason)
    except Exception:  # a bug: its traceback in the log, a JSON 500 to the client (before the stream)
        log.exception("GET %s failed", request.path)
        requests.labels("error").inc()
        return _error(500, "server_error", "internal error (logged)")


def _last_event_id(request: web.Request) -> int | None:
    """The sequence the client has, from `Last-Event-ID` or `?last_event_id=`; ValueError if bad."""
    given = request.headers.get("Last-Event-ID")
    where = "Last-Event-ID"
    if given is None or not given.strip():
        given, where = request.query.get("last_event_id"), "last_event_id"
    if given is None or not given.strip():
        return None
    text = given.strip()
    if not text.isdigit() or int(text) > MAX_LAST_EVENT_ID:
        raise ValueError(f"{where} must be a token sequence (a non-negative integer), not {given[:40]!r}")
    return int(text)


async def _stream(request: web.Request) -> web.StreamResponse:
    adapter = request.app[ADAPTER]
    opts, metrics = adapter.opts, adapter.metrics
    cid = request.match_info["conversation_id"]
    if not is_conversation_id(cid):
        metrics.requests.labels("bad_request").inc()
        shown = cid if len(cid) <= 64 else cid[:64] + "..."
        return _error(
            400, "invalid_request_error", f"conversation id {shown!r} must match {CONVERSATION_ID.pattern}"
        )
    try:
        last = _last_event_id(request)
        framer = framer_for(
            request.query.get("format", "sse"), cid, retry_ms=opts.retry_ms, default_model=opts.default_model
        )
    except ValueError as exc:
        metrics.requests.labels("bad_request").inc()
        return _error(400, "invalid_request_error", str(exc))
    if adapter.closing:
        metrics.requests.labels("shutting_down").inc()
        return _error(503, "unavailable", "shutting down: reconnect", {"Retry-After": "1"})
    if adapter.open_streams >= opts.max_connections:
        metrics.requests.labels("over_capacity").inc()
        return _error(
            503,
            "over_capacity",
            f"{opts.max_connections} streams open (--max-connections)",
            {"Retry-After": "1"},
        )
    hub = adapter.the_hub()
    transport = request.transport
    viewer = Viewer(
        cid, None if last is None else last + 1, abort=transport.abort if transport else lambda: None
    )
    adapter.open_streams += 1
    metrics.open_streams.inc()
    conv = None
    response: web.StreamResponse | None = None
    try:
        try:
            conv = await hub.join(cid, viewer)
        except DependencyError as exc:
            metrics.requests.labels("unavailable").inc()
            return _error(503, "unavailable", exc.message, {"Retry-After": str(exc.retry_after)})
        metrics.requests.labels("ok").inc()
        stream = response = web.StreamResponse(
            headers={
                "Content-Type": framer.content_type,
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await stream.prepare(request)

        async def write(data: bytes) -> None:
            """A write the ViewerClock watches: blocked past --write-timeout, the viewer is cut off."""
            viewer.writing_since = time.monotonic()
            try:
                await stream.write(data)
            finally:
                viewer.writing_since = None

        try:
            await write(framer.preamble())
            ended = await pump(
                viewer,
                conv.log,
                framer,
                write,
                replay=hub.replay,
                heartbeat=opts.heartbeat,
                retry_ms=opts.reconnect_retry_ms,
                delivered=adapter.delivered,
                reset=metrics.resets.inc,
            )
        except DependencyError as exc:
            log.warning("stream %s: %s", cid, exc)
            with contextlib.suppress(ViewerCut, ConnectionError):
                await write(b"event: error\ndata: " + error_body("unavailable", exc.message) + b"\n\n")
            ended = "error"
        except (ViewerCut, ConnectionError, asyncio.CancelledError):
            raise
        except Exception:  # a bug, once the stream has started: event: error, then the end
            log.exception("stream %s failed", cid)
            body = error_body("server_error", "internal error (logged)")
            with contextlib.suppress(ViewerCut, ConnectionError):
                await write(b"event: error\ndata: " + body + b"\n\n")
            ended = "error"
        log.debug("stream %s ended: %s", cid, ended)
        with contextlib.suppress(ConnectionError):
            await stream.write_eof()
        return stream
    except (ViewerCut, ConnectionError):  # cut off, or the client went away: nothing more to write
        return response if response is not None else web.Response(status=499)
    finally:
        if conv is not None:
            hub.leave(conv, viewer)
        adapter.open_streams -= 1
        metrics.open_streams.dec()


def sse_app(adapter: Adapter) -> web.Application:
    app = web.Application(middlewares=[_json_errors])
    app[ADAPTER] = adapter
    app.router.add_get("/stream/{conversation_id}", _stream, allow_head=False)

    async def on_shutdown(_: web.Application) -> None:
        # The listener no longer accepts: every open stream is told to reconnect (elsewhere) and ends.
        adapter.closing = True
        if adapter.hub is not None:
            told = adapter.hub.close_viewers()
            if told:
                log.info("told %d open stream(s) to reconnect", told)

    app.on_shutdown.append(on_shutdown)
    return app


class _StreamListener:
    """The stream app on its socket, with handler cancellation: a client that goes away cancels its
    handler at once (its viewer leaves, the subscription with the last one), instead of being noticed
    at the next write. (`Lifecycle.serve_app` has no such switch.)"""

    def __init__(self, runner: web.AppRunner) -> None:
        self._runner = runner

    async def stop(self, grace: float) -> None:
        self._runner._shutdown_timeout = grace  # as meshkit.daemon's listener: aiohttp reads it in cleanup()
        await self._runner.cleanup()


async def _serve_streams(life: Lifecycle, address: str, app: web.Application) -> str:
    sock = bind(address, what="--listen")
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
    except BaseException:
        await runner.cleanup()
        sock.close()
        raise
    bound = bound_address(address, sock)
    life.add_listener("http", bound, _StreamListener(runner))
    return bound


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

    def _set(self, ready: bool, reason: str) -> None:
        if not self.draining:
            self.life.readiness.set(ready, reason)

    async def connect(self) -> None:
        async def disconnected() -> None:
            if self.draining:
                return
            log.warning("NATS connection lost: not ready until it is back")
            self._ok = False
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
        """Until the stream exists (the bridge creates it); the lifecycle bounds it (--start-timeout)."""
        said = False
        while True:
            try:
                await self.js().stream_info(self.opts.stream)
                return
            except NotFoundError:
                if not said:
                    log.warning(
                        "stream %s does not exist yet (meshkit bridge creates it): waiting", self.opts.stream
                    )
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
                        await self.js().stream_info(self.opts.stream)
                    problem = None
                except Exception as exc:
                    problem = exc
                if (problem is None) != self._ok:
                    if problem is None:
                        log.info("stream %s reachable again: ready", self.opts.stream)
                    else:
                        log.warning("stream %s not reachable: not ready (%r)", self.opts.stream, problem)
                self._ok = problem is None
                self._set(self._ok, "serving" if self._ok else f"stream {self.opts.stream} not reachable")
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
    conn = _Nats(opts, life)
    await life.start("nats", conn.connect, conn.close)
    await life.start(f"stream {opts.stream}", conn.wait_for_stream)
    settings = HubSettings(
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

    hub = ConversationHub(conn.js(), settings, HubMetrics.create(life.registry), on_cut=on_cut)

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

    async def draining() -> None:
        conn.draining = True

    life.on_draining(draining)
    await _serve_streams(life, opts.listen, sse_app(adapter))
    await life.start("readiness checks", conn.start_checks, conn.stop_checks)


def _sections() -> list[type[Any]]:
    return [SseOptions]


DAEMON = Daemon(
    name="sse",
    help="the SSE adapter: conversations' tokens from JetStream (a NATS leaf) as resumable SSE",
    sections=_sections,
    serve=serve,
)
