"""`meshkit loadgen`: token-streaming load against an SSE fan-out (meshkit sse, or nginx + nchan), measured.

    meshkit loadgen --target sse|nchan --url BASE [--publish nats|redis-pubsub|redis-stream|nchan]
        [--nats URL] [--redis URL] --conversations N --viewers M --rate TOKENS_PER_S --duration S
        [--processes P] [--ws] [--json FILE] [--target-pid PID ...]

What a run does, in order:

1. raises RLIMIT_NOFILE's soft limit to the hard limit and refuses (exit 2, one message) a run whose
   N x M streams cannot be opened: descriptors per worker process, ephemeral ports per address:port;
2. starts P worker processes (`meshkit.edge.loadgen_worker`), the N x M viewers spread over them
   round-robin, and waits (bounded by `--connect-timeout`) until every stream is open or has failed:
   SSE on `<url>/stream/<id>` for `--target sse`, `<url>/sub/<id>` for `--target nchan`; `--ws` opens
   `/ws/<id>` (nchan: `/sub/<id>` upgraded) instead;
3. publishes `--rate` tokens per second in total for `--duration` seconds, round-robin over the N
   conversations (sequences from 1; the message's `ts` is the publish time), then one `done` message
   per conversation (its sequence is the last + 1) at the same pace (all at once would be a burst the
   generator measures itself with) — all in the contract's JSON;
4. tells the workers which range each conversation got and waits (`--drain-timeout`) for every viewer to
   see its `done`; then merges the workers' counts and latency histograms.

Meanwhile a progress line goes to stderr once a second (elapsed, published, delivered/s, open streams,
the worst loop lag of any generator process). The end: a table on stdout, and with `--json FILE` every
number (config, streams, messages, latency, errors, generator processes and verdict, target CPU/RSS,
the per-second timeline).

The generator measures itself: every process samples its event-loop lag every 100 ms and its CPU, from
the moment publishing starts (the burst of opening connections is not part of the measured window); the
verdict says when the generator was the limit (`loadgen_report.verdict`). With `--target-pid` (repeatable)
the target's processes and their children are sampled every second from /proc: CPU % of one core over
the publishing window, RSS, RSS per open stream.

Exit status (decision): 0 when every viewer got every token once and in order; 3 when the run completed
but some did not (the table and the JSON say what); 2 for bad options; 1 when a publisher could not
connect or a worker died.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from meshkit.edge.loadgen_publishers import DEFAULT_STREAM_KEY, PUBLISHERS, Message, Publisher, make_publisher
from meshkit.edge.loadgen_report import merge_results, render_table, verdict, write_json
from meshkit.edge.loadgen_resources import (
    LoopLagMonitor,
    ProcessSampler,
    Sample,
    capacity_problems,
    ephemeral_ports,
    raise_nofile_limit,
)
from meshkit.edge.loadgen_stats import Histogram
from meshkit.edge.loadgen_worker import event_loop_name, run_on_fast_loop
from meshkit.edge.token_contract import is_conversation_id
from meshkit.errors import ConfigError, MeshkitError

__all__ = ["TARGETS", "LoadgenOptions", "add_arguments", "run", "run_loadgen"]

TARGETS = ("sse", "nchan")
DEFAULT_PUBLISH = {"sse": "nats", "nchan": "nchan"}
TICK = 0.005  # the scheduler's shortest sleep
PROGRESS_INTERVAL = 1.0
WORKER_EXIT_TIMEOUT = 10.0


@dataclass(frozen=True)
class LoadgenOptions:
    target: str
    url: str
    conversations: int = 10
    viewers: int = 1
    rate: float = 100.0
    duration: float = 10.0
    publish: str | None = None  # None: the target's default (DEFAULT_PUBLISH)
    pub_url: str | None = None
    nats: str | None = None
    redis: str | None = None
    stream_key: str = DEFAULT_STREAM_KEY
    processes: int = 1
    ws: bool = False
    json_file: Path | None = None
    target_pids: tuple[int, ...] = ()
    connect_timeout: float = 30.0
    drain_timeout: float = 5.0
    settle: float = 0.5
    progress: bool = True

    @property
    def publisher(self) -> str:
        return self.publish or DEFAULT_PUBLISH[self.target]

    @property
    def streams(self) -> int:
        return self.conversations * self.viewers

    def problems(self) -> list[str]:
        out = []
        if self.target not in TARGETS:
            out.append(f"--target {self.target!r}: allowed: {', '.join(TARGETS)}")
        if not self.url.startswith(("http://", "https://")):
            out.append(f"--url {self.url!r}: expected http://HOST:PORT of the target")
        if self.publish is not None and self.publish not in PUBLISHERS:
            out.append(f"--publish {self.publish!r}: allowed: {', '.join(PUBLISHERS)}")
        for name in ("conversations", "viewers", "processes"):
            if getattr(self, name) < 1:
                out.append(f"--{name} {getattr(self, name)}: must be 1 or more")
        if not (math.isfinite(self.rate) and self.rate > 0):
            out.append(f"--rate {self.rate}: must be a positive number of tokens per second")
        if not (math.isfinite(self.duration) and self.duration > 0):
            out.append(f"--duration {self.duration}: must be a positive number of seconds")
        for name in ("connect_timeout", "drain_timeout"):
            if not getattr(self, name) > 0:
                out.append(f"--{name.replace('_', '-')}: must be a positive number of seconds")
        if self.settle < 0:
            out.append("--settle: must be 0 or more seconds")
        if self.target in TARGETS and (self.publish is None or self.publish in PUBLISHERS):
            if self.publisher == "nats" and not self.nats:
                out.append("--publish nats needs --nats URL")
            if self.publisher.startswith("redis") and not self.redis:
                out.append(f"--publish {self.publisher} needs --redis URL")
        if any(p <= 0 for p in self.target_pids):
            out.append("--target-pid: expected process ids (positive integers)")
        return out


# -- the command line ------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(str(text).removesuffix("s"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, choices=TARGETS, help="what serves the streams")
    parser.add_argument(
        "--url", required=True, metavar="BASE", help="the target's base URL, http://HOST:PORT"
    )
    parser.add_argument(
        "--publish",
        choices=PUBLISHERS,
        help="where tokens are published (default: nats for --target sse, nchan for --target nchan)",
    )
    parser.add_argument("--pub-url", metavar="BASE", help="nchan's publisher base URL (default: --url)")
    parser.add_argument(
        "--nats",
        metavar="URL",
        help="NATS server for --publish nats: the origin (meshkit's shipped leaf configs refuse "
        "token publishes)",
    )
    parser.add_argument("--redis", metavar="URL", help="Redis for --publish redis-pubsub|redis-stream")
    parser.add_argument(
        "--stream-key", default=DEFAULT_STREAM_KEY, help=f"Redis Stream key (default: {DEFAULT_STREAM_KEY})"
    )
    parser.add_argument("--conversations", type=_positive_int, default=10, metavar="N", help="(default: 10)")
    parser.add_argument(
        "--viewers", type=_positive_int, default=1, metavar="M", help="per conversation (default: 1)"
    )
    parser.add_argument(
        "--rate", type=_number, default=100.0, metavar="TOKENS_PER_S", help="in total (default: 100)"
    )
    parser.add_argument(
        "--duration", type=_number, default=10.0, metavar="S", help="of publishing (default: 10)"
    )
    parser.add_argument(
        "--processes",
        type=_positive_int,
        default=1,
        metavar="P",
        help="worker processes for the viewers (default: 1)",
    )
    parser.add_argument("--ws", action="store_true", help="WebSocket viewers instead of SSE")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every number to FILE")
    parser.add_argument(
        "--target-pid",
        type=_positive_int,
        action="append",
        default=[],
        metavar="PID",
        help="sample this process (and its children) for CPU and RSS; repeatable",
    )
    parser.add_argument("--connect-timeout", type=_number, default=30.0, metavar="S", help="(default: 30)")
    parser.add_argument(
        "--drain-timeout",
        type=_number,
        default=5.0,
        metavar="S",
        help="wait for the last tokens (default: 5)",
    )
    parser.add_argument(
        "--settle",
        type=_number,
        default=0.5,
        metavar="S",
        help="pause between all streams open and the first publish, for subscriptions to propagate "
        "(default: 0.5)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


def options_from_args(args: argparse.Namespace) -> LoadgenOptions:
    options = LoadgenOptions(
        target=args.target,
        url=args.url,
        conversations=args.conversations,
        viewers=args.viewers,
        rate=args.rate,
        duration=args.duration,
        publish=args.publish,
        pub_url=args.pub_url,
        nats=args.nats,
        redis=args.redis,
        stream_key=args.stream_key,
        processes=args.processes,
        ws=args.ws,
        json_file=args.json,
        target_pids=tuple(args.target_pid),
        connect_timeout=args.connect_timeout,
        drain_timeout=args.drain_timeout,
        settle=args.settle,
        progress=not args.no_progress,
    )
    if problems := options.problems():
        raise ConfigError(problems)
    return options


def run(args: argparse.Namespace) -> int:
    """`meshkit loadgen`: options -> run -> table (stdout), JSON file; the exit status of the docstring."""
    options = options_from_args(args)
    report = run_on_fast_loop(run_loadgen(options))
    print(render_table(report))
    return 0 if report["messages"]["exactly_once_in_order"] else 3


# -- the run ---------------------------------------------------------------------------------------
def stream_url(options: LoadgenOptions, conversation_id: str) -> str:
    base = options.url.rstrip("/")
    if options.ws:
        base = "ws" + base.removeprefix("http")
        path = "/ws/" if options.target == "sse" else "/sub/"
    else:
        path = "/stream/" if options.target == "sse" else "/sub/"
    return f"{base}{path}{conversation_id}"


@dataclass
class _Worker:
    index: int
    viewers: list[tuple[str, str]]
    proc: asyncio.subprocess.Process | None = None
    connected: asyncio.Future[dict[str, Any]] | None = None
    result: asyncio.Future[dict[str, Any]] | None = None
    progress: dict[str, Any] = dataclasses.field(default_factory=dict)
    reader: asyncio.Task[None] | None = None

    async def start(self, options: LoadgenOptions) -> None:
        loop = asyncio.get_running_loop()
        self.connected, self.result = loop.create_future(), loop.create_future()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "meshkit.edge.loadgen_worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=64 << 20,
        )
        self.reader = asyncio.create_task(self._read())
        self.send(
            {
                "index": self.index,
                "viewers": self.viewers,
                "ws": options.ws,
                "connect_timeout": options.connect_timeout,
            }
        )

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            try:
                message = json.loads(line)
            except ValueError:  # a stray print of some library: not ours
                continue
            kind = message.get("type") if isinstance(message, dict) else None
            if kind == "connected" and self.connected and not self.connected.done():
                self.connected.set_result(message)
            elif kind == "progress":
                self.progress = message
            elif kind == "result" and self.result and not self.result.done():
                self.result.set_result(message)
        code = await self.proc.wait()
        error = MeshkitError(f"loadgen worker {self.index} (pid {self.proc.pid}) exited with status {code}")
        for future in (self.connected, self.result):
            if future is not None and not future.done():
                future.set_exception(error)

    async def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), WORKER_EXIT_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if self.reader is not None:
            with contextlib.suppress(asyncio.CancelledError, MeshkitError):
                await self.reader
        for future in (self.connected, self.result):  # nobody awaits them any more
            if future is not None and future.done() and not future.cancelled():
                future.exception()


class _Run:
    """The state of one run: workers, publisher, samples, timeline."""

    def __init__(self, options: LoadgenOptions, out: TextIO) -> None:
        self.options = options
        self.out = out
        run_id = secrets.token_hex(3)
        self.conversations = [f"lg{run_id}c{i}" for i in range(options.conversations)]
        assert all(map(is_conversation_id, self.conversations))
        processes = min(options.processes, options.streams)
        assignment: list[list[tuple[str, str]]] = [[] for _ in range(processes)]
        k = 0
        for cid in self.conversations:
            url = stream_url(options, cid)
            for _ in range(options.viewers):
                assignment[k % processes].append((cid, url))
                k += 1
        self.workers = [_Worker(i, v) for i, v in enumerate(assignment)]
        self.sampler = ProcessSampler(options.target_pids)
        self.monitor = LoopLagMonitor()
        self.published = 0
        self.timeline: list[dict[str, Any]] = []
        self.t0 = time.monotonic()

    def delivered(self) -> int:
        return sum(int(w.progress.get("delivered", 0)) for w in self.workers)

    def open_streams(self) -> int:
        return sum(int(w.progress.get("open", 0)) for w in self.workers)

    async def progress_loop(self) -> None:
        last_delivered, last_t = 0, time.monotonic()
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL)
            now = time.monotonic()
            delivered = self.delivered()
            rate = (delivered - last_delivered) / max(1e-9, now - last_t)
            last_delivered, last_t = delivered, now
            lag_us, _ = self.monitor.take_recent()
            lag_ms = max([lag_us / 1000] + [w.progress.get("lag_max_us", 0) / 1000 for w in self.workers])
            entry: dict[str, Any] = {
                "t": round(now - self.t0, 2),
                "published": self.published,
                "delivered": delivered,
                "delivered_per_s": round(rate, 1),
                "open_streams": self.open_streams(),
                "loop_lag_max_ms": round(lag_ms, 2),
            }
            if self.options.target_pids:
                previous = self.sampler.samples[-1] if self.sampler.samples else None
                sample = self.sampler.sample()
                if previous is not None:
                    entry["target_cpu_percent"] = _round(ProcessSampler.cpu_percent(previous, sample))
                entry["target_rss_bytes"] = sample.rss_bytes
            self.timeline.append(entry)
            if self.options.progress:
                print(
                    f"loadgen {entry['t']:6.1f}s  published {self.published:,}  delivered/s {rate:,.0f}  "
                    f"open {entry['open_streams']:,}/{self.options.streams:,}  loop lag {lag_ms:.1f} ms",
                    file=self.out,
                    flush=True,
                )

    async def publish(self, publisher: Publisher) -> tuple[list[int], float, float]:
        """The schedule of the module docstring: (tokens per conversation, seconds the tokens took,
        seconds with the done messages). A schedule of T tokens spans T / rate seconds (the first one
        goes at 0), so the tokens' time is measured up to one interval after the last one went."""
        options = self.options
        n = options.conversations
        total = max(0, round(options.rate * options.duration))
        counts = [0] * n
        start = time.monotonic()
        sent = 0
        tokens_seconds = 0.0
        # The done messages keep the same pace: all of them at once would be a burst of n x viewers
        # deliveries at the end, and its latency would be the generator's, not the target's.
        while sent < total + n:
            due = min(total + n, math.floor((time.monotonic() - start) * options.rate) + 1)
            batch: list[Message] = []
            for i in range(sent, due):
                if i < total:
                    c = i % n
                    counts[c] += 1
                    batch.append((self.conversations[c], counts[c], False))
                else:
                    c = i - total
                    batch.append((self.conversations[c], counts[c] + 1, True))
            if batch:
                await publisher.publish_batch(batch)
                sent = due
                self.published = sent
            if sent >= total and not tokens_seconds:
                tokens_seconds = time.monotonic() - start + (1 / options.rate if total else 0.0)
            wait = start + sent / options.rate - time.monotonic()
            await asyncio.sleep(max(TICK, wait) if sent < total + n else 0)
        return counts, tokens_seconds, time.monotonic() - start


