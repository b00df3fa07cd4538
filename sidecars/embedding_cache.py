"""`meshkit embedding-cache`: an OpenAI-compatible `POST /v1/embeddings` that caches every input item.

    meshkit embedding-cache --listen 127.0.0.1:8091 --upstream http://127.0.0.1:8090/v1 \\
        --store file:///var/cache/meshkit-embeddings
    meshkit embedding-cache --listen 127.0.0.1:8091 --upstream https://api.openai.com/v1 \\
        --store s3://embeddings/cache --s3-endpoint http://127.0.0.1:8333 --memory-bytes 256MiB
    curl -si localhost:8091/v1/embeddings -d '{"model": "text-embedding-3-small", "input": ["a", "b"]}'

A daemon like every other (`meshkit.daemon`): admin port with `/healthz`, `/readyz`, `/metrics`, the
ready line, SIGTERM drain. The official `openai` client works against it
(`OpenAI(base_url="http://127.0.0.1:8091/v1")`); its API key, if any, is passed to the upstream as
`Authorization` unchanged.

Requests are read by `meshkit.sidecars.openai_shapes.parse_embedding_request` (the same strict reader
as `meshkit dev-upstream`): `input` as a string, a list of strings, a token array or a list of token
arrays; `model`; `encoding_format` float|base64; `dimensions`; `user`.

Caching
- Each input item is cached on its own under the key SHA-256 of the JSON array `[model, dimensions,
  item]` (`dimensions` null when the request has none, so "no dimensions" and "the model's default
  given explicitly" are two keys; a string item is a JSON string and a token array a JSON array, so
  `"1"` and `[1]` differ). The vector is kept as float32 little-endian bytes.
- Stores (`--store`, `meshkit.sidecars.vector_store`): `file:///DIR` (`<DIR>/<model-safe>/<key[:2]>/
  <key>`, temp file + `os.replace`) or `s3://BUCKET/PREFIX` (`meshkit.sidecars.s3_store`: one object
  `<PREFIX>/<model-safe>/<key>` per item, `--s3-endpoint` for MinIO/SeaweedFS, credentials and region
  from boto3's default chain; a missing bucket or refused credentials stop the start, an outage does
  not).
- The memory tier (`--memory-bytes`, default 64 MiB, `0` off; `meshkit.sidecars.vector_memory`): an LRU
  bounded in bytes in front of the store, read first, filled by store reads and upstream answers. It is
  what answers a fully cached batch of 16 in well under the 5 ms target; a cold batch of 16 from S3
  costs about 8 ms (16 concurrent GETs, see `s3_store`).
- Lookup order: memory, the writes still queued, the store (the missing items of a request in one
  concurrent `get_many`, under `--store-timeout` for the whole lookup), then the upstream.
- The misses of one request go upstream in ONE call (`encoding_format: base64`, the same `model`,
  `dimensions` and `user`), are merged back in input order, put in the memory tier and queued for the
  store (write-behind, `meshkit.sidecars.vector_writer`: the answer never waits for the store; a full
  queue, `--write-queue` items, drops the write and counts it). Identical items within one request are
  asked for once.
- Identical concurrent misses coalesce: an item already being fetched by another request with the
  same `Authorization` is waited for (a dict of in-flight futures by (authorization, key)), not asked
  for again. Requests with another API key make their own call: the waiters get the fetcher's answer,
  errors included, and one tenant's 429 or refused key is not another's. (A request whose store read
  ended just before another request's fetch of the same item finished may still ask the upstream
  again.)
- With `dimensions`, a vector of another length is never served from the store (an object another
  writer left at the key: a miss, then written over) nor kept (a provider that ignores `dimensions`
  is answered through, uncached).
- `x-cache`: `hit` when every item came from the cache (memory or store), `miss` when none did,
  `partial` otherwise (an item waited for from another request's upstream call counts as a miss).
- `Surrogate-Key: model-<model-safe>` on every successful answer (`model-safe` is the store's folder
  name, `model_dir()`: only `[A-Za-z0-9._-]`, at most 200 characters, a digest where the name had
  anything else), so Varnish tags the object and an operator purges one model's answers with
  `PURGE / + Surrogate-Key: model-text-embedding-3-small` through the purge broadcaster (this clears
  Varnish only: the vectors stay in this cache's memory tier and store).
  Errors carry none (Varnish does not store them).
- `usage`: what the upstream reported for the call this request made (its `prompt_tokens` and
  `total_tokens`); items served from the cache, or from another request's call, count 0 tokens. A
  fully cached answer has `usage: {"prompt_tokens": 0, "total_tokens": 0}`.
- The answer is in the client's `encoding_format` (`meshkit.sidecars.embedding_answer`); the floats
  are printed with 9 significant digits, which read back as exactly the stored float32 values, so
  `float` and `base64` answers agree bit for bit. Printing costs 0.3 ms per 1536 dims, so the memory
  tier keeps each vector's float text once printed (charged to `--memory-bytes`; see
  `vector_memory`): a cached float batch of 16 is assembled, not printed.

The store degrading (decided: never a failed request the upstream could answer)
- a read that fails or does not finish within `--store-timeout` (0.5 s) is a miss; a write that fails
  or overruns `--store-write-timeout` (5 s) leaves the item uncached (it stays in the memory tier).
  Both are counted (`..._store_errors_total{op=read|write}`, one per item) and logged at warning at
  most once per `STORE_LOG_EVERY` seconds per kind, with the number of failures since the last line.
- a lookup that failed entirely (every item, or the deadline) marks the store down for
  `STORE_RETRY_AFTER` seconds: requests meanwhile skip it (no deadline paid per request while S3 is
  stalled) and the next one after that tries again; a readiness probe that reaches the store ends it
  at once.
- `/readyz` (`meshkit.sidecars.embedding_readiness`): ready while the upstream is reachable (a TCP
  connect, never an API call); the store's state is in the body and in `..._store_up`; probes cached
  for 2 s.

Errors (OpenAI's body `{"error": {"message", "type", "param", "code"}}`)
- bad JSON or shapes: 400 `invalid_request_error` (`param` names the field); a body over
  `--max-body-bytes`: 413; unknown path 404; wrong method 405.
- the upstream's own error (429, 4xx, 5xx): passed through with its status, its body (when it is an
  OpenAI error body; else wrapped in one) and its `retry-after`; never cached. Upstream timeout
  (`--upstream-timeout`): 504; unreachable or an answer that is not an embeddings list: 502
  (`server_error`). Requests waiting on that call get the same answer.

Traces (`meshkit.sidecars.tracing`): with `--otel-endpoint URL` or `OTEL_EXPORTER_OTLP_ENDPOINT`, spans
`POST /v1/embeddings` (server; continues a caller's `traceparent`), `cache.lookup` (memory and store,
with the hits of each), `store.get_many` and `upstream.embeddings` (client; `traceparent` sent on),
exported over OTLP/HTTP. Without either, opentelemetry is never imported.

Metrics (`/metrics`, prefix `meshkit_embedding_cache_`): `items_total{result=hit|miss|coalesced}`,
`hits_total{tier=memory|store}`, `requests_total{cache=hit|miss|partial|error}`,
`upstream_calls_total{status}`, `upstream_seconds` (histogram), `stored_bytes_total` (written to the
store), `store_errors_total{op=read|write}`, `store_writes_dropped_total`, `store_write_queue`,
`store_seconds{op}` (histogram of every S3 call: GetObject, PutObject, HeadBucket, ListObjectsV2),
`store_up`, `upstream_up`, `memory_bytes`, `memory_items`, `memory_evictions_total`.

Not done
- packed objects (one object per request batch): the memory tier meets the target, and a second copy
  would have to be kept consistent with the per-item objects;
- a size limit / eviction for the store itself (S3 lifecycle rules are the tool there).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from meshkit.daemon import Daemon, Lifecycle, Resolved
from meshkit.errors import ConfigError
from meshkit.options import option, parse_host_port, parse_seconds, parse_size
from meshkit.sidecars.embedding_answer import answer_body, base64_text, float_text
from meshkit.sidecars.embedding_readiness import EmbeddingReadiness
from meshkit.sidecars.openai_http import json_error, openai_errors
from meshkit.sidecars.openai_shapes import (
    EmbeddingRequest,
    InvalidRequest,
    Item,
    error_body,
    parse_embedding_request,
    read_json_object,
)
from meshkit.sidecars.tracing import NO_TRACING, Tracing, otel_configured, otel_missing, tracing
from meshkit.sidecars.vector_memory import VectorMemory, parse_memory_size
from meshkit.sidecars.vector_store import VectorStore, model_dir, open_store, parse_store_url
from meshkit.sidecars.vector_writer import WriteBehind

log = logging.getLogger("meshkit.embedding_cache")

STORE_LOG_EVERY = 10.0  # seconds between warning lines about store failures of one kind
STORE_RETRY_AFTER = 1.0  # seconds a store whose lookup failed entirely is skipped
WRITE_WORKERS = 16  # concurrent store writes (at most --store-connections)
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _parse_upstream(value: Any) -> str:
    text = str(value).strip().rstrip("/")
    if text and not text.startswith(("http://", "https://")):
        raise ValueError("expected an http(s):// base URL, for example http://127.0.0.1:8090/v1")
    return text


def _parse_endpoint(value: Any) -> str:
    text = str(value).strip().rstrip("/")
    if text and not text.startswith(("http://", "https://")):
        raise ValueError("expected an http(s):// URL, for example http://127.0.0.1:8333")
    return text


def _parse_connections(value: Any) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise ValueError("expected a whole number from 1 to 1024") from None
    if not 1 <= number <= 1024:
        raise ValueError("expected a whole number from 1 to 1024")
    return number


def _parse_queue(value: Any) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise ValueError("expected a whole number from 1 to 1000000") from None
    if not 1 <= number <= 1_000_000:
        raise ValueError("expected a whole number from 1 to 1000000")
    return number


@dataclass(frozen=True)
class EmbeddingCacheOptions:
    listen: str = option(
        "127.0.0.1:8091",
        "HOST:PORT to answer on (port 0: any free port)",
        parse=parse_host_port,
        metavar="HOST:PORT",
    )
    upstream: str = option(
        "",
        "the OpenAI-compatible base URL misses go to (POST URL/embeddings), e.g. http://127.0.0.1:8090/v1",
        parse=_parse_upstream,
        metavar="URL",
    )
    store: str = option(
        "",
        "where vectors are kept: file:///DIR or s3://BUCKET/PREFIX",
        parse=parse_store_url,
        metavar="URL",
    )
    s3_endpoint: str = option(
        "",
        "S3 endpoint for MinIO/SeaweedFS, e.g. http://127.0.0.1:8333 (empty: AWS)",
        parse=_parse_endpoint,
        metavar="URL",
    )
    store_timeout: float = option(
        0.5,
        "seconds a request's store lookup may take (then: misses, served upstream); also the probe",
        parse=parse_seconds,
        metavar="SECONDS",
    )
    store_write_timeout: float = option(
        5.0,
        "seconds one store write behind an answer may take (nobody waits for it)",
        parse=parse_seconds,
        metavar="SECONDS",
    )
    store_connections: int = option(
        64, "connections to S3 kept open (concurrent GETs/PUTs)", parse=_parse_connections, metavar="N"
    )
    memory_bytes: int = option(
        64 << 20,
        "size of the in-memory LRU tier in front of the store, like 64MiB (0: off)",
        parse=parse_memory_size,
        metavar="BYTES",
    )
    write_queue: int = option(
        4096,
        "store writes queued behind the answers at most (more: dropped, counted)",
        parse=_parse_queue,
        metavar="ITEMS",
    )
    otel_endpoint: str = option(
        "",
        "OTLP/HTTP collector base URL for traces (else OTEL_EXPORTER_OTLP_ENDPOINT; neither: no traces)",
        parse=_parse_endpoint,
        metavar="URL",
    )
    max_body_bytes: int = option(
        32 << 20, "largest request body read (bigger: 413)", parse=parse_size, metavar="BYTES"
    )
    upstream_timeout: float = option(
        30.0, "seconds an upstream call may take (then 504)", parse=parse_seconds, metavar="SECONDS"
    )


def item_key(model: str, dimensions: int | None, item: Item) -> str:
    """The cache key of one item: hex SHA-256 of `[model, dimensions, item]` as compact JSON."""
    doc = [model, dimensions, item if isinstance(item, str) else list(item)]
    return hashlib.sha256(json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


class UpstreamError(Exception):
    """An answer to pass to the client as is: status, OpenAI error body, extra headers."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}


