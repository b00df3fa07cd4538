"""The embedding-cache benchmark (issue 13: "a fully cached batch of 16 answered in <= 5 ms p50 on the S3
store"): what a batch of 16 inputs costs the client, cached vs not.

`measure_embedding_cache(base_url)` times, against a running `meshkit embedding-cache` (its base URL,
`http://HOST:PORT/v1`), over keep-alive connections (aiohttp, one request at a time):
- `cached`: the same batch of `batch` distinct inputs `requests` times, after one request that fills
  the cache (every timed answer must say `x-cache: hit`);
- `cold`: `cold_requests` batches of inputs nobody asked for before (`x-cache: miss`: the cache's
  lookup, one upstream call, the write queued);
- `direct` (when `upstream_url` is given): the same batch straight to the upstream, no cache at all.
`encoding` is the `encoding_format` asked for: `base64` is what the official `openai` client sends
unless told otherwise (and decodes itself); `float` makes the server print 16 x 1536 JSON numbers.

The benchmark runner calls the function (one row each); `python bench/embedding_store.py` starts its
own stack (`meshkit dev-upstream`, SeaweedFS `weed mini`, embedding caches on the S3 store with the
memory tier on and off, and one on the file store), measures each briefly and prints a table.
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
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import boto3

from meshkit.harness.daemons import EmbeddingCache, dev_upstream, embedding_cache
from meshkit.harness.s3 import s3_server

TARGET_P50_MS = 5.0
MODEL = "text-embedding-3-small"


@dataclass(frozen=True)
class Latency:
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float

    @classmethod
    def of(cls, samples: list[float], errors: int) -> Latency:
        ordered = sorted(samples) or [float("nan")]
        cuts = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else ordered * 99
        return cls(len(samples), errors, round(cuts[49], 2), round(cuts[98], 2))


@dataclass(frozen=True)
class EmbeddingResult:
    config: str
    batch: int
    encoding: str
    cached: Latency
    cold: Latency
    direct: Latency | None
    target_p50_ms: float = TARGET_P50_MS

    @property
    def met(self) -> bool:
        return self.cached.p50_ms <= self.target_p50_ms and not self.cached.errors

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "met": self.met}


async def _post(
    session: aiohttp.ClientSession, url: str, inputs: list[str], encoding: str, want: str | None
) -> tuple[float, bool]:
    body = json.dumps({"model": MODEL, "input": inputs, "encoding_format": encoding}).encode()
    began = time.perf_counter()
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
        await resp.read()
        ok = resp.status == 200 and (want is None or resp.headers.get("x-cache") == want)
    return (time.perf_counter() - began) * 1000, ok


async def _measure(
    base_url: str,
    upstream_url: str | None,
    batch: int,
    requests: int,
    cold_requests: int,
    encoding: str,
    warmup: int,
) -> tuple[Latency, Latency, Latency | None]:
    tag = uuid.uuid4().hex[:8]
    inputs = [f"benchmark input {i} {tag}" for i in range(batch)]
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        url = f"{base_url.rstrip('/')}/embeddings"
        await _post(session, url, inputs, encoding, None)  # fills the cache
        for _ in range(warmup):
            await _post(session, url, inputs, encoding, "hit")

        async def phase(target: str, count: int, fresh: bool, want: str | None) -> Latency:
            samples: list[float] = []
            errors = 0
            for n in range(count):
                batch_inputs = [f"cold {n} {i} {uuid.uuid4().hex}" for i in range(batch)] if fresh else inputs
                ms, ok = await _post(session, target, batch_inputs, encoding, want)
                samples.append(ms)
                errors += not ok
            return Latency.of(samples, errors)

        cached = await phase(url, requests, False, "hit")
        cold = await phase(url, cold_requests, True, "miss")
        direct = None
        if upstream_url:
            direct = await phase(f"{upstream_url.rstrip('/')}/embeddings", cold_requests, False, None)
    return cached, cold, direct


def measure_embedding_cache(
    base_url: str,
    *,
    config: str = "embedding-cache",
    upstream_url: str | None = None,
    batch: int = 16,
    requests: int = 300,
    cold_requests: int = 50,
    encoding: str = "base64",
    warmup: int = 20,
) -> EmbeddingResult:
    """Time a cached batch, cold batches and (with `upstream_url`) the upstream alone (module docstring)."""
    cached, cold, direct = asyncio.run(
        _measure(base_url, upstream_url, batch, requests, cold_requests, encoding, warmup)
    )
    return EmbeddingResult(config, batch, encoding, cached, cold, direct)


# -- the stand-alone run ---------------------------------------------------------------------------
@contextlib.contextmanager
def _stack(workdir: Path) -> Iterator[tuple[str, dict[str, EmbeddingCache]]]:
    """dev-upstream, one S3 server, and the caches to compare (name -> running cache)."""
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(dev_upstream(workdir, name="bench-ec-upstream"))
        s3 = stack.enter_context(s3_server(workdir, name="bench-ec-s3"))
        client = boto3.client("s3", **s3.client_kwargs())
        client.create_bucket(Bucket="bench")
        client.put_object(Bucket="bench", Key="warm-up", Body=b"")
        caches = {
            "s3+memory": stack.enter_context(
                embedding_cache(workdir, upstream.base_url, "s3://bench/a", s3=s3, name="bench-ec-mem")
            ),
            "s3 (memory off)": stack.enter_context(
                embedding_cache(
                    workdir,
                    upstream.base_url,
                    "s3://bench/b",
                    ["--memory-bytes", "0"],
                    s3=s3,
                    name="bench-ec-nomem",
                )
            ),
            "file (memory off)": stack.enter_context(
                embedding_cache(
                    workdir,
                    upstream.base_url,
                    (workdir / "vectors").as_uri(),
                    ["--memory-bytes", "0"],
                    name="bench-ec-file",
                )
            ),
        }
        yield upstream.base_url, caches


def render(results: list[EmbeddingResult]) -> str:
    head = ["config", "encoding", "cached p50", "cached p99", "cold p50", "cold p99", "direct p50", "<= 5 ms"]
    rows = [head]
    for r in results:
        direct = f"{r.direct.p50_ms:.2f}" if r.direct else "-"
        errors = r.cached.errors + r.cold.errors
        rows.append(
            [
                r.config,
                r.encoding,
                f"{r.cached.p50_ms:.2f}",
                f"{r.cached.p99_ms:.2f}",
                f"{r.cold.p50_ms:.2f}",
                f"{r.cold.p99_ms:.2f}",
                direct,
                ("met" if r.met else "MISSED") + (f" ({errors} errors)" if errors else ""),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=200, help="timed cached requests per config")
    parser.add_argument("--cold-requests", type=int, default=30, help="timed cold batches per config")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    results: list[EmbeddingResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-embedding-") as tmp, _stack(Path(tmp)) as (up, caches):
        for name, cache in caches.items():
            encodings = ("base64", "float") if name == "s3+memory" else ("base64",)
            for encoding in encodings:
                results.append(
                    measure_embedding_cache(
                        cache.base_url,
                        config=name,
                        upstream_url=up if name == "s3+memory" and encoding == "base64" else None,
                        requests=args.requests,
                        cold_requests=args.cold_requests,
                        encoding=encoding,
                    )
                )
    if args.json:
        print(json.dumps([r.as_json() for r in results], indent=2))
    else:
        print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
