"""The token contract: ids that could widen a NATS subscription are refused everywhere."""

from __future__ import annotations

import json

import pytest

from meshkit.edge.token_contract import (
    MalformedToken,
    conversation_of_subject,
    is_conversation_id,
    message_id,
    parse_token,
    tokens_subject,
)


@pytest.mark.parametrize("cid", ["a.>", "*", ">", "a b", "", "a" * 129, "a.b", "é", "a\n", None, 5])
def test_ids_with_nats_specials_or_wrong_shape_are_refused(cid: object) -> None:
    assert not is_conversation_id(cid)
    if isinstance(cid, str):
        with pytest.raises(ValueError):
            tokens_subject(cid)


def test_a_good_id_makes_its_subject_and_reads_back() -> None:
    assert tokens_subject("conv_1-A") == "chat.conv_1-A.tokens"
    assert conversation_of_subject("chat.conv_1-A.tokens") == "conv_1-A"
    assert conversation_of_subject("chat.a.b.tokens") is None
    assert conversation_of_subject("chat.*.tokens") is None
    assert message_id("c", 7) == "c:7"


def test_parse_keeps_the_raw_bytes_and_reads_the_fields() -> None:
    raw = json.dumps({"conversation_id": "c", "token": "Hi", "sequence": 3, "done": True, "ts": 1.5, "x": 1})
    msg = parse_token(raw.encode(), subject="chat.c.tokens")
    assert (msg.conversation_id, msg.sequence, msg.done, msg.ts) == ("c", 3, True, 1.5)
    assert msg.raw == raw.encode()
    assert msg.subject == "chat.c.tokens" and msg.message_id == "c:3"
    assert msg.fields()["x"] == 1


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"conversation_id": "a.>", "sequence": 1}', "conversation_id"),
        (b'{"conversation_id": "c", "sequence": "1"}', "sequence"),
        (b'{"conversation_id": "c", "sequence": true}', "sequence"),
        (b'{"conversation_id": "c", "sequence": -1}', "sequence"),
        (b'{"conversation_id": "c", "sequence": 1, "done": "yes"}', "done"),
        (b'{"conversation_id": "c", "sequence": 1, "token": 5}', "token"),
        (b'{"conversation_id": "c", "sequence": 1, "ts": "now"}', "ts"),
        (b'{"conversation_id": "c", "sequence": 1, "ts": NaN}', "not JSON"),  # not JSON at all
        (b'{"conversation_id": "c", "sequence": 1, "ts": 1e999}', "not JSON"),
        (b'{"conversation_id": "c", "sequence": 1, "token": "\\ud800"}', "not JSON"),  # a lone surrogate
        (b'{"conversation_id": "c", "sequence": 12345678901234567890123}', "sequence"),
    ],
)
def test_malformed_messages_say_why(raw: bytes, reason: str) -> None:
    with pytest.raises(MalformedToken) as caught:
        parse_token(raw)
    assert reason in caught.value.reason


def test_a_message_must_name_the_conversation_of_its_subject() -> None:
    raw = b'{"conversation_id": "b", "sequence": 1}'
    assert parse_token(raw).conversation_id == "b"
    with pytest.raises(MalformedToken, match="does not match"):
        parse_token(raw, subject="chat.a.tokens")
    with pytest.raises(MalformedToken, match="is not chat"):
        parse_token(raw, subject="chat.b.c.tokens")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32", "utf-8-sig"])
def test_only_utf8_json_without_a_bom_is_a_token(encoding: str) -> None:
    """The raw bytes travel unchanged to EventSource clients, which read UTF-8 only: JSON in UTF-16/32
    (accepted by `json.loads` on bytes, which guesses the encoding) or behind a BOM (which a browser's
    JSON.parse refuses) must be refused here, not stored and served as mojibake."""
    doc = {"conversation_id": "c", "sequence": 1, "token": "hé"}
    assert parse_token(json.dumps(doc).encode("utf-8")).sequence == 1
    with pytest.raises(MalformedToken, match="not JSON"):
        parse_token(json.dumps(doc).encode(encoding))
