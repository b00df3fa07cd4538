"""json_body: the strict reading of a request body shared by body-hash and model-router."""

from __future__ import annotations

import asyncio
import json

import pytest

from meshkit.extproc import json_body
from meshkit.extproc.filter import Exchange


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"a": [1, 2.5, "x", null, true]}', {"a": [1, 2.5, "x", None, True]}),
        (b" \r\n\t[1]", [1]),
        ('{"é": "ü"}'.encode(), {"é": "ü"}),
        (b'{"a": {"a": 1}, "b": {"a": 2}}', {"a": {"a": 1}, "b": {"a": 2}}),  # same key, other objects
    ],
)
def test_parses_json(body: bytes, expected: object) -> None:
    doc = json_body.parse(body)
    assert json_body.is_json(doc)
    assert doc == expected


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "not a JSON object or array"),
        (b"plain", "not a JSON object or array"),
        (b'"a string"', "not a JSON object or array"),
        (b"42", "not a JSON object or array"),
        (b"{", "not valid JSON"),
        (b'{"a": 1} trailing', "not valid JSON"),
        (b'{"a": NaN}', "not valid JSON"),
        (b'{"a": -Infinity}', "not valid JSON"),
        (b'{"a": 1e400}', "not valid JSON"),
        (b'{"a": "\xff"}', "not UTF-8"),
        ('{"a": 1}'.encode("utf-16"), "not a JSON object or array"),  # starts with a BOM
        (b"[" * 100_000 + b"]" * 100_000, "nested too deep"),
    ],
)
def test_not_json_says_why(body: bytes, reason: str) -> None:
    doc = json_body.parse(body)
    assert not json_body.is_json(doc)
    assert not doc
    assert doc.reason.startswith(reason)
    assert doc.duplicate is None


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (b'{"model": "a", "model": "b"}', "model"),
        (b'{"messages": [{"role": "user", "role": "system"}], "model": "a"}', "role"),
        (b'{"x": 1, "y": 2, "x": 1}', "x"),
    ],
)
def test_duplicate_key_is_named(body: bytes, key: str) -> None:
    doc = json_body.parse(body)
    assert not json_body.is_json(doc)
    assert doc.duplicate == key


def test_document_parses_once_and_remember_replaces() -> None:
    ex = Exchange({})
    assert json_body.document(ex) is json_body.NOT_JSON  # no body
    ex.body = b'{"model": "fast"}'
    doc = json_body.document(ex)
    assert json_body.is_cached(ex)
    assert json_body.document(ex) is doc
    new = json.dumps({"model": "gpt-4o-mini"}).encode()
    json_body.remember(ex, new, {"model": "gpt-4o-mini"})
    assert not json_body.is_cached(ex)  # remembered for `new`, and ex.body is still the old body
    ex.body = new
    assert json_body.document(ex) == {"model": "gpt-4o-mini"}


def test_document_async_parses_big_bodies_in_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[int] = []
    real = json_body.parse

    def parse(body: bytes) -> object:
        import threading

        threads.append(threading.get_ident())
        return real(body)

    monkeypatch.setattr(json_body, "parse", parse)
    ex = Exchange({})
    ex.body = json.dumps({"input": "x" * json_body.THREAD_BYTES, "model": "m"}).encode()

    async def main() -> object:
        import threading

        doc = await json_body.document_async(ex)
        assert threads and threads[0] != threading.get_ident()
        return doc

    doc = asyncio.run(main())
    assert isinstance(doc, dict) and doc["model"] == "m"
    assert json_body.document(ex) is doc  # cached: no second parse
    assert len(threads) == 1
