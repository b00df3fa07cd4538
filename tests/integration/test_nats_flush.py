"""`meshkit.nats_flush.flushed` against a real nats-server: a subscription is known to the server
when it returns (nats-py's own `flush()` lets its PING overtake the buffered SUB: a request from
another connection right after it was answered "no responders" a few times in a hundred)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg
from nats.errors import NoRespondersError

from meshkit.errors import HarnessError
from meshkit.harness.nats import NatsServer, nats_server, nats_server_binary
from meshkit.nats_flush import flushed


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    try:
        nats_server_binary()
    except HarnessError as exc:
        pytest.skip(str(exc))
    with nats_server(tmp_path, jetstream=False) as srv:
        yield srv


async def test_a_subscription_is_on_the_server_when_flushed_returns(server: NatsServer) -> None:
    responder = await nats.connect(server.url, allow_reconnect=False)
    asker = await nats.connect(server.url, allow_reconnect=False)

    async def answer(msg: Msg) -> None:
        await msg.respond(b"ok")

    missed = []
    try:
        for i in range(300):
            sub = await responder.subscribe(f"flushed.{i}", cb=answer)
            await flushed(responder)
            try:
                assert (await asker.request(f"flushed.{i}", b"?", timeout=2)).data == b"ok"
            except NoRespondersError:
                missed.append(i)
            await sub.unsubscribe()
    finally:
        await asker.close()
        await responder.close()
    assert missed == []
