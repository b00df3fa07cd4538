# ruff: noqa: F811 (fixtures imported from test_sse_support, used as arguments)
"""CORS through the real adapter: `--cors-origin` gives allowed origins `Access-Control-Allow-Origin` on
the stream and its JSON errors, answers preflights, refuses WebSockets from other origins; off by
default; `*` only without credentials (exit 2 otherwise)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

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
    new_cid,
    open_stream,
    origin,
    publish,
    session,
    stream_created,
    workdir,
)

pytestmark = pytest.mark.integration

APP = "https://app.example"
PREFLIGHT = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}


@pytest.fixture(scope="module")
def adapter(workdir: Path, leaf: NatsServer, stream_created: None) -> Iterator[SseAdapter]:
    args = [*BASE_ARGS, "--cors-origin", APP, "--cors-origin", "http://localhost:3000"]
    with sse_adapter(workdir, leaf.url, args, name="sse-cors") as running:
        yield running


@pytest.fixture(scope="module")
def plain(workdir: Path, leaf: NatsServer, stream_created: None) -> Iterator[SseAdapter]:
    with sse_adapter(workdir, leaf.url, BASE_ARGS, name="sse-no-cors") as running:
        yield running


async def test_an_allowed_origin_reads_the_stream(
    adapter: SseAdapter, js: JetStreamContext, session: aiohttp.ClientSession
) -> None:
    c = new_cid()
    reader = await open_stream(session, adapter.stream_url(c), headers={"Origin": APP})
    try:
        assert reader.response.headers["Access-Control-Allow-Origin"] == APP
        assert "Origin" in reader.response.headers["Vary"]
        assert "Access-Control-Allow-Credentials" not in reader.response.headers
        await publish(js, c, [1, 2], done_at=2)
        await reader.until_end()
    finally:
        await reader.close()
    assert reader.sequences == [1, 2]


def test_errors_carry_it_too_and_other_origins_get_nothing(adapter: SseAdapter) -> None:
    bad = request(adapter.stream_url("a.b"), "GET", headers={"Origin": "http://localhost:3000"})
    assert bad.status == 400 and bad.headers["access-control-allow-origin"] == "http://localhost:3000"
    other = request(adapter.stream_url("a.b"), "GET", headers={"Origin": "https://evil.example"})
    assert other.status == 400 and "access-control-allow-origin" not in other.headers


def test_preflight(adapter: SseAdapter) -> None:
    ok = request(adapter.stream_url("c1"), "OPTIONS", headers={"Origin": APP, **PREFLIGHT})
    assert ok.status == 204
    assert ok.headers["access-control-allow-origin"] == APP
    assert ok.headers["access-control-allow-methods"] == "GET"
    assert "Authorization" in ok.headers["access-control-allow-headers"]
    assert "Last-Event-ID" in ok.headers["access-control-allow-headers"]
    evil = request(
        adapter.stream_url("c1"), "OPTIONS", headers={"Origin": "https://evil.example", **PREFLIGHT}
    )
    assert evil.status == 403 and "access-control-allow-origin" not in evil.headers
    assert evil.json()["error"]["type"] == "forbidden"
    post = {"Origin": APP, "Access-Control-Request-Method": "POST"}
    assert request(adapter.stream_url("c1"), "OPTIONS", headers=post).status == 403


async def test_websocket_from_another_origin_is_403_before_the_upgrade(adapter: SseAdapter) -> None:
    url = f"ws://127.0.0.1:{adapter.port}/ws/{new_cid()}"
    with pytest.raises(websockets.InvalidStatus) as caught:
        async with websockets.connect(url, origin=websockets.Origin("https://evil.example")):
            pass
    assert caught.value.response.status_code == 403
    async with websockets.connect(url, origin=websockets.Origin(APP)):
        pass


def test_off_by_default(plain: SseAdapter) -> None:
    bad = request(plain.stream_url("a.b"), "GET", headers={"Origin": APP})
    assert bad.status == 400 and "access-control-allow-origin" not in bad.headers
    assert request(plain.stream_url("c1"), "OPTIONS", headers={"Origin": APP, **PREFLIGHT}).status == 405


def test_star_is_refused_with_credentials_and_bad_origins_are_exit_2() -> None:
    for argv, needle in [
        (["--cors-origin", "*", "--cors-credentials"], "--cors-credentials"),
        (["--cors-origin", "app.example/x"], "--cors-origin"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "meshkit", "sse", *argv], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 2, done.stderr
        assert needle in done.stderr and "Traceback" not in done.stderr
