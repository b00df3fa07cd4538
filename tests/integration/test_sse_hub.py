"""The conversation hub in-process on a real NATS origin + leaf: a token the live path missed is filled
from JetStream (not skipped), one JetStream does not have either is skipped with a reset, and the
per-viewer replay reads exactly the asked-for range. `hub` follows conversations with one ordered
consumer each (a stream without the republish); `live_hub` with core subscriptions on the stream's
republished chat.<id>.live copies, catching up from the stream."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from meshkit.edge.conversation_hub import Conversation, ConversationHub, HubMetrics, HubSettings
from meshkit.edge.conversation_log import ConversationLog
from meshkit.edge.token_contract import parse_token
from meshkit.edge.token_stream import ensure_stream
from meshkit.harness.nats import NatsServer, nats_server

from .test_sse_support import consumers_of, publish, token, until

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


@pytest.fixture
async def live_hub(
    servers: tuple[NatsServer, NatsServer], origin_js: JetStreamContext, registry: CollectorRegistry
) -> AsyncIterator[ConversationHub]:
    nc = await nats.connect(servers[1].url)
    settings = HubSettings(live=True, gap_timeout=0.2, idle_check=0.3, idle_check_max=0.6)
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
        assert isinstance(sub, JetStreamContext.PushSubscription)
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


# -- live mode -----------------------------------------------------------------------------------------
async def test_live_joins_catch_up_on_what_was_stored_then_follow_without_gap_or_duplicate(
    live_hub: ConversationHub, origin_js: JetStreamContext, registry: CollectorRegistry
) -> None:
    """Stored before the join and published during its catch-up: every token once, in order, the
    stored ones counted as backlog; no consumer is left on the origin for the conversation."""
    from meshkit.edge.viewer import Viewer

    c = f"c-{uuid.uuid4().hex[:8]}"
    await publish(origin_js, c, range(1, 301))
    viewer = Viewer(c, None)
    joined = asyncio.ensure_future(live_hub.join(c, viewer))
    await publish(origin_js, c, range(301, 401))  # while it subscribes and reads the stream
    conv = await joined
    try:
        await publish(origin_js, c, range(401, 411))
        await publish(origin_js, c, [411], done_at=411)
        await until(lambda: conv.log.done_seq == 411, within=10, what="the whole conversation")
        assert sequences(conv) == list(range(1, 412))
        assert conv.log.backlog_end >= 300  # what was stored before the join does not count as lag
        assert sample(registry, "meshkit_sse_gaps_skipped_total") == 0
        assert await consumers_of(origin_js, c) == []  # the catch-up's consumer is gone, no other
    finally:
        live_hub.leave(conv, viewer)


async def test_live_messages_the_stream_did_not_republish_are_skipped(
    live_hub: ConversationHub,
    servers: tuple[NatsServer, NatsServer],
    origin_js: JetStreamContext,
    registry: CollectorRegistry,
) -> None:
    """A core publish straight onto chat.<id>.live (no stream stored it: a resume could not find it)
    is counted as malformed and not logged; the stream's copies are."""
    from meshkit.edge.viewer import Viewer

    c = f"c-{uuid.uuid4().hex[:8]}"
    viewer = Viewer(c, None)
    conv = await live_hub.join(c, viewer)
    forger = await nats.connect(servers[0].url)
    try:
        before = sample(registry, "meshkit_sse_malformed_messages_total")
        await forger.publish(f"chat.{c}.live", token(c, 1, text="forged"))
        await forger.publish(f"chat.{c}.live", token(c, 1, text="forged"), headers={"Nats-Stream": "OTHER"})
        await forger.flush()
        await until(
            lambda: sample(registry, "meshkit_sse_malformed_messages_total") == before + 2,
            within=5,
            what="both counted",
        )
        assert conv.log.next_seq is None  # nothing logged
        await publish(origin_js, c, [1, 2])
        await until(lambda: sequences(conv) == [1, 2], within=5, what="the stored tokens")
        first = conv.log.read(1, 1)[0]
        assert first is not None and b"forged" not in first.raw
    finally:
        live_hub.leave(conv, viewer)
        await forger.close()


