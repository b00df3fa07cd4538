"""`meshkit embedding-cache` as a real process in front of a real `meshkit dev-upstream`, driven by the
official `openai` client (no retries) and raw HTTP."""

from __future__ import annotations

import base64
import json
import re
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from meshkit.harness.daemons import DevUpstream, EmbeddingCache, dev_upstream, embedding_cache
from meshkit.sidecars.embedding_cache import item_key
from meshkit.sidecars.fake_model import vector
from meshkit.sidecars.openai_shapes import Item
from meshkit.sidecars.vector_store import FileStore, model_dir

from .conftest import request

pytestmark = pytest.mark.integration

MODEL = "text-embedding-3-small"
DEFAULT_DIMENSIONS = 1536


@pytest.fixture(scope="module")
def provider(workdir: Path) -> Iterator[DevUpstream]:
    with dev_upstream(workdir) as server:
        yield server


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vectors")


@pytest.fixture(scope="module")
def cache(workdir: Path, provider: DevUpstream, store_dir: Path) -> Iterator[EmbeddingCache]:
    with embedding_cache(workdir, provider.base_url, store_dir.as_uri()) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh(provider: DevUpstream) -> None:
    provider.control(reset=True)
    provider.reset_stats()


@pytest.fixture
def client(cache: EmbeddingCache) -> openai.OpenAI:
    return openai.OpenAI(base_url=cache.base_url, api_key="x", max_retries=0, timeout=30)


def _unique(*texts: str) -> list[str]:
    """Texts no other test has asked for (the store is shared by the module)."""
    tag = uuid.uuid4().hex[:8]
    return [f"{text} {tag}" for text in texts]


