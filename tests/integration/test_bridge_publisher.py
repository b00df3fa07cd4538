"""`AckWindow` (the bridge's JetStream publisher) against a real nats-server: PubAcks matched to their
messages, retries with the same `Nats-Msg-Id` when no stream answers or an ack does not come, a full
window that holds the reader back, JetStream refusals handed back (and dead-lettered by the bridge)."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client

from meshkit.edge.token_stream import ensure_stream
from meshkit.harness.nats import NatsServer, nats_server
from meshkit.harness.redis import RedisServer
from meshkit.harness.streaming import bridge, eventually, stored_count, stored_messages
from meshkit.sidecars.jetstream_publisher import AckWindow, Pending


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[NatsServer]:
    with nats_server(tmp_path / "nats", name="publisher-origin") as server:
        yield server


@pytest.fixture
async def nc(origin: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(origin.url)
    yield client
    await client.close()


class Outcomes:
    def __init__(self) -> None:
        self.done: list[tuple[str, bool]] = []
        self.rejected: list[tuple[str, str]] = []

    def on_done(self, p: Pending, duplicate: bool) -> None:
        self.done.append((p.msg_id, duplicate))

    def on_rejected(self, p: Pending, description: str) -> None:
        self.rejected.append((p.msg_id, description))


def window(nc: Client, outcomes: Outcomes, **kw: Any) -> AckWindow:
    return AckWindow(nc, on_done=outcomes.on_done, on_rejected=outcomes.on_rejected, **kw)


def body(seq: int) -> bytes:
    return json.dumps({"conversation_id": "w", "sequence": seq}).encode()


@pytest.mark.parametrize("hooks", [True, False], ids=["private-hooks", "public-api"])
async def test_acks_are_matched_and_a_resend_is_a_duplicate(
    nc: Client, origin: NatsServer, hooks: bool
) -> None:
    await ensure_stream(nc.jetstream())
    out = Outcomes()
    w = window(nc, out, max_inflight=64, private_hooks=hooks)
    await w.start()
    assert w.fast_acks is hooks and w.raw_writes is hooks  # nats-py 2.16's hooks fit: used when allowed
    for seq in range(200):
        assert await w.wait_for_room(5)
        await w.publish("chat.w.tokens", body(seq), f"w:{seq}", seq)
    await w.publish("chat.w.tokens", body(7), "w:7", "again")  # the same Nats-Msg-Id once more
    assert await w.drain(5) == 0
    assert sorted(out.done) == sorted([(f"w:{s}", False) for s in range(200)] + [("w:7", True)])
    assert (w.stats.published, w.stats.duplicates) == (200, 1)
    assert [m.data for m in await stored_messages(origin.url)] == [body(s) for s in range(200)]
    await w.close()
    assert not w.fast_acks and getattr(nc._process_msg, "__self__", None) is nc  # nats-py's own hook
    assert "_process_msg" not in vars(nc)


class LaterNats(Client):
    """nats-py as a later release might have it: `_process_msg` with another signature (nats-py's
    parser would call the window's 5-argument wrapper wrongly) and `_send_command` too."""

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes, *, trace: Any = None
    ) -> None:
        await super()._process_msg(sid, subject, reply, data, headers)

    async def _send_command(self, command: bytes, priority: bool = False) -> None:
        await super()._send_command(command, priority)


async def test_hooks_of_another_shape_are_not_used_and_the_public_api_still_stores_each_once(
    origin: NatsServer,
) -> None:
    later = LaterNats()
    await later.connect(origin.url)
    try:
        await ensure_stream(later.jetstream())
        out = Outcomes()
        w = window(later, out, max_inflight=32)
        await w.start()
        assert not w.fast_acks and not w.raw_writes  # refused: nats-py's own paths are used
        for seq in range(100):
            assert await w.wait_for_room(5)
            await w.publish("chat.w.tokens", body(seq), f"w:{seq}", seq)
        await w.publish("chat.w.tokens", body(3), "w:3", "again")
        assert await w.drain(5) == 0
        assert sorted(out.done) == sorted([(f"w:{s}", False) for s in range(100)] + [("w:3", True)])
        await w.close()
    finally:
        await later.close()


