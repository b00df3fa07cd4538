"""The embedding cache's pure parts and its store: keys, paths, URL parsing, degrading on store errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from meshkit.sidecars.embedding_cache import Cache, Metrics, UpstreamError, _read_upstream_answer, item_key
from meshkit.sidecars.openai_shapes import EmbeddingRequest, float32_base64
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
    [("text-embedding-3-small", "text-embedding-3-small"), ("org/model:v1", None), ("..", None)],
)
def test_model_dir_is_path_safe(model: str, safe: str | None) -> None:
    name = model_dir(model)
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
    assert open_store("file:///var/cache/x").root == Path("/var/cache/x")
    assert parse_store_url("file:///tmp/a") == "file:///tmp/a"
    with pytest.raises(ValueError, match="s3:// stores are not supported yet"):
        parse_store_url("s3://bucket/prefix")
    for bad in ("file://host/x", "relative/dir", "file:relative", "http://x/y"):
        with pytest.raises(ValueError, match="file:///DIR"):
            parse_store_url(bad)


def test_s3_store_refused_at_start_with_one_line() -> None:
    argv = [sys.executable, "-m", "meshkit", "embedding-cache", "--upstream", "http://127.0.0.1:1/v1"]
    result = subprocess.run(
        [*argv, "--store", "s3://bucket/prefix"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert "s3:// stores are not supported yet" in result.stderr
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


class BrokenStore(FileStore):
    def get(self, model: str, key: str) -> bytes | None:
        raise PermissionError("read denied")

    def put(self, model: str, key: str, data: bytes) -> int:
        raise OSError("disk full")


def test_store_errors_degrade_to_upstream_only(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    cache = Cache("http://unused", BrokenStore(tmp_path), Metrics.create(registry), 1.0)
    assert cache._get_many("m", ["a", "b"]) == [None, None]
    cache._put_many("m", {"a": b"\x00\x00\x80?"})
    assert registry.get_sample_value("meshkit_embedding_cache_store_errors_total", {"op": "read"}) == 2
    assert registry.get_sample_value("meshkit_embedding_cache_store_errors_total", {"op": "write"}) == 1
    assert cache._logged == {"read", "write"}


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
