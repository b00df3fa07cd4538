"""Review of model-router through real Envoy: bodies an upstream may read as a model the allow-list
never checked (compressed, another encoding, a case-variant key), and an alias on a chunked request."""

from __future__ import annotations

import codecs
import gzip
import hashlib
import http.client
import json
from collections.abc import Iterator

import pytest

from meshkit.harness.envoy import Envoy

from . import test_model_router_envoy as base
from .conftest import Response
from .test_model_router_envoy import answered_by, api_of, error_of, post

# its module-scoped fixtures: the same upstreams, meshkit servers and Envoys
workdir, upstreams, aliased, plain = base.workdir, base.upstreams, base.aliased, base.plain
ingress = base.ingress

pytestmark = pytest.mark.integration
FORBIDDEN = {"model": "gpt-2-forbidden", "messages": [{"role": "user", "content": "hi"}]}


def test_a_compressed_body_is_refused_on_every_path(ingress: Envoy) -> None:
    body = gzip.compress(json.dumps(FORBIDDEN).encode())
    error = error_of(post(ingress, body, {"content-encoding": "gzip"}), 415)
    assert error["code"] == "unsupported_content_encoding"


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_json_in_another_encoding_is_refused_on_every_path(ingress: Envoy, encoding: str) -> None:
    body = json.dumps(FORBIDDEN).encode(encoding)
    assert json.loads(body)["model"] == FORBIDDEN["model"]  # Python's json.loads(bytes) reads it
    assert error_of(post(ingress, body), 400)["code"] == "invalid_json"
    if encoding == "utf-8-sig":
        assert body.startswith(codecs.BOM_UTF8)


def test_a_case_variant_of_model_is_refused_on_every_path(ingress: Envoy) -> None:
    resp = post(ingress, b'{"model": "gpt-4o", "MODEL": "gpt-2-forbidden", "messages": []}')
    assert error_of(resp, 400)["code"] == "duplicate_key"


def chunked(proxy: Envoy, body: bytes, pieces: int = 3) -> Response:
    host, port = proxy.listeners["ingress"]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    step = -(-len(body) // pieces)

    def parts() -> Iterator[bytes]:
        for i in range(0, len(body), step):
            yield body[i : i + step]

    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=parts(),
            headers={"content-type": "application/json"},
            encode_chunked=True,
        )
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def test_alias_on_a_chunked_request_without_content_length(
    ingress: Envoy, request: pytest.FixtureRequest
) -> None:
    api = api_of(request)
    if api == "ext_authz_http":
        pytest.skip("no aliases with --http-listen")
    doc = {"model": "fast", "messages": [{"role": "user", "content": "x" * 5000}]}
    resp = chunked(ingress, json.dumps(doc).encode())
    if api == "ext_authz":
        assert error_of(resp, 500)["code"] == "body_rewrite_needs_ext_proc"
        return
    assert answered_by(resp) == "echo-gpt-4o-mini"
    seen = resp.json()
    expected = json.dumps({**doc, "model": "gpt-4o-mini"}, separators=(",", ":")).encode()
    assert seen["body_sha256"] == hashlib.sha256(expected).hexdigest()
    assert seen["headers"].get("content-length") in (None, str(len(expected)))
