"""auth (API keys, scopes, identity headers) through a real Envoy on all three paths: what reaches the
upstream, what the client gets back, and what happens when meshkit is down."""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from meshkit.harness.daemons import Echo, Extproc, extproc
from meshkit.harness.envoy import Envoy
from meshkit.render import Api

from .conftest import Response, front, request

pytestmark = pytest.mark.integration

GOOD = "mk_good_0123456789abcdef"
READER = "mk_reader_0123456789abcdef"
EXPIRED = "mk_expired_0123456789abcdef"
REVOKED = "mk_revoked_0123456789abcdef"
LATER = "mk_added_later_0123456789"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


KEYS = [
    {"sha256": sha(GOOD), "subject": "svc-good", "scopes": ["embeddings", "llm"]},
    {"sha256": sha(READER), "subject": "svc-reader", "scopes": ["llm"]},
    {"sha256": sha(EXPIRED), "subject": "svc-old", "scopes": ["llm"], "expires_at": "2020-01-01T00:00:00Z"},
    {"sha256": sha(REVOKED), "subject": "svc-revoked", "scopes": ["llm"], "revoked": True},
]
ROUTES = {
    "scopes": [
        {"path": "/v1/embeddings", "methods": ["POST"], "scope": "embeddings"},
        {"path": "/v1/", "scope": "llm"},
    ]
}


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def keys_file(workdir: Path) -> Path:
    path = workdir / "keys.yaml"
    write_atomically(path, yaml.safe_dump(KEYS))
    return path


@pytest.fixture(scope="module")
def meshkit_server(workdir: Path, keys_file: Path) -> Iterator[Extproc]:
    routes = workdir / "routes.yaml"
    routes.write_text(yaml.safe_dump(ROUTES))
    args = ["--filters", "auth,body-hash", "--api-keys-file", str(keys_file), "--routes-file", str(routes)]
    with extproc(workdir, args) as server:
        yield server


@pytest.fixture(scope="module", params=["ext_proc", "ext_authz", "ext_authz_http"])
def ingress(
    request: pytest.FixtureRequest, workdir: Path, upstream: Echo, meshkit_server: Extproc
) -> Iterator[Envoy]:
    with front(workdir, upstream, meshkit_server, request.param, filters=("auth", "body-hash")) as proxy:
        yield proxy


def post(
    proxy: Envoy, headers: dict[str, str], path: str = "/v1/embeddings", body: bytes = b'{"input": "hi"}'
) -> Response:
    return request(proxy.url(path=path), body=body, headers={"content-type": "application/json", **headers})


def assert_error(resp: Response, status: int, kind: str) -> dict[str, Any]:
    assert resp.status == status, (resp.status, resp.body[:300])
    assert resp.headers["content-type"] == "application/json"
    error: dict[str, Any] = resp.json()["error"]
    assert error["type"] == kind
    return error


def test_good_key_reaches_upstream_with_identity_and_without_credential(ingress: Envoy) -> None:
    resp = post(ingress, {"x-api-key": GOOD, "x-auth-subject": "admin", "x-auth-role": "root"})
    assert resp.status == 200, resp.body[:300]
    got = resp.upstream_headers
    assert got["x-auth-subject"] == "svc-good"
    assert got["x-auth-method"] == "api-key"
    assert got["x-auth-scopes"] == "embeddings llm"
    assert "x-auth-role" not in got  # every client-sent x-auth-* is gone
    assert "x-api-key" not in got
    assert "authorization" not in got
    assert got["x-body-hash"]  # the rest of the chain ran


def test_bearer_key_with_prefix_is_an_api_key(ingress: Envoy) -> None:
    resp = post(ingress, {"authorization": f"Bearer {GOOD}"})
    assert resp.status == 200, resp.body[:300]
    assert resp.upstream_headers["x-auth-subject"] == "svc-good"
    assert "authorization" not in resp.upstream_headers


@pytest.mark.parametrize(
    "headers",
    [
        {"x-api-key": "mk_unknown_0123456789abcdef"},
        {"x-api-key": EXPIRED},
        {"x-api-key": REVOKED},
        {"authorization": "Bearer mk_unknown_0123456789"},
        {"authorization": "Basic dXNlcjpwYXNz"},
        {"authorization": f"Bearer {GOOD}", "x-api-key": GOOD},
    ],
    ids=["unknown", "expired", "revoked", "unknown-bearer", "basic", "two-credentials"],
)
def test_bad_credentials_get_401_json_with_challenge(ingress: Envoy, headers: dict[str, str]) -> None:
    resp = post(ingress, headers)
    error = assert_error(resp, 401, "unauthorized")
    assert resp.headers["www-authenticate"].startswith("Bearer")
    assert "mk_" not in error["message"]  # the credential is never echoed


def test_missing_credentials_get_401_without_error_code(ingress: Envoy) -> None:
    resp = post(ingress, {})
    assert_error(resp, 401, "unauthorized")
    assert resp.headers["www-authenticate"] == 'Bearer realm="meshkit"'


