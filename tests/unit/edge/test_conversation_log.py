"""The conversation log's start: token 0 stored after token 1 (two bridges in one consumer group) is
not lost, and a conversation starting at 1 goes on without a reset (edge/conversation_log.py)."""

from __future__ import annotations

import json

from meshkit.edge.conversation_log import ConversationLog, Skipped
from meshkit.edge.token_contract import TokenMessage, parse_token


def tok(seq: int, *, done: bool = False) -> TokenMessage:
    raw = json.dumps({"conversation_id": "c1", "token": f"w{seq}", "sequence": seq, "done": done})
    return parse_token(raw.encode())


def seqs(log: ConversationLog) -> list[int | None]:
    assert log.first_seq is not None
    return [e.sequence if e is not None else None for e in log.read(log.log_start, 1000)]


def test_token_0_stored_after_token_1_in_the_catch_up_is_logged_first() -> None:
    log = ConversationLog(100)
    assert log.add(tok(1), backlog=True) == 0  # 0 may still come: held
    assert log.first_seq is None and log.waiting_for == 0
    assert log.add(tok(0), backlog=True) == 2
    assert log.add(tok(2)) == 1
    assert seqs(log) == [0, 1, 2] and log.first_seq == 0 and log.duplicates == 0
    assert log.waiting_for is None


def test_a_stored_conversation_from_1_is_logged_when_the_catch_up_ends_without_a_reset() -> None:
    log = ConversationLog(100)
    for seq in range(1, 10):
        assert log.add(tok(seq), backlog=True) == 0
    assert log.add(tok(10, done=True)) == 10  # the last stored one (not backlog): no 0 in the catch-up
    assert seqs(log) == list(range(1, 11)) and log.first_seq == 1
    assert log.waiting_for is None and log.skip_gap() is None  # the hub's timer finds nothing to do
    assert log.backlog_end == 10 and log.done_seq == 10


def test_a_stored_conversation_whose_first_tokens_are_gone_is_still_a_gap_from_1() -> None:
    log = ConversationLog(100)
    log.add(tok(4), backlog=True)
    log.add(tok(5))
    assert log.first_seq == 1 and log.waiting_for == 1  # as a live first message above 1 (448e39f)
    assert log.skip_gap() == Skipped(1, 4)
    assert seqs(log) == [None, None, None, 4, 5]


def test_hold_live_start_holds_a_live_token_1_until_0_comes() -> None:
    """The audit's repro: 1, 0, 2 logged [1, 2] with a duplicate."""
    log = ConversationLog(100, hold_live_start=True)
    assert [log.add(tok(s)) for s in (1, 0, 2)] == [0, 2, 1]
    assert seqs(log) == [0, 1, 2] and log.duplicates == 0


def test_hold_live_start_given_up_starts_at_1_without_a_placeholder() -> None:
    log = ConversationLog(100, hold_live_start=True)
    log.add(tok(1))
    log.add(tok(2))
    assert log.first_seq is None and log.waiting_for == 0
    assert log.skip_gap() is None  # no reset: a conversation starting at 1 is normal
    assert seqs(log) == [1, 2] and log.first_seq == 1
    assert log.add(tok(0)) == 0 and log.duplicates == 1  # too late: given up is given up


def test_hold_live_start_given_up_with_1_missing_too_skips_the_gap_from_1() -> None:
    log = ConversationLog(100, hold_live_start=True)
    log.add(tok(3))
    assert log.skip_gap() == Skipped(1, 3)
    assert seqs(log) == [None, None, 3]


def test_the_open_start_holds_at_most_capacity_messages() -> None:
    log = ConversationLog(4)
    assert [log.add(tok(s), backlog=True) for s in range(1, 5)] == [0, 0, 0, 0]
    assert log.add(tok(5), backlog=True) == 5  # more than the log keeps: 0 is not coming
    assert log.first_seq == 1 and log.log_start == 2 and seqs(log) == [2, 3, 4, 5]


def test_a_live_token_1_is_logged_at_once_by_default() -> None:
    log = ConversationLog(100)
    assert log.add(tok(1)) == 1 and log.first_seq == 1 and log.waiting_for is None
