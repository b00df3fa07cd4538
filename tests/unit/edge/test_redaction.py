"""Redactor and the redaction part of TokenInspection: presets, config errors, raw bytes kept when nothing
matched, only the token field changed, per-token (and what that does not catch), the options section."""

from __future__ import annotations

import json

import pytest

from meshkit.edge.redaction import Redactor, compile_patterns
from meshkit.edge.stream_auth import StreamAuthOptions
from meshkit.edge.token_contract import parse_token
from meshkit.edge.token_inspection import TokenInspection, TokenInspectionOptions
from meshkit.errors import ConfigError
from meshkit.options import clashes, resolve


def message(token: str, **extra: object) -> bytes:
    return json.dumps(
        {"conversation_id": "c1", "token": token, "sequence": 3, "done": False, **extra}
    ).encode()


def test_email_preset_in_one_token() -> None:
    r = Redactor(["email"])
    assert r.redact("write to john.doe+x@mail.example.co.uk today") == "write to [redacted] today"
    assert r.redact("no address @ here, nor a@b") is None


def test_several_patterns_apply_in_order() -> None:
    r = Redactor(["email", r"\bsk-[A-Za-z0-9]{8,}"], replacement="<x>")
    assert r.redact("key sk-ABCDEFGH12 mail a@b.io") == "key <x> mail <x>"


def test_bad_patterns_are_one_config_error_naming_each() -> None:
    with pytest.raises(ConfigError) as info:
        compile_patterns(["email", "a(", "[z-a]", "x*", ""])
    problems = info.value.problems
    assert len(problems) == 4
    assert "'a('" in problems[0] and "position" in problems[0]
    assert "'[z-a]'" in problems[1]
    assert "empty string" in problems[2]
    assert "empty pattern" in problems[3]


def test_options_section_reports_a_bad_regex_as_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        resolve([TokenInspectionOptions], command="sse", flags={"redact": "(unclosed"}, env={})
    assert "--redact" in str(info.value) and "(unclosed" in str(info.value)


def test_options_take_a_yaml_list_or_one_pattern_per_line() -> None:
    o = resolve([TokenInspectionOptions], command="sse", config={"redact": ["email", r"\d{3,4}"]}, env={})
    assert o[TokenInspectionOptions].redact == ("email", r"\d{3,4}")
    o = resolve([TokenInspectionOptions], command="sse", env={"MESHKIT_SSE_REDACT": "email\n\\d{3,4}\n"})
    assert o[TokenInspectionOptions].redact == ("email", r"\d{3,4}")


async def test_unmatched_message_passes_as_the_same_bytes() -> None:
    inspection = TokenInspection(TokenInspectionOptions(redact=("email",)))
    await inspection.start(None)
    raw = b'{ "conversation_id":"c1",  "sequence":3, "token":"Hello", "ts": 1.50 }'
    result = await inspection.check(parse_token(raw))
    assert result.raw is raw and not result.changed and not result.blocked


async def test_matched_message_is_re_encoded_with_only_the_token_changed() -> None:
    inspection = TokenInspection(TokenInspectionOptions(redact=("email",)))
    await inspection.start(None)
    raw = message("mail bob@example.com", model="m1", error="bob@example.com", usage={"n": 1}, ts=1.5)
    result = await inspection.check(parse_token(raw))
    assert result.changed and result.raw is not None
    assert json.loads(result.raw) == {**json.loads(raw), "token": "mail [redacted]"}
    assert list(json.loads(result.raw)) == list(json.loads(raw))  # key order kept
    parse_token(result.raw)  # still the contract
    assert inspection.replaced["redaction"] == 1 and inspection.inspected == 1


async def test_non_ascii_text_stays_utf8() -> None:
    inspection = TokenInspection(TokenInspectionOptions(redact=("email",)))
    await inspection.start(None)
    result = await inspection.check(parse_token(message("Grüße an ü@例え.jp, jürgen@mail.de")))
    assert result.raw is not None and "Grüße".encode() in result.raw
    assert json.loads(result.raw)["token"] == "Grüße an [redacted], [redacted]"


async def test_per_token_only_an_address_split_over_tokens_is_not_caught() -> None:
    """The documented limit: the output of a token depends on that token alone (module docstring)."""
    inspection = TokenInspection(TokenInspectionOptions(redact=("email",)))
    await inspection.start(None)
    out = []
    for token in ("john", ".doe", "@", "example", ".com"):
        result = await inspection.check(parse_token(message(token)))
        assert result.raw is not None
        out.append(json.loads(result.raw)["token"])
    assert "".join(out) == "john.doe@example.com"


async def test_off_by_default_and_cheap() -> None:
    inspection = TokenInspection.from_options({})
    assert not inspection.enabled and inspection.summary() == "token inspection off"
    await inspection.start(None)
    raw = message("a@b.io")
    assert (await inspection.check(parse_token(raw))).raw is raw
    assert inspection.inspected == 0


async def test_the_inspector_and_the_tap_need_nats() -> None:
    inspection = TokenInspection(TokenInspectionOptions(audit=True))
    with pytest.raises(ValueError, match="NATS"):
        await inspection.start(None)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("inspector_subject", "inspect.>"),
        ("inspector_subject", "a..b"),
        ("audit_subject", "audit.*.tokens"),
        ("audit_subject", "audit.x{conversation_id}.tokens"),
        ("audit_subject", "audit.{conversation_id}.{conversation_id}"),
        ("audit_subject", "audit.{conv}.tokens"),
        ("inspector_timeout", "0"),
        ("inspector_fail", "maybe"),
        ("inspector_max_inflight", "0"),
    ],
)
def test_bad_options_are_config_errors(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("_", "-")):
        resolve([TokenInspectionOptions], command="sse", flags={key: value}, env={})


def test_the_sections_the_adapter_adds_do_not_clash() -> None:
    assert clashes([TokenInspectionOptions, StreamAuthOptions]) == []
