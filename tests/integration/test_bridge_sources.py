"""The bridge's Redis Streams reader (`StreamSource`) on a real redis-server: the consumer group at id
0, its own pending entries first, nothing handed out twice while in flight, acks batched safely."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from meshkit.harness.redis import RedisServer
from meshkit.harness.streaming import eventually
from meshkit.sidecars.bridge_sources import PubSubSource, Received, StreamSource

KEY, GROUP = "chat.tokens", "g"


def source(
    redis: RedisServer, consumer: str = "c", *, claim_idle: float = 30.0, claim_every: float = 5.0
) -> StreamSource:
    return StreamSource(
        redis.url, KEY, GROUP, consumer, block=0.1, claim_idle=claim_idle, claim_every=claim_every
    )


async def pending(client: aioredis.Redis) -> int:
    return int((await client.xpending(KEY, GROUP))["pending"])


async def test_backlog_then_own_pending_first_and_in_flight_never_twice(
    redis: RedisServer, inspect: aioredis.Redis
) -> None:
    for i in range(5):
        await inspect.xadd(KEY, {"data": b"%d" % i})
    first = source(redis)
    got = await first.read(3)  # the group is created at 0: the backlog is delivered
    assert [r.data for r in got] == [b"0", b"1", b"2"]
    await first.close()
    again = source(redis)  # the same consumer after a restart: its 3 pending entries first
    replay = await again.read(10)
    assert [r.data for r in replay] == [b"0", b"1", b"2"]
    again.reset()  # a reconnect: pending entries re-read, but these are in flight: not handed out again
    rest = await again.read(10)
    assert [r.data for r in rest] == [b"3", b"4"]
    assert await again.read(10) == []
    await again.close()


async def test_concurrent_ack_flushes_ack_every_entry_once(
    redis: RedisServer, inspect: aioredis.Redis
) -> None:
    for _ in range(2500):
        await inspect.xadd(KEY, {"data": b"x"})
    src = StreamSource(redis.url, KEY, GROUP, "c", block=0.1, ack_batch=100)
    items: list[Received] = []
    while len(items) < 2500:
        items += await src.read(1000)
    for item in items:
        src.confirm(item)
    done = await asyncio.gather(src.flush_acks(), src.flush_acks(), src.flush_acks())
    assert sum(done) == 2500 and src.acked == 2500
    assert await pending(inspect) == 0
    await src.close()


async def test_deleted_and_fieldless_entries_come_without_data(
    redis: RedisServer, inspect: aioredis.Redis
) -> None:
    kept = await inspect.xadd(KEY, {"data": b"ok"})
    gone = await inspect.xadd(KEY, {"data": b"gone"})
    await inspect.xadd(KEY, {"other": b"x"})
    src = source(redis)
    first = await src.read(10)
    assert [r.data for r in first] == [b"ok", b"gone", None]  # no `data` field: None
    await inspect.xdel(KEY, gone)
    src.release(first[0])  # given back (e.g. its dead letter could not be published)
    src.release(first[1])
    src.reset()  # re-read pending: the deleted entry has no fields any more; the third is in flight
    assert [(r.entry_id, r.data) for r in await src.read(10)] == [(kept, b"ok"), (gone, None)]
    await src.close()


async def test_a_dead_consumers_idle_entries_are_claimed(redis: RedisServer, inspect: aioredis.Redis) -> None:
    await inspect.xgroup_create(KEY, GROUP, id="0", mkstream=True)
    for i in range(3):
        await inspect.xadd(KEY, {"data": b"%d" % i})
    await inspect.xreadgroup(GROUP, "dead", {KEY: ">"}, count=10)
    await asyncio.sleep(0.25)
    live = source(redis, "live", claim_idle=0.2, claim_every=0.0)
    claimed = await live.read(10)
    assert [r.data for r in claimed] == [b"0", b"1", b"2"] and live.claimed == 3
    assert await live.read(10) == []  # in flight here now: not claimed again
    await live.close()


async def test_confirmed_entries_waiting_for_their_xack_are_not_handed_out_again(
    redis: RedisServer, inspect: aioredis.Redis
) -> None:
    """Stored in JetStream, XACK not sent yet (Redis went away first): the re-read of the pending list
    after the reconnect, and a claim pass, must not publish them a second time: once Redis was away
    for longer than JetStream's 2-minute duplicate window, that second publish is a second copy."""
    for i in range(4):
        await inspect.xadd(KEY, {"data": b"%d" % i})
    src = source(redis, claim_idle=0.0, claim_every=0.0)
    got = await src.read(3)
    for item in got:
        src.confirm(item)
    src.reset()  # the reconnect: pending entries are re-read first
    assert [r.data for r in await src.read(10)] == [b"3"]  # the three confirmed ones are not
    assert await src.read(10) == []  # nor claimed back (idle 0)
    assert await src.flush_acks() == 3 and await pending(inspect) == 1
    src.reset()  # acknowledged now: nothing skipped any more, nothing kept
    assert await src.read(10) == []
    await src.close()


async def test_pubsub_messages_read_with_the_servers_eof_are_returned_then_the_error(
    redis: RedisServer, inspect: aioredis.Redis
) -> None:
    """A killed server's last messages and its EOF sit in the socket together: the messages first."""
    src = PubSubSource(redis.url, "chat.*.tokens", block=0.1)
    assert await src.read(10) == []  # subscribed
    for i in range(5):
        assert await inspect.publish("chat.k.tokens", b"%d" % i) == 1

    async def written() -> bool:  # Redis sends a subscriber's messages after PUBLISH answers
        clients = await inspect.client_list()
        return any(c.get("psub") == "1" and c.get("omem") == "0" for c in clients)

    await eventually(written, "the five messages written to the subscriber's socket", within=5)
    redis.kill()
    redis.process.stop()  # reaped: the EOF is in the socket behind the five messages
    reader = src._conn._reader  # a busy bridge comes back to a reader that holds both: wait for that

    async def at_eof() -> bool:
        return bool(reader._eof)

    await eventually(at_eof, "the EOF read into the subscribed connection", within=5)
    got = await src.read(100)  # what was read before the EOF is returned, not lost with the error
    assert [r.data for r in got] == [b"%d" % i for i in range(5)]
    assert {r.channel for r in got} == {"chat.k.tokens"}
    with pytest.raises((RedisConnectionError, OSError)):  # not swallowed: the bridge counts a reconnect
        await src.read(100)
    redis.restart()
    assert await src.read(10) == []  # subscribed again on a new connection
    fresh = aioredis.from_url(redis.url)  # `inspect`'s connection died with the old server
    assert await fresh.publish("chat.k.tokens", b"after") == 1
    await fresh.aclose()
    assert [r.data for r in await src.read(10)] == [b"after"]
    await src.close()
