"""`ConnectionGuard` on a real aiohttp listener (`start_app`, what every daemon serves on): a bound on
open connections and a deadline on a new connection's first request head, while streams that have
started live on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from meshkit.connection_guard import ConnectionGuard
from meshkit.daemon import DaemonOptions, Lifecycle, start_app


async def _stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(4):
        await response.write(f"data: {i}\n\n".encode())
        await asyncio.sleep(0.25)
    return response


async def _ok(_: web.Request) -> web.Response:
    return web.Response(text="ok")


def _app() -> web.Application:
    app = web.Application()
    app.router.add_get("/ok", _ok)
    app.router.add_get("/stream", _stream)
    return app


class Clients:
    """Client connections of one test, all closed at its end."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []

    async def open(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self.writers.append(writer)
        return reader, writer

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


@pytest.fixture
async def clients() -> AsyncIterator[Clients]:
    c = Clients()
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def served() -> AsyncIterator[tuple[int, ConnectionGuard, list[str]]]:
    events: list[str] = []
    guard = ConnectionGuard(limit=3, header_timeout=0.5, on_event=events.append)
    address, listener = await start_app("127.0.0.1:0", _app(), "--listen", guard=guard)
    try:
        yield int(address.rsplit(":", 1)[1]), guard, events
    finally:
        await listener.stop(0)


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True if the server closed the connection (EOF or reset) within `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            return await reader.read(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def test_a_connection_that_sends_no_whole_head_is_closed_after_the_timeout(
    served: tuple[int, ConnectionGuard, list[str]],
    clients: Clients,
) -> None:
    port, guard, events = served
    silent_r, _silent_w = await clients.open(port)
    slow_r, slow_w = await clients.open(port)
    slow_w.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n")  # never the blank line
    assert not await _closed_within(silent_r, 0.2)  # not before the timeout
    assert await _closed_within(silent_r, 2.0)
    assert await _closed_within(slow_r, 2.0)
    assert events == ["header_timeout", "header_timeout"]
    await asyncio.sleep(0)
    assert guard.open == 0


async def test_a_head_split_across_writes_counts_and_the_connection_stays_for_keep_alive(
    served: tuple[int, ConnectionGuard, list[str]],
    clients: Clients,
) -> None:
    port, _, events = served
    reader, writer = await clients.open(port)
    for piece in (b"GET /ok HTTP/1.1\r\nHost: x\r", b"\n\r", b"\n"):  # the blank line split in two
        writer.write(piece)
        await asyncio.sleep(0.05)
    assert b"200 OK" in await reader.readuntil(b"ok")
    await asyncio.sleep(0.8)  # past the head timeout: an answered connection is not closed by it
    writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200 OK" in await asyncio.wait_for(reader.readuntil(b"ok"), 2)
    assert events == []
    writer.close()


async def test_a_stream_lives_past_the_head_timeout(
    served: tuple[int, ConnectionGuard, list[str]], clients: Clients
) -> None:
    port, _, events = served
    reader, writer = await clients.open(port)
    writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    body = await asyncio.wait_for(reader.readuntil(b"data: 3\n\n"), 5)  # about 1 s: twice the timeout
    assert b"data: 0" in body and events == []
    writer.close()


async def _answered(clients: Clients, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that made one request (answered): kept alive, past its head."""
    reader, writer = await clients.open(port)
    writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200 OK" in await asyncio.wait_for(reader.readuntil(b"ok"), 2)
    return reader, writer


async def test_at_the_limit_a_new_connection_takes_the_place_of_the_oldest_without_a_head(
    served: tuple[int, ConnectionGuard, list[str]], clients: Clients
) -> None:
    port, guard, events = served
    silent = [await clients.open(port) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert guard.open == 3
    reader, writer = await clients.open(port)  # a real client while slow ones fill every slot
    writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200 OK" in await asyncio.wait_for(reader.readuntil(b"ok"), 2)
    assert await _closed_within(silent[0][0], 0.3)  # the oldest silent one made room
    assert not await _closed_within(silent[1][0], 0.05)
    assert events == ["evicted"]


async def test_at_the_limit_with_every_connection_past_its_head_a_new_one_is_refused(
    served: tuple[int, ConnectionGuard, list[str]], clients: Clients
) -> None:
    port, guard, events = served
    held = [await _answered(clients, port) for _ in range(3)]
    extra_r, _ = await clients.open(port)
    assert await _closed_within(extra_r, 0.4)  # well before the head timeout
    assert events == ["refused"]
    for _, w in held:
        w.close()
        await w.wait_closed()
    await asyncio.sleep(0.1)
    assert guard.open == 0
    await _answered(clients, port)  # room again


async def test_an_idle_keep_alive_connection_closes_after_the_keepalive(clients: Clients) -> None:
    """One cheap request must not hold a slot for aiohttp's default hour."""
    guard = ConnectionGuard(limit=3, header_timeout=5, keepalive=0.5)
    address, listener = await start_app("127.0.0.1:0", _app(), "--listen", guard=guard)
    try:
        reader, _ = await _answered(clients, int(address.rsplit(":", 1)[1]))
        assert await _closed_within(reader, 3.0)
        await asyncio.sleep(0.05)
        assert guard.open == 0
    finally:
        await listener.stop(0)


async def test_serve_app_counts_open_and_closed_connections_in_the_daemons_metrics(clients: Clients) -> None:
    life = Lifecycle("toy", DaemonOptions())
    address = await life.serve_app("http", "127.0.0.1:0", _app(), max_connections=1)
    try:
        port = int(address.rsplit(":", 1)[1])
        await _answered(clients, port)
        second_r, _ = await clients.open(port)
        assert await _closed_within(second_r, 1.0)
        assert life.registry.get_sample_value("meshkit_http_connections", {"listener": "http"}) == 1
        closed = {"listener": "http", "reason": "refused"}
        assert life.registry.get_sample_value("meshkit_http_connections_closed_total", closed) == 1
    finally:
        await life.close()


def test_a_limit_below_one_or_no_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ConnectionGuard(limit=0)
    with pytest.raises(ValueError, match="over 0 s"):
        ConnectionGuard(header_timeout=0)
