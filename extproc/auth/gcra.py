"""GCRA (the generic cell rate algorithm): the rate-limit arithmetic, and the in-memory limiter.

Semantics, the same in Redis (`rate_limit.py`'s Lua script) and in memory (`LocalLimiter`):

- A subject allowed `per_minute` requests has an emission interval `T = 60 / per_minute` seconds and a
  burst of `per_minute`: a subject that has been idle for a minute may use its whole minute's
  allowance at once, and after that is admitted one request every `T` (a steady `per_minute`).
- The state per subject is one number, its TAT ("theoretical arrival time"): the moment at which the
  subject would have used nothing. A request at `now` moves it to `new_tat = max(tat, now) + T`, and is
  admitted when `new_tat - 60 s <= now` (at most a minute's worth of requests ahead of time). A refused
  request leaves the TAT where it was: retrying does not push the reset further away.
- What a caller is told (`Decision`): `remaining` requests would still be admitted right now;
  `reset_after` seconds until the allowance is full again (`tat - now`: `x-ratelimit-reset`);
  `retry_after` seconds until the next request would be admitted (0 when this one was; `Retry-After`).
- The TAT is never more than a minute (plus one `T`) ahead of `now`, whatever the limit, so a subject
  idle for a minute holds nothing: Redis expires its key then, and `LocalLimiter` may drop it.
- A subject whose limit changes keeps its TAT: the new limit applies from the next request on.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

WINDOW = 60.0  # seconds: burst x emission interval, whatever the limit
# Floating-point slack when counting whole intervals (60/7 s does not divide evenly in binary).
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class Decision:
    """One rate-limit verdict. `source`: `redis` (shared by every replica), `local` (this replica's
    memory: its share of the limit) or `open` (Redis down and the limiter set to let everything by)."""

    allowed: bool
    limit: int  # requests per minute for this subject (a replica's share when `source` is local)
    remaining: int  # requests that would still be admitted now
    reset_after: float  # seconds until the allowance is full again (x-ratelimit-reset)
    retry_after: float  # seconds until the next request would be admitted (0 when allowed)
    source: str  # "redis" | "local" | "open"


def gcra(now: float, tat: float | None, per_minute: int, source: str = "local") -> tuple[Decision, float]:
    """Decide one request at `now` (seconds) for a subject whose stored TAT is `tat` (None: unknown or
    idle). Returns the decision and the TAT to store (the old one when refused)."""
    if per_minute < 1:
        raise ValueError(f"per_minute must be 1 or more, not {per_minute}")
    interval = WINDOW / per_minute
    base = now if tat is None or tat < now else tat
    new_tat = base + interval
    allow_at = new_tat - WINDOW
    if now < allow_at:
        return Decision(False, per_minute, 0, base - now, allow_at - now, source), base
    remaining = min(per_minute - 1, math.floor((now - allow_at) / interval + _EPSILON))
    return Decision(True, per_minute, remaining, new_tat - now, 0.0, source), new_tat


def share(per_minute: int, replicas: int) -> int:
    """What one of `replicas` servers enforces on its own: its share of the limit, at least 1."""
    return max(1, per_minute // max(1, replicas))


class LocalLimiter:
    """GCRA in this process's memory, for at most `max_subjects` subjects: beyond that the least
    recently seen subject is forgotten (it gets a fresh allowance if it comes back). Subjects whose TAT
    has passed hold nothing and are dropped first when they come up for eviction."""

    def __init__(self, max_subjects: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        if max_subjects < 1:
            raise ValueError("max_subjects must be 1 or more")
        self._max = max_subjects
        self._clock = clock
        self._tats: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tats)

    def __contains__(self, subject: object) -> bool:
        return subject in self._tats

    def clear(self) -> None:
        self._tats.clear()

    def check(self, subject: str, per_minute: int) -> Decision:
        now = self._clock()
        tats = self._tats
        decision, tat = gcra(now, tats.get(subject), per_minute, "local")
        if tat <= now:  # nothing held (cannot happen for an admitted request, but stay exact)
            tats.pop(subject, None)
            return decision
        tats[subject] = tat
        tats.move_to_end(subject)
        while len(tats) > self._max:
            tats.popitem(last=False)
        return decision
