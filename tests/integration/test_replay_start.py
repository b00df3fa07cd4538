"""`replay_start()` on a real JetStream stream: where a resume's replay begins, found in about log2(span)
round trips, never after a token the resume needs (interleaved conversations, neighbours stored out of
order within the margin, an unreadable message)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from meshkit.edge.replay_start import replay_start
from meshkit.edge.token_contract import tokens_subject
from meshkit.edge.token_stream import ensure_stream
from meshkit.errors import HarnessError
from meshkit.harness.nats import NatsServer, nats_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    try:
        with nats_server(tmp_path_factory.mktemp("replay-start"), name="replay-start") as srv:
            yield srv
    except HarnessError as exc:
        pytest.skip(str(exc))


@pytest.fixture
async def nc(server: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(server.url)
    try:
        js = client.jetstream()
        await ensure_stream(js)
        await js.purge_stream("CHAT")
        yield client
    finally:
        await client.close()


class Counting:
    """A JetStreamContext whose get_msg calls are counted (the search's round trips)."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self.calls = 0

    async def get_msg(self, *args: Any, **kw: Any) -> Any:
        self.calls += 1
        return await self._js.get_msg(*args, **kw)


def raw(cid: str, seq: int) -> bytes:
    return json.dumps({"conversation_id": cid, "token": "t", "sequence": seq, "done": False}).encode()


async def read_from(js: JetStreamContext, subject: str, start: int) -> list[int]:
    """The token sequences of `subject` stored at stream sequence `start` or later, in stream order."""
    out: list[int] = []
    seq = start
    while True:
        try:
            msg = await js.get_msg("CHAT", seq=seq, subject=subject, next=True)
        except NotFoundError:
            return out
        with contextlib.suppress(ValueError):
            out.append(int(json.loads(msg.data or b"")["sequence"]))
        seq = int(msg.seq or seq) + 1


async def test_the_start_is_just_below_the_resume_point_and_found_in_log_steps(nc: Client) -> None:
    js = nc.jetstream()
    for seq in range(1, 3001):  # c1 interleaved with two other conversations
        await js.publish(tokens_subject("c1"), raw("c1", seq))
        await js.publish(tokens_subject("c2"), raw("c2", seq))
        if seq % 3 == 0:
            await js.publish(tokens_subject("c3"), raw("c3", seq))
    subject = tokens_subject("c1")
    span = (await js.stream_info("CHAT")).state.last_seq
    for after in (0, 1, 500, 1999, 2990, 3000, 5000):
        counting = Counting(js)
        start = await replay_start(counting, "CHAT", subject, after, margin=16)  # type: ignore[arg-type]
        assert start is not None
        got = await read_from(js, subject, start)
        assert [s for s in got if s > after] == list(range(after + 1, 3001)), after
        # at most the margin and one more read before the resume point (past the end: the last token)
        assert got[0] >= max(1, min(after, 3000) - 16 - 1), (after, got[:3])
        assert counting.calls <= 2 * math.ceil(math.log2(span)) + 3, (after, counting.calls)


async def test_neighbours_stored_out_of_order_within_the_margin_are_not_missed(nc: Client) -> None:
    js = nc.jetstream()
    order = [*range(1, 101), 103, 101, 102, *range(104, 201)]  # two bridges: 103 stored before 101
    for seq in order:
        await js.publish(tokens_subject("c1"), raw("c1", seq))
        await js.publish(tokens_subject("c2"), raw("c2", seq))
    start = await replay_start(js, "CHAT", tokens_subject("c1"), 102, margin=4)
    assert start is not None
    got = await read_from(js, tokens_subject("c1"), start)
    assert sorted(s for s in got if s > 102) == list(range(103, 201))


async def test_an_unreadable_message_keeps_the_start_on_the_safe_side(nc: Client) -> None:
    js = nc.jetstream()
    subject = tokens_subject("c1")
    for seq in range(1, 401):
        await js.publish(subject, raw("c1", seq))
        if seq in (150, 300):
            await js.publish(subject, b"not json")
    start = await replay_start(js, "CHAT", subject, 250, margin=8)
    assert start is not None
    got = await read_from(js, subject, start)
    assert [s for s in got if s > 250] == list(range(251, 401))


async def test_no_message_none_and_an_early_resume_starts_at_the_first(nc: Client) -> None:
    js = nc.jetstream()
    assert await replay_start(js, "CHAT", tokens_subject("nobody"), 10) is None
    for seq in range(5, 50):
        await js.publish(tokens_subject("c1"), raw("c1", seq))
    first = await js.get_msg("CHAT", seq=1, subject=tokens_subject("c1"), next=True)
    assert await replay_start(js, "CHAT", tokens_subject("c1"), 3) == first.seq


class SlowAfter(Counting):
    """get_msg answers late from its `fast`-th call on (a distant, congested leaf)."""

    def __init__(self, js: JetStreamContext, fast: int) -> None:
        super().__init__(js)
        self.fast = fast

    async def get_msg(self, *args: Any, **kw: Any) -> Any:
        if self.calls >= self.fast:
            await asyncio.sleep(0.5)
        return await super().get_msg(*args, **kw)


async def test_a_probe_that_overruns_ends_the_search_at_a_safe_start(nc: Client) -> None:
    js = nc.jetstream()
    subject = tokens_subject("c1")
    for seq in range(1, 2001):
        await js.publish(subject, raw("c1", seq))
    slow = SlowAfter(js, fast=4)  # the first, the last and two bisection probes answer in time
    started = time.monotonic()
    start = await replay_start(slow, "CHAT", subject, 1900, margin=8, probe_timeout=0.1)  # type: ignore[arg-type]
    assert time.monotonic() - started < 0.5  # one overrun probe, not the whole search
    assert start is not None
    got = await read_from(js, subject, start)
    assert [s for s in got if s > 1900] == list(range(1901, 2001))  # earlier than needed, never later
    assert len(got) > 100
    with pytest.raises(TimeoutError):  # nothing known yet: the caller's replay fails
        await replay_start(SlowAfter(js, fast=0), "CHAT", subject, 1900, probe_timeout=0.1)  # type: ignore[arg-type]
