"""meshkit's benchmark (`make bench`): meshkit's filter chains through one real front Envoy, side by side.

Every configuration (a row) puts the same front Envoy (`--concurrency 1`) in front of one shared upstream
Envoy that answers 200 itself (`upstream_direct()`); wrk POSTs an OpenAI-style embeddings request
`{"model": "gpt-4o-mini", "input": "..."}` padded to the body size, to /v1/embeddings:

    envoy-alone        FrontConfig(api=None), no filter: the ceiling
    meshkit-PATH       `meshkit extproc --filters body-hash`                        (chain body-hash)
    key-PATH           `--filters auth,body-hash,model-router --api-keys-file F`,
                       requests with `x-api-key`                                    (chain key)
    hs256-PATH         the same with `--jwt-secret-file`, `Authorization: Bearer <HS256 JWT>` (hs256)
    es256-PATH         the same with `--jwks` (a P-256 key with a kid), an ES256 JWT          (es256)
    key-redis-PATH     key + `--redis URL --rate-limit N` with a limit that never trips    (key-redis)
    naive-aio          bench/peers/naive_aio.py (meshkit's venv) + ext_proc: the naive baseline
    peer-sdk           bench/peers/peer_sdk.py (envoy-extproc-sdk, own venv) + ext_proc: the peer to beat

PATH is extproc (ext_proc: headers SEND + BUFFERED body), extauthz (one unary gRPC Check with the body)
or authzhttp (one keep-alive HTTP/1.1 check). One meshkit server per chain serves its three paths (a
front Envoy each, one after the other). The auth chains run with `--routes-file` (POST /v1/embeddings
needs the scope `embeddings`) on credentials minted for the run (bench/credentials.py); each JWT row
sends one token, so meshkit verifies it once and then answers from its cache: the rows are "cached".
The rate-limit rows share one real Redis (`meshkit.harness.redis`), whose own CPU has its own column.

Before loading a row, real requests check that its chain ran (bench/row_checks.py): 200 and the front
Envoy echoes `x-body-hash` equal to XXH3-128 of the body (absent for envoy-alone); for the auth chains
also 401 without a credential, 401 for a tampered JWT, 400 for an invalid `model` (model-router), and
`x-ratelimit-limit` plus a key in Redis for the rate-limit rows. A row that fails is FAILED, not
measured. The load is `wrk --latency` with bench/post.lua (a 1 s warm-up run, then the measured run).
During the measured run the CPU time (utime+stime of every thread, plus reaped children) of the server's
whole session, the front Envoy's, the upstream's and Redis's is read from /proc and divided by the
requests wrk completed; "bound by" names the process that kept about a whole CPU busy (the server's
event loop and Envoy's one worker cannot use more), else "all CPUs" when the machine was full, else
"waits" (CPU to spare: round trips). Requests Envoy let through unprocessed because the server failed or
timed out (`failure_mode_allow`) are counted from Envoy's stats and reported as errors. With --rounds N
every row runs N times, interleaved; the median row is reported with the rounds' range of req/s.
Two target blocks follow: body-hash alone, and the auth chains (bench/chain_targets.py).

    .venv/bin/python bench/run.py [--sizes 1024,65536] [--chain-sizes 1024] [--duration 6] [--rounds 3]
                                  [--configs 'envoy-alone,key-*'] [--chains envoy,key,hs256]
                                  [--paths authzhttp] [--meshkit-args "--event-loop asyncio"]
                                  [--json build/bench.json]

--sizes are the body sizes of the rows without auth, --chain-sizes those of the auth chains (1 KiB by
default, to keep `make bench` near 10 minutes); --configs (names or globs), --chains and --paths select
a subset (all three apply; a path filter keeps envoy-alone, naive-aio and peer-sdk).

Exit status: 0 after a run (targets missed included), 1 if a meshkit row FAILED, 2 on a usage or set-up
error (no wrk, the upstream Envoy does not start).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import random
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chain_targets import chain_checks, render_checks
from chains import PATHS, Chain, meshkit_chains, row_label
from credentials import Credentials, mint
from row_checks import check_chain
from row_checks import check_hash as check_hash

from meshkit.errors import HarnessError, MeshkitError
from meshkit.harness.daemons import Extproc, extproc
from meshkit.harness.envoy import Envoy, envoy
from meshkit.harness.process import ManagedProcess, log_match, log_matches
from meshkit.harness.redis import redis_server
from meshkit.render import Api, FrontConfig, upstream_direct

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PEERS = BENCH / "peers"
LUA_SCRIPT = BENCH / "post.lua"
URL_PATH = "/v1/embeddings"
MODEL = "gpt-4o-mini"
TIMES = "\u00d7"  # the multiplication sign of the ratio columns
CLK_TCK = os.sysconf("SC_CLK_TCK")

BASELINE = "envoy-alone"
PEER = "peer-sdk"
MESHKIT_ROWS = ("meshkit-extproc", "meshkit-extauthz", "meshkit-authzhttp")
# The targets of the issue, all stated for 1 KiB bodies.
TARGET_SIZE = 1024
TARGET_VS_PEER = 2.0
TARGET_VS_ENVOY = 0.40
TARGET_CPU_US = 250.0
MOONSHOT_CPU_US = 150.0


CHAINS: dict[str, Chain] = meshkit_chains()


@dataclass(frozen=True)
class Config:
    label: str
    api: Api | None  # None: Envoy alone
    server: str  # "none" | "meshkit" | "naive" | "peer"
    chain: str  # "envoy", "naive", "peer" or a name from CHAINS
    path: str = ""  # the PATHS key of a meshkit row

    @property
    def auth_row(self) -> bool:
        """A row of an auth chain: measured at --chain-sizes (the others at --sizes)."""
        return self.chain in CHAINS and CHAINS[self.chain].authenticates


def _meshkit_configs(chains: Sequence[str]) -> list[Config]:
    return [Config(row_label(c, p), api, "meshkit", c, p) for c in chains for p, api in PATHS.items()]


CONFIGS: dict[str, Config] = {
    c.label: c
    for c in (
        Config("envoy-alone", None, "none", "envoy"),
        *_meshkit_configs(["body-hash"]),
        Config("naive-aio", Api.EXT_PROC, "naive", "naive"),
        Config("peer-sdk", Api.EXT_PROC, "peer", "peer"),
        *_meshkit_configs([c for c in CHAINS if c != "body-hash"]),
    )
}
CHAIN_NAMES = ("envoy", "naive", "peer", *CHAINS)


class BenchError(Exception):
    """A measurement could not be taken (wrk failed, its output could not be read)."""


# -- wrk ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: dict[str, int]

    @property
    def error_count(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


_TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def to_ms(value: str, unit: str) -> float:
    return float(value) * _TIME_UNITS_MS[unit]


def _search(pattern: str, text: str) -> re.Match[str]:
    match = re.search(pattern, text, re.MULTILINE)
    if match is None:
        raise BenchError(f"wrk output has no line matching {pattern!r}:\n{text}")
    return match


def parse_wrk(text: str) -> WrkResult:
    done = _search(r"^\s*(\d+) requests in ([\d.]+)(\w+),", text)
    p50 = _search(r"^\s*50%\s+([\d.]+)(\w+)", text)
    p99 = _search(r"^\s*99%\s+([\d.]+)(\w+)", text)
    rps = _search(r"^Requests/sec:\s+([\d.]+)", text)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    socket_errors = {}
    if sock is not None:
        kinds = ("connect", "read", "write", "timeout")
        socket_errors = {k: int(v) for k, v in zip(kinds, sock.groups(), strict=True) if int(v)}
    return WrkResult(
        requests=int(done.group(1)),
        seconds=to_ms(done.group(2), done.group(3)) / 1000.0,
        rps=float(rps.group(1)),
        p50_ms=to_ms(*p50.groups()),
        p99_ms=to_ms(*p99.groups()),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=socket_errors,
    )


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk(
    wrk: str, url: str, body_file: Path, seconds: int, args: argparse.Namespace, headers_file: Path | None
) -> tuple[WrkResult, float]:
    """One wrk run; returns its parsed result and wrk's own CPU seconds."""
    argv = [wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds}s", "--latency"]
    argv += ["-s", str(LUA_SCRIPT), url]
    env = {**os.environ, "BENCH_BODY_FILE": str(body_file), "BENCH_HEADERS_FILE": str(headers_file or "")}
    before = children_cpu_seconds()
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=seconds + 60, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {seconds + 60} s") from exc
    wrk_cpu = children_cpu_seconds() - before
    if proc.returncode != 0:
        raise BenchError(f"wrk exited with status {proc.returncode}: {proc.stderr.strip() or proc.stdout}")
    return parse_wrk(proc.stdout), wrk_cpu


