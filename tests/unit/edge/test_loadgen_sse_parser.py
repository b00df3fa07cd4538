"""The load generator's SSE parser: EventSource's rules, fed in arbitrary pieces."""

from __future__ import annotations

import pytest

from meshkit.edge.loadgen_sse_parser import MAX_PENDING_BYTES, SseEvent, SseParser


def parse(*chunks: bytes) -> list[SseEvent]:
    parser = SseParser()
    out: list[SseEvent] = []
    for chunk in chunks:
        out += parser.feed(chunk)
    return out


def test_meshkit_and_nchan_shapes() -> None:
    stream = (
        b"retry: 2000\n: hi\n\n"
        b'id: 1\nevent: token\ndata: {"sequence": 1}\n\n'
        b'id: 1796193050:0\ndata: {"x": 1}\n\n'
        b'event: done\ndata: {"done": true}\n\n'
    )
    assert parse(stream) == [
        SseEvent("token", '{"sequence": 1}', "1"),
        SseEvent("message", '{"x": 1}', "1796193050:0"),
        SseEvent("done", '{"done": true}', "1796193050:0"),  # the id is kept, as lastEventId
    ]


def test_multi_line_data_is_joined_with_newlines() -> None:
    assert parse(b"data: a\ndata:b\ndata:  c\ndata\n\n") == [SseEvent("message", "a\nb\n c\n", "")]


def test_comments_and_events_without_data_are_not_dispatched() -> None:
    assert parse(b": heartbeat\n\n:\n\nevent: ping\n\nid: 7\n\n") == []


def test_crlf_cr_and_lf_line_endings() -> None:
    expected = [SseEvent("token", "one", "1"), SseEvent("token", "two", "2")]
    assert (
        parse(b"id: 1\r\nevent: token\r\ndata: one\r\n\r\nid: 2\r\nevent: token\r\ndata: two\r\n\r\n")
        == expected
    )
    assert parse(b"id: 1\revent: token\rdata: one\r\rid: 2\revent: token\rdata: two\r\r:") == expected
    assert parse(b"id: 1\nevent: token\r\ndata: one\r\n\nid: 2\revent: token\ndata: two\n\r\n") == expected


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64])
def test_any_split_gives_the_same_events(size: int) -> None:
    stream = "id: 1\r\nevent: token\r\ndata: héllo\r\ndata: wörld\r\n\r\n: c\r\ndata: x\r\r:".encode()
    whole = parse(stream)
    assert whole == [SseEvent("token", "héllo\nwörld", "1"), SseEvent("message", "x", "1")]
    assert parse(*(stream[i : i + size] for i in range(0, len(stream), size))) == whole


def test_a_cr_at_the_end_of_a_chunk_waits_for_a_possible_lf() -> None:
    parser = SseParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n\r") == []  # CRLF ends the data line; the CR is held
    assert parser.feed(b"\n") == [SseEvent("message", "a", "")]  # CRLF: the blank line


def test_field_details() -> None:
    # no space after the colon, only one space removed, unknown fields ignored, retry digits only
    got = parse(b"event:tok\ndata:  two spaces\nfoo: bar\nretry: 15\n\nretry: x\ndata: y\n\n")
    assert got == [SseEvent("tok", " two spaces", "", 15), SseEvent("message", "y", "", None)]
    assert parse(b"id: a\0b\ndata: z\n\n") == [SseEvent("message", "z", "")]  # id with NUL ignored


def test_an_unterminated_event_is_not_dispatched() -> None:
    assert parse(b"data: half") == []
    assert parse(b"data: half\n") == []


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    assert parse(b"data: \xff\xfe\n\n") == [SseEvent("message", "\ufffd\ufffd", "")]


def test_an_endless_line_is_an_error() -> None:
    parser = SseParser()
    with pytest.raises(ValueError, match="over"):
        parser.feed(b"data: " + b"x" * (MAX_PENDING_BYTES + 1))