def _bad_gateway(status: int, message: str) -> UpstreamError:
    return UpstreamError(status, error_body(message, "server_error"))


@dataclass
class Metrics:
    items: Counter
    hits: Counter
    requests: Counter
    upstream_calls: Counter
    upstream_seconds: Histogram
    stored_bytes: Counter
    store_errors: Counter
    writes_dropped: Counter
    write_queue: Gauge
    store_seconds: Histogram
    store_up: Gauge
    upstream_up: Gauge
    memory_bytes: Gauge
    memory_items: Gauge
    memory_evictions: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> Metrics:
        p = "meshkit_embedding_cache"
        r = registry
        return cls(
            Counter(f"{p}_items", "Input items answered, by result", ["result"], registry=r),
            Counter(f"{p}_hits", "Input items answered from the cache, by tier", ["tier"], registry=r),
            Counter(
                f"{p}_requests", "Embedding requests, by x-cache (error: not answered)", ["cache"], registry=r
            ),
            Counter(
                f"{p}_upstream_calls",
                "Upstream calls, by status (timeout, unreachable)",
                ["status"],
                registry=r,
            ),
            Histogram(f"{p}_upstream_seconds", "Upstream call latency", registry=r),
            Counter(f"{p}_stored_bytes", "Vector bytes written to the store", registry=r),
            Counter(
                f"{p}_store_errors", "Store item reads/writes that failed (served anyway)", ["op"], registry=r
            ),
            Counter(f"{p}_store_writes_dropped", "Store writes dropped: the queue was full", registry=r),
            Gauge(f"{p}_store_write_queue", "Store writes queued or in progress", registry=r),
            Histogram(
                f"{p}_store_seconds",
                "S3 call latency, by operation",
                ["op"],
                buckets=STORE_BUCKETS,
                registry=r,
            ),
            Gauge(f"{p}_store_up", "1 when the last readiness probe reached the store", registry=r),
            Gauge(f"{p}_upstream_up", "1 when the last readiness probe reached the upstream", registry=r),
            Gauge(
                f"{p}_memory_bytes",
                "Bytes held by the memory tier (vectors, float texts, overhead)",
                registry=r,
            ),
            Gauge(f"{p}_memory_items", "Vectors held by the memory tier", registry=r),
            Counter(f"{p}_memory_evictions", "Vectors evicted from the memory tier", registry=r),
        )


