"""`meshkit embedding-cache --store s3://...` against a real S3 (SeaweedFS `weed mini`, which checks
signatures), a real `meshkit dev-upstream`, the official `openai` client; one S3 server for the module.
Also the readiness check and the OpenTelemetry traces (a real OTLP/HTTP receiver in the test)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from meshkit.harness.daemons import (
    DevUpstream,
    EmbeddingCache,
    dev_upstream,
    embedding_cache,
    meshkit_argv,
    s3_environment,
)
from meshkit.harness.s3 import S3Server, s3_server
from meshkit.sidecars.embedding_cache import item_key
from meshkit.sidecars.fake_model import vector

from .conftest import request

pytestmark = pytest.mark.integration

MODEL = "text-embedding-3-small"
DIMENSIONS = 1536
BUCKET = "embeddings"
PREFIX = "cache/v1"


@pytest.fixture(scope="module")
def s3(workdir: Path) -> Iterator[S3Server]:
    with s3_server(workdir) as server:
        client = boto3.client("s3", **server.client_kwargs())
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key="warm-up", Body=b"")  # weed grows its first volume now
        yield server


@pytest.fixture(scope="module")
def bucket(s3: S3Server) -> Any:
    return boto3.client("s3", **s3.client_kwargs())


@pytest.fixture(scope="module")
def provider(workdir: Path) -> Iterator[DevUpstream]:
    with dev_upstream(workdir) as server:
        yield server


@pytest.fixture(scope="module")
def cache(workdir: Path, provider: DevUpstream, s3: S3Server) -> Iterator[EmbeddingCache]:
    with embedding_cache(workdir, provider.base_url, f"s3://{BUCKET}/{PREFIX}", s3=s3) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh(provider: DevUpstream) -> None:
    provider.control(reset=True)
    provider.reset_stats()


def _client(server: EmbeddingCache) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=30)


def _unique(*texts: str) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"{text} {tag}" for text in texts]


def _f32(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def _embed(server: EmbeddingCache, texts: list[str], **kwargs: Any) -> tuple[str | None, list[bytes]]:
    raw = _client(server).embeddings.with_raw_response.create(model=MODEL, input=texts, **kwargs)
    return raw.headers.get("x-cache"), [_f32(d.embedding) for d in raw.parse().data]


def _expected(texts: list[str]) -> list[bytes]:
    return [_f32(vector(MODEL, DIMENSIONS, text)) for text in texts]


def _metric(server: EmbeddingCache, name: str) -> float:
    text = request(f"{server.admin_url}/metrics", method="GET").body.decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _eventually(check: Callable[[], bool], what: str, deadline: float = 10.0) -> None:
    """Poll `check` until it holds, at most `deadline` seconds (write-behind lands soon after)."""
    until = time.monotonic() + deadline
    while not check():
        if time.monotonic() > until:
            raise AssertionError(f"not within {deadline:g} s: {what}")
        time.sleep(0.02)


def _object_keys(bucket: Any, texts: list[str]) -> list[str]:
    return [f"{PREFIX}/{MODEL}/{item_key(MODEL, None, text)}" for text in texts]


def _stored(bucket: Any, keys: list[str]) -> bool:
    listed = bucket.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/{MODEL}/")
    return set(keys) <= {obj["Key"] for obj in listed.get("Contents", [])}


# -- the store ---------------------------------------------------------------------------------------
def test_miss_then_hit_and_the_objects_are_in_the_bucket(
    cache: EmbeddingCache, provider: DevUpstream, bucket: Any
) -> None:
    texts = _unique("alpha", "beta", "gamma")
    assert _embed(cache, texts) == ("miss", _expected(texts))
    assert _embed(cache, texts) == ("hit", _expected(texts))
    assert provider.stats()["calls"]["embeddings"] == 1
    keys = _object_keys(bucket, texts)
    _eventually(lambda: _stored(bucket, keys), "the three objects in the bucket")
    for key, want in zip(keys, _expected(texts), strict=True):
        body = bucket.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert len(body) == 4 * DIMENSIONS and body == want  # float32 little-endian, nothing else
    assert _metric(cache, "meshkit_embedding_cache_stored_bytes_total") >= 3 * 4 * DIMENSIONS
    assert _metric(cache, 'meshkit_embedding_cache_store_seconds_count{op="PutObject"}') >= 3


def test_a_restarted_cache_answers_from_s3_with_its_memory_tier_empty(
    workdir: Path, cache: EmbeddingCache, provider: DevUpstream, bucket: Any, s3: S3Server
) -> None:
    texts = _unique(*(f"item {i}" for i in range(16)))
    assert _embed(cache, texts)[0] == "miss"
    _eventually(lambda: _stored(bucket, _object_keys(bucket, texts)), "16 objects in the bucket")
    store = f"s3://{BUCKET}/{PREFIX}"
    by_variable = {**s3_environment(s3), "AWS_ENDPOINT_URL_S3": s3.endpoint_url}  # boto3's own variable
    for args, how in (([], {"s3": s3}), (["--memory-bytes", "0"], {"env": by_variable})):
        with embedding_cache(workdir, provider.base_url, store, args, name="ec-restart", **how) as fresh:
            assert _embed(fresh, texts) == ("hit", _expected(texts))
            assert _metric(fresh, 'meshkit_embedding_cache_hits_total{tier="store"}') == 16
            assert _metric(fresh, 'meshkit_embedding_cache_store_seconds_count{op="GetObject"}') == 16
            assert _embed(fresh, texts)[0] == "hit"
            from_memory = _metric(fresh, 'meshkit_embedding_cache_hits_total{tier="memory"}')
            assert from_memory == (16 if not args else 0)  # the tier filled by the S3 read (when on)
    assert provider.stats()["calls"]["embeddings"] == 1


def test_a_sigterm_flushes_the_queued_writes(
    workdir: Path, provider: DevUpstream, bucket: Any, s3: S3Server
) -> None:
    texts = _unique(*(f"flushed {i}" for i in range(32)))
    store = f"s3://{BUCKET}/{PREFIX}"
    with embedding_cache(workdir, provider.base_url, store, s3=s3, name="ec-flush") as server:
        assert _embed(server, texts)[0] == "miss"
        server.process.signal(signal.SIGTERM)  # right after the answer: the writer drains first
        assert server.process.wait(15) == 0
    assert _stored(bucket, _object_keys(bucket, texts))


# -- S3 in trouble -----------------------------------------------------------------------------------
def test_a_stalled_s3_is_still_served_from_the_upstream_within_the_deadline(
    workdir: Path, provider: DevUpstream, s3: S3Server
) -> None:
    store = f"s3://{BUCKET}/{PREFIX}"
    args = ["--store-timeout", "0.2"]
    with embedding_cache(workdir, provider.base_url, store, args, s3=s3, name="ec-stalled") as server:
        texts = _unique("stalled one", "stalled two")
        s3.process.signal(signal.SIGSTOP)
        try:
            began = time.monotonic()
            assert _embed(server, texts) == ("miss", _expected(texts))
            assert time.monotonic() - began < 2
            began = time.monotonic()
            others = _unique("while skipped")
            assert _embed(server, others) == ("miss", _expected(others))  # the store is skipped now
            assert time.monotonic() - began < 0.5
            ready = request(f"{server.admin_url}/readyz", method="GET")
            assert ready.status == 200  # can answer: the store's state is in the body
            assert ready.json()["store"].startswith("unreachable")
        finally:
            s3.process.signal(signal.SIGCONT)
        assert _metric(server, 'meshkit_embedding_cache_store_errors_total{op="read"}') >= 2
        assert _metric(server, "meshkit_embedding_cache_store_up") == 0
    assert provider.stats()["calls"]["embeddings"] == 2


def test_s3_unreachable_from_the_start_serves_from_the_upstream(
    workdir: Path, provider: DevUpstream, s3: S3Server
) -> None:
    args = ["--s3-endpoint", f"http://127.0.0.1:{_dead_port()}"]
    store = f"s3://{BUCKET}/{PREFIX}"
    env = s3_environment(s3)
    with embedding_cache(workdir, provider.base_url, store, args, env=env, name="ec-dead") as server:
        assert "S3 unreachable" in server.process.log_text()  # said at start, and started anyway
        for _ in range(2):
            texts = _unique("nowhere to keep", "nor this")
            assert _embed(server, texts) == ("miss", _expected(texts))
            time.sleep(1.05)  # past the skip window: the next request tries the store again
        assert _metric(server, 'meshkit_embedding_cache_store_errors_total{op="read"}') == 4
        ready = request(f"{server.admin_url}/readyz", method="GET")
        assert ready.status == 200 and ready.json()["store"].startswith("unreachable: S3 unreachable")
        warnings = [line for line in server.process.log_text().splitlines() if "store read failed" in line]
        assert len(warnings) == 1  # rate-limited: one line for four failed reads
    assert provider.stats()["calls"]["embeddings"] == 2


@pytest.mark.parametrize(
    ("store", "env", "says"),
    [
        (f"s3://{BUCKET}/{PREFIX}", {"AWS_SECRET_ACCESS_KEY": "wrong-secret"}, "SignatureDoesNotMatch"),
        (f"s3://{BUCKET}/{PREFIX}", {"AWS_ACCESS_KEY_ID": "nobody"}, "InvalidAccessKeyId"),
        (f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/x", {}, "NoSuchBucket"),
    ],
    ids=["wrong-secret", "unknown-key", "no-bucket"],
)
def test_a_misconfigured_s3_refuses_to_start_with_one_line(
    tmp_path: Path, s3: S3Server, store: str, env: dict[str, str], says: str
) -> None:
    argv = meshkit_argv(
        "embedding-cache",
        "--listen=127.0.0.1:0",
        "--admin-listen=127.0.0.1:0",
        "--upstream=http://127.0.0.1:1/v1",
        f"--store={store}",
        f"--s3-endpoint={s3.endpoint_url}",
    )
    result = subprocess.run(
        argv,
        env={**os.environ, **s3_environment(s3), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert says in result.stderr and "Traceback" not in result.stderr
    assert "ready daemon=" not in result.stderr + result.stdout


@pytest.mark.parametrize("prefix", ["cache/../elsewhere", "./cache", "cache//v1"])
def test_a_prefix_with_dot_or_empty_segments_is_refused_at_the_start(
    tmp_path: Path, s3: S3Server, prefix: str
) -> None:
    """aiohttp's URL normalises `..`, `.` (and SeaweedFS `//`) away after the request was signed, so
    every GET and PUT got 403 SignatureDoesNotMatch while the bucket check at the start passed: a cache
    that started, said ready and never cached anything."""
    argv = meshkit_argv(
        "embedding-cache",
        "--listen=127.0.0.1:0",
        "--admin-listen=127.0.0.1:0",
        "--upstream=http://127.0.0.1:1/v1",
        f"--store=s3://{BUCKET}/{prefix}",
        f"--s3-endpoint={s3.endpoint_url}",
    )
    env = {**os.environ, **s3_environment(s3)}
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=20, check=False)
    assert result.returncode == 2, result.stderr
    assert "--store" in result.stderr and "segment" in result.stderr and "Traceback" not in result.stderr


# -- readiness -----------------------------------------------------------------------------------------
def test_readyz_says_the_store_is_ok_and_is_503_with_the_upstream_down(
    workdir: Path, cache: EmbeddingCache, s3: S3Server
) -> None:
    ready = request(f"{cache.admin_url}/readyz", method="GET")
    assert ready.status == 200
    assert ready.json()["store"] == "ok" and ready.json()["upstream"] == "ok"
    assert ready.json()["store_url"] == f"s3://{BUCKET}/{PREFIX}"
    dead = f"http://127.0.0.1:{_dead_port()}/v1"
    with embedding_cache(workdir, dead, f"s3://{BUCKET}/{PREFIX}", s3=s3, name="ec-noup") as server:
        ready = request(f"{server.admin_url}/readyz", method="GET")
        assert ready.status == 503
        body = ready.json()
        assert body["reason"].startswith("upstream unreachable") and body["store"] == "ok"
        assert _metric(server, "meshkit_embedding_cache_upstream_up") == 0


# -- traces ----------------------------------------------------------------------------------------
class TraceReceiver:
    """A real OTLP/HTTP endpoint (aiohttp in a thread): POST /v1/traces, protobuf bodies kept."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def traces(req: web.Request) -> web.Response:
            message = ExportTraceServiceRequest()
            message.ParseFromString(await req.read())
            self.requests.append(message)
            return web.Response(body=b"", content_type="application/x-protobuf")

        async def start() -> web.AppRunner:
            app = web.Application()
            app.router.add_post("/v1/traces", traces)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = runner.addresses[0][1]
            return runner

        self.runner = self._loop.run_until_complete(start())
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.runner.cleanup())
        self._loop.close()

    def __enter__(self) -> TraceReceiver:
        self._thread.start()
        assert self._started.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def spans(self) -> list[Any]:
        return [
            span
            for message in list(self.requests)
            for resource in message.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]


