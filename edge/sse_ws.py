"""`GET /ws/{conversation_id}`: the same stream as `/stream/{id}`, over a WebSocket (JSON text frames).

    websocat 'ws://localhost:8080/ws/c1?last_event_id=41'
    {"event":"token","id":42,"data":{"conversation_id":"c1","token":"Hel","sequence":42,"done":false}}

The frames are `sse_format.WsFramer`'s (token, done, reset, blocked, reauth, reconnect, error); the
feeding is the SSE stream's own (`viewer.pump`, the hub, the lag bound, `--write-timeout`,
`--max-connections`, graceful shutdown): only the framer and the write differ.

Before the upgrade, as plain HTTP with a JSON body: 426 (`Upgrade: websocket`) for a GET that is not
a WebSocket handshake; 403 for an `Origin` that `--cors-origin` does not allow (see `sse_cors.py`);
then what `/stream` answers (`sse_streams.admit`: 400 id / `last_event_id` / `?format=` (none
here), 401/403 auth, 503) and a 503 when the subscription cannot be made. Resume with
`?last_event_id=N` (or a `Last-Event-ID` header, for non-browser clients).

After it:
- every `--ws-ping` s the server pings with an 8-byte counter; the pong's round trip goes into
  `meshkit_sse_ws_rtt_seconds`. A ping unanswered (or not even written: a client that stopped
  reading) within `--ws-pong-timeout` (default `--ws-ping`) closes the client (counted in
  `meshkit_sse_ws_pong_timeouts_total`, logged): it can resume. A client's own pings are answered.
- the client sends nothing else; a text or binary frame from it is ignored, a frame over 4 KiB
  closes it (1009, aiohttp's limit).
- the end: `done` -> close 1000; `reauth` (the token expired) -> 1008 (policy violation); shutdown
  (`reconnect`) -> 1012 (service restart); `error` -> 1011; a slow client (past `--client-queue`,
  or a write blocked past `--write-timeout`) or a missed pong -> the connection is dropped without a
  close frame (as the SSE stream's, it is cut off; it may resume). A client that closes or goes away
  ends its stream at once (the viewer leaves the hub).
- permessage-deflate is off (small frames; compression would cost CPU per token per viewer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time

from aiohttp import WSCloseCode, WSMsgType, web

from meshkit.edge.sse_cors import CORS
from meshkit.edge.sse_format import WsFramer
from meshkit.edge.sse_streams import ADAPTER, Adapter, admit, json_error, watching
from meshkit.edge.viewer import Viewer, ViewerCut, pump
from meshkit.errors import DependencyError, error_body

__all__ = ["websocket_stream"]

log = logging.getLogger("meshkit.edge.sse")

MAX_CLIENT_FRAME = 4096
CLOSE_CODES = {
    "done": WSCloseCode.OK,
    "end": WSCloseCode.OK,
    "reauth": WSCloseCode.POLICY_VIOLATION,
    "reconnect": WSCloseCode.SERVICE_RESTART,
    "error": WSCloseCode.INTERNAL_ERROR,
}


class _Pings:
    """The server's pings on one WebSocket and the pongs that answer them."""

    def __init__(self, ws: web.WebSocketResponse, adapter: Adapter, viewer: Viewer) -> None:
        self._ws, self._adapter, self._viewer = ws, adapter, viewer
        self._count = 0
        self._waiting: tuple[bytes, float] | None = None
        self._answered = asyncio.Event()

    def pong(self, payload: bytes) -> None:
        if self._waiting is not None and payload == self._waiting[0]:
            self._adapter.metrics.ws_rtt.observe(time.monotonic() - self._waiting[1])
            self._waiting = None
            self._answered.set()

    async def run(self) -> None:
        opts = self._adapter.opts
        while True:
            await asyncio.sleep(opts.ws_ping)
            self._count += 1
            payload = struct.pack("!Q", self._count)
            self._answered.clear()
            self._waiting = (payload, time.monotonic())
            try:
                async with asyncio.timeout(opts.pong_timeout):
                    await self._ws.ping(payload)
                    await self._answered.wait()
            except TimeoutError:
                self._adapter.metrics.ws_pong_timeouts.inc()
                reason = f"no pong within {opts.pong_timeout:g} s (--ws-pong-timeout)"
                log.warning("ws %s: closed: %s", self._viewer.conversation_id, reason)
                self._viewer.cut(reason)
                return


