"""The ext_authz HTTP check port under a slow-header flood, through a real Envoy: Envoy's checks keep
their latency, and at the connection limit they are still answered and hashed (none let through
unhashed by failure_mode_allow).

The flood is `slow_clients.py`, its own process (its CPU is not the measuring client's): connections
that send a request's headers one byte a second and never finish them, reopened when meshkit closes
them.
"""

from __future__ import annotations

import http.client
import json
import re
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import xxhash

from meshkit.extproc.apis import Api
from meshkit.extproc.http_connections import default_max_connections
from meshkit.harness.daemons import Echo, Extproc, extproc
from meshkit.harness.envoy import Envoy
from meshkit.harness.process import ManagedProcess

from .conftest import front, request

pytestmark = pytest.mark.integration

SLOW_CLIENTS = Path(__file__).with_name("slow_clients.py")


# -- the flood ------------------------------------------------------------------------------------------
@contextmanager
def slow_clients(
    workdir: Path,
    port: int,
    count: int,
    *,
    reconnect: float = 0.1,
    until_all_open: bool = True,
    mode: str = "slow",
) -> Iterator[ManagedProcess]:
    """`count` slow-header connections to 127.0.0.1:`port` (`mode="idle"`: connections that sent one
    check and sit idle), held (reopened when closed) until exit. Ready once all `count` are open, or
    (`until_all_open=False`: more than the server keeps) once started."""
    ready = "holding" if until_all_open else "open="
    proc = ManagedProcess(
        f"slow-clients-{mode}-{count}",
        [sys.executable, SLOW_CLIENTS, "127.0.0.1", str(port), str(count), "1.0", str(reconnect), mode],
        log_dir=workdir,
        ready=lambda p: ready in p.log_text(),
        start_timeout=30,
    )
    with proc:
        yield proc


@contextmanager
def soft_fd_limit(limit: int) -> Iterator[None]:
    """This process's soft RLIMIT_NOFILE set to `limit` (children started meanwhile inherit it)."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


@pytest.fixture(scope="module", autouse=True)
def enough_descriptors() -> Iterator[None]:
    """meshkit (a child: it inherits the limit) must be able to hold the flood and Envoy's connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 4096: cannot hold the flood")
    with soft_fd_limit(max(soft, 4096)):
        yield


def metric(server: Extproc, series: str) -> float:
    """One exact series (`name{labels}`) from meshkit's /metrics, 0 if absent."""
    text = request(f"{server.admin_url}/metrics", method="GET").body.decode()
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def wait_for(condition: object, what: str, within: float = 20.0) -> None:
    """Poll `condition()` (a callable) until true; fail naming `what` after `within` seconds."""
    assert callable(condition)
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not after {within:.0f} s: {what}"
        time.sleep(0.05)


# -- Envoy's checks -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Latency:
    samples: list[float]

    @property
    def p50(self) -> float:
        return statistics.median(self.samples)

    @property
    def p99(self) -> float:
        return statistics.quantiles(self.samples, n=100, method="inclusive")[98]

    def __str__(self) -> str:
        return f"p50 {self.p50 * 1e3:.2f} ms, p99 {self.p99 * 1e3:.2f} ms over {len(self.samples)} requests"


def checks(proxy: Envoy, count: int, tag: str) -> Latency:
    """`count` POSTs through Envoy on one keep-alive connection, each timed from send to last byte;
    every one must come back 200 with its body's hash, set by meshkit, seen by the upstream."""
    host, port = proxy.listeners["ingress"]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    samples = []
    try:
        for n in range(count):
            body = json.dumps({"model": "m", "input": f"{tag} {n}"}).encode()
            began = time.perf_counter()
            conn.request("POST", "/v1/embeddings", body=body, headers={"content-type": "application/json"})
            resp = conn.getresponse()
            answer = resp.read()
            samples.append(time.perf_counter() - began)
            assert resp.status == 200, answer[:200]
            expected = xxhash.xxh3_128_hexdigest(body)
            assert resp.getheader("x-body-hash") == expected
            assert json.loads(answer)["headers"]["x-body-hash"] == expected  # what the upstream got
    finally:
        conn.close()
    return Latency(samples)


