"""The whole token-streaming chain for tests, on real processes, and what tests of that chain need:
Redis -> `meshkit bridge` -> NATS origin (JetStream, domain `origin`) -> NATS leaf -> `meshkit sse`.

- `streaming_servers(workdir)`: a redis-server, a NATS origin and a leaf linked to it, ready once the
  origin's `/leafz` lists the leaf (`StreamingServers`). The daemons come on top with
  `meshkit.harness.streaming.bridge()` and `adapter_on_port()`.
- `adapter_on_port(workdir, nats_url, port)`: `meshkit sse` on a port of the caller's choice (0: any
  free one). `meshkit.harness.edge_daemons.sse_adapter()` always binds port 0; a test that restarts
  the adapter where its clients expect it starts the next one on the port the first one got. Built
  on `meshkit.harness.daemons.daemon()` (the ready line read back, TERM then KILL on exit).
- `token_json()`, `xadd_tokens()`, `publish_tokens()`: contract messages as a model writes them:
  `XADD <key> * data <json>` (the bridge's Streams source) or `PUBLISH chat.<id>.tokens <json>`
  (its pub/sub source).
- `EVENTSOURCE_PAGE` and `serve_page_on()`: a page that opens an `EventSource` on
  `/stream/<?c=id>` and collects what arrives into `window.events` (`{type, id, data, t}`, `t` the
  page's clock in ms; `window.opens`, `window.errors`, `window.finished` once `event: done` came),
  put on the adapter's own origin.

Decisions:

- The page is put on the adapter's origin by the browser itself (playwright `page.route` answers
  the one document request, `PAGE_PATH`), so an EventSource needs no CORS (`meshkit sse` has no
  `--cors-origin` yet) and talks to the real adapter over the network with nothing in between:
  no proxy whose buffering or error mapping could hide what the adapter does (a proxy answering
  502 while the adapter restarts would even stop an EventSource for good: a non-200 answer is
  final, only a network error is retried). Every `/stream/` request goes to the adapter untouched.
- Token messages carry `ts` (publish time), so the adapter's latency histogram and the load
  generator see them as a real producer's.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshkit.harness.daemons import daemon
from meshkit.harness.edge_daemons import SseAdapter
from meshkit.harness.nats import NatsServer, nats_server
from meshkit.harness.redis import RedisServer, redis_server

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from playwright.async_api import Page

__all__ = [
    "EVENTSOURCE_PAGE",
    "PAGE_PATH",
    "StreamingServers",
    "adapter_on_port",
    "page_url",
    "publish_tokens",
    "serve_page_on",
    "streaming_servers",
    "token_json",
    "xadd_tokens",
]

PAGE_PATH = "/__meshkit_test_page__"

EVENTSOURCE_PAGE = """<!doctype html>
<meta charset="utf-8">
<title>meshkit stream</title>
<script>
window.events = [];
window.opens = 0;
window.errors = 0;
window.finished = false;
const conversation = new URLSearchParams(location.search).get("c");
const source = new EventSource("/stream/" + encodeURIComponent(conversation));
source.onopen = () => { window.opens += 1; };
source.onerror = () => { window.errors += 1; };
const keep = (type) => (e) => {
  window.events.push({type: type, id: e.lastEventId, data: e.data, t: performance.now()});
};
for (const type of ["token", "reset", "reconnect"]) source.addEventListener(type, keep(type));
source.addEventListener("done", (e) => {
  keep("done")(e);
  source.close();
  window.finished = true;
});
</script>
"""


@dataclass(frozen=True)
class StreamingServers:
    """The servers under the chain: Redis (the model's side), the NATS origin, the edge leaf."""

    redis: RedisServer
    origin: NatsServer
    leaf: NatsServer


@contextmanager
def streaming_servers(workdir: Path, *, prefix: str = "stack") -> Iterator[StreamingServers]:
    """redis-server, a NATS origin (JetStream, domain `origin`) and a leaf of it, all on free loopback
    ports; ready once the origin lists the leaf; all stopped on exit (leaf, origin, Redis)."""
    with ExitStack() as stack:
        redis = stack.enter_context(redis_server(workdir / f"{prefix}-redis", name=f"{prefix}-redis"))
        origin = stack.enter_context(nats_server(workdir, name=f"{prefix}-origin"))
        leaf = stack.enter_context(
            nats_server(workdir, jetstream=False, leaf_remote=origin.leaf_url, name=f"{prefix}-leaf")
        )
        origin.wait_for_leafnodes(1)
        yield StreamingServers(redis, origin, leaf)


@contextmanager
def adapter_on_port(
    workdir: Path,
    nats_url: str,
    port: int = 0,
    args: Sequence[str] = (),
    *,
    js_domain: str | None = "origin",
    name: str = "meshkit-sse",
) -> Iterator[SseAdapter]:
    """`meshkit sse --listen 127.0.0.1:PORT --nats NATS_URL [--js-domain D]` with extra `args`, its admin
    port free; stopped (TERM, then KILL) on exit. `port` 0: any free port (read back: `.port`)."""
    argv = [
        "--listen",
        f"127.0.0.1:{port}",
        "--nats",
        nats_url,
        *(["--js-domain", js_domain] if js_domain else []),
        *args,
    ]
    with daemon("sse", workdir, argv, listeners=(), name=name) as running:
        yield SseAdapter(running.process, running.command, running.addresses)


def token_json(
    conversation_id: str, sequence: int, *, done: bool = False, text: str | None = None, **extra: Any
) -> bytes:
    """One contract message: `{"conversation_id", "token", "sequence", "done", "ts", **extra}`."""
    doc = {
        "conversation_id": conversation_id,
        "token": (f"t{sequence} " if text is None else text),
        "sequence": sequence,
        "done": done,
        "ts": time.time(),
    }
    return json.dumps({**doc, **extra}).encode()


async def xadd_tokens(
    client: aioredis.Redis,
    conversation_id: str,
    sequences: Iterable[int],
    *,
    done_at: int | None = None,
    key: str = "chat.tokens",
    **extra: Any,
) -> None:
    """`XADD key * data <token>` for each sequence (one pipelined round trip); `done` at `done_at`."""
    pipe = client.pipeline(transaction=False)
    for seq in sequences:
        pipe.xadd(key, {"data": token_json(conversation_id, seq, done=seq == done_at, **extra)})
    await pipe.execute()


async def publish_tokens(
    client: aioredis.Redis,
    conversation_id: str,
    sequences: Iterable[int],
    *,
    done_at: int | None = None,
    **extra: Any,
) -> None:
    """`PUBLISH chat.<id>.tokens <token>` for each sequence (pipelined); `done` at `done_at`."""
    pipe = client.pipeline(transaction=False)
    for seq in sequences:
        raw = token_json(conversation_id, seq, done=seq == done_at, **extra)
        pipe.publish(f"chat.{conversation_id}.tokens", raw)
    await pipe.execute()


def page_url(adapter: SseAdapter, conversation_id: str) -> str:
    """Where `serve_page_on()` puts the page for `conversation_id` on the adapter's origin."""
    return f"{adapter.url}{PAGE_PATH}?{urllib.parse.urlencode({'c': conversation_id})}"


async def serve_page_on(page: Page, adapter: SseAdapter, html: str = EVENTSOURCE_PAGE) -> None:
    """Answer the browser's request for `PAGE_PATH` on the adapter's origin with `html` (module
    docstring); every other request, `/stream/` included, goes to the network unchanged."""
    origin = urllib.parse.urlsplit(adapter.url)

    def is_page(url: str) -> bool:
        parts = urllib.parse.urlsplit(url)
        return parts.netloc == origin.netloc and parts.path == PAGE_PATH

    async def fulfill(route: Any) -> None:
        await route.fulfill(status=200, content_type="text/html; charset=utf-8", body=html)

    await page.route(is_page, fulfill)
