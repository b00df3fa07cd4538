"""Review findings against a real redis-server: keys the limiter did not write (another type, `inf`,
`nan`, a TAT far ahead as after Redis' clock was set back), and Redis that answers PING but refuses
writes (a read-only replica, maxmemory with noeviction)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from meshkit.extproc.auth.rate_limit import RateLimiter, subject_key
from meshkit.harness.redis import RedisServer, redis_server

from .conftest import started_limiter as started

pytestmark = pytest.mark.integration


async def up_within(limiter: RateLimiter, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if limiter.redis_up:
            return True
        await asyncio.sleep(0.02)
    return limiter.redis_up


def key(subject: str) -> bytes:
    return subject_key("meshkit:rl:", subject)


async def test_a_foreign_or_corrupt_key_is_overwritten_not_an_outage(
    redis: RedisServer, inspect: aioredis.Redis
) -> None:
    # Found in review: a hash at a subject's key made every check of that subject a WRONGTYPE error
    # reply, and the limiter marked Redis down for everyone (an outage, a warning, `closed` -> 503s)
    # each time; `nan` did the same through the SET; `inf` refused the subject with a Retry-After of
    # -9e12 s; a TAT an hour ahead refused it for an hour.
    await inspect.hset(key("hash"), "x", "1")
    await inspect.rpush(key("list"), "1")
    await inspect.set(key("inf"), "inf")
    await inspect.set(key("nan"), "nan")
    await inspect.set(key("text"), "hello")
    await inspect.set(key("ahead"), str(int(time.time() * 1e6 + 3600e6)))
    await inspect.set(key("behind"), "-1e300")
    limiter = await started(redis.url)
    try:
        for subject in ("hash", "list", "inf", "nan", "text", "ahead", "behind"):
            d = await limiter.check(subject, 2)
            assert (d.allowed, d.source, d.remaining) == (True, "redis", 1), (subject, d)
            assert 0 < d.reset_after <= 30.001 and d.retry_after == 0, (subject, d)
            assert await inspect.type(key(subject)) == b"string"
            assert 0 < await inspect.pttl(key(subject)) <= 30_000
            d = await limiter.check(subject, 2)
            assert (d.allowed, d.remaining) == (True, 0), (subject, d)
            d = await limiter.check(subject, 2)
            assert not d.allowed and 0 < d.retry_after <= 30.001, (subject, d)
        assert limiter.redis_up
        assert limiter.outages == 0
    finally:
        await limiter.close()


async def test_a_redis_that_refuses_writes_is_one_outage_not_a_flapping_one(
    tmp_path: Path, redis: RedisServer, inspect: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # Found in review: the probe (PING, SCRIPT LOAD) passed on a read-only replica and on a Redis at
    # maxmemory with noeviction, so each probe interval brought Redis "back", the next check failed with
    # READONLY / OOM, and it went down again: two log lines and one outage per interval for as long as
    # it lasted, and in `local` mode the local table was cleared each time (a fresh burst per interval).
    caplog.set_level(logging.INFO, logger="meshkit.auth.rate_limit")
    with redis_server(tmp_path / "replica", name="replica") as replica_server:
        replica = aioredis.from_url(replica_server.url)
        try:
            await replica.replicaof("127.0.0.1", redis.port)
            limiter = await started(replica_server.url, probe_interval=0.05, replicas=1)
            try:
                assert not limiter.redis_up  # down at start, with the reason
                assert "READONLY" in caplog.text
                decisions = []
                for _ in range(40):
                    decisions.append(await limiter.check("a", 10))
                    await asyncio.sleep(0.02)
                assert limiter.outages == 1
                assert sum(d.allowed for d in decisions) == 10  # the local share held throughout
                assert {d.source for d in decisions} == {"local"}
                await replica.replicaof("no", "one")  # promoted (a failover): noticed without a restart
                assert await up_within(limiter, 3.0)
                assert (await limiter.check("a", 10)).source == "redis"
            finally:
                await limiter.close()
        finally:
            await replica.aclose()

    caplog.clear()
    limiter = await started(redis.url, probe_interval=0.05)
    try:
        assert (await limiter.check("b", 10)).source == "redis"
        await inspect.config_set("maxmemory-policy", "noeviction")
        await inspect.config_set("maxmemory", "1")
        for _ in range(40):
            await limiter.check("b", 10)
            await asyncio.sleep(0.02)
        assert limiter.outages == 1
        assert caplog.text.count("Redis unreachable") == 1
        assert "OOM" in caplog.text
        await inspect.config_set("maxmemory", "0")
        assert await up_within(limiter, 3.0)
    finally:
        await limiter.close()
