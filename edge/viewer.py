"""One client watching one conversation: its position, its bounded backlog, and the loop that feeds it.

A `Viewer` does not copy tokens: its "queue" is the window of its conversation's shared log
(`ConversationLog`) between its cursor (the next sequence it is owed) and the log's end. The queue is
bounded by `--client-queue` messages: when a client is that many *live* tokens behind (`lag()`: the
subscription's first catch-up on stored tokens and tokens before the viewer joined do not count), the
hub cuts it off (`cut()`: reason logged, counted, connection aborted). It can
come back with Last-Event-ID. A slow viewer therefore never delays the hub or another viewer: nobody
ever waits on it, it only falls behind.

`pump()` is the transport-free loop: it reads what `plan()` says is next and hands the framed bytes to
`write` (an SSE response today, a WebSocket later):

- tokens from the shared log, in sequence order, each at most once (the cursor, plus a `last_sent`
  guard on every path);
- a replay from JetStream (`Replayer`) when the viewer wants sequences the log no longer holds (a
  resume far back, a late viewer of a long conversation): only the part below the log's start, then
  the log again;
- `reset` when sequences are gone: below the subscription's first token (aged out of the stream), a
  gap the hub skipped, or a hole a replay found. It goes out right before the next token (adjacent
  holes, say one in the replay and one in the log, make one reset), so `available_from` is always
  the sequence that follows it;
- a heartbeat after `heartbeat` seconds without anything to send; `reconnect` when the server shuts
  down (`closing`); the `done` message ends it;
- `reauth` once `ends_at` (monotonic; the stream's JWT expired, `stream_auth.py`) has passed: checked
  before every batch of tokens is framed, so no token goes out after it; the transport arms one timer
  per stream (`expire_at()`) that wakes the pump then;
- a `BlockedToken` in the log (token inspection withheld it) is framed as `blocked`, keeping its id.

Direct writes (`feed()`): while a pump is parked (waiting for tokens) with a `DirectSink` (the SSE
transport gives one; the WebSocket does not), the hub does not wake it for new tokens: it frames them
and writes them to the sink itself, in its NATS callback, exactly as the pump would have (the same
`plan()` and framing, so order, dedup, resets, blocked tokens, the reauth check before every batch and
the `done` end are the pump's). Only when the sink is not ready (its transport's write buffer is above
`DIRECT_WRITE_LIMIT`, or closing) or the next step is not a read from the log (a replay, the end) does
the hub wake the pump, which then writes with back-pressure (an awaited write, `--write-timeout`). One
task wake-up, one coroutine chain and one future per viewer per token cost about half of the adapter's
CPU at 10,000 streams (py-spy), and the futures, alive until each viewer's next token, were most of
what reached the garbage collector's oldest generation (full collections of ~400 ms at 10,000 streams).

`ViewerClock` is the one task that keeps time for all viewers (heartbeats due, writes blocked past
`--write-timeout`): a pump waits on its viewer's event only, with no timer of its own (two timers per
delivered token cost about 12 us, measured here).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from meshkit.edge.conversation_log import BlockedToken, ConversationLog, Skipped
from meshkit.edge.sse_format import Framer
from meshkit.edge.token_contract import TokenMessage

__all__ = [
    "DIRECT_WRITE_LIMIT",
    "Direct",
    "DirectSink",
    "End",
    "Read",
    "Replay",
    "Replayer",
    "Viewer",
    "ViewerClock",
    "ViewerCut",
    "Wait",
    "feed",
    "pump",
]

READ_BATCH = 256  # log entries framed into one write
DIRECT_WRITE_LIMIT = 64 * 1024  # bytes a transport may hold unsent and still take a direct write
CLOCK_SLICES = 10  # ViewerClock visits its viewers in this many slices per tick


class ViewerCut(Exception):
    """The viewer was cut off (slow); `reason` says why."""


@dataclass(eq=False)  # hashed by identity: a conversation holds a set of them
class Viewer:
    conversation_id: str
    cursor: int | None  # the next sequence owed; None: from the conversation's first token
    abort: Callable[[], None] = lambda: None  # drops the connection (a cut-off)
    attach_seq: int | None = None  # the log's next sequence when the viewer joined
    cut_reason: str | None = None
    closing: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    last_sent: int = -1
    last_write: float = field(default_factory=time.monotonic)
    writing_since: float | None = None  # a write under way (to a client that may have stopped reading)
    gap_open: bool = False  # sequences are gone: a reset goes out before the next token
    gap_requested: int | None = None
    from_start: bool = False  # joined without Last-Event-ID: a reset before its first token says null
    ends_at: float | None = None  # monotonic: the stream's token expires then (reauth)
    direct: Direct | None = None  # set while the pump is parked and the hub may write for it (feed)
    finished: bool = False  # the done token went out (written by feed(): the pump returns "done")
    joined_at: float = field(default_factory=time.time)  # wall clock, as a message's `ts`
    _expiry: asyncio.TimerHandle | None = None

    def expire_at(self, ends_at: float) -> None:
        """End the stream with `reauth` at `ends_at` (monotonic), waking the pump then."""
        self.ends_at = ends_at
        if self._expiry is not None:
            self._expiry.cancel()
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_at(loop.time() + max(0.0, ends_at - time.monotonic()), self.wake.set)

    def expired(self) -> bool:
        return self.ends_at is not None and time.monotonic() >= self.ends_at

    def cancel_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def lag(self, log: ConversationLog) -> int:
        """Live tokens the viewer has not been sent yet (what `--client-queue` bounds)."""
        if log.next_seq is None:
            return 0
        base = max(
            self.cursor if self.cursor is not None else (log.first_seq or 0),
            self.attach_seq if self.attach_seq is not None else (log.first_seq or 0),
            log.backlog_end,
        )
        return max(0, log.next_seq - base)

    def cut(self, reason: str) -> None:
        if self.cut_reason is None:
            self.cut_reason = reason
            self.wake.set()
            self.abort()

    def close(self) -> None:
        """The server is shutting down: the pump sends `reconnect` and returns."""
        self.closing = True
        self.wake.set()


# -- what comes next ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Wait:
    pass


@dataclass(frozen=True)
class End:
    pass


@dataclass(frozen=True)
class Replay:
    after: int | None  # replay sequences above it (None: from the first stored)
    until: int  # ... and below this one (the log's start)


@dataclass(frozen=True)
class Read:
    cursor: int


Step = Wait | End | Replay | Read | Skipped


def plan(viewer: Viewer, log: ConversationLog) -> Step:
    """What `viewer` needs next from `log` (moves the cursor past a reset it returns)."""
    if log.first_seq is None:
        return Wait()
    if viewer.cursor is None:
        if not log.holds_start:
            return Replay(None, log.log_start)
        viewer.cursor = log.first_seq  # 0 or 1: tokens that aged out are placeholders, a reset
        viewer.from_start = True
    cursor = viewer.cursor
    if cursor < log.first_seq:
        viewer.cursor = log.first_seq
        return Skipped(cursor, log.first_seq)
    if log.done_seq is not None and cursor > log.done_seq:
        return End()
    if cursor < log.log_start:
        return Replay(cursor - 1, log.log_start)
    assert log.next_seq is not None
    if cursor >= log.next_seq:
        return Wait()
    return Read(cursor)


class Replayer(Protocol):
    async def __call__(self, conversation_id: str, after: int | None, until: int) -> list[TokenMessage]: ...


Write = Callable[[bytes], Awaitable[None]]
Delivered = Callable[[TokenMessage, bool], None]  # (message, published after the viewer joined)


class DirectSink(Protocol):
    """A transport the hub may write to synchronously while the viewer's pump is parked."""

    def ready(self) -> bool:
        """True when a write now would not pile up (see `DIRECT_WRITE_LIMIT`)."""
        ...

    def write(self, data: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class Direct:
    """What `feed()` needs to write for a parked pump: its framer, sink and callbacks."""

    framer: Framer
    sink: DirectSink
    delivered: Delivered
    reset: Callable[[], None]


def feed(viewer: Viewer, log: ConversationLog, now: float) -> bool:
    """Write what `log` holds for `viewer` straight to its sink, as its parked pump would have;
    True when the pump may stay parked, False when it must be woken (not parked, no sink, the sink
    not ready, a replay or the end next, cut, closing, expired, or the `done` token just went out)."""
    direct = viewer.direct
    if direct is None:
        return False
    while True:
        if viewer.cut_reason is not None or viewer.closing or viewer.expired() or not direct.sink.ready():
            return False
        step = plan(viewer, log)
        if isinstance(step, Skipped):
            _gap(viewer, step.requested)
            continue
        if not isinstance(step, Read):
            return isinstance(step, Wait)
        framer, delivered, reset = direct.framer, direct.delivered, direct.reset
        out, finished = _frame_entries(viewer, log, step.cursor, framer, delivered, reset)
        if out:
            try:
                direct.sink.write(out)
            except Exception as exc:  # the connection broke: the client resumes with Last-Event-ID
                viewer.cut(f"write failed: {exc!r}")
                return False
            viewer.last_write = now
        if finished:
            viewer.finished = True
            return False


async def pump(
    viewer: Viewer,
    log: ConversationLog,
    framer: Framer,
    write: Write,
    *,
    replay: Replayer,
    heartbeat: float,
    retry_ms: int,
    delivered: Delivered = lambda message, live: None,
    reset: Callable[[], None] = lambda: None,
    sink: DirectSink | None = None,
) -> str:
    """Feed `viewer` until its conversation is done (`"done"`), the server closes (`"reconnect"`),
    its token expired (`"reauth"`) or the end was already sent before (`"end"`); `ViewerCut` when the
    hub cut it off. With `sink`, the hub writes new tokens itself while the pump waits (`feed()`)."""
    viewer.last_write = time.monotonic()
    parked = None if sink is None else Direct(framer, sink, delivered, reset)

    async def send(data: bytes) -> None:
        if data:
            viewer.writing_since = time.monotonic()
            try:
                await write(data)
            finally:
                viewer.writing_since = None
        viewer.last_write = time.monotonic()  # also for nothing (a WebSocket's heartbeat: its pings)

    while True:
        if viewer.cut_reason is not None:
            raise ViewerCut(viewer.cut_reason)
        if viewer.finished:
            return "done"
        if viewer.closing:
            await send(framer.reconnect(retry_ms))
            return "reconnect"
        if viewer.expired():
            await send(framer.reauth(viewer.last_sent if viewer.last_sent >= 0 else None))
            return "reauth"
        viewer.wake.clear()
        step = plan(viewer, log)
        if isinstance(step, Skipped):
            _gap(viewer, step.requested)
        elif isinstance(step, End):
            return "end"
        elif isinstance(step, Wait):
            if time.monotonic() - viewer.last_write >= heartbeat:
                await send(framer.heartbeat())
                continue
            viewer.direct = parked
            try:
                await viewer.wake.wait()  # a token, a cut, the shutdown, or ViewerClock: a heartbeat is due
            finally:
                viewer.direct = None
        elif isinstance(step, Replay):
            tokens = await replay(viewer.conversation_id, step.after, step.until)
            if viewer.expired():
                continue  # expired while the replay ran: reauth, not those tokens
            out, finished = _frame_replay(viewer, step, tokens, framer, delivered, reset)
            await send(out)
            if finished:
                return "done"
        else:
            out, finished = _frame_entries(viewer, log, step.cursor, framer, delivered, reset)
            await send(out)
            if finished:
                return "done"


def _gap(viewer: Viewer, requested: int | None) -> None:
    """Sequences from `requested` on are gone; said (one reset for adjacent holes) before the next token."""
    if not viewer.gap_open:
        if viewer.from_start and viewer.last_sent < 0:
            requested = None  # it asked for "everything", not for a sequence
        viewer.gap_open, viewer.gap_requested = True, requested


def _frame_token(
    viewer: Viewer, message: TokenMessage, framer: Framer, delivered: Delivered, reset: Callable[[], None]
) -> tuple[bytes, bool]:
    if message.sequence <= viewer.last_sent:  # dedup on every path
        return b"", False
    head = b""
    if viewer.gap_open:
        viewer.gap_open = False
        reset()
        head = framer.reset(viewer.gap_requested, message.sequence)
    viewer.last_sent = message.sequence
    viewer.cursor = message.sequence + 1
    if isinstance(message, BlockedToken):  # never a done one (inspection delivers those emptied)
        return head + framer.blocked(message), message.done
    # live: published after the viewer joined (a resume's or a late viewer's catch-up is not latency)
    delivered(message, message.ts is None or message.ts >= viewer.joined_at)
    if message.done:
        return head + framer.done(message), True
    return head + framer.token(message), False


def _frame_entries(
    viewer: Viewer,
    log: ConversationLog,
    cursor: int,
    framer: Framer,
    delivered: Delivered,
    reset: Callable[[], None],
) -> tuple[bytes, bool]:
    parts: list[bytes] = []
    seq = cursor
    for entry in log.read(cursor, READ_BATCH):
        if entry is None:
            _gap(viewer, seq)
            viewer.cursor = seq + 1
        else:
            data, finished = _frame_token(viewer, entry, framer, delivered, reset)
            parts.append(data)
            if finished:
                return b"".join(parts), True
        seq += 1
    return b"".join(parts), False


def _frame_replay(
    viewer: Viewer,
    step: Replay,
    tokens: list[TokenMessage],
    framer: Framer,
    delivered: Delivered,
    reset: Callable[[], None],
) -> tuple[bytes, bool]:
    """The replayed tokens (sorted, unique, in (after, until)); every hole noted as a gap."""
    parts: list[bytes] = []
    expected = None if step.after is None else step.after + 1
    for message in tokens:
        if (expected is None and message.sequence > 1) or (
            expected is not None and message.sequence > expected
        ):
            _gap(viewer, expected)
        data, finished = _frame_token(viewer, message, framer, delivered, reset)
        parts.append(data)
        if finished:
            return b"".join(parts), True
        expected = message.sequence + 1
    if expected is None or expected < step.until:
        _gap(viewer, expected)  # nothing (more) stored below the log's start: those are gone
    viewer.cursor = max(step.until, viewer.cursor or 0)
    return b"".join(parts), False


class ViewerClock:
    """One task for every viewer's timers, instead of two timers per write: every `tick` seconds it
    wakes the viewers that owe their client a heartbeat, and hands the ones whose write has blocked
    longer than `write_timeout` (a client that stopped reading) to `stalled` (which cuts them off)."""

    def __init__(
        self,
        viewers: Callable[[], Iterable[Viewer]],
        *,
        heartbeat: float,
        write_timeout: float,
        stalled: Callable[[Viewer], None],
    ) -> None:
        self._viewers = viewers
        self._heartbeat = heartbeat
        self._write_timeout = write_timeout
        self._stalled = stalled
        self.tick = min(1.0, max(0.05, min(heartbeat, write_timeout) / 4))
        self._task: asyncio.Task[None] | None = None

    def check(self, now: float) -> None:
        self._check(list(self._viewers()), now)

    def _check(self, viewers: Iterable[Viewer], now: float) -> None:
        for viewer in viewers:
            if viewer.cut_reason is not None:
                continue
            if viewer.writing_since is not None:
                if now - viewer.writing_since > self._write_timeout:
                    self._stalled(viewer)
            elif now - viewer.last_write >= self._heartbeat:
                viewer.wake.set()

    async def _run(self) -> None:
        # A tick's viewers in CLOCK_SLICES slices, one per tick / CLOCK_SLICES: visiting 10,000 at once
        # held the loop for ~7 ms every second (py-spy), a stall every delivery behind it shared.
        while True:
            viewers = list(self._viewers())
            size = max(1, -(-len(viewers) // CLOCK_SLICES))
            begins = range(0, max(1, len(viewers)), size)
            for begin in begins:
                await asyncio.sleep(self.tick / CLOCK_SLICES)
                self._check(viewers[begin : begin + size], time.monotonic())
            if len(begins) < CLOCK_SLICES:  # fewer viewers than slices: the rest of the tick
                await asyncio.sleep(self.tick * (CLOCK_SLICES - len(begins)) / CLOCK_SLICES)

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
