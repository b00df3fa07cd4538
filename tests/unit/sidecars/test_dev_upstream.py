"""The pure parts of `meshkit dev-upstream`: the vector function, OpenAI request reading, the switches."""

from __future__ import annotations

import math
from typing import Any

import pytest

from meshkit.sidecars.dev_upstream import Fail, Switches, apply_control
from meshkit.sidecars.fake_model import chat_answer, count_tokens, vector
from meshkit.sidecars.openai_shapes import (
    InvalidRequest,
    float32_base64,
    from_float32_base64,
    parse_chat_request,
    parse_embedding_request,
    read_json_object,
)


# -- vectors --------------------------------------------------------------------------------------
def test_a_vector_is_a_function_of_model_dimensions_and_item() -> None:
    v = vector("m", 64, "hello")
    assert v == vector("m", 64, "hello")
    assert len(v) == 64
    assert abs(math.sqrt(math.fsum(x * x for x in v)) - 1.0) < 1e-6
    assert v != vector("n", 64, "hello")
    assert v != vector("m", 64, "hello ")
    assert vector("m", 63, "hello") != v[:63]
    assert vector("m", 8, "1") != vector("m", 8, (1,))  # a string is not the token array that looks like it


@pytest.mark.parametrize("dimensions", [1, 7, 8, 9, 1536, 3072])
def test_vectors_are_float32_values_so_float_and_base64_agree(dimensions: int) -> None:
    v = vector("m", dimensions, (5, 6))
    assert len(v) == dimensions
    assert from_float32_base64(float32_base64(v)) == v
    assert all(-1.0 <= x <= 1.0 for x in v)


def test_counts_and_the_chat_answer() -> None:
    assert count_tokens("two  words\n") == 2
    assert count_tokens((1, 2, 3)) == 3
    assert "".join(chat_answer("tell me about caches")) == "You said: tell me about caches"
    assert chat_answer("") == ["Hello", " from", " meshkit", " dev-upstream."]
    assert len(chat_answer(" ".join(["w"] * 50))) == 2 + 12


# -- embedding requests ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given", "items"),
    [
        ("a", ("a",)),
        (["a", "b"], ("a", "b")),
        ([1, 2], ((1, 2),)),
        ([[1], [2, 3]], ((1,), (2, 3))),
    ],
)
def test_the_four_input_forms(given: Any, items: tuple[Any, ...]) -> None:
    req = parse_embedding_request({"model": "m", "input": given})
    assert req.items == items
    assert (req.encoding_format, req.dimensions, req.dimensions_or(1536)) == ("float", None, 1536)


def test_the_optional_fields() -> None:
    req = parse_embedding_request(
        {"model": "m", "input": "a", "encoding_format": "base64", "dimensions": 3, "user": "u"}
    )
    assert (req.encoding_format, req.dimensions_or(1536)) == ("base64", 3)
    nulls = parse_embedding_request({"model": "m", "input": "a", "encoding_format": None, "dimensions": None})
    assert (nulls.encoding_format, nulls.dimensions) == ("float", None)