async def test_live_tokens_a_lost_link_never_delivered_are_read_by_the_idle_check(
    live_hub: ConversationHub, origin_js: JetStreamContext
) -> None:
    """The end of a conversation lost on the way (nothing after it shows a gap): a conversation silent
    for `idle_check` is compared with the stream and reads what it missed."""
    from meshkit.edge.viewer import Viewer

    c = f"c-{uuid.uuid4().hex[:8]}"
    viewer = Viewer(c, None)
    conv = await live_hub.join(c, viewer)
    try:
        await publish(origin_js, c, [1, 2])
        await until(lambda: sequences(conv) == [1, 2], within=5, what="live tokens")
        sub = conv.subscription
        assert sub is not None
        await sub.unsubscribe()  # the link "loses" everything from here on
        await publish(origin_js, c, [3, 4])
        await publish(origin_js, c, [5], done_at=5)
        await until(lambda: conv.log.done_seq == 5, within=5, what="the lost end read from the stream")
        assert sequences(conv) == [1, 2, 3, 4, 5]
    finally:
        live_hub.leave(conv, viewer)


async def test_live_resync_reads_what_the_stream_stored_while_the_link_was_lost(
    servers: tuple[NatsServer, NatsServer], origin_js: JetStreamContext, registry: CollectorRegistry
) -> None:
    """`resync()` (the adapter calls it when the stream answers again): every conversation that is
    not done reads what it missed at once, without waiting for an idle check; a done one is left."""
    from meshkit.edge.viewer import Viewer

    nc = await nats.connect(servers[1].url)
    settings = HubSettings(live=True, idle_check=600.0, idle_check_max=600.0)
    hub = ConversationHub(nc.jetstream(domain="origin"), settings, HubMetrics.create(registry))
    a, b = f"c-{uuid.uuid4().hex[:8]}", f"c-{uuid.uuid4().hex[:8]}"
    va, vb = Viewer(a, None), Viewer(b, None)
    try:
        await publish(origin_js, b, [1], done_at=1)
        ca, cb = await hub.join(a, va), await hub.join(b, vb)
        assert cb.log.done_seq == 1
        sub = ca.subscription
        assert sub is not None
        await sub.unsubscribe()
        await publish(origin_js, a, [1, 2, 3])
        assert hub.resync() == 1  # a; b is done
        await until(lambda: sequences(ca) == [1, 2, 3], within=5, what="a's tokens from the stream")
    finally:
        await hub.close()
        await nc.close()


async def test_live_join_reads_a_stored_end_whose_last_tokens_were_stored_out_of_order(
    live_hub: ConversationHub, origin_js: JetStreamContext
) -> None:
    """Two bridges can store neighbours out of order (the log's docstring): the stream's last message
    is token 4, stored after 5 (done). The catch-up reads up to the stream's last message, not up to the
    last message's token sequence (that stopped at 5 and never read 4 or 5: the viewer waited forever,
    every idle check stopping at the same place); the consumer mode reads them in stream order."""
    from meshkit.edge.viewer import Viewer

    c = f"c-{uuid.uuid4().hex[:8]}"
    await publish(origin_js, c, [1, 2, 3])
    await publish(origin_js, c, [5], done_at=5)
    await publish(origin_js, c, [4])
    viewer = Viewer(c, None)
    conv = await live_hub.join(c, viewer)
    try:
        await until(lambda: conv.log.done_seq == 5, within=5, what="the stored conversation's end")
        assert sequences(conv) == [1, 2, 3, 4, 5]
    finally:
        live_hub.leave(conv, viewer)


async def test_live_a_token_missing_from_what_a_catch_up_read_is_skipped_with_a_reset(
    live_hub: ConversationHub, origin_js: JetStreamContext, registry: CollectorRegistry
) -> None:
    """The idle check reads 3 and 5 (done) that never came live; 4 is nowhere (never stored, aged out):
    it is held for --gap-timeout like a gap the live path shows, then skipped with a reset (the
    catch-up armed no gap timer: the viewer waited for 4 forever)."""
    from meshkit.edge.viewer import Viewer

    c = f"c-{uuid.uuid4().hex[:8]}"
    viewer = Viewer(c, None)
    conv = await live_hub.join(c, viewer)
    try:
        await publish(origin_js, c, [1, 2])
        await until(lambda: sequences(conv) == [1, 2], within=5, what="live tokens")
        sub = conv.subscription
        assert sub is not None
        await sub.unsubscribe()  # the link "loses" everything from here on
        await publish(origin_js, c, [3])
        await publish(origin_js, c, [5], done_at=5)
        await until(lambda: conv.log.done_seq == 5, within=5, what="4 skipped, 5 logged")
        assert sequences(conv) == [1, 2, 3, None, 5]
        assert sample(registry, "meshkit_sse_gaps_skipped_total") == 1
    finally:
        live_hub.leave(conv, viewer)


