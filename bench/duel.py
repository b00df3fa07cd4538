"""Two servers loaded at the same time, each behind its own front Envoy: a comparison that survives a
busy machine (bench/PROFILE.md says why and what it found).

`bench/run.py` measures one configuration after another; when other processes come and go (on a shared
2-core machine they do), back-to-back runs of one configuration move by ±30 %. Here both servers get the
same `wrk` load through their own front Envoy (`--concurrency 1`) and one shared upstream Envoy, at the
same time, so noise hits both alike, and the per-round ratio B/A is the number: its median and range
over the rounds are printed, with each side's server CPU per request and their difference B - A. A
server is one of

    meshkit[:API][:ARGS]   `meshkit extproc` with ARGS (e.g. "--event-loop asyncio"); API: ext_proc
                           (default), ext_authz or ext_authz_http
    chain:NAME[:API][:ARGS]  an auth chain of bench/chains.py (key, hs256, es256, key-redis, body-hash)
                           as `bench/run.py` runs it: its server arguments, its front Envoy's filters,
                           its credential on every request; API as above, default ext_authz_http
    naive                  bench/peers/naive_aio.py (ext_proc)

Every side POSTs the chain rows' body (`{"model": "gpt-4o-mini", "input": ...}`, --size bytes) to
/v1/embeddings. The credentials are minted once per duel (bench/credentials.py), so both sides send the
same key or token; a side whose chain keeps its rate limit in Redis gets its own real Redis, whose own
CPU per request is shown too (not in the server's). Before loading, each side must pass the checks of
bench/row_checks.py (200 with the right x-body-hash; for an auth chain also 401 without the credential,
401 for a tampered JWT, 400 for an invalid model, the limit kept in Redis), else the duel stops (exit 2).
A round whose wrk saw non-2xx answers, socket errors or requests Envoy let through unprocessed is
flagged: its CPU per request is not the chain's.

The issue's auth targets are differences of server CPU per request, B - A with A = chain:key:

    .venv/bin/python bench/duel.py chain:key chain:hs256 [--rounds 10] [--duration 6]   # <= +20 µs
    .venv/bin/python bench/duel.py chain:key chain:es256                                 # <= +20 µs
    .venv/bin/python bench/duel.py chain:key chain:key-redis                             # <= +100 µs
    .venv/bin/python bench/duel.py naive "meshkit::--event-loop uvloop"
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

from chain_targets import JWT_EXTRA_US, REDIS_EXTRA_US
from chains import Chain, meshkit_chains
from credentials import Credentials, mint
from row_checks import check_chain
from run import (  # bench/run.py: the one place the harness and the measurement are wired
    LUA_SCRIPT,
    PEERS,
    ROOT,
    URL_PATH,
    BenchError,
    check_hash,
    make_body,
    parse_wrk,
    reference_server,
    session_ticks,
    us_per_request,
)

from meshkit.errors import HarnessError, MeshkitError
from meshkit.harness.daemons import extproc
from meshkit.harness.envoy import Envoy, envoy
from meshkit.harness.redis import redis_server
from meshkit.render import Api, FrontConfig, upstream_direct

CHAINS: dict[str, Chain] = meshkit_chains()
CHAIN_DEFAULT_API = Api.EXT_AUTHZ_HTTP  # the auth chains' best path
# B - A the issue bounds (server CPU µs per request), when A is chain:key on the same API as B.
TARGETS: dict[str, float] = {"hs256": JWT_EXTRA_US, "es256": JWT_EXTRA_US, "key-redis": REDIS_EXTRA_US}
MIN_VERDICT_ROUNDS = 5  # fewer: one round's difference moves by tens of µs on this machine


@dataclass(frozen=True)
class Contender:
    """One side of the duel: which server, over which API, with which arguments."""

    label: str
    server: str  # "meshkit" | "naive" | "chain"
    api: Api
    args: tuple[str, ...] = ()
    chain: Chain | None = None

    @classmethod
    def parse(cls, spec: str, label: str) -> Contender:
        kind, _, rest = spec.partition(":")
        if kind == "naive" and not rest:
            return cls(label, "naive", Api.EXT_PROC)
        if kind == "chain":
            name, _, rest = rest.partition(":")
            if name not in CHAINS:
                raise ValueError(f"{spec!r}: unknown chain {name!r}; chains: {', '.join(CHAINS)}")
            api, _, args = rest.partition(":")
            return cls(
                label, "chain", _api(spec, api, CHAIN_DEFAULT_API), tuple(shlex.split(args)), CHAINS[name]
            )
        if kind != "meshkit":
            raise ValueError(f"{spec!r}: expected naive, meshkit[:API][:ARGS] or chain:NAME[:API][:ARGS]")
        api, _, args = rest.partition(":")
        return cls(label, "meshkit", _api(spec, api, Api.EXT_PROC), tuple(shlex.split(args)))

    def describe(self) -> str:
        what = f"chain {self.chain.name}" if self.chain is not None else self.server
        return " ".join([what, self.api.value, *self.args])


def _api(spec: str, text: str, default: Api) -> Api:
    try:
        return Api(text) if text else default
    except ValueError:
        raise ValueError(f"{spec!r}: API {text!r} is not one of {', '.join(a.value for a in Api)}") from None


@dataclass(frozen=True)
class Round:
    rps: float
    cpu_us: float  # the server's whole session, per request wrk completed
    redis_us: float | None  # the side's Redis, per request (a rate-limit chain only)
    errors: str  # "" when every request got 2xx and Envoy let none through unprocessed


@dataclass
class Side:
    contender: Contender
    server_pid: int
    front: Envoy
    url: str
    headers_file: Path | None = None
    redis_pid: int | None = None
    rounds: list[Round] = field(default_factory=list)


def start(
    stack: contextlib.ExitStack,
    who: Contender,
    upstream_port: int,
    workdir: Path,
    body: bytes,
    creds: Credentials | None,
) -> Side:
    """Start `who` (and its Redis) and its front Envoy; the set-up checks once, as bench/run.py does."""
    filters = FrontConfig.filters
    redis_url = redis_pid = None
    headers: dict[str, str] = {}
    if who.server == "naive":
        pid, port = stack.enter_context(
            reference_server(who.label, sys.executable, PEERS / "naive_aio.py", workdir)
        )
    else:
        args = list(who.args)
        if who.chain is not None:
            assert creds is not None
            if who.chain.redis:
                redis = stack.enter_context(
                    redis_server(workdir / f"redis-{who.label}", name=f"{who.label}-redis")
                )
                redis_url, redis_pid = redis.url, redis.process.pid
            args = [*who.chain.server_args(creds, redis_url), *args]
            filters = who.chain.filters
            headers = who.chain.headers(creds)
        server = stack.enter_context(extproc(workdir, args, name=who.label))
        pid, port = server.process.pid, server.port_for(who.api)
    config = FrontConfig(
        upstream_ports=(upstream_port,), extproc_port=port, api=who.api, filters=filters, listen_port=0
    )
    front = stack.enter_context(envoy(config.render(), workdir, name=f"{who.label}-front"))
    url = front.url("ingress", URL_PATH)
    reason = check_hash(url, body, expect_hash=True, headers=headers)
    if reason is None and who.chain is not None and who.chain.authenticates:
        assert creds is not None
        reason = check_chain(url, body, who.chain, creds, redis_url)
    if reason is not None:
        raise HarnessError(f"{who.label} ({who.describe()}): set-up check failed: {reason}")
    headers_file = None
    if headers:
        headers_file = workdir / f"headers-{who.label}.txt"
        headers_file.write_text("".join(f"{k}: {v}\n" for k, v in headers.items()))
    return Side(who, pid, front, url, headers_file, redis_pid)


def load_both(sides: Sequence[Side], seconds: int, body_file: Path, connections: int) -> list[str]:
    """One wrk per side, started together (each with its side's credential headers); their outputs."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(LUA_SCRIPT)]
    procs = []
    for side in sides:
        env = {
            **os.environ,
            "BENCH_BODY_FILE": str(body_file),
            "BENCH_HEADERS_FILE": str(side.headers_file or ""),
        }
        procs.append(subprocess.Popen([*argv, side.url], env=env, stdout=subprocess.PIPE, text=True))
    outputs = [proc.communicate(timeout=seconds + 60)[0] for proc in procs]
    for side, proc in zip(sides, procs, strict=True):
        if proc.returncode != 0:
            raise BenchError(f"{side.contender.label}: wrk exited with status {proc.returncode}")
    return outputs


def one_round(sides: Sequence[Side], args: argparse.Namespace, body_file: Path) -> None:
    load_both(sides, 1, body_file, args.connections)  # warm-up
    open_before = [side.front.failed_open() for side in sides]
    before = [(session_ticks(s.server_pid), session_ticks(s.redis_pid) if s.redis_pid else 0) for s in sides]
    outputs = load_both(sides, args.duration, body_file, args.connections)
    after = [(session_ticks(s.server_pid), session_ticks(s.redis_pid) if s.redis_pid else 0) for s in sides]
    open_after = [side.front.failed_open() for side in sides]
    for i, (side, out) in enumerate(zip(sides, outputs, strict=True)):
        result = parse_wrk(out)
        if not result.requests:
            raise BenchError(f"{side.contender.label}: wrk completed no requests")
        cpu = us_per_request(after[i][0] - before[i][0], result.requests) or 0.0
        redis = us_per_request(after[i][1] - before[i][1], result.requests) if side.redis_pid else None
        problems = [f"{k} {v}" for k, v in result.socket_errors.items()]
        if result.non_2xx:
            problems.insert(0, f"non-2xx {result.non_2xx}")
        if open_after[i] > open_before[i]:
            problems.append(f"unprocessed {open_after[i] - open_before[i]}")
        side.rounds.append(Round(result.rps, cpu, redis, ", ".join(problems)))


def spread(values: Sequence[float], spec: str = ".3f") -> str:
    return f"{statistics.median(values):{spec}} ({min(values):{spec}} to {max(values):{spec}})"


def round_line(n: int, a: Side, b: Side) -> str:
    ra, rb = a.rounds[-1], b.rounds[-1]
    line = (
        f"round {n}: A {ra.rps:,.0f} req/s {ra.cpu_us:.0f} µs/req | B {rb.rps:,.0f} req/s "
        f"{rb.cpu_us:.0f} µs/req | B/A req/s {rb.rps / ra.rps:.3f}, B - A {rb.cpu_us - ra.cpu_us:+.0f} µs/req"
    )
    for side, r in (("A", ra), ("B", rb)):
        if r.redis_us is not None:
            line += f" | {side}'s Redis {r.redis_us:.0f} µs/req"
        if r.errors:
            line += f" | {side} ERRORS: {r.errors}"
    return line


def report(a: Side, b: Side) -> str:
    lines = []
    for side in (a, b):
        rps = [r.rps for r in side.rounds]
        cpu = [r.cpu_us for r in side.rounds]
        line = (
            f"{side.contender.label:>2} {side.contender.describe()}: "
            f"req/s median {statistics.median(rps):,.0f} "
            f"({min(rps):,.0f}-{max(rps):,.0f}), server CPU µs/req median {statistics.median(cpu):.0f} "
            f"({min(cpu):.0f}-{max(cpu):.0f})"
        )
        redis = [r.redis_us for r in side.rounds if r.redis_us is not None]
        if redis:
            line += f", its Redis's CPU µs/req median {statistics.median(redis):.0f}"
        lines.append(line)
    pairs = list(zip(a.rounds, b.rounds, strict=True))
    rps_ratio = [rb.rps / ra.rps for ra, rb in pairs]
    cpu_ratio = [rb.cpu_us / ra.cpu_us for ra, rb in pairs if ra.cpu_us]
    cpu_diff = [rb.cpu_us - ra.cpu_us for ra, rb in pairs]
    lines.append(
        f"B/A over {len(pairs)} rounds: req/s {spread(rps_ratio)}; CPU per request {spread(cpu_ratio)}"
    )
    lines.append(f"B - A server CPU µs/req over {len(pairs)} rounds: median {spread(cpu_diff, '+.1f')}")
    if any(r.redis_us is not None for r in (*a.rounds, *b.rounds)):
        with_redis = [
            (rb.cpu_us + (rb.redis_us or 0.0)) - (ra.cpu_us + (ra.redis_us or 0.0)) for ra, rb in pairs
        ]
        lines.append(f"(info) B - A with each side's Redis CPU included: median {spread(with_redis, '+.1f')}")
    ca, cb = a.contender.chain, b.contender.chain
    if ca is not None and cb is not None and ca.name == "key" and cb.name in TARGETS:
        limit, got = TARGETS[cb.name], statistics.median(cpu_diff)
        same_api = a.contender.api == b.contender.api and not a.contender.args and not b.contender.args
        verdict = (
            ("met" if got <= limit else "missed")
            if same_api
            else "n/a (the sides differ in more than the chain)"
        )
        if same_api and len(pairs) < MIN_VERDICT_ROUNDS:
            verdict += f" (only {len(pairs)} round(s): a smoke test, not a measurement)"
        lines.append(
            f"target (issue 12): {cb.name} - key server CPU <= +{limit:.0f} µs/req: {got:+.1f}: {verdict}"
        )
    flagged = [
        f"{s.contender.label} round {n}" for s in (a, b) for n, r in enumerate(s.rounds, 1) if r.errors
    ]
    if flagged:
        lines.append(
            f"WARNING: errors in {', '.join(flagged)} (see the round lines): CPU per request is suspect"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Two servers loaded at once through real Envoy.")
    what = "naive, meshkit[:API][:ARGS] or chain:NAME[:API][:ARGS]"
    parser.add_argument("a", help=f"server A: {what}")
    parser.add_argument("b", help=f"server B: {what}")
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
    creds = mint(workdir) if args.a.chain is not None or args.b.chain is not None else None
    print(f"A: {args.a.describe()}\nB: {args.b.describe()}\nlogs in {workdir}", flush=True)
    try:
        with contextlib.ExitStack() as stack:
            upstream = stack.enter_context(envoy(upstream_direct(), workdir, name="upstream"))
            port = upstream.listeners["upstream"][1]
            a, b = (start(stack, who, port, workdir, body, creds) for who in (args.a, args.b))
            for n in range(1, args.rounds + 1):
                one_round((a, b), args, body_file)
                print(round_line(n, a, b), flush=True)
    except (MeshkitError, BenchError, ValueError, OSError, subprocess.SubprocessError) as exc:
        print(f"error: {exc}\n(logs in {workdir})", file=sys.stderr)
        return 2
    print(report(a, b))
    return 0


if __name__ == "__main__":
    sys.exit(main())