def _f32(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def _embed(client: openai.OpenAI, **kwargs: Any) -> tuple[str | None, list[list[float]], Any]:
    """(x-cache, the vectors in index order, the parsed answer)."""
    raw = client.embeddings.with_raw_response.create(model=MODEL, **kwargs)
    answer = raw.parse()
    assert [d.index for d in answer.data] == list(range(len(answer.data)))
    return raw.headers.get("x-cache"), [d.embedding for d in answer.data], answer


def _expected(items: list[Item], dimensions: int = DEFAULT_DIMENSIONS) -> list[bytes]:
    return [_f32(vector(MODEL, dimensions, item)) for item in items]


def _upstream_inputs(provider: DevUpstream) -> list[list[Any]]:
    return [call["input"] for call in provider.stats()["embedding_calls"]]


# -- miss, then hit -------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["string", "strings", "token-array", "token-arrays"])
def test_miss_then_hit_in_every_input_form(client: openai.OpenAI, provider: DevUpstream, form: str) -> None:
    seed = int(uuid.uuid4().hex[:6], 16)
    given: Any
    items: list[Item]
    if form == "string":
        given = _unique("the quick brown fox")[0]
        items = [given]
    elif form == "strings":
        given = _unique("one", "two words", "three more words")
        items = list(given)
    elif form == "token-array":
        given = [seed, 7, 42]
        items = [tuple(given)]
    else:
        given = [[seed, 1], [seed, 2], [seed, 3, 4]]
        items = [tuple(t) for t in given]

    result, vectors, answer = _embed(client, input=given)
    assert result == "miss"
    assert answer.object == "list" and answer.model == MODEL
    assert all(d.object == "embedding" for d in answer.data)
    assert answer.usage.prompt_tokens > 0
    assert [_f32(v) for v in vectors] == _expected(items)
    assert _upstream_inputs(provider) == [[i if isinstance(i, str) else list(i) for i in items]]

    result, vectors, answer = _embed(client, input=given)
    assert result == "hit"
    assert [_f32(v) for v in vectors] == _expected(items)
    assert answer.usage.prompt_tokens == 0 and answer.usage.total_tokens == 0
    assert provider.stats()["calls"]["embeddings"] == 1  # the hit did not reach it


def test_string_and_token_array_are_distinct_keys(client: openai.OpenAI, provider: DevUpstream) -> None:
    token = int(uuid.uuid4().hex[:6], 16)
    assert _embed(client, input=[str(token)])[0] == "miss"
    result, vectors, _ = _embed(client, input=[token])
    assert result == "miss"
    assert [_f32(v) for v in vectors] == _expected([(token,)])


def test_dimensions_are_part_of_the_key(client: openai.OpenAI, provider: DevUpstream) -> None:
    texts = _unique("short vectors")
    assert _embed(client, input=texts)[0] == "miss"
    result, vectors, _ = _embed(client, input=texts, dimensions=64)
    assert result == "miss"
    assert [_f32(v) for v in vectors] == _expected(list(texts), 64)
    assert _embed(client, input=texts, dimensions=64)[0] == "hit"
    assert provider.stats()["embedding_calls"][-1]["dimensions"] == 64


# -- partial ---------------------------------------------------------------------------------------
def test_half_cached_batch_is_partial_in_order_one_upstream_call(
    client: openai.OpenAI, provider: DevUpstream
) -> None:
    a, b, x, y = _unique("alpha", "beta", "x-ray", "yankee")
    assert _embed(client, input=[a, b])[0] == "miss"
    provider.reset_stats()
    result, vectors, answer = _embed(client, input=[x, a, y, b])
    assert result == "partial"
    assert [_f32(v) for v in vectors] == _expected([x, a, y, b])
    assert _upstream_inputs(provider) == [[x, y]]  # only the missing items, in one call
    assert answer.usage.prompt_tokens == 4  # the upstream's usage for x and y only (2 words each)
    assert _embed(client, input=[x, a, y, b])[0] == "hit"


def test_repeated_item_in_one_request_asked_once(client: openai.OpenAI, provider: DevUpstream) -> None:
    (a,) = _unique("again")
    result, vectors, _ = _embed(client, input=[a, a, a])
    assert result == "miss"
    assert [_f32(v) for v in vectors] == _expected([a, a, a])
    assert _upstream_inputs(provider) == [[a]]


# -- encodings ---------------------------------------------------------------------------------------
def test_base64_and_float_answers_agree(cache: EmbeddingCache, provider: DevUpstream) -> None:
    texts = _unique("encode me", "and me")
    answers = {}
    for fmt in ("float", "base64", "float"):
        body = json.dumps({"model": MODEL, "input": texts, "encoding_format": fmt}).encode()
        resp = request(f"{cache.url}/v1/embeddings", body=body, headers={"content-type": "application/json"})
        assert resp.status == 200, resp.body
        data = resp.json()["data"]
        if fmt == "float":
            assert all(isinstance(d["embedding"], list) for d in data)
            answers[fmt] = [_f32(d["embedding"]) for d in data]
        else:
            answers[fmt] = [base64.b64decode(d["embedding"]) for d in data]
    assert answers["float"] == answers["base64"] == _expected(list(texts))
    assert provider.stats()["calls"]["embeddings"] == 1


def test_a_float_answer_is_printed_once_and_kept_in_the_memory_tier(
    workdir: Path, provider: DevUpstream, tmp_path: Path
) -> None:
    """The float text of a vector is kept beside it (charged to the tier), so a cached float batch is
    assembled from it; repeated items and the order still hold, bit for bit."""
    texts = _unique("printed", "once", "printed")  # the first and the last are the same item
    with embedding_cache(workdir, provider.base_url, tmp_path.as_uri(), name="ec-float-text") as server:

        def answer(fmt: str) -> bytes:
            body = json.dumps({"model": MODEL, "input": texts, "encoding_format": fmt}).encode()
            resp = request(
                f"{server.url}/v1/embeddings", body=body, headers={"content-type": "application/json"}
            )
            assert resp.status == 200, resp.body
            return resp.body

        def memory_bytes() -> float:
            metrics = request(f"{server.admin_url}/metrics", method="GET").body.decode()
            line = next(
                x for x in metrics.splitlines() if x.startswith("meshkit_embedding_cache_memory_bytes ")
            )
            return float(line.split()[1])

        answer("base64")
        vectors_only = memory_bytes()
        assert vectors_only == 2 * (4 * DEFAULT_DIMENSIONS + 232)  # two distinct items, no text
        first = answer("float")
        with_text = memory_bytes()
        assert with_text > vectors_only + 2 * 4 * DEFAULT_DIMENSIONS  # ~21 KB of text per vector
        assert answer("float") == first and memory_bytes() == with_text  # printed once, kept
        data = json.loads(first)["data"]
        assert [d["index"] for d in data] == [0, 1, 2]
        assert [_f32(d["embedding"]) for d in data] == _expected(list(texts))
    assert provider.stats()["calls"]["embeddings"] == 1


@pytest.mark.parametrize("model", [MODEL, "org/model:v1 (beta)"])
def test_answers_carry_a_valid_surrogate_key_naming_the_model(
    cache: EmbeddingCache, provider: DevUpstream, model: str
) -> None:
    """`Surrogate-Key: model-<model_dir(model)>`, for Varnish's purge by key (`[A-Za-z0-9_.-]+` only),
    on a miss and a hit; an error carries none."""
    c = openai.OpenAI(base_url=cache.base_url, api_key="x", max_retries=0, timeout=30)
    inputs = _unique("tagged")
    keys = []
    for want in ("miss", "hit"):
        raw = c.embeddings.with_raw_response.create(model=model, input=inputs)
        assert raw.headers["x-cache"] == want
        keys.append(raw.headers["surrogate-key"])
    assert keys[0] == keys[1] == f"model-{model_dir(model)}"
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", keys[0])
    if model == MODEL:
        assert keys[0] == f"model-{MODEL}"
    bad = request(f"{cache.url}/v1/embeddings", body=b"{}", headers={"content-type": "application/json"})
    assert bad.status == 400 and "surrogate-key" not in {k.lower() for k in bad.headers}


def test_a_stored_vector_of_the_wrong_length_for_dimensions_is_a_miss_and_replaced(
    workdir: Path, provider: DevUpstream, tmp_path: Path
) -> None:
    """An object at an item's key that is not `dimensions` float32 long (a foreign writer, a bucket
    shared with another deployment) was served as is: a 3-component answer to `dimensions: 64`."""
    text = _unique("wrong length")[0]
    store = FileStore(tmp_path)
    store.open()
    store.put(MODEL, item_key(MODEL, 64, text), _f32([1.0, 2.0, 3.0]))
    with embedding_cache(workdir, provider.base_url, tmp_path.as_uri(), name="ec-wrong-length") as server:
        c = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=30)
        for want in ("miss", "hit"):
            result, vectors, _answer = _embed(c, input=[text], dimensions=64)
            assert result == want and [_f32(v) for v in vectors] == _expected([text], 64)
    assert store.get(MODEL, item_key(MODEL, 64, text)) == _expected([text], 64)[0]  # written over
    assert provider.stats()["calls"]["embeddings"] == 1


