"""The broadcaster's keep-alive PURGE client against raw loopback servers that answer exactly the bytes
a test gives: what it sends, the answers it reads (Content-Length, chunked, 1xx, to EOF), connections
kept and reused, one closed by the server while kept, and answers it refuses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from meshkit.sidecars.purge_fanout import BadAnswer, Purge, PurgeClient, RetryPolicy, deliver

Answer = Callable[[int], bytes]  # the n-th request on a connection (0-based) -> the bytes sent back
CLOSE = b"close without an answer"


class RawServer:
    def __init__(self, answer: Answer, *, close_after: int | None = None) -> None:
        self.answer, self.close_after = answer, close_after
        self.requests: list[bytes] = []
        self.connections = 0
        self.open = self.most_open = 0
        self.target = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                if (answer := self.answer(n)) == CLOSE:
                    break
                writer.write(answer)
                await writer.drain()
                n += 1
                if self.close_after is not None and n >= self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()


@asynccontextmanager
async def raw_server(answer: Answer, host: str = "127.0.0.1", **kw: int) -> AsyncIterator[RawServer]:
    server = RawServer(answer, **kw)
    listening = await asyncio.start_server(server.handle, host, 0)
    port = listening.sockets[0].getsockname()[1]
    server.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        yield server
    finally:
        listening.close()


OK = b'HTTP/1.1 200 Purged\r\nContent-Length: 17\r\nContent-Type: application/json\r\n\r\n{"purged": "url"}'


async def test_it_sends_the_purge_and_reuses_the_connection() -> None:
    client = PurgeClient()
    async with raw_server(lambda n: OK) as server:
        for purge in (Purge("/v1/x?a=1"), Purge("/", purge_all=True), Purge("/", keys=("k1", "k.2"))):
            assert await client.purge(server.target, purge) == (200, '{"purged": "url"}')
    await client.close()
    assert server.connections == 1
    first, every, keys = server.requests
    assert first == f"PURGE /v1/x?a=1 HTTP/1.1\r\nHost: {server.target}\r\nContent-Length: 0\r\n\r\n".encode()
    assert b"\r\nX-Purge-All: true\r\n" in every and b"\r\nSurrogate-Key: k1 k.2\r\n" in keys


async def test_an_ipv6_target() -> None:
    client = PurgeClient()
    async with raw_server(lambda n: OK, host="::1") as server:
        assert await client.purge(server.target, Purge("/")) == (200, '{"purged": "url"}')
    await client.close()
    assert server.target.startswith("[::1]:") and f"Host: {server.target}".encode() in server.requests[0]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n",
            (200, "abcde"),
        ),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", (200, "ok")),
        (b"HTTP/1.1 204 No Content\r\n\r\n", (204, "")),
        (b"HTTP/1.1 403 Forbidden\r\ncontent-length: 4\r\n\r\nnope", (403, "nope")),
    ],
)
async def test_the_answers_it_reads_and_keeps_the_connection_for(
    answer: bytes, expected: tuple[int, str]
) -> None:
    client = PurgeClient()
    async with raw_server(lambda n: answer) as server:
        assert await client.purge(server.target, Purge("/")) == expected
        assert await client.purge(server.target, Purge("/")) == expected
    await client.close()
    assert server.connections == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",  # 1.0 without keep-alive
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    ],
)
async def test_a_connection_the_answer_closes_is_not_kept(answer: bytes) -> None:
    client = PurgeClient()
    async with raw_server(lambda n: answer, close_after=1) as server:
        for _ in range(2):
            assert await client.purge(server.target, Purge("/")) == (200, "ok")
    await client.close()
    assert server.connections == 2


async def test_a_kept_connection_the_server_closed_is_replaced_without_a_retry() -> None:
    client = PurgeClient()
    async with raw_server(lambda n: OK, close_after=1) as server:  # keep-alive answered, then closed
        for _ in range(3):
            delivery = await deliver(client, server.target, Purge("/"), RetryPolicy(attempts=1, timeout=2))
            assert delivery.ok and delivery.attempts == 1
    await client.close()
    assert server.connections == 3


async def test_a_kept_connection_closed_on_the_request_is_tried_once_more_on_a_fresh_one() -> None:
    client = PurgeClient()
    async with raw_server(lambda n: OK if n == 0 else CLOSE) as server:  # the 2nd request on it: closed
        for _ in range(3):
            delivery = await deliver(client, server.target, Purge("/"), RetryPolicy(attempts=1, timeout=2))
            assert delivery.ok and delivery.attempts == 1
    await client.close()
    assert server.connections == 3 and len(server.requests) == 5  # 1 + (1 lost + 1) + (1 lost + 1)


async def test_a_fresh_connection_closed_on_the_request_is_an_error() -> None:
    client = PurgeClient()
    async with raw_server(lambda n: CLOSE) as server:
        delivery = await deliver(client, server.target, Purge("/"), RetryPolicy(attempts=1, timeout=2))
    await client.close()
    assert delivery.status is None and "IncompleteReadError" in (delivery.error or "")
    assert server.connections == 1


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "Content-Length"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 0\r\n\r\nok",
            "two different Content-Length",
        ),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * (20 << 10) + b"\r\n\r\n", "headers over"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "hexadecimal"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nabc\r\n0\r\n\r\n", "hexadecimal"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\nok\r\n0\r\n\r\n", "hexadecimal"),
    ],
)
async def test_what_is_not_an_answer_is_an_error_not_a_hang(answer: bytes, says: str) -> None:
    client = PurgeClient()
    async with raw_server(lambda n: answer, close_after=1) as server:
        with pytest.raises(BadAnswer, match=says):
            async with asyncio.timeout(2):
                await client.purge(server.target, Purge("/"))
    await client.close()


async def test_no_answer_is_bounded_by_the_policy_and_the_connection_dropped() -> None:
    client = PurgeClient()
    async with raw_server(lambda n: b"") as server:  # reads the request, never answers
        delivery = await deliver(
            client, server.target, Purge("/"), RetryPolicy(attempts=2, timeout=0.2, backoff=0.01)
        )
    await client.close()
    assert (
        delivery.status is None
        and delivery.attempts == 2
        and "no answer within 0.2 s" in (delivery.error or "")
    )
    assert server.connections == 2  # the timed-out connection was not reused


async def test_refused_is_an_error() -> None:
    async with raw_server(lambda n: OK) as server:
        target = server.target
    client = PurgeClient()
    delivery = await deliver(client, target, Purge("/"), RetryPolicy(attempts=1, timeout=1))
    assert delivery.status is None and "ConnectionRefusedError" in (delivery.error or "")


async def test_requests_in_flight_to_one_target_are_capped() -> None:
    client = PurgeClient(idle_per_target=3, busy_per_target=3)

    async with raw_server(lambda n: OK) as server:
        results = await asyncio.gather(*(client.purge(server.target, Purge(f"/{i}")) for i in range(10)))
    await client.close()
    assert [status for status, _ in results] == [200] * 10
    assert server.most_open == server.connections == 3  # never more than 3 at once, then reused
    assert client._slots == {}  # nothing left for a target with nothing in flight


BUSY = b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"


async def test_bytes_past_an_answer_are_never_read_as_the_next_answer() -> None:
    """A target that sends more than its answer (here a second, unasked 200 right behind the first):
    the connection is not kept, and the next PURGE gets the target's own answer to it (503)."""
    answered: list[int] = []

    def answer(n: int) -> bytes:
        answered.append(n)
        return OK + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" if len(answered) == 1 else BUSY

    client = PurgeClient()
    async with raw_server(answer) as server:
        assert (await client.purge(server.target, Purge("/a")))[0] == 200
        await asyncio.sleep(0.05)  # the extra answer is in the client's buffer by now
        assert (await client.purge(server.target, Purge("/b")))[0] == 503
    await client.close()
    assert len(server.requests) == 2 and server.connections == 2


