"""meshkit's benchmark (`make bench`): body-hash through one real front Envoy, side by side in one run.

For each body size (default 1 KiB and 64 KiB POSTs) and each configuration, the same front Envoy
(`--concurrency 1`) forwards to one shared upstream Envoy that answers 200 itself (`upstream_direct()`):

    envoy-alone       FrontConfig(api=None), no filter: the ceiling
    meshkit-extproc   `meshkit extproc` + FrontConfig(api="ext_proc")  (headers SEND + BUFFERED body)
    meshkit-extauthz  `meshkit extproc` + FrontConfig(api="ext_authz") (one unary Check with the body)
    meshkit-authzhttp `meshkit extproc` + FrontConfig(api="ext_authz_http") (one keep-alive HTTP/1.1 check)
    naive-aio         bench/peers/naive_aio.py (meshkit's venv) + ext_proc: the naive baseline
    peer-sdk          bench/peers/peer_sdk.py (envoy-extproc-sdk, own venv) + ext_proc: the peer to beat

Before loading a configuration, one real POST checks that the front Envoy echoes `x-body-hash` equal
to XXH3-128 of the body (absent for envoy-alone); a configuration that fails is reported as FAILED and
not measured. The load is `wrk --latency` with bench/post.lua POSTing a fixed body (a 1 s warm-up run,
then the measured run). During the measured run the CPU time (utime+stime of every thread, plus reaped
children) of the server's whole session and of the front Envoy's is read from /proc and divided by the
requests wrk completed. Requests Envoy let through unprocessed because the server failed or timed out
(`failure_mode_allow`) are counted from Envoy's stats and reported as errors.

    .venv/bin/python bench/run.py [--sizes 1024,65536] [--configs a,b] [--duration 8] [--connections 16]
                                  [--meshkit-args "--event-loop asyncio"] [--json build/bench.json]

Exit status: 0 after a run (targets missed included), 1 if a meshkit row FAILED, 2 on a usage or set-up
error (no wrk, the upstream Envoy does not start).
"""

from __future__ import annotations

import argparse
import contextlib
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
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import xxhash

from meshkit.errors import HarnessError
from meshkit.harness.daemons import extproc
from meshkit.harness.envoy import Envoy, envoy
from meshkit.harness.process import ManagedProcess, log_match, log_matches
from meshkit.render import Api, FrontConfig, upstream_direct

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PEERS = BENCH / "peers"
LUA_SCRIPT = BENCH / "post.lua"
HASH_HEADER = "x-body-hash"
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


@dataclass(frozen=True)
class Config:
    label: str
    api: Api | None  # None: Envoy alone
    server: str  # "none" | "meshkit" | "naive" | "peer"


CONFIGS: dict[str, Config] = {
    c.label: c
    for c in (
        Config("envoy-alone", None, "none"),
        Config("meshkit-extproc", Api.EXT_PROC, "meshkit"),
        Config("meshkit-extauthz", Api.EXT_AUTHZ, "meshkit"),
        Config("meshkit-authzhttp", Api.EXT_AUTHZ_HTTP, "meshkit"),
        Config("naive-aio", Api.EXT_PROC, "naive"),
        Config("peer-sdk", Api.EXT_PROC, "peer"),
    )
}


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
    wrk: str, url: str, body_file: Path, seconds: int, args: argparse.Namespace
) -> tuple[WrkResult, float]:
    """One wrk run; returns its parsed result and wrk's own CPU seconds."""
    argv = [wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds}s", "--latency"]
    argv += ["-s", str(LUA_SCRIPT), url]
    env = {**os.environ, "BENCH_BODY_FILE": str(body_file)}
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


# -- the check request -------------------------------------------------------------------------------
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def check_hash(url: str, body: bytes, expect_hash: bool) -> str | None:
    """POST `body` once; None if the echoed x-body-hash is right, else why not."""
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/octet-stream"}
    )
    try:
        with _OPENER.open(request, timeout=10) as resp:
            status, got = resp.status, resp.headers.get(HASH_HEADER)
            resp.read()
    except urllib.error.HTTPError as exc:
        return f"check request got HTTP {exc.code}"
    except OSError as exc:
        return f"check request failed: {exc}"
    if status != 200:
        return f"check request got HTTP {status}"
    want = xxhash.xxh3_128_hexdigest(body) if expect_hash else None
    if got != want:
        return f"{HASH_HEADER} on the response is {got!r}, expected {want!r}"
    return None


def make_body(size: int) -> bytes:
    """A fixed body of `size` printable bytes (the same in every run)."""
    rng = random.Random(size)
    return bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz0123456789", k=size))


# -- servers -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def reference_server(name: str, python: str, script: Path, workdir: Path) -> Iterator[tuple[int, int]]:
    """A bench/peers server (`--listen 127.0.0.1:0`, prints `READY HOST:PORT`): yields (pid, port)."""
    argv = [python, str(script), "--listen", "127.0.0.1:0"]
    proc = ManagedProcess(name, argv, log_dir=workdir, ready=log_matches(r"^READY "), start_timeout=60)
    with proc:
        yield proc.pid, int(log_match(proc, r"^READY \S+:(\d+)").group(1))


