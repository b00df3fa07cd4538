"""`meshkit bridge` end to end: a real redis-server, a real nats-server with JetStream (the origin of
`meshkit.harness.nats`), the bridge as its own process. What JetStream stored is read back
(`stored_messages`) and compared byte for byte with what was written to Redis.

Each test gets its own Redis and its own NATS origin (a fresh CHAT stream): starting them takes a
fraction of a second, and no test sees another's tokens.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import nats
import pytest
import redis.asyncio as aioredis

from meshkit.harness.nats import NatsServer, nats_server
from meshkit.harness.redis import RedisServer
from meshkit.harness.streaming import (
    RunningBridge,
    StoredMessage,
    bridge,
    eventually,
    stored_count,
    stored_messages,
)
from meshkit.nats_flush import flushed

STREAM_KEY = "chat.tokens"
GROUP = "meshkit-bridge"


# -- helpers ------------------------------------------------------------------------------------------
def token(cid: str, seq: int, **extra: Any) -> bytes:
    return json.dumps(
        {"conversation_id": cid, "token": f"t{seq} ", "sequence": seq, "done": False, **extra}
    ).encode()


async def xadd_all(client: aioredis.Redis, payloads: list[bytes], key: str = STREAM_KEY) -> None:
    pipe = client.pipeline(transaction=False)
    for data in payloads:
        pipe.xadd(key, {"data": data})
    await pipe.execute()


async def wait_stored(url: str, count: int, within: float = 20.0) -> list[StoredMessage]:
    async def enough() -> bool:
        return await stored_count(url) >= count

    await eventually(enough, f"{count} messages stored", within)
    return await stored_messages(url)


def assert_each_once(stored: list[StoredMessage], expected: dict[tuple[str, int], bytes]) -> None:
    """Every expected (conversation, sequence) stored exactly once, with its exact bytes and msg id."""
    seen: dict[tuple[str, int], bytes] = {}
    for m in stored:
        doc = json.loads(m.data)
        key = (doc["conversation_id"], doc["sequence"])
        assert key not in seen, f"stored twice: {key}"
        seen[key] = m.data
        assert m.subject == f"chat.{key[0]}.tokens"
        assert m.msg_id == f"{key[0]}:{key[1]}"
    missing = sorted(set(expected) - set(seen))
    assert not missing, f"{len(missing)} missing, e.g. {missing[:5]}"
    assert seen == expected  # bytes unchanged


def stream_id(value: bytes) -> tuple[int, int]:
    ms, _, seq = value.decode().partition("-")
    return int(ms), int(seq)


async def pending_count(client: aioredis.Redis) -> int:
    info = await client.xpending(STREAM_KEY, GROUP)
    return int(info["pending"])


# -- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture
def origin(tmp_path: Path) -> Iterator[NatsServer]:
    with nats_server(tmp_path / "nats", name="bridge-origin") as server:
        yield server


@pytest.fixture
async def deadletters(origin: NatsServer) -> AsyncIterator[list[dict[str, Any]]]:
    """Every message published on chat.deadletter while the test runs (subscribed before it starts)."""
    got: list[dict[str, Any]] = []
    nc = await nats.connect(origin.url)

    async def on_msg(msg: Any) -> None:
        got.append(json.loads(msg.data))

    await nc.subscribe("chat.deadletter", cb=on_msg)
    await flushed(nc)
    yield got
    await nc.close()


def stream_bridge(
    tmp_path: Path, redis: RedisServer, origin: NatsServer, *args: str, name: str = "bridge"
) -> AbstractContextManager[RunningBridge]:
    return bridge(
        tmp_path, redis.url, origin.url, ["--source", "stream", "--consumer", name, *args], name=name
    )


# -- Streams ------------------------------------------------------------------------------------------
async def test_streams_entries_written_before_the_first_start_and_live_ones_are_stored_once_unchanged(
    tmp_path: Path, redis: RedisServer, inspect: aioredis.Redis, origin: NatsServer
) -> None:
    expected: dict[tuple[str, int], bytes] = {}
    before = []
    for seq in range(1, 41):
        for cid in ("conv-a", "conv_b", "C3"):
            extra: dict[str, Any] = {"usage": {"total_tokens": seq}, "model": "m"} if seq == 40 else {}
            data = token(cid, seq, **extra)
            if cid == "conv_b":
                data = data.replace(b'"t', b'"\\u00e9t')  # escapes and spacing pass through as written
            expected[(cid, seq)] = data
            before.append(data)
    await xadd_all(inspect, before)  # before any bridge ran: the group does not exist yet
    with stream_bridge(tmp_path, redis, origin) as b:
        doc = b.wait_ready()
        assert doc["redis"] == "connected" and doc["stream"] == "ensured"
        await wait_stored(origin.url, len(before))
        live = [token("live", seq, ts=time.time()) for seq in range(0, 50)]
        await xadd_all(inspect, live)
        expected.update({("live", seq): data for seq, data in enumerate(live)})
        stored = await wait_stored(origin.url, len(expected))
        assert_each_once(stored, expected)

        async def all_acked() -> bool:
            return await pending_count(inspect) == 0

        await eventually(all_acked, "every entry acknowledged")
        assert b.metric("meshkit_bridge_published_total") == len(expected)
        assert b.metric("meshkit_bridge_acked_total") == len(expected)
        assert b.metric("meshkit_bridge_received_total", source="stream") == len(expected)
        assert b.metric("meshkit_bridge_publish_ack_seconds_count") == len(expected)

        async def lag_reported() -> bool:  # XINFO GROUPS, polled every 2 s
            m = b.metrics()
            return bool(
                m.get("meshkit_bridge_stream_lag") == 0 and m.get("meshkit_bridge_stream_pending") == 0
            )

        await eventually(lag_reported, "lag and pending 0 in /metrics", within=6)


async def test_streams_malformed_entries_are_dead_lettered_with_reasons_and_acknowledged(
    tmp_path: Path,
    redis: RedisServer,
    inspect: aioredis.Redis,
    origin: NatsServer,
    deadletters: list[dict[str, Any]],
) -> None:
    with stream_bridge(tmp_path, redis, origin) as b:
        b.wait_ready()
        await inspect.xadd(STREAM_KEY, {"other": b"x"})  # no data field
        await inspect.xadd(STREAM_KEY, {"data": b"{not json"})
        await inspect.xadd(STREAM_KEY, {"data": b"\xff\xfe binary"})
        await inspect.xadd(STREAM_KEY, {"data": token("a.>", 1)})  # an id that would be a wildcard
        await inspect.xadd(STREAM_KEY, {"data": b'{"conversation_id": "c1", "sequence": -1}'})
        await inspect.xadd(STREAM_KEY, {"data": token("good", 1)})

        async def five() -> bool:
            return len(deadletters) >= 5

        await eventually(five, "five dead letters")
        await wait_stored(origin.url, 1)
        by_reason = {d["reason"]: d for d in deadletters}
        assert set(by_reason) == {"missing_data", "not_json", "bad_conversation_id", "bad_sequence"}
        assert [d["reason"] for d in deadletters].count("not_json") == 2
        assert by_reason["missing_data"]["data"] is None
        assert all(d["source"] == "stream" and d["entry_id"] for d in deadletters)
        binary = next(d for d in deadletters if d.get("encoding") == "base64")
        assert binary["data"] == "//4gYmluYXJ5"  # base64 of the original bytes
        assert json.loads(by_reason["bad_conversation_id"]["data"])["conversation_id"] == "a.>"

        async def all_acked() -> bool:
            return await pending_count(inspect) == 0

        await eventually(all_acked, "dead letters acknowledged too")
        assert b.readyz()[0] == 200 and b.process.returncode is None
        assert b.metric("meshkit_bridge_deadlettered_total", reason="not_json") == 2
        assert b.metric("meshkit_bridge_deadlettered_total", reason="missing_data") == 1
        stored = await stored_messages(origin.url)
        assert [m.subject for m in stored] == ["chat.good.tokens"]  # nothing else reached the stream


async def test_a_dead_letter_that_would_be_over_max_payload_is_cut_to_fit_and_the_entry_acknowledged(
    tmp_path: Path,
    redis: RedisServer,
    inspect: aioredis.Redis,
    origin: NatsServer,
    deadletters: list[dict[str, Any]],
) -> None:
    # 300 KiB of control characters: not JSON; cut to 256 KiB for the letter, each byte then JSON-escaped
    # to six (\u0001): 1.5 MiB, over NATS's 1 MiB max_payload. Such a letter was refused by the client
    # every time, so the entry stayed pending and was read (and failed) again after every reconnect.
    await inspect.xadd(STREAM_KEY, {"data": b"\x01" * (300 * 1024)})
    await inspect.xadd(STREAM_KEY, {"data": token("after", 1)})
    with stream_bridge(tmp_path, redis, origin) as b:
        b.wait_ready()

        async def lettered() -> bool:
            return len(deadletters) >= 1

        await eventually(lettered, "the dead letter of the oversized entry")
        letter = deadletters[0]
        assert letter["reason"] == "not_json" and letter["truncated"] is True
        assert set(letter["data"]) == {"\x01"} and 0 < len(letter["data"]) < 300 * 1024

        async def all_acked() -> bool:
            return await pending_count(inspect) == 0

        await eventually(all_acked, "the oversized entry acknowledged once lettered")
        assert b.metric("meshkit_bridge_deadletter_failures_total") == 0
        assert [m.subject for m in await wait_stored(origin.url, 1)] == ["chat.after.tokens"]


async def test_consumer_killed_with_pending_entries_restarts_and_republishes_them_without_loss(
    tmp_path: Path, redis: RedisServer, inspect: aioredis.Redis, origin: NatsServer
) -> None:
    total = 3000
    payloads = {(f"k{i % 30}", i // 30): token(f"k{i % 30}", i // 30) for i in range(total)}
    items = list(payloads.values())
    producer_done = asyncio.Event()

    async def produce() -> None:
        for start in range(0, total, 100):
            await xadd_all(inspect, items[start : start + 100])
            await asyncio.sleep(0.01)
        producer_done.set()

    with stream_bridge(tmp_path, redis, origin, "--max-inflight", "64", name="killed") as first:
        first.wait_ready()
        task = asyncio.create_task(produce())

        async def some() -> bool:
            return await stored_count(origin.url) >= 500

        await eventually(some, "500 stored before the kill")
        # NATS frozen for a moment: the bridge's publishes go out, their PubAcks do not come back, so
        # it dies with a full window of read, maybe stored, never acknowledged entries.
        origin.process.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(0.3)
            first.process.kill()  # SIGKILL: in-flight publishes and unsent XACKs are lost with it
        finally:
            origin.process.signal(signal.SIGCONT)
    assert await pending_count(inspect) > 0  # the kill left entries pending in the group (up to the window)
    with stream_bridge(tmp_path, redis, origin, name="killed") as second:  # the same consumer name
        await task
        stored = await wait_stored(origin.url, total, within=30)
        assert_each_once(stored, payloads)

        async def all_acked() -> bool:
            return await pending_count(inspect) == 0

        await eventually(all_acked, "every entry acknowledged after the restart")
        assert "re-reading" in second.process.log_text()  # its own pending entries, published again


async def test_a_live_bridge_takes_over_the_pending_entries_of_a_dead_consumer(
    tmp_path: Path, redis: RedisServer, inspect: aioredis.Redis, origin: NatsServer
) -> None:
    await inspect.xgroup_create(STREAM_KEY, GROUP, id="0", mkstream=True)
    payloads = {("ha", seq): token("ha", seq) for seq in range(100)}
    await xadd_all(inspect, list(payloads.values()))
    # A bridge that read them and died before acknowledging: they sit in its pending list.
    read: Any = await inspect.xreadgroup(GROUP, "dead-bridge", {STREAM_KEY: ">"}, count=1000)
    assert len(read[0][1]) == 100
    args = ("--claim-idle", "0.3", "--claim-every", "0.2")
    with stream_bridge(tmp_path, redis, origin, *args, name="live") as b:
        b.wait_ready()
        stored = await wait_stored(origin.url, 100)
        assert_each_once(stored, payloads)

        async def all_acked() -> bool:
            return await pending_count(inspect) == 0

        await eventually(all_acked, "the claimed entries acknowledged")
        assert b.metric("meshkit_bridge_claimed_total") == 100


async def test_sigterm_waits_for_the_acks_in_flight_and_exits_0(
    tmp_path: Path, redis: RedisServer, inspect: aioredis.Redis, origin: NatsServer
) -> None:
    payloads = {(f"s{i % 10}", i // 10): token(f"s{i % 10}", i // 10) for i in range(2000)}
    await xadd_all(inspect, list(payloads.values()))
    with stream_bridge(tmp_path, redis, origin) as b:
        b.wait_ready()

        async def started() -> bool:
            return await stored_count(origin.url) > 0

        await eventually(started, "publishing started")
        began = time.monotonic()
        b.process.signal(signal.SIGTERM)
        assert b.process.wait(15) == 0
        assert time.monotonic() - began < 10
    stored = await stored_messages(origin.url)
    stored_ids = {m.msg_id for m in stored}
    pending = await inspect.xpending_range(STREAM_KEY, GROUP, min="-", max="+", count=10_000)
    pending_ids = {p["message_id"] for p in pending}
    entries: Any = await inspect.xrange(STREAM_KEY)
    info: Any = await inspect.xinfo_groups(STREAM_KEY)
    delivered_upto = stream_id(info[0]["last-delivered-id"])
    for entry_id, fields in entries:
        doc = json.loads(fields[b"data"])
        acked = stream_id(entry_id) <= delivered_upto and entry_id not in pending_ids
        if acked:  # acknowledged only once stored
            assert f"{doc['conversation_id']}:{doc['sequence']}" in stored_ids, entry_id


async def test_reading_pauses_while_xacks_are_refused_so_the_ack_queue_stays_bounded(
    tmp_path: Path, redis: RedisServer, inspect: aioredis.Redis, origin: NatsServer
) -> None:
    """Redis answers reads but refuses XACK (here an ACL; in production a proxy or a permissions
    change): the confirmed ids queue up for their XACK. Reading on would queue the whole stream in
    memory; the reader waits instead, and everything is acknowledged once XACK works again."""
    await inspect.acl_setuser("default", enabled=True, commands=["-xack"])
    try:
        payloads = {(f"q{i % 10}", i // 10): token(f"q{i % 10}", i // 10) for i in range(3000)}
        await xadd_all(inspect, list(payloads.values()))
        with stream_bridge(tmp_path, redis, origin, "--max-inflight", "64", "--read-batch", "64") as b:
            b.wait_ready()

            async def paused() -> bool:
                return "reading paused" in b.process.log_text()

            await eventually(paused, "the reader paused on the XACK queue", within=10)
            await asyncio.sleep(0.5)
            received = b.metric("meshkit_bridge_received_total", source="stream")
            assert received <= 8 * 64 + 2 * 64, received  # the XACK queue's bound, plus what was in flight
            await inspect.acl_setuser("default", enabled=True, commands=["+xack"])

            async def all_acked() -> bool:
                return await pending_count(inspect) == 0 and await stored_count(origin.url) == 3000

            await eventually(all_acked, "everything stored and acknowledged once XACK works", within=20)
            assert_each_once(await stored_messages(origin.url), payloads)
    finally:
        await inspect.acl_setuser("default", enabled=True, commands=["+@all"])


@pytest.mark.parametrize("frozen", ["nats", "redis"])
async def test_sigterm_with_a_frozen_dependency_exits_within_the_drain_timeout(
    tmp_path: Path, redis: RedisServer, inspect: aioredis.Redis, origin: NatsServer, frozen: str
) -> None:
    """NATS frozen (no PubAck comes back, the socket buffer fills) or Redis frozen (a read and the
    XACKs hang): SIGTERM still ends the bridge, exit 0, within --drain-timeout plus the bounded
    closes, and nothing unstored is acknowledged."""
    payloads = {(f"f{i % 10}", i // 10): token(f"f{i % 10}", i // 10) for i in range(3000)}
    await xadd_all(inspect, list(payloads.values()))
    with stream_bridge(tmp_path, redis, origin, "--drain-timeout", "2") as b:
        b.wait_ready()

        async def started() -> bool:
            return await stored_count(origin.url) > 0

        await eventually(started, "publishing started")
        server = origin.process if frozen == "nats" else redis.process
        server.signal(signal.SIGSTOP)
        try:
            began = time.monotonic()
            b.process.signal(signal.SIGTERM)
            assert b.process.wait(20) == 0
            took = time.monotonic() - began
        finally:
            server.signal(signal.SIGCONT)
        assert took < 12, f"{took:.1f} s"
    stored_ids = {m.msg_id for m in await stored_messages(origin.url)}
    pending = await inspect.xpending_range(STREAM_KEY, GROUP, min="-", max="+", count=10_000)
    pending_ids = {p["message_id"] for p in pending}
    info: Any = await inspect.xinfo_groups(STREAM_KEY)
    delivered_upto = stream_id(info[0]["last-delivered-id"])
    entries: Any = await inspect.xrange(STREAM_KEY)
    for entry_id, fields in entries:
        doc = json.loads(fields[b"data"])
        if stream_id(entry_id) <= delivered_upto and entry_id not in pending_ids:
            assert f"{doc['conversation_id']}:{doc['sequence']}" in stored_ids, entry_id


# -- pub/sub ------------------------------------------------------------------------------------------
def pubsub_bridge(
    tmp_path: Path, redis: RedisServer, origin: NatsServer, name: str = "bridge"
) -> AbstractContextManager[RunningBridge]:
    return bridge(tmp_path, redis.url, origin.url, ["--source", "pubsub"], name=name)


async def psubscribers(client: aioredis.Redis) -> int:
    clients = await client.client_list()
    return sum(1 for c in clients if int(c.get("psub", 0)) > 0)


async def test_pubsub_tokens_are_stored_unchanged(
    tmp_path: Path, redis: RedisServer, inspect: aioredis.Redis, origin: NatsServer
) -> None:
    with pubsub_bridge(tmp_path, redis, origin) as b:
        b.wait_ready()
        expected = {}
        for seq in range(1, 101):
            cid = f"p{seq % 4}"
            data = token(cid, seq, done=seq == 100)
            expected[(cid, seq)] = data
            assert await inspect.publish(f"chat.{cid}.tokens", data) == 1
        stored = await wait_stored(origin.url, 100)
        assert_each_once(stored, expected)
        assert b.metric("meshkit_bridge_received_total", source="pubsub") == 100


async def test_two_pubsub_bridges_side_by_side_store_each_token_once(
    tmp_path: Path, redis: RedisServer, inspect: aioredis.Redis, origin: NatsServer
) -> None:
    with (
        pubsub_bridge(tmp_path, redis, origin, "one") as one,
        pubsub_bridge(tmp_path, redis, origin, "two") as two,
    ):
        one.wait_ready()
        two.wait_ready()
        assert await psubscribers(inspect) == 2
        expected = {(f"d{i % 7}", i // 7): token(f"d{i % 7}", i // 7) for i in range(300)}
        for (cid, _), data in expected.items():
            assert await inspect.publish(f"chat.{cid}.tokens", data) == 2  # both bridges got it
        stored = await wait_stored(origin.url, 300)

        def counted() -> tuple[float, float]:
            published = one.metric("meshkit_bridge_published_total") + two.metric(
                "meshkit_bridge_published_total"
            )
            dups = one.metric("meshkit_bridge_duplicates_total") + two.metric(
                "meshkit_bridge_duplicates_total"
            )
            return published, dups

        async def all_acked() -> bool:
            return sum(counted()) == 600

        await eventually(all_acked, "every PubAck of both bridges")
        assert counted() == (300, 300)  # each token stored once, the other copy deduplicated
        assert_each_once(await stored_messages(origin.url), expected)
        assert len(stored) == 300


async def test_pubsub_malformed_messages_are_dead_lettered_and_the_bridge_keeps_running(
    tmp_path: Path,
    redis: RedisServer,
    inspect: aioredis.Redis,
    origin: NatsServer,
    deadletters: list[dict[str, Any]],
) -> None:
    with pubsub_bridge(tmp_path, redis, origin) as b:
        b.wait_ready()
        await inspect.publish("chat.c1.tokens", b"not json at all")
        await inspect.publish("chat.a.b.tokens", token("a", 1))  # matches the glob, not the contract
        await inspect.publish("chat.c1.tokens", token("c2", 1))  # c2's token on c1's channel
        await inspect.publish("chat.c1.tokens", token("a.>", 1))
        await inspect.publish("chat.c1.tokens", token("c1", 1))  # a good one after them

        async def four() -> bool:
            return len(deadletters) >= 4

        await eventually(four, "four dead letters")
        await wait_stored(origin.url, 1)
        reasons = {(d["reason"], d["channel"]) for d in deadletters}
        assert reasons == {
            ("not_json", "chat.c1.tokens"),
            ("bad_channel", "chat.a.b.tokens"),
            ("channel_mismatch", "chat.c1.tokens"),
            ("bad_conversation_id", "chat.c1.tokens"),
        }
        assert all(d["source"] == "pubsub" for d in deadletters)
        assert next(d for d in deadletters if d["reason"] == "not_json")["data"] == "not json at all"
        assert [m.subject for m in await stored_messages(origin.url)] == ["chat.c1.tokens"]
        assert b.readyz()[0] == 200 and b.process.returncode is None
        assert b.metric("meshkit_bridge_deadlettered_total", reason="channel_mismatch") == 1


# -- start-up -----------------------------------------------------------------------------------------
async def test_nats_unreachable_at_start_keeps_trying_not_ready(tmp_path: Path, redis: RedisServer) -> None:
    from meshkit.harness.process import free_port

    port = free_port()
    with bridge(tmp_path, redis.url, f"nats://127.0.0.1:{port}", ["--source", "stream"]) as b:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            status, doc = b.readyz()
            assert status == 503, doc
            await asyncio.sleep(0.1)
        assert "nats" in doc["reason"] and doc["nats"] == "disconnected"
        assert b.process.returncode is None

        async def progress_line() -> bool:
            return "waiting for NATS" in b.process.log_text()

        await eventually(progress_line, "a progress line", within=5)
        assert b.readyz()[0] == 503


def test_missing_redis_and_nats_are_one_config_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "meshkit", "bridge", "--admin-listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--redis is required" in result.stderr and "--nats is required" in result.stderr
    assert "Traceback" not in result.stderr
