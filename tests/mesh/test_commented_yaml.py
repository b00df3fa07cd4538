"""The YAML writer behind `meshkit render`: what it prints parses back to exactly the plain document."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from meshkit.render.commented_yaml import WIDTH, Why, plain, scalar, to_yaml

TRICKY = [
    "yes",
    "No",
    "on",
    "null",
    "~",
    "",
    "-",
    "1e3",
    "0x1F",
    "1_000",
    "12:30",
    "2026-12-01",
    "@type",
    "a: b",
    "#x",
    "x #y",
    "[1]",
    "{a}",
    "*ref",
    "&anchor",
    "!tag",
    "%REQ(x)%",
    "it's",
    'say "hi"',
    "back\\slash",
    "two\nlines",
    "tab\there",
    " lead",
    "trail ",
    "é → ü",
    "127.0.0.1",
    "0.5s",
    "30s",
    ".inf",
    "NaN",
    "=",
    "?",
    "type.googleapis.com/envoy.x.v3.Y",
]


@pytest.mark.parametrize("text", TRICKY)
def test_every_string_reads_back_as_itself(text: str) -> None:
    doc = {"key": text, text or "empty": [text, {"inner": text}]}
    assert yaml.safe_load(to_yaml(doc)) == doc


@pytest.mark.parametrize("value", [True, False, None, 0, -1, 1 << 40, 0.25, 1e-7])
def test_non_strings_keep_their_type(value: Any) -> None:
    assert yaml.safe_load(to_yaml({"v": value, "l": [value]})) == {"v": value, "l": [value]}


def test_reasons_become_comments_and_vanish_from_the_document() -> None:
    tree = {
        "top": Why(1, "why top"),
        "nested": {
            "list": [
                Why({"name": "a", "value": 1}, "why item"),
                {"name": Why("b", "why first key"), "other": Why("c", "why other key")},
            ]
        },
    }
    text = to_yaml(tree, header="header line")
    assert text.startswith("# header line\n")
    for reason in ("why top", "why item", "why first key", "why other key"):
        assert f"# {reason}" in text
    assert (
        yaml.safe_load(text)
        == plain(tree)
        == {
            "top": 1,
            "nested": {"list": [{"name": "a", "value": 1}, {"name": "b", "other": "c"}]},
        }
    )


def test_long_reasons_wrap_within_the_width() -> None:
    tree = {"a": {"b": {"c": Why("x", " ".join(["word"] * 80))}}}
    text = to_yaml(tree)
    assert all(len(line) <= WIDTH for line in text.splitlines())
    assert text.count("# word") >= 3


def test_short_parts_go_on_one_line_long_ones_in_blocks() -> None:
    text = to_yaml({"short": {"a": 1, "b": [1, 2]}, "long": {f"key{i}": "v" * 10 for i in range(12)}})
    assert "short: {a: 1, b: [1, 2]}" in text
    assert "long:\n  key0: vvvvvvvvvv\n" in text


def test_empty_collections() -> None:
    doc = {"m": {}, "l": [], "nested": [{}, []], "h2": {"http2_protocol_options": {}}}
    assert yaml.safe_load(to_yaml(doc)) == doc


def test_only_scalars_are_scalars() -> None:
    with pytest.raises(TypeError):
        scalar(object())
