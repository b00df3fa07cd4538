"""GCRA arithmetic on a fake clock, the in-memory limiter, Redis keys, the RESP parser, and the
limiter's behaviour against a fake Redis that never answers."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshkit.errors import DependencyError
from meshkit.extproc.auth.gcra import LocalLimiter, gcra, share
from meshkit.extproc.auth.rate_limit import (
    RateLimiter,
    RedisUnavailable,
    RespConnection,
    RespError,
    command,
    parse,
    subject_key,
)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def limiter(max_subjects: int = 100) -> tuple[LocalLimiter, Clock]:
    clock = Clock()
    return LocalLimiter(max_subjects, clock), clock


# -- the arithmetic ------------------------------------------------------------------------------------


def test_a_full_minute_at_once_then_one_per_interval() -> None:
    lim, clock = limiter()
    decisions = [lim.check("a", 60) for _ in range(60)]
    assert all(d.allowed for d in decisions)
    assert [d.remaining for d in decisions] == list(range(59, -1, -1))
    assert [d.reset_after for d in decisions] == pytest.approx([float(k) for k in range(1, 61)])
    assert all(d.retry_after == 0 for d in decisions)

    refused = lim.check("a", 60)
    assert (refused.allowed, refused.limit, refused.remaining, refused.source) == (False, 60, 0, "local")
    assert (refused.reset_after, refused.retry_after) == (60.0, 1.0)  # whole microseconds: exact
    # A refused request does not move the TAT: asking again changes nothing.
    assert lim.check("a", 60) == refused

    clock.now += 0.5
    half = lim.check("a", 60)
    assert not half.allowed
    assert half.retry_after == pytest.approx(0.5)
    assert half.reset_after == pytest.approx(59.5)

    clock.now += 0.5  # one interval (1 s) after the burst: exactly one more
    one = lim.check("a", 60)
    assert one.allowed
    assert one.remaining == 0
    assert one.reset_after == pytest.approx(60.0)
    assert not lim.check("a", 60).allowed

    # Steady rate: one per second is always admitted, two per second are not.
    for _ in range(10):
        clock.now += 1.0
        assert lim.check("a", 60).allowed
        assert not lim.check("a", 60).allowed


def test_the_allowance_refills_over_a_minute() -> None:
    lim, clock = limiter()
    for _ in range(600):
        assert lim.check("a", 600).allowed
    assert not lim.check("a", 600).allowed
    clock.now += 30.0  # half a minute: half the allowance back
    first = lim.check("a", 600)
    assert first.allowed
    assert first.remaining == 299
    assert first.reset_after == pytest.approx(30.1)
    clock.now += 60.0  # idle for a minute: all of it, and nothing held
    fresh = lim.check("a", 600)
    assert fresh.remaining == 599
    assert fresh.reset_after == pytest.approx(0.1)


def test_an_idle_subject_holds_nothing() -> None:
    decision, tat = gcra(100_000_000, 50_000_000, 60)  # a TAT in the past counts as none
    assert decision == gcra(100_000_000, None, 60)[0]
    assert tat == 101_000_000


def test_limits_that_do_not_divide_a_minute() -> None:
    lim, clock = limiter()
    assert sum(lim.check("a", 7).allowed for _ in range(20)) == 7
    refused = lim.check("a", 7)
    assert refused.retry_after == pytest.approx(60 / 7, abs=1e-6)
    clock.now += refused.retry_after
    assert lim.check("a", 7).allowed
    assert not lim.check("a", 7).allowed


def test_a_limit_below_one_is_refused() -> None:
    for bad in (0, -1, 60_000_001):
        with pytest.raises(ValueError, match="per_minute"):
            gcra(0, None, bad)
    assert gcra(0, None, 60_000_000)[0].allowed


@settings(max_examples=200, deadline=None)
@given(
    per_minute=st.integers(1, 1000),
    gaps=st.lists(st.floats(0.0, 5.0, allow_nan=False), min_size=1, max_size=300),
)
def test_never_more_than_the_burst_plus_the_rate(per_minute: int, gaps: list[float]) -> None:
    """Over any run of L seconds GCRA admits at most per_minute + L/T; what it says about the next
    request (remaining, retry_after) is what then happens."""
    lim, clock = limiter()
    start = clock.now
    allowed = 0
    interval = (60_000_000 // per_minute) / 1e6  # whole microseconds
    for gap in gaps:
        clock.now += gap
        d = lim.check("s", per_minute)
        allowed += d.allowed
        assert 0 <= d.remaining < per_minute
        assert 0 < d.reset_after <= 60.0
        if d.allowed:
            assert d.retry_after == 0
        else:
            assert d.remaining == 0
            assert 0 < d.retry_after <= interval + 1e-6
    assert allowed <= per_minute + math.floor((clock.now - start) / interval + 1e-6)


@settings(max_examples=100, deadline=None)
@given(per_minute=st.integers(1, 300), used=st.integers(1, 400))
def test_remaining_and_retry_after_are_exact(per_minute: int, used: int) -> None:
    lim, clock = limiter()
    last = None
    for _ in range(used):
        last = lim.check("s", per_minute)
    assert last is not None
    if last.allowed:  # `remaining` more are admitted right now, and not one more
        for _ in range(last.remaining):
            assert lim.check("s", per_minute).allowed
    refused = lim.check("s", per_minute)
    assert not refused.allowed
    start = clock.now
    clock.now = start + refused.retry_after - 2e-6  # 2 µs early (the clock is read in whole µs)
    assert not lim.check("s", per_minute).allowed
    clock.now = start + refused.retry_after
    assert lim.check("s", per_minute).allowed


def test_subjects_are_isolated() -> None:
    lim, _ = limiter()
    for _ in range(5):
        assert lim.check("a", 5).allowed
    assert not lim.check("a", 5).allowed
    b = lim.check("b", 5)
    assert b.allowed
    assert b.remaining == 4
    assert not lim.check("a", 5).allowed


def test_the_table_is_bounded_and_forgets_the_least_recently_seen() -> None:
    lim, _ = limiter(max_subjects=3)
    for name in ("a", "b", "c"):
        lim.check(name, 1)
    assert not lim.check("a", 1).allowed  # "a" seen again: now the most recent
    lim.check("d", 1)
    assert len(lim) == 3
    assert "b" not in lim
    assert "a" in lim
    assert not lim.check("a", 1).allowed  # kept its state
    for k in range(1000):
        lim.check(f"x{k}", 1)
    assert len(lim) == 3
    assert lim.check("b", 1).allowed  # forgotten: a fresh allowance


def test_share_per_replica() -> None:
    assert share(100, 1) == 100
    assert share(100, 3) == 33
    assert share(5, 10) == 1
    assert share(1, 2) == 1


async def test_without_redis_each_replica_enforces_its_share() -> None:
    rl = RateLimiter(None, replicas=3, on_redis_down="closed")  # no Redis: local whatever the mode
    await rl.start()
    try:
        decisions = [await rl.check("a", 30) for _ in range(12)]
    finally:
        await rl.close()
    assert sum(d.allowed for d in decisions) == 10
    assert {d.source for d in decisions} == {"local"}
    assert decisions[0].limit == 10
    assert decisions[0].remaining == 9
    names = {m.name for c in rl.collectors() for m in c.collect()}
    assert names == {"meshkit_ratelimit_checks"}
    samples = {
        (s.labels["source"], s.labels["result"]): s.value
        for c in rl.collectors()
        for m in c.collect()
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert samples == {("local", "allowed"): 10, ("local", "limited"): 2}


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="on_redis_down"):
        RateLimiter(None, on_redis_down="maybe")
    with pytest.raises(ValueError, match="replicas"):
        RateLimiter(None, replicas=0)


async def test_check_refuses_a_limit_below_one() -> None:
    with pytest.raises(ValueError, match="per_minute"):
        await RateLimiter(None).check("a", 0)


# -- Redis keys ----------------------------------------------------------------------------------------

ODD = [
    "a:b",
    "a",
    "b",
    "a%3Ab",
    "*",
    "a*",
    "",
    " ",
    "a b",
    "ü",
    "u\u0308",
    "日本",
    "\x00",
    "\ud800",
    "x" * 300,
]


def test_no_two_subjects_share_a_key() -> None:
    keys = [subject_key("meshkit:rl:", s) for s in [*ODD, "x" * 301, "y" * 300, "h:" + "0" * 64]]
    assert len(set(keys)) == len(keys)
    assert all(k.startswith(b"meshkit:rl:") for k in keys)
    assert all(len(k) <= 250 for k in keys)
    assert subject_key("p:", "a:b") == b"p:s:a%3Ab"
    assert subject_key("p:", "user@example.com") == b"p:s:user@example.com"  # readable when plain
    long = subject_key("p:", "x" * 300)
    assert long.startswith(b"p:h:")
    assert len(long) == 4 + 64
    # The escaped part never holds ':' or '*' (no glob or namespace surprises in SCAN/KEYS).
    for s in ODD:
        rest = subject_key("p:", s)[4:]
        assert b":" not in rest
        assert b"*" not in rest


# -- RESP ----------------------------------------------------------------------------------------------


def test_command_encoding() -> None:
    assert command(b"GET", b"k") == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    assert command(b"SET", b"", b"a\r\nb") == b"*3\r\n$3\r\nSET\r\n$0\r\n\r\n$4\r\na\r\nb\r\n"


def test_parse_replies_whole_and_in_pieces() -> None:
    reply = b"*4\r\n:1\r\n:59\r\n:1000000\r\n:0\r\n+OK\r\n$-1\r\n$5\r\nab\r\nc\r\n-NOSCRIPT No matching\r\n"
    values = []
    pos = 0
    while pos < len(reply):
        item = parse(reply, pos)
        assert item is not None
        values.append(item[0])
        pos = item[1]
    assert values[:4] == [[1, 59, 1000000, 0], b"OK", None, b"ab\r\nc"]
    assert isinstance(values[4], RespError)
    assert str(values[4]).startswith("NOSCRIPT")
    for cut in range(1, 27):  # every prefix of the array is "not there yet", never a wrong value
        assert parse(reply[:cut]) is None
    with pytest.raises(RedisUnavailable):
        parse(b"?what\r\n")


# -- a Redis that accepts connections and never answers -----------------------------------------------


@pytest.fixture
async def silent_server() -> AsyncIterator[str]:
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"redis://127.0.0.1:{port}/0"
    for w in held:
        w.close()
    server.close()
    await server.wait_closed()


async def test_a_command_without_an_answer_fails_at_its_deadline(silent_server: str) -> None:
    with pytest.raises(RedisUnavailable, match="no answer"):
        await RespConnection.open(silent_server.replace("/0", "/3"), 0.05)  # SELECT 3 never answered


async def test_a_silent_redis_is_waited_on_once_then_not_at_all(silent_server: str) -> None:
    rl = RateLimiter(silent_server, redis_timeout=0.05, probe_interval=60, replicas=2)
    started = time.monotonic()
    await rl.start()  # PING never answered: down, not fatal
    assert time.monotonic() - started < 1.0
    assert not rl.redis_up
    started = time.monotonic()
    decisions = [await rl.check("a", 100) for _ in range(100)]
    assert time.monotonic() - started < 0.5  # 100 x the timeout would be 5 s: none waited
    assert sum(d.allowed for d in decisions) == 50
    assert {d.source for d in decisions} == {"local"}
    await rl.close()


async def test_closed_mode_raises_a_dependency_error(silent_server: str) -> None:
    rl = RateLimiter(silent_server, on_redis_down="closed", redis_timeout=0.05, probe_interval=60)
    await rl.start()
    with pytest.raises(DependencyError) as err:
        await rl.check("a", 10)
    assert err.value.dependency == "redis"
    assert err.value.retry_after == 1
    await rl.close()


async def test_open_mode_allows(silent_server: str) -> None:
    rl = RateLimiter(silent_server, on_redis_down="open", redis_timeout=0.05, probe_interval=60)
    await rl.start()
    decisions = [await rl.check("a", 1) for _ in range(5)]
    assert all(d.allowed and d.source == "open" for d in decisions)
    await rl.close()
