"""Rate limits through a real Envoy on all three paths, in a real Redis: the limit hit and reset (429
with Retry-After and x-ratelimit-*; the same headers on admitted answers), two meshkit servers on one
Redis admitting no more than the limit together, and Redis killed and restarted under each
`--rate-limit-on-redis-down` choice."""

from __future__ import annotations

import hashlib
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path

import pytest
import redis
import yaml

from meshkit.harness.daemons import Echo, Extproc, extproc
from meshkit.harness.envoy import Envoy
from meshkit.harness.redis import RedisServer, redis_server
from meshkit.render import Api

from .conftest import Response, front, request

pytestmark = pytest.mark.integration

LIMITED = "mk_limited_0123456789abcdef"  # 60 a minute: a burst of 60, then one a second
SHARED = "mk_shared_0123456789abcdef"  # 20 a minute, shared by two servers
OUTAGE = "mk_outage_0123456789abcdef"  # 40 a minute; 20 per replica while Redis is down


def entry(key: str, subject: str, rate_limit: int) -> dict[str, object]:
    return {"sha256": hashlib.sha256(key.encode()).hexdigest(), "subject": subject, "rate_limit": rate_limit}


@pytest.fixture(scope="module")
def redis_srv(workdir: Path) -> Iterator[RedisServer]:
    with redis_server(workdir / "redis") as server:
        yield server


@pytest.fixture(autouse=True)
def fresh_limits(redis_srv: RedisServer) -> None:
    if redis_srv.process.returncode is None:
        redis.Redis.from_url(redis_srv.url).flushall()


@pytest.fixture(scope="module")
def keys_file(workdir: Path) -> Path:
    path = workdir / "limit-keys.yaml"
    keys = [
        entry(LIMITED, "svc-limited", 60),
        entry(SHARED, "svc-shared", 20),
        entry(OUTAGE, "svc-outage", 40),
    ]
    path.write_text(yaml.safe_dump(keys))
    return path


def limited_meshkit(
    workdir: Path, keys: Path, redis_url: str, mode: str = "local", name: str = "meshkit-rl"
) -> AbstractContextManager[Extproc]:
    args = [
        "--filters", "auth", "--api-keys-file", str(keys), "--redis", redis_url,
        "--rate-limit-on-redis-down", mode, "--rate-limit-replicas", "2",
    ]  # fmt: skip
    return extproc(workdir, args, name=name)


@pytest.fixture(scope="module")
def meshkit_server(workdir: Path, keys_file: Path, redis_srv: RedisServer) -> Iterator[Extproc]:
    with limited_meshkit(workdir, keys_file, redis_srv.url) as server:
        yield server


@pytest.fixture(scope="module", params=["ext_proc", "ext_authz", "ext_authz_http"])
def ingress(
    request: pytest.FixtureRequest, workdir: Path, upstream: Echo, meshkit_server: Extproc
) -> Iterator[Envoy]:
    with front(workdir, upstream, meshkit_server, request.param, filters=("auth",)) as proxy:
        yield proxy


def call(proxy: Envoy, key: str) -> Response:
    return request(proxy.url(path="/v1/chat/completions"), body=b"{}", headers={"x-api-key": key})


def test_limit_hit_and_reset(ingress: Envoy) -> None:
    remaining = []
    for _ in range(60):
        resp = call(ingress, LIMITED)
        assert resp.status == 200, resp.body[:300]
        assert resp.headers["x-ratelimit-limit"] == "60"
        remaining.append(int(resp.headers["x-ratelimit-remaining"]))
    assert remaining[0] == 59
    assert remaining == sorted(remaining, reverse=True)  # counts down (a refill may add one)
    refused = call(ingress, LIMITED)
    assert refused.status == 429, refused.body[:300]
    assert refused.json()["error"]["type"] == "rate_limit_exceeded"
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["x-ratelimit-limit"] == "60"
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert int(refused.headers["x-ratelimit-reset"]) >= 1
    time.sleep(1.05)  # the Retry-After the answer gave: a request is admitted again
    assert call(ingress, LIMITED).status == 200


def test_two_servers_on_one_redis_stay_within_the_limit(
    workdir: Path, upstream: Echo, keys_file: Path, redis_srv: RedisServer, meshkit_server: Extproc
) -> None:
    with ExitStack() as stack:
        other = stack.enter_context(limited_meshkit(workdir, keys_file, redis_srv.url, name="meshkit-rl-2"))
        fronts = [
            stack.enter_context(front(workdir, upstream, server, Api.EXT_AUTHZ_HTTP, filters=("auth",)))
            for server in (meshkit_server, other)
        ]
        admitted = sum(call(fronts[i % 2], SHARED).status == 200 for i in range(60))
    # 20 a minute together (a refill every 3 s may add one during the run), not 20 each.
    assert 20 <= admitted <= 21, admitted


def metric(server: Extproc, name: str) -> float:
    with urllib.request.urlopen(server.admin_url + "/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_for(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.mark.parametrize("mode", ["local", "open", "closed"])
@pytest.mark.parametrize("api", [Api.EXT_PROC, Api.EXT_AUTHZ, Api.EXT_AUTHZ_HTTP])
def test_redis_killed_and_restarted(
    workdir: Path, upstream: Echo, keys_file: Path, redis_srv: RedisServer, mode: str, api: Api
) -> None:
    name = f"meshkit-rl-{mode}-{api.value}"
    with (
        limited_meshkit(workdir, keys_file, redis_srv.url, mode, name) as server,
        front(workdir, upstream, server, api, filters=("auth",)) as proxy,
    ):
        assert call(proxy, OUTAGE).headers["x-ratelimit-limit"] == "40"  # Redis decides
        outages = metric(server, "meshkit_ratelimit_redis_outages_total")
        redis_srv.kill()
        started = time.monotonic()
        answers = [call(proxy, OUTAGE) for _ in range(30)]
        assert time.monotonic() - started < 10  # no request waits for the dead Redis
        statuses = [a.status for a in answers]
        if mode == "local":  # this replica's share: 40 / 2 replicas
            assert statuses.count(200) == 20, statuses
            assert statuses.count(429) == 10, statuses
            assert answers[0].headers["x-ratelimit-limit"] == "20"
        elif mode == "open":
            assert statuses == [200] * 30
        else:  # closed: refused as unavailable, never let through
            assert 200 not in statuses, statuses
            # ext_authz over HTTP turns a check service's 5xx into its own 500 (status_on_error)
            expected = 500 if api is Api.EXT_AUTHZ_HTTP else 503
            assert set(statuses) == {expected}, statuses
            if api is not Api.EXT_AUTHZ_HTTP:
                assert answers[0].headers["retry-after"] == "1"
            assert answers[0].json()["error"]
        assert metric(server, "meshkit_ratelimit_redis_outages_total") == outages + 1
        assert metric(server, "meshkit_ratelimit_redis_up") == 0
        redis_srv.restart()  # the same port; meshkit is not restarted
        wait_for(lambda: metric(server, "meshkit_ratelimit_redis_up") == 1, 10, "Redis coming back unnoticed")
        resp = call(proxy, OUTAGE)
        assert resp.status == 200
        assert resp.headers["x-ratelimit-limit"] == "40"  # Redis decides again
    log = server.process.log_text()
    assert log.count("Redis") >= 2  # the outage and its end, each one line
