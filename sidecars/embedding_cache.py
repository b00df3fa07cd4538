"""`meshkit embedding-cache`: an OpenAI-compatible `POST /v1/embeddings` that caches every input item.

    meshkit embedding-cache --listen 127.0.0.1:8091 --upstream http://127.0.0.1:8090/v1 \\
        --store file:///var/cache/meshkit-embeddings
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
  `"1"` and `[1]` differ). The vector is kept as float32 little-endian bytes in the store
  (`meshkit.sidecars.vector_store`: `<DIR>/<model-safe>/<key[:2]>/<key>`, temp file + `os.replace`).
- The misses of one request go upstream in ONE call (`encoding_format: base64`, the same `model`,
  `dimensions` and `user`), are stored, and merged back in input order. Identical items within one
  request are asked for once.
- Identical concurrent misses coalesce: an item already being fetched by another request is waited
  for (a dict of in-flight futures by key), not asked for again. (A request whose store read ended just
  before another request's fetch of the same item finished may still ask the upstream again.)
- `x-cache`: `hit` when every item came from the store, `miss` when none did, `partial` otherwise (an
  item waited for from another request's upstream call counts as a miss).
- `usage`: what the upstream reported for the call this request made (its `prompt_tokens` and
  `total_tokens`); items served from the store, or from another request's call, count 0 tokens. A
  fully cached answer has `usage: {"prompt_tokens": 0, "total_tokens": 0}`.
- The answer is in the client's `encoding_format`; the floats are exactly the stored float32 values,
  so `float` and `base64` answers agree bit for bit.

Errors (OpenAI's body `{"error": {"message", "type", "param", "code"}}`)
- bad JSON or shapes: 400 `invalid_request_error` (`param` names the field); a body over
  `--max-body-bytes`: 413; unknown path 404; wrong method 405.
- the upstream's own error (429, 4xx, 5xx): passed through with its status, its body (when it is an
  OpenAI error body; else wrapped in one) and its `retry-after`; never cached. Upstream timeout
  (`--upstream-timeout`): 504; unreachable or an answer that is not an embeddings list: 502
  (`server_error`). Requests waiting on that call get the same answer.
- the store cannot be read or written: the request is still served (a read error is a miss, a write
  error leaves the item uncached), `meshkit_embedding_cache_store_errors_total` counts it and the
  first error of each kind is logged at warning (later ones at debug).

Metrics (`/metrics`): `meshkit_embedding_cache_items_total{result=hit|miss|coalesced}`,
`..._requests_total{cache=hit|miss|partial|error}`, `..._upstream_calls_total{status}`,
`..._upstream_seconds` (histogram), `..._stored_bytes_total`, `..._store_errors_total{op=read|write}`.

Not done in this slice
- the `s3://BUCKET/PREFIX` store (`--s3-endpoint`, boto3): `--store s3://...` is refused at start
  (exit 2, one line); the memory tier / packed objects the benchmark target needs;
- `/readyz` reflects the start (the store folder is created and writable) only: it does not probe
  the store or the upstream afterwards;
- OpenTelemetry traces; a size limit / eviction for the store.
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
from prometheus_client import CollectorRegistry, Counter, Histogram

from meshkit.daemon import Daemon, Lifecycle, Resolved
from meshkit.errors import ConfigError
from meshkit.options import option, parse_host_port, parse_seconds, parse_size
from meshkit.sidecars.openai_http import json_error, openai_errors
from meshkit.sidecars.openai_shapes import (
    EmbeddingRequest,
    InvalidRequest,
    Item,
    error_body,
    parse_embedding_request,
    read_json_object,
)
from meshkit.sidecars.vector_store import FileStore, open_store, parse_store_url

log = logging.getLogger("meshkit.embedding_cache")


def _parse_upstream(value: Any) -> str:
    text = str(value).strip().rstrip("/")
    if text and not text.startswith(("http://", "https://")):
        raise ValueError("expected an http(s):// base URL, for example http://127.0.0.1:8090/v1")
    return text


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
        "", "where vectors are kept: file:///DIR (s3:// not yet)", parse=parse_store_url, metavar="URL"
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
    requests: Counter
    upstream_calls: Counter
    upstream_seconds: Histogram
    stored_bytes: Counter
    store_errors: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> Metrics:
        p = "meshkit_embedding_cache"
        return cls(
            Counter(f"{p}_items", "Input items answered, by result", ["result"], registry=registry),
            Counter(
                f"{p}_requests",
                "Embedding requests, by x-cache (error: not answered)",
                ["cache"],
                registry=registry,
            ),
            Counter(
                f"{p}_upstream_calls",
                "Upstream calls, by status (timeout, unreachable)",
                ["status"],
                registry=registry,
            ),
            Histogram(f"{p}_upstream_seconds", "Upstream call latency", registry=registry),
            Counter(f"{p}_stored_bytes", "Vector bytes written to the store", registry=registry),
            Counter(
                f"{p}_store_errors",
                "Store reads/writes that failed (served anyway)",
                ["op"],
                registry=registry,
            ),
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
        store: FileStore,
        metrics: Metrics,
        timeout: float,
    ) -> None:
        self.upstream = upstream
        self.store = store
        self.metrics = metrics
        self.timeout = timeout
        self.session: aiohttp.ClientSession | None = None
        self.inflight: dict[str, asyncio.Future[bytes]] = {}
        self._logged: set[str] = set()

    # -- the store, degrading to upstream-only ----------------------------------------------------
    def _store_error(self, op: str, exc: OSError) -> None:
        self.metrics.store_errors.labels(op).inc()
        level = logging.DEBUG if op in self._logged else logging.WARNING
        self._logged.add(op)
        log.log(level, "store %s failed (served from the upstream): %s", op, exc)

    def _get_many(self, model: str, keys: Sequence[str]) -> list[bytes | None]:
        found: list[bytes | None] = []
        for key in keys:
            try:
                found.append(self.store.get(model, key))
            except OSError as exc:
                self._store_error("read", exc)
                found.append(None)
        return found

    def _put_many(self, model: str, vectors: dict[str, bytes]) -> None:
        for key, data in vectors.items():
            try:
                self.metrics.stored_bytes.inc(self.store.put(model, key, data))
            except OSError as exc:
                self._store_error("write", exc)

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
            raise _bad_gateway(504, f"The upstream did not answer within {self.timeout:g} s.") from None
        except aiohttp.ClientError as exc:
            self.metrics.upstream_calls.labels("unreachable").inc()
            raise _bad_gateway(502, f"The upstream could not be reached: {exc}") from None
        finally:
            self.metrics.upstream_seconds.observe(time.monotonic() - began)
        self.metrics.upstream_calls.labels(str(status)).inc()
        if status != 200:
            raise _passed_through(status, body, retry_after)
        return _read_upstream_answer(body, len(items))

    async def fetch(
        self, req: EmbeddingRequest, user: str | None, keys: dict[str, Item], auth: str | None
    ) -> Fetched:
        """One upstream call for `keys` (key -> item); the futures of `self.inflight` are settled."""
        futures = {key: asyncio.get_running_loop().create_future() for key in keys}
        self.inflight.update(futures)
        try:
            vectors, prompt, total = await self._call_upstream(req, user, list(keys.values()), auth)
            got = dict(zip(keys, vectors, strict=True))
            await asyncio.to_thread(self._put_many, req.model, got)
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
                self.inflight.pop(key, None)

    # -- one request ------------------------------------------------------------------------------
    async def embed(
        self, req: EmbeddingRequest, user: str | None, auth: str | None
    ) -> tuple[dict[str, Any], str]:
        keys = [item_key(req.model, req.dimensions, item) for item in req.items]
        found = await asyncio.to_thread(self._get_many, req.model, keys)
        vectors: dict[str, bytes] = {k: v for k, v in zip(keys, found, strict=True) if v is not None}
        hits = sum(v is not None for v in found)
        owned: dict[str, Item] = {}
        waited: dict[str, asyncio.Future[bytes]] = {}
        for key, item, data in zip(keys, req.items, found, strict=True):
            if data is not None or key in owned or key in waited:
                continue
            if key in self.inflight:
                waited[key] = self.inflight[key]
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
        cache = "hit" if not misses else "miss" if not hits else "partial"
        entries = []
        for index, key in enumerate(keys):
            raw = vectors[key]
            embedding: str | list[float] = (
                base64.b64encode(raw).decode("ascii")
                if req.encoding_format == "base64"
                else list(struct.unpack(f"<{len(raw) // 4}f", raw))
            )
            entries.append({"object": "embedding", "index": index, "embedding": embedding})
        doc = {
            "object": "list",
            "data": entries,
            "model": req.model,
            "usage": {"prompt_tokens": prompt, "total_tokens": total},
        }
        return doc, cache


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
    """(vectors as float32 bytes in input order, prompt_tokens, total_tokens), or a 502."""
    try:
        doc = json.loads(body)
        data = doc["data"]
        if not isinstance(data, list) or len(data) != count:
            raise ValueError(f"expected {count} embeddings")
        vectors: list[bytes | None] = [None] * count
        for entry in data:
            index, embedding = entry["index"], entry["embedding"]
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
    return [v for v in vectors if v is not None], prompt, total


CACHE = web.AppKey("cache", Cache)


async def embeddings(request: web.Request) -> web.Response:
    cache = request.app[CACHE]
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
    user = doc.get("user")
    try:
        answer, result = await cache.embed(req, user, request.headers.get("authorization"))
    except UpstreamError as exc:
        cache.metrics.requests.labels("error").inc()
        return json_error(exc.status, exc.body, exc.headers)
    cache.metrics.requests.labels(result).inc()
    return web.Response(
        body=json.dumps(answer).encode(), content_type="application/json", headers={"x-cache": result}
    )


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
        raise ConfigError(f"embedding-cache needs {' and '.join(missing)}")
    store = open_store(opts.store)
    cache = Cache(opts.upstream, store, Metrics.create(life.registry), opts.upstream_timeout)

    async def open_file_store() -> None:
        await asyncio.to_thread(store.open)

    async def open_session() -> None:
        cache.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, limit_per_host=64))

    async def close_session() -> None:
        if cache.session is not None:
            await cache.session.close()

    await life.start(f"store {store.url}", open_file_store)
    await life.start("http client", open_session, close_session)
    await life.serve_app("http", opts.listen, embedding_cache_app(cache, max_body_bytes=opts.max_body_bytes))


def _sections() -> list[type[Any]]:
    return [EmbeddingCacheOptions]


DAEMON = Daemon(
    name="embedding-cache",
    help="an OpenAI-compatible /v1/embeddings that caches each input item (file:// store)",
    sections=_sections,
    serve=serve,
)