# -- the file:// store across a restart ---------------------------------------------------------------
def test_file_store_survives_a_restart(workdir: Path, provider: DevUpstream, tmp_path: Path) -> None:
    texts = _unique("persist", "me")
    store = (tmp_path / "store").as_uri()
    for expected in ("miss", "hit"):
        with embedding_cache(workdir, provider.base_url, store, name="embedding-cache-restart") as server:
            c = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=30)
            result, vectors, _ = _embed(c, input=texts)
            assert result == expected
            assert [_f32(v) for v in vectors] == _expected(list(texts))
    assert provider.stats()["calls"]["embeddings"] == 1
    assert list((tmp_path / "store" / MODEL).glob("*/*"))  # <dir>/<model>/<hash[:2]>/<hash>


# -- errors ----------------------------------------------------------------------------------------
def test_upstream_429_passed_through_not_cached(client: openai.OpenAI, provider: DevUpstream) -> None:
    texts = _unique("limited")
    provider.control(fail={"status": 429, "count": 1, "retry_after": 3})
    with pytest.raises(openai.RateLimitError) as caught:
        _embed(client, input=texts)
    assert caught.value.status_code == 429
    assert caught.value.response.headers.get("retry-after") == "3"
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "rate_limit_exceeded"
    assert body["type"] == "requests"
    result, vectors, _ = _embed(client, input=texts)  # the switch cleared: the upstream is asked again
    assert result == "miss"
    assert [_f32(v) for v in vectors] == _expected(list(texts))
    assert provider.stats()["calls"]["embeddings"] == 2


