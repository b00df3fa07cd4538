"""body-hash through a real Envoy, over ext_proc and over ext_authz: what did the upstream receive?"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import xxhash
import yaml

from meshkit.harness.daemons import Echo, Extproc, extproc
from meshkit.harness.envoy import Envoy, envoy
from meshkit.render import Api, FrontConfig

from .conftest import front, request

pytestmark = pytest.mark.integration
MAX = 8 << 20


@pytest.fixture(autouse=True)
def meshkit_answered_every_request(request: pytest.FixtureRequest) -> Iterator[None]:
    """With failure_mode_allow, a meshkit error is invisible to the client: check Envoy's own count."""
    if "ingress" not in request.fixturenames:
        yield
        return
    proxy: Envoy = request.getfixturevalue("ingress")
    before = proxy.failed_open()
    yield
    assert proxy.failed_open() == before, "Envoy let requests through because meshkit failed"


def xxh(body: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(body)


def random_body(size: int, *, binary: bool, seed: int) -> bytes:
    rng = random.Random(seed)
    if binary:
        return rng.randbytes(size)
    return "".join(rng.choice('abcdefghij klmnop\n{}":,é') for _ in range(size)).encode()[:size]


@pytest.mark.parametrize("size", [1, 1024, 65536, 1 << 20, 5 << 20])
@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_upstream_receives_hash_of_exact_body(ingress: Envoy, size: int, binary: bool) -> None:
    body = random_body(size, binary=binary, seed=size)
    resp = request(ingress.url(path="/v1/embeddings"), body=body)
    assert resp.status == 200
    got = resp.json()
    assert got["body_bytes"] == len(body)
    assert got["body_sha256"] == hashlib.sha256(body).hexdigest()  # body untouched
    assert got["headers"]["x-body-hash"] == xxh(body)
    assert resp.headers["x-body-hash"] == xxh(body)  # echoed to the client by Envoy's route


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_no_body_no_header_even_when_spoofed(ingress: Envoy, method: str) -> None:
    resp = request(
        ingress.url(path="/v1/models"),
        method=method,
        body=b"" if method == "POST" else None,
        headers={"x-body-hash": "chosen-by-client"},
    )
    assert resp.status == 200
    assert "x-body-hash" not in resp.upstream_headers
    assert "x-body-hash" not in resp.headers


def test_spoofed_hash_is_overwritten(ingress: Envoy) -> None:
    body = b'{"input": "hello"}'
    resp = request(
        ingress.url(), body=body, headers={"x-body-hash": "0" * 32, "content-type": "application/json"}
    )
    assert resp.upstream_headers["x-body-hash"] == xxh(body)


@pytest.mark.parametrize(
    "size",
    [MAX + 1, MAX + (512 << 10), MAX + (3 << 20)],
    ids=["one-byte-over", "meshkit-answers-over-ext-proc", "envoy-answers"],
)
def test_oversized_body_gets_413_json(
    ingress: Envoy, meshkit_server: Extproc, request_info: pytest.FixtureRequest, size: int
) -> None:
    api = request_info.node.callspec.params["ingress"]
    by_meshkit = (
        'meshkit_extproc_filter_decisions_total{decision="reply",filter="max-body-bytes",status="413"}'
    )
    before = metric(meshkit_server.admin_url, by_meshkit)
    resp = request(ingress.url(), body=b"a" * size)
    assert resp.status == 413
    assert resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert error["type"] == "request_too_large"
    assert str(MAX) in error["message"]
    # Over ext_proc, Envoy buffers 1 MiB past the limit, so meshkit itself answers a body just over it;
    # over ext_authz, Envoy's max_request_bytes answers first (and its reply gets the same JSON).
    answered_by_meshkit = api == "ext_proc" and size < MAX + (1 << 20)
    assert metric(meshkit_server.admin_url, by_meshkit) - before == (1 if answered_by_meshkit else 0)


def test_body_at_the_limit_passes(ingress: Envoy) -> None:
    body = b"b" * MAX
    resp = request(ingress.url(), body=body)
    assert resp.status == 200
    assert resp.upstream_headers["x-body-hash"] == xxh(body)


def test_concurrent_distinct_bodies_each_get_their_own_hash(ingress: Envoy) -> None:
    bodies = [f"request {i} ".encode() * (1 + i % 50) for i in range(300)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        responses = list(pool.map(lambda b: request(ingress.url(), body=b), bodies))
    assert [r.status for r in responses] == [200] * len(bodies)
    assert [r.upstream_headers["x-body-hash"] for r in responses] == [xxh(b) for b in bodies]


def metric(admin_url: str, series: str) -> float:
    """The value of one exact series (`name{labels}`) from the admin /metrics page, 0 if absent."""
    text = request(f"{admin_url}/metrics", method="GET").body.decode()
    values = [line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(series + " ")]
    return float(values[0]) if values else 0.0


def test_metrics_count_requests(
    ingress: Envoy, meshkit_server: Extproc, request_info: pytest.FixtureRequest
) -> None:
    api = request_info.node.callspec.params["ingress"]
    phase = "request_body" if api == "ext_proc" else "check"
    series = (
        f'meshkit_extproc_requests_total{{api="{api}",outcome="continue"}}',
        'meshkit_extproc_filter_decisions_total{decision="continue",filter="body-hash",status=""}',
        f'meshkit_extproc_phase_seconds_count{{api="{api}",phase="{phase}"}}',
    )
    before = [metric(meshkit_server.admin_url, s) for s in series]
    for i in range(3):
        assert request(ingress.url(), body=f"counted {i}".encode()).status == 200
    # An ext_proc stream is counted when it closes, which may be just after Envoy has answered.
    deadline = time.monotonic() + 5
    while True:
        deltas = [metric(meshkit_server.admin_url, s) - b for s, b in zip(series, before, strict=True)]
        if deltas == [3, 3, 3] or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert deltas == [3, 3, 3]


@pytest.fixture
def request_info(request: pytest.FixtureRequest) -> pytest.FixtureRequest:
    return request


# -- canonical JSON, on its own server -------------------------------------------------------------
@pytest.fixture(scope="module", params=["ext_proc", "ext_authz", "ext_authz_http"])
def canonical_ingress(request: pytest.FixtureRequest, workdir: Path, upstream: Echo) -> Iterator[Envoy]:
    args = ["--canonical-json", "--hash-ignore-fields", "user,metadata,stream_options", "--hash", "sha256"]
    with (
        extproc(workdir, args, name=f"canonical-{request.param}") as server,
        front(workdir, upstream, server, request.param) as proxy,
    ):
        yield proxy


def hash_at_upstream(proxy: Envoy, body: bytes) -> str:
    resp = request(proxy.url(), body=body, headers={"content-type": "application/json"})
    assert resp.status == 200
    return str(resp.upstream_headers["x-body-hash"])


def test_canonical_json_ignores_format_order_and_listed_fields(canonical_ingress: Envoy) -> None:
    a = b'{"model": "m1", "input": ["a", "b"], "user": "alice"}'
    b = b'{\n  "input" : [ "a","b" ],\n  "model":"m1", "metadata": {"trace": 1}, "user": "bob"\n}'
    canonical = json.dumps(
        {"input": ["a", "b"], "model": "m1"}, sort_keys=True, separators=(",", ":")
    ).encode()
    assert hash_at_upstream(canonical_ingress, a) == hash_at_upstream(canonical_ingress, b)
    assert hash_at_upstream(canonical_ingress, a) == hashlib.sha256(canonical).hexdigest()


def test_canonical_json_keeps_fields_that_change_the_answer(canonical_ingress: Envoy) -> None:
    a = b'{"model": "m1", "input": "a"}'
    b = b'{"model": "m2", "input": "a"}'
    assert hash_at_upstream(canonical_ingress, a) != hash_at_upstream(canonical_ingress, b)


@pytest.mark.parametrize("body", [b"not json {", b'{"unterminated": ', b"[1, 2", bytes(range(256))])
def test_invalid_json_is_hashed_raw(canonical_ingress: Envoy, body: bytes) -> None:
    assert hash_at_upstream(canonical_ingress, body) == hashlib.sha256(body).hexdigest()


def test_no_log_line_per_request(ingress: Envoy, meshkit_server: Extproc) -> None:
    before = meshkit_server.process.log_text()
    for i in range(20):
        assert request(ingress.url(), body=f"quiet {i}".encode()).status == 200
    added = meshkit_server.process.log_text()[len(before) :]
    assert added == "", f"the request path logged: {added[:500]}"


@pytest.mark.parametrize("api", ["ext_proc", "ext_authz", "ext_authz_http"])
@pytest.mark.parametrize("body", [None, b"", b"with a body"], ids=["GET", "empty", "body"])
def test_meshkit_itself_removes_a_spoofed_hash(
    workdir: Path, upstream: Echo, meshkit_server: Extproc, api: Api, body: bytes | None
) -> None:
    """Without Envoy's header_mutation in front, meshkit's own removal/overwrite must hold on its own."""
    config = FrontConfig(
        upstream_ports=(upstream.port,), extproc_port=meshkit_server.port_for(api), api=api, listen_port=0
    )
    doc = yaml.safe_load(config.render())
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [
        f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.header_mutation"
    ]
    with envoy(yaml.safe_dump(doc), workdir) as proxy:
        resp = request(
            proxy.url(),
            method="GET" if body is None else "POST",
            body=body,
            headers={"x-body-hash": "chosen-by-client"},
        )
        assert resp.status == 200
        assert resp.upstream_headers.get("x-body-hash") == (xxh(body) if body else None)
        assert proxy.failed_open() == 0
