"""The purge fan-out benchmark (issue 13: "purge fan-out to 8 targets p99 <= 20 ms"): what one PURGE costs
as the client sees it, from its request to the broadcaster's answer once every Varnish confirmed.

`measure_purge_fanout(workdir)` starts `targets` real Varnish instances (`meshkit.harness.varnish`, the
shipped meshkit.vcl, one echo origin behind them all) and `meshkit purge-broadcaster` with them as its
static targets, then sends, over keep-alive connections (aiohttp, like a real purging client):
- `sequential` PURGEs one after the other, each a distinct path (`/v1/embeddings?bench=N`, a ban each);
- `concurrent` PURGEs from `clients` clients at once (each waits for its answer before the next).
A warm-up of `warmup` purges opens the connections first (client -> broadcaster -> every Varnish).
Each phase reports p50/p99/max ms; every answer must be 200 (else the phase's `errors` says how many
were not). The benchmark runner calls the function; `python bench/purge_fanout.py` runs it once and
prints the JSON (about 10 s, 8 varnishd starting included).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

from meshkit.harness.daemons import echo, purge_broadcaster
from meshkit.harness.varnish import VarnishServer, varnish_server
from meshkit.render import meshkit_vcl

TARGET_P99_MS = 20.0


@dataclass(frozen=True)
class Latency:
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, samples: list[float], errors: int) -> Latency:
        ordered = sorted(samples)
        cuts = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else ordered * 99
        return cls(len(ordered), errors, round(cuts[49], 2), round(cuts[98], 2), round(ordered[-1], 2))


@dataclass(frozen=True)
class FanoutResult:
    targets: int
    sequential: Latency
    concurrent: Latency
    clients: int
    target_p99_ms: float = TARGET_P99_MS

    @property
    def met(self) -> bool:
        worst = max(self.sequential.p99_ms, self.concurrent.p99_ms)
        return worst <= self.target_p99_ms and not (self.sequential.errors or self.concurrent.errors)

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "met": self.met}


async def _one(session: aiohttp.ClientSession, url: str) -> tuple[float, bool]:
    began = time.perf_counter()
    async with session.request("PURGE", url) as resp:
        await resp.read()
        ok = resp.status == 200
    return (time.perf_counter() - began) * 1000, ok


async def _load(
    base: str, warmup: int, sequential: int, concurrent: int, clients: int
) -> tuple[Latency, Latency]:
    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        counter = iter(range(10**9))

        def url() -> str:
            return f"{base}/v1/embeddings?bench={next(counter)}"

        for _ in range(warmup):
            await _one(session, url())
        seq: list[float] = []
        seq_errors = 0
        for _ in range(sequential):
            ms, ok = await _one(session, url())
            seq.append(ms)
            seq_errors += not ok
        conc: list[float] = []
        conc_errors = 0
        per_client = max(1, concurrent // clients)

        async def client() -> None:
            nonlocal conc_errors
            for _ in range(per_client):
                ms, ok = await _one(session, url())
                conc.append(ms)
                conc_errors += not ok

        await asyncio.gather(*(client() for _ in range(clients)))
    return Latency.of(seq, seq_errors), Latency.of(conc, conc_errors)


def measure_purge_fanout(
    workdir: Path,
    *,
    targets: int = 8,
    warmup: int = 20,
    sequential: int = 300,
    concurrent: int = 300,
    clients: int = 4,
    broadcaster_args: tuple[str, ...] = (),
) -> FanoutResult:
    """Start `targets` Varnish + a broadcaster, send the PURGEs, stop everything; the latencies."""
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        origin = stack.enter_context(echo(workdir, name="bench-purge-origin"))
        vcl = meshkit_vcl(backend=("127.0.0.1", origin.port))
        pods: list[VarnishServer] = [
            stack.enter_context(varnish_server(workdir, vcl, name=f"bench-varnish-{i}", storage="malloc,16m"))
            for i in range(targets)
        ]
        addresses = [f"127.0.0.1:{pod.port}" for pod in pods]
        server = stack.enter_context(
            purge_broadcaster(workdir, addresses, broadcaster_args, name="bench-purge")
        )
        seq, conc = asyncio.run(_load(server.url, warmup, sequential, concurrent, clients))
    return FanoutResult(targets, seq, conc, clients)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--targets", type=int, default=8)
    parser.add_argument("--sequential", type=int, default=300)
    parser.add_argument("--concurrent", type=int, default=300)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-purge-") as tmp:
        result = measure_purge_fanout(
            Path(tmp),
            targets=args.targets,
            sequential=args.sequential,
            concurrent=args.concurrent,
            clients=args.clients,
        )
    print(json.dumps(result.as_json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
