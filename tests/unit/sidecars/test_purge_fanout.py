"""The purge broadcaster's validation mirrors meshkit.vcl's (targets: test_purge_targets.py)."""

from __future__ import annotations

import pytest

from meshkit.sidecars.purge_fanout import BadPurge, Purge


def test_the_three_kinds_and_their_headers() -> None:
    assert Purge.parse("/v1/x?a=1", [], []).headers() == {}
    assert Purge.parse("/", ["true"], []).headers() == {"X-Purge-All": "true"}
    keys = Purge.parse("/", [], ["  a  b.c ", "d_e-f"])
    assert keys.keys == ("a", "b.c", "d_e-f") and keys.headers() == {"Surrogate-Key": "a b.c d_e-f"}
    assert Purge.from_json(keys.to_json()) == keys


@pytest.mark.parametrize(
    ("path", "purge_all", "keys"),
    [
        ("/", [], [".*"]),
        ("/", [], ["a|b"]),
        ("/", [], ["x\ty"]),
        ("/", [], ['"x"']),
        ("/", [], [""]),
        ("/", ["yes"], []),
        ("/", ["true", "true"], []),
        ("/", ["true"], ["k"]),
        ("/a b", [], []),
        ("/a<b>", [], []),
        ("a", [], []),
    ],
)
def test_what_the_vcl_refuses_is_refused(path: str, purge_all: list[str], keys: list[str]) -> None:
    with pytest.raises(BadPurge):
        Purge.parse(path, purge_all, keys)


@pytest.mark.parametrize(
    ("written", "forwarded"),  # what Envoy 1.40 forwarded with meshkit's ingress settings
    [
        ("/v1/./embeddings", "/v1/embeddings"),
        ("//v1//embeddings", "/v1/embeddings"),
        ("/v1/x/../embeddings", "/v1/embeddings"),
        ("/v1/%65mbeddings", "/v1/embeddings"),
        ("/v1/%2E%2E/admin", "/admin"),
        ("/v1/%7euser", "/v1/~user"),
        ("/v1/a%3ab", "/v1/a%3ab"),
        ("/a%25b", "/a%25b"),
        ("/%60", "/%60"),
        ("/a/.", "/a/"),
        ("/a/..", "/"),
        ("/a/b/../../..", "/"),
        ("/a/.b/..c/", "/a/.b/..c/"),
        ("/A%2fB%2F..%2Fc", "/A/c"),  # Envoy redirects there
        ("/v1/embeddings?x=%41&y=/./", "/v1/embeddings?x=%41&y=/./"),
    ],
)
def test_a_path_purge_bans_the_url_the_ingress_forwards(written: str, forwarded: str) -> None:
    assert Purge.parse(written, [], []).path == forwarded
