"""meshkit's cache VCL (mesh/varnish/meshkit.vcl) on real servers: client -> Envoy ingress (body-hash over
ext_proc, ring-hashed on x-body-hash) -> Varnish x2 -> an echo upstream behind each Varnish.

Each Varnish has its own echo (pod-a behind varnish-a, pod-b behind varnish-b), so an answer's
"upstream" names the Varnish pod that fetched it, and the echoes' request counters count the fetches.
Every test uses bodies of its own (a fresh nonce), so the module's servers are shared.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import xxhash

from meshkit.harness.daemons import Echo, Extproc, echo, purge_broadcaster
from meshkit.harness.envoy import Envoy, envoy
from meshkit.harness.process import free_port
from meshkit.harness.varnish import VarnishServer, varnish_server, varnishd_binary
from meshkit.render import Api, FrontConfig, meshkit_vcl

from .conftest import Response, request

pytestmark = pytest.mark.integration

EMBEDDINGS = "/v1/embeddings"
CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class Pod:
    """One Varnish and the echo behind it."""

    varnish: VarnishServer
    origin: Echo

    def calls(self) -> int:
        """Requests the echo has answered (every method)."""
        text = request(f"{self.origin.admin_url}/metrics", method="GET").body.decode()
        return sum(
            int(float(n)) for n in re.findall(r"^meshkit_echo_requests_total\{[^}]*\} (\S+)$", text, re.M)
        )


@dataclass(frozen=True)
class Stack:
    ingress: Envoy
    pods: tuple[Pod, Pod]

    def url(self, path: str = EMBEDDINGS) -> str:
        return self.ingress.url(path=path)

    def calls(self) -> int:
        return sum(p.calls() for p in self.pods)

    def purge(self, path: str = "/", headers: dict[str, str] | None = None) -> list[Response]:
        """PURGE sent to every pod, as the broadcaster will."""
        return [request(p.varnish.url + path, method="PURGE", headers=headers) for p in self.pods]


@pytest.fixture(scope="module")
def stack(workdir: Path, meshkit_server: Extproc) -> Iterator[Stack]:
    try:
        varnishd_binary()
    except Exception as exc:  # the Debian package is missing
        pytest.skip(str(exc))
    with (
        echo(workdir, ["--name", "pod-a"], name="pod-a") as a,
        echo(workdir, ["--name", "pod-b"], name="pod-b") as b,
        varnish_server(workdir, meshkit_vcl(backend=("127.0.0.1", a.port)), name="varnish-a") as va,
        varnish_server(workdir, meshkit_vcl(backend=("127.0.0.1", b.port)), name="varnish-b") as vb,
    ):
        config = FrontConfig(
            upstream_ports=(va.port, vb.port),
            extproc_port=meshkit_server.port_for("ext_proc"),
            api=Api.EXT_PROC,
            filters=("body-hash",),
            listen_port=0,
        )
        with envoy(config.render(), workdir) as proxy:
            yield Stack(proxy, (Pod(va, a), Pod(vb, b)))


@pytest.fixture(scope="module")
def strict(workdir: Path) -> Iterator[Pod]:
    """A third pod: PURGE allowed only from 192.0.2.1 (not loopback), TTL 1 s, no grace."""
    with (
        echo(workdir, ["--name", "pod-c"], name="pod-c") as c,
        varnish_server(
            workdir,
            meshkit_vcl(backend=("127.0.0.1", c.port), purgers=("192.0.2.1",), ttl=1, grace=0),
            name="varnish-c",
        ) as vc,
    ):
        yield Pod(vc, c)


def body(label: str = "q") -> bytes:
    return json.dumps({"model": "m", "input": f"{label} {uuid.uuid4().hex}"}).encode()


def post(url: str, data: bytes, headers: dict[str, str] | None = None) -> Response:
    return request(url, body=data, headers={"content-type": "application/json", **(headers or {})})


def twice(url: str, data: bytes, headers: dict[str, str] | None = None) -> tuple[Response, Response]:
    return post(url, data, headers), post(url, data, headers)


def caches(resp: Iterable[Response]) -> list[str]:
    return [r.headers.get("x-cache", "") for r in resp]


# -- caching POST on x-body-hash ------------------------------------------------------------------------
def test_first_post_misses_then_hits_and_the_upstream_is_called_once(stack: Stack) -> None:
    data = body()
    before = stack.calls()
    first, second = twice(stack.url(), data)
    assert (first.status, second.status) == (200, 200)
    assert caches([first, second]) == ["MISS", "HIT"]
    assert stack.calls() - before == 1
    assert second.body == first.body  # the same answer replayed (its random "answer" id included)
    seen = first.json()
    assert seen["method"] == "POST"  # not turned into a GET on the miss
    assert seen["body_sha256"] == hashlib.sha256(data).hexdigest()  # the whole body
    digest = xxhash.xxh3_128_hexdigest(data)
    assert seen["headers"]["x-body-hash"] == digest
    assert first.headers["x-body-hash"] == second.headers["x-body-hash"] == digest
    assert "x-meshkit-url" not in first.headers and "x-meshkit-post" not in seen["headers"]


def test_same_body_same_pod_and_bodies_spread_over_both(stack: Stack) -> None:
    landed: dict[bytes, set[str]] = {}
    for i in range(24):
        data = body(f"spread {i}")
        for _ in range(2):
            landed.setdefault(data, set()).add(post(stack.url(), data).json()["upstream"])
    assert all(len(pods) == 1 for pods in landed.values()), "a body reached two pods"
    assert {p for pods in landed.values() for p in pods} == {"pod-a", "pod-b"}


@pytest.mark.parametrize("value", [None, ""])
def test_post_without_a_body_hash_passes(stack: Stack, value: str | None) -> None:
    pod = stack.pods[0]
    data = body()
    headers = {} if value is None else {"x-body-hash": value}
    before = pod.calls()
    answers = twice(pod.varnish.url + EMBEDDINGS, data, headers)
    assert caches(answers) == ["PASS", "PASS"]
    assert pod.calls() - before == 2
    assert answers[0].json()["body_sha256"] == hashlib.sha256(data).hexdigest()


def test_key_is_host_without_port_plus_body_hash(stack: Stack) -> None:
    url = stack.pods[0].varnish.url + EMBEDDINGS
    data, key = body(), uuid.uuid4().hex
    first = post(url, data, {"x-body-hash": key, "host": "api.example:10000"})
    again = post(url, data, {"x-body-hash": key, "host": "api.example:6081"})
    other_host = post(url, data, {"x-body-hash": key, "host": "other.example"})
    other_hash = post(url, data, {"x-body-hash": key + "0", "host": "api.example"})
    assert caches([first, again, other_host, other_hash]) == ["MISS", "HIT", "MISS", "MISS"]
    # through Envoy the host is 127.0.0.1:<ingress port>: a request straight to a pod finds it
    through = body()
    got = post(stack.url(), through)
    direct = [
        post(p.varnish.url + EMBEDDINGS, through, {"x-body-hash": got.headers["x-body-hash"]})
        for p in stack.pods
    ]
    assert sorted(caches(direct)) == ["HIT", "MISS"]  # the pod the ring picked has it


def test_a_big_body_passes_whole(stack: Stack) -> None:
    data = json.dumps({"input": "x" * (2 << 20), "n": uuid.uuid4().hex}).encode()  # over the 1 MiB limit
    before = stack.calls()
    answers = twice(stack.url(), data)
    assert [a.status for a in answers] == [200, 200]
    assert caches(answers) == ["PASS", "PASS"]
    assert stack.calls() - before == 2
    for answer in answers:
        assert answer.json()["body_sha256"] == hashlib.sha256(data).hexdigest()
        assert answer.json()["body_bytes"] == len(data)
        assert answer.headers["x-body-hash"] == xxhash.xxh3_128_hexdigest(data)


def test_a_chunked_post_without_content_length_passes_whole(stack: Stack) -> None:
    varnish = stack.pods[0].varnish
    data = body() * 50
    conn = http.client.HTTPConnection(varnish.host, varnish.port, timeout=30)
    try:
        chunks = [data[i : i + 1000] for i in range(0, len(data), 1000)]
        conn.request(
            "POST", EMBEDDINGS, body=iter(chunks), headers={"x-body-hash": "abc"}, encode_chunked=True
        )
        resp = conn.getresponse()
        got = json.loads(resp.read())
        assert resp.status == 200 and resp.getheader("x-cache") == "PASS"
    finally:
        conn.close()
    assert got["body_sha256"] == hashlib.sha256(data).hexdigest()


def test_get_keeps_varnish_behaviour(stack: Stack) -> None:
    pod = stack.pods[0]
    path = f"/items/{uuid.uuid4().hex}"
    first = request(pod.varnish.url + path, method="GET")
    second = request(pod.varnish.url + path, method="GET")
    assert caches([first, second]) == ["MISS", "HIT"] and second.body == first.body
    assert "x-body-hash" not in first.headers
    authorized = [request(pod.varnish.url + path, method="GET", headers={"authorization": "Bearer t"})]
    cookie = [request(pod.varnish.url + path, method="GET", headers={"cookie": "a=b"})]
    assert caches(authorized + cookie) == ["PASS", "PASS"]  # the built-in rules
    head = request(pod.varnish.url + path, method="HEAD")
    assert head.status == 200 and head.headers["x-cache"] == "HIT"


# -- what is never stored ---------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [400, 404, 429, 500, 503])
def test_error_statuses_are_not_cached(stack: Stack, status: int) -> None:
    data = body()
    before = stack.calls()
    answers = twice(stack.url(), data, {"x-echo-status": str(status)})
    assert [a.status for a in answers] == [status, status]
    assert caches(answers) == ["MISS", "MISS"]
    assert stack.calls() - before == 2
    for answer in answers:  # the hit-for-miss fetch is a POST with the whole body too
        assert answer.json()["method"] == "POST"
        assert answer.json()["body_sha256"] == hashlib.sha256(data).hexdigest()
    good = post(stack.url(), data)  # the same key answered well later is cached
    assert good.status == 200 and caches([good, post(stack.url(), data)]) == ["MISS", "HIT"]


@pytest.mark.parametrize(
    "header",
    [
        "Set-Cookie: session=1",
        "Cache-Control: private",
        "Cache-Control: no-store",
        "Cache-Control: max-age=60, private",
        "Vary: *",
    ],
)
def test_responses_marked_uncacheable_are_not_cached(stack: Stack, header: str) -> None:
    data = body()
    before = stack.calls()
    answers = twice(stack.url(), data, {"x-echo-header": header})
    assert caches(answers) == ["MISS", "MISS"]
    assert stack.calls() - before == 2
    assert answers[1].body != answers[0].body


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_health_and_metrics_are_never_cached(stack: Stack, path: str) -> None:
    pod = stack.pods[0]
    before = pod.calls()
    gets = [request(pod.varnish.url + path, method="GET") for _ in range(2)]
    posts = twice(pod.varnish.url + path, body(), {"x-body-hash": uuid.uuid4().hex})
    assert caches([*gets, *posts]) == ["PASS"] * 4
    assert pod.calls() - before == 4


def test_a_backend_that_does_not_answer_gets_json_503_not_cached(workdir: Path) -> None:
    with varnish_server(workdir, meshkit_vcl(backend=("127.0.0.1", free_port())), name="varnish-down") as v:
        answers = twice(v.url + EMBEDDINGS, body(), {"x-body-hash": "k"})
    assert [a.status for a in answers] == [503, 503]
    assert caches(answers) == ["MISS", "MISS"]
    assert answers[0].headers["content-type"] == "application/json"
    assert answers[0].json()["error"]["type"] == "backend_unavailable"


# -- Authorization and Cookie ------------------------------------------------------------------------------
def test_authorization_is_forwarded_not_keyed_and_cookie_is_removed(stack: Stack) -> None:
    data = body()
    first = post(stack.url(), data, {"authorization": "Bearer alice", "cookie": "track=1"})
    other = post(stack.url(), data, {"authorization": "Bearer bob"})
    assert caches([first, other]) == ["MISS", "HIT"]
    seen = first.json()["headers"]
    assert seen["authorization"] == "Bearer alice"
    assert "cookie" not in seen


def test_vary_authorization_gives_each_caller_their_own_object(stack: Stack) -> None:
    data = body()
    vary = {"x-echo-header": "Vary: Authorization"}
    alice = post(stack.url(), data, {**vary, "authorization": "Bearer alice"})
    bob = post(stack.url(), data, {**vary, "authorization": "Bearer bob"})
    alice_again = post(stack.url(), data, {**vary, "authorization": "Bearer alice"})
    assert caches([alice, bob, alice_again]) == ["MISS", "MISS", "HIT"]
    assert alice_again.body == alice.body != bob.body


# -- lifetimes ---------------------------------------------------------------------------------------------
def test_backend_max_age_with_default_grace_serves_stale_while_revalidating(stack: Stack) -> None:
    data = body()
    first = post(stack.url(), data, {"x-echo-header": "Cache-Control: max-age=1"})
    before = stack.calls()
    time.sleep(1.3)
    stale = post(stack.url(), data, {"x-echo-header": "Cache-Control: max-age=1"})
    assert stale.headers["x-cache"] == "HIT" and stale.body == first.body  # in its 24 h grace
    deadline = time.monotonic() + 5
    while stack.calls() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stack.calls() == before + 1  # one background fetch revalidated it
    fresh = post(stack.url(), data)
    assert fresh.headers["x-cache"] == "HIT" and fresh.body != first.body
    # the background fetch was a POST with the whole body (the cached request body)
    assert fresh.json()["method"] == "POST"
    assert fresh.json()["body_sha256"] == hashlib.sha256(data).hexdigest()


def test_a_5xx_on_revalidation_keeps_the_stale_object(stack: Stack) -> None:
    data = body()
    first = post(stack.url(), data, {"x-echo-header": "Cache-Control: max-age=1"})
    time.sleep(1.3)
    before = stack.calls()
    # the background fetch this request starts copies its headers: the upstream answers it 503
    stale = post(stack.url(), data, {"x-echo-status": "503", "x-echo-header": "Cache-Control: max-age=1"})
    assert stale.status == 200 and stale.headers["x-cache"] == "HIT" and stale.body == first.body
    deadline = time.monotonic() + 5
    while stack.calls() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stack.calls() == before + 1
    time.sleep(0.2)
    again = post(stack.url(), data)  # the 503 was abandoned: the stale object is still served
    assert again.status == 200 and again.body == first.body


def test_backend_stale_while_revalidate_sets_the_grace(stack: Stack) -> None:
    data = body()
    headers = {"x-echo-header": "Cache-Control: max-age=1, stale-while-revalidate=0"}
    assert caches(twice(stack.url(), data, headers)) == ["MISS", "HIT"]
    time.sleep(1.3)  # expired, and the backend allowed no stale answer
    assert post(stack.url(), data, headers).headers["x-cache"] == "MISS"


def test_configured_ttl_and_grace(strict: Pod) -> None:
    url = strict.varnish.url + EMBEDDINGS
    data, key = body(), uuid.uuid4().hex
    first, second = twice(url, data, {"x-body-hash": key})
    assert caches([first, second]) == ["MISS", "HIT"]
    time.sleep(1.3)  # ttl=1, grace=0: expired, nothing stale to serve
    assert post(url, data, {"x-body-hash": key}).headers["x-cache"] == "MISS"


# -- PURGE -------------------------------------------------------------------------------------------------
def cached(stack: Stack, path: str, n: int, headers: dict[str, str] | None = None) -> list[bytes]:
    """`n` bodies POSTed to `path` through the ingress until each is a HIT."""
    bodies = [body(f"purge {i}") for i in range(n)]
    for data in bodies:
        assert caches(twice(stack.url(path), data, headers)) == ["MISS", "HIT"]
    return bodies


def states(stack: Stack, path: str, bodies: list[bytes]) -> list[str]:
    return caches(post(stack.url(path), data) for data in bodies)


def test_purge_of_a_path_removes_every_body_variant_on_every_pod(stack: Stack) -> None:
    path, other = f"/v1/embeddings?purge={uuid.uuid4().hex}", f"/v1/other-{uuid.uuid4().hex}"
    bodies = cached(stack, path, 8)
    kept = cached(stack, other, 2)
    landed = {post(stack.url(path), data).json()["upstream"] for data in bodies}
    assert landed == {"pod-a", "pod-b"}  # the variants sit on both pods
    answers = stack.purge(path)
    assert [a.status for a in answers] == [200, 200]
    assert answers[0].json() == {"purged": "url", "url": path}
    assert answers[0].headers["content-type"] == "application/json"
    assert states(stack, path, bodies) == ["MISS"] * 8
    assert states(stack, other, kept) == ["HIT"] * 2


def test_purge_all(stack: Stack) -> None:
    bodies = cached(stack, EMBEDDINGS, 4)
    answers = stack.purge("/", {"x-purge-all": "true"})
    assert [a.status for a in answers] == [200, 200] and answers[0].json() == {"purged": "all"}
    assert states(stack, EMBEDDINGS, bodies) == ["MISS"] * 4
    bad = stack.purge("/", {"x-purge-all": "yes"})
    assert [a.status for a in bad] == [400, 400]
    assert bad[0].json()["error"]["type"] == "bad_request"
    assert states(stack, EMBEDDINGS, bodies) == ["HIT"] * 4


def tagged(stack: Stack, tags: str) -> tuple[bytes, dict[str, str]]:
    """A body cached with the backend's `Surrogate-Key: tags`, and the headers that refetch it so."""
    data, headers = body(tags), {"x-echo-header": f"Surrogate-Key: {tags}"}
    answers = twice(stack.url(), data, headers)
    assert caches(answers) == ["MISS", "HIT"]
    assert "surrogate-key" not in answers[1].headers  # the tags stay inside
    return data, headers