def test_upstream_500_passed_through(client: openai.OpenAI, provider: DevUpstream) -> None:
    provider.control(fail={"status": 503, "count": 1})
    with pytest.raises(openai.InternalServerError) as caught:
        _embed(client, input=_unique("down"))
    assert caught.value.status_code == 503


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (json.dumps({"model": MODEL, "input": ""}).encode(), "input"),
        (json.dumps({"model": MODEL, "input": ["a", 1]}).encode(), "input"),
        (json.dumps({"input": "x"}).encode(), "model"),
        (json.dumps({"model": MODEL, "input": "x", "encoding_format": "int8"}).encode(), "encoding_format"),
        (json.dumps({"model": MODEL, "input": "x", "temperature": 1}).encode(), "temperature"),
        (b'{"model": "%s", "input": "half \\ud800 a pair"}' % MODEL.encode(), "input"),
        (b'{"model": "%s", "input": ["fine", "\\udfff"]}' % MODEL.encode(), "input[1]"),
        (b'{"model": "m\\ud83d", "input": "x"}', "model"),
        (b'{"model": "m", "input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
    ],
    ids=[
        "bad-json",
        "empty",
        "mixed",
        "no-model",
        "encoding",
        "unknown-field",
        "lone-surrogate",
        "lone-surrogate-item",
        "lone-surrogate-model",
        "nested-too-deep",
    ],
)
def test_bad_input_is_400(
    cache: EmbeddingCache, provider: DevUpstream, body: bytes, param: str | None
) -> None:
    resp = request(f"{cache.url}/v1/embeddings", body=body, headers={"content-type": "application/json"})
    assert resp.status == 400
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert provider.stats()["calls"]["embeddings"] == 0


def test_bad_input_through_the_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input=[])


def test_unknown_path_is_404_openai_style(cache: EmbeddingCache) -> None:
    resp = request(f"{cache.url}/v1/chat/completions", body=b"{}")
    assert resp.status == 404
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_unreachable_upstream_is_502(workdir: Path, tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    upstream = f"http://127.0.0.1:{port}/v1"
    with embedding_cache(workdir, upstream, tmp_path.as_uri(), name="embedding-cache-nowhere") as server:
        c = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError) as caught:
            c.embeddings.create(model=MODEL, input="x")
        assert caught.value.status_code == 502


# -- coalescing ----------------------------------------------------------------------------------------
def test_identical_concurrent_misses_coalesce(cache: EmbeddingCache, provider: DevUpstream) -> None:
    texts = _unique("together", "at once")
    provider.control(delay_ms=400)

    def one(_: int) -> tuple[str | None, list[bytes]]:
        c = openai.OpenAI(base_url=cache.base_url, api_key="x", max_retries=0, timeout=30)
        result, vectors, _answer = _embed(c, input=texts)
        return result, [_f32(v) for v in vectors]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    assert provider.stats()["calls"]["embeddings"] == 1
    assert all(vectors == _expected(list(texts)) for _, vectors in answers)
    assert all(result == "miss" for result, _ in answers)


