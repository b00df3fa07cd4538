"""The benchmarks past the request path, one after the other in one run (`make bench-tiers`; `make bench`
runs them after bench/run.py): each is its own script with its own table, run here as a subprocess so a
failure in one does not hide the others, and never two at once (2 shared cores).

    cache-tier       bench/cache_tier.py       a Varnish HIT at 500 req/s: Envoy+meshkit vs Envoy alone
    embedding-store  bench/embedding_store.py  a cached batch of 16 on the S3 store vs an upstream call
    purge-fanout     bench/purge_fanout.py     PURGE fanned out to 8 real Varnish pods
    bridge           bench/bridge_rate.py      tokens/s Redis -> JetStream, deduplicated, confirmed
    streaming        bench/streaming.py        meshkit sse vs nginx + nchan, 10,000 streams

    .venv/bin/python bench/tiers.py [--only cache-tier,bridge] [--quick]

`--quick` runs each at a small scale (a smoke test of the scripts, not a measurement). Exit status: 0
when every script ran (targets missed included: each table says), 1 when one failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

BENCH = Path(__file__).resolve().parent

# name -> (script, full-run args, quick args)
SUITE: dict[str, tuple[str, list[str], list[str]]] = {
    "cache-tier": (
        "cache_tier.py",
        ["--rounds", "3", "--duration", "10"],
        ["--rounds", "1", "--duration", "2"],
    ),
    "embedding-store": ("embedding_store.py", [], ["--requests", "30", "--cold-requests", "5"]),
    "purge-fanout": ("purge_fanout.py", [], ["--sequential", "30", "--concurrent", "30"]),
    "bridge": ("bridge_rate.py", [], ["--tokens", "5000"]),
    "streaming": (
        "streaming.py",
        [],
        ["--streams", "200", "--conversations", "40", "--rate", "200", "--duration", "3"],
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(SUITE)}")
    parser.add_argument("--quick", action="store_true", help="small scale: check the scripts run")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SUITE)
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)} (known: {', '.join(SUITE)})")
    failed = []
    for name in names:
        script, full, quick = SUITE[name]
        argv_ = [sys.executable, str(BENCH / script), *(quick if args.quick else full)]
        print(f"\n=== {name}: {' '.join(argv_[1:])}", flush=True)
        started = time.monotonic()
        status = subprocess.run(argv_, cwd=BENCH, check=False).returncode
        print(f"=== {name}: exit {status} after {time.monotonic() - started:.0f} s", flush=True)
        if status != 0:
            failed.append(name)
    if failed:
        print(f"\nFAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
