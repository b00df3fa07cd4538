"""`ensure_mirror` on a real origin + leaf pair, the leaf with JetStream of its own (domain edge): the
edge's copy of CHAT@origin is created once, left as an operator tuned it, and a stream of that name
that follows something else is refused instead of read."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig

from meshkit.edge.edge_mirror import MirrorSource, ensure_mirror
from meshkit.edge.token_stream import ensure_stream
from meshkit.errors import HarnessError
from meshkit.harness.nats import NatsServer, nats_server

pytestmark = pytest.mark.integration

SOURCE = MirrorSource("CHAT", "origin")


@pytest.fixture
def leaf(tmp_path: Path) -> Iterator[NatsServer]:
    try:
        with (
            nats_server(tmp_path, name="mirror-origin") as origin,
            nats_server(tmp_path, name="mirror-edge", domain="edge", leaf_remote=origin.leaf_url) as edge,
        ):
            yield edge
    except HarnessError as exc:
        pytest.skip(str(exc))


@pytest.fixture
async def nc(leaf: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(leaf.url)
    try:
        await ensure_stream(client.jetstream(domain="origin", timeout=5))
        yield client
    finally:
        await client.close()


async def test_created_once_then_left_as_an_operator_tuned_it(nc: Client) -> None:
    edge = nc.jetstream(domain="edge", timeout=5)
    created = await ensure_mirror(edge, "CHAT_EDGE", SOURCE)
    assert created.mirror is not None and created.mirror.name == "CHAT"
    assert created.mirror.external is not None and created.mirror.external.api == "$JS.origin.API"
    assert not created.subjects  # a mirror takes no publishes of its own
    info = await edge.stream_info("CHAT_EDGE")
    await edge.update_stream(dataclasses.replace(info.config, max_age=3600.0))
    again = await ensure_mirror(edge, "CHAT_EDGE", SOURCE)
    assert again.max_age == 3600.0  # not reset to the defaults
    await nc.jetstream(domain="origin").publish("chat.c1.tokens", b'{"sequence": 1}')
    for _ in range(100):
        if (await edge.stream_info("CHAT_EDGE")).state.messages == 1:
            break
        await asyncio.sleep(0.05)
    assert (await edge.get_last_msg("CHAT_EDGE", "chat.c1.tokens")).data == b'{"sequence": 1}'


async def test_a_stream_of_that_name_that_is_no_such_mirror_is_refused(nc: Client) -> None:
    edge = nc.jetstream(domain="edge", timeout=5)
    await edge.add_stream(StreamConfig(name="PLAIN", subjects=["elsewhere.>"]))
    with pytest.raises(ValueError, match=r"'PLAIN' exists and mirrors nothing, not CHAT@origin"):
        await ensure_mirror(edge, "PLAIN", SOURCE)
    await ensure_mirror(edge, "OTHER", MirrorSource("AUDIT", "origin"))
    with pytest.raises(ValueError, match=r"'OTHER' exists and mirrors AUDIT via \$JS\.origin\.API"):
        await ensure_mirror(edge, "OTHER", SOURCE)
