"""`GET /ws/{id}` on real servers (NATS origin with JetStream + leaf, the adapter as a process) with real
WebSocket clients (`websockets` and aiohttp's): JSON frames, resume, pings and the RTT metric, a client
that never answers pings, a slow client beside a fast one, errors before the upgrade, shutdown."""

# ruff: noqa: F811 (fixtures imported from test_sse_support, used as arguments)
from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets
from nats.js import JetStreamContext

from meshkit.harness.edge_daemons import SseAdapter, sse_adapter
from meshkit.harness.nats import NatsServer

from .conftest import request
from .test_sse_support import (  # noqa: F401 (fixtures)
    BASE_ARGS,
    js,
    leaf,
    metric,
    new_cid,
    origin,
    publish,
    session,
    stream_created,
    until,
    workdir,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def adapter(workdir: Path, leaf: NatsServer, stream_created: None) -> Iterator[SseAdapter]:
    with sse_adapter(workdir, leaf.url, [*BASE_ARGS, "--ws-ping", "0.2"], name="sse-ws") as running:
        yield running


HANDSHAKE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


def ws_url(adapter: SseAdapter, cid: str, query: str = "") -> str:
    return adapter.ws_url(cid) + (f"?{query}" if query else "")


async def frames_until_close(ws: Any, within: float = 10.0) -> list[dict[str, Any]]:
    """Every frame of a `websockets` connection until the server closes it."""
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(within):
        try:
            async for text in ws:
                got.append(json.loads(text))
        except websockets.ConnectionClosed:
            pass
    return got


async def test_tokens_as_json_frames_then_done_and_a_normal_close(
    adapter: SseAdapter, js: JetStreamContext
) -> None:
    c = new_cid()
    async with websockets.connect(ws_url(adapter, c)) as ws:
        await until(lambda: metric(adapter, "meshkit_sse_open_streams") >= 1, what="the stream open")
        await publish(js, c, range(1, 6), done_at=5, model="m1")
        frames = await frames_until_close(ws)
        assert ws.close_code == 1000
    assert [f["event"] for f in frames] == ["token"] * 4 + ["done"]
    assert [f["id"] for f in frames] == [1, 2, 3, 4, 5]
    first = frames[0]["data"]
    assert first["conversation_id"] == c and first["token"] == "t1 " and first["model"] == "m1"
    assert frames[-1]["data"]["done"] is True


async def test_resume_with_last_event_id_no_gap_no_duplicate(
    adapter: SseAdapter, js: JetStreamContext
) -> None:
    c = new_cid()
    await publish(js, c, range(1, 8))
    async with websockets.connect(ws_url(adapter, c, "last_event_id=4")) as ws:
        first = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(3)]
        assert [f["id"] for f in first] == [5, 6, 7]
        await publish(js, c, range(8, 11), done_at=10)
        rest = await frames_until_close(ws)
    assert [f["id"] for f in rest] == [8, 9, 10]
    assert rest[-1]["event"] == "done"


async def test_pings_measure_the_round_trip_and_clients_that_answer_stay(
    adapter: SseAdapter, js: JetStreamContext
) -> None:
    before = metric(adapter, "meshkit_sse_ws_rtt_seconds_count")
    c = new_cid()
    async with websockets.connect(ws_url(adapter, c)) as ws:  # websockets answers pings by itself
        await until(
            lambda: metric(adapter, "meshkit_sse_ws_rtt_seconds_count") >= before + 3,
            within=5,
            what="three pongs measured",
        )
        await publish(js, c, [1, 2], done_at=2)
        frames = await frames_until_close(ws)
    assert [f["id"] for f in frames] == [1, 2]
    total = metric(adapter, "meshkit_sse_ws_rtt_seconds_sum")
    assert total > 0
    print(f"ws rtt mean {total / metric(adapter, 'meshkit_sse_ws_rtt_seconds_count') * 1000:.2f} ms")


async def test_a_client_that_never_answers_pings_is_closed(
    adapter: SseAdapter, session: aiohttp.ClientSession
) -> None:
    timeouts = metric(adapter, "meshkit_sse_ws_pong_timeouts_total")
    c = new_cid()
    # aiohttp's client with autoping off sees the server's pings and, here, never answers them
    async with session.ws_connect(ws_url(adapter, c), autoping=False) as ws:
        pings = 0
        began = time.monotonic()
        async with asyncio.timeout(5):
            while True:
                msg = await ws.receive()
                if msg.type == aiohttp.WSMsgType.PING:
                    pings += 1
                    continue
                break
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
        assert pings >= 1 and time.monotonic() - began < 2.0
    await until(lambda: metric(adapter, "meshkit_sse_ws_pong_timeouts_total") == timeouts + 1, what="counted")
    assert "no pong within" in adapter.process.log_text()


