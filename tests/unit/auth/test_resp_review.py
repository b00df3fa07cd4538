"""Review of the rate limiter's RESP client without Redis: replies cut at every byte, pipelined replies
after a cancelled request, a reply after its deadline, close() with checks in flight, RESP3 and
garbage, and Redis URLs (good ones, and bad ones refused at construction with a clear message)."""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import AsyncIterator
from typing import Any

import pytest

from meshkit.errors import ConfigError
from meshkit.extproc.auth.rate_limit import (
    RateLimiter,
    RedisTarget,
    RedisUnavailable,
    RespConnection,
    RespError,
    command,
)


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abort(self) -> None:
        self.aborted = True


def connection(timeout: float = 5.0) -> tuple[RespConnection, FakeTransport]:
    conn = RespConnection(timeout)
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


REPLIES = (
    b"*4\r\n:1\r\n:59\r\n:1000000\r\n:0\r\n"
    b"+OK\r\n"
    b"$-1\r\n"
    b"$5\r\nab\r\nc\r\n"
    b"*2\r\n*2\r\n:1\r\n$0\r\n\r\n*-1\r\n"
    b"-NOSCRIPT No matching script\r\n"
    b":-42\r\n"
    b"$0\r\n\r\n"
)
VALUES: list[Any] = [[1, 59, 1000000, 0], b"OK", None, b"ab\r\nc", [[1, b""], None], "NOSCRIPT", -42, b""]


async def outcomes(futures: list[asyncio.Future[Any]]) -> list[Any]:
    out: list[Any] = []
    for fut in futures:
        try:
            out.append(await fut)
        except RespError as exc:
            out.append(str(exc).split()[0])
    return out


@pytest.mark.parametrize("step", [1, 2, 3, 7])
async def test_pipelined_replies_cut_anywhere_resolve_in_order(step: int) -> None:
    for cut in range(len(REPLIES) + 1):
        conn, _ = connection()
        futures = [conn.request(command(b"PING")) for _ in VALUES]
        for start in range(0, cut, step):
            conn.data_received(REPLIES[start : min(cut, start + step)])
        for start in range(cut, len(REPLIES), step):
            conn.data_received(REPLIES[start : start + step])
        assert await outcomes(futures) == VALUES, cut
        assert not conn.closed
        conn.close()


async def test_a_cancelled_request_keeps_its_place_in_the_reply_queue() -> None:
    # The chain cancels a hook at --filter-timeout: its reply still arrives and must not be handed to
    # the next request (that would give one subject another's decision).
    conn, _ = connection()
    first = conn.request(command(b"EVALSHA", b"a"))
    second = conn.request(command(b"EVALSHA", b"b"))
    first.cancel()
    conn.data_received(b"*4\r\n:0\r\n:0\r\n:5\r\n:5\r\n")  # a's reply: refused
    conn.data_received(b"*4\r\n:1\r\n:9\r\n:6\r\n:0\r\n")  # b's: allowed
    assert await second == [1, 9, 6, 0]
    conn.close()


async def test_check_cancelled_mid_flight_then_the_next_check_gets_its_own_reply() -> None:
    conn, transport = connection()
    limiter = RateLimiter("redis://127.0.0.1:1/0")
    limiter._conn, limiter._up = conn, True
    a = asyncio.create_task(limiter.check("a", 10))
    await asyncio.sleep(0)
    a.cancel()
    with pytest.raises(asyncio.CancelledError):
        await a
    b = asyncio.create_task(limiter.check("b", 10))
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # a is still pending: b's command waits one turn to be written with others
    assert b"meshkit:rl:s:a" in transport.written[0] and b"meshkit:rl:s:b" in b"".join(transport.written[1:])
    conn.data_received(b"*4\r\n:0\r\n:0\r\n:6000000\r\n:6000000\r\n")
    conn.data_received(b"*4\r\n:1\r\n:9\r\n:6000000\r\n:0\r\n")
    d = await b
    assert (d.allowed, d.remaining, d.source) == (True, 9, "redis")
    await limiter.close()


async def test_a_reply_after_its_deadline_fails_the_connection_and_is_never_matched() -> None:
    conn, transport = connection(timeout=0.02)
    late = conn.request(command(b"PING"))
    with pytest.raises(RedisUnavailable, match="no answer"):
        await late
    assert conn.closed and transport.aborted
    with pytest.raises(RedisUnavailable):
        conn.request(command(b"PING"))
    conn.data_received(b"+PONG\r\n")  # arrives anyway (before the abort took effect): ignored


