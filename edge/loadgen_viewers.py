"""The load generator's viewers: one SSE (aiohttp streaming + `SseParser`) or WebSocket stream each.

A viewer opens its URL, reports itself open once the response headers (SSE, status 200) or the
WebSocket handshake arrived, then reads until it sees the end of its conversation: a message whose JSON
says `"done": true`, or an SSE `event: done`. Every SSE event's `data` (every WebSocket text frame) is
read as a token message: its `sequence` goes to the viewer's `SequenceTracker` and its `ts` gives the
publish->receive latency (recorded in the worker's shared `Histogram`, µs). The target's own event ids
are not used (nchan's are `<time>:<n>`, not our sequence).

How a viewer ends, in `ViewerState.outcome`:
- `done`: it saw the end;
- `refused`: the connection failed (refused, reset during the handshake, timed out);
- `rejected`: the target answered with another status than 200 (or refused the WebSocket upgrade);
- `disconnected`: the stream ended or broke before the end (a broken target: the tokens it did not
  get are then counted as missing, never a crash);
- `open`: still streaming when the drain deadline passed (cancelled by the worker).

Other named events (`reset`, `error`, `reauth`, ...) are counted by name; data that is not a token
message is counted as `unparsable`.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp

from meshkit.edge.loadgen_sse_parser import SseParser
from meshkit.edge.loadgen_stats import Histogram, SequenceTracker

__all__ = ["ViewerState", "WorkerCounters", "run_sse_viewer", "run_ws_viewer"]

OUTCOMES = ("done", "refused", "rejected", "disconnected", "open")


@dataclass
class WorkerCounters:
    """What all viewers of one worker process share: the latency histogram and running totals."""

    latency_us: Histogram = field(default_factory=Histogram)
    delivered: int = 0  # messages received (for the progress line)
    open_streams: int = 0
    unparsable: int = 0
    events: dict[str, int] = field(default_factory=dict)  # other named SSE events
    unsettled: int = 0  # viewers neither open nor failed yet
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # set once unsettled reaches 0

    def settle_one(self) -> None:
        self.unsettled -= 1
        if self.unsettled <= 0:
            self.settled.set()


@dataclass
class ViewerState:
    conversation_id: str
    url: str
    tracker: SequenceTracker = field(default_factory=SequenceTracker)
    outcome: str = "open"
    opened: bool = False
    error: str | None = None


def _handle(state: ViewerState, counters: WorkerCounters, data: str, event: str, now: float) -> bool:
    """One message; True when it ends the conversation."""
    counters.delivered += 1
    try:
        msg = json.loads(data)
    except ValueError:
        msg = None
    if not isinstance(msg, dict):
        counters.unparsable += 1
        return event == "done"
    seq = msg.get("sequence")
    if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0:
        state.tracker.receive(seq)
    else:
        counters.unparsable += 1
    ts = msg.get("ts")
    if isinstance(ts, int | float) and not isinstance(ts, bool):
        counters.latency_us.record(int((now - ts) * 1e6))
    return msg.get("done") is True or event == "done"


def _opened(state: ViewerState, counters: WorkerCounters) -> None:
    state.opened = True
    counters.open_streams += 1
    counters.settle_one()


def _closed(state: ViewerState, counters: WorkerCounters) -> None:
    if state.opened:
        counters.open_streams -= 1


async def run_sse_viewer(
    session: aiohttp.ClientSession, state: ViewerState, counters: WorkerCounters, gate: asyncio.Semaphore
) -> None:
    """Read one SSE stream to its end (see the module docstring); never raises but CancelledError.
    `gate` bounds how many connections are being opened at once (a burst of 10,000 SYNs overflows a
    listen backlog); it is held until the response headers arrived."""
    parser = SseParser()
    try:
        await gate.acquire()
        try:
            resp = await session.get(
                state.url, headers={"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            )
        finally:
            gate.release()
        async with resp:
            if resp.status != 200:
                state.outcome, state.error = "rejected", f"status {resp.status}"
                return
            _opened(state, counters)
            try:
                async for chunk in resp.content.iter_any():
                    now = time.time()
                    for ev in parser.feed(chunk):
                        if ev.event not in ("message", "token", "done"):
                            counters.events[ev.event] = counters.events.get(ev.event, 0) + 1
                            continue
                        if _handle(state, counters, ev.data, ev.event, now):
                            state.outcome = "done"
                            return
                state.outcome, state.error = "disconnected", "the stream ended before done"
            finally:
                _closed(state, counters)
    except ValueError as exc:  # the parser's endless line
        state.outcome, state.error = "disconnected", str(exc)
    except (aiohttp.ClientConnectorError, aiohttp.ServerTimeoutError, TimeoutError) as exc:
        state.outcome = "disconnected" if state.opened else "refused"
        state.error = repr(exc)
    except aiohttp.ClientError as exc:  # payload errors, server disconnects, resets
        state.outcome = "disconnected" if state.opened else "refused"
        state.error = repr(exc)


async def run_ws_viewer(
    session: aiohttp.ClientSession, state: ViewerState, counters: WorkerCounters, gate: asyncio.Semaphore
) -> None:
    """Read one WebSocket stream (JSON text frames) to its end; never raises but CancelledError."""
    try:
        await gate.acquire()
        try:
            ws = await session.ws_connect(state.url, autoping=True, heartbeat=None)
        finally:
            gate.release()
        async with ws:
            _opened(state, counters)
            try:
                async for msg in ws:
                    now = time.time()
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        data = msg.data
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        data = msg.data.decode("utf-8", "replace")
                    else:
                        break
                    if _handle(state, counters, data, "message", now):
                        state.outcome = "done"
                        return
                state.outcome, state.error = "disconnected", "the WebSocket closed before done"
            finally:
                _closed(state, counters)
    except aiohttp.WSServerHandshakeError as exc:
        state.outcome, state.error = "rejected", f"status {exc.status}"
    except (aiohttp.ClientConnectorError, aiohttp.ServerTimeoutError, TimeoutError) as exc:
        state.outcome = "disconnected" if state.opened else "refused"
        state.error = repr(exc)
    except aiohttp.ClientError as exc:
        state.outcome = "disconnected" if state.opened else "refused"
        state.error = repr(exc)