def test_purge_by_surrogate_key(stack: Stack) -> None:
    run = uuid.uuid4().hex[:8]
    a = tagged(stack, f"team-a-{run} shared-{run}")
    b = tagged(stack, f"team-b-{run} shared-{run}")
    dotted = tagged(stack, f"v1.2-{run}")
    untagged: tuple[bytes, dict[str, str]] = (cached(stack, EMBEDDINGS, 1)[0], {})

    def state() -> list[str]:
        return caches(post(stack.url(), *d) for d in (a, b, dotted, untagged))

    answers = stack.purge("/", {"surrogate-key": f"team-a-{run}"})
    assert [r.status for r in answers] == [200, 200]
    assert answers[0].json() == {"purged": "surrogate-key", "keys": [f"team-a-{run}"]}
    assert state() == ["MISS", "HIT", "HIT", "HIT"]
    assert state() == ["HIT"] * 4

    stack.purge("/", {"surrogate-key": f"v1x2-{run}"})  # a '.' matches only a '.'
    assert state() == ["HIT"] * 4
    answers = stack.purge("/", {"surrogate-key": f"  nothing-{run}   v1.2-{run} "})
    assert answers[0].json()["keys"] == [f"nothing-{run}", f"v1.2-{run}"]
    assert state() == ["HIT", "HIT", "MISS", "HIT"]

    stack.purge("/", {"surrogate-key": f"shared-{run}"})  # a key shared by two objects
    assert state() == ["MISS", "MISS", "HIT", "HIT"]
    stack.purge("/", {"surrogate-key": f"team-{run}"})  # a prefix of a key is not the key
    assert state() == ["HIT"] * 4