async def run_loadgen(options: LoadgenOptions, *, out: TextIO | None = None) -> dict[str, Any]:
    """One run (the module docstring); the report dict (what `--json` writes). Raises ConfigError when the
    streams cannot be opened here, DependencyError when the publisher cannot connect."""
    out = out or sys.stderr
    nofile = raise_nofile_limit()
    processes = min(options.processes, options.streams)
    problems = capacity_problems(options.streams, processes, nofile, ephemeral_ports())
    problems += [f"--target-pid {pid}: no such process" for pid in options.target_pids if not _alive(pid)]
    if problems:
        raise ConfigError(problems)
    try:
        publisher = make_publisher(
            options.publisher,
            nats_url=options.nats,
            redis_url=options.redis,
            nchan_url=options.pub_url or options.url,
            stream_key=options.stream_key,
        )
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    state = _Run(options, out)
    state.monitor.start()
    idle = state.sampler.sample() if options.target_pids else None
    progress: asyncio.Task[None] | None = None
    try:
        await publisher.start()
        for w in state.workers:
            await w.start(options)
        connected = await asyncio.wait_for(
            asyncio.gather(*(w.connected for w in state.workers if w.connected)), options.connect_timeout + 30
        )
        opened = sum(int(c["open"]) for c in connected)
        connect_seconds = time.monotonic() - state.t0
        if options.progress:
            print(
                f"loadgen: {opened:,} of {options.streams:,} streams open in {connect_seconds:.1f} s",
                file=out,
            )
        if options.settle:
            await asyncio.sleep(options.settle)
        for w in state.workers:
            w.send({"type": "measure"})
        state.monitor.reset()
        progress = asyncio.create_task(state.progress_loop())
        before = state.sampler.sample() if options.target_pids else None
        counts, tokens_seconds, publish_seconds = await state.publish(publisher)
        after = state.sampler.sample() if options.target_pids else None
        ranges = {cid: [1, counts[c] + 1] for c, cid in enumerate(state.conversations)}
        for w in state.workers:
            w.send({"type": "end", "ranges": ranges, "drain_timeout": options.drain_timeout})
        results = await asyncio.wait_for(
            asyncio.gather(*(w.result for w in state.workers if w.result)), options.drain_timeout + 30
        )
    finally:
        if progress is not None:
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress
        await asyncio.gather(*(w.stop() for w in state.workers), return_exceptions=True)
        await publisher.close()
        await state.monitor.stop()
    report = _report(
        options,
        state,
        publisher,
        list(results),
        counts,
        (tokens_seconds, publish_seconds),
        opened,
        connect_seconds,
        idle,
        before,
        after,
    )
    if options.json_file is not None:
        write_json(options.json_file, report)
    return report


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def _report(
    options: LoadgenOptions,
    state: _Run,
    publisher: Publisher,
    results: list[dict[str, Any]],
    counts: list[int],
    seconds: tuple[float, float],
    opened: int,
    connect_seconds: float,
    idle: Sample | None,
    before: Sample | None,
    after: Sample | None,
) -> dict[str, Any]:
    merged = merge_results(results)
    tally = merged["tally"]
    latency: Histogram = merged["latency"]
    tokens = sum(counts)
    asked = options.rate
    tokens_seconds, publish_seconds = seconds
    achieved = tokens / tokens_seconds if tokens and tokens_seconds > 0 else None
    lag = state.monitor.lag_us.summary_ms()
    processes = [
        {
            "role": "publisher",
            "pid": os.getpid(),
            "streams": 0,
            "cpu_percent": round(state.monitor.cpu_percent(), 1),
            "peak_cpu_percent": round(state.monitor.peak_cpu_percent, 1),
            "loop_lag_ms": {k: lag[k] for k in ("p50", "p99", "max")},
        },
        *merged["processes"],
    ]
    ratio = achieved / asked if achieved is not None and asked else None
    saturated, sentence = verdict(processes, ratio)
    outcomes = merged["outcomes"]
    exactly_once = (
        tally["missing"] == 0
        and tally["duplicates"] == 0
        and tally["out_of_order"] == 0
        and tally["unexpected"] == 0
        and tally["expected"] > 0
    )
    window = [
        s
        for s in state.sampler.samples
        if before is not None and after is not None and before.t <= s.t <= after.t
    ]
    rss_max = max((s.rss_bytes for s in window), default=None)
    target: dict[str, Any] = {
        "pids": list(options.target_pids),
        "cpu_percent": _round(ProcessSampler.cpu_percent(before, after)) if before and after else None,
        "rss_bytes_idle": idle.rss_bytes if idle else None,
        "rss_bytes_max": rss_max,
        "kb_per_stream": _round(rss_max / opened / 1024) if rss_max and opened else None,
        "kb_per_stream_delta": (
            _round((rss_max - idle.rss_bytes) / opened / 1024) if rss_max and idle and opened else None
        ),
    }
    return {
        "config": {
            "target": options.target,
            "url": options.url,
            "publish": options.publisher,
            "conversations": options.conversations,
            "viewers_per_conversation": options.viewers,
            "rate": options.rate,
            "duration": options.duration,
            "processes": len(state.workers),
            "ws": options.ws,
            "event_loop": event_loop_name(),
        },
        "streams": {
            "planned": options.streams,
            "opened": opened,
            "conversations": options.conversations,
            "viewers_per_conversation": options.viewers,
            "connect_seconds": round(connect_seconds, 3),
            "outcomes": outcomes,
        },
        "publish": {
            "tokens": tokens,
            "done_messages": len(counts),
            "published": tokens + len(counts),
            "seconds": round(publish_seconds, 3),
            "tokens_seconds": round(tokens_seconds, 3),
            "asked_rate": asked,
            "achieved_rate": round(achieved, 1) if achieved is not None else 0.0,
            "errors": publisher.errors,
            "first_error": publisher.first_error,
        },
        "messages": {
            **tally,
            "incomplete_viewers": merged["incomplete_viewers"],
            "delivered_ratio": tally["delivered"] / tally["expected"] if tally["expected"] else 0.0,
            "exactly_once_in_order": exactly_once,
            "deliveries_per_s": round(tally["delivered"] / publish_seconds, 1)
            if publish_seconds > 0
            else None,
        },
        "latency_ms": latency.summary_ms(),
        "errors": {
            "connect_refused": outcomes.get("refused", 0),
            "rejected": outcomes.get("rejected", 0),
            "disconnects": outcomes.get("disconnected", 0),
            "still_open_at_end": outcomes.get("open", 0),
            "unparsable": merged["unparsable"],
            "publish_errors": publisher.errors,
            **{f"event_{k}": v for k, v in merged["events"].items()},
        },
        "error_samples": merged["error_samples"],
        "generator": {"processes": processes, "saturated": saturated, "verdict": sentence},
        "target": target,
        "timeline": state.timeline,
    }