def report(request: pytest.FixtureRequest, text: str) -> None:
    """Shown with `pytest -s` (printed) and in the report's sections (`-rA`)."""
    print(f"\n{text}")
    request.node.add_report_section("call", "latency", text)


# -- the tests ------------------------------------------------------------------------------------------
def test_checks_keep_their_latency_with_1000_slow_header_connections(
    workdir: Path, upstream: Echo, request: pytest.FixtureRequest
) -> None:
    with (
        extproc(workdir, name="extproc-slow-headers") as server,
        front(workdir, upstream, server, Api.EXT_AUTHZ_HTTP) as proxy,
    ):
        checks(proxy, 50, "warm-up")
        alone = checks(proxy, 500, "alone")
        with slow_clients(workdir, server.http_port, 1000):
            wait_for(
                lambda: metric(server, "meshkit_extproc_http_connections") >= 1000,
                "meshkit holds the 1,000 slow connections",
            )
            flooded = checks(proxy, 500, "flooded")
            held = metric(server, "meshkit_extproc_http_connections")
        report(
            request,
            f"ext_authz HTTP through Envoy, alone:                       {alone}\n"
            f"ext_authz HTTP through Envoy, 1,000 slow-header clients: {flooded} "
            f"({held:.0f} connections open)",
        )
        assert flooded.p99 < max(5 * alone.p99, 0.2), f"alone: {alone}; flooded: {flooded}"
        assert proxy.failed_open() == 0, "Envoy let checks through unhashed because meshkit failed"


FD_LIMIT = 512  # meshkit's descriptors in the limit test: its connection limit is half of them


@pytest.mark.parametrize("mode", ["slow", "idle"])
def test_at_the_connection_limit_envoys_checks_are_still_answered_and_hashed(
    workdir: Path, upstream: Echo, request: pytest.FixtureRequest, mode: str
) -> None:
    """More slow clients than meshkit has file descriptors: before the limit, they took every one and
    Envoy let checks through unhashed (failure_mode_allow); now the oldest are closed to make room.
    `idle`: clients that sent one check and sit idle; making room for each new one closed Envoy's
    checks whose bytes had just arrived (11-22 of 800 let through unhashed), not an idle connection."""
    flood = FD_LIMIT + 100
    with ExitStack() as stack:
        with soft_fd_limit(FD_LIMIT):  # inherited by meshkit, and the limit follows it
            limit = default_max_connections()
            server = stack.enter_context(extproc(workdir, name=f"extproc-at-the-limit-{mode}"))
        proxy = stack.enter_context(front(workdir, upstream, server, Api.EXT_AUTHZ_HTTP))
        stack.enter_context(
            slow_clients(workdir, server.http_port, flood, reconnect=1.0, until_all_open=False, mode=mode)
        )
        evicted = 'meshkit_extproc_errors_total{kind="http_connection_evicted"}'
        wait_for(
            lambda: metric(server, evicted) >= flood - limit,
            f"{flood} slow clients over the limit of {limit}",
        )
        before = metric(server, evicted)
        with ThreadPoolExecutor(8) as pool:  # Envoy opens new connections to meshkit mid-flood
            results = list(pool.map(lambda n: checks(proxy, 25, f"at the limit {n}"), range(8)))
        assert proxy.failed_open() == 0, "Envoy let checks through unhashed because meshkit failed"
        assert metric(server, evicted) > before, "the flood was not at the limit during the checks"
        assert metric(server, "meshkit_extproc_http_connections") <= limit
        log = server.process.log_text()
        assert "Too many open files" not in log
        assert log.count("over the limit of") <= 3  # evictions are counted, logged once per 10 s
        latency = Latency([s for r in results for s in r.samples])
        report(
            request,
            f"at the limit ({limit} connections, {FD_LIMIT} descriptors, {flood} slow clients), "
            f"8 concurrent Envoy clients: {latency}",
        )
