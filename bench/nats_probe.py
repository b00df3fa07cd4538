"""A bare NATS subscriber beside a streaming benchmark: what the broker path alone costs.

`bench/streaming.py --probe` starts it on the leaf while `meshkit sse` serves its 10,000 streams: one
core subscription on `chat.*.live` (the stream's republished copies, what the adapter follows), every
message's publish->receive latency from its `ts`, nothing else done with it. Its p99 is the floor the
adapter's own p99 sits on: publisher -> origin (store, republish) -> leaf -> a Python process, on the
same loaded machine. It runs until SIGTERM or `--duration`, then writes its numbers as JSON.

    .venv/bin/python bench/nats_probe.py --nats URL [--subject chat.*.live] [--duration S] --json FILE
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nats
import orjson
from fixed_rate import percentile


async def probe(url: str, subject: str, duration: float) -> dict[str, Any]:
    latencies: list[float] = []
    unreadable = 0

    async def on_message(msg: Any) -> None:
        nonlocal unreadable
        now = time.time()
        try:
            ts = orjson.loads(msg.data)["ts"]
            latencies.append((now - float(ts)) * 1000.0)
        except (ValueError, KeyError, TypeError):
            unreadable += 1

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        await nc.subscribe(subject, cb=on_message)
        await nc.flush()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(duration):
                await stop.wait()
    finally:
        await nc.close()
    ordered = sorted(latencies)
    return {
        "subject": subject,
        "messages": len(ordered),
        "unreadable": unreadable,
        "p50_ms": percentile(ordered, 0.50) if ordered else None,
        "p90_ms": percentile(ordered, 0.90) if ordered else None,
        "p99_ms": percentile(ordered, 0.99) if ordered else None,
        "max_ms": ordered[-1] if ordered else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nats", required=True)
    parser.add_argument("--subject", default="chat.*.live")
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    run: Any = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        run = uvloop.run
    try:
        result = run(probe(args.nats, args.subject, args.duration))
    except Exception as exc:  # nats-py raises several unrelated types
        print(f"nats_probe: {exc!r}", file=sys.stderr)
        return 1
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
