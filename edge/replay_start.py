"""Where a resume's replay starts in the stream: near the asked-for token, not at the conversation's first.

Viewers resume by token sequence (the SSE id); JetStream indexes by stream sequence, shared by every
conversation. Reading a conversation from its first stored message to reach token N costs N messages
(100,000 per subject are allowed: minutes over a distant leaf). `replay_start()` finds the stream
sequence to start from with a binary search over stream sequences: each probe is one direct "next
message of this subject at or after stream sequence S" request (`get_msg(next=True)`), so about
log2(stream span) round trips (20 for a million messages) instead of N messages.

The search assumes token sequences grow with stream sequences, which is how a bridge stores them; two
bridges sharing a consumer group can store neighbours out of order, so it aims `margin` tokens below the
asked-for one (default 1,024, far more than a bridge's batch), and the caller still filters and sorts
what it reads. A probe that finds no message, or a token it cannot read, ends the search early at the
safe side (an earlier start: more to read, nothing missed).
"""

from __future__ import annotations

import asyncio

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from meshkit.edge.token_contract import MalformedToken, parse_token

__all__ = ["DEFAULT_MARGIN", "replay_start"]

DEFAULT_MARGIN = 1024
MAX_PROBES = 64


async def _token_at_or_after(
    js: JetStreamContext, stream: str, subject: str, seq: int
) -> tuple[int, int | None] | None:
    """(stream sequence, token sequence) of the subject's first message at or after `seq`, the token
    sequence None when it cannot be read; None when there is no such message."""
    try:
        msg = await js.get_msg(stream, seq=seq, subject=subject, next=True)
    except NotFoundError:
        return None
    try:
        token: int | None = parse_token(msg.data or b"", subject=msg.subject).sequence
    except MalformedToken:
        token = None
    return int(msg.seq or seq), token


async def replay_start(
    js: JetStreamContext,
    stream: str,
    subject: str,
    after: int,
    *,
    margin: int = DEFAULT_MARGIN,
    probe_timeout: float | None = None,
) -> int | None:
    """The stream sequence a replay of `subject` for tokens above `after` should start at: every such
    token is stored at or after it (given the ordering above). None when the subject has no message.

    The search keeps `lo`, a subject message whose token is at most `after - margin`, and `hi`, a
    stream sequence from which every subject message is above it (or the end); an unreadable token
    counts as above (the safe side: an earlier start). `probe_timeout` bounds each round trip: one
    that overruns in the bisection ends it at `lo` (safe: more to read); the first two raise
    TimeoutError (nothing is known yet)."""
    target = after - margin
    async with asyncio.timeout(probe_timeout):
        first = await _token_at_or_after(js, stream, subject, 1)
    if first is None:
        return None
    if first[1] is None or first[1] > target:
        return first[0]
    async with asyncio.timeout(probe_timeout):
        last = await js.get_msg(stream, subject=subject)  # the subject's last message
    lo, hi = first[0], int(last.seq or first[0]) + 1
    for _ in range(MAX_PROBES):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        try:
            async with asyncio.timeout(probe_timeout):
                found = await _token_at_or_after(js, stream, subject, mid)
        except TimeoutError:
            break  # a slow link: start from what is known to be safe
        if found is None or found[0] >= hi:
            hi = mid  # no subject message in [mid, hi)
        elif found[1] is not None and found[1] <= target:
            lo = found[0]
        else:
            hi = mid  # the first at or after mid is above target: so is every later one
    return lo