@pytest.mark.parametrize(
    "key",
    [".*", "a|b", "team-a|team-b", "(team-a)", "team-[ab]", "x\ty", '"x"', "a\\b", "^", "x,y", "x&&y"],
)
def test_purge_by_surrogate_key_refuses_anything_but_key_characters(stack: Stack, key: str) -> None:
    run = uuid.uuid4().hex[:8]
    data, headers = tagged(stack, f"team-a-{run} team-b-{run}")
    (untagged,) = cached(stack, EMBEDDINGS, 1)
    answers = stack.purge("/", {"surrogate-key": key.replace("team", f"team-{run}")})
    assert [r.status for r in answers] == [400, 400]
    assert answers[0].json()["error"]["type"] == "bad_request"
    assert caches([post(stack.url(), data, headers), post(stack.url(), untagged)]) == ["HIT", "HIT"]


def test_purge_with_both_kinds_or_a_strange_url_is_refused(stack: Stack) -> None:
    both = stack.purge("/", {"x-purge-all": "true", "surrogate-key": "k"})
    assert [r.status for r in both] == [400, 400]
    pod = stack.pods[0]
    quote = request(pod.varnish.url + '/v1/a"b', method="PURGE")
    assert quote.status == 400 and quote.json()["error"]["type"] == "bad_request"


