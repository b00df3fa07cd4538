"""Review of the auth filter through a real Envoy on all three paths: what a repeated credential header
does (every path must see the same value, and refuse a repeat), and scope rules against the readings an
upstream may give a request (`;parameters`, case, an HTTP/2 lower-case method)."""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from meshkit.harness.daemons import Echo, Extproc, extproc
from meshkit.harness.envoy import Envoy

from .conftest import Response, front

pytestmark = pytest.mark.integration

GOOD = "mk_good_0123456789abcdef"
READER = "mk_reader_0123456789abcdef"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


KEYS = [
    {"sha256": sha(GOOD), "subject": "svc-good", "scopes": ["embeddings", "llm"]},
    {"sha256": sha(READER), "subject": "svc-reader", "scopes": ["llm"]},
]
ROUTES = {
    "scopes": [
        {"path": "/v1/embeddings", "methods": ["POST"], "scope": "embeddings"},
        {"path": "/v1/", "scope": "llm"},
    ]
}


@pytest.fixture(scope="module")
def meshkit_server(workdir: Path) -> Iterator[Extproc]:
    keys, routes = workdir / "review-keys.yaml", workdir / "review-routes.yaml"
    keys.write_text(yaml.safe_dump(KEYS))
    routes.write_text(yaml.safe_dump(ROUTES))
    args = ["--filters", "auth,body-hash", "--api-keys-file", str(keys), "--routes-file", str(routes)]
    with extproc(workdir, args, name="meshkit-review") as server:
        yield server


@pytest.fixture(scope="module", params=["ext_proc", "ext_authz", "ext_authz_http"])
def ingress(
    request: pytest.FixtureRequest, workdir: Path, upstream: Echo, meshkit_server: Extproc
) -> Iterator[Envoy]:
    with front(workdir, upstream, meshkit_server, request.param, filters=("auth", "body-hash")) as proxy:
        yield proxy


def send(
    proxy: Envoy, headers: list[tuple[str, str]], path: str = "/v1/chat", method: str = "POST"
) -> Response:
    """One HTTP/1.1 request whose headers may repeat (http.client's putheader, in order)."""
    host, port = proxy.listeners["ingress"]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    body = b'{"input": "hi"}'
    try:
        conn.putrequest(method, path)
        for name, value in [("content-type", "application/json"), ("content-length", str(len(body)))]:
            conn.putheader(name, value)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


@pytest.mark.parametrize(
    "headers",
    [
        [("x-api-key", "mk_junk"), ("x-api-key", GOOD)],
        [("x-api-key", GOOD), ("x-api-key", "mk_junk")],
        [("x-api-key", GOOD), ("x-api-key", GOOD)],
        [("authorization", "Bearer mk_junk"), ("authorization", f"Bearer {GOOD}")],
        [("authorization", f"Bearer {GOOD}"), ("authorization", f"Bearer {GOOD}")],
    ],
    ids=["junk-then-good", "good-then-junk", "good-twice", "bearer-junk-then-good", "bearer-twice"],
)
def test_a_repeated_credential_header_is_refused_on_every_path(
    ingress: Envoy, headers: list[tuple[str, str]]
) -> None:
    # Was: over ext_proc alone, the last x-api-key decided (junk + good passed, and with
    # --forward-credentials the upstream got both); ext_authz joins repeats with a comma and refused.
    resp = send(ingress, headers)
    assert resp.status == 401, (resp.status, resp.body[:300])
    assert resp.json()["error"]["type"] == "unauthorized"


def test_one_credential_still_passes(ingress: Envoy) -> None:
    resp = send(ingress, [("x-api-key", GOOD), ("x-auth-subject", "root")])
    assert resp.status == 200, resp.body[:300]
    assert resp.upstream_headers["x-auth-subject"] == "svc-good"
    assert "x-api-key" not in resp.upstream_headers


@pytest.mark.parametrize("path", ["/v1/embeddings;x=1", "/V1/Embeddings", "/v1;a/embeddings"])
def test_scope_rule_holds_for_other_readings_of_the_path(ingress: Envoy, path: str) -> None:
    resp = send(ingress, [("x-api-key", READER)], path=path)
    assert resp.status == 403, (path, resp.status, resp.body[:300])
    assert send(ingress, [("x-api-key", GOOD)], path=path).status == 200


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl for an HTTP/2 request")
def test_http2_lower_case_method_does_not_dodge_a_method_rule(ingress: Envoy) -> None:
    # HTTP/2 lets a client send `:method: post`; Envoy passes it on unchanged (over HTTP/1.1 it 400s).
    url = ingress.url(path="/v1/embeddings")
    out = subprocess.run(
        [
            "curl",
            "-s",
            "--http2-prior-knowledge",
            "-X",
            "post",
            "-H",
            f"x-api-key: {READER}",
            "-d",
            "{}",
            "-w",
            "\n%{http_code}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    body, _, status = out.rpartition("\n")
    assert status in ("403", "400"), (status, body[:300])  # 400: meshkit's HTTP server refuses `post`
    if status == "403":
        assert json.loads(body)["error"]["type"] == "forbidden"
