"""meshkit.logs: secrets never reach a line, in either format."""

from __future__ import annotations

import io
import json
import logging

import pytest

from meshkit import logs


@pytest.mark.parametrize(
    "key",
    [
        "Authorization",
        "x-api-key",  # Anthropic
        "api-key",  # Azure OpenAI
        "x-goog-api-key",  # Gemini
        "Cookie",
        "redis_password",
        "client_secret",
        "x-auth-token",
        "openai_api_key",
        "token",
    ],
)
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_sensitive_keys_are_masked_also_inside_headers(key: str, fmt: str) -> None:
    stream = io.StringIO()
    logs.setup(fmt, "info", stream)
    try:
        logging.getLogger("meshkit.test").info(
            "request",
            extra={"headers": {key: "s3cr3t-value", "x-model": "gpt"}, key.replace("-", "_"): "s3cr3t-value"},
        )
    finally:
        logging.getLogger().handlers.clear()
    line = stream.getvalue()
    assert "s3cr3t-value" not in line
    assert "gpt" in line


@pytest.mark.parametrize("key", ["max_tokens", "x-request-id", "hash", "canonical_json", "jwt_secret_file"])
def test_ordinary_keys_are_left_alone(key: str) -> None:
    assert logs.redact("v", key) == "v"
    doc = {"options": {key: "v"}}
    assert logs.redact(doc) == doc
    assert json.loads(json.dumps(logs.redact(doc))) == doc


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_headers_as_a_list_of_pairs_or_mappings_are_masked_too(fmt: str) -> None:
    stream = io.StringIO()
    logs.setup(fmt, "info", stream)
    try:
        logging.getLogger("meshkit.test").info(
            "request",
            extra={
                "headers": [("authorization", "Bearer s3cr3t"), ("x-model", "gpt")],
                "attempts": [{"api-key": "s3cr3t"}, {"status": 503}],
            },
        )
    finally:
        logging.getLogger().handlers.clear()
    line = stream.getvalue()
    assert "s3cr3t" not in line
    assert "gpt" in line and "503" in line


def test_text_logs_keep_one_event_on_one_line() -> None:
    stream = io.StringIO()
    logs.setup("text", "info", stream)
    try:
        logging.getLogger("meshkit.test").warning(
            "redis said %s", "no\nINFO meshkit: forged", extra={"detail": "a\r\nb"}
        )
    finally:
        logging.getLogger().handlers.clear()
    (line,) = stream.getvalue().splitlines()
    assert "redis said no\\nINFO meshkit: forged" in line
    assert "detail=a\\r\\nb" in line
