from __future__ import annotations

import hashlib
import json

import pytest
import xxhash

from meshkit.extproc.filter import Exchange
from meshkit.extproc.filters.body_hash import BodyHashFilter, BodyHashOptions, canonical_json


def run(options: BodyHashOptions, body: bytes | None, headers: dict[str, str] | None = None) -> Exchange:
    f = BodyHashFilter(options)
    ex = Exchange(headers or {})
    f.on_request_headers(ex)
    if body is not None:
        ex.body = body
        f.on_request_body(ex)
    return ex


@pytest.mark.parametrize(
    ("options", "body", "expected"),
    [
        (BodyHashOptions(), b"hello", xxhash.xxh3_128_hexdigest(b"hello")),
        (BodyHashOptions(hash="sha256"), b"hello", hashlib.sha256(b"hello").hexdigest()),
        (BodyHashOptions(), bytes(range(256)), xxhash.xxh3_128_hexdigest(bytes(range(256)))),
        (BodyHashOptions(canonical_json=True), b"not json", xxhash.xxh3_128_hexdigest(b"not json")),
        (
            BodyHashOptions(canonical_json=True),
            b' {"b":1, "a":2}',
            xxhash.xxh3_128_hexdigest(b'{"a":2,"b":1}'),
        ),
    ],
)
def test_hash_of_body(options: BodyHashOptions, body: bytes, expected: str) -> None:
    ex = run(options, body, {"x-body-hash": "spoofed"})
    sets, removes, _ = ex.take_mutations()
    assert sets == {"x-body-hash": expected}
    assert removes == set()
    assert len(expected) == (32 if options.hash == "xxh3-128" else 64)


@pytest.mark.parametrize("body", [None, b""])
def test_no_body_removes_client_header(body: bytes | None) -> None:
    sets, removes, _ = run(BodyHashOptions(), body, {"x-body-hash": "spoofed"}).take_mutations()
    assert sets == {}
    assert removes == {"x-body-hash"}


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (b'{"input": "x", "model": "m"}', b'{\n "model" : "m",\n "input":"x"}'),
        (b'{"input": "caf\\u00e9"}', '{"input": "café"}'.encode()),
        (b'{"input": "x", "user": "alice"}', b'{"input": "x", "user": "bob", "metadata": {"k": 1}}'),
        (b'{"input": "x", "stream_options": {"include_usage": true}}', b'{"input":"x"}'),
    ],
)
def test_canonical_json_equivalences(a: bytes, b: bytes) -> None:
    options = BodyHashOptions(canonical_json=True, hash_ignore_fields=("user", "metadata", "stream_options"))
    f = BodyHashFilter(options)
    assert f.digest(a) == f.digest(b)


def test_ignore_fields_only_at_top_level() -> None:
    f = BodyHashFilter(BodyHashOptions(canonical_json=True, hash_ignore_fields=("user",)))
    assert f.digest(b'{"messages": [{"user": "a"}]}') != f.digest(b'{"messages": [{"user": "b"}]}')


@pytest.mark.parametrize(
    "body", [b"[1, 2", b"\xff\xfe{", b'{"a": "\\ud800"}', b"[" * 100000 + b"]" * 100000, b"  "]
)
def test_canonical_json_never_fails(body: bytes) -> None:
    canonical = canonical_json(body, frozenset())
    f = BodyHashFilter(BodyHashOptions(canonical_json=True))
    assert f.digest(body) == xxhash.xxh3_128_hexdigest(canonical if canonical is not None else body)


def test_canonical_form_is_compact_sorted_utf8() -> None:
    assert canonical_json('{"b": "é", "a": [1, 2]}'.encode(), frozenset()) == '{"a":[1,2],"b":"é"}'.encode()
    assert json.loads(canonical_json(b"[3, 1]", frozenset({"x"})) or b"") == [3, 1]


def test_ignore_fields_require_canonical_json() -> None:
    with pytest.raises(ValueError, match="--canonical-json"):
        BodyHashOptions(hash_ignore_fields=("user",))


def test_duplicate_keys_are_hashed_raw() -> None:
    f = BodyHashFilter(BodyHashOptions(canonical_json=True))
    ambiguous = b'{"input": "X", "input": "Y"}'
    assert f.digest(ambiguous) == xxhash.xxh3_128_hexdigest(ambiguous)
    assert f.digest(ambiguous) != f.digest(b'{"input": "Y"}')


def test_big_json_is_hashed_raw() -> None:
    f = BodyHashFilter(BodyHashOptions(canonical_json=True, canonical_json_max_bytes=64))
    small, big = b'{ "a" : 1 }', b'{ "a" : "' + b"x" * 100 + b'" }'
    assert f.digest(small) == xxhash.xxh3_128_hexdigest(b'{"a":1}')
    assert f.digest(big) == xxhash.xxh3_128_hexdigest(big)


@pytest.mark.parametrize(
    "body",
    [
        '{"input": "x"}'.encode("utf-16-le"),
        '{"input": "x"}'.encode("utf-32"),
        b'{"input": NaN}',
        b'{"input": Infinity}',
        b'{"input": 1e400}',
    ],
)
def test_not_quite_json_is_hashed_raw(body: bytes) -> None:
    assert canonical_json(body, frozenset()) is None
    f = BodyHashFilter(BodyHashOptions(canonical_json=True))
    assert f.digest(body) == xxhash.xxh3_128_hexdigest(body)
