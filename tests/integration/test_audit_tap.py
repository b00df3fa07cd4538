"""The audit tap through TokenInspection, against a real nats-server: what a real subscriber receives on
`audit.chat.<id>.tokens` (the delivered bytes, redacted; blocked tokens not copied), a custom template,
drops when the queue is full, and delivery that never waits on a NATS server that stopped reading
(SIGSTOP)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, generate_latest

from meshkit.edge.token_contract import TokenMessage, parse_token
from meshkit.edge.token_inspection import TokenInspection, TokenInspectionOptions
from meshkit.harness.nats import NatsServer
from meshkit.nats_flush import flushed

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(core_nats: NatsServer) -> AsyncIterator[Client]:
    nc = await nats.connect(core_nats.url, connect_timeout=2, allow_reconnect=False)
    yield nc
    if not nc.is_closed:
        await nc.close()


class Received:
    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.arrived = asyncio.Event()
        self.expected = 0

    async def handle(self, msg: Msg) -> None:
        self.messages.append((msg.subject, msg.data))
        if len(self.messages) >= self.expected:
            self.arrived.set()

    async def wait_for(self, count: int) -> None:
        """Until `count` messages have arrived; TimeoutError after 5 s."""
        self.expected = count
        if len(self.messages) < count:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 5.0)


async def audit_subscriber(url: str, subject: str) -> tuple[Client, Received]:
    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
    received = Received()
    await nc.subscribe(subject, cb=received.handle, pending_msgs_limit=100_000)
    await flushed(nc)
    return nc, received


def message(token: str, sequence: int, conversation: str = "c1", **extra: Any) -> TokenMessage:
    raw = {"conversation_id": conversation, "token": token, "sequence": sequence, "done": False, **extra}
    return parse_token(json.dumps(raw).encode())


async def test_delivered_bytes_reach_the_audit_subject(core_nats: NatsServer, client: Client) -> None:
    sub, received = await audit_subscriber(core_nats.url, "audit.chat.*.tokens")
    try:
        inspection = TokenInspection(TokenInspectionOptions(audit=True, redact=("email",)))
        await inspection.start(client)
        plain = message("Hello", 1)
        redacted = message("x@y.io", 2)
        other = message("Hi", 1, conversation="c-2_b")
        results = [await inspection.check(m) for m in (plain, redacted, other)]
        await received.wait_for(3)
        assert received.messages == [
            ("audit.chat.c1.tokens", plain.raw),
            ("audit.chat.c1.tokens", results[1].raw),
            ("audit.chat.c-2_b.tokens", other.raw),
        ]
        assert json.loads(received.messages[1][1])["token"] == "[redacted]"
        await inspection.close()
        assert inspection.tap is not None and inspection.tap.published == 3
    finally:
        await sub.close()


async def test_blocked_tokens_are_not_copied(core_nats: NatsServer, client: Client) -> None:
    """Fail closed with no inspector listening: every token is blocked, none reaches the audit."""
    sub, received = await audit_subscriber(core_nats.url, "audit.>")
    try:
        inspection = TokenInspection(
            TokenInspectionOptions(audit=True, inspector_subject="nobody.listens", inspector_fail="closed")
        )
        await inspection.start(client)
        assert (await inspection.check(message("Hello", 1))).blocked
        done = parse_token(b'{"conversation_id":"c1","sequence":2,"done":true}')
        assert not (await inspection.check(done)).blocked  # empty token: not inspected, still copied
        await received.wait_for(1)
        await flushed(client)
        assert received.messages == [("audit.chat.c1.tokens", done.raw)]
    finally:
        await sub.close()


async def test_a_template_without_the_placeholder_and_one_with_it_elsewhere(
    core_nats: NatsServer, client: Client
) -> None:
    sub, received = await audit_subscriber(core_nats.url, "audit.>")
    try:
        for template, expected in (("audit.all", "audit.all"), ("audit.{conversation_id}", "audit.c1")):
            inspection = TokenInspection(TokenInspectionOptions(audit=True, audit_subject=template))
            await inspection.start(client)
            before = len(received.messages)
            await inspection.check(message("t", 1))
            await inspection.close()
            await received.wait_for(before + 1)
            assert received.messages[-1][0] == expected
    finally:
        await sub.close()


async def test_a_full_queue_drops_and_counts(core_nats: NatsServer, client: Client) -> None:
    sub, received = await audit_subscriber(core_nats.url, "audit.>")
    try:
        inspection = TokenInspection(TokenInspectionOptions(audit=True, audit_queue_size=3))
        await inspection.start(client)
        for n in range(10):  # no await inside check() yields here: the tap's task cannot run in between
            await inspection.check(message(f"t{n}", n))
        tap = inspection.tap
        assert tap is not None and tap.dropped["queue_full"] == 7 and tap.queued == 3
        await received.wait_for(3)
        assert [json.loads(data)["token"] for _, data in received.messages] == ["t0", "t1", "t2"]
        registry = CollectorRegistry()
        for collector in inspection.collectors():
            registry.register(collector)
        text = generate_latest(registry).decode()
        assert 'meshkit_sse_audit_dropped_total{reason="queue_full"} 7.0' in text
        assert "meshkit_sse_audit_published_total 3.0" in text
        await inspection.close()
    finally:
        await sub.close()


async def test_delivery_never_waits_on_a_nats_that_stopped_reading(
    core_nats: NatsServer, client: Client
) -> None:
    inspection = TokenInspection(TokenInspectionOptions(audit=True, audit_queue_size=1_000))
    await inspection.start(client)
    filler = "x" * 1024
    slowest = 0.0
    core_nats.process.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        for n in range(20_000):  # ~20 MiB: far past the kernel buffers and nats-py's 2 MiB
            t0 = time.monotonic()
            result = await inspection.check(message(filler, n))
            slowest = max(slowest, time.monotonic() - t0)
            assert result.raw is not None
            if n % 500 == 0:
                await asyncio.sleep(0.002)  # let the tap's task run: it must stop, not block
        took = time.monotonic() - started
        tap = inspection.tap
        assert tap is not None
        assert tap.dropped["queue_full"] > 0
        assert tap.queued <= 1_000
        assert client.pending_data_size <= 2 * 1024 * 1024 + 64 * 1024
        assert slowest < 0.05, slowest
        assert took < 10, took
        close_started = time.monotonic()
        await inspection.close()
        assert time.monotonic() - close_started < 2.0  # bounded, although NATS reads nothing
        assert tap.dropped["closed"] > 0
    finally:
        core_nats.process.signal(signal.SIGCONT)
