"""Review findings against a real redis-server: keys the limiter did not write (another type, `inf`,
`nan`, a TAT far ahead as after Redis' clock was set back), and Redis that answers PING but refuses
writes (a read-only replica, maxmemory with noeviction)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from meshkit.extproc.auth.rate_limit import RateLimiter, subject_key
from meshkit.harness.redis import RedisServer, redis_server

pytestmark = pytest.mark.integration


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def inspect(redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis.url)
    yield client
    await client.aclose()


async def started(url: str, **kw: Any) -> RateLimiter:
    limiter = RateLimiter(url, **kw)
    await limiter.start()
    return limiter


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
