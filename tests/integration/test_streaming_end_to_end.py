"""The token chain end to end on real processes: a model's tokens written to Redis -> `meshkit bridge`
-> the NATS origin's JetStream (CHAT) -> the edge leaf -> `meshkit sse` on the leaf -> viewers
(an SSE reader with the EventSource rules, the official `openai` client).

One set of servers for the module (`streaming_servers`): Redis, origin, leaf; on top of them two
Streams bridges sharing the consumer group on `chat.tokens` (each entry goes to one of them) and two
pub/sub bridges side by side (each gets every message: JetStream's `Nats-Msg-Id` dedup must store it
once), and one adapter on the leaf. The restart test has a bridge of its own on another key. Every
test uses conversation ids of its own, so the shared stream does not mix them up.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
import redis.asyncio as aioredis

from meshkit.harness.edge_daemons import SseAdapter, sse_adapter
from meshkit.harness.streaming import RunningBridge, bridge, eventually, stored_messages
from meshkit.harness.streaming_stack import (
    StreamingServers,
    publish_tokens,
    streaming_servers,
    token_json,
    xadd_tokens,
)
from meshkit.nats_flush import flushed

from .conftest import request
from .test_sse_support import SseReader, open_stream

pytestmark = pytest.mark.integration

ADAPTER_ARGS = ["--heartbeat", "0.5", "--consumer-heartbeat", "0.5", "--gap-timeout", "0.5"]
RESTART_KEY = "chat.restart"


def cid(prefix: str = "c") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("streaming-e2e")


@pytest.fixture(scope="module")
def servers(workdir: Path) -> Iterator[StreamingServers]:
    with streaming_servers(workdir, prefix="e2e") as running:
        yield running


@pytest.fixture(scope="module")
def streams_bridges(workdir: Path, servers: StreamingServers) -> Iterator[list[RunningBridge]]:
    """Two Streams bridges in one consumer group on `chat.tokens` (consumers s1, s2)."""
    with ExitStack() as stack:
        running = [
            stack.enter_context(
                bridge(
                    workdir,
                    servers.redis.url,
                    servers.origin.url,
                    ["--source", "stream", "--consumer", name],
                    name=f"bridge-{name}",
                )
            )
            for name in ("s1", "s2")
        ]
        for b in running:
            b.wait_ready()
        yield running


@pytest.fixture(scope="module")
def pubsub_bridges(workdir: Path, servers: StreamingServers) -> Iterator[list[RunningBridge]]:
    """Two pub/sub bridges side by side: both PSUBSCRIBE chat.*.tokens and publish every message."""
    with ExitStack() as stack:
        running = [
            stack.enter_context(
                bridge(
                    workdir,
                    servers.redis.url,
                    servers.origin.url,
                    ["--source", "pubsub"],
                    name=f"bridge-{name}",
                )
            )
            for name in ("p1", "p2")
        ]
        for b in running:
            b.wait_ready()
        yield running


@pytest.fixture(scope="module")
def adapter(
    workdir: Path, servers: StreamingServers, streams_bridges: list[RunningBridge]
) -> Iterator[SseAdapter]:
    """`meshkit sse` on the leaf (the bridges created the stream before it starts)."""
    with sse_adapter(workdir, servers.leaf.url, ADAPTER_ARGS, name="e2e-sse") as running:
        yield running


@pytest.fixture
async def model(servers: StreamingServers) -> AsyncIterator[aioredis.Redis]:
    """The model's side: a Redis client that writes tokens."""
    client = aioredis.from_url(servers.redis.url)
    yield client
    await client.aclose()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def total(bridges: list[RunningBridge], name: str, **labels: str) -> float:
    return sum(b.metric(name, **labels) for b in bridges)


async def stored_for(servers: StreamingServers, conversation_id: str) -> list[dict[str, Any]]:
    """What the origin's CHAT stream holds for one conversation, in stream order."""
    stored = await stored_messages(servers.origin.url, subjects=f"chat.{conversation_id}.tokens")
    return [json.loads(m.data) for m in stored]