def test_purge_from_a_source_outside_the_acl_is_forbidden(strict: Pod) -> None:
    url = strict.varnish.url + EMBEDDINGS
    data, key = body(), uuid.uuid4().hex
    post(url, data, {"x-body-hash": key})
    for headers in ({}, {"x-purge-all": "true"}, {"surrogate-key": "k"}):
        refused = request(url, method="PURGE", headers=headers)
        assert refused.status == 403
        assert refused.json()["error"] == {
            "message": "PURGE is not allowed from this address",
            "type": "forbidden",
            "code": None,
        }
    assert post(url, data, {"x-body-hash": key}).headers["x-cache"] == "HIT"


def test_client_purge_through_the_ingress_is_refused(stack: Stack) -> None:
    bodies = cached(stack, EMBEDDINGS, 2)
    for headers in ({}, {"x-purge-all": "true"}):
        refused = request(stack.url(), method="PURGE", headers=headers)
        assert refused.status == 405
        assert refused.headers["content-type"] == "application/json"
        assert refused.json()["error"]["type"] == "method_not_allowed"
    assert states(stack, EMBEDDINGS, bodies) == ["HIT", "HIT"]


# -- chat completions: opt-in, streams replayed -------------------------------------------------------------
def test_chat_completions_are_not_cached_unless_the_request_opts_in(stack: Stack) -> None:
    data = json.dumps({"model": "m", "messages": [{"role": "user", "content": uuid.uuid4().hex}]}).encode()
    before = stack.calls()
    assert caches(twice(stack.url(CHAT), data)) == ["PASS", "PASS"]
    assert caches(twice(stack.url(CHAT), data, {"x-cache-chat": "yes please"})) == ["PASS", "PASS"]
    assert stack.calls() - before == 4
    opted = twice(stack.url(CHAT), data, {"x-cache-chat": "on"})
    assert caches(opted) == ["MISS", "HIT"] and opted[1].body == opted[0].body
    assert "x-cache-chat" not in opted[0].json()["headers"]


