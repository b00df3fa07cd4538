"""The embedding cache's pure parts and its store: keys, paths, URL parsing, degrading on store errors."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from meshkit.sidecars.embedding_cache import Cache, Metrics, UpstreamError, _read_upstream_answer, item_key
from meshkit.sidecars.openai_shapes import EmbeddingRequest, float32_base64
from meshkit.sidecars.s3_store import S3Store
from meshkit.sidecars.vector_store import FileStore, model_dir, open_store, parse_store_url


def test_item_key_separates_model_dimensions_and_item_kind() -> None:
    keys = {
        item_key("m", None, "1"),
        item_key("m", None, (1,)),
        item_key("m", 64, "1"),
        item_key("n", None, "1"),
    }
    assert len(keys) == 4
    assert item_key("m", None, "1") == item_key("m", None, "1")
    assert len(item_key("m", None, "1")) == 64


@pytest.mark.parametrize(
    ("model", "safe"),
    [
        ("text-embedding-3-small", "text-embedding-3-small"),
        ("org/model:v1", None),
        ("..", None),
        ("m" * 300, None),
        ("é" * 300, None),
    ],
)
def test_model_dir_is_path_safe(model: str, safe: str | None) -> None:
    name = model_dir(model)
    assert len(name) <= 200 and re.fullmatch(r"[A-Za-z0-9._-]+", name)
    if safe is not None:
        assert name == safe
    else:
        assert "/" not in name and not name.startswith(".") and name != model_dir(model + "x")


def test_file_store_round_trip_and_layout(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.open()
    key = item_key("org/m", None, "hello")
    assert store.get("org/m", key) is None
    assert store.put("org/m", key, b"\x00\x00\x80?") == 4
    assert store.get("org/m", key) == b"\x00\x00\x80?"
    path = store.path("org/m", key)
    assert path.parent.name == key[:2] and path.parent.parent.parent == tmp_path
    assert [p.name for p in path.parent.iterdir()] == [key]  # no temp file left behind
    path.write_bytes(b"abc")  # not a whole float32: treated as absent
    assert store.get("org/m", key) is None


def test_store_urls() -> None:
    store = open_store("file:///var/cache/x")
    assert isinstance(store, FileStore) and store.root == Path("/var/cache/x")
    assert parse_store_url("file:///tmp/a") == "file:///tmp/a"
    assert parse_store_url("s3://bucket/prefix") == "s3://bucket/prefix"
    s3 = open_store("s3://my-bucket/a/b/", s3_endpoint="http://127.0.0.1:1")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("my-bucket", "a/b")
    assert s3.url == "s3://my-bucket/a/b"
    assert s3.object_key("org/m", "ab" * 32) == f"a/b/{model_dir('org/m')}/{'ab' * 32}"
    assert S3Store("b-1", "").object_key("m", "k") == "m/k"
    for bad in ("file://host/x", "relative/dir", "file:relative", "http://x/y"):
        with pytest.raises(ValueError, match="file:///DIR"):
            parse_store_url(bad)
    for bad in ("s3://", "s3://UPPER/x", "s3://a/x", "s3://bad_name/x", "s3://b..c/x", "s3://bucket/x?y=1"):
        with pytest.raises(ValueError, match="s3://BUCKET/PREFIX"):
            parse_store_url(bad)
    for bad in ("s3://bucket/a/../b", "s3://bucket/./a", "s3://bucket/a//b", "s3://bucket/a/%2E%2E/b"):
        with pytest.raises(ValueError, match="segment"):
            parse_store_url(bad)


def test_s3_store_without_boto3_is_refused_with_one_line_naming_the_extra() -> None:
    code = (
        "import sys; sys.modules['boto3'] = None; from meshkit.cli import main; "
        "sys.exit(main(['embedding-cache', '--upstream', 'http://127.0.0.1:1/v1', "
        "'--store', 's3://bucket/prefix']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2, result.stderr
    assert "pip install 'meshkit[s3]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_upstream_answer_read_in_index_order() -> None:
    doc = {
        "data": [{"index": 1, "embedding": float32_base64([1.0])}, {"index": 0, "embedding": [0.5]}],
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }
    body = json.dumps(doc).encode()
    vectors, prompt, total = _read_upstream_answer(body, 2)
    assert vectors == [b"\x00\x00\x00?", b"\x00\x00\x80?"] and (prompt, total) == (3, 3)
    for bad in (b"{}", b'{"data": []}', b"nope", b'{"data": [{"index": 0, "embedding": "@@"}]}'):
        with pytest.raises(UpstreamError) as caught:
            _read_upstream_answer(bad, 1)
        assert caught.value.status == 502


@pytest.mark.parametrize(
    "data",
    [
        [{"index": -1, "embedding": [1.0]}, {"index": 0, "embedding": [2.0]}],  # -1 filled the last slot
        [{"index": True, "embedding": [1.0]}, {"index": 0, "embedding": [2.0]}],  # True is 1 in Python
        [{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": [2.0, 3.0]}],  # two lengths
    ],
    ids=["negative-index", "bool-index", "mixed-lengths"],
)
def test_an_upstream_answer_with_bad_indexes_or_lengths_is_a_502_never_cached(
    data: list[dict[str, object]],
) -> None:
    """Each would have been cached under the item keys: a vector at the wrong item, or of two lengths
    (one of them not this model's) in one batch."""
    with pytest.raises(UpstreamError) as caught:
        _read_upstream_answer(json.dumps({"data": data}).encode(), 2)
    assert caught.value.status == 502


class BrokenStore(FileStore):
    def get(self, model: str, key: str) -> bytes | None:
        raise PermissionError("read denied")

    def put(self, model: str, key: str, data: bytes) -> int:
        raise OSError("disk full")


class StalledStore(FileStore):
    async def get_many(self, model: str, keys: Sequence[str]) -> list[bytes | OSError | None]:
        await asyncio.sleep(30)
        return []


def test_store_errors_degrade_counted_per_item_logged_at_most_once_per_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def run() -> None:
        registry = CollectorRegistry()
        cache = Cache("http://unused", BrokenStore(tmp_path), Metrics.create(registry), 1.0)
        await cache.writer.start()
        assert await cache._lookup("m", ["a", "b"]) == {}
        assert cache.store_down_until > 0  # every item failed: skipped for a while
        assert await cache._lookup("m", ["c"]) == {}  # skipped: not counted again
        cache.store_reachable(True)
        assert await cache._lookup("m", ["d", "e", "f"]) == {}
        cache.writer.submit("m", "a", b"\x00\x00\x80?")
        await cache.writer.close(5)
        value = registry.get_sample_value
        assert value("meshkit_embedding_cache_store_errors_total", {"op": "read"}) == 5
        assert value("meshkit_embedding_cache_store_errors_total", {"op": "write"}) == 1

    with caplog.at_level(logging.WARNING, "meshkit.embedding_cache"):
        asyncio.run(run())
    lines = [r.getMessage() for r in caplog.records]
    assert len([line for line in lines if "store read failed" in line]) == 1  # 5 failures, one line
    assert len([line for line in lines if "store write failed" in line]) == 1


def test_a_stalled_store_costs_one_deadline_then_is_skipped(tmp_path: Path) -> None:
    async def run() -> None:
        registry = CollectorRegistry()
        cache = Cache(
            "http://unused", StalledStore(tmp_path), Metrics.create(registry), 1.0, store_timeout=0.05
        )
        began = time.monotonic()
        assert await cache._lookup("m", ["a", "b"]) == {}
        assert 0.04 < time.monotonic() - began < 1
        began = time.monotonic()
        assert await cache._lookup("m", ["c"]) == {}
        assert time.monotonic() - began < 0.01  # marked down: not waited for again
        assert registry.get_sample_value("meshkit_embedding_cache_store_errors_total", {"op": "read"}) == 2

    asyncio.run(run())


def test_waiters_get_the_owners_upstream_error(tmp_path: Path) -> None:
    """A coalesced request answers with the same error as the call it waited for, and nothing is left
    in flight."""

    async def run() -> None:
        cache = Cache("http://unused", FileStore(tmp_path), Metrics.create(CollectorRegistry()), 1.0)
        failure = UpstreamError(429, b'{"error": {}}')

        async def failing(*args: object) -> tuple[list[bytes], int, int]:
            await asyncio.sleep(0.05)
            raise failure

        cache._call_upstream = failing  # type: ignore[method-assign,assignment]
        req = EmbeddingRequest("m", ("x",), "float", None)
        results = await asyncio.gather(
            *(cache.embed(req, None, None) for _ in range(3)), return_exceptions=True
        )
        assert all(r is failure for r in results)
        assert cache.inflight == {}

    asyncio.run(run())


class GatedStore(FileStore):
    """A real file store whose writes wait until the test opens the gate."""

    def __init__(self, root: Path, gate: asyncio.Event) -> None:
        super().__init__(root)
        self.gate = gate

    async def write(self, model: str, key: str, data: bytes) -> int:
        await self.gate.wait()
        return await super().write(model, key, data)


def test_an_answered_item_is_a_hit_while_its_write_is_queued_and_from_the_store_after(
    tmp_path: Path,
) -> None:
    """Memory tier off: the write queue answers until the store has the vector, then the store does;
    the answer never waited for the write."""

    async def run() -> None:
        gate = asyncio.Event()
        registry = CollectorRegistry()
        cache = Cache("http://unused", GatedStore(tmp_path, gate), Metrics.create(registry), 1.0)
        cache.store.open()  # type: ignore[attr-defined]
        calls: list[int] = []

        async def upstream(*args: object) -> tuple[list[bytes], int, int]:
            calls.append(1)
            return [b"\x00\x00\x80?"], 1, 1

        cache._call_upstream = upstream  # type: ignore[method-assign,assignment]
        await cache.writer.start()
        req = EmbeddingRequest("m", ("x",), "base64", None)
        assert (await asyncio.wait_for(cache.embed(req, None, None), 1))[1] == "miss"  # gate still shut
        assert (await cache.embed(req, None, None))[1] == "hit"  # from the write queue
        assert registry.get_sample_value("meshkit_embedding_cache_hits_total", {"tier": "memory"}) == 1
        gate.set()
        await cache.writer.close(5)
        later = Cache("http://unused", FileStore(tmp_path), Metrics.create(CollectorRegistry()), 1.0)
        later._call_upstream = upstream  # type: ignore[method-assign,assignment]
        body, result = await later.embed(req, None, None)
        assert result == "hit" and json.loads(body)["data"][0]["embedding"] == "AACAPw=="
        assert calls == [1]

    asyncio.run(run())