async def read_to_the_end(session: aiohttp.ClientSession, url: str, **headers: str) -> SseReader:
    reader = await open_stream(session, url, headers)
    try:
        await reader.until_end(within=15)
    finally:
        await reader.close()
    return reader


# -- the chain ----------------------------------------------------------------------------------------
async def test_streams_tokens_reach_a_viewer_on_the_leaf_each_once_through_two_bridges(
    servers: StreamingServers,
    streams_bridges: list[RunningBridge],
    adapter: SseAdapter,
    model: aioredis.Redis,
    session: aiohttp.ClientSession,
) -> None:
    c = cid()
    published = total(streams_bridges, "meshkit_bridge_published_total")
    reader = await open_stream(session, adapter.stream_url(c))  # before the first token: live
    try:
        # tokens 1-10 at once: the two bridges of the group may store 2 before 1 (seen here), which
        # the adapter holds for --gap-timeout and hands out in order
        await xadd_tokens(model, c, range(1, 11), model="m-e2e")
        for start in range(11, 101, 10):  # ten batches: both bridges of the group get some
            await xadd_tokens(model, c, range(start, start + 10), done_at=100, model="m-e2e")
            await asyncio.sleep(0.02)
        await reader.until_end(within=15)
    finally:
        await reader.close()
    assert reader.sequences == list(range(1, 101))
    assert [e.event for e in reader.events] == ["token"] * 99 + ["done"]
    first = json.loads(reader.events[0].data)
    assert (first["conversation_id"], first["token"], first["model"]) == (c, "t1 ", "m-e2e")
    # each stored once; two bridges publish side by side, so the stream may hold them slightly out of
    # order (seen here: 43 before 42): the adapter hands them out in sequence order all the same
    stored = await stored_for(servers, c)
    assert sorted(d["sequence"] for d in stored) == list(range(1, 101))
    assert total(streams_bridges, "meshkit_bridge_published_total") - published == 100


async def test_two_pubsub_bridges_side_by_side_store_each_token_once(
    servers: StreamingServers,
    pubsub_bridges: list[RunningBridge],
    adapter: SseAdapter,
    model: aioredis.Redis,
    session: aiohttp.ClientSession,
) -> None:
    c = cid()
    before = [b.metric("meshkit_bridge_received_total", source="pubsub") for b in pubsub_bridges]
    duplicates = total(pubsub_bridges, "meshkit_bridge_duplicates_total")
    reader = await open_stream(session, adapter.stream_url(c))
    try:
        await publish_tokens(model, c, range(1, 41), done_at=40)
        await reader.until_end(within=15)
    finally:
        await reader.close()
    assert reader.sequences == list(range(1, 41))
    # both bridges received and published every token; JetStream kept one of each pair
    after = [b.metric("meshkit_bridge_received_total", source="pubsub") for b in pubsub_bridges]
    assert [a - b for a, b in zip(after, before, strict=True)] == [40, 40]

    async def acks_in() -> bool:
        return total(pubsub_bridges, "meshkit_bridge_duplicates_total") - duplicates >= 40

    await eventually(acks_in, "a PubAck duplicate=True for the second copy of each token", within=10)
    stored = await stored_for(servers, c)
    assert [d["sequence"] for d in stored] == list(range(1, 41))


async def test_the_openai_client_reads_the_conversation_from_the_adapter_on_the_leaf(
    servers: StreamingServers, adapter: SseAdapter, model: aioredis.Redis
) -> None:
    import openai
    from openai.types.chat import ChatCompletionChunk

    c = cid("oai")
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    await xadd_tokens(model, c, [1, 2], model="gpt-e2e")  # two before the client comes

    def read() -> list[ChatCompletionChunk]:
        client = openai.OpenAI(base_url=adapter.url, api_key="unused", max_retries=0, timeout=15)
        stream = client.get(
            f"/stream/{c}",
            cast_to=ChatCompletionChunk,
            options={"params": {"format": "openai"}},
            stream=True,
            stream_cls=openai.Stream[ChatCompletionChunk],
        )
        return list(stream)

    reading = asyncio.ensure_future(asyncio.to_thread(read))
    await asyncio.sleep(0.3)
    await xadd_tokens(model, c, [3], model="gpt-e2e")
    pipe = model.pipeline(transaction=False)
    pipe.xadd("chat.tokens", {"data": token_json(c, 4, text="", done=True, model="gpt-e2e", usage=usage)})
    await pipe.execute()
    chunks = await asyncio.wait_for(reading, 20)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "t1 t2 t3 "
    assert [ch.choices[0].finish_reason for ch in chunks] == [None, None, None, "stop"]
    assert {ch.model for ch in chunks} == {"gpt-e2e"}
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 8
    assert [(ch.model_extra or {}).get("x_sequence") for ch in chunks] == [1, 2, 3, 4]


