"""`meshkit sse` on a stream without the live republish (an operator's stream, or one an older meshkit
made): it says so at start and follows each conversation with one JetStream consumer instead, with the
same contract: a late viewer gets everything so far, then live; a resume is gap-free; the consumer is
deleted after the last viewer leaves. (Live mode is what test_sse.py runs: ensure_stream's streams
republish.)"""

# ruff: noqa: F811 (fixtures imported from test_sse_support, used as arguments)

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import nats
import pytest
from nats.js import JetStreamContext

from meshkit.edge.token_stream import ensure_stream, republishes_live, stream_config
from meshkit.harness.edge_daemons import SseAdapter, sse_adapter
from meshkit.harness.nats import NatsServer

from .test_sse_support import (  # noqa: F401 (fixtures)
    BASE_ARGS,
    consumers_of,
    js,
    leaf,
    leaf_subscriptions,
    new_cid,
    open_stream,
    origin,
    publish,
    session,
    settled,
    workdir,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stream_created(origin: NatsServer) -> None:  # this module's stream has no republish
    async def create() -> None:
        nc = await nats.connect(origin.url)
        try:
            config = stream_config()
            config.republish = None
            await nc.jetstream().add_stream(config)
            kept = await ensure_stream(nc.jetstream())  # the bridge's start leaves it as it is
            assert not republishes_live(kept)
        finally:
            await nc.close()

    asyncio.run(create())


@pytest.fixture(scope="module")
def adapter(workdir: Path, leaf: NatsServer, stream_created: None) -> Iterator[SseAdapter]:
    with sse_adapter(workdir, leaf.url, BASE_ARGS, name="sse-consumers") as running:
        yield running


def test_the_adapter_says_it_follows_conversations_with_consumers(adapter: SseAdapter) -> None:
    settled(adapter)
    text = adapter.process.log_text()
    assert "does not republish stored tokens on chat.*.live" in text
    assert "live tokens by core subscription" not in text


async def test_a_late_viewer_gets_what_was_stored_then_live_through_one_consumer(
    adapter: SseAdapter,
    leaf: NatsServer,
    js: JetStreamContext,
    session: aiohttp.ClientSession,
) -> None:
    c = new_cid()
    await publish(js, c, range(1, 6))
    reader = await open_stream(session, adapter.stream_url(c))
    try:
        await reader.wait_for(lambda r: r.sequences == [1, 2, 3, 4, 5], what="the stored tokens")
        assert len(await consumers_of(js, c)) == 1  # one ordered consumer for the conversation ...
        assert not [s for s in leaf_subscriptions(leaf, "meshkit-sse") if s == f"chat.{c}.live"]
        await publish(js, c, range(6, 9), done_at=8)
        await reader.wait_for(lambda r: r.sequences == list(range(1, 9)), what="then live, to done")
        await reader.until_end()
    finally:
        await reader.close()
    deadline = time.monotonic() + 5
    while await consumers_of(js, c):  # ... deleted after the last viewer left
        assert time.monotonic() < deadline, "the conversation's consumer was not deleted"
        await asyncio.sleep(0.05)


async def test_a_resume_after_last_event_id_is_gap_free_and_repeats_nothing(
    adapter: SseAdapter,
    js: JetStreamContext,
    session: aiohttp.ClientSession,
) -> None:
    c = new_cid()
    await publish(js, c, range(1, 11))
    reader = await open_stream(session, adapter.stream_url(c), headers={"Last-Event-ID": "6"})
    try:
        await reader.wait_for(lambda r: r.sequences == [7, 8, 9, 10], what="after 6")
        await publish(js, c, [11], done_at=11)
        await reader.wait_for(lambda r: r.sequences == [7, 8, 9, 10, 11], what="and live")
    finally:
        await reader.close()