@dataclass
class Fetched:
    """The vectors of one upstream call by key, and the tokens it reported."""

    vectors: dict[str, bytes]
    prompt_tokens: int
    total_tokens: int


class Cache:
    def __init__(
        self,
        upstream: str,
        store: VectorStore,
        metrics: Metrics,
        timeout: float,
        *,
        memory: VectorMemory | None = None,
        store_timeout: float = 0.5,
        write_timeout: float = 5.0,
        write_queue: int = 4096,
        write_workers: int = WRITE_WORKERS,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.upstream = upstream
        self.store = store
        self.metrics = metrics
        self.timeout = timeout
        self.memory = memory if memory is not None else VectorMemory(0)
        self.store_timeout = store_timeout
        self.tracing = tracing
        self.writer = WriteBehind(
            store,
            capacity=write_queue,
            workers=write_workers,
            timeout=write_timeout,
            on_written=metrics.stored_bytes.inc,
            on_error=lambda exc: self._store_error("write", exc),
            on_dropped=metrics.writes_dropped.inc,
        )
        self.session: aiohttp.ClientSession | None = None
        # (authorization, key) -> the vector being fetched: shared only by requests with the same key
        self.inflight: dict[tuple[str | None, str], asyncio.Future[bytes]] = {}
        self.store_down_until = 0.0
        self._last_logged: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}
        metrics.write_queue.set_function(lambda: len(self.writer))
        metrics.memory_bytes.set_function(lambda: self.memory.bytes)
        metrics.memory_items.set_function(lambda: len(self.memory))

    # -- the store, degrading to upstream-only ----------------------------------------------------
    def _store_error(self, op: str, exc: OSError | TimeoutError, count: int = 1) -> None:
        """Count `count` failed item reads/writes; a warning line at most every STORE_LOG_EVERY s."""
        self.metrics.store_errors.labels(op).inc(count)
        now = time.monotonic()
        if now - self._last_logged.get(op, -STORE_LOG_EVERY) < STORE_LOG_EVERY:
            self._unlogged[op] = self._unlogged.get(op, 0) + count
            return
        since = self._unlogged.pop(op, 0)
        self._last_logged[op] = now
        more = f" ({since} more since the last line)" if since else ""
        log.warning(
            "store %s failed for %d item(s)%s, served from the upstream: %s",
            op,
            count,
            more,
            str(exc) or type(exc).__name__,
        )

    def store_reachable(self, ok: bool) -> None:
        """The readiness probe's word: a reachable store is used again at once."""
        if ok:
            self.store_down_until = 0.0

    async def _lookup(self, model: str, keys: list[str]) -> dict[str, bytes]:
        """The store's vectors of `keys` (absent, failed and late ones left out), under the deadline."""
        if not keys or time.monotonic() < self.store_down_until:
            return {}
        with self.tracing.span("store.get_many") as span:
            span.set_attribute("store.items", len(keys))
            try:
                async with asyncio.timeout(self.store_timeout):
                    found = await self.store.get_many(model, keys)
            except TimeoutError:
                late = TimeoutError(f"no answer within {self.store_timeout:g} s")
                self._store_error("read", late, len(keys))
                self.store_down_until = time.monotonic() + STORE_RETRY_AFTER
                span.set_attribute("store.error", str(late))
                return {}
            vectors: dict[str, bytes] = {}
            errors = [r for r in found if isinstance(r, OSError)]
            for key, result in zip(keys, found, strict=True):
                if isinstance(result, bytes):
                    vectors[key] = result
            if errors:
                self._store_error("read", errors[0], len(errors))
                span.set_attribute("store.errors", len(errors))
                if len(errors) == len(keys):
                    self.store_down_until = time.monotonic() + STORE_RETRY_AFTER
            span.set_attribute("store.hits", len(vectors))
            return vectors

    def _remember(self, key: str, data: bytes) -> None:
        self.metrics.memory_evictions.inc(self.memory.put(key, data))

    # -- the upstream -------------------------------------------------------------------------------
    async def _call_upstream(
        self, req: EmbeddingRequest, user: str | None, items: list[Item], auth: str | None
    ) -> tuple[list[bytes], int, int]:
        assert self.session is not None
        doc: dict[str, Any] = {
            "model": req.model,
            "input": [i if isinstance(i, str) else list(i) for i in items],
            "encoding_format": "base64",
        }
        if req.dimensions is not None:
            doc["dimensions"] = req.dimensions
        if user is not None:
            doc["user"] = user
        headers = {"content-type": "application/json"}
        if auth:
            headers["authorization"] = auth
        with self.tracing.span("upstream.embeddings", kind="client") as span:
            span.set_attribute("embeddings.items", len(items))
            self.tracing.inject(headers)
            began = time.monotonic()
            try:
                async with self.session.post(
                    f"{self.upstream}/embeddings",
                    data=json.dumps(doc).encode(),
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=self.timeout),
                ) as resp:
                    status, body = resp.status, await resp.read()
                    retry_after = resp.headers.get("retry-after")
            except TimeoutError:
                self.metrics.upstream_calls.labels("timeout").inc()
                span.set_attribute("error.type", "timeout")
                raise _bad_gateway(504, f"The upstream did not answer within {self.timeout:g} s.") from None
            except aiohttp.ClientError as exc:
                self.metrics.upstream_calls.labels("unreachable").inc()
                span.set_attribute("error.type", "unreachable")
                raise _bad_gateway(502, f"The upstream could not be reached: {exc}") from None
            finally:
                self.metrics.upstream_seconds.observe(time.monotonic() - began)
            span.set_attribute("http.response.status_code", status)
        self.metrics.upstream_calls.labels(str(status)).inc()
        if status != 200:
            raise _passed_through(status, body, retry_after)
        return _read_upstream_answer(body, len(items))

    async def fetch(
        self, req: EmbeddingRequest, user: str | None, keys: dict[str, Item], auth: str | None
    ) -> Fetched:
        """One upstream call for `keys` (key -> item) with `auth`; its futures in `self.inflight` are
        settled, the vectors remembered and queued for the store."""
        futures = {key: asyncio.get_running_loop().create_future() for key in keys}
        self.inflight.update({(auth, key): future for key, future in futures.items()})
        try:
            vectors, prompt, total = await self._call_upstream(req, user, list(keys.values()), auth)
            got = dict(zip(keys, vectors, strict=True))
            size = _size(req)
            for key, data in got.items():
                if size is not None and len(data) != size:  # `dimensions` ignored: served, not kept
                    continue
                self._remember(key, data)
                self.writer.submit(req.model, key, data)
            for key, future in futures.items():
                future.set_result(got[key])
            return Fetched(got, prompt, total)
        except BaseException as exc:
            for future in futures.values():
                if not future.done():
                    if not isinstance(exc, Exception):  # the fetching request was cancelled
                        exc = _bad_gateway(502, "The request fetching this item upstream was cancelled.")
                    future.set_exception(exc)
                    future.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            for key in futures:
                self.inflight.pop((auth, key), None)

    # -- one request ------------------------------------------------------------------------------
    async def cached(
        self, model: str, keys: Sequence[str], size: int | None = None
    ) -> tuple[dict[str, bytes], set[str]]:
        """The vectors of `keys` the cache holds (memory, queued writes, the store; from the store only
        those of `size` bytes when given), and the keys that came from memory (tier or write queue)."""
        vectors: dict[str, bytes] = {}
        missing: list[str] = []
        with self.tracing.span("cache.lookup") as span:
            for key in dict.fromkeys(keys):
                data = self.memory.get(key)
                if data is None:
                    data = self.writer.pending.get(key)
                if data is not None:
                    vectors[key] = data
                else:
                    missing.append(key)
            in_memory = set(vectors)
            span.set_attribute("cache.memory_hits", len(in_memory))
            if missing:
                found = await self._lookup(model, missing)
                if size is not None:  # not this many dimensions: another writer's, never served
                    found = {key: data for key, data in found.items() if len(data) == size}
                for key, data in found.items():
                    self._remember(key, data)
                vectors.update(found)
                span.set_attribute("cache.store_hits", len(found))
        return vectors, in_memory

    async def embed(self, req: EmbeddingRequest, user: str | None, auth: str | None) -> tuple[bytes, str]:
        """The answer's JSON body and its x-cache value (hit, miss, partial)."""
        keys = [item_key(req.model, req.dimensions, item) for item in req.items]
        vectors, from_memory = await self.cached(req.model, keys, _size(req))
        hits = sum(1 for key in keys if key in vectors)
        memory_hits = sum(1 for key in keys if key in from_memory)
        owned: dict[str, Item] = {}
        waited: dict[str, asyncio.Future[bytes]] = {}
        for key, item in zip(keys, req.items, strict=True):
            if key in vectors or key in owned or key in waited:
                continue
            if (auth, key) in self.inflight:
                waited[key] = self.inflight[auth, key]
            else:
                owned[key] = item
        prompt = total = 0
        if owned:
            fetched = await self.fetch(req, user, owned, auth)
            vectors.update(fetched.vectors)
            prompt, total = fetched.prompt_tokens, fetched.total_tokens
        for key, future in waited.items():
            vectors[key] = await asyncio.shield(future)
        misses = len(keys) - hits
        self.metrics.items.labels("hit").inc(hits)
        self.metrics.items.labels("miss").inc(misses)
        self.metrics.items.labels("coalesced").inc(sum(1 for k in keys if k in waited))
        self.metrics.hits.labels("memory").inc(memory_hits)
        self.metrics.hits.labels("store").inc(hits - memory_hits)
        cache = "hit" if not misses else "miss" if not hits else "partial"
        if req.encoding_format == "base64":
            texts = {key: base64_text(vectors[key]) for key in dict.fromkeys(keys)}
        else:
            texts = {key: self._float_text(key, vectors[key]) for key in dict.fromkeys(keys)}
        return answer_body([texts[key] for key in keys], req.model, prompt, total), cache

    def _float_text(self, key: str, data: bytes) -> bytes:
        """The vector's float JSON text: the memory tier's, else printed (and kept there)."""
        text = self.memory.get_text(key)
        if text is None:
            text = float_text(data)
            self.metrics.memory_evictions.inc(self.memory.put_text(key, text))
        return text


