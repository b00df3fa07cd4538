# ruff: noqa: F811 (fixtures imported from test_sse_support, used as arguments)
"""Token inspection through the real adapter (a process, NATS origin + leaf) with a real inspector (a NATS
responder in the test, on the leaf) and an audit subscriber: redaction and the inspector's replacement
change the delivered bytes for every viewer and for resumes alike (from memory and from JetStream), a
blocked token keeps its id (`event: blocked`, WebSocket `blocked` frame), the inspector is asked once
per message however many viewers watch, the audit tap copies what was delivered, the metrics are on
the adapter's /metrics, and an inspector that never answers blocks tokens fail closed
(`inspector_timeout`) and lets them through fail open."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import nats
import pytest
import websockets
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from meshkit.edge.token_contract import message_id, tokens_subject
from meshkit.harness.edge_daemons import SseAdapter, sse_adapter
from meshkit.harness.nats import NatsServer
from meshkit.nats_flush import flushed

from .test_sse_support import (  # noqa: F401 (fixtures)
    BASE_ARGS,
    SseReader,
    js,
    leaf,
    metric,
    new_cid,
    open_stream,
    origin,
    session,
    stream_created,
    token,
    until,
    workdir,
)

pytestmark = pytest.mark.integration

SUBJECT = "inspect.tokens"


@pytest.fixture(scope="module")
def adapter(workdir: Path, leaf: NatsServer, stream_created: None) -> Iterator[SseAdapter]:
    args = [
        *BASE_ARGS,
        "--history",
        "4",  # a resume from the start replays from JetStream
        "--redact",
        "email",
        "--inspector-subject",
        SUBJECT,
        "--inspector-timeout",
        "3",  # a loaded machine must not turn an answer into a (fail-closed) timeout
        "--audit",
    ]
    with sse_adapter(workdir, leaf.url, args, name="sse-inspect") as running:
        yield running


class Inspector:
    """The external inspector: blocks `pii`, replaces `secret`, allows the rest; counts requests."""

    def __init__(self) -> None:
        self.asked: Counter[int] = Counter()

    async def handle(self, msg: Msg) -> None:
        doc = json.loads(msg.data)
        self.asked[doc["sequence"]] += 1
        text = doc["token"]
        if text == "pii":
            reply = {"action": "block", "reason": "pii"}
        elif text == "secret":
            reply = {"action": "replace", "token": "[hidden]"}
        else:
            reply = {"action": "allow"}
        await msg.respond(json.dumps(reply).encode())


@pytest.fixture
async def inspector(leaf: NatsServer) -> AsyncIterator[Inspector]:
    nc = await nats.connect(leaf.url, connect_timeout=2, allow_reconnect=False)
    try:
        r = Inspector()
        await nc.subscribe(SUBJECT, cb=r.handle)
        await flushed(nc)
        yield r
    finally:
        await nc.close()


TEXTS = {1: "Hello ", 2: "mail eve@example.com now", 3: "pii", 4: "secret", 5: ""}


async def publish_answer(js: JetStreamContext, c: str) -> None:
    for seq, text in TEXTS.items():
        raw = token(c, seq, text=text, done=seq == 5)
        await js.publish(tokens_subject(c), raw, headers={"Nats-Msg-Id": message_id(c, seq)})


def shown(reader: SseReader) -> list[tuple[str, str | None, dict[str, object]]]:
    return [(e.event, e.id, json.loads(e.data)) for e in reader.events if e.event != "reset"]


async def test_every_viewer_and_every_resume_gets_the_inspected_bytes(
    adapter: SseAdapter,
    inspector: Inspector,
    leaf: NatsServer,
    js: JetStreamContext,
    session: aiohttp.ClientSession,
) -> None:
    c = new_cid()
    audit_nc = await nats.connect(leaf.url, connect_timeout=2, allow_reconnect=False)
    audited: list[bytes] = []

    async def copy(msg: Msg) -> None:
        audited.append(msg.data)

    await audit_nc.subscribe(f"audit.chat.{c}.tokens", cb=copy)
    await flushed(audit_nc)
    try:
        viewers = [await open_stream(session, adapter.stream_url(c)) for _ in range(3)]
        await until(lambda: metric(adapter, "meshkit_sse_open_streams") >= 3, what="three viewers")
        await publish_answer(js, c)
        for viewer in viewers:
            await viewer.until_end()
        live = shown(viewers[0])
        print("live:", live, "asked:", inspector.asked)  # shown when an assertion below fails
        assert all(shown(v) == live for v in viewers[1:])
        assert [(event, ident) for event, ident, _ in live] == [
            ("token", "1"),
            ("token", "2"),
            ("blocked", "3"),
            ("token", "4"),
            ("done", "5"),
        ]
        assert live[0][2]["token"] == "Hello "
        assert live[1][2]["token"] == "mail [redacted] now"
        assert live[2][2] == {"conversation_id": c, "sequence": 3, "reason": "pii"}
        assert live[3][2]["token"] == "[hidden]"
        assert b"eve@example.com" not in viewers[0].raw and b'"secret"' not in viewers[0].raw
        # asked once per message, not once per viewer (the done message has no text: not asked)
        assert inspector.asked == Counter({1: 1, 2: 1, 3: 1, 4: 1})
        for v in viewers:
            await v.close()

        # resumes: after id 2 (from memory), and from the start (JetStream: beyond --history 4)
        after_two = await open_stream(session, adapter.stream_url(c, last_event_id=2))
        from_start = await open_stream(session, adapter.stream_url(c))
        for reader in (after_two, from_start):
            await reader.until_end()
            await reader.close()
        assert shown(after_two) == live[2:]
        assert shown(from_start) == live

        # the audit tap: the delivered bytes (redacted, replaced), never the blocked token
        await until(lambda: len(audited) >= 4, what="audit copies")
        first_pass = [json.loads(a) for a in audited[:4]]
        assert [d["sequence"] for d in first_pass] == [1, 2, 4, 5]
        assert first_pass[1]["token"] == "mail [redacted] now" and first_pass[2]["token"] == "[hidden]"
    finally:
        await audit_nc.close()
    assert metric(adapter, "meshkit_sse_tokens_blocked_total", '{reason="pii"}') >= 1
    assert metric(adapter, "meshkit_sse_tokens_replaced_total", '{by="redaction"}') >= 1
    assert metric(adapter, "meshkit_sse_tokens_replaced_total", '{by="inspector"}') >= 1
    assert metric(adapter, "meshkit_sse_audit_published_total") >= 4


async def test_a_websocket_viewer_gets_the_blocked_frame_with_its_id(
    adapter: SseAdapter, inspector: Inspector, js: JetStreamContext
) -> None:
    c = new_cid()
    async with websockets.connect(f"ws://127.0.0.1:{adapter.port}/ws/{c}") as ws:
        await until(lambda: metric(adapter, "meshkit_sse_open_streams") >= 1, what="open")
        await publish_answer(js, c)
        frames = []
        async with asyncio.timeout(5):
            try:
                async for text in ws:
                    frames.append(json.loads(text))
            except websockets.ConnectionClosed:
                pass
    assert [(f["event"], f["id"]) for f in frames] == [
        ("token", 1),
        ("token", 2),
        ("blocked", 3),
        ("token", 4),
        ("done", 5),
    ]
    assert frames[1]["data"]["token"] == "mail [redacted] now"
    assert frames[2]["data"]["reason"] == "pii"


@pytest.mark.parametrize("fail", ["closed", "open"])
async def test_an_inspector_that_times_out_blocks_fail_closed_and_passes_fail_open(
    workdir: Path,
    leaf: NatsServer,
    js: JetStreamContext,
    session: aiohttp.ClientSession,
    fail: str,
) -> None:
    """The inspector is subscribed (so not `no_responders`) and never answers: each token with text
    waits --inspector-timeout, then fail closed blocks it (`inspector_timeout`, its id kept) and fail
    open delivers it as published; the done message (no text) is not asked and ends the stream."""
    c = new_cid()
    subject = f"inspect.silent.{fail}"
    asked: list[int] = []
    nc = await nats.connect(leaf.url, connect_timeout=2, allow_reconnect=False)

    async def never_answer(msg: Msg) -> None:
        asked.append(json.loads(msg.data)["sequence"])

    args = [*BASE_ARGS, "--inspector-subject", subject, "--inspector-timeout", "0.3"]
    try:
        await nc.subscribe(subject, cb=never_answer)
        await flushed(nc)
        with sse_adapter(
            workdir, leaf.url, [*args, "--inspector-fail", fail], name=f"sse-inspect-{fail}"
        ) as silent:
            reader = await open_stream(session, silent.stream_url(c))
            try:
                await until(lambda: metric(silent, "meshkit_sse_open_streams") >= 1, what="open")
                for seq, text in ((1, "Hello "), (2, "world"), (3, "")):
                    raw = token(c, seq, text=text, done=seq == 3)
                    await js.publish(tokens_subject(c), raw, headers={"Nats-Msg-Id": message_id(c, seq)})
                await reader.until_end(within=10)
            finally:
                await reader.close()
            timeouts = metric(silent, "meshkit_sse_inspector_failures_total", '{kind="timeout"}')
            blocked = metric(silent, "meshkit_sse_tokens_blocked_total", '{reason="inspector_timeout"}')
    finally:
        await nc.close()
    assert sorted(asked) == [1, 2]  # asked, never answered
    assert timeouts == 2
    got = [(e.event, e.id, json.loads(e.data)) for e in reader.events]
    if fail == "closed":
        assert [(event, ident) for event, ident, _ in got] == [
            ("blocked", "1"),
            ("blocked", "2"),
            ("done", "3"),
        ]
        assert got[0][2] == {"conversation_id": c, "sequence": 1, "reason": "inspector_timeout"}
        assert b"Hello" not in reader.raw and b"world" not in reader.raw
        assert blocked == 2
    else:
        assert [(event, ident) for event, ident, _ in got] == [("token", "1"), ("token", "2"), ("done", "3")]
        assert [doc["token"] for _, _, doc in got] == ["Hello ", "world", ""]
        assert blocked == 0