def test_errors_before_the_upgrade_are_json(adapter: SseAdapter) -> None:
    for path, status in [
        ("/ws/a.b", 400),
        ("/ws/c1?last_event_id=-1", 400),
        ("/ws/c1?format=openai", 400),
    ]:
        resp = request(f"{adapter.url}{path}", "GET", headers=HANDSHAKE)
        assert resp.status == status, (path, resp.status, resp.body)
        assert resp.json()["error"]["type"] == "invalid_request_error"
    plain = request(f"{adapter.url}/ws/c1", "GET")  # not a handshake
    assert plain.status == 426 and plain.headers["upgrade"] == "websocket"
    assert plain.json()["error"]["type"] == "invalid_request_error"


async def test_a_websocket_client_cannot_open_an_invalid_id(adapter: SseAdapter) -> None:
    with pytest.raises(websockets.InvalidStatus) as caught:
        async with websockets.connect(ws_url(adapter, "a.*")):
            pass
    assert caught.value.response.status_code == 400


@pytest.fixture(scope="module")
def quiet(workdir: Path, leaf: NatsServer, stream_created: None) -> Iterator[SseAdapter]:
    """An adapter that pings rarely: a client cut off here was cut off for being slow."""
    with sse_adapter(workdir, leaf.url, [*BASE_ARGS, "--ws-ping", "30"], name="sse-ws-quiet") as running:
        yield running


async def test_a_slow_websocket_client_is_cut_off_and_a_fast_one_gets_every_token(
    quiet: SseAdapter, js: JetStreamContext
) -> None:
    adapter = quiet
    c = new_cid()
    drops = metric(adapter, "meshkit_sse_slow_client_drops_total")
    # the slow client: a real handshake, then it never reads (the kernel absorbs 3-4 MB first)
    slow = socket.create_connection(("127.0.0.1", adapter.port))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    lines = "".join(f"{k}: {v}\r\n" for k, v in HANDSHAKE.items())
    slow.sendall(f"GET /ws/{c} HTTP/1.1\r\nHost: x\r\n{lines}\r\n".encode())
    try:
        async with websockets.connect(ws_url(adapter, c), max_size=None, max_queue=None) as fast:
            await until(lambda: metric(adapter, "meshkit_sse_open_streams") >= 2, what="both open")
            count = 2000  # 8 MB
            await publish(js, c, range(1, count + 1), done_at=count, text="x" * 4000)
            published = time.monotonic()
            frames = await frames_until_close(fast, within=20)
            got_all = time.monotonic()
        assert [f["id"] for f in frames] == list(range(1, count + 1))
        assert got_all - published < 2.0, f"fast viewer finished {got_all - published:.2f} s after"
        await until(
            lambda: metric(adapter, "meshkit_sse_slow_client_drops_total") == drops + 1, what="slow cut off"
        )
        slow.settimeout(5)
        received = 0
        try:
            while chunk := slow.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
        assert 0 < received < count * 4000, received
    finally:
        slow.close()
    assert "slow client" in adapter.process.log_text()


async def test_max_connections_counts_websockets_too(
    workdir: Path, leaf: NatsServer, stream_created: None
) -> None:
    with sse_adapter(workdir, leaf.url, ["--max-connections", "1"], name="sse-ws-max1") as small:
        async with websockets.connect(ws_url(small, "m1")):
            await until(lambda: metric(small, "meshkit_sse_open_streams") == 1, what="one open")
            with pytest.raises(websockets.InvalidStatus) as caught:
                async with websockets.connect(ws_url(small, "m2")):
                    pass
            assert caught.value.response.status_code == 503


async def test_sigterm_sends_reconnect_and_closes_with_service_restart(
    workdir: Path, leaf: NatsServer, js: JetStreamContext
) -> None:
    c = new_cid()
    with sse_adapter(workdir, leaf.url, ["--heartbeat", "0.5"], name="sse-ws-sigterm") as doomed:
        async with websockets.connect(ws_url(doomed, c)) as ws:
            await publish(js, c, [1, 2])
            got = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(2)]
            assert [f["id"] for f in got] == [1, 2]
            doomed.process.signal(signal.SIGTERM)
            rest = await frames_until_close(ws, within=5)
            assert rest == [{"event": "reconnect", "data": {"retry_ms": 250}}]
            assert ws.close_code == 1012
        assert doomed.process.wait(10) == 0