@pytest.mark.parametrize(
    ("doc", "param"),
    [
        ({"input": "a"}, "model"),
        ({"model": 3, "input": "a"}, "model"),
        ({"model": "m"}, "input"),
        ({"model": "m", "input": None}, "input"),
        ({"model": "m", "input": {"a": 1}}, "input"),
        ({"model": "m", "input": [True]}, "input"),
        ({"model": "m", "input": ["a", ""]}, "input[1]"),
        ({"model": "m", "input": [[1], [1.5]]}, "input[1]"),
        ({"model": "m", "input": ["a"] * 2049}, "input"),
        ({"model": "m", "input": "a", "dimensions": True}, "dimensions"),
        ({"model": "m", "input": "a", "dimensions": 4097}, "dimensions"),
        ({"model": "m", "input": "a", "user": 1}, "user"),
        ({"model": "m", "input": "a", "stream": True}, "stream"),
    ],
)
def test_bad_embedding_requests_name_the_field(doc: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_embedding_request(doc)
    assert (raised.value.status, raised.value.param) == (400, param)
    assert b'"type": "invalid_request_error"' in raised.value.body()


@pytest.mark.parametrize("body", [b"", b"{", b"\xff", b"null", b'"a"', b"[]"])
def test_a_body_that_is_not_a_json_object(body: bytes) -> None:
    with pytest.raises(InvalidRequest):
        read_json_object(body)


# -- chat requests ----------------------------------------------------------------------------------
def test_chat_request_reading() -> None:
    req = parse_chat_request(
        {
            "model": "g",
            "messages": [
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": None},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]},
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_completion_tokens": 5,
            "max_tokens": 9,
            "temperature": 0,
        }
    )
    assert req.last_user_text() == "a"
    assert (req.stream, req.include_usage, req.max_tokens) == (True, True, 5)
    plain = parse_chat_request({"model": "g", "messages": [{"role": "system", "content": "s"}]})
    assert (plain.stream, plain.include_usage, plain.max_tokens, plain.last_user_text()) == (
        False,
        False,
        None,
        "",
    )


@pytest.mark.parametrize(
    ("doc", "param"),
    [
        ({"model": "g", "messages": "hi"}, "messages"),
        ({"model": "g", "messages": [1]}, "messages[0]"),
        (
            {"model": "g", "messages": [{"role": "user", "content": [{"text": "x"}]}]},
            "messages[0].content[0]",
        ),
        ({"model": "g", "messages": [{"role": "user"}], "stream": "yes"}, "stream"),
        (
            {"model": "g", "messages": [{"role": "user"}], "stream": False, "stream_options": {}},
            "stream_options",
        ),
        (
            {
                "model": "g",
                "messages": [{"role": "user"}],
                "stream": True,
                "stream_options": {"include_usage": 1},
            },
            "stream_options.include_usage",
        ),
        ({"model": "g", "messages": [{"role": "user"}], "n": 2}, "n"),
        ({"model": "g", "messages": [{"role": "user"}], "max_tokens": 1, "max_completion_tokens": -1}, None),
    ],
)
def test_bad_chat_requests(doc: dict[str, Any], param: str | None) -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_chat_request(doc)
    assert raised.value.param == (param or "max_completion_tokens")


# -- switches -----------------------------------------------------------------------------------
def test_control_switches() -> None:
    initial = Switches(delay_ms=10)
    now = apply_control(initial, initial, {"fail": {"status": 429, "count": 2}, "stream_delay_ms": 5})
    assert now == Switches(Fail(429, 2), delay_ms=10, stream_delay_ms=5)
    assert apply_control(now, initial, {"fail": None}).fail is None
    assert apply_control(now, initial, {"fail": {"status": 500, "count": 0}}).fail is None
    assert apply_control(now, initial, {"reset": True}) == initial
    assert apply_control(now, initial, {"reset": True, "fail_rate": 0.5}) == Switches(
        delay_ms=10, fail_rate=0.5
    )
    assert now.as_dict()["fail"] == {"status": 429, "count": 2, "retry_after": 1, "message": None}


@pytest.mark.parametrize(
    "doc",
    [
        {"fail": {"status": 600}},
        {"fail": {"count": 1}},
        {"fail": {"status": 429, "extra": 1}},
        {"fail": {"status": 429, "message": 5}},
        {"delay_ms": 1.5},
        {"stream_delay_ms": True},
        {"fail_rate": -0.1},
        {"reset": "yes"},
        {"speed": 1},
    ],
)
def test_bad_switches(doc: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        apply_control(Switches(), Switches(), doc)


# -- options ----------------------------------------------------------------------------------------
def test_flags_parse_and_bad_values_are_reported_together() -> None:
    from meshkit.cli import load_daemon
    from meshkit.errors import ConfigError
    from meshkit.options import resolve
    from meshkit.sidecars.dev_upstream import DevUpstreamOptions

    sections = load_daemon("dev-upstream").all_sections()
    flags = {"delay_ms": "5", "fail_rate": "0.25", "models": "a,b", "reject_unknown_models": True}
    options = resolve(sections, command="dev-upstream", flags=flags, env={})[DevUpstreamOptions]
    assert (options.delay_ms, options.fail_rate, options.models) == (5, 0.25, ("a", "b"))
    assert options.reject_unknown_models
    with pytest.raises(ConfigError) as raised:
        resolve(sections, command="dev-upstream", flags={"delay_ms": "-1", "fail_rate": "2"}, env={})
    assert len(raised.value.problems) == 2
