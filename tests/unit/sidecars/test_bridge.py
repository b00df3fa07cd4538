"""The bridge's pure parts: dead-letter reasons and payloads, its option parsers, the latency buckets."""

from __future__ import annotations

import base64
import json

import pytest

from meshkit.cli import main
from meshkit.edge.token_contract import MalformedToken, parse_token
from meshkit.sidecars.bridge import Backoff, _domain, _positive_int, _stream_name
from meshkit.sidecars.bridge_deadletter import MAX_DATA_BYTES, REASONS, dead_letter, reason_label
from meshkit.sidecars.jetstream_publisher import LatencyBuckets

# One message per reason parse_token() gives, and the label each must get.
MALFORMED = [
    (b"x" * (1 << 20 + 1), None, "too_large"),
    (b"{nope", None, "not_json"),
    (b"\xff\xfe", None, "not_json"),
    (b"[1, 2]", None, "not_object"),
    (b'{"conversation_id": "a.>", "sequence": 1}', None, "bad_conversation_id"),
    (b'{"sequence": 1}', None, "bad_conversation_id"),
    (b'{"conversation_id": "c", "sequence": -1}', None, "bad_sequence"),
    (b'{"conversation_id": "c", "sequence": true}', None, "bad_sequence"),
    (b'{"conversation_id": "c", "sequence": 1, "done": "yes"}', None, "bad_done"),
    (b'{"conversation_id": "c", "sequence": 1, "token": 5}', None, "bad_token"),
    (b'{"conversation_id": "c", "sequence": 1, "ts": "now"}', None, "bad_ts"),
    (b'{"conversation_id": "c", "sequence": 1}', "chat.a.b.tokens", "bad_channel"),
    (b'{"conversation_id": "c", "sequence": 1}', "chat.d.tokens", "channel_mismatch"),
]


@pytest.mark.parametrize(("raw", "channel", "label"), MALFORMED)
def test_every_reason_of_parse_token_has_its_own_label(raw: bytes, channel: str | None, label: str) -> None:
    with pytest.raises(MalformedToken) as caught:
        parse_token(raw, subject=channel)
    assert reason_label(caught.value) == label
    assert label in REASONS


def test_labels_are_a_fixed_set_and_unknown_reasons_are_other() -> None:
    assert reason_label("something new") == "other"
    assert len(REASONS) == len(set(REASONS)) and {"missing_data", "rejected", "other"} <= set(REASONS)


def test_dead_letter_keeps_utf8_as_text_and_other_bytes_as_base64() -> None:
    text = json.loads(
        dead_letter("not_json", "not JSON", source="pubsub", data="é {".encode(), channel="chat.c.tokens")
    )
    assert text == {
        "reason": "not_json",
        "detail": "not JSON",
        "source": "pubsub",
        "channel": "chat.c.tokens",
        "data": "é {",
    }
    binary = json.loads(
        dead_letter("not_json", "not JSON", source="stream", data=b"\xff\x00", entry_id=b"1-2")
    )
    assert binary["encoding"] == "base64" and base64.b64decode(binary["data"]) == b"\xff\x00"
    assert binary["entry_id"] == "1-2" and "channel" not in binary
    missing = json.loads(dead_letter("missing_data", "no data", source="stream", data=None, entry_id=b"3-0"))
    assert missing["data"] is None


def test_dead_letter_cuts_big_data_and_says_so() -> None:
    doc = json.loads(dead_letter("too_large", "big", source="stream", data=b"a" * (MAX_DATA_BYTES + 10)))
    assert doc["truncated"] is True and len(doc["data"]) == MAX_DATA_BYTES


@pytest.mark.parametrize("data", [b"\x01" * (300 * 1024), "\U0001f600".encode() * 70_000, b"\xff" * 300_000])
def test_dead_letter_fits_max_bytes_whatever_the_escaping(data: bytes) -> None:
    letter = dead_letter("not_json", "not JSON", source="stream", data=data, max_bytes=1 << 20)
    assert len(letter) <= 1 << 20
    doc = json.loads(letter)
    assert doc["truncated"] is True and doc["data"]
    small = dead_letter("not_json", "not JSON", source="stream", data=data, max_bytes=4096)
    assert len(small) <= 4096 and json.loads(small)["truncated"] is True


@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5", True, "2000000"])
def test_positive_int_refuses(value: object) -> None:
    with pytest.raises(ValueError):
        _positive_int(value)


@pytest.mark.parametrize("value", ["a.b", "CHAT*", "a>", "with space", ""])
def test_stream_name_refuses_what_nats_refuses(value: str) -> None:
    with pytest.raises(ValueError):
        _stream_name(value)


def test_domain_may_be_empty_but_not_a_subject() -> None:
    assert _domain("") == "" and _domain("origin-1") == "origin-1"
    with pytest.raises(ValueError):
        _domain("a.b")


def test_bad_options_are_reported_together_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "bridge",
        "--stream",
        "a.b",
        "--max-inflight",
        "0",
        "--source",
        "pubsub",
        "--admin-listen",
        "127.0.0.1:0",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "stream" in err and "max_inflight" in err.replace("-", "_") and "Traceback" not in err


def test_backoff_doubles_to_its_cap_and_resets() -> None:
    b = Backoff(0.1, 0.5)
    assert [b.next() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    b.reset()
    assert b.next() == 0.1


def test_latency_buckets_are_cumulative() -> None:
    buckets = LatencyBuckets((0.001, 0.01))
    for value in (0.0005, 0.005, 0.005, 3.0):
        buckets.observe(value)
    assert buckets.cumulative() == [("0.001", 1.0), ("0.01", 3.0), ("+Inf", 4.0)]
    assert buckets.sum == pytest.approx(3.0105)