async def test_bytes_arriving_on_an_idle_kept_connection_retire_it() -> None:
    """An answer the target sends later, unasked (a 200 here), on a connection kept idle: that
    connection is not used again; the next PURGE goes out on a fresh one and gets the real answer."""
    requests: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                requests.append(await reader.readuntil(b"\r\n\r\n"))
                writer.write(OK if len(requests) == 1 else BUSY)
                if len(requests) == 1:
                    await asyncio.sleep(0.02)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    listening = await asyncio.start_server(handle, "127.0.0.1", 0)
    target = f"127.0.0.1:{listening.sockets[0].getsockname()[1]}"
    client = PurgeClient()
    try:
        assert (await client.purge(target, Purge("/a")))[0] == 200
        await asyncio.sleep(0.1)
        assert (await client.purge(target, Purge("/b")))[0] == 503
    finally:
        await client.close()
        listening.close()
    assert len(requests) == 2


async def test_a_chunk_not_followed_by_crlf_is_not_an_answer() -> None:
    client = PurgeClient()
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXY0\r\n\r\n"
    async with raw_server(lambda n: answer, close_after=1) as server:
        with pytest.raises(BadAnswer, match="CRLF"):
            async with asyncio.timeout(2):
                await client.purge(server.target, Purge("/"))
    await client.close()


async def test_a_content_length_of_non_ascii_digits_is_not_an_answer() -> None:
    """`\\xb2` is `²` in Latin-1, which str.isdigit() accepts and int() refuses: a ValueError that
    escaped deliver() and failed the whole fan-out with a 500."""
    client = PurgeClient()
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n"
    async with raw_server(lambda n: answer, close_after=1) as server:
        delivery = await deliver(client, server.target, Purge("/"), RetryPolicy(attempts=1, timeout=2))
    await client.close()
    assert delivery.status is None and "Content-Length" in (delivery.error or "")
