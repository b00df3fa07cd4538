"""The rate limiter against a real redis-server: exact limits in a burst, the reset, two limiters (and two
processes) sharing one Redis, odd subjects, and Redis killed, paused and restarted on the same port in
each `on_redis_down` mode."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from meshkit.errors import DependencyError
from meshkit.extproc.auth.rate_limit import Decision, RateLimiter, subject_key
from meshkit.harness.redis import RedisServer

from .conftest import started_limiter as started

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


Redis = RedisServer  # the harness's: kill() and restart() on the same port


def metrics(limiter: RateLimiter) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for c in limiter.collectors()
        for m in c.collect()
        for s in m.samples
    }


def outages(limiter: RateLimiter) -> float:
    return metrics(limiter)[("meshkit_ratelimit_redis_outages_total", ())]


def redis_up(limiter: RateLimiter) -> float:
    return metrics(limiter)[("meshkit_ratelimit_redis_up", ())]


async def until(condition: Any, within: float, what: str) -> float:
    """Poll `condition()` (sync or async) until true; the seconds it took, or fail after `within` s."""
    start = time.monotonic()
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return time.monotonic() - start
        if time.monotonic() - start > within:
            pytest.fail(f"not within {within} s: {what}")
        await asyncio.sleep(0.02)


# -- limits ----------------------------------------------------------------------------------------------


async def test_a_burst_admits_exactly_the_limit_then_one_per_interval(
    redis: Redis, inspect: aioredis.Redis
) -> None:
    limiter = await started(redis.url)
    try:
        assert limiter.redis_up
        decisions = await asyncio.gather(*(limiter.check("alice", 60) for _ in range(100)))
        allowed = [d for d in decisions if d.allowed]
        assert len(allowed) == 60
        assert {d.source for d in decisions} == {"redis"}
        assert sorted(d.remaining for d in allowed) == list(range(60))
        refused = [d for d in decisions if not d.allowed]
        assert all(d.remaining == 0 and 0.9 < d.retry_after <= 1.0 for d in refused)
        assert all(59.0 < d.reset_after <= 60.0 for d in refused)
        # One clock (Redis' TIME), an expiry on the key: an idle subject's key goes away.
        ttl = await inspect.pttl(subject_key("meshkit:rl:", "alice"))
        assert 59_000 < ttl <= 60_000

        # The next one is admitted about a second (T = 60/60 s) after the burst, not before.
        first_retry = refused[-1].retry_after
        waited = await until(lambda: _allowed(limiter, "alice", 60), 3.0, "admitted again")
        assert waited >= first_retry - 0.1
        assert not (await limiter.check("alice", 60)).allowed
        assert (await limiter.check("bob", 60)).remaining == 59  # another subject is untouched
        assert (
            metrics(limiter)[("meshkit_ratelimit_checks_total", (("result", "allowed"), ("source", "redis")))]
            == 62
        )
    finally:
        await limiter.close()


async def _allowed(limiter: RateLimiter, subject: str, per_minute: int) -> bool:
    return (await limiter.check(subject, per_minute)).allowed


async def test_two_limiters_on_one_redis_admit_the_limit_together(redis: Redis) -> None:
    a = await started(redis.url, replicas=2)
    b = await started(redis.url, replicas=2)
    try:
        decisions = await asyncio.gather(*(lim.check("shared", 50) for _ in range(60) for lim in (a, b)))
        assert sum(d.allowed for d in decisions) == 50
        assert {d.limit for d in decisions} == {50}  # in Redis the whole limit, not a share
    finally:
        await a.close()
        await b.close()


CHILD = """
import asyncio, sys
from meshkit.extproc.auth.rate_limit import RateLimiter

async def main() -> None:
    limiter = RateLimiter(sys.argv[1], replicas=2)
    await limiter.start()
    assert limiter.redis_up
    print("ready", flush=True)
    sys.stdin.readline()  # both processes start together
    decisions = await asyncio.gather(*(limiter.check("shared", 80) for _ in range(100)))
    print(sum(d.allowed for d in decisions), {d.source for d in decisions}.pop(), flush=True)
    await limiter.close()

