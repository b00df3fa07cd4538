"""API keys stored in Redis (`--api-keys-redis --redis URL`) through a real Envoy on all three paths and a
real Redis: a key in a hash at `meshkit:apikey:<sha256>` is accepted (x-api-key and Bearer); one
marked revoked stops working within the 5 s cache TTL; an unknown one is 401; with Redis down a key
that is not in `--api-keys-file` is refused as unavailable (503, 500 over ext_authz HTTP: Envoy's
status_on_error) while a key from the file still works."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
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

FILE_KEY = "mk_file_0123456789abcdef"
CACHE_TTL = 5.0


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A key no server has looked up yet (meshkit caches found and unknown answers alike)."""
    return f"mk_redis_{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def redis_srv(workdir: Path) -> Iterator[RedisServer]:
    with redis_server(workdir / "redis-keys") as server:
        yield server


def store(srv: RedisServer, key: str, **fields: str) -> None:
    client = redis.Redis.from_url(srv.url)
    try:
        for field, value in fields.items():
            client.hset(f"meshkit:apikey:{sha(key)}", field, value)
    finally:
        client.close()


@pytest.fixture(scope="module")
def meshkit_server(workdir: Path, redis_srv: RedisServer) -> Iterator[Extproc]:
    keys = workdir / "redis-file-keys.yaml"
    keys.write_text(yaml.safe_dump([{"sha256": sha(FILE_KEY), "subject": "svc-file", "scopes": ["llm"]}]))
    args = ["--filters", "auth", "--api-keys-file", str(keys), "--api-keys-redis", "--redis", redis_srv.url]
    with extproc(workdir, args, name="meshkit-redis-keys") as server:
        yield server


@pytest.fixture(
    scope="module", params=[Api.EXT_PROC, Api.EXT_AUTHZ, Api.EXT_AUTHZ_HTTP], ids=lambda a: a.value
)
def api(request: pytest.FixtureRequest) -> Api:
    chosen: Api = request.param
    return chosen


@pytest.fixture(scope="module")
def ingress(api: Api, workdir: Path, upstream: Echo, meshkit_server: Extproc) -> Iterator[Envoy]:
    with front(workdir, upstream, meshkit_server, api, filters=("auth",)) as proxy:
        yield proxy


def call(proxy: Envoy, headers: dict[str, str]) -> Response:
    return request(proxy.url(path="/v1/chat/completions"), body=b"{}", headers=headers)


def test_a_key_in_redis_is_accepted(ingress: Envoy, redis_srv: RedisServer) -> None:
    key = new_key()
    store(redis_srv, key, subject="svc-redis", scopes="llm embeddings")
    for headers in ({"x-api-key": key}, {"authorization": f"Bearer {key}"}):
        resp = call(ingress, {**headers, "x-auth-subject": "spoofed"})
        assert resp.status == 200, resp.body[:300]
        seen = resp.upstream_headers
        assert seen["x-auth-subject"] == "svc-redis"
        assert seen["x-auth-method"] == "api-key"
        assert seen["x-auth-scopes"] == "embeddings llm"
        assert "x-api-key" not in seen and "authorization" not in seen


def test_a_revoked_key_stops_working_within_the_cache_ttl(ingress: Envoy, redis_srv: RedisServer) -> None:
    key = new_key()
    store(redis_srv, key, subject="svc-revoke-me", scopes="llm")
    assert call(ingress, {"x-api-key": key}).status == 200
    store(redis_srv, key, revoked="1")
    revoked_at = time.monotonic()
    while True:
        resp = call(ingress, {"x-api-key": key})
        if resp.status != 200:
            break
        assert time.monotonic() - revoked_at < CACHE_TTL + 1.5, "still accepted after the cache TTL"
        time.sleep(0.25)
    assert resp.status == 401, resp.body[:300]
    assert resp.json()["error"]["type"] == "unauthorized"
    assert "revoked" in resp.json()["error"]["message"]
    assert 'error="invalid_token"' in resp.headers["www-authenticate"]


def test_an_unknown_key_is_401(ingress: Envoy) -> None:
    resp = call(ingress, {"x-api-key": new_key()})
    assert resp.status == 401, resp.body[:300]
    assert resp.json()["error"]["type"] == "unauthorized"
    assert resp.headers["www-authenticate"].startswith('Bearer realm="meshkit", error="invalid_token"')


def test_redis_down_refuses_redis_keys_while_file_keys_work(
    api: Api, ingress: Envoy, redis_srv: RedisServer
) -> None:
    stored = new_key()
    store(redis_srv, stored, subject="svc-redis", scopes="llm")
    redis_srv.kill()
    try:
        started = time.monotonic()
        down = call(ingress, {"x-api-key": new_key()})
        never_seen = call(ingress, {"x-api-key": stored})  # in Redis, yet never looked up: not cached
        from_file = call(ingress, {"x-api-key": FILE_KEY})
        assert time.monotonic() - started < 5  # nothing waits long for the dead Redis
        expected = 500 if api is Api.EXT_AUTHZ_HTTP else 503  # status_on_error over ext_authz HTTP
        for resp in (down, never_seen):
            assert resp.status == expected, resp.body[:300]
            assert resp.json()["error"]
            if api is not Api.EXT_AUTHZ_HTTP:
                assert resp.headers["retry-after"] == "1"
        assert from_file.status == 200, from_file.body[:300]
        assert from_file.upstream_headers["x-auth-subject"] == "svc-file"
    finally:
        redis_srv.restart()
    # Redis back (empty: no persistence): keys stored again work without restarting meshkit
    again = new_key()
    store(redis_srv, again, subject="svc-back", scopes="llm")
    deadline = time.monotonic() + 10
    while (resp := call(ingress, {"x-api-key": again})).status != 200:
        assert time.monotonic() < deadline, resp.body[:300]
        again = new_key()  # a refused lookup is not cached, but take a fresh key anyway
        store(redis_srv, again, subject="svc-back", scopes="llm")
        time.sleep(0.2)
    assert resp.upstream_headers["x-auth-subject"] == "svc-back"