async def test_live_a_resync_while_a_catch_up_is_under_way_is_not_dropped(
    servers: tuple[NatsServer, NatsServer], origin_js: JetStreamContext, registry: CollectorRegistry
) -> None:
    """A catch-up that asked the stream before the link was lost (an idle check, a join) cannot see what
    the loss lost: a resync() meanwhile reads again once it is over, instead of leaving those tokens to
    the next idle check (up to idle_check_max later; 600 s here)."""
    from meshkit.edge.viewer import Viewer

    nc = await nats.connect(servers[1].url)
    settings = HubSettings(live=True, idle_check=600.0, idle_check_max=600.0)
    hub = ConversationHub(nc.jetstream(domain="origin"), settings, HubMetrics.create(registry))
    c = f"c-{uuid.uuid4().hex[:8]}"
    viewer = Viewer(c, None)
    try:
        conv = await hub.join(c, viewer)
        await publish(origin_js, c, [1, 2])
        await until(lambda: sequences(conv) == [1, 2], within=5, what="live tokens")
        stored, release = hub._stored, asyncio.Event()

        async def slow_stored(conversation_id: str, after: int | None) -> list[Any]:
            found = await stored(conversation_id, after)  # asked before the loss: nothing new
            await release.wait()
            return found

        hub._stored = slow_stored  # type: ignore[method-assign]
        hub._catch_up(conv)  # under way, as an idle check would be
        await asyncio.sleep(0.3)
        hub._stored = stored  # type: ignore[method-assign]
        sub = conv.subscription
        assert sub is not None
        await sub.unsubscribe()  # the link "loses" everything from here on
        await publish(origin_js, c, [3, 4])
        assert hub.resync() == 1  # the stream answers again
        release.set()
        await until(lambda: sequences(conv) == [1, 2, 3, 4], within=5, what="what the loss lost")
    finally:
        await hub.close()
        await nc.close()


async def test_live_no_idle_task_outlives_the_hub_when_a_join_ends_after_close(
    servers: tuple[NatsServer, NatsServer], origin_js: JetStreamContext, registry: CollectorRegistry
) -> None:
    """close() during a join's catch-up: the join ends after it and must not start the idle checks of a
    closed hub (a task looping every second for good)."""
    from meshkit.edge.viewer import Viewer

    nc = await nats.connect(servers[1].url)
    hub = ConversationHub(nc.jetstream(domain="origin"), HubSettings(live=True), HubMetrics.create(registry))
    c = f"c-{uuid.uuid4().hex[:8]}"
    await publish(origin_js, c, range(1, 51))
    try:
        joined = asyncio.ensure_future(hub.join(c, Viewer(c, None)))
        await asyncio.sleep(0)  # the SUB is out, the catch-up under way
        await hub.close()
        await asyncio.gather(joined, return_exceptions=True)
        await asyncio.sleep(0.05)
        rounds = [t for t in asyncio.all_tasks() if "_idle_rounds" in repr(t.get_coro())]
        assert rounds == []
    finally:
        for t in asyncio.all_tasks():
            if "_idle_rounds" in repr(t.get_coro()):
                t.cancel()
        await nc.close()


async def test_live_tokens_that_came_during_the_catch_up_count_as_backlog_not_lag(
    live_hub: ConversationHub, origin_js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokens published while a join reads what was stored wait in its live buffer; like a consumer's
    catch-up they are backlog but the last, so a viewer is not cut off as "slow" for tokens it was not
    sent yet (--client-queue counts live lag only)."""
    from meshkit.edge.viewer import Viewer

    c = f"c-{uuid.uuid4().hex[:8]}"
    await publish(origin_js, c, range(1, 11))
    read_stored = live_hub._stored

    async def stored_then_more(conversation_id: str, after: int | None) -> list[Any]:
        found = await read_stored(conversation_id, after)
        await publish(origin_js, c, range(11, 41))  # stored after the read: they come live only
        conv = live_hub.conversation(c)
        assert conv is not None
        await until(lambda: len(conv.live_buffer or []) == 30, within=5, what="30 buffered")
        return found

    monkeypatch.setattr(live_hub, "_stored", stored_then_more)
    viewer = Viewer(c, None)
    conv = await live_hub.join(c, viewer)
    try:
        assert sequences(conv) == list(range(1, 41))
        assert conv.log.backlog_end == 40  # 1..39 are backlog, 40 (the catch-up's last) is not
        assert viewer.lag(conv.log) <= 1
    finally:
        live_hub.leave(conv, viewer)