def test_missing_scope_gets_403(ingress: Envoy) -> None:
    resp = post(ingress, {"x-api-key": READER})  # POST /v1/embeddings needs "embeddings"
    error = assert_error(resp, 403, "forbidden")
    assert "embeddings" in error["message"]
    ok = post(ingress, {"x-api-key": READER}, path="/v1/chat/completions")  # needs "llm": has it
    assert ok.status == 200
    assert ok.upstream_headers["x-auth-subject"] == "svc-reader"


def test_path_tricks_do_not_dodge_a_scope_rule(ingress: Envoy) -> None:
    for path in ("/v1//embeddings", "/v1/x/../embeddings", "/v1/%65mbeddings"):
        resp = post(ingress, {"x-api-key": READER}, path=path)
        assert resp.status in (403, 301, 307, 400), (path, resp.status)
        assert resp.status != 200


def test_key_file_reload_and_broken_file(ingress: Envoy, keys_file: Path) -> None:
    assert post(ingress, {"x-api-key": LATER}).status == 401
    added = [*KEYS, {"sha256": sha(LATER), "subject": "svc-later", "scopes": ["embeddings"]}]
    write_atomically(keys_file, yaml.safe_dump(added))
    deadline = time.monotonic() + 2.0  # the promise: within 2 s
    while post(ingress, {"x-api-key": LATER}).status != 200:
        assert time.monotonic() < deadline, "the new key was not accepted within 2 s"
        time.sleep(0.05)
    try:
        keys_file.write_text("- sha256: [this is not\n")  # broken: the last good table stays
        time.sleep(1.2)
        assert post(ingress, {"x-api-key": LATER}).status == 200
        assert post(ingress, {"x-api-key": GOOD}).status == 200
    finally:
        write_atomically(keys_file, yaml.safe_dump(KEYS))
    deadline = time.monotonic() + 2.0
    while post(ingress, {"x-api-key": LATER}).status != 401:  # removed again: revoked within 2 s
        assert time.monotonic() < deadline, "the removed key still works after 2 s"
        time.sleep(0.05)


def test_reload_metrics_count_the_broken_file(meshkit_server: Extproc, ingress: Envoy) -> None:
    with urllib.request.urlopen(meshkit_server.admin_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert 'meshkit_auth_api_keys_reloads_total{result="ok"}' in text
    assert "meshkit_auth_api_keys " in text
    # every decision by credential method and reason (the earlier tests made some of each)
    assert 'meshkit_auth_decisions_total{method="api-key",reason="ok"}' in text
    assert 'meshkit_auth_decisions_total{method="none",reason="unknown_key"}' in text
    assert 'meshkit_auth_decisions_total{method="api-key",reason="missing_scope"}' in text


def phase_count(server: Extproc, phase: str) -> float:
    with urllib.request.urlopen(server.admin_url + "/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(f'meshkit_extproc_phase_seconds_count{{api="ext_proc",phase="{phase}"}}'):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_no_response_headers_message_without_answer_headers(
    meshkit_server: Extproc, ingress: Envoy, request: pytest.FixtureRequest
) -> None:
    """auth may add x-ratelimit-* to answers, so ext_proc is rendered with response headers SEND; a
    request without a rate limit tells Envoy to skip them (mode_override): one message less."""
    before = phase_count(meshkit_server, "response_headers"), phase_count(meshkit_server, "request_headers")
    assert post(ingress, {"x-api-key": GOOD}).status == 200
    after = phase_count(meshkit_server, "response_headers"), phase_count(meshkit_server, "request_headers")
    assert after[0] == before[0]
    if request.node.callspec.params["ingress"] == "ext_proc":
        assert after[1] == before[1] + 1  # this request went over ext_proc (and only its headers)


def test_refused_request_body_never_reaches_meshkit_over_ext_proc(
    meshkit_server: Extproc, ingress: Envoy
) -> None:
    before = phase_count(meshkit_server, "request_body")
    resp = post(ingress, {"x-api-key": "mk_nobody_0123456789"}, body=b"x" * (256 << 10))
    assert resp.status == 401
    assert phase_count(meshkit_server, "request_body") == before


def test_meshkit_down_means_refused(workdir: Path, upstream: Echo) -> None:
    for api in (Api.EXT_PROC, Api.EXT_AUTHZ, Api.EXT_AUTHZ_HTTP):
        dead = DeadServer()
        with front(workdir, upstream, cast(Extproc, dead), api, filters=("auth", "body-hash")) as proxy:
            resp = post(proxy, {"x-api-key": GOOD})
            assert resp.status >= 400, (api, resp.status)
            assert "svc-good" not in resp.body.decode(errors="replace")
            assert json.loads(resp.body)["error"]


class DeadServer:
    """A meshkit that is not there: a port nothing listens on."""

    def port_for(self, api: str) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


def test_envoys_own_400_is_not_turned_into_a_500(ingress: Envoy) -> None:
    """Envoy refuses a `#` in the path itself (400) before any filter runs, and over ext_proc still
    passes that reply through meshkit's response phase: it must reach the client as Envoy's 400."""
    resp = post(ingress, {"x-api-key": GOOD}, path="/v1/embeddings#fragment")
    assert resp.status == 400, (resp.status, resp.body[:200])
