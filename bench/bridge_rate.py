"""The bridge's rate: tokens/s from Redis into JetStream, deduplicated and with confirmed storage.

Starts a real redis-server and nats-server (JetStream, file store) with the harness and a `meshkit
bridge` process, then per source:

    stream  N tokens over C conversations are XADDed to the Redis Stream BEFORE the bridge starts (so
            the producer's own speed is not measured); the bridge drains them: every one published with
            `Nats-Msg-Id`, stored (PubAck), then XACKed.
    pubsub  the bridge is running and subscribed; N tokens are PUBLISHed from a pipelined redis-py
            client (its own rate is reported: if it is close to the bridge's, the publisher was the
            limit); Redis's pub/sub output buffer limit is raised for the run so it holds the backlog.

The rate is JetStream's own clock: (stored - 1) / (last message timestamp - first message timestamp)
from `stream_info` (what the stream confirmed storing, not when a client looked). "acked" is the
wall time until the group had nothing pending (Streams). CPU seconds per 1,000 tokens of the bridge,
nats-server and redis-server (their whole sessions, /proc) say where the time went. Every run checks
that the stream holds exactly N messages (one per token: none lost, none twice).

    .venv/bin/python bench/bridge_rate.py [--source stream|pubsub|both] [--tokens 200000]
        [--conversations 1000] [--max-inflight 4096] [--read-batch 1000] [--bridge-args "..."] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nats
import redis.asyncio as aioredis
from run import CLK_TCK, session_ticks

from meshkit.harness.nats import NatsServer, nats_server
from meshkit.harness.redis import RedisServer, redis_server
from meshkit.harness.streaming import RunningBridge, bridge

TARGET = 50_000.0  # tokens/s (issue 14)
STREAM_KEY = "chat.tokens"


@dataclass(frozen=True)
class RateRow:
    source: str
    tokens: int
    stored: int
    seconds: float  # JetStream first -> last stored
    tokens_per_s: float
    acked_seconds: float | None  # until nothing pending (Streams)
    publisher_per_s: float | None  # pub/sub: how fast the bench could publish
    bridge_cpu_ms_per_1k: float
    nats_cpu_ms_per_1k: float
    redis_cpu_ms_per_1k: float
    duplicates: float
    retries: float


def payloads(tokens: int, conversations: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(tokens):
        cid, seq = f"conv-{i % conversations:05d}", i // conversations
        doc = {"conversation_id": cid, "token": "hello", "sequence": seq, "done": False}
        out.append((f"chat.{cid}.tokens", json.dumps(doc, separators=(",", ":")).encode()))
    return out


async def _stream_state(url: str) -> tuple[int, float, float]:
    """(messages, first and last message timestamps) of CHAT, from the raw STREAM.INFO answer (nats-py's
    StreamState leaves the timestamps out)."""
    nc = await nats.connect(url)
    try:
        reply = await nc.request("$JS.API.STREAM.INFO.CHAT", b"", timeout=5)
        state = json.loads(reply.data).get("state")
        if not state:
            return 0, 0.0, 0.0
        return int(state["messages"]), _ts(state.get("first_ts")), _ts(state.get("last_ts"))
    finally:
        await nc.close()


def _ts(value: object) -> float:
    """An RFC 3339 timestamp with nanoseconds (JetStream's) as epoch seconds."""
    if not isinstance(value, str) or not value:
        return 0.0
    from datetime import datetime

    head, _, frac = value.rstrip("Z").partition(".")
    seconds = datetime.fromisoformat(head + "+00:00").timestamp()
    return seconds + (float(f"0.{frac}") if frac else 0.0)


async def _wait_stored(url: str, tokens: int, deadline: float) -> tuple[int, float, float]:
    while True:
        stored, first, last = await _stream_state(url)
        if stored >= tokens or time.monotonic() > deadline:
            return stored, first, last
        await asyncio.sleep(0.1)


async def _xadd_all(url: str, items: list[tuple[str, bytes]]) -> None:
    client = aioredis.Redis.from_url(url)
    for start in range(0, len(items), 5_000):
        pipe = client.pipeline(transaction=False)
        for _, data in items[start : start + 5_000]:
            pipe.xadd(STREAM_KEY, {"data": data})
        await pipe.execute()
    await client.aclose()


async def _publish_all(url: str, items: list[tuple[str, bytes]]) -> float:
    client = aioredis.Redis.from_url(url)
    await client.config_set("client-output-buffer-limit", "pubsub 512mb 256mb 60")
    began = time.monotonic()
    for start in range(0, len(items), 2_000):
        pipe = client.pipeline(transaction=False)
        for channel, data in items[start : start + 2_000]:
            pipe.publish(channel, data)
        await pipe.execute()
    elapsed = time.monotonic() - began
    await client.aclose()
    return len(items) / elapsed


async def _pending(url: str) -> int:
    client = aioredis.Redis.from_url(url)
    try:
        return int((await client.xpending(STREAM_KEY, "meshkit-bridge"))["pending"])
    finally:
        await client.aclose()


def _cpu(running: RunningBridge, nats: NatsServer, redis: RedisServer) -> tuple[int, int, int]:
    return (
        session_ticks(running.process.pid),
        session_ticks(nats.process.pid),
        session_ticks(redis.process.pid),
    )


def measure(
    source: str, tokens: int, conversations: int, bridge_args: Sequence[str], workdir: Path, timeout: float
) -> RateRow:
    items = payloads(tokens, conversations)
    with (
        nats_server(workdir / f"nats-{source}", name=f"bench-{source}") as ns,
        redis_server(workdir / f"redis-{source}", name=f"redis-{source}") as rs,
    ):
        args = ["--source", source, "--consumer", "bench", "--log-level", "warning", *bridge_args]
        publisher_rate: float | None = None
        acked: float | None = None
        if source == "stream":
            asyncio.run(_xadd_all(rs.url, items))
        with bridge(workdir, rs.url, ns.url, args, name=f"bridge-{source}") as b:
            before = _cpu(b, ns, rs)
            began = time.monotonic()
            b.wait_ready(timeout=30)
            if source == "pubsub":
                publisher_rate = asyncio.run(_publish_all(rs.url, items))
            stored, first, last = asyncio.run(_wait_stored(ns.url, tokens, time.monotonic() + timeout))
            if source == "stream":
                while asyncio.run(_pending(rs.url)) and time.monotonic() - began < timeout:
                    time.sleep(0.05)
                acked = time.monotonic() - began
            after = _cpu(b, ns, rs)
            duplicates = b.metric("meshkit_bridge_duplicates_total")
            retries = sum(
                b.metric("meshkit_bridge_retries_total", reason=r)
                for r in ("timeout", "no_responders", "error", "reconnect")
            )
    seconds = max(last - first, 1e-9)
    per_1k = [
        (a - b_) / CLK_TCK * 1000.0 / max(stored, 1) * 1000.0 for a, b_ in zip(after, before, strict=True)
    ]
    return RateRow(
        source=source,
        tokens=tokens,
        stored=stored,
        seconds=round(seconds, 3),
        tokens_per_s=round((stored - 1) / seconds, 1),
        acked_seconds=None if acked is None else round(acked, 3),
        publisher_per_s=None if publisher_rate is None else round(publisher_rate, 1),
        bridge_cpu_ms_per_1k=round(per_1k[0], 2),
        nats_cpu_ms_per_1k=round(per_1k[1], 2),
        redis_cpu_ms_per_1k=round(per_1k[2], 2),
        duplicates=duplicates,
        retries=retries,
    )


def report(rows: Sequence[RateRow]) -> str:
    lines = [
        f"{'source':8} {'tokens':>8} {'stored':>8} {'tokens/s':>10} {'target':>7} {'acked s':>8} "
        f"{'pub/s':>9} {'bridge':>7} {'nats':>6} {'redis':>6}  (CPU ms per 1k tokens)"
    ]
    for r in rows:
        ok = "ok" if r.tokens_per_s >= TARGET and r.stored == r.tokens else "MISS"
        lines.append(
            f"{r.source:8} {r.tokens:>8} {r.stored:>8} {r.tokens_per_s:>10,.0f} {ok:>7} "
            f"{'' if r.acked_seconds is None else r.acked_seconds:>8} "
            f"{'' if r.publisher_per_s is None else f'{r.publisher_per_s:,.0f}':>9} "
            f"{r.bridge_cpu_ms_per_1k:>7} {r.nats_cpu_ms_per_1k:>6} {r.redis_cpu_ms_per_1k:>6}"
        )
        if r.stored != r.tokens:
            lines.append(f"  !! {r.source}: {r.stored} stored of {r.tokens} (lost or duplicated)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--source", choices=("stream", "pubsub", "both"), default="both")
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--conversations", type=int, default=1_000)
    parser.add_argument("--max-inflight", type=int, default=4096)
    parser.add_argument("--read-batch", type=int, default=1000)
    parser.add_argument("--bridge-args", default="", help="more `meshkit bridge` flags, shell-quoted")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds one source may take")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    extra = ["--max-inflight", str(args.max_inflight), "--read-batch", str(args.read_batch)]
    extra += shlex.split(args.bridge_args)
    sources = ("stream", "pubsub") if args.source == "both" else (args.source,)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bridge-rate-") as tmp:
        for source in sources:
            rows.append(measure(source, args.tokens, args.conversations, extra, Path(tmp), args.timeout))
            print(report(rows[-1:]).splitlines()[-1], file=sys.stderr)
    print(report(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0 if all(r.stored == r.tokens for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
