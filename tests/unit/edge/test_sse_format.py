"""The SSE and OpenAI framing of `meshkit sse`, read back with an EventSource-rules parser."""

from __future__ import annotations

import json

import pytest

from meshkit.edge.conversation_log import blocked_token
from meshkit.edge.loadgen_sse_parser import SseParser
from meshkit.edge.sse_format import OpenAIFramer, SseFramer, WsFramer, framer_for
from meshkit.edge.token_contract import parse_token


def message(seq: int, *, done: bool = False, **extra: object) -> bytes:
    return json.dumps(
        {"conversation_id": "c1", "token": f"w{seq}", "sequence": seq, "done": done, **extra}
    ).encode()


def test_sse_events_carry_the_raw_json_and_the_sequence_as_id() -> None:
    framer = SseFramer(retry_ms=1500)
    raw = message(7)
    out = framer.preamble() + framer.token(parse_token(raw)) + framer.done(parse_token(message(8, done=True)))
    assert out.startswith(b"retry: 1500\n\n")
    events = SseParser().feed(out)
    assert [(e.event, e.id) for e in events] == [("token", "7"), ("done", "8")]
    assert events[0].data.encode() == raw  # unchanged, byte for byte
    assert events[0].retry is None


def test_a_message_with_newlines_still_reads_back_the_same() -> None:
    raw = b'{\n  "conversation_id": "c1",\n  "token": "x",\r\n  "sequence": 3\n}'
    events = SseParser().feed(SseFramer(1000).token(parse_token(raw)))
    assert json.loads(events[0].data) == json.loads(raw)
    assert events[0].id == "3"


def test_reset_heartbeat_reconnect() -> None:
    framer = SseFramer(1000)
    events = SseParser().feed(framer.reset(3, 8) + framer.heartbeat() + framer.reconnect(250))
    assert [(e.event, e.data) for e in events] == [
        ("reset", '{"requested": 3, "available_from": 8}'),
        ("reconnect", "{}"),
    ]
    assert events[1].retry == 250
    assert framer.heartbeat().startswith(b":")  # a comment: EventSource dispatches nothing
    assert b"id:" not in framer.reset(None, 8)  # the last event id stays the last token's


def test_openai_chunks() -> None:
    framer = OpenAIFramer("c1", "default-model")
    out = framer.preamble()
    out += framer.token(parse_token(message(1, ts=1700000000.5)))
    out += framer.token(
        parse_token(json.dumps({"conversation_id": "c1", "token": "", "sequence": 2}).encode())
    )
    out += framer.token(parse_token(message(3, model="m2")))
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    out += framer.done(parse_token(message(4, done=True, usage=usage)))
    lines = [line for line in out.decode().split("\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"content": "w1"},
        {"content": "w3"},
        {"content": "w4"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]
    assert {c["id"] for c in chunks} == {"chatcmpl-c1"}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["created"] for c in chunks} == {1700000000}  # the first token's ts, for every chunk
    assert [c["model"] for c in chunks] == ["default-model", "m2", "m2", "m2"]
    assert [c["x_sequence"] for c in chunks] == [1, 3, 4, 4]
    assert chunks[-1]["usage"] == usage and "usage" not in chunks[0]


def test_openai_error_in_the_done_message_is_an_error_object() -> None:
    out = OpenAIFramer("c1", "m").done(parse_token(message(5, done=True, error="model overloaded")))
    lines = [line for line in out.decode().split("\n") if line]
    assert json.loads(lines[-2][6:]) == {"error": {"message": "model overloaded", "type": "upstream_error"}}
    assert lines[-1] == "data: [DONE]"


def test_openai_reset_is_a_chunk_saying_so() -> None:
    chunk = json.loads(OpenAIFramer("c1", "m").reset(3, 8)[6:])
    assert chunk["x_reset"] == {"requested": 3, "available_from": 8}
    assert chunk["choices"][0]["delta"] == {}


@pytest.mark.parametrize("fmt", ["xml", "SSE", "openai "])
def test_unknown_format_is_refused(fmt: str) -> None:
    with pytest.raises(ValueError, match="format must be"):
        framer_for(fmt, "c1", retry_ms=1000, default_model="m")


def test_websocket_frames_are_one_json_line_each_with_the_raw_message() -> None:
    framer = WsFramer()
    raw = b'{"conversation_id": "c1",\n "token": "a\\nb", "sequence": 7, "done": false}'
    frame = framer.token(parse_token(raw))
    assert frame.endswith(b"\n") and frame.count(b"\n") == 1
    doc = json.loads(frame)
    assert doc == {"event": "token", "id": 7, "data": json.loads(raw)}
    assert json.loads(framer.reset(3, 6)) == {"event": "reset", "data": {"requested": 3, "available_from": 6}}
    assert json.loads(framer.reconnect(250)) == {"event": "reconnect", "data": {"retry_ms": 250}}
    reauth = json.loads(framer.reauth(None))
    assert reauth == {"event": "reauth", "data": {"reason": "token_expired", "last_event_id": None}}
    assert framer.heartbeat() == b""
    blocked = json.loads(framer.blocked(blocked_token(parse_token(raw), "pii")))
    assert blocked == {
        "event": "blocked",
        "id": 7,
        "data": {"conversation_id": "c1", "sequence": 7, "reason": "pii"},
    }


def test_openai_blocked_and_reauth_chunks() -> None:
    framer = OpenAIFramer("c1", "m")
    msg = parse_token(b'{"conversation_id": "c1", "token": "x", "sequence": 4, "done": false}')
    chunk = json.loads(framer.blocked(blocked_token(msg, "pii"))[len(b"data: ") :])
    assert chunk["x_sequence"] == 4 and chunk["x_blocked"] == {"reason": "pii"}
    assert chunk["choices"][0]["delta"] == {}
    error = json.loads(framer.reauth(4)[len(b"data: ") :])["error"]
    assert error["type"] == "reauth" and error["code"] == "token_expired" and error["last_event_id"] == 4


def test_openai_reconnect_is_an_error_object_with_the_last_sequence_sent() -> None:
    """On shutdown OpenAI's client must raise, not return a truncated answer as if it were whole."""
    framer = OpenAIFramer("c1", "m")
    assert json.loads(framer.reconnect(250)[len(b"data: ") :])["error"]["last_event_id"] is None
    framer.token(parse_token(message(1)))
    framer.blocked(blocked_token(parse_token(message(2)), "pii"))
    framer.token(parse_token(json.dumps({"conversation_id": "c1", "token": "", "sequence": 3}).encode()))
    out = framer.reconnect(250)
    assert out.startswith(b"data: ") and out.endswith(b"\n\n") and out.count(b"\n") == 2
    assert b"[DONE]" not in out
    error = json.loads(out[len(b"data: ") :])["error"]
    assert (error["type"], error["code"], error["last_event_id"]) == ("reconnect", "server_shutdown", 3)
    assert "last_event_id" in error["message"]


def test_an_error_after_the_stream_started_is_data_only_in_openai_format() -> None:
    body = b'{"error": {"message": "replay failed", "type": "unavailable", "code": null}}'
    openai_out = OpenAIFramer("c1", "m").error(body)
    assert openai_out == b"data: " + body + b"\n\n"
    events = SseParser().feed(SseFramer(1000).error(body))
    assert [(e.event, e.data) for e in events] == [("error", body.decode())]
    assert json.loads(WsFramer.error(body)) == {"event": "error", "data": json.loads(body)}
