"""The cache tier's ingress benchmark: a Varnish HIT through Envoy + meshkit vs Envoy -> Varnish alone,
at a fixed rate (the issue's target: the full ingress path on a HIT at 500 req/s, p50 <= 2 ms,
p99 <= 10 ms).

Both rows share the same servers: `meshkit dev-upstream` <- `meshkit embedding-cache` (file:// store)
<- Varnish x2 (the shipped VCL). Each row has its own front Envoy (`--concurrency 1`):

    varnish-alone   FrontConfig(api=None, path_routes=/v1/embeddings -> both Varnish): no meshkit; the
                    client sends the X-Body-Hash itself (nothing else would: Varnish would PASS)
    varnish-meshkit the same + meshkit `auth,body-hash,model-router` over ext_authz HTTP (an API key,
                    the routes file), ring-hashed on x-body-hash: the full ingress path

`hey -z Ns -c C -q R/C -o csv` sends one embeddings POST (1 KiB) at the fixed total rate R; the body is
fetched once before the measured run, so every measured request is a Varnish HIT (checked: the
answers' X-Cache, and Varnish's own counters are not needed). p50/p99/max come from hey's per-request
CSV; CPU per request of meshkit, the front Envoy and both Varnish from /proc (their whole sessions).
Rounds interleave the rows; the median round per row is reported with the range of p99.

    .venv/bin/python bench/cache_tier.py [--rate 500] [--duration 10] [--rounds 3]
        [--connections 4] [--processes 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import xxhash
from credentials import Credentials, mint
from run import CLK_TCK, make_body, session_ticks

from meshkit.harness.daemons import dev_upstream, embedding_cache, extproc
from meshkit.harness.envoy import Envoy, envoy
from meshkit.harness.varnish import VarnishServer, varnish_server
from meshkit.render import Api, FrontConfig, meshkit_vcl

PATH = "/v1/embeddings"
CHAIN = ("auth", "body-hash", "model-router")
TARGET_P50_MS = 2.0
TARGET_P99_MS = 10.0
ROWS = ("varnish-alone", "varnish-meshkit")


@dataclass(frozen=True)
class Sample:
    row: str
    requests: int
    errors: int
    hits: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    rate: float  # completed requests per second
    cpu_us: dict[str, float]  # role -> CPU microseconds per request


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def run_hey(
    hey: str,
    url: str,
    body: Path,
    headers: dict[str, str],
    rate: int,
    seconds: int,
    workers: int = 4,
    processes: int = 1,
) -> list[float]:
    """One fixed-rate run on `workers` connections spread over `processes` hey processes started
    together (each `-c workers/processes -q rate/workers`: hey's own latency grows with the workers
    of one process on these 2 cores); the latency of every completed 200, in ms."""
    per_process = max(1, workers // processes)
    argv = [hey, "-z", f"{seconds}s", "-c", str(per_process), "-q", f"{rate / (per_process * processes):g}"]
    argv += ["-o", "csv", "-m", "POST", "-D", str(body), "-T", "application/json"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    running = [
        subprocess.Popen([*argv, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    latencies, bad = [], 0
    try:
        for proc in running:
            out, err = proc.communicate(timeout=seconds + 60)
            if proc.returncode != 0:
                raise RuntimeError(f"hey exited {proc.returncode}: {err.strip()}")
            for record in csv.DictReader(io.StringIO(out)):
                if record.get("status-code") == "200":
                    latencies.append(float(record["response-time"]) * 1000)
                else:
                    bad += 1
    finally:
        for proc in running:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if bad:
        raise RuntimeError(f"{bad} answers were not 200")
    return latencies


@dataclass(frozen=True)
class Row:
    name: str
    ingress: Envoy
    headers: dict[str, str]
    sessions: dict[str, int]  # role -> session id (the harness starts each server in its own)


def _hit(url: str, body: bytes, headers: dict[str, str]) -> str:
    """POST once; the answer's X-Cache (raises unless 200)."""
    import urllib.request

    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json", **headers})
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()
        return str(resp.headers.get("x-cache", ""))


def measure(
    row: Row, hey: str, body_file: Path, rate: int, seconds: int, workers: int, processes: int = 1
) -> Sample:
    url = row.ingress.url(path=PATH)
    body = body_file.read_bytes()
    for _ in range(3):  # fetch it into whichever pod it lands on; then it must be a HIT
        verdict = _hit(url, body, row.headers)
    if verdict != "HIT":
        raise RuntimeError(f"{row.name}: the warmed body answered X-Cache {verdict!r}, not HIT")
    run_hey(hey, url, body_file, row.headers, rate, 1, workers, processes)  # warm-up
    before = {role: session_ticks(sid) for role, sid in row.sessions.items()}
    latencies = sorted(run_hey(hey, url, body_file, row.headers, rate, seconds, workers, processes))
    after = {role: session_ticks(sid) for role, sid in row.sessions.items()}
    n = len(latencies)
    cpu = {role: (after[role] - before[role]) / CLK_TCK / max(n, 1) * 1e6 for role in row.sessions}
    return Sample(
        row.name,
        n,
        0,
        n,
        percentile(latencies, 0.5),
        percentile(latencies, 0.99),
        latencies[-1] if latencies else float("nan"),
        n / seconds,
        cpu,
    )