# -- CPU accounting from /proc -----------------------------------------------------------------------
def _stat_fields(pid_dir: Path) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 is field 3, `state`)."""
    try:
        text = (pid_dir / "stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def session_ticks(sid: int) -> int:
    """utime+stime+cutime+cstime (all threads) of every process in session `sid`, in clock ticks.

    The harness starts each server in its own session, so this is the server's whole process tree;
    cutime/cstime keep the CPU of children that exited and were reaped inside the tree.
    """
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry)
        if fields is not None and int(fields[3]) == sid:
            total += sum(int(f) for f in fields[11:15])
    return total


def machine_ticks() -> tuple[int, int, int]:
    """(busy, steal, total) clock ticks of all CPUs since boot, from /proc/stat.

    `busy` is what ran here (user, nice, system, irq, softirq); `steal` is time the hypervisor gave
    our virtual CPUs to someone else; `total` adds idle and iowait. Guest time is already in user/nice.
    """
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    busy = user + nice + system + irq + softirq
    return busy, steal, busy + steal + idle + iowait


@dataclass(frozen=True)
class CpuSnapshot:
    sessions: dict[str, int]
    machine: tuple[int, int, int]

    @classmethod
    def take(cls, pids: dict[str, int]) -> CpuSnapshot:
        return cls({role: session_ticks(pid) for role, pid in pids.items()}, machine_ticks())


def us_per_request(ticks: int, requests: int) -> float | None:
    return ticks / CLK_TCK / requests * 1e6 if requests else None


# -- the request body ------------------------------------------------------------------------------
def make_body(size: int) -> bytes:
    """An OpenAI-style embeddings request of exactly `size` bytes (at least the skeleton's), the same in
    every run: `{"model": "gpt-4o-mini", "input": "<printable padding>"}`."""
    rng = random.Random(size)
    head, tail = f'{{"model": "{MODEL}", "input": "'.encode(), b'"}'
    pad = max(0, size - len(head) - len(tail))
    return head + bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz0123456789 ", k=pad)) + tail


# -- servers -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def reference_server(name: str, python: str, script: Path, workdir: Path) -> Iterator[tuple[int, int]]:
    """A bench/peers server (`--listen 127.0.0.1:0`, prints `READY HOST:PORT`): yields (pid, port)."""
    argv = [python, str(script), "--listen", "127.0.0.1:0"]
    proc = ManagedProcess(name, argv, log_dir=workdir, ready=log_matches(r"^READY "), start_timeout=60)
    with proc:
        yield proc.pid, int(log_match(proc, r"^READY \S+:(\d+)").group(1))


@dataclass(frozen=True)
class Shared:
    """What every row of a run shares: the upstream, the credentials, Redis (if a row needs it)."""

    upstream: Envoy
    creds: Credentials
    workdir: Path
    wrk: str
    redis_url: str | None = None
    redis_pid: int | None = None


@dataclass(frozen=True)
class Server:
    """A running ext_proc/ext_authz server: its pid and the port a front Envoy calls per API."""

    pid: int
    ports: dict[Api, int]


def start_server(
    stack: contextlib.ExitStack, config: Config, shared: Shared, args: argparse.Namespace
) -> Server | None:
    """Start the server of `config`'s group (for a meshkit chain: one server for all three paths)."""
    name = f"{config.chain}-server"
    workdir = shared.workdir
    if config.server == "none":
        return None
    if config.server == "meshkit":
        chain = CHAINS[config.chain]
        extra = [*chain.server_args(shared.creds, shared.redis_url), *shlex.split(args.meshkit_args)]
        server: Extproc = stack.enter_context(extproc(workdir, extra, name=name))
        return Server(server.process.pid, {api: server.port_for(api) for api in PATHS.values()})
    if config.server == "naive":
        script, python = PEERS / "naive_aio.py", sys.executable
    else:
        script, python = PEERS / "peer_sdk.py", str(args.peer_venv / "bin" / "python")
    pid, port = stack.enter_context(reference_server(name, python, script, workdir))
    return Server(pid, {Api.EXT_PROC: port})


def prepare_peer(venv: Path) -> str | None:
    """Build (or confirm) the peer venv with setup_peer.sh; None if ready, else why not."""
    print(f"preparing the peer venv {venv} (bench/peers/setup_peer.sh) ...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(
            ["bash", str(PEERS / "setup_peer.sh"), str(venv)],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"setup_peer.sh failed: {exc}"
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if not ln.startswith("WARNING: Loc")]
        return f"setup_peer.sh exited {proc.returncode}: " + " | ".join(lines[-3:])
    return None


# -- one configuration -------------------------------------------------------------------------------
@dataclass
class Row:
    config: str
    size: int
    status: str  # "ok", "FAILED" or "unavailable"
    reason: str = ""
    wrk: WrkResult | None = None
    server_cpu_us: float | None = None
    front_cpu_us: float | None = None
    upstream_cpu_us: float | None = None
    redis_cpu_us: float | None = None  # the Redis server's own CPU (rate-limit rows only)
    wrk_cpu_us: float | None = None
    cores: dict[str, float] = field(default_factory=dict)  # CPUs each process kept busy: what bounds it
    machine_busy: float | None = None  # share of all CPUs busy during the measured run
    other_busy: float | None = None  # ... of which not by wrk, the server or the two Envoys: noise
    steal: float | None = None  # share of all CPUs the hypervisor took away (a noisy neighbour)
    fail_open: int = 0  # requests Envoy passed unprocessed (server failed/timed out)
    rounds_rps: list[float] = field(default_factory=list)  # every round's req/s (the spread)

    @property
    def rps(self) -> float | None:
        return self.wrk.rps if self.status == "ok" and self.wrk else None


@dataclass(frozen=True)
class Target:
    """One body size: the body and the file post.lua reads it from."""

    label: str
    body: bytes
    body_file: Path


def check_row(config: Config, target: Target, url: str, shared: Shared) -> str | None:
    """The set-up check (bench/row_checks.py): None if the chain visibly ran, else why not."""
    chain = CHAINS.get(config.chain)
    headers = chain.headers(shared.creds) if chain is not None else {}
    reason: str | None = check_hash(url, target.body, expect_hash=config.api is not None, headers=headers)
    if reason is None and chain is not None and chain.authenticates:
        reason = check_chain(url, target.body, chain, shared.creds, shared.redis_url)
    return reason


def headers_file(config: Config, shared: Shared) -> Path | None:
    """The file of extra request headers post.lua sends for `config` (its credential), if any."""
    chain = CHAINS.get(config.chain)
    if chain is None or not chain.authenticates:
        return None
    path = shared.workdir / f"headers-{chain.name}.txt"
    path.write_text("".join(f"{k}: {v}\n" for k, v in chain.headers(shared.creds).items()))
    return path


def measure(
    config: Config,
    target: Target,
    front: Envoy,
    pids: dict[str, int],
    shared: Shared,
    args: argparse.Namespace,
) -> Row:
    """Check the chain once, warm up, then one measured wrk run with CPU accounting."""
    size, url = len(target.body), front.url("ingress", URL_PATH)
    reason = check_row(config, target, url, shared)
    if reason is not None:
        return Row(config.label, size, "FAILED", reason)
    extra = headers_file(config, shared)
    run_wrk(shared.wrk, url, target.body_file, args.warmup, args, extra)
    fail_open = front.failed_open()
    before = CpuSnapshot.take(pids)
    result, wrk_cpu = run_wrk(shared.wrk, url, target.body_file, args.duration, args, extra)
    after = CpuSnapshot.take(pids)
    delta = {role: after.sessions[role] - before.sessions[role] for role in pids}
    requests = result.requests
    row = Row(config.label, size, "ok", wrk=result, fail_open=front.failed_open() - fail_open)
    row.server_cpu_us = us_per_request(delta["server"], requests) if "server" in delta else None
    row.front_cpu_us = us_per_request(delta["front"], requests)
    row.upstream_cpu_us = us_per_request(delta["upstream"], requests)
    row.redis_cpu_us = us_per_request(delta["redis"], requests) if "redis" in delta else None
    row.wrk_cpu_us = wrk_cpu / requests * 1e6 if requests else None
    if result.seconds > 0:
        row.cores = {role: ticks / CLK_TCK / result.seconds for role, ticks in delta.items()}
        row.cores["wrk"] = wrk_cpu / result.seconds
    busy, steal, total = (a - b for a, b in zip(after.machine, before.machine, strict=True))
    if total:
        row.machine_busy = busy / total
        row.other_busy = max(0.0, busy - sum(delta.values()) - wrk_cpu * CLK_TCK) / total
        row.steal = steal / total
    return row


def _failed(rows: list[Row], configs: Sequence[Config], targets: dict[str, list[Target]], why: str) -> None:
    done = {(row.config, row.size) for row in rows}
    for config in configs:
        for t in targets[config.label]:
            if (config.label, len(t.body)) not in done:
                rows.append(Row(config.label, len(t.body), "FAILED", why))


def _reason(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# What fails one row (or one chain's rows) and not the run: a server or Envoy that does not start, a
# config meshkit refuses (ConfigError is a MeshkitError), a chain without its Redis (ValueError).
ROW_ERRORS = (MeshkitError, BenchError, OSError, ValueError)


def run_group(
    configs: Sequence[Config], targets: dict[str, list[Target]], shared: Shared, args: argparse.Namespace
) -> list[Row]:
    """Start the group's server once (a meshkit chain's serves all three paths); for each of its
    configurations start a front Envoy, measure every body size, stop it; then stop the server."""
    rows: list[Row] = []
    try:
        with contextlib.ExitStack() as stack:
            server = start_server(stack, configs[0], shared, args)
            for config in configs:
                try:
                    rows += run_config(config, targets[config.label], server, shared, args)
                except ROW_ERRORS as exc:
                    progress(f"{config.label}: FAILED: {exc}\n(logs in {shared.workdir})")
                    _failed(rows, [config], targets, _reason(exc))
    except ROW_ERRORS as exc:
        progress(f"{configs[0].chain} server: FAILED: {exc}\n(logs in {shared.workdir})")
        _failed(rows, configs, targets, _reason(exc))
    return rows


def run_config(
    config: Config, targets: list[Target], server: Server | None, shared: Shared, args: argparse.Namespace
) -> list[Row]:
    """A front Envoy for `config` in front of `server`; every body size measured."""
    rows: list[Row] = []
    chain = CHAINS.get(config.chain)
    with contextlib.ExitStack() as stack:
        front_config = FrontConfig(
            upstream_ports=(shared.upstream.listeners["upstream"][1],),
            extproc_port=server.ports[config.api] if server is not None and config.api else 0,
            api=config.api,
            filters=chain.filters if chain is not None else FrontConfig.filters,
            listen_port=0,
        )
        front = stack.enter_context(
            envoy(front_config.render(), shared.workdir, name=f"{config.label}-front")
        )
        pids = {"front": front.process.pid, "upstream": shared.upstream.process.pid}
        if server is not None:
            pids["server"] = server.pid
        if chain is not None and chain.redis and shared.redis_pid is not None:
            pids["redis"] = shared.redis_pid
        for target in targets:
            progress(f"{config.label} @ {target.label} ...")
            rows.append(measure(config, target, front, pids, shared, args))
            progress(f"  {describe(rows[-1])}")
    return rows


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def describe(row: Row) -> str:
    if row.wrk is None:
        return f"{row.status}: {row.reason}"
    return (
        f"{row.wrk.rps:,.0f} req/s, p50 {row.wrk.p50_ms:.2f} ms, server CPU "
        f"{fmt(row.server_cpu_us, '.0f')} µs/req, errors {errors_text(row)}"
    )


# -- report ------------------------------------------------------------------------------------------
def size_label(size: int) -> str:
    if size % 1024 == 0:
        return f"{size // 1024} KiB"
    return f"{size} B"


def errors_text(row: Row, width: int | None = None) -> str:
    if row.status != "ok":
        text = f"{row.status}: {row.reason}"
        return text if width is None or len(text) <= width else text[: width - 3] + "..."
    assert row.wrk is not None
    parts = [f"{k} {v}" for k, v in row.wrk.socket_errors.items()]
    if row.wrk.non_2xx:
        parts.insert(0, f"non-2xx {row.wrk.non_2xx}")
    if row.fail_open:
        parts.append(f"unprocessed {row.fail_open}")
    return ", ".join(parts) or "0"


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


HEADERS = (
    "config",
    "req/s",
    "rounds' range",
    "p50 ms",
    "p99 ms",
    f"{TIMES} envoy-alone",
    f"{TIMES} peer",
    "server CPU µs/req",
    "Redis CPU µs/req",
    "front-Envoy CPU µs/req",
    "bound by",
    "errors",
)

# A process keeping this many CPUs busy is what bounds the row; all CPUs this busy: the machine does.
SATURATED_CORES = 0.85
MACHINE_FULL = 0.90


def bound_text(row: Row) -> str:
    """What bounds a measured row: the busiest process when it keeps ~a whole CPU busy (the server's
    event loop and the front Envoy's one worker cannot use more), else all CPUs when the machine is
    full, else waiting (round trips with CPU to spare)."""
    if row.status != "ok" or not row.cores:
        return "-"
    role, cores = max(row.cores.items(), key=lambda item: item[1])
    busy = row.machine_busy or 0.0
    if cores >= SATURATED_CORES:
        return f"{role} {cores:.2f} CPU" + (f", all {busy:.0%}" if busy >= MACHINE_FULL else "")
    if busy >= MACHINE_FULL:
        return f"all CPUs {busy:.0%} ({role} {cores:.2f})"
    return f"waits ({role} {cores:.2f} CPU)"


def spread_text(row: Row) -> str:
    if row.status != "ok" or len(row.rounds_rps) < 2:
        return "-"
    return f"{min(row.rounds_rps):,.0f}-{max(row.rounds_rps):,.0f}"


REASON_WIDTH = 60


def table_rows(rows: list[Row]) -> list[list[str]]:
    by_name = {row.config: row for row in rows}
    base = by_name[BASELINE].rps if BASELINE in by_name else None
    peer = by_name[PEER].rps if PEER in by_name else None
    out = []
    for row in rows:
        wrk = row.wrk if row.status == "ok" else None
        out.append(
            [
                row.config,
                fmt(row.rps, ",.0f"),
                spread_text(row),
                fmt(wrk.p50_ms if wrk else None, ".2f"),
                fmt(wrk.p99_ms if wrk else None, ".2f"),
                fmt(ratio(row.rps, base), ".2f"),
                fmt(ratio(row.rps, peer), ".2f"),
                fmt(row.server_cpu_us, ".0f"),
                fmt(row.redis_cpu_us, ".0f"),
                fmt(row.front_cpu_us, ".0f"),
                bound_text(row),
                errors_text(row, width=REASON_WIDTH),
            ]
        )
    return out


def render_table(rows: list[Row]) -> str:
    cells = [list(HEADERS), *table_rows(rows)]
    if all(row.redis_cpu_us is None for row in rows):  # no rate-limit row: no Redis column
        drop = HEADERS.index("Redis CPU µs/req")
        cells = [line[:drop] + line[drop + 1 :] for line in cells]
    if all(len(row.rounds_rps) < 2 for row in rows):  # one round: no range
        drop = HEADERS.index("rounds' range")
        cells = [line[:drop] + line[drop + 1 :] for line in cells]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]

    def line(values: list[str]) -> str:
        first = values[0].ljust(widths[0])
        middle = [v.rjust(w) for v, w in zip(values[1:-1], widths[1:-1], strict=True)]
        return " | ".join([first, *middle, values[-1]])

    separator = "-+-".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), separator, *(line(c) for c in cells[1:])])


