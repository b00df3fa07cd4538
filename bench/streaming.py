"""The token-streaming benchmark: `meshkit loadgen` against nginx + nchan and against `meshkit sse`, under
the same load (the issue's row: 10,000 concurrent streams, 1,000 tokens/s over 2,000 conversations, 20 s).

    nchan   a real nginx + nchan (`meshkit.harness.nchan`, one worker); tokens POSTed to its publisher
    sse     NATS origin (JetStream, domain `origin`, the CHAT stream) + leaf; `meshkit sse` on the leaf;
            tokens published to the origin (core publish with Nats-Msg-Id, stored by CHAT), as a bridge
            would put them there

`measure()` runs one loadgen against a running target and returns a `StreamingRow`: p50/p99/max latency,
the target's CPU (% of one core, over the publishing window; every process of the target and its
children), its RSS per open stream, delivered/expected, and whether the generator itself was
saturated (then the row measures the tool, not the target). `nchan_row()` / `sse_row()` start the
target, measure, stop it. `compare()` checks the issue's targets for meshkit against nchan: p99 <= 1.5x,
CPU <= 3x, <= 40 KB per open stream, every token once.

Viewers are spread over `processes` loadgen workers (default: enough for the fd limit, and about 5,000
deliveries/s each: one asyncio process saturates near 20k/s, and on 2 shared cores a margin matters).

Measured (2026-12-02, 2 shared cores, the issue's load, `--target both`, medians of 3 runs, range):
nchan p50 1.28 ms, p99 2.56 (2.40-2.85), 9.0 % of a core, 18 KB/stream; meshkit sse (live copies by
core subscription) p50 1.82, p99 5.12 (4.74-5.63), max 25, 19.6 % (18.8-19.8), 26 KB/stream, every
token once, neither generator saturated: CPU 2.2x nchan's (target 3x), p99 2.0x (target 1.5x). With
`--probe`, a bare subscriber on the leaf in the same kind of run: p50 0.86, p99 3.30 ms - the broker
path alone is 1.3x nchan's whole path. One ordered consumer per conversation (before) gave p99 10.1,
24 %; before the direct writes and the GC pacing, p99 263 ms, 41 %.

    .venv/bin/python bench/streaming.py [--target nchan|sse|both] [--streams 10000] [--conversations 2000]
        [--rate 1000] [--duration 20] [--processes P] [--json FILE] [--reports DIR] [--probe]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from meshkit.edge.loadgen import LoadgenOptions, run_loadgen
from meshkit.harness.nchan import nchan_server

DELIVERIES_PER_PROCESS = 5_000
STREAMS_PER_PROCESS = 9_000  # under the 20,000 fd limit with room to spare
TARGET_P99_RATIO = 1.5
TARGET_CPU_RATIO = 3.0
TARGET_KB_PER_STREAM = 40.0


@dataclass(frozen=True)
class StreamingLoad:
    streams: int = 10_000
    conversations: int = 2_000
    rate: float = 1_000.0  # tokens/s in total
    duration: float = 20.0
    processes: int | None = None  # None: default_processes()

    @property
    def viewers(self) -> int:
        if self.streams % self.conversations:
            raise ValueError(
                f"{self.streams} streams is not a multiple of {self.conversations} conversations"
            )
        return self.streams // self.conversations

    def default_processes(self) -> int:
        deliveries = self.rate * self.viewers
        return max(
            1, math.ceil(deliveries / DELIVERIES_PER_PROCESS), math.ceil(self.streams / STREAMS_PER_PROCESS)
        )


@dataclass(frozen=True)
class StreamingRow:
    target: str
    streams: int
    opened: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    target_cpu_percent: float | None
    kb_per_stream: float | None
    kb_per_stream_delta: float | None
    delivered: int
    expected: int
    exactly_once_in_order: bool
    generator_saturated: bool
    verdict: str


async def measure(
    target: str,
    url: str,
    load: StreamingLoad,
    *,
    target_pids: Sequence[int],
    publish: str | None = None,
    nats_url: str | None = None,
    json_file: Path | None = None,
    progress: bool = True,
) -> tuple[StreamingRow, dict[str, Any]]:
    """One loadgen run against a running target: the row and the whole report."""
    report = await run_loadgen(
        LoadgenOptions(
            target=target,
            url=url,
            conversations=load.conversations,
            viewers=load.viewers,
            rate=load.rate,
            duration=load.duration,
            publish=publish,
            nats=nats_url,
            processes=load.processes or load.default_processes(),
            target_pids=tuple(target_pids),
            json_file=json_file,
            connect_timeout=60.0,
            drain_timeout=10.0,
            progress=progress,
        )
    )
    return row_of(target, report), report


def row_of(target: str, report: dict[str, Any]) -> StreamingRow:
    lat, m, t, g = report["latency_ms"], report["messages"], report["target"], report["generator"]
    return StreamingRow(
        target=target,
        streams=report["streams"]["planned"],
        opened=report["streams"]["opened"],
        p50_ms=lat["p50"],
        p99_ms=lat["p99"],
        max_ms=lat["max"],
        target_cpu_percent=t["cpu_percent"],
        kb_per_stream=t["kb_per_stream"],
        kb_per_stream_delta=t["kb_per_stream_delta"],
        delivered=m["delivered"],
        expected=m["expected"],
        exactly_once_in_order=m["exactly_once_in_order"],
        generator_saturated=g["saturated"],
        verdict=g["verdict"],
    )


def nchan_row(
    load: StreamingLoad, workdir: Path, *, json_file: Path | None = None, progress: bool = True
) -> StreamingRow:
    """nginx + nchan started in `workdir`, measured under `load`, stopped."""
    with nchan_server(workdir) as nchan:
        row, _ = asyncio.run(
            measure("nchan", nchan.url, load, target_pids=[nchan.pid], json_file=json_file, progress=progress)
        )
    return row


def sse_row(
    load: StreamingLoad,
    workdir: Path,
    *,
    json_file: Path | None = None,
    progress: bool = True,
    probe: dict[str, Any] | None = None,
) -> StreamingRow:
    """NATS origin + leaf and `meshkit sse` on the leaf, measured under `load`, stopped. With `probe`
    (a dict), a bare subscriber on the leaf (`nats_probe.py`) measures the broker path alone during
    the run, and its numbers go into the dict."""
    import nats

    from meshkit.edge.token_stream import ensure_stream
    from meshkit.harness.edge_daemons import sse_adapter
    from meshkit.harness.nats import nats_server

    async def create_stream(url: str) -> None:
        nc = await nats.connect(url)
        try:
            await ensure_stream(nc.jetstream())
        finally:
            await nc.close()

    with (
        nats_server(workdir, name="bench-origin") as origin,
        nats_server(workdir, jetstream=False, leaf_remote=origin.leaf_url, name="bench-leaf") as leaf,
    ):
        asyncio.run(create_stream(origin.url))
        with (
            sse_adapter(workdir, leaf.url, js_domain=origin.domain) as adapter,
            nats_probe(leaf.url, workdir / "probe.json", enabled=probe is not None) as probed,
        ):
            row, _ = asyncio.run(
                measure(
                    "sse",
                    adapter.url,
                    load,
                    target_pids=[adapter.process.pid],
                    publish="nats",
                    nats_url=origin.url,
                    json_file=json_file,
                    progress=progress,
                )
            )
        if probe is not None:
            probe.update(probed())
    return row


@contextlib.contextmanager
def nats_probe(url: str, out: Path, *, enabled: bool) -> Iterator[Callable[[], dict[str, Any]]]:
    """`nats_probe.py` on `url` while the block runs (nothing when not `enabled`); the callable gives
    its numbers after the block (stopped with SIGTERM first)."""
    result: dict[str, Any] = {}
    if not enabled:
        yield lambda: result
        return
    argv = [sys.executable, str(Path(__file__).with_name("nats_probe.py")), "--nats", url, "--json", str(out)]
    proc = subprocess.Popen(argv)
    try:
        yield lambda: result
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.returncode == 0 and out.exists():
            result.update(json.loads(out.read_text()))
        else:
            result["error"] = f"nats_probe exited {proc.returncode}"


def compare(sse: StreamingRow, nchan: StreamingRow) -> dict[str, bool | None]:
    """The issue's targets for meshkit sse against nchan (None: a number is missing)."""

    def ratio_ok(ours: float | None, theirs: float | None, limit: float) -> bool | None:
        if ours is None or theirs is None or theirs <= 0:
            return None
        return ours <= limit * theirs

    return {
        "p99_within_1.5x_nchan": ratio_ok(sse.p99_ms, nchan.p99_ms, TARGET_P99_RATIO),
        "cpu_within_3x_nchan": ratio_ok(sse.target_cpu_percent, nchan.target_cpu_percent, TARGET_CPU_RATIO),
        "kb_per_stream_at_most_40": None
        if sse.kb_per_stream is None
        else sse.kb_per_stream <= TARGET_KB_PER_STREAM,
        "every_token_once": sse.exactly_once_in_order,
        "neither_generator_saturated": not (sse.generator_saturated or nchan.generator_saturated),
    }


