"""`meshkit.nats_flush.flushed` against a real nats-server: a subscription is known to the server
when it returns (nats-py's own `flush()` lets its PING overtake the buffered SUB: a request from
another connection right after it was answered "no responders" a few times in a hundred)."""

from __future__ import annotations

import nats
from nats.aio.msg import Msg
from nats.errors import NoRespondersError

from meshkit.harness.nats import NatsServer
from meshkit.nats_flush import flushed


async def test_a_subscription_is_on_the_server_when_flushed_returns(core_nats: NatsServer) -> None:
    responder = await nats.connect(core_nats.url, allow_reconnect=False)
    asker = await nats.connect(core_nats.url, allow_reconnect=False)

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