@pytest.mark.parametrize("hooks", [True, False], ids=["private-hooks", "public-api"])
async def test_without_a_stream_publishes_are_retried_until_one_exists(
    nc: Client, origin: NatsServer, hooks: bool
) -> None:
    out = Outcomes()
    w = window(nc, out, retry_backoff=0.05, max_backoff=0.1, private_hooks=hooks)
    await w.start()
    for seq in range(10):
        await w.publish("chat.w.tokens", body(seq), f"w:{seq}", seq)

    async def retried() -> bool:
        return w.stats.retries["no_responders"] >= 20

    await eventually(retried, "no-responder retries")
    assert out.done == [] and len(w) == 10  # kept, not dropped
    await ensure_stream(nc.jetstream())
    assert await w.drain(5) == 0
    assert sorted(out.done) == [(f"w:{s}", False) for s in range(10)]
    await w.close()


async def test_lost_acks_time_out_and_are_sent_again_once_stored(nc: Client, origin: NatsServer) -> None:
    await ensure_stream(nc.jetstream())
    out = Outcomes()
    w = window(nc, out, max_inflight=8, ack_timeout=0.3, retry_backoff=0.05, max_backoff=0.1)
    await w.start()
    origin.process.signal(signal.SIGSTOP)
    try:
        for seq in range(8):
            await w.publish("chat.w.tokens", body(seq), f"w:{seq}", seq)
        assert not await w.wait_for_room(0.5)  # a full window holds the caller back, with a deadline
        await asyncio.sleep(0.3)
    finally:
        origin.process.signal(signal.SIGCONT)
    assert await w.drain(10) == 0
    assert w.stats.retries["timeout"] >= 8
    assert {msg_id for msg_id, _ in out.done} == {f"w:{s}" for s in range(8)}
    assert await stored_count(origin.url) == 8  # sent two or more times, stored once
    await w.close()


async def test_a_message_jetstream_refuses_is_handed_back_after_the_retries(
    nc: Client, origin: NatsServer
) -> None:
    await ensure_stream(nc.jetstream())  # max_msg_size 64 KiB
    out = Outcomes()
    w = window(nc, out, retry_backoff=0.01, max_rejections=3)
    await w.start()
    await w.publish("chat.w.tokens", b"x" * (100 * 1024), "w:big", None)
    assert await w.drain(5) == 0
    assert len(out.rejected) == 1 and out.rejected[0][0] == "w:big"
    assert "maximum" in out.rejected[0][1].lower() or "size" in out.rejected[0][1].lower()
    assert w.stats.rejected == 1 and w.stats.retries["error"] == 2
    await w.close()


async def test_the_bridge_dead_letters_and_acks_an_entry_jetstream_refuses(
    tmp_path: Path, redis: RedisServer, inspect: aioredis.Redis, origin: NatsServer, nc: Client
) -> None:
    letters: list[dict[str, Any]] = []

    async def on_letter(msg: Any) -> None:
        letters.append(json.loads(msg.data))

    await nc.subscribe("chat.deadletter", cb=on_letter)
    big = json.dumps({"conversation_id": "big", "sequence": 1, "token": "y" * 100_000}).encode()
    await inspect.xadd("chat.tokens", {"data": big})
    with bridge(tmp_path, redis.url, origin.url, ["--source", "stream", "--consumer", "x"]) as b:
        b.wait_ready()

        async def lettered() -> bool:
            return bool(letters)

        await eventually(lettered, "a dead letter for the refused entry")
        assert letters[0]["reason"] == "rejected" and "JetStream refused it" in letters[0]["detail"]
        assert json.loads(letters[0]["data"])["conversation_id"] == "big"

        async def acked() -> bool:
            return int((await inspect.xpending("chat.tokens", "meshkit-bridge"))["pending"]) == 0

        await eventually(acked, "the refused entry acknowledged")
        assert b.metric("meshkit_bridge_deadlettered_total", reason="rejected") == 1
