"""One conversation's tokens as the hub has seen them: in sequence order, deduplicated, bounded.

A `ConversationLog` is fed every message its conversation's subscription delivers (the stream's
order: its live copies, or a consumer) and what the hub reads from the stream to catch up, and keeps
the last `capacity` tokens contiguous by token `sequence`, so a viewer reads "from sequence N on" by
position. What it decides:

- order and dedup by token sequence: a message whose sequence was already logged (a redelivery, a
  second bridge's copy stored without dedup) is dropped and counted; one that arrives early (a gap:
  sequence 5 while 4 is expected) is held in `pending` until the missing one comes, then both go in,
  in order. Held messages are bounded (`max_pending`); past that the gap is skipped at once;
- a gap nobody fills: the hub calls `skip_gap()` after its `--gap-timeout` (and after looking for the
  missing tokens in JetStream itself). The missing sequences become placeholders (`None`) that the
  viewer turns into `event: reset` (never a silent gap); a gap wider than the whole log restarts the
  log at the first held sequence instead (a viewer below it replays from JetStream, which finds the
  gap too);
- `first_seq` is where the conversation starts (sequences start at 0 or 1). A first message above 1
  is a gap from 1 (token 2 may be stored before token 1 when two bridges publish concurrently), held
  for the gap timeout and looked for in JetStream like any other, then skipped: tokens that aged out
  of the stream become a reset, never a silent gap;
- an open start: a first token 1 (or above) may also have overtaken token 0 (a conversation that
  starts at 0, two bridges storing 1 before 0). While that is open, `first_seq` is None (viewers
  wait, none is pinned to a start yet), everything is held, and `waiting_for` is 0, so the hub holds
  it like any gap and looks for token 0 in JetStream after `--gap-timeout`. It closes when token 0
  comes (the conversation starts at 0), or without a reset at 1 (a conversation starting at 1 is
  normal): when the gap is given up (`skip_gap()`, the hold bound), or at once when the
  subscription's catch-up ends (the first message that is not backlog): a token 0 stored before the
  subscription was made is in that catch-up, so a viewer of a stored conversation 1..N waits for
  nothing. When the start is open: a first message that came as backlog (stored before the
  subscription, with more stored after it), always; a live one only with `hold_live_start` (a viewer
  there before the conversation began: every live conversation starting at 1 would then wait
  `--gap-timeout` for its first token, so it is off by default, and a token 0 stored after a live
  token 1, or after the subscription was made, still loses token 0, counted as a duplicate). The
  open start holds at most `capacity` messages (past that token 0 is not coming: start at 1);
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
    def __init__(self, capacity: int, *, max_pending: int = 4096, hold_live_start: bool = False) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.max_pending = max_pending
        self.hold_live_start = hold_live_start  # open the start on a live first token too
        self.first_seq: int | None = None  # where the conversation starts (None: not known yet)
        self.next_seq: int | None = None  # the sequence expected next (None: nothing yet)
        self.done_seq: int | None = None
        self.log_start = 0  # the sequence of _entries[_offset]
        self.backlog_end = 0
        self.duplicates = 0
        self.after_done = 0
        self._entries: list[Entry] = []
        self._offset = 0  # entries before it are trimmed (dropped in halves)
        self._pending: dict[int, TokenMessage] = {}
        self._start_open = False  # token 0 may still come (see the module docstring)
        self._open_until_live = False  # ... until the subscription's catch-up ends
        self._held_backlog_end = 0  # 1 + the highest sequence held as backlog while the start was open

    # -- feeding ----------------------------------------------------------------------------------
    def add(self, message: TokenMessage, *, backlog: bool = False) -> int:
        """Log `message`; how many entries were appended (0: a duplicate, after done, or held)."""
        seq = message.sequence
        if self.next_seq is None:
            self._begin(seq, backlog)
        assert self.next_seq is not None
        if self.done_seq is not None and seq > self.done_seq:
            self.after_done += 1
            return 0
        if seq < self.next_seq or seq in self._pending:
            self.duplicates += 1
            return 0
        if self._start_open and backlog:
            self._held_backlog_end = max(self._held_backlog_end, seq + 1)
        if seq > self.next_seq:
            self._pending[seq] = message
            if self._start_open and self._open_until_live and not backlog:
                return self._settle(1)  # the catch-up is over and token 0 was not in it
            if len(self._pending) <= self._hold_limit:
                return 0
            added = self._skip()
        elif self._start_open:  # token 0 came: the conversation starts at 0
            added = self._settle(0, message)
        else:
            added = self._append(message) + self._flush()
        if backlog:
            self.backlog_end = self.next_seq
        return added

    def _begin(self, seq: int, backlog: bool) -> None:
        """The first message: opens the start (token 0 may still come) or starts at 0 or 1."""
        if seq >= 1 and (backlog or self.hold_live_start):
            self._start_open, self._open_until_live = True, backlog
            self.log_start = self.next_seq = 0  # held like a gap at 0; first_seq stays None
        else:
            # A first message above 1 may have overtaken the first ones (two bridges store
            # concurrently): it is a gap from 1, held and looked for like any other.
            self.first_seq = self.log_start = self.next_seq = min(seq, 1)

    def _settle(self, first: int, message: TokenMessage | None = None) -> int:
        """Close the open start: the conversation starts at `first` (with `message`, its token 0);
        what was held from there goes in."""
        self._start_open = False
        self.first_seq = self.log_start = self.next_seq = first
        added = 0 if message is None else self._append(message)
        added += self._flush()
        self.backlog_end = max(self.backlog_end, min(self._held_backlog_end, self.next_seq))
        return added

    @property
    def _hold_limit(self) -> int:
        return min(self.capacity, self.max_pending) if self._start_open else self.max_pending

    @property
    def waiting_for(self) -> int | None:
        """The missing sequence messages are held behind (None: no gap; 0 while the start is open)."""
        return self.next_seq if self._pending else None

    def skip_gap(self) -> Skipped | None:
        """Give up on the missing sequences before the first held message; what was skipped (None:
        nothing, also when only an open start closed at 1: no reset for a conversation starting at 1)."""
        if not self._pending or self.next_seq is None:
            return None
        if self._start_open:
            if 1 in self._pending:
                self._settle(1)
                return None
            self._settle(1)  # then 1 is missing too: the gap from 1, skipped now (448e39f)
            if not self._pending:
                return None
        skipped = Skipped(self.next_seq, min(self._pending))
        self._skip()
        return skipped

    def _skip(self) -> int:
        assert self.next_seq is not None
        added = 0
        if self._start_open:  # the hold bound: token 0 is not coming
            added = self._settle(1)
            if not self._pending:
                return added
        low, high = self.next_seq, min(self._pending)
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
