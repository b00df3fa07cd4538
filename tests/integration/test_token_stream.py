"""The shared CHAT stream config against a real nats-server with JetStream."""

from __future__ import annotations

from collections.abc import Iterator

import nats
import pytest
from nats.js.api import StreamConfig

from meshkit.edge.token_contract import message_id
from meshkit.edge.token_stream import ensure_stream
from meshkit.harness.nats import NatsServer, nats_server


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with nats_server(tmp_path_factory.mktemp("nats"), name="stream-origin") as server:
        yield server


async def test_created_once_with_dedup_and_outside_subjects_not_stored(origin: NatsServer) -> None:
    nc = await nats.connect(origin.url)
    try:
        js = nc.jetstream()
        first = await ensure_stream(js)
        again = await ensure_stream(js)  # exists: left as is
        assert first.subjects == again.subjects == ["chat.*.tokens"]
        assert first.duplicate_window == 120.0
        headers = {"Nats-Msg-Id": message_id("c1", 1)}
        ack1 = await js.publish("chat.c1.tokens", b"{}", headers=headers)
        ack2 = await js.publish("chat.c1.tokens", b"{}", headers=headers)
        assert ack1.seq == ack2.seq and ack2.duplicate is True
        info = await js.stream_info("CHAT")
        assert info.state.messages == 1
    finally:
        await nc.close()


async def test_a_stream_of_that_name_without_the_subjects_is_refused(origin: NatsServer) -> None:
    nc = await nats.connect(origin.url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="OTHER", subjects=["other.>"]))
        with pytest.raises(ValueError, match="would store no tokens"):
            await ensure_stream(js, "OTHER")
    finally:
        await nc.close()