def _size(req: EmbeddingRequest) -> int | None:
    """The bytes of one of the request's vectors when it asks for `dimensions`, else None."""
    return None if req.dimensions is None else 4 * req.dimensions


def _passed_through(status: int, body: bytes, retry_after: str | None) -> UpstreamError:
    headers = {"retry-after": retry_after} if retry_after else {}
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        return UpstreamError(status, body, headers)
    kind = "server_error" if status >= 500 else "requests" if status == 429 else "invalid_request_error"
    text = body[:200].decode("utf-8", "replace")
    return UpstreamError(status, error_body(f"The upstream answered {status}: {text}", kind), headers)


def _read_upstream_answer(body: bytes, count: int) -> tuple[list[bytes], int, int]:
    """(vectors as float32 bytes in input order, prompt_tokens, total_tokens), or a 502 (also for an
    index outside 0..count-1 or a bool, a repeated index, and vectors of different lengths)."""
    try:
        doc = json.loads(body)
        data = doc["data"]
        if not isinstance(data, list) or len(data) != count:
            raise ValueError(f"expected {count} embeddings")
        vectors: list[bytes | None] = [None] * count
        for entry in data:
            index, embedding = entry["index"], entry["embedding"]
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count:
                raise ValueError(f"an index is not one of 0..{count - 1}: {index!r}")
            if isinstance(embedding, str):
                raw = base64.b64decode(embedding, validate=True)
            elif isinstance(embedding, list):
                raw = struct.pack(f"<{len(embedding)}f", *embedding)
            else:
                raise ValueError("an embedding is neither base64 nor a list")
            if not raw or len(raw) % 4 or vectors[index] is not None:
                raise ValueError("a bad or repeated embedding")
            vectors[index] = raw
        usage = doc.get("usage") or {}
        prompt = int(usage.get("prompt_tokens", 0))
        total = int(usage.get("total_tokens", prompt))
    except (ValueError, KeyError, TypeError, IndexError, struct.error, UnicodeDecodeError) as exc:
        raise _bad_gateway(502, f"The upstream's answer is not an embeddings list: {exc}") from None
    if any(v is None for v in vectors):
        raise _bad_gateway(502, "The upstream's answer is missing embeddings.")
    if len({len(v) for v in vectors if v is not None}) > 1:
        raise _bad_gateway(502, "The upstream's answer has embeddings of different lengths.")
    return [v for v in vectors if v is not None], prompt, total