@contextlib.contextmanager
def meshkit_server(workdir: Path, extra: Sequence[str], name: str, api: str) -> Iterator[tuple[int, int]]:
    with extproc(workdir, extra, name=name) as server:
        yield server.process.pid, server.port_for(api)


def start_server(
    stack: contextlib.ExitStack, config: Config, workdir: Path, args: argparse.Namespace
) -> tuple[int | None, int]:
    """Start the configuration's ext_proc/ext_authz server, if any: (pid, gRPC port)."""
    name = f"{config.label}-server"
    if config.server == "none":
        return None, 0
    if config.server == "meshkit":
        assert config.api is not None, "a meshkit row names its API"
        return stack.enter_context(meshkit_server(workdir, shlex.split(args.meshkit_args), name, config.api))
    if config.server == "naive":
        return stack.enter_context(reference_server(name, sys.executable, PEERS / "naive_aio.py", workdir))
    python = str(args.peer_venv / "bin" / "python")
    return stack.enter_context(reference_server(name, python, PEERS / "peer_sdk.py", workdir))


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
    wrk_cpu_us: float | None = None
    machine_busy: float | None = None  # share of all CPUs busy during the measured run
    other_busy: float | None = None  # ... of which not by wrk, the server or the two Envoys: noise
    steal: float | None = None  # share of all CPUs the hypervisor took away (a noisy neighbour)
    fail_open: int = 0  # requests Envoy passed unprocessed (server failed/timed out)

    @property
    def rps(self) -> float | None:
        return self.wrk.rps if self.status == "ok" and self.wrk else None


@dataclass(frozen=True)
class Target:
    """One body size: the body and the file post.lua reads it from."""

    label: str
    body: bytes
    body_file: Path


def measure(
    config: Config, target: Target, front: Envoy, pids: dict[str, int], wrk: str, args: argparse.Namespace
) -> Row:
    """Check the hash once, warm up, then one measured wrk run with CPU accounting."""
    size, url = len(target.body), front.url("ingress", "/bench")
    reason = check_hash(url, target.body, expect_hash=config.api is not None)
    if reason is not None:
        return Row(config.label, size, "FAILED", reason)
    run_wrk(wrk, url, target.body_file, args.warmup, args)
    fail_open = front.failed_open()
    before = CpuSnapshot.take(pids)
    result, wrk_cpu = run_wrk(wrk, url, target.body_file, args.duration, args)
    after = CpuSnapshot.take(pids)
    delta = {role: after.sessions[role] - before.sessions[role] for role in pids}
    requests = result.requests
    row = Row(config.label, size, "ok", wrk=result, fail_open=front.failed_open() - fail_open)
    row.server_cpu_us = us_per_request(delta["server"], requests) if "server" in delta else None
    row.front_cpu_us = us_per_request(delta["front"], requests)
    row.upstream_cpu_us = us_per_request(delta["upstream"], requests)
    row.wrk_cpu_us = wrk_cpu / requests * 1e6 if requests else None
    busy, steal, total = (a - b for a, b in zip(after.machine, before.machine, strict=True))
    if total:
        row.machine_busy = busy / total
        row.other_busy = max(0.0, busy - sum(delta.values()) - wrk_cpu * CLK_TCK) / total
        row.steal = steal / total
    return row


def run_config(
    config: Config,
    targets: list[Target],
    upstream: Envoy,
    workdir: Path,
    wrk: str,
    args: argparse.Namespace,
) -> list[Row]:
    """Start the server and a front Envoy for `config`, measure every body size, stop both."""
    rows: list[Row] = []
    try:
        with contextlib.ExitStack() as stack:
            server_pid, server_port = start_server(stack, config, workdir, args)
            front_config = FrontConfig(
                upstream_ports=(upstream.listeners["upstream"][1],),
                extproc_port=server_port,
                api=config.api,
                listen_port=0,
            )
            front = stack.enter_context(envoy(front_config.render(), workdir, name=f"{config.label}-front"))
            pids = {"front": front.process.pid, "upstream": upstream.process.pid}
            if server_pid is not None:
                pids["server"] = server_pid
            for target in targets:
                progress(f"{config.label} @ {target.label} ...")
                rows.append(measure(config, target, front, pids, wrk, args))
                progress(f"  {describe(rows[-1])}")
    except (HarnessError, BenchError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        progress(f"{config.label}: FAILED: {exc}\n(logs in {workdir})")
        done = {row.size for row in rows}
        rows += [Row(config.label, len(t.body), "FAILED", reason) for t in targets if len(t.body) not in done]
    return rows


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def describe(row: Row) -> str:
    if row.wrk is None:
        return f"{row.status}: {row.reason}"
    return f"{row.wrk.rps:,.0f} req/s, p50 {row.wrk.p50_ms:.2f} ms, errors {errors_text(row)}"


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
    "p50 ms",
    "p99 ms",
    f"{TIMES} envoy-alone",
    f"{TIMES} peer",
    "server CPU µs/req",
    "front-Envoy CPU µs/req",
    "errors",
)


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
                fmt(wrk.p50_ms if wrk else None, ".2f"),
                fmt(wrk.p99_ms if wrk else None, ".2f"),
                fmt(ratio(row.rps, base), ".2f"),
                fmt(ratio(row.rps, peer), ".2f"),
                fmt(row.server_cpu_us, ".0f"),
                fmt(row.front_cpu_us, ".0f"),
                errors_text(row, width=REASON_WIDTH),
            ]
        )
    return out


