"""Review: a scope rule holds for every reading an upstream may give the request, not only the literal
one. Found: an HTTP/2 `:method: post` (Envoy passes it on as it is, over ext_proc and ext_authz gRPC)
missed a `methods: [POST]` rule and fell to a weaker one; `/v1/embeddings;x` (Tomcat/Spring serve it as
`/v1/embeddings`) and `/V1/EMBEDDINGS` (ASP.NET Core routes it there) dodged the `/v1/embeddings` rule."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from meshkit.extproc.chain import Chain
from meshkit.extproc.filter import Exchange, Phase
from meshkit.extproc.filters.auth import AuthFilter, AuthOptions
from meshkit.extproc.routes_file import Routes, ScopeRule

READER = "mk_reader_0123456789abcdef"  # llm only
RULES = Routes(
    scopes=(
        ScopeRule("/v1/embeddings", "embeddings", frozenset({"POST"})),
        ScopeRule("/v1/", "llm"),
    )
)


@pytest.mark.parametrize(
    ("method", "path", "needed"),
    [
        ("POST", "/v1/embeddings", ("embeddings",)),
        ("GET", "/v1/embeddings", ("llm",)),
        ("POST", "/v1/chat/completions", ("llm",)),
        ("post", "/v1/embeddings", ("llm", "embeddings")),  # as sent, and as Flask reads it
        ("Post", "/v1/embeddings/x", ("llm", "embeddings")),
        ("POST", "/v1/embeddings;jsessionid=1", ("llm", "embeddings")),  # Tomcat/Spring strip it
        ("POST", "/v1;x/embeddings;y/z", ("embeddings",)),  # every segment's parameters
        ("POST", "/V1/EMBEDDINGS", ("embeddings",)),  # case-blind routers
        ("POST", "/V1/Chat", ("llm",)),
        ("POST", "/other", ()),
        ("POST", "/other;x", ()),
        ("POST", "/v1/embeddings?x=;", ("embeddings",)),  # the query is not the path
    ],
)
def test_every_reading_counts(method: str, path: str, needed: tuple[str, ...]) -> None:
    assert RULES.required_scopes(method, path) == needed


def test_no_rules_need_nothing() -> None:
    assert Routes().required_scopes("post", "/V1;x") == ()


def test_an_upper_case_prefix_also_covers_the_lower_case_path() -> None:
    routes = Routes(scopes=(ScopeRule("/Admin", "admin"),))
    assert routes.required_scopes("GET", "/admin/x") == ("admin",)
    assert routes.required_scopes("GET", "/Admin/x") == ("admin",)


def test_the_literal_reading_is_always_among_them() -> None:
    routes = Routes(scopes=(ScopeRule("/a", "s1"), ScopeRule("/A/b", "s2")))
    # The literal reading needs s1 (a case-sensitive upstream: /a/B is under /a); case-blind, /A/b: s2.
    assert routes.required_scopes("GET", "/a/B") == ("s1", "s2")


@pytest.fixture
async def auth(tmp_path: Path) -> AuthFilter:
    keys = tmp_path / "keys.yaml"
    digest = hashlib.sha256(READER.encode()).hexdigest()
    keys.write_text(yaml.safe_dump([{"sha256": digest, "subject": "svc-reader", "scopes": ["llm"]}]))
    f = AuthFilter(AuthOptions(api_keys_file=str(keys)), RULES)
    await f.start()
    return f


@pytest.mark.parametrize(
    ("method", "path"),
    [("post", "/v1/embeddings"), ("POST", "/v1/embeddings;x"), ("POST", "/V1/Embeddings")],
)
async def test_the_filter_refuses_what_a_reading_needs(auth: AuthFilter, method: str, path: str) -> None:
    try:
        ex = Exchange({":method": method, ":path": path, "x-api-key": READER})
        reply = await Chain([auth]).run(Phase.REQUEST_HEADERS, ex)
        assert reply is not None and reply.status == 403
        assert "'embeddings'" in json.loads(reply.body)["error"]["message"]
        assert 'scope="embeddings"' in dict(reply.headers)["www-authenticate"]
        ok = Exchange({":method": "POST", ":path": "/v1/chat", "x-api-key": READER})
        assert await Chain([auth]).run(Phase.REQUEST_HEADERS, ok) is None
    finally:
        await auth.close()