CACHE = web.AppKey("cache", Cache)


async def embeddings(request: web.Request) -> web.Response:
    cache = request.app[CACHE]
    with cache.tracing.span("POST /v1/embeddings", kind="server", headers=request.headers) as span:
        response = await _embeddings(request, cache, span)
        span.set_attribute("http.response.status_code", response.status)
        return response


async def _embeddings(request: web.Request, cache: Cache, span: Any) -> web.Response:
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        cache.metrics.requests.labels("error").inc()
        raise InvalidRequest(
            f"Request body too large: at most {request.app[MAX_BODY]} bytes.", status=413
        ) from None
    try:
        doc = read_json_object(body)
        req = parse_embedding_request(doc)
    except InvalidRequest:
        cache.metrics.requests.labels("error").inc()
        raise
    span.set_attribute("embeddings.model", req.model)
    span.set_attribute("embeddings.items", len(req.items))
    user = doc.get("user")
    try:
        answer, result = await cache.embed(req, user, request.headers.get("authorization"))
    except UpstreamError as exc:
        cache.metrics.requests.labels("error").inc()
        return json_error(exc.status, exc.body, exc.headers)
    cache.metrics.requests.labels(result).inc()
    span.set_attribute("embeddings.cache", result)
    headers = {"x-cache": result, "surrogate-key": surrogate_key(req.model)}
    return web.Response(body=answer, content_type="application/json", headers=headers)


