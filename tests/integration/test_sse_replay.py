"""The hub's replay (a resume below the memory log, a gap fill) on a real origin + leaf: it starts near
the asked-for token (`replay_start`), so a resume near the end of a long conversation reads about the
search margin, not the whole conversation, and still returns every token after the resume point."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from meshkit.edge.conversation_hub import ConversationHub, HubMetrics, HubSettings
from meshkit.edge.replay_start import DEFAULT_MARGIN
from meshkit.edge.token_stream import ensure_stream
from meshkit.errors import HarnessError
from meshkit.harness.nats import NatsServer, nats_server

from .test_sse_support import publish

pytestmark = pytest.mark.integration

TOKENS = 3000


class CountingJs:
    """The leaf's JetStreamContext, counting the messages every pull consumer fetched."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self.fetched = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._js, name)

    async def pull_subscribe(self, *args: Any, **kw: Any) -> Any:
        psub = await self._js.pull_subscribe(*args, **kw)
        fetch = psub.fetch

        async def counted(*a: Any, **k: Any) -> Any:
            msgs = await fetch(*a, **k)
            self.fetched += len(msgs)
            return msgs

        psub.fetch = counted  # type: ignore[method-assign]
        return psub


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, NatsServer]]:
    workdir: Path = tmp_path_factory.mktemp("replay")
    try:
        with (
            nats_server(workdir, name="replay-origin") as origin,
            nats_server(workdir, jetstream=False, leaf_remote=origin.leaf_url, name="replay-leaf") as leaf,
        ):
            yield origin, leaf
    except HarnessError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def stored(servers: tuple[NatsServer, NatsServer]) -> None:
    async def store() -> None:
        nc = await nats.connect(servers[0].url)
        try:
            js = nc.jetstream()
            await ensure_stream(js)
            for begin in range(1, TOKENS + 1, 100):  # c1 interleaved with c2
                await publish(js, "c1", range(begin, begin + 100), done_at=TOKENS)
                await publish(js, "c2", range(begin, begin + 100))
        finally:
            await nc.close()

    asyncio.run(store())


@pytest.fixture
async def hub(
    servers: tuple[NatsServer, NatsServer], stored: None
) -> AsyncIterator[tuple[ConversationHub, CountingJs]]:
    nc = await nats.connect(servers[1].url)  # the leaf, as the adapter does
    js = CountingJs(nc.jetstream(domain="origin"))
    hub = ConversationHub(js, HubSettings(), HubMetrics.create(CollectorRegistry()))  # type: ignore[arg-type]
    try:
        yield hub, js
    finally:
        await hub.close()
        await nc.close()


@pytest.mark.parametrize("after", [2950, 2000, 1])
async def test_a_resume_reads_from_near_its_point_not_from_the_first_token(
    hub: tuple[ConversationHub, CountingJs], after: int
) -> None:
    h, js = hub
    tokens = await h.replay("c1", after, 10**9)
    assert [t.sequence for t in tokens] == list(range(after + 1, TOKENS + 1))
    wanted = TOKENS - after
    assert wanted <= js.fetched <= wanted + DEFAULT_MARGIN + 1, js.fetched  # was every token up to it


async def test_a_late_viewer_still_gets_the_conversation_from_its_first_token(
    hub: tuple[ConversationHub, CountingJs],
) -> None:
    h, _ = hub
    tokens = await h.replay("c1", None, 1001)
    assert [t.sequence for t in tokens] == list(range(1, 1001))
    assert await h.replay("nobody", 5, 10**9) == []