async def _read(ws: web.WebSocketResponse, pings: _Pings) -> str:
    """The client's side until it closes: pongs, pings answered, anything else ignored."""
    while True:
        msg = await ws.receive()
        if msg.type == WSMsgType.PONG:
            pings.pong(msg.data)
        elif msg.type == WSMsgType.PING:
            with contextlib.suppress(ConnectionError):
                await ws.pong(msg.data)
        elif msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            continue
        else:  # CLOSE, CLOSING, CLOSED, ERROR: the client went away or closed
            return "client closed" if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING) else "connection lost"


async def websocket_stream(request: web.Request) -> web.StreamResponse:
    adapter = request.app[ADAPTER]
    opts, metrics = adapter.opts, adapter.metrics
    ws = web.WebSocketResponse(
        autoping=False, autoclose=True, compress=False, max_msg_size=MAX_CLIENT_FRAME, timeout=2.0
    )
    if not ws.can_prepare(request).ok:
        metrics.requests.labels("bad_request").inc()
        return json_error(
            426,
            "invalid_request_error",
            "GET /ws/{id} is a WebSocket: send the upgrade handshake (or use GET /stream/{id} for SSE)",
            {"Upgrade": "websocket", "Connection": "Upgrade"},
        )
    if not request.app[CORS].ws_allows(request.headers.get("Origin")):
        metrics.requests.labels("forbidden").inc()
        return json_error(403, "forbidden", "WebSocket from an origin --cors-origin does not allow")

    def check() -> None:
        if request.query.get("format", "") not in ("", "json"):
            raise ValueError("/ws sends JSON frames only: no ?format= (use /stream/{id}?format=openai)")

    admission = await admit(request, adapter, check)
    if isinstance(admission, web.Response):
        return admission
    cid = admission.conversation_id
    framer = WsFramer()
    hub = adapter.the_hub()

    def abort() -> None:
        transport = request.transport
        if transport is not None:
            transport.abort()

    try:
        async with watching(adapter, admission, abort) as (viewer, conv):
            metrics.requests.labels("ok").inc()
            await ws.prepare(request)

            async def write(data: bytes) -> None:
                for line in data.split(b"\n"):
                    if line:
                        await ws.send_frame(line, WSMsgType.TEXT)

            pings = _Pings(ws, adapter, viewer)
            feeding = asyncio.ensure_future(
                pump(
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
            )
            reading = asyncio.ensure_future(_read(ws, pings))
            pinging = asyncio.ensure_future(pings.run())
            try:
                await asyncio.wait({feeding, reading}, return_when=asyncio.FIRST_COMPLETED)
                fed = feeding.done()
            finally:
                for task in (reading, pinging) if feeding.done() else (feeding, reading, pinging):
                    task.cancel()
                await asyncio.gather(feeding, reading, pinging, return_exceptions=True)
            if not fed:  # the client closed or went away first
                log.debug("ws %s ended: the client left", cid)
                return ws
            ended = await _ending(ws, feeding, cid)
            if ended == "reauth":
                metrics.reauths.inc()
                log.info("ws %s: its token expired: reauth sent after id %d", cid, viewer.last_sent)
            log.debug("ws %s ended: %s", cid, ended)
            if ended in CLOSE_CODES:
                with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
                    await ws.close(code=CLOSE_CODES[ended], message=ended.encode())
            return ws
    except DependencyError as exc:  # the subscription could not be made: before the upgrade
        metrics.requests.labels("unavailable").inc()
        return json_error(503, "unavailable", exc.message, {"Retry-After": str(exc.retry_after)})


async def _ending(ws: web.WebSocketResponse, feeding: asyncio.Future[str], cid: str) -> str:
    """How the pump ended: its result, or the error frame sent for what it raised."""
    exc = feeding.exception()
    if exc is None:
        return feeding.result()
    if isinstance(exc, ViewerCut | ConnectionError):
        return "cut"
    if isinstance(exc, DependencyError):
        log.warning("ws %s: %s", cid, exc)
        body = error_body("unavailable", exc.message)
    else:  # a bug, once the stream has started: an error frame, then the end
        log.error("ws %s failed", cid, exc_info=exc)
        body = error_body("server_error", "internal error (logged)")
    with contextlib.suppress(ConnectionError):
        await ws.send_frame(WsFramer.error(body).rstrip(b"\n"), WSMsgType.TEXT)
    return "error"