def surrogate_key(model: str) -> str:
    """The `Surrogate-Key` of a model's answers: `model-<model_dir(model)>`, only `[A-Za-z0-9_.-]`."""
    return f"model-{model_dir(model)}"


MAX_BODY = web.AppKey("max_body", int)


def embedding_cache_app(cache: Cache, *, max_body_bytes: int) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes, middlewares=[openai_errors("embedding-cache", log)])
    app[CACHE] = cache
    app[MAX_BODY] = max_body_bytes
    app.router.add_post("/v1/embeddings", embeddings)
    return app


async def serve(options: Resolved, life: Lifecycle) -> None:
    opts: EmbeddingCacheOptions = options[EmbeddingCacheOptions]
    missing = [flag for flag, value in (("--upstream", opts.upstream), ("--store", opts.store)) if not value]
    if missing:
        raise ConfigError([f"embedding-cache needs {' and '.join(missing)}"])
    if otel_configured(opts.otel_endpoint) and (why := otel_missing()):
        raise ConfigError([why])
    metrics = Metrics.create(life.registry)

    def observe(op: str, seconds: float) -> None:
        metrics.store_seconds.labels(op).observe(seconds)

    store = open_store(
        opts.store,
        s3_endpoint=opts.s3_endpoint or None,
        timeout=opts.store_timeout,
        write_timeout=opts.store_write_timeout,
        connections=opts.store_connections,
        observe=observe,
    )
    traces = tracing(opts.otel_endpoint, "meshkit-embedding-cache")
    cache = Cache(
        opts.upstream,
        store,
        metrics,
        opts.upstream_timeout,
        memory=VectorMemory(opts.memory_bytes),
        store_timeout=opts.store_timeout,
        write_timeout=opts.store_write_timeout,
        write_queue=opts.write_queue,
        write_workers=min(WRITE_WORKERS, opts.store_connections),
        tracing=traces,
    )

    async def open_session() -> None:
        cache.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, limit_per_host=64))

    async def close_session() -> None:
        if cache.session is not None:
            await cache.session.close()

    async def close_writer() -> None:
        await cache.writer.close(life.options.drain_timeout)

    await life.start("traces", None, traces.close)
    await life.start(f"store {store.url}", store.start, store.close)
    await life.start("store writer", cache.writer.start, close_writer)  # closed before the store
    await life.start("http client", open_session, close_session)
    life.readiness.check = EmbeddingReadiness(
        store,
        opts.upstream,
        store_up=metrics.store_up,
        upstream_up=metrics.upstream_up,
        on_store=cache.store_reachable,
        timeout=min(1.0, max(opts.store_timeout, 0.1)),
    )
    life.readiness.details["store_url"] = store.url
    await life.serve_app("http", opts.listen, embedding_cache_app(cache, max_body_bytes=opts.max_body_bytes))


def _sections() -> list[type[Any]]:
    return [EmbeddingCacheOptions]


DAEMON = Daemon(
    name="embedding-cache",
    help="an OpenAI-compatible /v1/embeddings that caches each input item (file:// or s3:// store)",
    sections=_sections,
    serve=serve,
)