def best_meshkit(rows: list[Row]) -> Row | None:
    candidates = [row for row in rows if row.config in MESHKIT_ROWS and row.rps is not None]
    return max(candidates, key=lambda row: row.rps or 0.0, default=None)


def best_line(rows: list[Row]) -> str:
    best = best_meshkit(rows)
    if best is None:
        return "meshkit's best path: none measured"
    by_name = {row.config: row for row in rows}
    vs_peer = ratio(best.rps, by_name[PEER].rps if PEER in by_name else None)
    vs_envoy = ratio(best.rps, by_name[BASELINE].rps if BASELINE in by_name else None)
    return (
        f"meshkit's best path: {best.config}, {fmt(best.rps, ',.0f')} req/s = "
        f"{fmt(vs_peer, '.2f')}{TIMES} peer-sdk, {fmt(vs_envoy, '.2f')}{TIMES} envoy-alone, "
        f"server CPU {fmt(best.server_cpu_us, '.0f')} µs/req"
    )


def verdict(value: float | None, ok: bool) -> str:
    return "n/a" if value is None else ("PASS" if ok else "MISS")


def target_checks(rows: list[Row]) -> list[dict[str, object]]:
    """The issue's targets for meshkit's best path at 1 KiB."""
    best = best_meshkit(rows)
    by_name = {row.config: row for row in rows}
    rps = best.rps if best else None
    vs_peer = ratio(rps, by_name[PEER].rps if PEER in by_name else None)
    vs_envoy = ratio(rps, by_name[BASELINE].rps if BASELINE in by_name else None)
    cpu = best.server_cpu_us if best else None
    checks = [
        (f"req/s >= {TARGET_VS_PEER:.2f}{TIMES} peer-sdk", vs_peer, TARGET_VS_PEER, "ratio"),
        (f"req/s >= {TARGET_VS_ENVOY:.2f}{TIMES} envoy-alone", vs_envoy, TARGET_VS_ENVOY, "ratio"),
        (f"server CPU <= {TARGET_CPU_US:.0f} µs/req", cpu, TARGET_CPU_US, "us"),
        (f"server CPU <= {MOONSHOT_CPU_US:.0f} µs/req (moonshot)", cpu, MOONSHOT_CPU_US, "us"),
    ]
    out: list[dict[str, object]] = []
    for name, value, limit, unit in checks:
        ok = value is not None and (value >= limit if unit == "ratio" else value <= limit)
        shown = "-" if value is None else f"{value:.2f}{TIMES}" if unit == "ratio" else f"{value:.0f} µs/req"
        out.append({"target": name, "value": value, "shown": shown, "verdict": verdict(value, ok)})
    return out