async def test_a_viewer_resumes_mid_stream_with_last_event_id(
    servers: StreamingServers, adapter: SseAdapter, model: aioredis.Redis, session: aiohttp.ClientSession
) -> None:
    c = cid()
    first = await open_stream(session, adapter.stream_url(c))
    try:
        await xadd_tokens(model, c, range(1, 21))
        await first.wait_for(lambda r: r.sequences == list(range(1, 21)), what="tokens 1-20")
    finally:
        await first.close()  # the viewer goes away mid-conversation; the model goes on
    await xadd_tokens(model, c, range(21, 41), done_at=40)
    resumed = await read_to_the_end(session, adapter.stream_url(c), **{"Last-Event-ID": "20"})
    assert resumed.sequences == list(range(21, 41))
    assert not resumed.of("reset")
    by_query = await read_to_the_end(session, adapter.stream_url(c, last_event_id=35))
    assert by_query.sequences == list(range(36, 41))


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
async def test_a_streams_bridge_restart_mid_conversation_loses_nothing(
    stop: str,
    workdir: Path,
    servers: StreamingServers,
    adapter: SseAdapter,
    model: aioredis.Redis,
    session: aiohttp.ClientSession,
) -> None:
    """One bridge on a key of its own: tokens written while it is down are only delivered because the
    Streams group remembers where it was (pub/sub would have lost them); entries it had published but
    not acknowledged when killed are published again and deduplicated."""
    c = cid(stop)
    argv = ["--source", "stream", "--stream-key", RESTART_KEY, "--consumer", f"restart-{stop}"]
    written = 0

    async def write(count: int) -> None:
        nonlocal written
        for _ in range(count):
            written += 1
            await xadd_tokens(model, c, [written], key=RESTART_KEY)
            await asyncio.sleep(0.004)

    reader = await open_stream(session, adapter.stream_url(c))
    try:
        with ExitStack() as stack:
            first = stack.enter_context(
                bridge(workdir, servers.redis.url, servers.origin.url, argv, name=f"restart-{stop}-1")
            )
            await asyncio.to_thread(first.wait_ready)
            writing = asyncio.ensure_future(write(150))
            await reader.wait_for(lambda r: len(r.sequences) >= 30, what="30 tokens before the restart")
            if stop == "sigterm":
                first.process.signal(signal.SIGTERM)
                assert await asyncio.to_thread(first.process.wait, 15) == 0
            else:
                first.process.kill()
            at_stop = written
            await writing  # the model goes on while no bridge runs
            assert written > at_stop
            await asyncio.sleep(0.3)
            assert len(reader.sequences) <= at_stop + 1, "nothing new arrives while no bridge runs"
            again = bridge(workdir, servers.redis.url, servers.origin.url, argv, name=f"restart-{stop}-2")
            second = await asyncio.to_thread(stack.enter_context, again)
            await asyncio.to_thread(second.wait_ready)
            await write(50)
            written += 1
            await xadd_tokens(model, c, [written], done_at=written, key=RESTART_KEY)
            await reader.until_end(within=20)
    finally:
        await reader.close()
    assert reader.sequences == list(range(1, written + 1))
    assert not reader.of("reset")
    stored = await stored_for(servers, c)
    assert [d["sequence"] for d in stored] == list(range(1, written + 1)), "each stored once"


