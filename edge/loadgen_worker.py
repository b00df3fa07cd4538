"""One load-generator worker process: `python -m meshkit.edge.loadgen_worker`, driven over stdin/stdout.

The coordinator (`meshkit.edge.loadgen`) starts P of these (subprocesses of the same interpreter, not
multiprocessing: nothing of the parent's `__main__` is re-imported) and speaks JSON lines:

    -> {"viewers": [[conversation_id, url], ...], "ws": false, "connect_timeout": 30, "index": 0}
    <- {"type": "connected", "open": n, "failed": n}          once every viewer is open or has failed,
                                                              or connect_timeout passed
    <- {"type": "progress", "delivered": n, "open": n, "lag_max_us": n, "cpu_percent": x}   every second
    -> {"type": "measure"}                                    publishing starts: loop lag and CPU are
                                                              measured from here (not the connect burst)
    -> {"type": "end", "ranges": {conversation_id: [first, last]}, "drain_timeout": 5}
    <- {"type": "result", ...}                                then exit 0

The worker waits after `end` until every viewer saw its conversation's end or `drain_timeout` passed,
cancels the rest (outcome `open`), and sends its tallies, the outcome counts, a few error samples and
its histograms (latency and loop lag, `Histogram.to_wire`) for the coordinator to merge. End of stdin
(the coordinator died or gave up) cancels everything and exits 1. The worker raises its own
RLIMIT_NOFILE soft limit and measures its own loop lag and CPU: its saturation is reported per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import aiohttp

from meshkit.edge.loadgen_resources import LoopLagMonitor, raise_nofile_limit
from meshkit.edge.loadgen_stats import Tally
from meshkit.edge.loadgen_viewers import OUTCOMES, ViewerState, WorkerCounters, run_sse_viewer, run_ws_viewer

__all__ = ["event_loop_name", "main", "run_on_fast_loop"]

T = TypeVar("T")

CONNECT_GATE = 256  # connections being opened at once, per worker
PROGRESS_INTERVAL = 1.0
ERROR_SAMPLES = 5


def _send(message: dict[str, Any]) -> None:
    sys.stdout.buffer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
    sys.stdout.buffer.flush()


async def _stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 << 20)  # the `end` line lists every conversation's range
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _read_command(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    line = await reader.readline()
    if not line:
        return None
    value = json.loads(line)
    return value if isinstance(value, dict) else None


async def run(reader: asyncio.StreamReader) -> int:
    spec = await _read_command(reader)
    if spec is None:
        return 1
    raise_nofile_limit()
    monitor = LoopLagMonitor()
    monitor.start()
    counters = WorkerCounters()
    states = [ViewerState(cid, url) for cid, url in spec["viewers"]]
    viewer = run_ws_viewer if spec.get("ws") else run_sse_viewer
    gate = asyncio.Semaphore(CONNECT_GATE)
    connector = aiohttp.TCPConnector(limit=0, force_close=True, enable_cleanup_closed=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=float(spec["connect_timeout"]))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        counters.unsettled = len(states)
        tasks = []
        for s in states:
            task = asyncio.create_task(viewer(session, s, counters, gate))
            task.add_done_callback(_settle_if_failed(s, counters))
            tasks.append(task)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(counters.settled.wait(), float(spec["connect_timeout"]))
        _send(
            {
                "type": "connected",
                "open": sum(s.opened for s in states),
                "failed": sum(1 for s, t in zip(states, tasks, strict=True) if t.done() and not s.opened),
            }
        )
        progress = asyncio.create_task(_progress(counters, monitor))
        try:
            command = await _read_command(reader)
            while command is not None and command.get("type") == "measure":
                monitor.reset()  # the measured window starts: the connection burst is not in it
                command = await _read_command(reader)
            if command is None or command.get("type") != "end":
                return 1
            pending = [t for t in tasks if not t.done()]
            if pending:
                await asyncio.wait(pending, timeout=float(command["drain_timeout"]))
        finally:
            progress.cancel()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(asyncio.CancelledError):
                await progress
    await monitor.stop()
    _send(_result(spec, states, counters, monitor, command["ranges"]))
    return 0


def _settle_if_failed(state: ViewerState, counters: WorkerCounters) -> Callable[[asyncio.Task[None]], None]:
    def done(_: asyncio.Task[None]) -> None:
        if not state.opened:  # an opened viewer settled when it opened
            counters.settle_one()

    return done


async def _progress(counters: WorkerCounters, monitor: LoopLagMonitor) -> None:
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL)
        lag, cpu = monitor.take_recent()
        _send(
            {
                "type": "progress",
                "delivered": counters.delivered,
                "open": counters.open_streams,
                "lag_max_us": lag,
                "cpu_percent": round(cpu, 1),
            }
        )


def _result(
    spec: dict[str, Any],
    states: list[ViewerState],
    counters: WorkerCounters,
    monitor: LoopLagMonitor,
    ranges: dict[str, list[int]],
) -> dict[str, Any]:
    total = Tally()
    incomplete = 0
    outcomes = dict.fromkeys(OUTCOMES, 0)
    errors: list[str] = []
    for s in states:
        first, last = ranges.get(s.conversation_id, (1, 0))
        t = s.tracker.tally(first, last)
        total.add(t)
        incomplete += not t.complete
        outcomes[s.outcome] += 1
        if s.error and len(errors) < ERROR_SAMPLES:
            errors.append(f"{s.url}: {s.outcome}: {s.error}")
    return {
        "type": "result",
        "index": spec.get("index", 0),
        "pid": os.getpid(),
        "viewers": len(states),
        "tally": total.as_dict(),
        "incomplete_viewers": incomplete,
        "outcomes": outcomes,
        "unparsable": counters.unparsable,
        "events": counters.events,
        "error_samples": errors,
        "latency_us": counters.latency_us.to_wire(),
        "loop_lag_us": monitor.lag_us.to_wire(),
        "cpu_percent": round(monitor.cpu_percent(), 1),
        "peak_cpu_percent": round(monitor.peak_cpu_percent, 1),
    }


def event_loop_name() -> str:
    """`uvloop` when the `fast` extra is installed (every generator process runs on it), else `asyncio`."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run_on_fast_loop(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, on uvloop when it is installed."""
    if event_loop_name() == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def main() -> int:
    async def go() -> int:
        return await run(await _stdin_lines())

    try:
        return run_on_fast_loop(go())
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
