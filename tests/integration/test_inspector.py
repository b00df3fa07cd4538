"""The external token inspector through TokenInspection, against a real nats-server and a real responder
in the test: allow, replace, block (with a reason kept or turned into `other`), slow (timeout, failing
open and closed), no responders, garbage replies, the in-flight bound, redaction after a replacement,
and the metrics as Prometheus text."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, generate_latest

from meshkit.edge.token_contract import TokenMessage, parse_token
from meshkit.edge.token_inspection import TokenInspection, TokenInspectionOptions
from meshkit.errors import HarnessError
from meshkit.harness.nats import NatsServer, nats_server, nats_server_binary
from meshkit.nats_flush import flushed

pytestmark = pytest.mark.integration

SUBJECT = "inspect.tokens"
TIMEOUT = 0.2


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    try:
        nats_server_binary()
    except HarnessError as exc:
        pytest.skip(str(exc))
    with nats_server(tmp_path_factory.mktemp("nats-inspector"), jetstream=False) as srv:
        yield srv


class Responder:
    """A real inspector: its answer depends on the token it is asked about."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.concurrent = 0
        self.max_concurrent = 0

    async def handle(self, msg: Msg) -> None:
        self.requests.append(msg.data)
        token = json.loads(msg.data)["token"]
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            reply: Any
            if token.startswith("slow"):
                await asyncio.sleep(TIMEOUT * 2.5)
                reply = {"action": "allow"}
            elif token == "secret":
                reply = {"action": "replace", "token": "[hidden by inspector]"}
            elif token == "leak":
                reply = {"action": "replace", "token": "mail me at eve@example.com"}
            elif token == "pii":
                reply = {"action": "block", "reason": "pii"}
            elif token == "prose":
                reply = {"action": "block", "reason": "Contains Bad Words!"}
            elif token == "garbage":
                reply = b"\xff not json"
            elif token == "array":
                reply = [1, 2]
            elif token == "unknown-action":
                reply = {"action": "maybe"}
            elif token == "replace-without-token":
                reply = {"action": "replace"}
            elif token == "wide":  # 40,000 characters, 80,000 bytes of UTF-8: over the 64 KiB
                reply = {"action": "replace", "token": "\u00e9" * 40_000}
            elif token == "surrogate":  # JSON can say it; UTF-8 cannot
                reply = {"action": "replace", "token": "\ud800"}
            else:
                reply = {"action": "allow"}
            await msg.respond(reply if isinstance(reply, bytes) else json.dumps(reply).encode())
        finally:
            self.concurrent -= 1


@pytest.fixture
async def responder(server: NatsServer) -> AsyncIterator[Responder]:
    nc = await nats.connect(server.url, connect_timeout=2, allow_reconnect=False)
    try:
        r = Responder()
        await nc.subscribe(SUBJECT, cb=r.handle, pending_msgs_limit=10_000)
        await flushed(nc)
        yield r
    finally:
        await nc.close()


@pytest.fixture
async def client(server: NatsServer) -> AsyncIterator[Client]:
    nc = await nats.connect(server.url, connect_timeout=2, allow_reconnect=False)
    yield nc
    await nc.close()


async def inspection(nc: Client, **options: Any) -> TokenInspection:
    i = TokenInspection(
        TokenInspectionOptions(inspector_subject=SUBJECT, inspector_timeout=TIMEOUT, **options)
    )
    await i.start(nc)
    return i


def message(token: str, sequence: int = 1, **extra: Any) -> TokenMessage:
    raw = json.dumps({"conversation_id": "c1", "token": token, "sequence": sequence, "done": False, **extra})
    return parse_token(raw.encode())


async def test_allow_delivers_the_raw_bytes_and_the_inspector_got_them(
    client: Client, responder: Responder
) -> None:
    i = await inspection(client)
    msg = message("Hello", model="m")
    result = await i.check(msg)
    assert result.raw is msg.raw and not result.changed
    assert responder.requests == [msg.raw]


async def test_replace_and_block(client: Client, responder: Responder) -> None:
    i = await inspection(client)
    replaced = await i.check(message("secret", ts=1.5))
    assert replaced.changed and replaced.raw is not None
    assert json.loads(replaced.raw) == {
        "conversation_id": "c1",
        "token": "[hidden by inspector]",
        "sequence": 1,
        "done": False,
        "ts": 1.5,
    }
    blocked = await i.check(message("pii"))
    assert blocked.blocked and blocked.reason == "pii"
    prose = await i.check(message("prose"))
    assert prose.blocked and prose.reason == "other"  # free text never becomes a label
    assert i.blocked == {"pii": 1, "other": 1} and i.replaced["inspector"] == 1


async def test_a_blocked_done_message_still_ends_the_stream(client: Client, responder: Responder) -> None:
    i = await inspection(client)
    raw = b'{"conversation_id":"c1","token":"pii","sequence":4,"done":true,"usage":{"n":4}}'
    result = await i.check(parse_token(raw))
    assert not result.blocked and result.changed and result.reason == "pii" and result.raw is not None
    assert json.loads(result.raw) == {
        "conversation_id": "c1",
        "token": "",
        "sequence": 4,
        "done": True,
        "usage": {"n": 4},
    }
    assert i.blocked == {"pii": 1}


