"""The cache tier end to end, every piece real: the official `openai` client -> Envoy ingress (meshkit's
body-hash over ext_authz HTTP; `/v1/embeddings` ring-hashed on x-body-hash) -> Varnish x2 (the shipped
VCL) -> `meshkit embedding-cache` (s3:// store) -> `meshkit dev-upstream`; PURGE through
`meshkit purge-broadcaster` (purge log in Redis). The embedding cache keeps its vectors in a real S3
(SeaweedFS) with its memory tier off, so a hit behind a Varnish miss is an S3 hit.

Two cache layers answer: Varnish (`X-Cache: HIT|MISS`, a whole response per body) and the embedding
cache behind it (`x-cache: hit|miss|partial`, per input item). The dev upstream's `/stats` counts what
reached the provider. Every test asks for texts of its own, so the module's servers are shared.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from meshkit.harness.daemons import (
    DevUpstream,
    EmbeddingCache,
    PurgeBroadcaster,
    dev_upstream,
    embedding_cache,
    extproc,
    purge_broadcaster,
)
from meshkit.harness.envoy import Envoy, envoy
from meshkit.harness.redis import RedisServer, redis_server
from meshkit.harness.s3 import S3Server, s3_server
from meshkit.harness.varnish import VarnishServer, varnish_server, varnishd_binary
from meshkit.render import Api, FrontConfig, meshkit_vcl

from .conftest import Response, request

pytestmark = pytest.mark.integration

MODEL = "text-embedding-3-small"
BUCKET = "tier"
EMBEDDINGS = "/v1/embeddings"
CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class Tier:
    ingress: Envoy
    pods: tuple[VarnishServer, VarnishServer]
    cache: EmbeddingCache
    provider: DevUpstream
    broadcaster: PurgeBroadcaster
    s3: S3Server

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.ingress.url(path="/v1"), api_key="x", max_retries=0, timeout=30)

    def provider_items(self) -> int:
        """Embedding items the provider has been asked for."""
        stats = self.provider.stats()
        return int(stats["embedding_items"])

    def holds(self, pod: int, inputs: list[str], body_hash: str) -> bool:
        """Whether Varnish pod `pod` has this request cached: the same request sent to it directly (as
        Envoy would: the same body and x-body-hash; the host is hashed without its port) is a HIT.
        A MISS caches it there too: ask last."""
        data = json.dumps({"model": MODEL, "input": inputs}).encode()
        headers = {"content-type": "application/json", "x-body-hash": body_hash}
        resp = request(self.pods[pod].url + EMBEDDINGS, body=data, headers=headers)
        assert resp.status == 200, resp.body
        return resp.headers["x-cache"] == "HIT"

    def pod_of(self, inputs: list[str], body_hash: str) -> int:
        """The pod holding this request (asks the first; a HIT there is the answer)."""
        return 0 if self.holds(0, inputs, body_hash) else 1


@pytest.fixture(scope="module")
def tier(workdir: Path) -> Iterator[Tier]:
    try:
        varnishd_binary()
    except Exception as exc:  # the Debian package is missing
        pytest.skip(str(exc))
    with (
        s3_server(workdir / "tier-s3") as s3,
        redis_server(workdir / "tier-redis", name="tier-redis") as redis,
        dev_upstream(workdir, name="tier-provider") as provider,
    ):
        client = boto3.client("s3", **s3.client_kwargs())
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key="warm-up", Body=b"")  # weed grows its first volume now
        yield from _tier(workdir, s3, redis, provider)


def _tier(workdir: Path, s3: S3Server, redis: RedisServer, provider: DevUpstream) -> Iterator[Tier]:
    store = f"s3://{BUCKET}/vectors"
    args = ["--memory-bytes", "0", "--store-timeout", "0.5"]
    with (
        embedding_cache(workdir, provider.base_url, store, args, name="tier-cache", s3=s3) as cache,
        varnish_server(workdir, _vcl(cache, provider), name="tier-varnish-a") as va,
        varnish_server(workdir, _vcl(cache, provider), name="tier-varnish-b") as vb,
        purge_broadcaster(workdir, [f"127.0.0.1:{va.port}", f"127.0.0.1:{vb.port}"], _log_args(redis)) as pb,
        extproc(workdir, ["--filters", "body-hash"], name="tier-extproc") as meshkit,
    ):
        config = FrontConfig(
            upstream_ports=(provider.port,),
            path_routes=((EMBEDDINGS, (va.port, vb.port)), (CHAT, (va.port, vb.port))),
            api=Api.EXT_AUTHZ_HTTP,
            extproc_port=meshkit.port_for("ext_authz_http"),
            filters=("body-hash",),
            listen_port=0,
        )
        with envoy(config.render(), workdir) as ingress:
            yield Tier(ingress, (va, vb), cache, provider, pb, s3)


def _vcl(cache: EmbeddingCache, provider: DevUpstream) -> str:
    """Embeddings from the embedding cache, generated answers (chat) from the provider itself."""
    return meshkit_vcl(backend=("127.0.0.1", cache.port), generated_backend=("127.0.0.1", provider.port))


def _log_args(redis: RedisServer) -> list[str]:
    return ["--redis", redis.url, "--target-timeout", "0.3", "--replay-interval", "0.3"]


@pytest.fixture(autouse=True)
def fresh(tier: Tier) -> None:
    tier.provider.control(reset=True)


def texts(*labels: str) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"{label} {tag}" for label in labels]


def embed(tier: Tier, inputs: list[str], **kw: Any) -> tuple[dict[str, str], list[list[float]]]:
    """(the response headers, lower-cased; the vectors in input order) through the ingress."""
    raw = tier.client().embeddings.with_raw_response.create(model=MODEL, input=inputs, **kw)
    answer = raw.parse()
    assert [d.index for d in answer.data] == list(range(len(inputs)))
    return {k.lower(): v for k, v in raw.headers.items()}, [d.embedding for d in answer.data]


def purge(tier: Tier, path: str = EMBEDDINGS, headers: dict[str, str] | None = None) -> Response:
    return request(tier.broadcaster.url + path, method="PURGE", headers=headers)


def test_first_post_misses_both_layers_then_varnish_hits_and_the_provider_is_asked_once(tier: Tier) -> None:
    inputs = texts("alpha", "beta")
    before = tier.provider_items()
    first, vectors = embed(tier, inputs)
    second, again = embed(tier, inputs)
    assert (first["x-cache"], second["x-cache"]) == ("MISS", "HIT")
    assert again == vectors
    assert first["x-body-hash"] == second["x-body-hash"] != ""
    assert tier.provider_items() - before == 2


def test_the_same_body_lands_on_the_same_pod_and_bodies_spread(tier: Tier) -> None:
    inputs = texts("pinned")
    answers = [embed(tier, inputs)[0] for _ in range(4)]
    assert [h["x-cache"] for h in answers] == ["MISS", "HIT", "HIT", "HIT"]  # one pod, every time
    body_hash = answers[0]["x-body-hash"]
    held = [tier.holds(pod, inputs, body_hash) for pod in (1, 0)]  # the other pod is asked first
    assert sorted(held) == [False, True]  # exactly one pod had it
    pods = []
    for i in range(16):
        each = texts(f"spread {i}")
        pods.append(tier.pod_of(each, embed(tier, each)[0]["x-body-hash"]))
    assert set(pods) == {0, 1}, pods


def test_after_a_purge_varnish_misses_but_the_embedding_cache_answers_without_the_provider(
    tier: Tier,
) -> None:
    inputs = texts("purged")
    stored = stored_count(tier)
    embed(tier, inputs)
    assert embed(tier, inputs)[0]["x-cache"] == "HIT"
    assert wait_for_stored(tier, stored + 1)  # in S3 (the write goes after the answer)
    before = tier.provider_items()
    resp = purge(tier)
    assert resp.status == 200, resp.body
    assert [t["status"] for t in resp.json()["targets"]] == [200, 200]
    # Varnish's X-Cache wins the header name at the ingress; the embedding cache's verdict is in the body
    # of its own answer only through its x-cache, which Varnish passes on a miss: look at both layers.
    headers, _ = embed(tier, inputs)
    assert headers["x-cache"] == "MISS"
    assert tier.provider_items() == before  # the embedding cache had every item
    assert embed(tier, inputs)[0]["x-cache"] == "HIT"


def test_purge_all_empties_every_pod(tier: Tier) -> None:
    inputs = texts("everything")
    embed(tier, inputs)
    assert embed(tier, inputs)[0]["x-cache"] == "HIT"
    resp = purge(tier, "/", {"X-Purge-All": "true"})
    assert resp.status == 200, resp.body
    assert embed(tier, inputs)[0]["x-cache"] == "MISS"


def test_a_half_cached_batch_keeps_its_order_and_asks_the_provider_only_for_the_new_items(tier: Tier) -> None:
    old, new = texts("old", "new")
    _, (old_vector,) = embed(tier, [old])
    before = tier.provider_items()
    headers, vectors = embed(tier, [new, old])
    assert headers["x-cache"] == "MISS"  # a new body for Varnish
    assert vectors[1] == old_vector
    assert tier.provider_items() - before == 1  # only `new` went upstream


def test_a_provider_429_is_passed_through_and_cached_by_neither_layer(tier: Tier) -> None:
    inputs = texts("limited")
    tier.provider.control(fail={"status": 429, "count": 1})
    with pytest.raises(openai.RateLimitError):
        embed(tier, inputs)
    headers, _ = embed(tier, inputs)
    assert headers["x-cache"] == "MISS"  # the 429 was not kept by Varnish
    assert embed(tier, inputs)[0]["x-cache"] == "HIT"


def test_a_client_purge_through_the_ingress_is_refused(tier: Tier) -> None:
    inputs = texts("guarded")
    embed(tier, inputs)
    resp = request(tier.ingress.url(path=EMBEDDINGS), method="PURGE", headers={"X-Purge-All": "true"})
    assert resp.status == 405
    assert resp.json()["error"]["type"] == "method_not_allowed"
    assert embed(tier, inputs)[0]["x-cache"] == "HIT"  # nothing was purged


def test_a_pod_that_missed_a_purge_gets_it_replayed_when_it_answers_again(tier: Tier) -> None:
    inputs = texts("replayed")
    pinned = tier.pod_of(inputs, embed(tier, inputs)[0]["x-body-hash"])
    assert embed(tier, inputs)[0]["x-cache"] == "HIT"
    stopped = tier.pods[pinned].process.pid
    try:
        os.killpg(stopped, signal.SIGSTOP)
        resp = purge(tier, "/", {"X-Purge-All": "true"})
        assert resp.status == 502, resp.body
        statuses = [t["status"] for t in resp.json()["targets"]]
        assert statuses[pinned] is None and statuses[1 - pinned] == 200
    finally:
        os.killpg(stopped, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pending = request(tier.broadcaster.url + "/purges", method="GET").json()["pending"]
        if not pending:
            break
        time.sleep(0.1)
    assert pending == {}
    assert embed(tier, inputs)[0]["x-cache"] == "MISS"  # the replayed ban reached the pod


def test_a_streamed_chat_answer_opted_in_is_cached_whole_and_replayed_as_the_same_stream(tier: Tier) -> None:
    client = tier.client()
    asked: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": f"replay me {uuid.uuid4().hex[:8]}"}
    ]

    def stream() -> tuple[str, list[str], str | None]:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=asked,
            stream=True,
            temperature=0,
            stream_options={"include_usage": True},
            extra_headers={"X-Cache-Chat": "on"},
        )
        chunks = list(raw.parse())
        words = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        usage = [c.usage for c in chunks if c.usage is not None]
        assert len(usage) == 1 and usage[0].completion_tokens > 0
        return raw.headers.get("x-cache", ""), words, chunks[0].id

    before = tier.provider.stats()["calls"]["chat_completions"]
    first = stream()
    second = stream()
    assert (first[0], second[0]) == ("MISS", "HIT")
    assert "".join(first[1]).startswith("You said: replay me")
    assert second[1:] == first[1:]  # the same events, the provider's answer id included
    assert tier.provider.stats()["calls"]["chat_completions"] - before == 1


def test_chat_without_the_opt_in_is_never_cached(tier: Tier) -> None:
    client = tier.client()
    asked: list[ChatCompletionMessageParam] = [{"role": "user", "content": f"fresh {uuid.uuid4().hex[:8]}"}]
    verdicts = []
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=asked,
        )
        verdicts.append(raw.headers.get("x-cache"))
    assert verdicts == ["PASS", "PASS"]


def test_a_surrogate_key_purge_of_one_model_misses_its_answers_only(tier: Tier) -> None:
    """The embedding cache tags every answer `Surrogate-Key: model-<model>`: a purge by that key through
    the broadcaster empties one model's answers from every pod, another model's stay."""
    inputs = texts("tagged by model")
    other = "other-embedding-model"

    def other_cache() -> str:
        raw = tier.client().embeddings.with_raw_response.create(model=other, input=inputs)
        return raw.headers["x-cache"]

    embed(tier, inputs)
    other_cache()
    assert embed(tier, inputs)[0]["x-cache"] == "HIT" and other_cache() == "HIT"
    resp = purge(tier, "/", {"Surrogate-Key": f"model-{MODEL}"})
    assert resp.status == 200, resp.body
    assert [t["status"] for t in resp.json()["targets"]] == [200, 200]
    assert embed(tier, inputs)[0]["x-cache"] == "MISS"
    assert other_cache() == "HIT"


def test_with_s3_stopped_the_tier_still_answers_from_the_provider(tier: Tier) -> None:
    cached = texts("kept")
    stored = stored_count(tier)
    embed(tier, cached)
    assert wait_for_stored(tier, stored + 1)
    tier.s3.process.signal(signal.SIGSTOP)  # weed mini is one process: S3 stops answering
    try:
        started = time.monotonic()
        fresh = texts("while s3 is down")
        headers, vectors = embed(tier, fresh)  # nothing cached anywhere: the provider answers
        assert headers["x-cache"] == "MISS" and len(vectors) == 1
        purge(tier, "/", {"X-Purge-All": "true"})
        before = tier.provider_items()
        headers, _ = embed(tier, cached)  # Varnish purged, S3 unreachable: the provider again
        assert headers["x-cache"] == "MISS"
        assert tier.provider_items() - before == 1
        assert time.monotonic() - started < 10  # bounded by --store-timeout, not a hang
    finally:
        tier.s3.process.signal(signal.SIGCONT)


def stored_count(tier: Tier) -> int:
    """Vectors in the bucket (tests run one at a time: a rise is this test's write)."""
    client = boto3.client("s3", **tier.s3.client_kwargs())
    return int(client.list_objects_v2(Bucket=BUCKET, Prefix="vectors/").get("KeyCount", 0))


def wait_for_stored(tier: Tier, at_least: int, timeout: float = 10.0) -> bool:
    """Whether the bucket holds `at_least` vectors within `timeout` (writes go after the answer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stored_count(tier) >= at_least:
            return True
        time.sleep(0.1)
    return False
