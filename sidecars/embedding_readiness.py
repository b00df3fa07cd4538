"""The embedding cache's readiness check (`Readiness.check` of `meshkit.admin`): upstream and store.

Decided: ready means "can answer", i.e. the upstream is reachable. A store that is down does not make
the pod unready: the cache then serves from the upstream (degraded, counted), and an unready pod would
take that capacity away for as long as S3 is down, or, if every replica shares the outage, all of it.
The store's state is in the `/readyz` body (`"store": "ok"` or `"unreachable: ..."`) and in
`meshkit_embedding_cache_store_up`; an unreachable upstream is a 503 (`"reason": "upstream
unreachable: ..."`) and `meshkit_embedding_cache_upstream_up` 0.

- The upstream probe is a TCP connect to its host:port (80/443 by default) within `timeout`, closed at
  once: never an HTTP call, which a paid API could bill or rate-limit.
- The store probe is the store's `probe()` (S3 `HeadBucket`, file: a temporary file in the folder)
  within `timeout`.
- Both run concurrently; the result is kept `ttl` seconds, and concurrent `/readyz` calls share one
  probe in flight, so a probe storm costs one probe per `ttl`.
- `on_store(ok)` tells the cache what the store probe found (it stops skipping a store marked down).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from prometheus_client import Gauge

from meshkit.sidecars.vector_store import VectorStore

PROBE_TIMEOUT = 1.0
PROBE_TTL = 2.0


def upstream_address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.hostname or "", port


class EmbeddingReadiness:
    def __init__(
        self,
        store: VectorStore,
        upstream: str,
        *,
        store_up: Gauge,
        upstream_up: Gauge,
        on_store: Callable[[bool], None] = lambda _: None,
        timeout: float = PROBE_TIMEOUT,
        ttl: float = PROBE_TTL,
    ) -> None:
        self.store = store
        self.host, self.port = upstream_address(upstream)
        self.timeout = timeout
        self.ttl = ttl
        self._store_up = store_up
        self._upstream_up = upstream_up
        self._on_store = on_store
        self._last: tuple[float, tuple[bool, str, dict[str, str]]] | None = None
        self._running: asyncio.Task[tuple[bool, str, dict[str, str]]] | None = None

    async def __call__(self) -> tuple[bool, str, dict[str, str]]:
        if self._last is not None and time.monotonic() - self._last[0] < self.ttl:
            return self._last[1]
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._probe())
        return await asyncio.shield(self._running)

    async def _probe(self) -> tuple[bool, str, dict[str, str]]:
        store, upstream = await asyncio.gather(self._probe_store(), self._probe_upstream())
        self._store_up.set(store is None)
        self._upstream_up.set(upstream is None)
        self._on_store(store is None)
        details = {
            "store": "ok" if store is None else f"unreachable: {store}",
            "upstream": "ok" if upstream is None else f"unreachable: {upstream}",
        }
        if upstream is None:
            reason = "serving" if store is None else "serving from the upstream only (store unreachable)"
        else:
            reason = f"upstream unreachable: {upstream}"
        result = (upstream is None, reason, details)
        self._last = (time.monotonic(), result)
        return result

    async def _probe_store(self) -> str | None:
        try:
            async with asyncio.timeout(self.timeout):
                await self.store.probe()
        except TimeoutError:
            return f"no answer within {self.timeout:g} s"
        except OSError as exc:
            return str(exc) or type(exc).__name__
        return None

    async def _probe_upstream(self) -> str | None:
        try:
            async with asyncio.timeout(self.timeout):
                _, writer = await asyncio.open_connection(self.host, self.port)
        except TimeoutError:
            return f"{self.host}:{self.port}: no TCP connection within {self.timeout:g} s"
        except OSError as exc:
            return f"{self.host}:{self.port}: {exc.strerror or exc}"
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None
