"""Review of model-router: bodies an upstream reads as a model the allow-list never checked."""

from __future__ import annotations

import codecs
import gzip
import json
from typing import Any

import pytest

from meshkit.extproc.filter import Reply
from meshkit.extproc.filters.model_router import ModelRouterFilter

from .test_model_router import ALLOW, router, run

EVIL = {"model": "gpt-2-forbidden", "messages": []}


def error_code(reply: Reply | None) -> tuple[int, str]:
    assert reply is not None
    error: dict[str, Any] = json.loads(reply.body)["error"]
    return reply.status, str(error["code"])


# Python's json.loads(bytes) (Starlette's request.json(), so FastAPI and vLLM), Jackson, Node's body
# parsers all accept a UTF-8 BOM, and json.loads(bytes) UTF-16/32 too: each reads the forbidden model.
@pytest.mark.parametrize(
    "body",
    [
        codecs.BOM_UTF8 + json.dumps(EVIL).encode(),
        json.dumps(EVIL).encode("utf-16"),  # with its BOM
        json.dumps(EVIL).encode("utf-16-be"),  # no BOM: json.detect_encoding goes by the NULs
        json.dumps(EVIL).encode("utf-32"),
    ],
    ids=["utf8-bom", "utf16", "utf16be-nobom", "utf32"],
)
async def test_with_allow_list_json_in_another_encoding_is_refused(body: bytes) -> None:
    assert json.loads(body)["model"] == EVIL["model"]  # what such an upstream reads
    _, reply = await run([router(allow=ALLOW)], body)
    assert error_code(reply) == (400, "invalid_json")


async def test_without_allow_list_json_in_another_encoding_still_passes() -> None:
    ex, reply = await run([router()], codecs.BOM_UTF8 + json.dumps(EVIL).encode())
    assert reply is None
    assert ex.take_mutations()[0] == {}


# Go's encoding/json (Ollama, many gateways) matches keys case-insensitively, the last one winning:
# {"model": "gpt-4o", "MODEL": "x"} is routed as gpt-4o and served as x.
async def test_a_case_variant_of_model_next_to_model_is_a_duplicate_key() -> None:
    for body in (
        b'{"model": "gpt-4o", "MODEL": "gpt-2-forbidden"}',
        b'{"Model": "gpt-2-forbidden", "model": "gpt-4o"}',
    ):
        for allow in (ALLOW, None):
            _, reply = await run([router(allow=allow)], body)
            assert error_code(reply) == (400, "duplicate_key"), (body, allow)


async def test_with_allow_list_a_case_variant_of_model_alone_is_refused() -> None:
    _, reply = await run([router(allow=ALLOW)], b'{"MODEL": "gpt-2-forbidden", "messages": []}')
    assert error_code(reply) == (400, "invalid_model")
    ex, reply = await run([router()], b'{"MODEL": "x"}')  # no allow-list: nothing to guard
    assert reply is None
    assert ex.take_mutations()[0] == {}


# A compressed body is opaque to meshkit (Envoy hands over the bytes as sent) while an upstream that
# inflates request bodies reads the model from it.
@pytest.mark.parametrize("encoding", ["gzip", "GZIP", "deflate, gzip", "br"])
async def test_with_allow_list_an_encoded_body_is_refused(encoding: str) -> None:
    body = gzip.compress(json.dumps(EVIL).encode())
    _, reply = await run([router(allow=ALLOW)], body, {"content-encoding": encoding})
    assert error_code(reply) == (415, "unsupported_content_encoding")


async def test_identity_encoding_and_no_allow_list_are_fine() -> None:
    body = json.dumps({"model": "gpt-4o"}).encode()
    ex, reply = await run([router(allow=ALLOW)], body, {"content-encoding": "identity"})
    assert reply is None
    assert ex.take_mutations()[0]["x-model"] == "gpt-4o"
    ex, reply = await run([router()], gzip.compress(body), {"content-encoding": "gzip"})
    assert reply is None


def test_content_encoding_is_declared_read() -> None:
    # ext_authz over HTTP forwards only the headers a filter declares it reads
    assert "content-encoding" in ModelRouterFilter.reads_headers


async def test_with_allow_list_binary_bodies_starting_with_nul_still_pass() -> None:
    for body in (b"\x00\x00\x00\x18ftypmp42", b"\x00\x01\x02\x03", b"RIFF\x00\x00\x00\x00WAVE"):
        _, reply = await run([router(allow=ALLOW)], body)
        assert reply is None, body
