"""Helpers shared by the `meshkit sse` integration tests (this module holds no tests): token messages
published straight into JetStream at the origin (as the bridge would, with `Nats-Msg-Id`), an SSE
reader over a real aiohttp response (parsed with the EventSource rules of `loadgen_sse_parser`), the
leaf's subscription count from its monitor, and the adapter's metrics; and the fixtures (origin + leaf
with JetStream domain `origin`, the stream, a JetStream client, an HTTP session) the newer modules
import by name."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
from nats.js import JetStreamContext

from meshkit.edge.loadgen_sse_parser import SseEvent, SseParser
from meshkit.edge.token_contract import message_id, tokens_subject
from meshkit.edge.token_stream import ensure_stream
from meshkit.harness.edge_daemons import SseAdapter
from meshkit.harness.nats import NatsServer, nats_server


def token(cid: str, seq: int, *, done: bool = False, text: str | None = None, **extra: Any) -> bytes:
    doc = {
        "conversation_id": cid,
        "token": f"t{seq} " if text is None else text,
        "sequence": seq,
        "done": done,
    }
    return json.dumps({**doc, "ts": time.time(), **extra}).encode()


async def publish(
    js: JetStreamContext, cid: str, seqs: Iterable[int], *, done_at: int | None = None, **extra: Any
) -> None:
    for seq in seqs:
        raw = token(cid, seq, done=seq == done_at, **extra)
        await js.publish(tokens_subject(cid), raw, headers={"Nats-Msg-Id": message_id(cid, seq)})


class SseReader:
    """Reads one open SSE response in the background: raw bytes and parsed events as they come."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.raw = bytearray()
        self.events: list[SseEvent] = []
        self.ended = asyncio.Event()
        self._parser = SseParser()
        self._changed = asyncio.Event()
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for chunk in self.response.content.iter_any():
                self.raw += chunk
                self.events += self._parser.feed(chunk)
                self._changed.set()
        except (aiohttp.ClientError, ConnectionError):
            pass
        finally:
            self.ended.set()
            self._changed.set()

    @property
    def sequences(self) -> list[int]:
        return [int(e.id) for e in self.events if e.event in ("token", "done")]

    def of(self, event: str) -> list[SseEvent]:
        return [e for e in self.events if e.event == event]

    async def wait_for(
        self, predicate: Callable[[SseReader], bool], within: float = 10.0, what: str = ""
    ) -> None:
        deadline = time.monotonic() + within
        while not predicate(self):
            left = deadline - time.monotonic()
            if left <= 0 or (self.ended.is_set() and not predicate(self)):
                state = "ended" if self.ended.is_set() else "timed out"
                raise AssertionError(
                    f"{what or 'condition'}: {state}; got {self.sequences[-20:]}, {self.raw[-300:]!r}"
                )
            self._changed.clear()
            try:
                async with asyncio.timeout(min(left, 0.5)):
                    await self._changed.wait()
            except TimeoutError:
                pass

    async def until_end(self, within: float = 10.0) -> None:
        async with asyncio.timeout(within):
            await self.ended.wait()

    async def close(self) -> None:
        self._task.cancel()
        self.response.close()
        await asyncio.gather(self._task, return_exceptions=True)


async def open_stream(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> SseReader:
    response = await session.get(
        url, headers=headers or {}, timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)
    )
    assert response.status == 200, (response.status, await response.text())
    return SseReader(response)


def leaf_subscriptions(leaf: NatsServer, name: str = "meshkit-sse") -> list[str]:
    """The subjects the adapter's connection (named `name`) subscribes to on the leaf."""
    connz = leaf.monitor("connz?subs=1")
    subs: list[str] = []
    for conn in connz.get("connections") or []:
        if conn.get("name") == name:
            subs += conn.get("subscriptions_list") or []
    return subs


async def consumers_of(js: JetStreamContext, cid: str, stream: str = "CHAT") -> list[str]:
    """The names of the consumers on `stream` filtered on the conversation's subject."""
    for _ in range(10):
        try:
            infos = await js.consumers_info(stream)
        except (TypeError, AttributeError):  # nats-py 2.16 on a consumer deleted while listed
            await asyncio.sleep(0.1)
            continue
        return [i.name for i in infos if i.config.filter_subject == f"chat.{cid}.tokens"]
    raise AssertionError("consumers_info kept failing")


def metric(adapter: SseAdapter, name: str, labels: str = "") -> float:
    """One sample of the adapter's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"{adapter.admin_url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    pattern = re.compile(rf"^{re.escape(name)}{re.escape(labels)}\s+(\S+)$", re.MULTILINE)
    match = pattern.search(text)
    return float(match.group(1)) if match else 0.0


async def until(predicate: Callable[[], bool], within: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {within} s")
        await asyncio.sleep(0.05)


def settled(adapter: SseAdapter, within: float = 10.0) -> None:
    """Wait until the adapter holds no subscription (what earlier tests opened has been dropped), so
    a count of the leaf's subscriptions taken now is stable."""
    deadline = time.monotonic() + within
    while metric(adapter, "meshkit_sse_conversations_subscribed") != 0:
        if time.monotonic() > deadline:
            raise AssertionError("the adapter still holds subscriptions")
        time.sleep(0.05)


# -- fixtures for the newer test modules (imported there by name) ---------------------------------------
def new_cid() -> str:
    return f"c-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sse")


@pytest.fixture(scope="module")
def origin(workdir: Path) -> Iterator[NatsServer]:
    with nats_server(workdir, name="sse-origin") as server:
        yield server


@pytest.fixture(scope="module")
def leaf(workdir: Path, origin: NatsServer) -> Iterator[NatsServer]:
    with nats_server(workdir, jetstream=False, leaf_remote=origin.leaf_url, name="sse-leaf") as server:
        origin.wait_for_leafnodes(1)
        yield server


@pytest.fixture(scope="module")
def stream_created(origin: NatsServer) -> None:
    async def create() -> None:
        nc = await nats.connect(origin.url)
        try:
            await ensure_stream(nc.jetstream())
        finally:
            await nc.close()

    asyncio.run(create())


@pytest.fixture
async def js(origin: NatsServer, stream_created: None) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(origin.url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


BASE_ARGS = [
    "--heartbeat",
    "0.5",
    "--client-queue",
    "256",
    "--consumer-heartbeat",
    "0.5",
    "--gap-timeout",
    "0.5",
]