def test_a_miss_in_flight_for_another_api_key_is_not_shared_with_its_error(
    cache: EmbeddingCache, provider: DevUpstream
) -> None:
    """Two tenants (API keys) miss the same item at once; the first one's call is refused (its rate
    limit, its bad key): the second must get its own answer, not the other tenant's 429."""
    texts = _unique("shared by two tenants")
    provider.control(delay_ms=400, fail={"status": 429, "count": 1})

    def one(key: str) -> Any:
        c = openai.OpenAI(base_url=cache.base_url, api_key=key, max_retries=0, timeout=30)
        try:
            return _embed(c, input=texts)
        except openai.APIStatusError as exc:
            return exc.status_code

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(one, "tenant-a")
        time.sleep(0.15)  # tenant-a's call is upstream now (it takes 400 ms)
        second = pool.submit(one, "tenant-b")
        assert first.result() == 429
        result, vectors, _answer = second.result()
    assert result == "miss" and [_f32(v) for v in vectors] == _expected(list(texts))
    assert provider.stats()["calls"]["embeddings"] == 2


def test_a_long_model_name_neither_fails_its_items_nor_takes_the_store_away_from_others(
    workdir: Path, provider: DevUpstream, tmp_path: Path
) -> None:
    """A model name longer than a file name may be (255 bytes; S3 keys: 1024) made every read of its
    items an OSError, and a lookup whose every item failed marks the store down for everyone: one
    request with a long name sent everybody's cached items to the upstream."""
    long_model = "m" * 300
    texts = _unique("kept", "also kept")
    args = ["--memory-bytes", "0"]
    with embedding_cache(workdir, provider.base_url, tmp_path.as_uri(), args, name="ec-long-model") as server:
        c = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=30)
        assert _embed(c, input=texts)[0] == "miss"
        for _ in range(2):
            c.embeddings.create(model=long_model, input=texts)  # its items are cached too
            assert _embed(c, input=texts)[0] == "hit"
        raw = c.embeddings.with_raw_response.create(model=long_model, input=texts)
        assert raw.headers.get("x-cache") == "hit"
        metrics = request(f"{server.admin_url}/metrics", method="GET").body.decode()
        assert "meshkit_embedding_cache_store_errors_total{" not in metrics  # no read nor write failed
    assert provider.stats()["calls"]["embeddings"] == 2


# -- the shared lifecycle ----------------------------------------------------------------------------
def test_admin_endpoints(cache: EmbeddingCache, client: openai.OpenAI) -> None:
    _embed(client, input=_unique("counted"))
    assert request(f"{cache.admin_url}/healthz", method="GET").status == 200
    assert request(f"{cache.admin_url}/readyz", method="GET").status == 200
    metrics = request(f"{cache.admin_url}/metrics", method="GET").body.decode()
    for name in (
        'meshkit_embedding_cache_items_total{result="miss"}',
        'meshkit_embedding_cache_upstream_calls_total{status="200"}',
        "meshkit_embedding_cache_upstream_seconds_count",
        "meshkit_embedding_cache_stored_bytes_total",
    ):
        assert name in metrics, name


def test_upstream_timeout_is_504_not_cached(workdir: Path, provider: DevUpstream, tmp_path: Path) -> None:
    texts = _unique("slow")
    store = tmp_path.as_uri()
    args = ["--upstream-timeout", "0.2"]
    with embedding_cache(workdir, provider.base_url, store, args, name="embedding-cache-timeout") as server:
        c = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=30)
        provider.control(delay_ms=1000)
        with pytest.raises(openai.InternalServerError) as caught:
            c.embeddings.create(model=MODEL, input=texts)
        assert caught.value.status_code == 504
        provider.control(delay_ms=0)
        assert _embed(c, input=texts)[0] == "miss"  # the timed-out call left nothing behind


def test_body_over_the_limit_is_413(workdir: Path, provider: DevUpstream, tmp_path: Path) -> None:
    args = ["--max-body-bytes", "1024"]
    with embedding_cache(
        workdir, provider.base_url, tmp_path.as_uri(), args, name="embedding-cache-413"
    ) as s:
        body = json.dumps({"model": MODEL, "input": "x" * 4096}).encode()
        resp = request(f"{s.url}/v1/embeddings", body=body, headers={"content-type": "application/json"})
        assert resp.status == 413
        assert resp.json()["error"]["type"] == "invalid_request_error"
    assert provider.stats()["calls"]["embeddings"] == 0
