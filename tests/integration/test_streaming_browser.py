"""A real headless Chromium reading a conversation through the whole chain while the SSE adapter restarts.

Tokens go Redis Stream (`XADD chat.tokens * data <json>`) -> `meshkit bridge` (Streams source) -> the
NATS origin's JetStream -> the leaf -> `meshkit sse` on the leaf -> an `EventSource` in the page
(`meshkit.harness.streaming_stack.EVENTSOURCE_PAGE`, put on the adapter's origin). Mid-stream, while
tokens keep coming, the adapter process is stopped and a new one started on the same port:

- SIGTERM: the adapter tells the stream to reconnect (`retry: 250` + `event: reconnect`) and ends it;
- SIGKILL: the connection just breaks; EventSource's own retry (the adapter's `retry:` hint) does it.

Either way the browser reconnects by itself with `Last-Event-ID` naming the last token it had (the
headers Chromium sent, read through CDP: playwright's request headers do not show it) and the page
ends with every token exactly once, in order, and `event: done` last; tokens written while no
adapter ran came from JetStream on the resume.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from playwright.async_api import Page

from meshkit.errors import HarnessError
from meshkit.harness.browser import browser_page, chromium_binary
from meshkit.harness.streaming import RunningBridge, bridge
from meshkit.harness.streaming_stack import (
    StreamingServers,
    adapter_on_port,
    page_url,
    serve_page_on,
    streaming_servers,
    xadd_tokens,
)

pytestmark = pytest.mark.integration

RETRY_MS = 300  # the adapter's `retry:` hint: EventSource's wait before it reconnects after a break
RESTART_AFTER = 25  # tokens the page has when the adapter goes away
AFTER_RESTART = 60  # tokens written once the new adapter is up
WRITE_EVERY = 0.005  # seconds between two XADDs while the conversation runs (~200 tokens/s)
ADAPTER_ARGS = ["--heartbeat", "1", "--retry-ms", str(RETRY_MS), "--consumer-heartbeat", "0.5"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("streaming-browser")


@pytest.fixture(scope="module")
def servers(workdir: Path) -> Iterator[StreamingServers]:
    with streaming_servers(workdir, prefix="browser") as running:
        yield running


@pytest.fixture(scope="module")
def streams_bridge(workdir: Path, servers: StreamingServers) -> Iterator[RunningBridge]:
    with bridge(
        workdir, servers.redis.url, servers.origin.url, ["--source", "stream", "--consumer", "b1"]
    ) as running:
        running.wait_ready()
        yield running


@pytest.fixture
async def model(servers: StreamingServers) -> AsyncIterator[aioredis.Redis]:
    """The model's side: a Redis client that XADDs tokens."""
    client = aioredis.from_url(servers.redis.url)
    yield client
    await client.aclose()


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    try:
        chromium_binary()
    except HarnessError as exc:
        pytest.skip(str(exc))
    async with browser_page(page_timeout=20.0) as p:
        yield p


class Conversation:
    """Writes one conversation's tokens to the Redis Stream, one every WRITE_EVERY s, until told to
    finish: then AFTER_RESTART more and the `done` token."""

    def __init__(self, model: aioredis.Redis, cid: str) -> None:
        self.model = model
        self.cid = cid
        self.finish = asyncio.Event()
        self.written = 0
        self.task = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        while not self.finish.is_set():
            await self._one()
        for _ in range(AFTER_RESTART - 1):
            await self._one()
        self.written += 1
        await xadd_tokens(self.model, self.cid, [self.written], done_at=self.written)

    async def _one(self) -> None:
        self.written += 1
        await xadd_tokens(self.model, self.cid, [self.written])
        await asyncio.sleep(WRITE_EVERY)


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
async def test_the_browser_gets_every_token_once_across_an_adapter_restart(
    stop: str,
    workdir: Path,
    servers: StreamingServers,
    streams_bridge: RunningBridge,
    model: aioredis.Redis,
    page: Page,
) -> None:
    cid = f"browser-{stop}"
    sent = await headers_sent(page)

    # the adapters start and stop in a thread: the writer keeps writing meanwhile
    writer: Conversation | None = None
    with ExitStack() as stack:
        stack.callback(lambda: writer.task.cancel() if writer else None)
        first = stack.enter_context(
            adapter_on_port(workdir, servers.leaf.url, 0, ADAPTER_ARGS, name=f"sse-{stop}-1")
        )
        port = first.port
        await serve_page_on(page, first)
        await page.goto(page_url(first, cid))
        await page.wait_for_function("window.opens === 1")
        writer = Conversation(model, cid)
        await page.wait_for_function(f"window.events.length >= {RESTART_AFTER}")
        if stop == "sigterm":
            first.process.signal(signal.SIGTERM)
            assert await asyncio.to_thread(first.process.wait, 10) == 0
        else:
            first.process.kill()
        written_at_stop = writer.written
        again = adapter_on_port(workdir, servers.leaf.url, port, ADAPTER_ARGS, name=f"sse-{stop}-2")
        second = await asyncio.to_thread(stack.enter_context, again)
        assert second.port == port
        written_at_start = writer.written
        writer.finish.set()
        await asyncio.wait_for(writer.task, 10)
        await page.wait_for_function("window.finished === true")
        events: list[dict[str, Any]] = await page.evaluate("window.events")
        opens = await page.evaluate("window.opens")

    total = writer.written
    assert written_at_start > written_at_stop, "tokens were written while no adapter ran"
    deliveries = [e for e in events if e["type"] in ("token", "done")]
    assert [e["id"] for e in deliveries] == [str(n) for n in range(1, total + 1)]
    assert [json.loads(e["data"])["sequence"] for e in deliveries] == list(range(1, total + 1))
    assert [json.loads(e["data"])["token"] for e in deliveries[:3]] == ["t1 ", "t2 ", "t3 "]
    assert [e["type"] for e in deliveries] == ["token"] * (total - 1) + ["done"]
    assert json.loads(deliveries[-1]["data"])["done"] is True
    assert not [e for e in events if e["type"] == "reset"], "no gap: nothing was reset"
    assert [e["type"] for e in events if e["type"] == "reconnect"] == (
        ["reconnect"] if stop == "sigterm" else []
    )
    assert opens == 2

    # the browser reconnected by itself, naming the last token it had before the break (the headers
    # Chromium's network stack put on the wire; the new adapter knew nothing of this viewer: without
    # them it would have started again from token 1)
    streams = [h for h in sent if h.get("accept") == "text/event-stream"]
    assert "last-event-id" not in streams[0]
    resumes = [h.get("last-event-id") for h in streams[1:]]
    assert resumes, "the browser never reconnected"
    gaps = [(b["t"] - a["t"], a["id"]) for a, b in itertools.pairwise(deliveries)]
    outage_ms, before_break = max(gaps)
    assert resumes == [before_break], (resumes, before_break)
    assert int(before_break) >= RESTART_AFTER
    print(f"{stop}: {outage_ms:.0f} ms without tokens in the page; resumed after {before_break}")


async def headers_sent(page: Page) -> list[dict[str, str]]:
    """The request headers Chromium's network stack sends (CDP `Network.requestWillBeSentExtraInfo`,
    lowercase names), for every request of `page` from now on."""
    sent: list[dict[str, str]] = []
    cdp = await page.context.new_cdp_session(page)
    cdp.on(
        "Network.requestWillBeSentExtraInfo",
        lambda e: sent.append({k.lower(): v for k, v in e["headers"].items()}),
    )
    await cdp.send("Network.enable")
    return sent