# -- subject injection ----------------------------------------------------------------------------------
async def test_subject_injection_is_dead_lettered_and_never_reaches_another_conversation(
    servers: StreamingServers,
    streams_bridges: list[RunningBridge],
    pubsub_bridges: list[RunningBridge],
    adapter: SseAdapter,
    model: aioredis.Redis,
    session: aiohttp.ClientSession,
) -> None:
    victim = cid("victim")
    letters: list[dict[str, Any]] = []
    viewers: list[SseReader] = []
    nc = await nats.connect(servers.origin.url)
    try:

        async def on_letter(msg: Any) -> None:
            letters.append(json.loads(msg.data))

        await nc.subscribe("chat.deadletter", cb=on_letter)
        await flushed(nc)
        viewers += [
            await open_stream(session, adapter.stream_url("a")),
            await open_stream(session, adapter.stream_url(victim)),
        ]
        # pub/sub: a channel whose id is a wildcard, and a channel naming another conversation
        await model.publish("chat.a.>.tokens", token_json("a.>", 1))
        await model.publish("chat.a.>.tokens", token_json("a", 1, text="injected"))
        await model.publish("chat.a.tokens", token_json(victim, 1, text="injected"))
        # Streams: ids that NATS would read as wildcards or as more subject tokens
        for bad in ("a.>", "*", "a.b"):
            await model.xadd("chat.tokens", {"data": token_json(bad, 1, text="injected")})

        async def lettered() -> bool:
            return len(letters) >= 2 * 3 + 3  # each pub/sub bridge letters its three, the group its three

        await eventually(lettered, "every injection dead-lettered", within=10)
        # then the real conversations (through the pub/sub pair: each bridge stores them in order);
        # their viewers must see their own tokens only
        await publish_tokens(model, "a", [1, 2], done_at=2)
        await publish_tokens(model, victim, [1, 2, 3], done_at=3)
        for viewer in viewers:
            await viewer.until_end(within=15)
    finally:
        for viewer in viewers:
            await viewer.close()
        await nc.close()

    a_events, victim_events = (v.of("token") + v.of("done") for v in viewers)
    assert [json.loads(e.data)["conversation_id"] for e in a_events] == ["a", "a"]
    assert [json.loads(e.data)["conversation_id"] for e in victim_events] == [victim] * 3
    assert b"injected" not in viewers[0].raw + viewers[1].raw
    assert viewers[0].sequences == [1, 2] and viewers[1].sequences == [1, 2, 3]

    pubsub = [letter for letter in letters if letter["source"] == "pubsub"]
    assert len(pubsub) == 6 and {letter["channel"] for letter in pubsub} == {
        "chat.a.>.tokens",
        "chat.a.tokens",
    }
    streams = [letter for letter in letters if letter["source"] == "stream"]
    assert sorted(json.loads(letter["data"])["conversation_id"] for letter in streams) == ["*", "a.>", "a.b"]
    assert {letter["reason"] for letter in streams} == {"bad_conversation_id"}
    # nothing of it was stored under any subject
    stored = await stored_messages(servers.origin.url)
    assert all(b"injected" not in m.data for m in stored)
    assert {m.subject.count(".") for m in stored} == {2}

    # and a viewer cannot ask for it either
    resp = request(adapter.url + "/stream/a.%3E", "GET")
    assert resp.status == 400 and resp.json()["error"]["type"], resp.body


# -- found by these tests ---------------------------------------------------------------------------
async def test_first_tokens_stored_out_of_order_still_reach_a_viewer_in_order(
    servers: StreamingServers, adapter: SseAdapter, session: aiohttp.ClientSession
) -> None:
    """What two bridges side by side can store (seen in the runs of this module: token 2 of a
    conversation stored a few ms before token 1), written straight into JetStream in that order."""
    c = cid("order")
    reader = await open_stream(session, adapter.stream_url(c))
    nc = await nats.connect(servers.origin.url)
    try:
        js = nc.jetstream()
        for seq, done in ((2, False), (1, False), (3, True)):
            await js.publish(
                f"chat.{c}.tokens", token_json(c, seq, done=done), headers={"Nats-Msg-Id": f"{c}:{seq}"}
            )
        await reader.until_end(within=10)
    finally:
        await reader.close()
        await nc.close()
    assert not reader.of("reset"), bytes(reader.raw)
    assert reader.sequences == [1, 2, 3]