def table(rows: Sequence[StreamingRow]) -> str:
    head = (
        f"{'target':<7} {'streams':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'CPU %':>6} {'KB/str':>7} "
        "delivered/expected"
    )

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = [head]
    for r in rows:
        lines.append(
            f"{r.target:<7} {r.opened:>8,} {f(r.p50_ms):>7} {f(r.p99_ms):>7} {f(r.max_ms):>7} "
            f"{f(r.target_cpu_percent):>6} {f(r.kb_per_stream):>7} {r.delivered:,}/{r.expected:,}"
            + ("" if r.exactly_once_in_order else "  NOT every token once")
            + ("  GENERATOR SATURATED" if r.generator_saturated else "")
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--target", choices=("nchan", "sse", "both"), default="both")
    parser.add_argument("--streams", type=int, default=StreamingLoad.streams)
    parser.add_argument("--conversations", type=int, default=StreamingLoad.conversations)
    parser.add_argument("--rate", type=float, default=StreamingLoad.rate)
    parser.add_argument("--duration", type=float, default=StreamingLoad.duration)
    parser.add_argument("--processes", type=int)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--probe",
        action="store_true",
        help="with the sse row: a bare NATS subscriber on the leaf measures the broker path alone "
        "(bench/nats_probe.py)",
    )
    parser.add_argument(
        "--reports",
        type=Path,
        help="a directory for each target's whole loadgen report (nchan.json, sse.json)",
    )
    args = parser.parse_args(argv)
    if args.reports:
        args.reports.mkdir(parents=True, exist_ok=True)

    def report(name: str) -> Path | None:
        return args.reports / f"{name}.json" if args.reports else None

    load = StreamingLoad(args.streams, args.conversations, args.rate, args.duration, args.processes)
    rows = []
    with tempfile.TemporaryDirectory(prefix="meshkit-bench-streaming-") as tmp:
        if args.target in ("nchan", "both"):
            rows.append(nchan_row(load, Path(tmp) / "nchan", json_file=report("nchan")))
        probe: dict[str, Any] | None = {} if args.probe else None
        if args.target in ("sse", "both"):
            rows.append(sse_row(load, Path(tmp) / "sse", json_file=report("sse"), probe=probe))
    print(table(rows))
    out: dict[str, Any] = {"load": asdict(load), "rows": [asdict(r) for r in rows]}
    if probe is not None:
        out["nats_probe"] = probe
        print(
            "nats path alone (publisher -> origin -> leaf -> a bare subscriber, during the sse row): "
            + ", ".join(f"{k} {v:.2f}" for k, v in probe.items() if k.endswith("_ms") and v is not None)
            + f", {probe.get('messages', 0):,} messages"
        )
    if len(rows) == 2:
        out["targets"] = compare(rows[1], rows[0])
        print(json.dumps(out["targets"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
