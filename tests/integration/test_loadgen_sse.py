"""`meshkit loadgen --target sse` against a tiny SSE server of `meshkit sse`'s wire format, fed by a real
NATS (core subscriptions): the NATS publisher, the `/stream/<id>` path, and what a faulty target looks like
in the report (streams cut mid-way, duplicated or reordered tokens): counted, never a crash.

The server here is a stand-in with the adapter's wire format (`id: <sequence>`, `event: token`,
`data: <json>`, a final `event: done`), not the adapter: it subscribes before answering, so a viewer that
is open misses nothing, and `mode` makes it misbehave on purpose.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.aio.client
import nats.aio.msg
import pytest
from aiohttp import web

from meshkit.edge.loadgen import LoadgenOptions, run_loadgen
from meshkit.edge.token_contract import is_conversation_id, tokens_subject
from meshkit.harness.nats import NatsServer, nats_server
from meshkit.nats_flush import flushed


@pytest.fixture(scope="module")
def nats_core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with nats_server(tmp_path_factory.mktemp("nats"), jetstream=False, name="loadgen-nats") as server:
        yield server


@dataclass
class Misbehave:
    mode: str = "ok"  # ok | cut (close the connection after `after` tokens) | duplicate | swap


async def _stream(request: web.Request) -> web.StreamResponse:
    cid = request.match_info["cid"]
    if not is_conversation_id(cid):
        return web.json_response(
            {"error": {"message": "bad id", "type": "invalid_request_error"}}, status=400
        )
    how: Misbehave = request.app[MISBEHAVE]
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=10_000)
    nc = request.app[NC]

    async def received(msg: nats.aio.msg.Msg) -> None:
        queue.put_nowait(msg.data)

    sub = await nc.subscribe(tokens_subject(cid), cb=received)
    await flushed(nc)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    await resp.write(b"retry: 1000\n: open\n\n")
    held: bytes | None = None
    try:
        while True:
            raw = await asyncio.wait_for(queue.get(), 20)
            msg = json.loads(raw)
            seq = msg["sequence"]
            if msg["done"]:
                if held is not None:
                    await resp.write(_event(held))
                await resp.write(b"id: %d\nevent: done\ndata: %s\n\n" % (seq, raw))
                return resp
            if how.mode == "cut" and seq > 3:
                assert request.transport is not None
                request.transport.close()  # abruptly, mid-stream
                return resp
            if how.mode == "swap" and seq == 2:
                held = raw  # 2 goes out after 3
                continue
            await resp.write(_event(raw))
            if how.mode == "duplicate" and seq % 5 == 0:
                await resp.write(_event(raw))
            if held is not None and seq == 3:
                await resp.write(_event(held))
                held = None
    finally:
        await sub.unsubscribe()


MISBEHAVE = web.AppKey("misbehave", Misbehave)
NC = web.AppKey("nc", nats.aio.client.Client)


def _event(raw: bytes) -> bytes:
    seq = json.loads(raw)["sequence"]
    return b"id: %d\nevent: token\ndata: %s\n\n" % (seq, raw)


@pytest.fixture
async def sse_like(nats_core: NatsServer) -> AsyncIterator[tuple[str, Misbehave]]:
    app = web.Application()
    how = Misbehave()
    app[MISBEHAVE] = how
    app[NC] = await nats.connect(nats_core.url)
    app.router.add_get("/stream/{cid}", _stream)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", how
    finally:
        await runner.cleanup()
        await app[NC].close()


def options(url: str, nats_url: str, tmp_path: Path, **kw: Any) -> LoadgenOptions:
    base: dict[str, Any] = {
        "target": "sse",
        "url": url,
        "nats": nats_url,
        "conversations": 6,
        "viewers": 2,
        "rate": 120,
        "duration": 1,
        "drain_timeout": 2,
        "progress": False,
        "json_file": tmp_path / "r.json",
    }
    return LoadgenOptions(**{**base, **kw})


async def test_sse_wire_format_published_through_nats(
    sse_like: tuple[str, Misbehave], nats_core: NatsServer, tmp_path: Path
) -> None:
    url, _ = sse_like
    report = await run_loadgen(options(url, nats_core.url, tmp_path))
    assert report["config"]["publish"] == "nats"  # the default for --target sse
    m = report["messages"]
    assert m["exactly_once_in_order"] is True, report["error_samples"]
    assert m["expected"] == 2 * (report["publish"]["tokens"] + 6)
    assert report["streams"]["outcomes"]["done"] == 12  # event: done ended every stream
    assert json.loads((tmp_path / "r.json").read_text())["messages"] == m


async def test_streams_cut_mid_way_are_missing_tokens_and_disconnects(
    sse_like: tuple[str, Misbehave], nats_core: NatsServer, tmp_path: Path
) -> None:
    url, how = sse_like
    how.mode = "cut"
    report = await run_loadgen(options(url, nats_core.url, tmp_path))
    m = report["messages"]
    per_conversation = report["publish"]["tokens"] // 6
    assert report["errors"]["disconnects"] == 12
    assert m["delivered"] == 12 * 3  # sequences 1..3 got through, then the cut
    assert m["missing"] == m["expected"] - m["delivered"] >= 12 * (per_conversation - 2)
    assert m["incomplete_viewers"] == 12 and m["exactly_once_in_order"] is False
    assert "ended" in " ".join(report["error_samples"]) or "Payload" in " ".join(report["error_samples"])


@pytest.mark.parametrize(("mode", "field"), [("duplicate", "duplicates"), ("swap", "out_of_order")])
async def test_duplicates_and_reordering_are_counted(
    sse_like: tuple[str, Misbehave], nats_core: NatsServer, tmp_path: Path, mode: str, field: str
) -> None:
    url, how = sse_like
    how.mode = mode
    report = await run_loadgen(options(url, nats_core.url, tmp_path, conversations=3, viewers=1, rate=60))
    m = report["messages"]
    per_conversation = report["publish"]["tokens"] // 3
    assert m["missing"] == 0
    expected = 3 * (per_conversation // 5) if mode == "duplicate" else 3
    assert m[field] == expected
    assert m["exactly_once_in_order"] is False