def test_otel_spans_for_the_request_the_lookup_and_the_upstream_call(
    workdir: Path, provider: DevUpstream, s3: S3Server
) -> None:
    trace_id = uuid.uuid4().hex
    with TraceReceiver() as receiver:
        args = ["--otel-endpoint", f"http://127.0.0.1:{receiver.port}", "--memory-bytes", "0"]
        env = {"OTEL_BSP_SCHEDULE_DELAY": "50"}
        store = f"s3://{BUCKET}/{PREFIX}"
        with embedding_cache(
            workdir, provider.base_url, store, args, s3=s3, env=env, name="ec-otel"
        ) as server:
            body = b'{"model": "%s", "input": ["%s"]}' % (MODEL.encode(), uuid.uuid4().hex.encode())
            headers = {"content-type": "application/json", "traceparent": f"00-{trace_id}-{'1' * 16}-01"}
            assert request(f"{server.url}/v1/embeddings", body=body, headers=headers).status == 200
            wanted = {"POST /v1/embeddings", "cache.lookup", "store.get_many", "upstream.embeddings"}
            _eventually(lambda: wanted <= {s.name for s in receiver.spans()}, f"spans {wanted}")
    spans = {s.name: s for s in receiver.spans()}
    root = spans["POST /v1/embeddings"]
    assert root.trace_id.hex() == trace_id and root.parent_span_id.hex() == "1" * 16  # the caller's trace
    assert spans["cache.lookup"].parent_span_id == root.span_id
    assert spans["store.get_many"].parent_span_id == spans["cache.lookup"].span_id
    assert spans["upstream.embeddings"].parent_span_id == root.span_id
    attributes = {a.key: a.value for a in root.attributes}
    assert attributes["embeddings.cache"].string_value == "miss"
    assert attributes["embeddings.items"].int_value == 1
    received = provider.stats()
    assert received["calls"]["embeddings"] == 1


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