def test_a_streamed_chat_answer_is_cached_whole_and_replayed(stack: Stack) -> None:
    data = json.dumps(
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": uuid.uuid4().hex}]}
    ).encode()
    headers = {"x-cache-chat": "on", "x-echo-sse": "20"}
    before = stack.calls()
    first, second = twice(stack.url(CHAT), data, headers)
    assert caches([first, second]) == ["MISS", "HIT"]
    assert stack.calls() - before == 1
    for answer in (first, second):
        assert answer.status == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
    assert second.body == first.body
    events = [e.removeprefix("data: ") for e in first.body.decode().split("\n\n") if e]
    assert events[-1] == "[DONE]" and len(events) == 21
    parsed = [json.loads(e) for e in events[:-1]]
    assert [e["index"] for e in parsed] == list(range(20))
    assert {e["body_sha256"] for e in parsed} == {hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize(
    ("cache_control", "expected"),
    [
        ("no-cache", ["MISS", "HIT"]),  # what SSE servers send against buffering proxies: opt-in wins
        ("no-cache, private", ["MISS", "MISS"]),
        ("no-store", ["MISS", "MISS"]),
    ],
)
def test_an_opted_in_stream_is_cached_despite_no_cache_but_not_when_private_or_no_store(
    stack: Stack, cache_control: str, expected: list[str]
) -> None:
    data = json.dumps(
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": uuid.uuid4().hex}]}
    ).encode()
    headers = {"x-cache-chat": "on", "x-echo-sse": "3", "x-echo-header": f"Cache-Control: {cache_control}"}
    answers = twice(stack.url(CHAT), data, headers)
    assert caches(answers) == expected
    assert all(a.headers["content-type"].startswith("text/event-stream") for a in answers)
    assert all("x-meshkit-stream" not in a.headers for a in answers)


def test_no_cache_on_an_answer_that_is_not_a_stream_still_stops_caching(stack: Stack) -> None:
    data = json.dumps({"model": "m", "messages": [{"role": "user", "content": uuid.uuid4().hex}]}).encode()
    answers = twice(stack.url(CHAT), data, {"x-cache-chat": "on", "x-echo-header": "Cache-Control: no-cache"})
    assert caches(answers) == ["MISS", "MISS"]


def test_a_purge_through_the_broadcaster_reaches_what_the_ingress_cached_however_the_path_is_written(
    workdir: Path, stack: Stack
) -> None:
    """Varnish stores the URL the ingress forwarded, normalised by Envoy (dot segments, merged slashes,
    escaped unreserved characters decoded); the broadcaster bans that URL, not the literal one."""
    ns = uuid.uuid4().hex[:8]
    path = f"/v1/embeddings-{ns}"
    targets = [f"127.0.0.1:{p.varnish.port}" for p in stack.pods]
    with purge_broadcaster(workdir, targets, name="vc-broadcaster") as pb:
        for written in (f"//v1/./embeddings-{ns}", f"/v1/x/../%65mbeddings-{ns}", f"/v1%2Fembeddings-{ns}"):
            bodies = cached(stack, path, 2)
            resp = request(pb.url + written, method="PURGE")
            assert resp.status == 200, resp.body
            assert states(stack, path, bodies) == ["MISS"] * 2, written


def _curl(url: str, *args: str) -> tuple[str, str]:
    out = subprocess.run(
        ["curl", "-s", "--max-time", "10", "-w", "\n%{http_code}", *args, url],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    body, _, status = out.rpartition("\n")
    return status, body


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl for HTTP/2 requests")
def test_no_spelling_of_a_client_purge_through_the_ingress_purges(stack: Stack) -> None:
    """HTTP/2 `PURGE` and `purge` (Envoy passes a lower-case :method on unchanged), HTTP/1.1 `purge`,
    and a POST with X-HTTP-Method-Override: PURGE: none reaches meshkit_purge (the VCL compares the
    method case-sensitively; the override is nothing to it)."""
    bodies = cached(stack, EMBEDDINGS, 2)
    url = stack.url()
    status, body = _curl(url, "--http2-prior-knowledge", "-X", "PURGE", "-H", "X-Purge-All: true")
    assert status == "405" and json.loads(body)["error"]["type"] == "method_not_allowed"
    for args in (
        ["--http2-prior-knowledge", "-X", "purge", "-H", "X-Purge-All: true"],
        ["--http1.1", "-X", "purge", "-H", "X-Purge-All: true"],
        ["-X", "POST", "-H", "X-HTTP-Method-Override: PURGE", "-H", "X-Purge-All: true", "-d", "{}"],
    ):
        status, body = _curl(url, *args)
        assert '"purged"' not in body, (args, status, body[:200])
    assert states(stack, EMBEDDINGS, bodies) == ["HIT", "HIT"]
