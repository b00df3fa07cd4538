"""The hub's direct writes (`ConversationHub._wake` -> `viewer.feed`): a viewer whose framing fails (a
bug) is cut off with a logged reason, and the other viewers of the conversation still get the token."""

from __future__ import annotations

import asyncio
import json

from prometheus_client import CollectorRegistry

from meshkit.edge.conversation_hub import Conversation, ConversationHub, HubMetrics, HubSettings
from meshkit.edge.conversation_log import ConversationLog
from meshkit.edge.loadgen_sse_parser import SseParser
from meshkit.edge.sse_format import SseFramer
from meshkit.edge.token_contract import TokenMessage, parse_token
from meshkit.edge.viewer import Viewer, pump


def tok(seq: int) -> TokenMessage:
    raw = {"conversation_id": "c1", "token": f"t{seq}", "sequence": seq, "done": False}
    return parse_token(json.dumps(raw).encode())


class Sink:
    def __init__(self) -> None:
        self.out = bytearray()

    def ready(self) -> bool:
        return True

    def write(self, data: bytes) -> None:
        self.out.extend(data)


class BrokenFramer(SseFramer):
    def token(self, message: TokenMessage) -> bytes:
        if message.sequence == 2:
            raise RuntimeError("a framing bug")
        return super().token(message)


async def _parked(viewer: Viewer, log: ConversationLog, framer: SseFramer, sink: Sink) -> asyncio.Task[str]:
    async def write(data: bytes) -> None:
        sink.write(data)

    async def replay(conversation_id: str, after: int | None, until: int) -> list[TokenMessage]:
        return []

    task = asyncio.ensure_future(
        pump(viewer, log, framer, write, replay=replay, heartbeat=10, retry_ms=250, sink=sink)
    )
    for _ in range(20):
        await asyncio.sleep(0)
    assert viewer.direct is not None, "the pump is parked"
    return task


async def test_a_viewer_whose_framing_fails_is_cut_and_the_others_still_get_the_token() -> None:
    cuts: list[tuple[Viewer, str]] = []
    hub = ConversationHub(
        None,  # type: ignore[arg-type]  # deliver() never asks JetStream
        HubSettings(),
        HubMetrics.create(CollectorRegistry()),
        on_cut=lambda viewer, reason: cuts.append((viewer, reason)),
    )
    conv = Conversation("c1", ConversationLog(16))
    hub.deliver(conv, tok(1))
    bad, good = Viewer("c1", None), Viewer("c1", None)
    bad_sink, good_sink = Sink(), Sink()
    tasks = [
        await _parked(bad, conv.log, BrokenFramer(1000), bad_sink),
        await _parked(good, conv.log, SseFramer(1000), good_sink),
    ]
    conv.viewers |= {bad, good}
    hub.deliver(conv, tok(2))  # raised out of _wake before, and the good viewer never got it
    assert [e.id for e in SseParser().feed(bytes(good_sink.out)) if e.event == "token"] == ["1", "2"]
    assert cuts == [(bad, "internal error (logged)")] and bad.cut_reason == "internal error (logged)"
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
