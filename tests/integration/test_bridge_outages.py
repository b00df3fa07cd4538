"""`meshkit bridge` across outages and topologies: Redis killed and restarted mid-run (with its data
kept, and empty), and a bridge on a NATS leaf node reaching the origin's JetStream through
`--js-domain`. Real redis-server and nats-server processes; what JetStream stored is read back.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from meshkit.edge.token_stream import StreamLimits, stream_config
from meshkit.harness.nats import NatsServer, nats_server
from meshkit.harness.redis import RedisServer
from meshkit.harness.streaming import (
    StoredMessage,
    bridge,
    eventually,
    restarted_on_the_same_ports,
    stored_count,
    stored_messages,
)

STREAM_KEY = "chat.tokens"


def token(cid: str, seq: int) -> bytes:
    return json.dumps({"conversation_id": cid, "token": f"t{seq}", "sequence": seq, "done": False}).encode()


def sequences_once(stored: list[StoredMessage]) -> dict[str, list[int]]:
    """Sequences stored per conversation; fails on a duplicate."""
    seen: dict[str, list[int]] = {}
    keys = set()
    for m in stored:
        doc = json.loads(m.data)
        key = (doc["conversation_id"], doc["sequence"])
        assert key not in keys, f"stored twice: {key}"
        keys.add(key)
        seen.setdefault(key[0], []).append(key[1])
    return seen


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[NatsServer]:
    with nats_server(tmp_path / "nats", name="outage-origin") as server:
        yield server


def keep_data_across_restarts(redis: RedisServer) -> None:
    """The harness's Redis keeps nothing (`--appendonly no`); this restart must find its data again,
    as a production Redis with AOF would: the restarted process gets `--appendonly yes` (the file the
    running one writes from now on, `CONFIG SET appendonly yes` + `appendfsync always`)."""
    argv = redis.process.argv
    argv[argv.index("--appendonly") + 1] = "yes"
    argv.extend(["--appendfsync", "always"])


async def aof_ready(client: aioredis.Redis) -> None:
    await client.config_set("appendfsync", "always")
    await client.config_set("appendonly", "yes")

    async def rewritten() -> bool:
        info = await client.info("persistence")
        return bool(
            info["aof_enabled"] == 1
            and info["aof_rewrite_in_progress"] == 0
            and not info["aof_rewrite_scheduled"]
        )

    await eventually(rewritten, "the AOF written")


async def test_redis_killed_and_restarted_mid_run_streams_lose_nothing(
    tmp_path: Path, redis: RedisServer, origin: NatsServer
) -> None:
    client = aioredis.Redis.from_url(redis.url, socket_timeout=2, socket_connect_timeout=1)
    await aof_ready(client)
    keep_data_across_restarts(redis)
    total = 1500
    written = 0

    async def produce() -> None:
        nonlocal written
        for start in range(0, total, 10):
            while True:  # a batch that failed is written again (duplicate entries: deduplicated)
                try:
                    pipe = client.pipeline(transaction=False)
                    for i in range(start, start + 10):
                        pipe.xadd(STREAM_KEY, {"data": token(f"r{i % 15}", i // 15)})
                    await pipe.execute()
                    break
                except (RedisConnectionError, RedisTimeoutError, OSError):
                    await asyncio.sleep(0.05)
            written += 10
            await asyncio.sleep(0.005)

    with bridge(tmp_path, redis.url, origin.url, ["--source", "stream", "--consumer", "r"]) as b:
        b.wait_ready()
        producer = asyncio.create_task(produce())

        async def a_third() -> bool:
            return await stored_count(origin.url) >= total // 3

        await eventually(a_third, "a third stored before the outage")
        redis.kill()
        await asyncio.sleep(0.3)  # an outage the bridge notices (no data is lost with it)
        assert b.readyz()[0] == 503
        redis.restart()
        await asyncio.wait_for(producer, 60)

        async def everything() -> bool:
            return await stored_count(origin.url) >= total

        await eventually(everything, f"all {total} stored", within=30)
        per_conversation = sequences_once(await stored_messages(origin.url))  # no duplicate
        expected = {f"r{c}": list(range(total // 15)) for c in range(15)}
        assert {cid: sorted(seqs) for cid, seqs in per_conversation.items()} == expected  # no loss
        b.wait_ready()
        assert b.metric("meshkit_bridge_reconnects_total", dependency="redis") >= 1
        assert "Redis connection lost" in b.process.log_text()

        async def acked() -> bool:
            return int((await client.xpending(STREAM_KEY, "meshkit-bridge"))["pending"]) == 0

        await eventually(acked, "every entry acknowledged after the outage")
    await client.aclose()


async def test_redis_restarted_empty_the_group_is_created_again_and_new_entries_flow(
    tmp_path: Path, redis: RedisServer, origin: NatsServer
) -> None:
    client = aioredis.Redis.from_url(redis.url)
    with bridge(tmp_path, redis.url, origin.url, ["--source", "stream", "--consumer", "e"]) as b:
        b.wait_ready()
        for seq in range(50):
            await client.xadd(STREAM_KEY, {"data": token("before", seq)})

        async def first() -> bool:
            return await stored_count(origin.url) >= 50

        await eventually(first, "the first 50 stored")
        redis.kill()
        redis.restart()  # no persistence: the stream and the group are gone
        await client.aclose()
        client = aioredis.Redis.from_url(redis.url)
        b.wait_ready()
        for seq in range(50):
            await client.xadd(STREAM_KEY, {"data": token("after", seq)})

        async def second() -> bool:
            return await stored_count(origin.url) >= 100

        await eventually(second, "the next 50 stored")
        assert sequences_once(await stored_messages(origin.url)) == {
            "before": list(range(50)),
            "after": list(range(50)),
        }
        assert "created consumer group" in b.process.log_text()
    await client.aclose()


async def test_pubsub_resubscribes_after_a_redis_restart(
    tmp_path: Path, redis: RedisServer, origin: NatsServer
) -> None:
    with bridge(tmp_path, redis.url, origin.url, ["--source", "pubsub"]) as b:
        b.wait_ready()
        client = aioredis.Redis.from_url(redis.url)
        for seq in range(10):
            assert await client.publish("chat.ps.tokens", token("ps", seq)) == 1
        await client.aclose()
        redis.kill()
        redis.restart()
        b.wait_ready()
        client = aioredis.Redis.from_url(redis.url)

        async def subscribed() -> bool:  # its PSUBSCRIBE is back on the new server
            return any(int(c.get("psub", 0)) for c in await client.client_list())

        await eventually(subscribed, "the bridge subscribed again")
        for seq in range(10, 20):
            assert await client.publish("chat.ps.tokens", token("ps", seq)) == 1
        await client.aclose()

        async def twenty() -> bool:
            return await stored_count(origin.url) >= 20

        try:
            await eventually(twenty, "tokens from before and after the restart stored")
        except AssertionError as exc:  # which ones, and did the bridge read them
            stored = sequences_once(await stored_messages(origin.url))
            got = {k: v for k, v in b.metrics().items() if k.startswith("meshkit_bridge_")}
            raise AssertionError(f"{exc}: stored {stored}; the bridge's counters {got}") from None
        assert sequences_once(await stored_messages(origin.url)) == {"ps": list(range(20))}
        assert b.metric("meshkit_bridge_reconnects_total", dependency="redis") >= 1


# -- through a leaf -----------------------------------------------------------------------------------
@pytest.fixture
def leaf(tmp_path: Path, origin: NatsServer) -> Iterator[NatsServer]:
    with nats_server(
        tmp_path / "leaf", name="outage-leaf", jetstream=False, leaf_remote=origin.leaf_url
    ) as server:
        yield server


async def test_a_bridge_on_a_leaf_stores_into_the_origin_stream_with_js_domain(
    tmp_path: Path, redis: RedisServer, origin: NatsServer, leaf: NatsServer
) -> None:
    client = aioredis.Redis.from_url(redis.url)
    args = ["--source", "stream", "--js-domain", "origin", "--consumer", "leafy"]
    with bridge(tmp_path, redis.url, leaf.url, args) as b:
        b.wait_ready()
        for seq in range(100):
            await client.xadd(STREAM_KEY, {"data": token("edge", seq)})

        async def all_stored() -> bool:
            return await stored_count(origin.url) >= 100

        await eventually(all_stored, "100 stored at the origin")
        assert sequences_once(await stored_messages(origin.url)) == {"edge": list(range(100))}
        assert b.metric("meshkit_bridge_published_total") == 100
    await client.aclose()


async def test_a_bridge_on_a_leaf_without_js_domain_is_not_ready_and_says_why(
    tmp_path: Path, redis: RedisServer, origin: NatsServer, leaf: NatsServer
) -> None:
    with bridge(tmp_path, redis.url, leaf.url, ["--source", "stream", "--consumer", "nodomain"]) as b:

        async def said_why() -> bool:
            return "not ensured yet" in b.process.log_text()

        await eventually(said_why, "a progress line about the stream", within=10)
        status, doc = b.readyz()
        assert status == 503 and doc["stream"] == "not yet" and "stream CHAT" in doc["reason"]
        assert b.process.returncode is None


async def test_publishes_lost_with_the_nats_connection_are_sent_again_at_once_on_reconnect(
    tmp_path: Path, redis: RedisServer, origin: NatsServer, leaf: NatsServer
) -> None:
    """The leaf the bridge publishes through is frozen (publishes pile up unread, no PubAck comes back)
    and then SIGKILLed: what was in the window is lost with it and its acks will never come. After the
    reconnect those messages must go out again at once, not after --ack-timeout (30 s here: the
    window stayed full, the reader stopped, for that long)."""
    client = aioredis.Redis.from_url(redis.url)
    total = 2000
    args = ["--source", "stream", "--js-domain", "origin", "--consumer", "rc", "--ack-timeout", "30"]
    args += ["--max-inflight", "256", "--read-batch", "64"]
    with bridge(tmp_path, redis.url, leaf.url, args) as b:
        b.wait_ready()
        leaf.process.signal(signal.SIGSTOP)
        try:
            for start in range(0, total, 100):
                pipe = client.pipeline(transaction=False)
                for i in range(start, start + 100):
                    pipe.xadd(STREAM_KEY, {"data": token(f"n{i % 10}", i // 10)})
                await pipe.execute()

            async def window_full() -> bool:  # the reader waits for a batch's room (64): 193+ is full
                return b.metric("meshkit_bridge_inflight") > 256 - 64

            await eventually(window_full, "the window full while the leaf is frozen", within=10)
        finally:
            leaf.process.kill()
        with restarted_on_the_same_ports(leaf, tmp_path / "leaf"):
            back = time.monotonic()

            async def everything() -> bool:
                return await stored_count(origin.url) >= total

            await eventually(everything, f"all {total} stored soon after the reconnect", within=10)
            assert time.monotonic() - back < 10
            per_conversation = sequences_once(await stored_messages(origin.url))
            assert {c: sorted(q) for c, q in per_conversation.items()} == {
                f"n{c}": list(range(total // 10)) for c in range(10)
            }
            assert b.metric("meshkit_bridge_reconnects_total", dependency="nats") >= 1
            assert b.metric("meshkit_bridge_retries_total", reason="reconnect") > 256 - 64
            assert b.metric("meshkit_bridge_retries_total", reason="timeout") == 0
    await client.aclose()


async def test_readyz_is_503_until_redis_nats_and_the_stream_are_there_and_200_after(
    tmp_path: Path, redis: RedisServer, origin: NatsServer
) -> None:
    """/readyz through the lifecycle's readiness check: never 200 while NATS is not there yet (nor
    the stream: the origin's store is new), 200 once it is, 503 again while Redis is away."""
    origin.process.stop()  # NATS not there at start: it comes back later where the bridge expects it
    with bridge(tmp_path, redis.url, origin.url, ["--source", "stream", "--consumer", "rz"]) as b:

        async def said_starting() -> bool:
            return "ready daemon=bridge" in b.process.log_text()

        await eventually(said_starting, "the ready line (serve() returned)")
        for _ in range(10):  # serve() returned: the lifecycle's own readiness is on, the check's is not
            status, doc = b.readyz()
            assert status == 503, doc
            assert doc["nats"] == "disconnected" and doc["stream"] == "not yet" and "nats" in doc["reason"]
            await asyncio.sleep(0.05)
        with restarted_on_the_same_ports(origin, tmp_path / "nats"):
            doc = b.wait_ready()
            assert doc == {
                "status": "ready",
                "reason": "serving",
                "redis": "connected",
                "nats": "connected",
                "stream": "ensured",
            }
            redis.kill()

            async def redis_missing() -> bool:
                status, doc = b.readyz()
                return status == 503 and doc["redis"] == "disconnected" and "redis" in doc["reason"]

            await eventually(redis_missing, "503 naming Redis while it is away", within=10)
            redis.restart()
            assert b.wait_ready()["redis"] == "connected"