@contextlib.contextmanager
def tier(workdir: Path, creds: Credentials, body_hash: str) -> Iterator[dict[str, Row]]:
    """Both rows' servers, started once."""
    with (
        dev_upstream(workdir, name="bench-provider") as provider,
        embedding_cache(
            workdir, provider.base_url, (workdir / "vectors").as_uri(), name="bench-cache"
        ) as cache,
        varnish_server(workdir, meshkit_vcl(backend=("127.0.0.1", cache.port)), name="bench-varnish-a") as va,
        varnish_server(workdir, meshkit_vcl(backend=("127.0.0.1", cache.port)), name="bench-varnish-b") as vb,
        extproc(workdir, _meshkit_args(creds), name="bench-meshkit") as meshkit,
    ):
        pods: tuple[VarnishServer, VarnishServer] = (va, vb)
        routes = ((PATH, tuple(p.port for p in pods)),)
        varnish = {"varnish-a": va.process.pid, "varnish-b": vb.process.pid}
        alone = FrontConfig(upstream_ports=(provider.port,), path_routes=routes, api=None, listen_port=0)
        full = FrontConfig(
            upstream_ports=(provider.port,),
            path_routes=routes,
            api=Api.EXT_AUTHZ_HTTP,
            extproc_port=meshkit.port_for("ext_authz_http"),
            filters=CHAIN,
            listen_port=0,
        )
        with (
            envoy(alone.render(), workdir, name="bench-front-alone") as a,
            envoy(full.render(), workdir, name="bench-front-meshkit") as m,
        ):
            yield {
                "varnish-alone": Row(
                    "varnish-alone", a, {"x-body-hash": body_hash}, {"envoy": a.process.pid, **varnish}
                ),
                "varnish-meshkit": Row(
                    "varnish-meshkit",
                    m,
                    {"x-api-key": creds.api_key},
                    {"meshkit": meshkit.process.pid, "envoy": m.process.pid, **varnish},
                ),
            }


def _meshkit_args(creds: Credentials) -> list[str]:
    return [
        "--filters", ",".join(CHAIN), "--api-keys-file", str(creds.keys_file),
        "--routes-file", str(creds.routes_file),
    ]  # fmt: skip


def median_sample(samples: list[Sample]) -> Sample:
    return sorted(samples, key=lambda s: s.p99_ms)[len(samples) // 2]


def report(results: dict[str, list[Sample]], rate: int, connections: int = 4, processes: int = 1) -> str:
    lines = [
        f"Cache tier: a Varnish HIT at a fixed {rate} req/s (hey, {connections} connections in "
        f"{processes} process{'es' if processes > 1 else ''}), 1 KiB "
        "embeddings POST; median of "
        f"{len(next(iter(results.values())))} rounds (range of p99)",
        f"{'row':<16} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'p99 range':>13} {'max ms':>7}  "
        "CPU µs/request",
    ]
    for name, samples in results.items():
        s = median_sample(samples)
        p99s = sorted(x.p99_ms for x in samples)
        cpu = ", ".join(f"{role} {us:.0f}" for role, us in s.cpu_us.items())
        lines.append(
            f"{name:<16} {s.rate:>7.0f} {s.p50_ms:>7.2f} {s.p99_ms:>7.2f} "
            f"{f'{p99s[0]:.2f}-{p99s[-1]:.2f}':>13} {s.max_ms:>7.1f}  {cpu}"
        )
    full = median_sample(results["varnish-meshkit"])
    alone = median_sample(results["varnish-alone"])
    ok = full.p50_ms <= TARGET_P50_MS and full.p99_ms <= TARGET_P99_MS
    lines.append(
        f"target (full ingress path on a HIT): p50 <= {TARGET_P50_MS} ms, p99 <= {TARGET_P99_MS} ms: "
        f"{'met' if ok else 'MISSED'} (p50 {full.p50_ms:.2f}, p99 {full.p99_ms:.2f}; meshkit adds "
        f"{full.p50_ms - alone.p50_ms:+.2f} ms at p50, {full.p99_ms - alone.p99_ms:+.2f} ms at p99)"
    )
    return "\n".join(lines)


def run(
    rate: int, seconds: int, rounds: int, workdir: Path, workers: int = 4, processes: int = 1
) -> dict[str, list[Sample]]:
    hey = shutil.which("hey")
    if hey is None:
        raise RuntimeError("hey not found: install the Debian package `hey` (scripts/setup does)")
    creds = mint(workdir)
    body_file = workdir / "body.json"
    body_file.write_bytes(make_body(1024).replace(b"gpt-4o-mini", b"text-embedding-3-small", 1))
    results: dict[str, list[Sample]] = {name: [] for name in ROWS}
    with tier(workdir, creds, xxhash.xxh3_128_hexdigest(body_file.read_bytes())) as rows:
        for i in range(rounds):
            order = ROWS if i % 2 == 0 else ROWS[::-1]
            for name in order:
                results[name].append(measure(rows[name], hey, body_file, rate, seconds, workers, processes))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--connections", type=int, default=4, help="hey workers (each its own keep-alive connection)"
    )
    parser.add_argument(
        "--processes", type=int, default=1, help="hey processes sharing the connections and the rate"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not 1 <= args.processes <= args.connections:
        parser.error("--processes must be between 1 and --connections")
    with tempfile.TemporaryDirectory(prefix="meshkit-bench-tier-") as tmp:
        results = run(args.rate, args.duration, args.rounds, Path(tmp), args.connections, args.processes)
    print(report(results, args.rate, args.connections, args.processes))
    if args.json:
        args.json.write_text(json.dumps({k: [asdict(s) for s in v] for k, v in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
