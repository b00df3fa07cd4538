"""The conversation hub in-process on a real NATS origin + leaf: a token the live path missed is filled
from JetStream (not skipped), one JetStream does not have either is skipped with a reset, and the
per-viewer replay reads exactly the asked-for range."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import nats
import pytest
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from meshkit.edge.conversation_hub import Conversation, ConversationHub, HubMetrics, HubSettings
from meshkit.edge.conversation_log import ConversationLog
from meshkit.edge.token_contract import parse_token
from meshkit.edge.token_stream import ensure_stream
from meshkit.harness.nats import NatsServer, nats_server

from .test_sse_support import publish, token, until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, NatsServer]]:
    workdir = tmp_path_factory.mktemp("hub")
    with (
        nats_server(workdir, name="hub-origin") as origin,
        nats_server(workdir, jetstream=False, leaf_remote=origin.leaf_url, name="hub-leaf") as leaf,
    ):
        origin.wait_for_leafnodes(1)
        yield origin, leaf


@pytest.fixture
async def origin_js(servers: tuple[NatsServer, NatsServer]) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(servers[0].url)
    try:
        js = nc.jetstream()
        await ensure_stream(js)
        yield js
    finally:
        await nc.close()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def sample(registry: CollectorRegistry, name: str) -> float:
    return registry.get_sample_value(name) or 0.0


@pytest.fixture
async def hub(
    servers: tuple[NatsServer, NatsServer], origin_js: JetStreamContext, registry: CollectorRegistry
) -> AsyncIterator[ConversationHub]:
    nc = await nats.connect(servers[1].url)  # the leaf, as the adapter does
    settings = HubSettings(gap_timeout=0.2, consumer_heartbeat=0.5)
    hub = ConversationHub(nc.jetstream(domain="origin"), settings, HubMetrics.create(registry))
    try:
        yield hub
    finally:
        await hub.close()
        await nc.close()


def sequences(conv: Conversation) -> list[int | None]:
    return [e.sequence if e is not None else None for e in conv.log.read(conv.log.log_start, 1000)]


async def test_a_token_missed_live_is_filled_from_jetstream(
    hub: ConversationHub, origin_js: JetStreamContext, registry: CollectorRegistry
) -> None:
    c = f"c-{uuid.uuid4().hex[:8]}"
    await publish(origin_js, c, range(1, 6))  # all five are stored
    conv = Conversation(c, ConversationLog(100))  # fed by hand: the live path "loses" 3
    for seq in (1, 2, 4, 5):
        hub.deliver(conv, parse_token(token(c, seq)))
    assert sequences(conv) == [1, 2]
    await until(lambda: sequences(conv) == [1, 2, 3, 4, 5], within=5, what="3 filled from JetStream")
    assert sample(registry, "meshkit_sse_gaps_skipped_total") == 0
    # 7 arrives, 6 is nowhere: skipped after the timeout (a reset for viewers), counted
    hub.deliver(conv, parse_token(token(c, 7)))
    await until(lambda: sequences(conv) == [1, 2, 3, 4, 5, None, 7], within=5, what="6 skipped")
    assert sample(registry, "meshkit_sse_gaps_skipped_total") == 1


async def test_replay_reads_the_asked_range_sorted_and_once(
    hub: ConversationHub, origin_js: JetStreamContext, registry: CollectorRegistry
) -> None:
    c = f"c-{uuid.uuid4().hex[:8]}"
    await publish(origin_js, c, [1, 2, 3, 5, 4, 6, 7])
    await origin_js.publish(f"chat.{c}.tokens", token(c, 3))  # stored twice
    await origin_js.publish(f"chat.{c}.tokens", b"not json")  # skipped, counted
    got = await hub.replay(c, 2, 7)
    assert [t.sequence for t in got] == [3, 4, 5, 6]
    assert [t.sequence for t in await hub.replay(c, None, 100)] == [1, 2, 3, 4, 5, 6, 7]
    assert await hub.replay(f"c-{uuid.uuid4().hex[:8]}", None, 100) == []  # nothing stored: at once
    assert sample(registry, "meshkit_sse_malformed_messages_total") >= 1
    # every replay deleted its consumer
    infos = await origin_js.consumers_info("CHAT")
    assert not [i for i in infos if i.config.filter_subject == f"chat.{c}.tokens"]


async def test_joins_at_the_same_time_make_one_subscription(
    hub: ConversationHub, origin_js: JetStreamContext
) -> None:
    from meshkit.edge.viewer import Viewer

    c = f"c-{uuid.uuid4().hex[:8]}"
    viewers = [Viewer(c, None) for _ in range(10)]
    convs = await asyncio.gather(*(hub.join(c, v) for v in viewers))
    assert len({id(conv) for conv in convs}) == 1
    infos = await origin_js.consumers_info("CHAT")
    assert len([i for i in infos if i.config.filter_subject == f"chat.{c}.tokens"]) == 1
    for v in viewers:
        hub.leave(convs[0], v)
    assert hub.conversation(c) is None

    async def gone() -> bool:
        infos = await origin_js.consumers_info("CHAT")
        return not [i for i in infos if i.config.filter_subject == f"chat.{c}.tokens"]

    for _ in range(100):
        if await gone():
            break
        await asyncio.sleep(0.05)
    assert await gone(), "the last viewer's leave deleted the consumer"


async def test_the_ordered_consumer_runs_without_its_timer_tasks(
    hub: ConversationHub, origin_js: JetStreamContext
) -> None:
    """nats-py's per-subscription flow-control poller (a wake-up every 0.25 s each) and heartbeat check
    are cancelled; flow control still flows: 4 MB stored before the viewer joins (the server asks for
    flow control as it delivers them) arrive whole, and so do live tokens after them."""
    from meshkit.edge.viewer import Viewer

    c = f"c-{uuid.uuid4().hex[:8]}"
    await publish(origin_js, c, range(1, 2001), text="x" * 2000)
    viewer = Viewer(c, None)
    conv = await hub.join(c, viewer)
    try:
        sub = conv.subscription
        assert sub is not None
        jsi = sub._sub._jsi
        assert jsi is not None
        poller = jsi._fctask
        await asyncio.sleep(0)
        assert poller is not None and poller.cancelled()
        assert jsi._hbtask is not None and jsi._hbtask.cancelled()  # the hub's one check instead
        await until(lambda: conv.log.next_seq == 2001, within=15, what="2,000 stored tokens of 2 KB")
        await publish(origin_js, c, range(2001, 2011))
        await until(lambda: conv.log.next_seq == 2011, within=5, what="live tokens after them")
        last = conv.log.read(2010, 10)
        assert [e.sequence for e in last if e is not None] == [2010] and conv.log.duplicates == 0
    finally:
        hub.leave(conv, viewer)


async def test_a_conversation_nobody_watches_is_freed_without_a_garbage_collection(
    hub: ConversationHub, origin_js: JetStreamContext
) -> None:
    """nats-py's unsubscribed subscription lives on in reference cycles until a full collection (which
    the adapter makes rare, sse_gc.py): its callback must not keep the conversation and its log."""
    import gc
    import weakref

    from meshkit.edge.viewer import Viewer

    c = f"c-{uuid.uuid4().hex[:8]}"
    await publish(origin_js, c, range(1, 4))
    viewer = Viewer(c, None)
    conv = await hub.join(c, viewer)
    stored = conv.log
    await until(lambda: stored.next_seq == 4, within=5, what="3 stored tokens")
    gone = weakref.ref(conv)
    gc.disable()
    try:
        hub.leave(conv, viewer)
        del conv
        await until(lambda: gone() is None, within=5, what="the conversation freed")
    finally:
        gc.enable()
