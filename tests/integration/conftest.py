"""Real servers for integration tests: meshkit's extproc, an echo upstream, and a front Envoy.

Every fixture stops what it started, in teardown, also after a failure or Ctrl-C. When a test fails, the
log tails of the processes it used are printed.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import AsyncIterator, Generator, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from meshkit.errors import HarnessError
from meshkit.extproc.auth.rate_limit import RateLimiter
from meshkit.harness.daemons import Echo, Extproc, echo, extproc
from meshkit.harness.envoy import Envoy, envoy
from meshkit.harness.nats import NatsServer, nats_server, nats_server_binary
from meshkit.harness.netns import Namespace, network_namespace
from meshkit.harness.redis import RedisServer, redis_server
from meshkit.render import Api, FrontConfig

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def upstream_headers(self) -> dict[str, str]:
        """What the echo upstream says it received."""
        return dict(self.json()["headers"])


def request(
    url: str,
    method: str = "POST",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Response:
    """One HTTP/1.1 request on a fresh connection (http.client: no retries, no redirects)."""
    host_port = url.split("/")[2]
    path = "/" + url.split("/", 3)[3] if url.count("/") >= 3 else "/"
    host, _, port = host_port.partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="module")
def upstream(workdir: Path) -> Iterator[Echo]:
    with echo(workdir) as server:
        yield server


@pytest.fixture(scope="module")
def meshkit_server(workdir: Path) -> Iterator[Extproc]:
    with extproc(workdir) as server:
        yield server


def front(
    workdir: Path, upstream: Echo, server: Extproc | None, api: Api, **kw: Any
) -> AbstractContextManager[Envoy]:
    """A front Envoy on a free port: client -> Envoy -> meshkit over `api` -> the echo upstream."""
    port = server.port_for(api) if server else 0
    cfg = FrontConfig(upstream_ports=(upstream.port,), extproc_port=port, api=api, listen_port=0, **kw)
    return envoy(cfg.render(), workdir)


@pytest.fixture(scope="module", params=["ext_proc", "ext_authz", "ext_authz_http"])
def ingress(
    request: pytest.FixtureRequest, workdir: Path, upstream: Echo, meshkit_server: Extproc
) -> Iterator[Envoy]:
    """A front Envoy to meshkit over ext_proc, ext_authz (gRPC), ext_authz (HTTP): each test runs on all."""
    with front(workdir, upstream, meshkit_server, request.param) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def netns_edge() -> Iterator[Namespace]:
    """A network namespace with two veth links to this host (skipped without root or `ip`): links[0]
    for a leaf's link to its origin (the one a test cuts), links[1] for clients of the edge."""
    try:
        with network_namespace(links=2) as ns:
            yield ns
    except HarnessError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def core_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server of this test's own, without JetStream (skipped when none is installed)."""
    try:
        nats_server_binary()
    except HarnessError as exc:
        pytest.skip(str(exc))
    with nats_server(tmp_path / "nats", jetstream=False) as server:
        yield server


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server of this test's own (it may kill() and restart() it on the same port)."""
    with redis_server(tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def inspect(redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A redis-py client on `redis`, to look at what meshkit stored."""
    client = aioredis.from_url(redis.url)
    yield client
    await client.aclose()


async def started_limiter(url: str, **kw: Any) -> RateLimiter:
    limiter = RateLimiter(url, **kw)
    await limiter.start()
    return limiter


_STARTS_MARK = pytest.StashKey[int]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    from meshkit.harness.process import running, started_count, started_since

    if call.when == "setup":
        item.stash[_STARTS_MARK] = started_count()
    report = yield
    if report.failed and call.when == "call":
        shown = running()  # fixtures' servers, and every process this test started, stopped or not
        shown += [p for p in started_since(item.stash.get(_STARTS_MARK, 0)) if p not in shown]
        for proc in shown:
            report.sections.append((f"log of {proc.name}", proc.tail(30)))
    return report