# Above these shares of all CPUs during a measured run, the numbers are suspect.
OTHER_WARNING = 0.10  # processes other than wrk, the server and the two Envoys
STEAL_WARNING = 0.05  # time the hypervisor gave our virtual CPUs to someone else


def noise_warnings(rows: list[Row]) -> list[str]:
    out = []
    for attr, limit, what in (
        ("other_busy", OTHER_WARNING, "other processes kept busy"),
        ("steal", STEAL_WARNING, "the hypervisor stole"),
    ):
        noisy = [row for row in rows if (getattr(row, attr) or 0.0) > limit]
        if noisy:
            worst = max(getattr(row, attr) for row in noisy)
            names = ", ".join(row.config for row in noisy)
            out.append(f"WARNING: {what} up to {worst:.0%} of all CPUs during: {names}")
    if out:
        out.append("WARNING: the machine was not quiet; compare ratios within this run, not absolute numbers")
    return out


def print_report(
    rows: list[Row], sizes: list[int], args: argparse.Namespace
) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    checks: list[dict[str, object]] = []
    chain_rows: list[dict[str, object]] = []
    for size in sizes:
        sized = [row for row in rows if row.size == size]
        print(
            f"\n== {size_label(size)} POST bodies: wrk -t{args.threads} -c{args.connections} "
            f"-d{args.duration}s (after a {args.warmup} s warm-up)"
            + (f", median of {args.rounds} interleaved rounds" if args.rounds > 1 else "")
            + " =="
        )
        print(render_table(sized))
        for row in sized:
            if row.status != "ok" and len(errors_text(row)) > REASON_WIDTH:
                print(f"  {row.config}: {errors_text(row)}")
        print(best_line(sized))
        for warning in noise_warnings(sized):
            print(warning)
        if size == TARGET_SIZE:
            checks = target_checks(sized)
            if any(CONFIGS[row.config].auth_row for row in sized):
                chain_rows = chain_checks(sized, BASELINE)
    print(f"\ntargets, body-hash alone (meshkit's best path, {size_label(TARGET_SIZE)} bodies):")
    if not checks:
        print(f"  not evaluated: {TARGET_SIZE} is not in --sizes")
    for check in checks:
        print(f"  {check['verdict']:4}  {check['target']}: {check['shown']}")
    print(f"\ntargets, auth chains ({size_label(TARGET_SIZE)} bodies; verdict on the best path for key):")
    if chain_rows:
        print(render_checks(chain_rows))
    else:
        print(f"  not evaluated: no auth-chain row at {TARGET_SIZE} (--chain-sizes)")
    return checks, chain_rows