asyncio.run(main())
"""


async def test_two_processes_on_one_redis_admit_the_limit_together(redis: Redis) -> None:
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD,
            redis.url,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        for _ in range(2)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"ready\n"
        outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate(b"go\n") for p in procs)), 30)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    results = [out.decode().split() for out, _ in outputs]
    assert [p.returncode for p in procs] == [0, 0]
    assert all(source == "redis" for _, source in results)
    assert sum(int(n) for n, _ in results) == 80


ODD = [
    "a:b",
    "a",
    "b",
    "a%3Ab",
    "*",
    "a*",
    "meshkit:rl:s:a",
    "ü",
    "u\u0308",
    "日本語",
    "a b",
    "x" * 300,
    "x" * 299,
]


async def test_odd_subjects_do_not_collide(redis: Redis, inspect: aioredis.Redis) -> None:
    limiter = await started(redis.url)
    try:
        first = [await limiter.check(s, 1) for s in ODD]
        assert all(d.allowed and d.source == "redis" for d in first)
        second = [await limiter.check(s, 1) for s in ODD]
        assert not any(d.allowed for d in second)
        keys = [k async for k in inspect.scan_iter(match="meshkit:rl:*")]
        assert len(keys) == len(set(keys)) == len(ODD)
    finally:
        await limiter.close()


async def test_a_redis_that_forgot_the_script_is_sent_it_again(redis: Redis, inspect: aioredis.Redis) -> None:
    limiter = await started(redis.url)
    try:
        assert (await limiter.check("a", 2)).allowed
        await inspect.script_flush()
        d = await limiter.check("a", 2)
        assert (d.allowed, d.remaining, d.source) == (True, 0, "redis")
        assert (await limiter.check("a", 2)).source == "redis"  # loaded again: EVALSHA works
        assert limiter.redis_up
        assert outages(limiter) == 0
    finally:
        await limiter.close()


# -- Redis down ------------------------------------------------------------------------------------------


async def decide_100(limiter: RateLimiter, per_minute: int) -> tuple[list[Decision | DependencyError], float]:
    out: list[Decision | DependencyError] = []
    start = time.monotonic()
    for _ in range(100):
        try:
            out.append(await limiter.check("carol", per_minute))
        except DependencyError as exc:
            out.append(exc)
    return out, time.monotonic() - start


@pytest.mark.parametrize("mode", ["local", "open", "closed"])
async def test_redis_killed_and_restarted(redis: Redis, mode: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="meshkit.auth.rate_limit")
    limiter = await started(redis.url, on_redis_down=mode, replicas=2, redis_timeout=0.1, probe_interval=0.2)
    try:
        assert (await limiter.check("carol", 40)).source == "redis"
        assert (outages(limiter), redis_up(limiter)) == (0, 1)

        redis.kill()
        await until(lambda: not limiter.redis_up, 2.0, "the limiter notices Redis is gone")
        assert (outages(limiter), redis_up(limiter)) == (1, 0)

        decisions, took = await decide_100(limiter, 40)
        assert took < 1.0  # 100 x redis_timeout would be 10 s: no check waits on the dead Redis
        if mode == "local":
            assert all(isinstance(d, Decision) and d.source == "local" for d in decisions)
            assert sum(isinstance(d, Decision) and d.allowed for d in decisions) == 20  # 40 // 2 replicas
            assert isinstance(decisions[0], Decision)
            assert decisions[0].limit == 20
        elif mode == "open":
            assert all(isinstance(d, Decision) and d.allowed and d.source == "open" for d in decisions)
        else:
            assert all(isinstance(d, DependencyError) and d.dependency == "redis" for d in decisions)

        redis.restart()  # the same port; the limiter is not recreated
        await until(lambda: limiter.redis_up, 5.0, "the probe notices Redis is back")
        d = await limiter.check("carol", 40)
        assert d.source == "redis"
        assert d.remaining == 39  # a fresh Redis: the local state did not leak into it
        assert (outages(limiter), redis_up(limiter)) == (1, 1)
    finally:
        await limiter.close()

    lines = [r for r in caplog.records if r.name == "meshkit.auth.rate_limit" and r.levelno >= logging.INFO]
    assert [r.levelno for r in lines] == [logging.WARNING, logging.INFO]  # one when it starts, one at the end
    assert "unreachable" in lines[0].getMessage()
    assert "100 requests were decided without it" in lines[1].getMessage()
    assert getattr(lines[1], "decided_without_redis", None) == 100


async def test_a_paused_redis_costs_one_timeout_then_none(redis: Redis) -> None:
    limiter = await started(redis.url, redis_timeout=0.1, probe_interval=0.2)
    try:
        assert (await limiter.check("dave", 60)).source == "redis"
        redis.process.signal(signal.SIGSTOP)  # connected, silent: only the deadline can tell
        try:
            start = time.monotonic()
            first = await limiter.check("dave", 60)
            waited = time.monotonic() - start
            assert first.source == "local"
            assert 0.08 <= waited < 0.5
            decisions, took = await decide_100(limiter, 60)
            assert took < 0.5
            assert all(isinstance(d, Decision) and d.source == "local" for d in decisions)
            assert outages(limiter) == 1
        finally:
            redis.process.signal(signal.SIGCONT)
        await until(lambda: limiter.redis_up, 5.0, "Redis answers again")
        assert (await limiter.check("dave", 60)).source == "redis"
    finally:
        await limiter.close()


async def test_redis_down_at_start_is_not_fatal(redis: Redis) -> None:
    redis.kill()
    limiter = await started(redis.url, probe_interval=0.2)
    try:
        assert not limiter.redis_up
        assert (outages(limiter), redis_up(limiter)) == (1, 0)
        assert (await limiter.check("erin", 10)).source == "local"
        redis.restart()
        await until(lambda: limiter.redis_up, 5.0, "the probe connects")
        assert (await limiter.check("erin", 10)).source == "redis"
    finally:
        await limiter.close()
