"""Two servers loaded at the same time, each behind its own front Envoy: a comparison that survives a
busy machine (bench/PROFILE.md says why and what it found).

`bench/run.py` measures one configuration after another; when other processes come and go (on a shared
2-core machine they do), back-to-back runs of one configuration move by ±30 %. Here both servers get the
same `wrk` load through their own front Envoy (`--concurrency 1`) and one shared upstream Envoy, at the
same time, so noise hits both alike, and the per-round ratio B/A is the number: its median and range
over the rounds are printed. A server is one of

    meshkit[:API][:ARGS]   `meshkit extproc` with ARGS (e.g. "--event-loop asyncio"); API: ext_proc
                           (default), ext_authz or ext_authz_http
    naive                  bench/peers/naive_aio.py (ext_proc)

    .venv/bin/python bench/duel.py naive "meshkit::--event-loop uvloop" [--rounds 10] [--duration 6]
    .venv/bin/python bench/duel.py "meshkit:ext_authz:--event-loop uvloop" \
                                   "meshkit:ext_authz:--event-loop asyncio"

Exit status: 0 after a run, 2 on a usage or set-up error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from run import (  # bench/run.py: the one place the harness and the measurement are wired
    LUA_SCRIPT,
    PEERS,
    ROOT,
    check_hash,
    make_body,
    parse_wrk,
    reference_server,
    session_ticks,
    us_per_request,
)

from meshkit.errors import HarnessError
from meshkit.harness.daemons import extproc
from meshkit.harness.envoy import envoy
from meshkit.render import Api, FrontConfig, upstream_direct


@dataclass(frozen=True)
class Contender:
    """One side of the duel: which server, over which API, with which arguments."""

    label: str
    server: str  # "meshkit" | "naive"
    api: Api
    args: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str, label: str) -> Contender:
        kind, _, rest = spec.partition(":")
        if kind == "naive" and not rest:
            return cls(label, "naive", Api.EXT_PROC)
        if kind != "meshkit":
            raise ValueError(f"{spec!r}: expected naive or meshkit[:API][:ARGS]")
        api, _, args = rest.partition(":")
        return cls(label, "meshkit", Api(api or Api.EXT_PROC.value), tuple(shlex.split(args)))


@dataclass
class Side:
    contender: Contender
    server_pid: int
    front_pid: int
    url: str
    rounds: list[tuple[float, float]] = field(default_factory=list)  # (req/s, server µs per request)


def start(
    stack: contextlib.ExitStack, who: Contender, upstream_port: int, workdir: Path, body: bytes
) -> Side:
    """Start `who` and its front Envoy; check the hash once, as bench/run.py does."""
    if who.server == "naive":
        pid, port = stack.enter_context(
            reference_server(who.label, sys.executable, PEERS / "naive_aio.py", workdir)
        )
    else:
        server = stack.enter_context(extproc(workdir, who.args, name=who.label))
        pid, port = server.process.pid, server.port_for(who.api)
    config = FrontConfig(upstream_ports=(upstream_port,), extproc_port=port, api=who.api, listen_port=0)
    front = stack.enter_context(envoy(config.render(), workdir, name=f"{who.label}-front"))
    url = front.url("ingress", "/bench")
    reason = check_hash(url, body, expect_hash=True)
    if reason is not None:
        raise HarnessError(f"{who.label}: {reason}")
    return Side(who, pid, front.process.pid, url)


def load_both(sides: Sequence[Side], seconds: int, body_file: Path, connections: int) -> list[str]:
    """One wrk per side, started together; their outputs."""
    env = {**os.environ, "BENCH_BODY_FILE": str(body_file)}
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(LUA_SCRIPT)]
    procs = [
        subprocess.Popen([*argv, side.url], env=env, stdout=subprocess.PIPE, text=True) for side in sides
    ]
    return [proc.communicate(timeout=seconds + 60)[0] for proc in procs]


def one_round(sides: Sequence[Side], args: argparse.Namespace, body_file: Path) -> None:
    load_both(sides, 1, body_file, args.connections)  # warm-up
    before = [session_ticks(side.server_pid) for side in sides]
    outputs = load_both(sides, args.duration, body_file, args.connections)
    after = [session_ticks(side.server_pid) for side in sides]
    for side, out, start_ticks, end_ticks in zip(sides, outputs, before, after, strict=True):
        result = parse_wrk(out)
        cpu = us_per_request(end_ticks - start_ticks, result.requests) or 0.0
        side.rounds.append((result.rps, cpu))


def spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def report(a: Side, b: Side) -> str:
    lines = []
    for side in (a, b):
        rps = [r for r, _ in side.rounds]
        cpu = [c for _, c in side.rounds]
        lines.append(
            f"{side.contender.label:>2} {side.contender.server} {side.contender.api.value} "
            f"{' '.join(side.contender.args)}: req/s median {statistics.median(rps):,.0f} "
            f"({min(rps):,.0f}-{max(rps):,.0f}), server CPU µs/req median {statistics.median(cpu):.0f} "
            f"({min(cpu):.0f}-{max(cpu):.0f})"
        )
    rps_ratio = [rb / ra for (ra, _), (rb, _) in zip(a.rounds, b.rounds, strict=True)]
    cpu_ratio = [cb / ca for (_, ca), (_, cb) in zip(a.rounds, b.rounds, strict=True) if ca]
    lines.append(
        f"B/A over {len(rps_ratio)} rounds: req/s {spread(rps_ratio)}; CPU per request {spread(cpu_ratio)}"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Two servers loaded at once through real Envoy.")
    parser.add_argument("a", help="server A: naive or meshkit[:API][:ARGS]")
    parser.add_argument("b", help="server B: naive or meshkit[:API][:ARGS]")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--duration", type=int, default=6, help="seconds of each measured round")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections per side")
    parser.add_argument("--size", type=int, default=1024, help="POST body size in bytes")
    parser.add_argument("--workdir", type=Path, default=None, help="logs (default build/duel/TIME)")
    args = parser.parse_args(argv)
    try:
        args.a, args.b = Contender.parse(args.a, "A"), Contender.parse(args.b, "B")
    except ValueError as exc:
        parser.error(str(exc))
    if min(args.rounds, args.duration, args.connections, args.size) < 1:
        parser.error("--rounds, --duration, --connections and --size must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("error: wrk not found on PATH: install it (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    workdir = args.workdir or ROOT / "build" / "duel" / time.strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    body = make_body(args.size)
    body_file = workdir / "body.bin"
    body_file.write_bytes(body)
    try:
        with contextlib.ExitStack() as stack:
            upstream = stack.enter_context(envoy(upstream_direct(), workdir, name="upstream"))
            port = upstream.listeners["upstream"][1]
            a, b = (start(stack, who, port, workdir, body) for who in (args.a, args.b))
            for n in range(1, args.rounds + 1):
                one_round((a, b), args, body_file)
                (ra, ca), (rb, cb) = a.rounds[-1], b.rounds[-1]
                print(
                    f"round {n}: A {ra:,.0f} req/s {ca:.0f} µs/req | B {rb:,.0f} req/s {cb:.0f} µs/req",
                    file=sys.stderr,
                    flush=True,
                )
    except (HarnessError, OSError, subprocess.SubprocessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report(a, b))
    return 0


if __name__ == "__main__":
    sys.exit(main())
