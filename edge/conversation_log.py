"""One conversation's tokens as the hub has seen them: in sequence order, deduplicated, bounded.

A `ConversationLog` is fed every message its conversation's JetStream subscription delivers (stream
order) and keeps the last `capacity` tokens contiguous by token `sequence`, so a viewer reads "from
sequence N on" by position. What it decides:

- order and dedup by token sequence: a message whose sequence was already logged (a redelivery, a
  second bridge's copy stored without dedup) is dropped and counted; one that arrives early (a gap:
  sequence 5 while 4 is expected) is held in `pending` until the missing one comes, then both go in,
  in order. Held messages are bounded (`max_pending`); past that the gap is skipped at once;
- a gap nobody fills: the hub calls `skip_gap()` after its `--gap-timeout` (and after looking for the
  missing tokens in JetStream itself). The missing sequences become placeholders (`None`) that the
  viewer turns into `event: reset` (never a silent gap); a gap wider than the whole log restarts the
  log at the first held sequence instead (a viewer below it replays from JetStream, which finds the
  gap too);
- `first_seq` is where the conversation starts: the first sequence the subscription delivered when it
  is 0 or 1, else 1 — a first message above 1 is a gap from 1 (token 2 may be stored before token 1
  when two bridges publish concurrently), held for the gap timeout and looked for in JetStream like any
  other, then skipped: tokens that aged out of the stream become a reset, never a silent gap. (A
  conversation starting at 0 whose token 1 is stored before token 0 loses token 0 — it cannot be told
  from one starting at 1;)
- after the `done: true` message nothing more is logged (a message after it is counted and dropped);
- `backlog_end`: every token below it arrived as backlog (the subscription's first catch-up on what
  was stored when it was made), not live. A viewer's lag (`Viewer.lag`) counts only live tokens, so a
  long stored conversation does not make its first viewer "slow". Later bursts (after a leaf
  reconnect: 200-275 tokens in the field notes' partition) do count: `--client-queue` absorbs them.

The log is a list trimmed in halves (amortised O(1) per token, O(k) to read k tokens from any position).

An entry holds what the viewers get: the message as published, or as token inspection changed it
(redacted bytes in `raw`), or a `BlockedToken` in its place (inspection withheld it: viewers get
`event: blocked` with its sequence as the id, so a resume stays gap-free). Inspection runs before a
message enters the log, once per message, so every viewer and every resume from memory reads the
same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from meshkit.edge.token_contract import TokenMessage

__all__ = ["BlockedToken", "ConversationLog", "Entry", "Skipped", "blocked_token"]

Entry = TokenMessage | None  # None: a sequence that was skipped (a gap nobody filled)


@dataclass(frozen=True, slots=True)
class BlockedToken(TokenMessage):
    """A token inspection withheld: `raw` is `{"conversation_id", "sequence", "reason"}` (what
    `event: blocked` carries), never the token's text."""

    reason: str = "blocked"


def blocked_token(message: TokenMessage, reason: str | None) -> BlockedToken:
    why = reason or "blocked"
    cid, seq = message.conversation_id, message.sequence
    raw = json.dumps({"conversation_id": cid, "sequence": seq, "reason": why}).encode()
    return BlockedToken(cid, seq, message.done, raw, message.ts, why)


@dataclass(frozen=True)
class Skipped:
    """Sequences `requested` .. `available_from - 1` are gone (what `event: reset` says)."""

    requested: int | None
    available_from: int


class ConversationLog:
    def __init__(self, capacity: int, *, max_pending: int = 4096) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.max_pending = max_pending
        self.first_seq: int | None = None  # the first sequence the subscription delivered
        self.next_seq: int | None = None  # the sequence expected next (None: nothing yet)
        self.done_seq: int | None = None
        self.log_start = 0  # the sequence of _entries[_offset]
        self.backlog_end = 0
        self.duplicates = 0
        self.after_done = 0
        self._entries: list[Entry] = []
        self._offset = 0  # entries before it are trimmed (dropped in halves)
        self._pending: dict[int, TokenMessage] = {}

    # -- feeding ----------------------------------------------------------------------------------
    def add(self, message: TokenMessage, *, backlog: bool = False) -> int:
        """Log `message`; how many entries were appended (0: a duplicate, after done, or held)."""
        seq = message.sequence
        if self.next_seq is None:
            # Sequences start at 0 or 1. A first message above 1 may have overtaken the first ones
            # (two bridges store concurrently): it is a gap from 1, held and looked for like any other.
            self.first_seq = self.log_start = self.next_seq = min(seq, 1)
        if self.done_seq is not None and seq > self.done_seq:
            self.after_done += 1
            return 0
        if seq < self.next_seq or seq in self._pending:
            self.duplicates += 1
            return 0
        if seq > self.next_seq:
            self._pending[seq] = message
            if len(self._pending) <= self.max_pending:
                return 0
            added = self._skip()
        else:
            added = self._append(message) + self._flush()
        if backlog:
            self.backlog_end = self.next_seq
        return added

    @property
    def waiting_for(self) -> int | None:
        """The missing sequence messages are held behind (None: no gap)."""
        return self.next_seq if self._pending else None

    def skip_gap(self) -> Skipped | None:
        """Give up on the missing sequences before the first held message; what was skipped."""
        if not self._pending or self.next_seq is None:
            return None
        skipped = Skipped(self.next_seq, min(self._pending))
        self._skip()
        return skipped

    def _skip(self) -> int:
        assert self.next_seq is not None
        low, high = self.next_seq, min(self._pending)
        added = 0
        if high - low > self.capacity:  # restart the log at `high`
            self._entries, self._offset = [], 0
            self.log_start = self.next_seq = high
        else:
            for _ in range(high - low):
                added += self._append(None)
        return added + self._flush()

    def _append(self, entry: Entry) -> int:
        assert self.next_seq is not None
        self._entries.append(entry)
        if entry is not None and entry.done:
            self.done_seq = entry.sequence
            self._pending = {s: m for s, m in self._pending.items() if s < entry.sequence}
        self.next_seq += 1
        if len(self._entries) - self._offset > self.capacity:
            self._offset += 1
            self.log_start += 1
            if self._offset * 2 > len(self._entries):
                del self._entries[: self._offset]
                self._offset = 0
        return 1

    def _flush(self) -> int:
        added = 0
        while self.next_seq in self._pending and (self.done_seq is None):
            added += self._append(self._pending.pop(self.next_seq))
        return added

    # -- reading ----------------------------------------------------------------------------------
    @property
    def holds_start(self) -> bool:
        """True while the log still reaches back to the first token the subscription delivered."""
        return self.first_seq is not None and self.log_start == self.first_seq

    def read(self, cursor: int, limit: int) -> list[Entry]:
        """Entries from sequence `cursor` (at least `log_start`) on, at most `limit` of them."""
        if cursor < self.log_start:
            raise ValueError(f"sequence {cursor} is before the log's start {self.log_start}")
        begin = self._offset + (cursor - self.log_start)
        return self._entries[begin : begin + limit]

    def __len__(self) -> int:
        return len(self._entries) - self._offset