def render_table(rows: list[Row]) -> str:
    cells = [list(HEADERS), *table_rows(rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADERS))]

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


def print_report(rows: list[Row], sizes: list[int], args: argparse.Namespace) -> list[dict[str, object]]:
    checks: list[dict[str, object]] = []
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
    print(f"\ntargets (meshkit's best path, {size_label(TARGET_SIZE)} bodies):")
    if not checks:
        print(f"  not evaluated: {TARGET_SIZE} is not in --sizes")
    for check in checks:
        print(f"  {check['verdict']:4}  {check['target']}: {check['shown']}")
    return checks


def write_json(path: Path, rows: list[Row], checks: list[dict[str, object]], meta: dict[str, object]) -> None:
    doc = {"meta": meta, "results": [asdict(row) for row in rows], "targets_1kib": checks}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nresults written to {path}")


# -- main --------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="meshkit benchmark: body-hash through a real front Envoy, side by side.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sizes", default="1024,65536", help="POST body sizes in bytes, comma-separated")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="configurations to run, comma-separated")
    parser.add_argument("--duration", type=int, default=8, help="seconds of each measured wrk run")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every configuration this many times, interleaved; report medians",
    )
    parser.add_argument("--warmup", type=int, default=1, help="seconds of the warm-up run before each")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (-c)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (-t)")
    parser.add_argument("--meshkit-args", default="", help="extra arguments for both meshkit rows' server")
    parser.add_argument("--peer-venv", type=Path, default=ROOT / "build" / "peer-venv", help="peer-sdk venv")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="logs and configs (default build/bench/TIME)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown or not args.configs or not args.sizes or min(args.sizes) <= 0:
        parser.error(f"bad --configs/--sizes (unknown: {unknown}; known: {', '.join(CONFIGS)})")
    if min(args.duration, args.warmup, args.connections, args.threads, args.rounds) < 1:
        parser.error("--duration, --warmup, --connections, --threads and --rounds must be >= 1")
    return args


def write_targets(workdir: Path, sizes: list[int]) -> list[Target]:
    targets = []
    for size in sizes:
        body = make_body(size)
        body_file = workdir / f"body-{size}.bin"
        body_file.write_bytes(body)
        targets.append(Target(size_label(size), body, body_file))
    return targets


def run(args: argparse.Namespace, wrk: str, workdir: Path) -> list[Row]:
    unavailable: dict[str, str] = {}
    if PEER in args.configs:
        reason = prepare_peer(args.peer_venv)
        if reason is not None:
            progress(f"{PEER} unavailable: {reason}")
            unavailable[PEER] = reason
    targets = write_targets(workdir, args.sizes)
    rows: list[Row] = []
    with envoy(upstream_direct(), workdir, name="upstream") as upstream:
        for round_no in range(1, args.rounds + 1):
            if args.rounds > 1:
                progress(f"round {round_no} of {args.rounds}")
            for label in args.configs:
                if label in unavailable:
                    if round_no == 1:
                        rows += [Row(label, len(t.body), "unavailable", unavailable[label]) for t in targets]
                    continue
                rows += run_config(CONFIGS[label], targets, upstream, workdir, wrk, args)
    return median_rows(rows)


def median_rows(rows: list[Row]) -> list[Row]:
    """One row per (config, size): the run with the median req/s over the rounds (a failed run wins,
    so a failure is never hidden by a good round)."""
    groups: dict[tuple[str, int], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.config, row.size), []).append(row)
    out = []
    for group in groups.values():
        failed = [row for row in group if row.status != "ok"]
        ranked = sorted(group, key=lambda row: row.rps or 0.0)
        out.append(failed[0] if failed else ranked[len(ranked) // 2])
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
        f"configs {','.join(args.configs)}; meshkit args {args.meshkit_args!r}; logs in {workdir}"
    )
    try:
        rows = run(args, wrk, workdir)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    checks = print_report(rows, args.sizes, args)
    if args.json is not None:
        meta = {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "threads": args.threads,
            "meshkit_args": args.meshkit_args,
            "cpus": os.cpu_count(),
            "loadavg_before": load,
            "workdir": str(workdir),
        }
        write_json(args.json, rows, checks, meta)
    failed = [row for row in rows if row.config in MESHKIT_ROWS and row.status == "FAILED"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
