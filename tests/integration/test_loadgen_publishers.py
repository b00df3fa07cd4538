"""The load generator's publishers against real Redis and NATS: the contract's JSON, where the bridge and
the adapter expect it (a Redis Stream's `data` field, `chat.<id>.tokens`, `Nats-Msg-Id`)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.aio.msg
import pytest
import redis.asyncio as aioredis

from meshkit.edge.loadgen_publishers import make_publisher
from meshkit.edge.token_contract import message_id, parse_token
from meshkit.errors import DependencyError
from meshkit.harness.nats import NatsServer, nats_server
from meshkit.harness.process import free_port
from meshkit.harness.redis import RedisServer
from meshkit.nats_flush import flushed


@pytest.fixture(scope="module")
def nats_core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with nats_server(tmp_path_factory.mktemp("nats"), jetstream=False, name="pub-nats") as server:
        yield server


async def test_redis_stream_entries_carry_the_token_json_in_data(redis: RedisServer) -> None:
    pub = make_publisher(
        "redis-stream", nats_url=None, redis_url=redis.url, nchan_url=None, stream_key="chat.tokens"
    )
    await pub.start()
    before = time.time()
    await pub.publish_batch([("c1", 1, False), ("c2", 1, False), ("c1", 2, True)])
    await pub.close()
    client = aioredis.from_url(redis.url)
    try:
        entries = await client.xrange("chat.tokens")
    finally:
        await client.aclose()
    assert entries is not None
    datas = [fields[b"data"] for _, fields in entries if fields is not None]
    tokens = [parse_token(d if isinstance(d, bytes) else d.encode()) for d in datas]
    assert [(t.conversation_id, t.sequence, t.done) for t in tokens] == [
        ("c1", 1, False),
        ("c2", 1, False),
        ("c1", 2, True),
    ]
    assert all(t.ts is not None and before <= t.ts <= time.time() for t in tokens)
    assert pub.errors == 0


async def test_redis_pubsub_on_the_tokens_subject(redis: RedisServer) -> None:
    client = aioredis.from_url(redis.url)
    pubsub = client.pubsub()
    await pubsub.psubscribe("chat.*.tokens")
    await pubsub.get_message(timeout=1.0)  # the psubscribe confirmation
    pub = make_publisher("redis-pubsub", nats_url=None, redis_url=redis.url, nchan_url=None, stream_key="x")
    await pub.start()
    await pub.publish_batch([("c9", 1, False)])
    await pub.close()
    msg = None
    deadline = time.monotonic() + 5
    while msg is None and time.monotonic() < deadline:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await client.aclose()
    assert msg is not None and msg["channel"] == b"chat.c9.tokens"
    assert parse_token(msg["data"], subject="chat.c9.tokens").sequence == 1


async def test_nats_core_with_the_dedup_header(nats_core: NatsServer) -> None:
    nc = await nats.connect(nats_core.url)
    got: asyncio.Queue[nats.aio.msg.Msg] = asyncio.Queue()

    async def received(msg: nats.aio.msg.Msg) -> None:
        await got.put(msg)

    await nc.subscribe("chat.*.tokens", cb=received)
    await flushed(nc)
    pub = make_publisher("nats", nats_url=nats_core.url, redis_url=None, nchan_url=None, stream_key="x")
    await pub.start()
    await pub.publish_batch([("c3", 4, False)])
    msg = await asyncio.wait_for(got.get(), 5)
    await pub.close()
    await nc.close()
    assert msg.subject == "chat.c3.tokens"
    assert msg.headers == {"Nats-Msg-Id": message_id("c3", 4)}
    assert parse_token(msg.data, subject=msg.subject).sequence == 4


async def test_an_unreachable_publisher_is_a_dependency_error(tmp_path: Path) -> None:
    pub = make_publisher(
        "redis-pubsub",
        nats_url=None,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        nchan_url=None,
        stream_key="x",
    )
    with pytest.raises(DependencyError, match="redis"):
        await pub.start()


def test_cli_with_an_unreachable_publisher_is_one_line_exit_1() -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "meshkit", "loadgen", "--target", "sse", "--url", "http://127.0.0.1:9"),
            *("--nats", f"nats://127.0.0.1:{free_port()}", "--duration", "1"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("meshkit loadgen: nats: cannot connect")
    assert "Traceback" not in result.stderr