async def test_redaction_runs_over_the_inspectors_replacement(client: Client, responder: Responder) -> None:
    i = await inspection(client, redact=("email",))
    result = await i.check(message("leak"))
    assert result.raw is not None and json.loads(result.raw)["token"] == "mail me at [redacted]"


async def test_an_empty_token_is_not_sent_to_the_inspector(client: Client, responder: Responder) -> None:
    i = await inspection(client, inspector_fail="closed")
    done = parse_token(b'{"conversation_id":"c1","sequence":9,"done":true}')
    assert (await i.check(done)).raw == done.raw
    assert responder.requests == []


@pytest.mark.parametrize("fail", ["open", "closed"])
async def test_a_slow_inspector_times_out_within_the_deadline(
    client: Client, responder: Responder, fail: str
) -> None:
    i = await inspection(client, inspector_fail=fail)
    msg = message("slow")
    started = time.monotonic()
    result = await i.check(msg)
    took = time.monotonic() - started
    assert TIMEOUT * 0.9 <= took < TIMEOUT + 0.15, took
    if fail == "open":
        assert result.raw is msg.raw
    else:
        assert result.blocked and result.reason == "inspector_timeout"
    assert i.inspector is not None and i.inspector.failures["timeout"] == 1


@pytest.mark.parametrize("fail", ["open", "closed"])
async def test_no_responders_fails_at_once(client: Client, fail: str) -> None:
    i = await inspection(client, inspector_fail=fail)
    started = time.monotonic()
    result = await i.check(message("Hello"))
    assert time.monotonic() - started < TIMEOUT / 2  # NATS says so at once: no waiting for the timeout
    assert result.blocked == (fail == "closed")
    if fail == "closed":
        assert result.reason == "inspector_no_responders"
    assert i.inspector is not None and i.inspector.failures["no_responders"] == 1


@pytest.mark.parametrize(
    "token", ["garbage", "array", "unknown-action", "replace-without-token", "wide", "surrogate"]
)
async def test_bad_replies_fail_by_the_mode(client: Client, responder: Responder, token: str) -> None:
    closed = await inspection(client, inspector_fail="closed")
    result = await closed.check(message(token))
    assert result.blocked and result.reason == "inspector_bad_reply"
    opened = await inspection(client, inspector_fail="open")
    msg = message(token)
    assert (await opened.check(msg)).raw is msg.raw
    assert closed.inspector is not None and closed.inspector.failures["bad_reply"] == 1


async def test_in_flight_requests_are_bounded(client: Client, responder: Responder) -> None:
    i = await inspection(client, inspector_max_inflight=2, inspector_fail="closed")
    started = time.monotonic()
    results = await asyncio.gather(*(i.check(message(f"slow-{n}", n)) for n in range(6)))
    assert time.monotonic() - started < TIMEOUT + 0.2  # nobody waited past the deadline for a slot
    assert all(r.blocked for r in results)
    assert i.inspector is not None
    failures = i.inspector.failures
    assert failures["timeout"] + failures["overloaded"] == 6 and failures["overloaded"] >= 1
    await asyncio.sleep(TIMEOUT * 2.5)  # let the responder finish the ones it got
    assert responder.max_concurrent <= 2


async def test_metrics_as_prometheus_text(client: Client, responder: Responder) -> None:
    i = await inspection(client, inspector_fail="closed", redact=("email",))
    for token in ("fine", "pii", "a@b.io", "garbage"):
        await i.check(message(token))
    registry = CollectorRegistry()
    for collector in i.collectors():
        registry.register(collector)
    text = generate_latest(registry).decode()
    for line in (
        "meshkit_sse_tokens_inspected_total 4.0",
        'meshkit_sse_tokens_blocked_total{reason="pii"} 1.0',
        'meshkit_sse_tokens_blocked_total{reason="inspector_bad_reply"} 1.0',
        'meshkit_sse_tokens_replaced_total{by="redaction"} 1.0',
        'meshkit_sse_inspector_failures_total{kind="bad_reply"} 1.0',
        'meshkit_sse_inspector_failures_total{kind="timeout"} 0.0',
        "meshkit_sse_inspector_inflight 0.0",
    ):
        assert line in text, line
    await i.close()


async def test_a_lost_connection_fails_by_the_mode(tmp_path: Path) -> None:
    with nats_server(tmp_path, jetstream=False, name="doomed") as srv:
        nc = await nats.connect(srv.url, connect_timeout=2, allow_reconnect=False)
        i = await inspection(nc, inspector_fail="closed")
    # the server is gone: the request cannot go anywhere
    started = time.monotonic()
    result = await i.check(message("Hello"))
    assert time.monotonic() - started < TIMEOUT + 0.15
    assert result.blocked and result.reason in {"inspector_error", "inspector_timeout"}
    await nc.close()