def write_json(
    path: Path,
    rows: list[Row],
    checks: tuple[list[dict[str, object]], list[dict[str, object]]],
    meta: dict[str, object],
) -> None:
    doc = {
        "meta": meta,
        "results": [asdict(row) for row in rows],
        "targets_1kib": checks[0],
        "chain_targets_1kib": checks[1],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nresults written to {path}")


# -- main --------------------------------------------------------------------------------------------
def _select(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The configurations --configs (names or globs), --chains and --paths select, in CONFIGS order."""
    patterns = [c.strip() for c in args.configs.split(",") if c.strip()]
    chains = [c.strip() for c in args.chains.split(",") if c.strip()]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unmatched = [p for p in patterns if not fnmatch.filter(CONFIGS, p)]
    unknown = [c for c in chains if c not in CHAIN_NAMES] + [p for p in paths if p not in PATHS]
    if unmatched or unknown:
        parser.error(
            f"--configs matches nothing for {unmatched}, unknown --chains/--paths {unknown}; configs: "
            f"{', '.join(CONFIGS)}; chains: {', '.join(CHAIN_NAMES)}; paths: {', '.join(PATHS)}"
        )
    selected = [
        label
        for label, config in CONFIGS.items()
        if (not patterns or any(fnmatch.fnmatchcase(label, p) for p in patterns))
        and (not chains or config.chain in chains)
        and (not paths or not config.path or config.path in paths)
    ]
    if not selected:
        parser.error("--configs, --chains and --paths together select no configuration")
    return selected


def _sizes(parser: argparse.ArgumentParser, text: str, flag: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        parser.error(f"{flag}: expected sizes in bytes, comma-separated")
    if not sizes or min(sizes) <= 0:
        parser.error(f"{flag}: expected sizes in bytes (> 0), comma-separated")
    return sizes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="meshkit benchmark: meshkit's filter chains through a real front Envoy, side by side.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--sizes", default="1024,65536", help="POST body sizes (bytes) of the rows without auth"
    )
    parser.add_argument(
        "--chain-sizes", default="1024", help="POST body sizes (bytes) of the auth-chain rows"
    )
    parser.add_argument(
        "--configs", default="", help="configurations (names or globs: '*-authzhttp'); empty: all"
    )
    parser.add_argument(
        "--chains", default="", help=f"only these chains ({', '.join(CHAIN_NAMES)}); empty: all"
    )
    parser.add_argument("--paths", default="", help=f"only these paths ({', '.join(PATHS)}); empty: all")
    parser.add_argument("--duration", type=int, default=6, help="seconds of each measured wrk run")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every configuration this many times, interleaved; report medians",
    )
    parser.add_argument("--warmup", type=int, default=1, help="seconds of the warm-up run before each")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (-c)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (-t)")
    parser.add_argument("--meshkit-args", default="", help="extra arguments for every meshkit server")
    parser.add_argument("--peer-venv", type=Path, default=ROOT / "build" / "peer-venv", help="peer-sdk venv")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="logs and configs (default build/bench/TIME)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    args.sizes = _sizes(parser, args.sizes, "--sizes")
    args.chain_sizes = _sizes(parser, args.chain_sizes, "--chain-sizes")
    args.configs = _select(parser, args)
    if min(args.duration, args.warmup, args.connections, args.threads, args.rounds) < 1:
        parser.error("--duration, --warmup, --connections, --threads and --rounds must be >= 1")
    return args


def write_targets(workdir: Path, sizes: list[int]) -> dict[int, Target]:
    targets = {}
    for size in sizes:
        body = make_body(size)
        body_file = workdir / f"body-{size}.bin"
        body_file.write_bytes(body)
        targets[size] = Target(size_label(size), body, body_file)
    return targets


def groups_of(labels: Sequence[str]) -> list[list[Config]]:
    """The selected configurations in order, one group per server: a meshkit chain's rows share one."""
    groups: list[list[Config]] = []
    for label in labels:
        config = CONFIGS[label]
        if groups and config.server == "meshkit" and groups[-1][0].chain == config.chain:
            groups[-1].append(config)
        else:
            groups.append([config])
    return groups


def run(args: argparse.Namespace, wrk: str, workdir: Path) -> list[Row]:
    unavailable: dict[str, str] = {}
    if PEER in args.configs:
        reason = prepare_peer(args.peer_venv)
        if reason is not None:
            progress(f"{PEER} unavailable: {reason}")
            unavailable[PEER] = reason
    by_size = write_targets(workdir, sorted(set(args.sizes) | set(args.chain_sizes)))
    targets = {
        label: [by_size[s] for s in (args.chain_sizes if CONFIGS[label].auth_row else args.sizes)]
        for label in args.configs
    }
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(envoy(upstream_direct(), workdir, name="upstream"))
        redis_url = redis_pid = None
        if any(CHAINS[CONFIGS[c].chain].redis for c in args.configs if CONFIGS[c].chain in CHAINS):
            try:
                redis = stack.enter_context(redis_server(workdir / "redis"))
                redis_url, redis_pid = redis.url, redis.process.pid
            except HarnessError as exc:  # its rows fail their check (no Redis to hold the limit)
                progress(f"Redis did not start: {exc}")
        shared = Shared(upstream, mint(workdir), workdir, wrk, redis_url, redis_pid)
        selected = [c for c in args.configs if c not in unavailable]
        for label in args.configs:
            if label in unavailable:
                rows += [Row(label, len(t.body), "unavailable", unavailable[label]) for t in targets[label]]
        for round_no in range(1, args.rounds + 1):
            if args.rounds > 1:
                progress(f"round {round_no} of {args.rounds}")
            for group in groups_of(selected):
                rows += run_group(group, targets, shared, args)
    order = {label: i for i, label in enumerate(CONFIGS)}
    return sorted(median_rows(rows), key=lambda row: (row.size, order[row.config]))


def median_rows(rows: list[Row]) -> list[Row]:
    """One row per (config, size): the run with the median req/s over the rounds (a failed run wins,
    so a failure is never hidden by a good round); every round's req/s kept for the spread."""
    groups: dict[tuple[str, int], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.config, row.size), []).append(row)
    out = []
    for group in groups.values():
        failed = [row for row in group if row.status != "ok"]
        ranked = sorted(group, key=lambda row: row.rps or 0.0)
        chosen = failed[0] if failed else ranked[len(ranked) // 2]
        chosen.rounds_rps = [row.rps for row in group if row.rps is not None]
        out.append(chosen)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = shutil.which("wrk")
    if wrk is None:
        print("error: wrk not found on PATH: install it (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    workdir = args.workdir or ROOT / "build" / "bench" / time.strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(
        f"meshkit bench: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"configs {','.join(args.configs)}; auth chains' filters {','.join(CHAINS['key'].filters)}; "
        f"meshkit args {args.meshkit_args!r}; logs in {workdir}"
    )
    try:
        rows = run(args, wrk, workdir)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sizes = sorted({row.size for row in rows})
    checks = print_report(rows, sizes, args)
    if args.json is not None:
        meta = {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "connections": args.connections,
            "threads": args.threads,
            "meshkit_args": args.meshkit_args,
            "auth_chain_filters": CHAINS["key"].filters,
            "cpus": os.cpu_count(),
            "loadavg_before": load,
            "workdir": str(workdir),
        }
        write_json(args.json, rows, checks, meta)
    failed = [row for row in rows if CONFIGS[row.config].server == "meshkit" and row.status == "FAILED"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
