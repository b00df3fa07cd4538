"""The nginx + nchan harness: a real nginx with the nchan module, publish over HTTP, EventSource out."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from meshkit.edge.loadgen_sse_parser import SseEvent, SseParser
from meshkit.harness.nchan import NchanServer, nchan_server


@pytest.fixture(scope="module")
def nchan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NchanServer]:
    with nchan_server(tmp_path_factory.mktemp("nchan")) as server:
        yield server


async def test_a_publish_reaches_an_eventsource_subscriber(nchan: NchanServer) -> None:
    message = {"conversation_id": "h1", "token": "Hello", "sequence": 1, "done": False}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(nchan.sub_url("h1"), headers={"Accept": "text/event-stream"}) as sub,
    ):
        assert sub.status == 200
        assert sub.headers["Content-Type"].startswith("text/event-stream")
        async with session.post(nchan.pub_url("h1"), data=json.dumps(message)) as pub:
            assert pub.status in (201, 202)
        parser = SseParser()
        events: list[SseEvent] = []
        while not events:
            events = parser.feed(await asyncio.wait_for(sub.content.readany(), 5))
    assert json.loads(events[0].data) == message  # the body, unchanged
    assert events[0].id != "1"  # nchan's own id (time:n), not our sequence


async def test_websocket_subscriber_and_bad_channel_names(nchan: NchanServer) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.ws_connect(nchan.sub_url("h2")) as ws:
            async with session.post(nchan.pub_url("h2"), data=b'{"sequence": 7}') as pub:
                assert pub.status in (201, 202)
            frame = await ws.receive(timeout=5)
            assert json.loads(frame.data) == {"sequence": 7}
        # only ^[A-Za-z0-9_-]{1,128}$ are channels: a dotted or overlong name is not one
        async with session.get(f"{nchan.url}/sub/a.b") as resp:
            assert resp.status == 404
        async with session.post(f"{nchan.url}/pub/{'x' * 129}", data=b"{}") as resp:
            assert resp.status == 404


def test_one_worker_files_inside_the_workdir_and_stopped_by_pid(tmp_path: Path) -> None:
    with nchan_server(tmp_path, name="n2") as server:
        pids = server.pids()
        assert len(pids) == 2  # the master and worker_processes 1
        assert (server.workdir / "nginx.pid").read_text().strip() == str(server.pid)
        assert server.config_path.parent == server.workdir == tmp_path / "n2"
        assert "worker_connections 19000" in server.config_path.read_text()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
