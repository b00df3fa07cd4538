"""`meshkit loadgen --target sse` against the real `meshkit sse` on a NATS leaf, tokens published to the
origin (stored by the CHAT stream with Nats-Msg-Id): every token once, the adapter's CPU/RSS sampled."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from meshkit.cli import COMMANDS
from meshkit.edge.loadgen import LoadgenOptions, run_loadgen
from meshkit.edge.token_stream import ensure_stream
from meshkit.harness.nats import NatsServer, nats_server

pytestmark = pytest.mark.skipif("sse" not in COMMANDS, reason="meshkit sse is not registered in the CLI yet")


@pytest.fixture(scope="module")
def origin_and_leaf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, NatsServer]]:
    workdir = tmp_path_factory.mktemp("nats")
    with (
        nats_server(workdir, name="lg-origin") as origin,
        nats_server(workdir, jetstream=False, leaf_remote=origin.leaf_url, name="lg-leaf") as leaf,
    ):
        yield origin, leaf


async def test_every_token_once_through_meshkit_sse(
    origin_and_leaf: tuple[NatsServer, NatsServer], tmp_path: Path
) -> None:
    from meshkit.harness.edge_daemons import sse_adapter

    origin, leaf = origin_and_leaf
    nc = await nats.connect(origin.url)
    try:
        await ensure_stream(nc.jetstream())
    finally:
        await nc.close()
    with sse_adapter(tmp_path, leaf.url, js_domain=origin.domain) as adapter:
        report = await run_loadgen(
            LoadgenOptions(
                target="sse",
                url=adapter.url,
                nats=origin.url,
                conversations=10,
                viewers=3,
                rate=150,
                duration=2,
                target_pids=(adapter.process.pid,),
                progress=False,
            )
        )
    m = report["messages"]
    assert m["exactly_once_in_order"] is True, (m, report["error_samples"])
    assert m["expected"] == 3 * (report["publish"]["tokens"] + 10)
    assert report["streams"]["outcomes"]["done"] == 30
    assert report["latency_ms"]["count"] == m["delivered"]
    assert report["target"]["cpu_percent"] is not None and report["target"]["rss_bytes_max"] > 0
