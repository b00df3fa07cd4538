"""The edge's daemons as real child processes, on `meshkit.harness.daemons.daemon()`.

`sse_adapter()` runs `meshkit sse --nats URL` (usually a leaf's URL, with `--js-domain` the origin's
domain) on free loopback ports and yields an `SseAdapter`: `url`, `stream_url(id)`, `ws_url(id)` and
the admin port.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from meshkit.harness.daemons import HttpDaemon, daemon

__all__ = ["SseAdapter", "sse_adapter"]


@dataclass(frozen=True)
class SseAdapter(HttpDaemon):
    """A running `meshkit sse`: `GET /stream/{conversation_id}` on `url`."""

    def stream_url(self, conversation_id: str, **query: str | int) -> str:
        path = f"{self.url}/stream/{urllib.parse.quote(conversation_id, safe='')}"
        return f"{path}?{urllib.parse.urlencode(query)}" if query else path

    def ws_url(self, conversation_id: str, **query: str | int) -> str:
        """`ws://HOST:PORT/ws/{id}[?query]`: the same stream over a WebSocket."""
        base = "ws://" + self.url.split("://", 1)[1]
        path = f"{base}/ws/{urllib.parse.quote(conversation_id, safe='')}"
        return f"{path}?{urllib.parse.urlencode(query)}" if query else path


@contextmanager
def sse_adapter(
    workdir: Path,
    nats_url: str,
    args: Sequence[str] = (),
    *,
    js_domain: str | None = "origin",
    name: str = "meshkit-sse",
) -> Iterator[SseAdapter]:
    """`meshkit sse --nats NATS_URL [--js-domain D]` on free loopback ports with extra `args`."""
    argv = ["--nats", nats_url, *(["--js-domain", js_domain] if js_domain else []), *args]
    with daemon("sse", workdir, argv, name=name) as running:
        yield SseAdapter(running.process, running.command, running.addresses)
