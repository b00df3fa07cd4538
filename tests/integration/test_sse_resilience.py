"""`meshkit sse` when things go wrong underneath: tokens that aged out of the stream (`event: reset`,
never a silent gap) and the LEAF nats-server SIGKILLed and restarted mid-stream while tokens keep being
published at the origin (every token exactly once, in order). Each test has its own NATS servers: the
first needs a stream with tiny per-subject limits, the second kills its leaf."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import nats
import pytest

from meshkit.edge.token_stream import StreamLimits, ensure_stream
from meshkit.harness.edge_daemons import sse_adapter
from meshkit.harness.nats import NatsServer, nats_server, nats_server_binary
from meshkit.harness.process import ManagedProcess

from .test_sse_support import metric, open_stream, publish, until

pytestmark = pytest.mark.integration


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@contextmanager
def origin_and_leaf(workdir: Path, prefix: str) -> Iterator[tuple[NatsServer, NatsServer]]:
    with (
        nats_server(workdir, name=f"{prefix}-origin") as origin,
        nats_server(workdir, jetstream=False, leaf_remote=origin.leaf_url, name=f"{prefix}-leaf") as leaf,
    ):
        origin.wait_for_leafnodes(1)
        yield origin, leaf


async def test_aged_out_tokens_are_a_reset_then_the_rest(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    c = f"c-{uuid.uuid4().hex[:8]}"
    with origin_and_leaf(tmp_path, "aged") as (origin, leaf):
        nc = await nats.connect(origin.url)
        try:
            js = nc.jetstream()
            await ensure_stream(js, limits=StreamLimits(max_msgs_per_subject=5))
            await publish(js, c, range(1, 13))  # the stream keeps 8..12 only
            with sse_adapter(tmp_path, leaf.url, ["--heartbeat", "0.5"], name="sse-aged") as adapter:
                resumed = await open_stream(session, adapter.stream_url(c), {"Last-Event-ID": "2"})
                fresh = await open_stream(session, adapter.stream_url(c))
                recent = await open_stream(session, adapter.stream_url(c), {"Last-Event-ID": "9"})
                for reader in (resumed, fresh, recent):
                    await reader.wait_for(lambda r: r.sequences[-1:] == [12], what="up to 12")
                await publish(js, c, [13], done_at=13)
                for reader in (resumed, fresh, recent):
                    await reader.until_end()
                assert resumed.sequences == fresh.sequences == [8, 9, 10, 11, 12, 13]
                assert recent.sequences == [10, 11, 12, 13]
                assert [json.loads(e.data) for e in resumed.of("reset")] == [
                    {"requested": 3, "available_from": 8}
                ]
                assert [json.loads(e.data) for e in fresh.of("reset")] == [
                    {"requested": None, "available_from": 8}
                ]
                assert not recent.of("reset")
                assert resumed.events[0].event == "reset"  # before any token: nothing is skipped silently
                assert metric(adapter, "meshkit_sse_resets_total") == 2
                # the OpenAI format says it too, in a chunk (13 pushed 8 out of the stream meanwhile)
                async with session.get(adapter.stream_url(c, format="openai", last_event_id=2)) as resp:
                    body = await resp.text()
                chunks = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
                assert chunks[0]["x_reset"] == {"requested": 3, "available_from": 9}
                with_text = [ch for ch in chunks[1:] if ch["choices"][0]["delta"].get("content")]
                assert [ch["x_sequence"] for ch in with_text] == [9, 10, 11, 12, 13]
                assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
                assert body.rstrip().endswith("data: [DONE]")
        finally:
            await nc.close()


@contextmanager
def restarted_on_the_same_ports(leaf: NatsServer, workdir: Path) -> Iterator[ManagedProcess]:
    """The leaf again, from its config with the client and monitor ports it had (its clients know
    that address), ready once its own /leafz lists the link to the origin."""
    config = leaf.config_path.read_text()
    config = config.replace('listen: "127.0.0.1:-1"', f'listen: "127.0.0.1:{leaf.port}"', 1)
    config = config.replace('http: "127.0.0.1:-1"', f'http: "127.0.0.1:{leaf.http_port}"', 1)
    path = workdir / "leaf-again.conf"
    path.write_text(config)

    def linked(_: ManagedProcess) -> bool:
        try:
            return leaf.leafnode_count() >= 1
        except (urllib.error.URLError, OSError, ValueError):
            return False

    proc = ManagedProcess(
        "leaf-again", [nats_server_binary(), "-c", str(path)], log_dir=workdir, ready=linked, start_timeout=15
    )
    with proc:
        yield proc


async def test_leaf_killed_and_restarted_mid_stream_every_token_once_in_order(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    c = f"c-{uuid.uuid4().hex[:8]}"
    total = 600
    with origin_and_leaf(tmp_path, "restart") as (origin, leaf):
        nc = await nats.connect(origin.url)
        try:
            js = nc.jetstream()
            await ensure_stream(js)
            args = ["--heartbeat", "0.5", "--consumer-heartbeat", "0.5"]
            with sse_adapter(tmp_path, leaf.url, args, name="sse-restart") as adapter:
                reader = await open_stream(session, adapter.stream_url(c))

                published = 0

                async def produce() -> None:
                    nonlocal published
                    for seq in range(1, total + 1):
                        await publish(js, c, [seq], done_at=total)
                        published = seq
                        await asyncio.sleep(0.005)  # ~150 tokens/s: the stream goes on through the restart

                producer = asyncio.ensure_future(produce())
                try:
                    await reader.wait_for(lambda r: len(r.sequences) >= 100, what="first 100 tokens")
                    leaf.process.kill()  # SIGKILL, mid-stream
                    killed_at = len(reader.sequences)
                    await until(lambda: adapter.process.log_text().count("NATS connection lost") >= 1)
                    down_from = published
                    # the leaf stays down while 150 more tokens are stored at the origin
                    await until(lambda: published >= down_from + 150, what="tokens published meanwhile")
                    assert not reader.ended.is_set()
                    assert _status(adapter.admin_url + "/readyz") == 503  # NATS is gone: not ready
                    while_down = published - down_from
                    began = time.monotonic()
                    with restarted_on_the_same_ports(leaf, tmp_path):
                        back = time.monotonic() - began
                        await until(lambda: "NATS connection back" in adapter.process.log_text(), within=10)
                        await until(lambda: _status(adapter.admin_url + "/readyz") == 200, what="ready again")
                        await reader.until_end(within=30)
                        await producer
                finally:
                    producer.cancel()
                    await reader.close()
                assert reader.sequences == list(range(1, total + 1)), "every token once, in order"
                assert reader.events[-1].event == "done"
                assert not reader.of("reset")
                print(
                    f"killed after {killed_at} tokens, {while_down} stored while down, back in {back:.2f} s"
                )
        finally:
            await nc.close()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
