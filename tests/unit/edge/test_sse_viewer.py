"""The conversation log (order, dedup, gaps, bounds) and a viewer's plan and pump, without a network:
the JetStream replay is a function over a list of stored tokens (the real one is tested in
tests/integration/test_sse.py)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from meshkit.edge.conversation_log import ConversationLog, Skipped, blocked_token
from meshkit.edge.loadgen_sse_parser import SseEvent, SseParser
from meshkit.edge.sse_format import SseFramer
from meshkit.edge.token_contract import TokenMessage, parse_token
from meshkit.edge.viewer import End, Read, Replay, Viewer, ViewerCut, Wait, feed, plan, pump


def tok(seq: int, *, done: bool = False) -> TokenMessage:
    raw = json.dumps({"conversation_id": "c1", "token": f"w{seq}", "sequence": seq, "done": done})
    return parse_token(raw.encode())


def seqs(log: ConversationLog, cursor: int) -> list[int | None]:
    return [e.sequence if e is not None else None for e in log.read(cursor, 1000)]


# -- the log ----------------------------------------------------------------------------------------
def test_in_order_duplicates_dropped() -> None:
    log = ConversationLog(100)
    for seq in (1, 2, 2, 3, 1):
        log.add(tok(seq))
    assert seqs(log, 1) == [1, 2, 3]
    assert log.duplicates == 2
    assert (log.first_seq, log.next_seq) == (1, 4)


def test_early_tokens_are_held_until_the_gap_fills() -> None:
    log = ConversationLog(100)
    assert [log.add(tok(s)) for s in (1, 2, 4, 5)] == [1, 1, 0, 0]
    assert log.waiting_for == 3
    assert log.add(tok(3)) == 3  # 3, then the held 4 and 5
    assert seqs(log, 1) == [1, 2, 3, 4, 5]
    assert log.waiting_for is None


def test_a_skipped_gap_leaves_placeholders() -> None:
    log = ConversationLog(100)
    for seq in (1, 4, 5):
        log.add(tok(seq))
    assert log.skip_gap() == Skipped(2, 4)
    assert seqs(log, 1) == [1, None, None, 4, 5]
    assert log.add(tok(3)) == 0 and log.duplicates == 1  # too late: skipped is skipped


def test_too_many_held_tokens_skip_the_gap_at_once() -> None:
    log = ConversationLog(100, max_pending=3)
    for seq in (1, 3, 4, 5):
        log.add(tok(seq))
    assert log.waiting_for == 2
    log.add(tok(6))
    assert seqs(log, 1) == [1, None, 3, 4, 5, 6]


def test_bounded_by_capacity() -> None:
    log = ConversationLog(4)
    for seq in range(1, 101):
        log.add(tok(seq))
    assert len(log) == 4 and log.log_start == 97
    assert seqs(log, 97) == [97, 98, 99, 100]
    assert not log.holds_start
    with pytest.raises(ValueError):
        log.read(96, 10)


def test_nothing_after_done() -> None:
    log = ConversationLog(10)
    for seq in (1, 3):
        log.add(tok(seq))
    log.add(tok(2, done=True))
    log.add(tok(4))
    assert seqs(log, 1) == [1, 2]
    assert log.done_seq == 2 and log.waiting_for is None and log.after_done == 1


# -- the plan ---------------------------------------------------------------------------------------
def log_of(*sequences: int, capacity: int = 100) -> ConversationLog:
    log = ConversationLog(capacity)
    for seq in sequences:
        log.add(tok(seq))
    return log


def test_plan() -> None:
    assert plan(Viewer("c1", None), ConversationLog(10)) == Wait()
    assert plan(Viewer("c1", None), log_of(1, 2)) == Read(1)
    assert plan(Viewer("c1", None), log_of(0, 1)) == Read(0)
    assert plan(Viewer("c1", 3), log_of(1, 2)) == Wait()  # resumes after 2: waits for 3
    assert plan(Viewer("c1", 2), log_of(1, 2)) == Read(2)
    # the stream's first token is 8: a gap from 1 (token 1 may still come: two bridges store
    # concurrently); held, then skipped: 1..7 become placeholders the pump turns into a reset
    aged = log_of(8, 9)
    assert aged.first_seq == 1 and aged.waiting_for == 1
    assert plan(Viewer("c1", 3), aged) == Wait()
    assert plan(Viewer("c1", None), aged) == Wait()
    assert aged.skip_gap() == Skipped(1, 8)
    assert aged.read(3, 10) == [None] * 5 + [tok(8), tok(9)]
    assert plan(Viewer("c1", 3), aged) == Read(3)
    late = log_of(2, 1, 3)  # token 2 stored before token 1: both delivered, in order
    assert seqs(late, 1) == [1, 2, 3] and late.waiting_for is None
    # the memory log starts at 97 (capacity 4): older ones come from JetStream
    assert plan(Viewer("c1", 50), log_of(*range(1, 101), capacity=4)) == Replay(49, 97)
    assert plan(Viewer("c1", None), log_of(*range(1, 101), capacity=4)) == Replay(None, 97)
    done = ConversationLog(10)
    done.add(tok(1))
    done.add(tok(2, done=True))
    assert plan(Viewer("c1", 3), done) == End()


def test_lag_counts_live_tokens_only() -> None:
    log = ConversationLog(100)
    for seq in range(1, 51):
        log.add(tok(seq), backlog=True)  # the catch-up on what was stored
    viewer = Viewer("c1", None, attach_seq=None)
    assert viewer.lag(log) == 0
    for seq in range(51, 61):
        log.add(tok(seq))
    assert viewer.lag(log) == 10
    late = Viewer("c1", 5, attach_seq=61)  # joined now: what was there before is not lag
    assert late.lag(log) == 0


# -- the pump ---------------------------------------------------------------------------------------
async def run(
    viewer: Viewer, log: ConversationLog, stored: list[TokenMessage] | None = None
) -> list[SseEvent]:
    out = bytearray()

    async def write(data: bytes) -> None:
        out.extend(data)

    async def replay(conversation_id: str, after: int | None, until: int) -> list[TokenMessage]:
        return [t for t in stored or [] if (after is None or t.sequence > after) and t.sequence < until]

    framer = SseFramer(1000)
    await asyncio.wait_for(pump(viewer, log, framer, write, replay=replay, heartbeat=10, retry_ms=250), 5)
    return SseParser().feed(bytes(out))


async def test_pump_replays_below_the_log_then_reads_it() -> None:
    stored = [tok(s) for s in range(1, 11)] + [tok(11, done=True)]
    log = ConversationLog(3)
    for t in stored:
        log.add(t)
    events = await run(Viewer("c1", 4), log, stored)
    assert [int(e.id) for e in events] == list(range(4, 12))
    assert events[-1].event == "done"


async def test_pump_resets_for_holes_in_the_replay_and_in_the_log() -> None:
    stored = [tok(s) for s in (1, 2, 5, 6, 7, 8)]
    log = ConversationLog(3)
    for t in stored:
        log.add(t)
    log.add(tok(11))
    assert log.skip_gap() == Skipped(3, 5)  # 3, 4 never came
    assert log.skip_gap() == Skipped(9, 11)  # nor 9, 10: in the log, the first of them in the replay's range
    log.add(tok(12, done=True))
    events = await run(Viewer("c1", None), log, stored)
    shown = [(e.event, e.id if e.event != "reset" else json.loads(e.data)) for e in events]
    assert shown == [
        ("token", "1"),
        ("token", "2"),
        ("reset", {"requested": 3, "available_from": 5}),
        ("token", "5"),
        ("token", "6"),
        ("token", "7"),
        ("token", "8"),
        ("reset", {"requested": 9, "available_from": 11}),
        ("token", "11"),
        ("done", "12"),
    ]


async def test_pump_live_then_reconnect_then_cut() -> None:
    log = ConversationLog(10)
    viewer = Viewer("c1", None)
    task = asyncio.ensure_future(run(viewer, log))
    for seq in (1, 2):
        log.add(tok(seq))
        viewer.wake.set()
        await asyncio.sleep(0.01)
    viewer.close()
    events = await task
    assert [(e.event, e.id) for e in events] == [("token", "1"), ("token", "2"), ("reconnect", "2")]
    cut = Viewer("c1", None)
    cut.cut("slow")
    with pytest.raises(ViewerCut, match="slow"):
        await run(cut, log)


def test_the_clock_wakes_viewers_owing_a_heartbeat_and_hands_over_stalled_writers() -> None:
    from meshkit.edge.viewer import ViewerClock

    idle, busy, stuck, cut = (Viewer("c1", None) for _ in range(4))
    idle.last_write = 100.0
    busy.last_write = 109.5
    stuck.writing_since = 100.0
    cut.cut("slow")
    cut.wake.clear()
    stalled: list[Viewer] = []
    clock = ViewerClock(
        lambda: [idle, busy, stuck, cut], heartbeat=5, write_timeout=8, stalled=stalled.append
    )
    clock.check(now=110.0)
    assert idle.wake.is_set() and not busy.wake.is_set()
    assert stalled == [stuck] and not stuck.wake.is_set()
    assert not cut.wake.is_set()
    assert clock.tick == 1.0


# -- blocked tokens and reauth ------------------------------------------------------------------------
async def test_a_blocked_token_keeps_its_id_and_the_stream_goes_on() -> None:
    log = ConversationLog(10)
    log.add(tok(1))
    log.add(blocked_token(tok(2), "pii"))
    log.add(tok(3, done=True))
    events = await run(Viewer("c1", None), log)
    assert [(e.event, e.id) for e in events] == [("token", "1"), ("blocked", "2"), ("done", "3")]
    assert json.loads(events[1].data) == {"conversation_id": "c1", "sequence": 2, "reason": "pii"}
    assert b"w2" not in events[1].data.encode()


async def test_an_expired_viewer_gets_reauth_and_no_token_after_it() -> None:
    log = ConversationLog(10)
    log.add(tok(1))
    viewer = Viewer("c1", None)
    out = bytearray()

    async def write(data: bytes) -> None:
        out.extend(data)

    async def replay(conversation_id: str, after: int | None, until: int) -> list[TokenMessage]:
        return []

    viewer.expire_at(time.monotonic() + 0.2)
    task = asyncio.ensure_future(
        pump(viewer, log, SseFramer(1000), write, replay=replay, heartbeat=10, retry_ms=250)
    )
    await asyncio.sleep(0.05)
    log.add(tok(2))
    viewer.wake.set()
    ended = await asyncio.wait_for(task, 2)  # the timer wakes it: no token, no heartbeat needed
    log.add(tok(3))
    assert ended == "reauth"
    events = SseParser().feed(bytes(out))
    assert [(e.event, e.id) for e in events] == [("token", "1"), ("token", "2"), ("reauth", "2")]
    assert json.loads(events[-1].data) == {"reason": "token_expired", "last_event_id": 2}


async def test_the_clock_visits_its_viewers_a_slice_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """10,000 viewers at once held the loop ~7 ms every tick: a tenth of them per tenth of a tick."""
    from meshkit.edge.viewer import CLOCK_SLICES, ViewerClock

    viewers = [Viewer("c1", None) for _ in range(40)]
    for v in viewers:
        v.last_write = 0.0  # every one owes a heartbeat
    woken: list[int] = []
    naps: list[float] = []

    async def sleep(seconds: float) -> None:
        woken.append(sum(v.wake.is_set() for v in viewers))
        naps.append(seconds)
        if len(naps) > CLOCK_SLICES:
            raise asyncio.CancelledError

    clock = ViewerClock(lambda: viewers, heartbeat=5, write_timeout=8, stalled=lambda v: None)
    monkeypatch.setattr(asyncio, "sleep", sleep)  # the clock's (viewer.py's) asyncio
    with pytest.raises(asyncio.CancelledError):
        await clock._run()
    assert woken == [4 * i for i in range(CLOCK_SLICES + 1)]
    assert naps == [pytest.approx(clock.tick / CLOCK_SLICES)] * (CLOCK_SLICES + 1)


# -- direct writes from the hub (feed) ----------------------------------------------------------------
class Sink:
    def __init__(self) -> None:
        self.out = bytearray()
        self.open = True

    def ready(self) -> bool:
        return self.open

    def write(self, data: bytes) -> None:
        self.out.extend(data)


async def parked(viewer: Viewer, log: ConversationLog, sink: Sink) -> tuple[asyncio.Task[str], bytearray]:
    """A pump with `sink`, run until it waits for tokens; the task and what it wrote itself."""
    out = bytearray()

    async def write(data: bytes) -> None:
        out.extend(data)

    async def replay(conversation_id: str, after: int | None, until: int) -> list[TokenMessage]:
        return []

    task = asyncio.ensure_future(
        pump(viewer, log, SseFramer(1000), write, replay=replay, heartbeat=10, retry_ms=250, sink=sink)
    )
    for _ in range(20):
        await asyncio.sleep(0)
    assert viewer.direct is not None, "the pump is parked"
    return task, out


async def test_feed_writes_for_a_parked_pump_without_waking_it_and_ends_it_at_done() -> None:
    log = ConversationLog(10)
    log.add(tok(1))
    viewer, sink = Viewer("c1", None), Sink()
    task, by_pump = await parked(viewer, log, sink)
    assert [e.id for e in SseParser().feed(bytes(by_pump))] == ["1"]  # what was there: the pump's
    log.add(tok(2))
    log.add(blocked_token(tok(3), "pii"))
    assert feed(viewer, log, time.monotonic()) is True
    assert not viewer.wake.is_set() and viewer.direct is not None  # still parked
    log.add(tok(4, done=True))
    assert feed(viewer, log, time.monotonic()) is False  # done: the pump must end
    assert viewer.finished
    viewer.wake.set()
    assert await asyncio.wait_for(task, 2) == "done"
    events = SseParser().feed(bytes(sink.out))
    assert [(e.event, e.id) for e in events] == [("token", "2"), ("blocked", "3"), ("done", "4")]
    assert [e.id for e in SseParser().feed(bytes(by_pump))] == ["1"]  # nothing twice


async def test_feed_leaves_it_to_the_pump_when_the_sink_is_full_or_the_token_expired() -> None:
    log = ConversationLog(10)
    viewer, sink = Viewer("c1", None), Sink()
    task, by_pump = await parked(viewer, log, sink)
    sink.open = False  # its transport holds too much: back-pressure is the pump's (an awaited write)
    log.add(tok(1))
    assert feed(viewer, log, time.monotonic()) is False
    assert viewer.cursor is None and viewer.last_sent == -1  # nothing framed
    viewer.wake.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert [e.id for e in SseParser().feed(bytes(by_pump))] == ["1"]
    sink.open = True
    viewer.ends_at = time.monotonic() - 1  # expired: reauth, and no token after it
    log.add(tok(2))
    assert feed(viewer, log, time.monotonic()) is False
    assert not sink.out
    viewer.wake.set()
    assert await asyncio.wait_for(task, 2) == "reauth"
    assert [e.event for e in SseParser().feed(bytes(by_pump))] == ["token", "reauth"]
    task.cancel()


async def test_feed_says_a_reset_before_the_next_token_as_the_pump_would() -> None:
    log = ConversationLog(10)
    log.add(tok(1))
    viewer, sink = Viewer("c1", None), Sink()
    task, _ = await parked(viewer, log, sink)
    log.add(tok(4))  # 2 and 3 missing: held
    assert log.skip_gap() is not None
    assert feed(viewer, log, time.monotonic()) is True
    events = SseParser().feed(bytes(sink.out))
    assert [(e.event, e.id) for e in events] == [("reset", ""), ("token", "4")]  # a fresh parser: no id yet
    assert json.loads(events[0].data) == {"requested": 2, "available_from": 4}
    task.cancel()
