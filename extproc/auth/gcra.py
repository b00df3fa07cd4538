"""GCRA (the generic cell rate algorithm): the rate-limit arithmetic, and the in-memory limiter.

Semantics, the same in Redis (`rate_limit.py`'s Lua script) and in memory (`LocalLimiter`):

- A subject allowed `per_minute` requests has an emission interval `T = 60 / per_minute` seconds and a
  burst of `per_minute`: a subject that has been idle for a minute may use its whole minute's
  allowance at once, and after that is admitted one request every `T` (a steady `per_minute`).
- Times are whole microseconds and `T` is rounded down to one (`60/7 s` is 8,571,428 µs): sums of
  a float `T` drift (seven `60/7` add up to a bit more than 60 and the seventh of a burst was refused),
  whole numbers do not; the rate is then at most 1 µs per `T` faster than asked. `per_minute` is 1 to
  60,000,000.
- The state per subject is one number, its TAT ("theoretical arrival time"): the moment at which the
  subject would have used nothing. A request at `now` moves it to `new_tat = max(tat, now) + T`, and is
  admitted when `new_tat - 60 s <= now` (at most a minute's worth of requests ahead of time). A refused
  request leaves the TAT where it was: retrying does not push the reset further away.
- What a caller is told (`Decision`): `remaining` requests would still be admitted right now;
  `reset_after` seconds until the allowance is full again (`tat - now`: `x-ratelimit-reset`);
  `retry_after` seconds until the next request would be admitted (0 when this one was; `Retry-After`).
- The TAT is never more than a minute ahead of `now`, whatever the limit, so a subject
  idle for a minute holds nothing: Redis expires its key then, and `LocalLimiter` may drop it.
- A subject whose limit changes keeps its TAT: the new limit applies from the next request on.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MINUTE_US = 60_000_000
MAX_PER_MINUTE = MINUTE_US  # one per microsecond


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


def check_per_minute(per_minute: int) -> None:
    if not 1 <= per_minute <= MAX_PER_MINUTE:
        raise ValueError(f"per_minute must be 1 to {MAX_PER_MINUTE:,}, not {per_minute}")


def gcra(now: int, tat: int | None, per_minute: int, source: str = "local") -> tuple[Decision, int]:
    """Decide one request at `now` (microseconds) for a subject whose stored TAT is `tat` (None:
    unknown or idle). Returns the decision and the TAT to store (the old one when refused)."""
    check_per_minute(per_minute)
    interval = MINUTE_US // per_minute
    base = now if tat is None or tat < now else tat
    new_tat = base + interval
    allow_at = new_tat - interval * per_minute
    if now < allow_at:
        return Decision(False, per_minute, 0, (base - now) / 1e6, (allow_at - now) / 1e6, source), base
    remaining = min(per_minute - 1, (now - allow_at) // interval)
    return Decision(True, per_minute, remaining, (new_tat - now) / 1e6, 0.0, source), new_tat


def share(per_minute: int, replicas: int) -> int:
    """What one of `replicas` servers enforces on its own: its share of the limit, at least 1."""
    return max(1, per_minute // max(1, replicas))


class LocalLimiter:
    """GCRA in this process's memory, for at most `max_subjects` subjects: beyond that the least
    recently seen subject is forgotten (it gets a fresh allowance if it comes back). `clock` is in
    seconds."""

    def __init__(self, max_subjects: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        if max_subjects < 1:
            raise ValueError("max_subjects must be 1 or more")
        self._max = max_subjects
        self._clock = clock
        self._tats: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tats)

    def __contains__(self, subject: object) -> bool:
        return subject in self._tats

    def clear(self) -> None:
        self._tats.clear()

    def check(self, subject: str, per_minute: int) -> Decision:
        now = round(self._clock() * 1e6)
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