async def test_entries_another_bridge_took_over_are_not_published_again_when_the_first_comes_back(
    tmp_path: Path, redis: RedisServer, origin: NatsServer, leaf: NatsServer
) -> None:
    """Bridge A publishes through a leaf that freezes: its entries sit unacknowledged in its pending
    list, bridge B takes them over (--claim-idle, the HA) and stores them. When A's link comes back
    (the leaf restarted) A must not publish them again: past JetStream's duplicate window (1 s here,
    2 min by default) that second publish is a second copy of every token."""
    nc = await nats.connect(origin.url)
    await nc.jetstream().add_stream(stream_config("CHAT", StreamLimits(duplicate_window=1.0)))
    await nc.close()
    client = aioredis.Redis.from_url(redis.url)
    a_args = ["--source", "stream", "--js-domain", "origin", "--consumer", "a", "--claim-idle", "600"]
    with bridge(tmp_path, redis.url, leaf.url, [*a_args, "--ack-timeout", "30"], name="bridge-a") as a:
        a.wait_ready()
        leaf.process.signal(signal.SIGSTOP)
        try:
            for seq in range(300):
                await client.xadd(STREAM_KEY, {"data": token("ha", seq)})

            async def a_holds_them() -> bool:
                return a.metric("meshkit_bridge_inflight") >= 300

            await eventually(a_holds_them, "A read all 300 and waits for their acks", within=10)
            b_args = ["--source", "stream", "--consumer", "b", "--claim-idle", "0.5", "--claim-every", "0.2"]
            with bridge(tmp_path, redis.url, origin.url, b_args, name="bridge-b") as b:
                b.wait_ready()

                async def b_stored_them() -> bool:
                    return await stored_count(origin.url) >= 300

                await eventually(b_stored_them, "B took them over and stored them", within=15)
                assert b.metric("meshkit_bridge_claimed_total") == 300
                await asyncio.sleep(1.5)  # past the duplicate window
        finally:
            leaf.process.kill()
        with restarted_on_the_same_ports(leaf, tmp_path / "leaf"):

            async def a_settled() -> bool:
                return a.metric("meshkit_bridge_inflight") == 0

            await eventually(a_settled, "A's window empty after its link came back", within=15)
            await asyncio.sleep(0.5)
            assert sequences_once(await stored_messages(origin.url)) == {"ha": list(range(300))}
            assert a.metric("meshkit_bridge_taken_over_total") == 300
            assert int((await client.xpending(STREAM_KEY, "meshkit-bridge"))["pending"]) == 0
    await client.aclose()