@pytest.mark.parametrize(
    "garbage",
    [b"%1\r\n+a\r\n+b\r\n", b"_\r\n", b">2\r\n+a\r\n+b\r\n", b"#t\r\n", b",1.5\r\n", b":x\r\n", b"$x\r\n"],
)
async def test_resp3_or_garbage_is_a_protocol_fault_not_a_wrong_answer(garbage: bytes) -> None:
    conn, transport = connection()
    fut = conn.request(command(b"PING"))
    conn.data_received(garbage)
    with pytest.raises(RedisUnavailable, match="protocol"):
        await fut
    assert conn.closed and transport.aborted


async def test_an_unsolicited_reply_is_a_protocol_fault() -> None:
    conn, _ = connection()
    failures: list[str] = []
    conn.on_fail = failures.append
    conn.data_received(b"+hello\r\n")
    assert conn.closed and failures == ["protocol: a reply nobody asked for"]


@pytest.fixture
async def silent() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A server that reads and never answers: (URL, what it read)."""
    got: list[bytes] = []
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while data := await reader.read(65536):
            got.append(data)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    yield f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}", got
    for w in held:
        w.close()
    server.close()


async def test_close_with_checks_in_flight_decides_them_and_leaves_nothing_behind(
    silent: tuple[str, list[bytes]],
) -> None:
    url, _ = silent
    limiter = RateLimiter(url, redis_timeout=5.0, probe_interval=60)
    conn = await RespConnection.open(url, 1.0)
    limiter._went_down = asyncio.Event()
    limiter._use(conn)
    checks = [asyncio.create_task(limiter.check(f"s{i}", 10)) for i in range(50)]
    await asyncio.sleep(0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        await asyncio.wait_for(limiter.close(), 1.0)
        decisions = await asyncio.wait_for(asyncio.gather(*checks), 1.0)
        gc.collect()
    assert {d.source for d in decisions} == {"local"}
    assert conn.closed


# -- URLs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://h", RedisTarget(host="h")),
        ("redis://h:7000/3", RedisTarget(host="h", port=7000, db=3)),
        ("redis://:s%40cret@h/0", RedisTarget(host="h", password="s@cret")),
        ("redis://bob:pw@h:1", RedisTarget(host="h", port=1, username="bob", password="pw")),
        ("rediss://h", RedisTarget(host="h", tls=True)),
        ("redis://[::1]:6380/2", RedisTarget(host="::1", port=6380, db=2)),
        ("redis://h?db=4&password=pw&socket_timeout=1", RedisTarget(host="h", db=4, password="pw")),
        ("unix:///run/redis.sock", RedisTarget(path="/run/redis.sock")),
        ("unix:///run/redis.sock?db=2&password=pw", RedisTarget(path="/run/redis.sock", db=2, password="pw")),
        ("REDIS://h/", RedisTarget(host="h")),
    ],
)
def test_redis_urls(url: str, expected: RedisTarget) -> None:
    assert RedisTarget.parse(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://:pw@h:abc", "not a valid Redis URL"),
        ("redis://:pw@h:99999", "not a valid Redis URL"),
        ("redis://:pw@[zz]:1", "not a valid Redis URL"),
        ("http://:pw@h", "unsupported Redis URL scheme 'http'"),
        ("h:6379", "unsupported Redis URL scheme"),
        ("redis://:pw@h/abc", "database must be a number"),
        ("redis://:pw@h/-1", "database must be a number"),
        ("unix://", "needs the socket's path"),
    ],
)
async def test_a_bad_redis_url_is_a_configuration_error_without_the_password(url: str, message: str) -> None:
    # Found in review: a bad port reached start() as a ValueError traceback ("filter auth did not
    # start"), a non-numeric database was sent as SELECT and reported as Redis being unreachable.
    limiter = RateLimiter(url)  # the auth filter's summary is built before start()
    with pytest.raises(ConfigError, match=message) as err:
        await limiter.start()
    assert limiter._probe is None
    assert "pw" not in str(err.value)
    assert str(err.value).startswith("invalid configuration:\n  - --redis: ")


async def test_a_unix_socket(tmp_path: Any) -> None:
    path = str(tmp_path / "r.sock")

    served: list[asyncio.StreamWriter] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append(writer)
        while await reader.read(65536):
            writer.write(b"+PONG\r\n")
        writer.close()

    server = await asyncio.start_unix_server(answer, path)
    conn = await RespConnection.open(f"unix://{path}", 1.0)
    assert await conn.call(b"PING") == b"PONG"
    conn.close()
    server.close()
    await server.wait_closed()
    for writer in served:  # the server side of the connection, closed before the loop ends
        writer.close()
        await writer.wait_closed()
