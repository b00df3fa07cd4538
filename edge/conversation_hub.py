"""The hub: one NATS subscription per conversation per process, shared by all its viewers.

`ConversationHub.join(conversation_id, viewer)` finds or creates the conversation's `Conversation`
and its subscription, made once however many viewers join at the same time and dropped when the last
one leaves. Two ways to follow a conversation, chosen by the stream (`HubSettings.live`):

- live (the stream republishes what it stored on `chat.<id>.live`, as streams `meshkit bridge`
  creates do; `token_stream.py`): a plain core subscription on `chat.<id>.live` first, then the
  catch-up: what the stream holds of `chat.<id>.tokens` (one request for its last message, a replay
  when there is one), then what came live meanwhile (held in order, at most `--history`; the log drops
  the overlap). The SUB and the catch-up's requests leave on one connection in order and the origin
  registers the interest before it serves them, so a message stored in between is in the catch-up or
  comes live. Only stored, deduplicated messages are republished (a message on the live subject
  without the stream's `Nats-Stream` header is counted as malformed and skipped). No consumer per
  conversation on the origin, no idle heartbeats: at the issue's load (2,000 conversations) this
  halved the p99 and cut the adapter's CPU by a fifth (token_stream.py). What core delivery does not
  promise, the hub makes up for: a message sent into a dead link (a leaf cut from its origin, a
  reconnect) is gone, so when the stream answers again after it did not, `resync()` (the adapter
  calls it from its readiness check) has every conversation that is not done read what the stream
  stored after its last token; a link lost and back between two checks is caught by the next token
  (a gap, filled from JetStream) or, when the lost tokens were the last ones, by the idle check: a
  conversation that is not done and silent for `idle_check` s (doubling up to `idle_check_max`,
  back on a message) asks the stream for its last message, one request, and reads what it missed;
- a consumer (a stream without the republish, and an edge mirror: `--mirror-of`, local to the leaf
  anyway): an ordered push consumer (nats-py `ordered_consumer=True`, memory storage, flow control,
  idle heartbeats every `--consumer-heartbeat` s) filtered on `chat.<id>.tokens`, delivering from the
  first stored message of that subject, then live. An ordered consumer re-creates itself from the next
  stream sequence when a heartbeat or a sequence is missed (a leaf restart, a partition), so it loses
  nothing and repeats nothing; the log deduplicates by token sequence anyway. Dropped: unsubscribed
  at once, its consumer deleted by a paced background deleter (`sse_consumer_deleter.py`: 2,000
  deletes at once delayed every other conversation's tokens).

Every delivered message goes into the conversation's `ConversationLog` (bounded by `--history`
tokens; see there for order, dedup and gaps) and goes to its viewers: written at once to those whose
pump waits with a ready sink (`viewer.feed`: an SSE viewer keeping up), the others' pumps woken; a
viewer that is more than `--client-queue` live tokens behind is cut off right there (see `viewer.py`).
A consumer's two nats-py timer tasks are cancelled after subscribing: flow control is answered
as messages are handled (`sse_flow_control.py`), idle heartbeats are checked for every subscription
by one task (`sse_heartbeat_check.py`).

Decisions:
- token sequence vs. stream sequence: viewers resume by the token's `sequence` (the SSE id); the stream
  sequence is the consumer's business only. The log is indexed by token sequence;
- a viewer that wants tokens the log no longer holds (a resume far back, a late viewer of a
  conversation longer than `--history`) gets them from a per-viewer replay (`replay()`: an ephemeral
  pull consumer on the subject from its first stored message, fetched in batches, up to the log's
  start, deleted after), then continues from the log: memory for the common case, JetStream for the
  rest. Memory: a subscribed conversation holds at most `--history` messages (default 1024, the
  default `--client-queue` too, so a viewer within its lag bound reads from memory), about its raw
  JSON plus ~150 bytes each; a conversation with no viewer holds nothing;
- live mode's catch-up at a join reads everything the stream holds of the conversation (in batches
  of `REPLAY_BATCH`, into one list, inspected when inspection is on) and the log keeps the last
  `--history` of it, as a consumer's catch-up did while streaming: a 4,000-token answer is about
  0.5 MB for a moment; the stream's bound is 100,000 messages per conversation. Reading only the tail
  would need a log that starts mid-conversation knowing where the conversation starts: not done;
- a gap in token sequences (a token stored out of order, or never): held for `--gap-timeout` s; then
  the hub replays the subject from JetStream looking for the missing tokens, logs what it finds, and
  skips the rest (viewers get `event: reset` for them: never a silent gap);
- a message that breaks the token contract (the bridge dead-letters those, so it should never be in
  the stream) is logged, counted and skipped;
- token inspection (`token_inspection.py`, off by default) runs here, once per message, before it
  enters the log: every viewer, and every resume from memory, gets the same bytes (redacted, replaced
  by the inspector, or a `BlockedToken`). Checks run `INSPECT_WINDOW` at a time per conversation and
  are logged in arrival order; past that window the subscription's callback waits (back-pressure on
  nats-py's bounded pending queue, never an unbounded one here). Tokens replayed from JetStream (a
  resume below the memory log, a gap fill) are inspected again, `INSPECT_WINDOW` at a time, on the way
  out: redaction gives the same bytes; the inspector is asked again (its answer is its own). The audit
  tap gets a copy of each message the hub logs (not blocked ones), in log order, when it is logged:
  once per message per subscription (a conversation subscribed again after all its viewers left
  copies its stored tokens again: copies carry conversation id and sequence, an audit reader dedups on
  them); replays for one viewer are not copied again.
  A check that raises (a bug: `check()` itself never raises for a failing inspector) blocks the token
  (`inspection_error`), fail closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from meshkit.edge import sse_flow_control as flow_control
from meshkit.edge.conversation_log import BlockedToken, ConversationLog, blocked_token
from meshkit.edge.replay_start import replay_start
from meshkit.edge.sse_consumer_deleter import ConsumerDeleter
from meshkit.edge.sse_heartbeat_check import HeartbeatCheck
from meshkit.edge.token_contract import (
    MalformedToken,
    TokenMessage,
    live_subject,
    parse_token,
    tokens_subject,
)
from meshkit.edge.token_inspection import TokenInspection
from meshkit.edge.viewer import Viewer, feed
from meshkit.errors import DependencyError
from meshkit.logs import Throttle

__all__ = ["Conversation", "ConversationHub", "HubMetrics", "HubSettings"]

log = logging.getLogger("meshkit.edge.hub")

REPLAY_BATCH = 256
INSPECT_WINDOW = 32  # inspection checks under way per conversation (and per replay) at most
CATCH_UP_CONCURRENCY = 8  # live mode: conversations reading the stream at once (idle checks, a resync)
IDLE_TICK = 1.0  # live mode: how often silent conversations are looked at
NO_MESSAGE = 10037  # JetStream's error code for "no message found" (a 404 like "no such stream")
UNBOUNDED = 1 << 62


@dataclass(frozen=True)
class HubSettings:
    stream: str = "CHAT"
    history: int = 1024
    client_queue: int = 1024
    gap_timeout: float = 1.0
    consumer_heartbeat: float = 2.0
    request_timeout: float = 5.0  # one JetStream API request (subscribe, a replay)
    live: bool = False  # the stream republishes on chat.<id>.live: core subscriptions (see the docstring)
    idle_check: float = 5.0  # live: a silent conversation is compared with the stream after this ...
    idle_check_max: float = 60.0  # ... doubling each time up to this, back to idle_check on a message


@dataclass
class HubMetrics:
    conversations: Gauge
    messages: Counter
    duplicates: Counter
    malformed: Counter
    gaps: Counter
    slow_drops: Counter
    replays: Counter
    subscribe_seconds: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry) -> HubMetrics:
        return cls(
            Gauge(
                "meshkit_sse_conversations_subscribed",
                "Conversations with a NATS subscription (one each, shared by its viewers)",
                registry=registry,
            ),
            Counter(
                "meshkit_sse_messages_received",
                "Token messages received (live copies, consumer deliveries)",
                registry=registry,
            ),
            Counter(
                "meshkit_sse_duplicates_dropped",
                "Token messages dropped because their sequence was already logged",
                registry=registry,
            ),
            Counter(
                "meshkit_sse_malformed_messages",
                "Stream messages that break the token contract (skipped)",
                registry=registry,
            ),
            Counter(
                "meshkit_sse_gaps_skipped",
                "Sequence gaps nobody filled within --gap-timeout, not in JetStream either (reset sent)",
                registry=registry,
            ),
            Counter(
                "meshkit_sse_slow_client_drops",
                "Viewers cut off for being more than --client-queue live tokens behind",
                registry=registry,
            ),
            Counter(
                "meshkit_sse_replays",
                "Per-viewer replays from JetStream, by result",
                ["result"],
                registry=registry,
            ),
            Histogram(
                "meshkit_sse_subscribe_seconds",
                "Time to subscribe to a conversation (with its catch-up on what was stored)",
                buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
                registry=registry,
            ),
        )


@dataclass
class Conversation:
    id: str
    log: ConversationLog
    viewers: set[Viewer] = field(default_factory=set)
    ready: asyncio.Future[None] | None = None
    subject: str = field(init=False)  # chat.<id>.tokens
    subscription: Subscription | None = None  # a JetStream push subscription, or a core one (live)
    gap_timer: asyncio.TimerHandle | None = None
    gap_task: asyncio.Task[None] | None = None
    caught_up: bool = False  # the subscription delivered everything stored when it was made
    closed: bool = False
    inspecting: deque[tuple[asyncio.Future[TokenMessage], bool]] = field(default_factory=deque)
    live_buffer: list[Msg] | None = None  # live: messages that came while catching up (in order)
    heard: float = 0.0  # live: when a message last came (monotonic)
    idle_wait: float = 0.0  # live: silent this long, the conversation is compared with the stream
    catch_up: asyncio.Task[None] | None = None  # live: a read of what the stream stored after the log
    resync_again: bool = False  # live: a resync() came while catching up: read again after it

    def __post_init__(self) -> None:
        self.subject = tokens_subject(self.id)


class ConversationHub:
    def __init__(
        self,
        js: JetStreamContext,
        settings: HubSettings,
        metrics: HubMetrics,
        *,
        on_cut: Callable[[Viewer, str], None] = lambda v, r: None,
        inspection: TokenInspection | None = None,
    ) -> None:
        self._js = js
        self.settings = settings
        self.metrics = metrics
        self._on_cut = on_cut
        self._throttled = Throttle(log)
        self._inspection = inspection if inspection is not None and inspection.enabled else None
        self._conversations: dict[str, Conversation] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._heartbeats = HeartbeatCheck(2 * settings.consumer_heartbeat, self._subscriptions)
        self._deleter = ConsumerDeleter(self._delete_consumer, timeout=settings.request_timeout)
        self._catching_up = asyncio.Semaphore(CATCH_UP_CONCURRENCY)
        self._idle_task: asyncio.Task[None] | None = None
        self._closed = False  # close() was called: a join that ends after it starts no idle checks

    def _subscriptions(self) -> list[JetStreamContext.PushSubscription]:
        return [
            c.subscription
            for c in self._conversations.values()
            if isinstance(c.subscription, JetStreamContext.PushSubscription)
        ]

    # -- viewers ----------------------------------------------------------------------------------
    def conversation(self, conversation_id: str) -> Conversation | None:
        return self._conversations.get(conversation_id)

    @property
    def viewers(self) -> list[Viewer]:
        return [v for c in self._conversations.values() for v in c.viewers]

    async def join(self, conversation_id: str, viewer: Viewer) -> Conversation:
        """Attach `viewer` to its conversation, subscribing first when nobody watches it yet;
        `DependencyError` when the subscription cannot be made (NATS down, too slow)."""
        conv = self._conversations.get(conversation_id)
        if conv is None:
            conv = Conversation(conversation_id, ConversationLog(self.settings.history))
            self._conversations[conversation_id] = conv
            conv.ready = asyncio.ensure_future(self._subscribe(conv))
            self.metrics.conversations.set(len(self._conversations))
        viewer.attach_seq = conv.log.next_seq
        conv.viewers.add(viewer)
        assert conv.ready is not None
        try:
            await asyncio.shield(conv.ready)
        except BaseException:
            self.leave(conv, viewer)
            raise
        return conv

    def leave(self, conv: Conversation, viewer: Viewer) -> None:
        conv.viewers.discard(viewer)
        if conv.viewers or conv.closed:
            return
        conv.closed = True
        if self._conversations.get(conv.id) is conv:
            del self._conversations[conv.id]
            self.metrics.conversations.set(len(self._conversations))
        if conv.gap_timer is not None:
            conv.gap_timer.cancel()
        for check, _ in conv.inspecting:
            check.cancel()
        self._spawn(self._unsubscribe(conv))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A background task the hub keeps until it is done (and cancels at close())."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _subscribe(self, conv: Conversation) -> None:
        began = time.monotonic()
        if self.settings.live:
            await self._subscribe_live(conv)
        else:
            await self._subscribe_consumer(conv)
        self.metrics.subscribe_seconds.observe(time.monotonic() - began)
        if conv.closed:  # every viewer left while subscribing
            self._spawn(self._unsubscribe(conv))

    def _cannot_subscribe(self, conv: Conversation, subject: str, exc: BaseException) -> DependencyError:
        if self._conversations.get(conv.id) is conv:
            del self._conversations[conv.id]
            self.metrics.conversations.set(len(self._conversations))
        conv.closed = True
        log.warning("conversation %s: cannot subscribe: %r", conv.id, exc)
        return DependencyError("nats", f"cannot subscribe to {subject}: {exc!r}")

    async def _subscribe_consumer(self, conv: Conversation) -> None:
        subject = conv.subject

        # nats-py's subscription, its state and its cancelled task hold each other in cycles after
        # unsubscribing: through a weak reference its callback does not keep the conversation (and its
        # log) alive with them until a full garbage collection (sse_gc.py)
        ref = weakref.ref(conv)

        async def on_message(msg: Msg) -> None:
            current = ref()
            if current is None:
                return
            await self._on_message(current, msg)
            if current.subscription is not None:
                await flow_control.answer(current.subscription)

        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0)
        try:
            async with asyncio.timeout(self.settings.request_timeout):
                conv.subscription = await self._js.subscribe(
                    subject,
                    stream=self.settings.stream,
                    cb=on_message,
                    ordered_consumer=True,
                    idle_heartbeat=self.settings.consumer_heartbeat,
                    config=config,
                )
        except Exception as exc:
            raise self._cannot_subscribe(conv, subject, exc) from None
        # nats-py's two timer tasks per subscription: the hub's one check instead (sse_flow_control,
        # sse_heartbeat_check)
        flow_control.stop_poller(conv.subscription)
        HeartbeatCheck.stop(conv.subscription)
        self._heartbeats.start()

    async def _subscribe_live(self, conv: Conversation) -> None:
        """A core subscription on chat.<id>.live first, then what the stream stored so far (the
        catch-up), then what came live meanwhile, in order (the log drops the overlap)."""
        subject = live_subject(conv.id)
        ref = weakref.ref(conv)  # see _subscribe_consumer

        async def on_live(msg: Msg) -> None:
            current = ref()
            if current is None or current.closed:
                return
            if current.live_buffer is not None:  # catching up: after what was stored
                if len(current.live_buffer) < self.settings.history:
                    current.live_buffer.append(msg)
                return  # past that: it is stored, the gap fill or the idle check reads it
            await self._on_live(current, msg)

        conv.live_buffer = []
        try:
            async with asyncio.timeout(self.settings.request_timeout):
                conv.subscription = await self._js._nc.subscribe(subject, cb=on_live)
            # The SUB and the requests below leave on one connection, in order, and the origin
            # registers the interest before it reads the stream for them: a message stored in
            # between is in the catch-up or comes live (or both: the log drops the second copy).
            stored = await self._stored(conv.id, None)
        except Exception as exc:
            sub, conv.subscription = conv.subscription, None
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            raise self._cannot_subscribe(conv, subject, exc) from None
        conv.heard, conv.idle_wait = time.monotonic(), self.settings.idle_check
        # Like a consumer's catch-up: the stored tokens are backlog but the last (which closes an open
        # start: see conversation_log), and so is what came live meanwhile but its last, when there
        # was a stored part (a viewer is not "slow" for them; none stored: they are the live start).
        for i, token in enumerate(stored):
            if self.deliver(conv, token, backlog=i < len(stored) - 1):
                self._audit(token)
        while conv.live_buffer:
            msg = conv.live_buffer.pop(0)
            await self._on_live(conv, msg, backlog=bool(stored) and bool(conv.live_buffer))
        conv.live_buffer = None
        conv.caught_up = True
        if conv.resync_again:  # a link lost during the catch-up: what it lost is not in there
            conv.resync_again = False
            self._catch_up(conv)
        if not self._closed and (self._idle_task is None or self._idle_task.done()):
            self._idle_task = asyncio.ensure_future(self._idle_rounds())

    async def _stored(self, conversation_id: str, after: int | None) -> list[TokenMessage]:
        """The tokens the stream holds of a conversation with a sequence above `after` (None: all), up to
        its last message now: one request when there is nothing new, a replay when there is. The replay
        ends at that message's stream sequence, not at its token's: two bridges can store neighbours out
        of order, and the last one stored need not be the highest token."""
        subject = tokens_subject(conversation_id)
        try:
            async with asyncio.timeout(self.settings.request_timeout):
                last = await self._js.get_last_msg(self.settings.stream, subject)
        except NotFoundError as exc:
            if exc.err_code == NO_MESSAGE:
                return []
            raise DependencyError("nats", f"last message of {subject}: {exc}") from None
        except Exception as exc:
            raise DependencyError("nats", f"last message of {subject}: {exc!r}") from None
        try:
            newest = parse_token(last.data or b"", subject=subject).sequence
        except MalformedToken:
            newest = None
        if after is not None and newest is not None and newest <= after:
            return []
        return await self.replay(conversation_id, after, UNBOUNDED, through=last.seq)

    async def _unsubscribe(self, conv: Conversation) -> None:
        """Unsubscribe now; the consumer is deleted by the paced `ConsumerDeleter`."""
        # while _subscribe() is still under way there is nothing yet: it sees `closed` and comes back
        sub, conv.subscription = conv.subscription, None
        if sub is None:
            return
        consumer = getattr(sub, "_consumer", None)  # nats-py keeps the (re-created) consumer's name there
        try:
            async with asyncio.timeout(self.settings.request_timeout):
                await sub.unsubscribe()
        except Exception as exc:  # the server deletes it after inactive_threshold anyway
            log.debug("conversation %s: unsubscribe: %r", conv.id, exc)
        if isinstance(consumer, str):
            self._deleter.add(consumer)

    async def _delete_consumer(self, consumer: str) -> None:
        await self._js.delete_consumer(self.settings.stream, consumer)

    # -- messages ---------------------------------------------------------------------------------
    async def _on_message(self, conv: Conversation, msg: Msg) -> None:
        """A message of the conversation's JetStream consumer."""
        if conv.closed:
            return
        backlog = False
        if not conv.caught_up:  # the first catch-up on what was stored does not count as lag
            try:
                backlog = msg.metadata.num_pending > 0
            except Exception:  # not a JetStream message: cannot happen on this subscription
                backlog = False
            conv.caught_up = not backlog
        await self._take(conv, msg.data, backlog)

    async def _on_live(self, conv: Conversation, msg: Msg, *, backlog: bool = False) -> None:
        """A message on chat.<id>.live: the stream's copy of one it stored."""
        conv.heard, conv.idle_wait = time.monotonic(), self.settings.idle_check
        headers = msg.headers
        if headers is None or headers.get("Nats-Stream") != self.settings.stream:
            self.metrics.malformed.inc()
            self._throttled.warning(
                "not-republished",
                "conversation %s: skipped a message on %s that stream %s did not republish",
                conv.id,
                msg.subject,
                self.settings.stream,
            )
            return
        await self._take(conv, msg.data, backlog)

    async def _take(self, conv: Conversation, data: bytes, backlog: bool) -> None:
        if conv.closed:
            return
        try:
            token = parse_token(data, subject=conv.subject)
        except MalformedToken as exc:
            self.metrics.malformed.inc()
            log.warning("conversation %s: skipped a malformed stream message: %s", conv.id, exc.reason)
            return
        self.metrics.messages.inc()
        logged = conv.log.next_seq
        if self._inspection is None or (
            logged is not None and token.sequence < logged and not conv.inspecting
        ):
            self.deliver(conv, token, backlog=backlog)  # a duplicate of a logged one is not inspected again
            return
        check = asyncio.ensure_future(self._inspected(token))
        conv.inspecting.append((check, backlog))
        check.add_done_callback(lambda _: self._deliver_inspected(conv))
        if len(conv.inspecting) > INSPECT_WINDOW:  # back-pressure: the subscription waits
            await asyncio.wait({conv.inspecting[0][0]}, timeout=self.settings.request_timeout)

    async def _inspected(self, token: TokenMessage) -> TokenMessage:
        """`token` as the viewers get it (see the module docstring)."""
        assert self._inspection is not None
        try:
            result = await self._inspection.check(token, audit=False)
        except Exception:
            log.exception("conversation %s: inspection of %d failed", token.conversation_id, token.sequence)
            return blocked_token(token, "inspection_error")
        if result.raw is None:
            return blocked_token(token, result.reason)
        if result.changed:
            return dataclasses.replace(token, raw=result.raw)
        return token

    def _deliver_inspected(self, conv: Conversation) -> None:
        """Log the checked messages at the head of the window, in arrival order."""
        while conv.inspecting and conv.inspecting[0][0].done():
            check, backlog = conv.inspecting.popleft()
            if conv.closed or check.cancelled():
                continue
            token = check.result()
            if self.deliver(conv, token, backlog=backlog):
                self._audit(token)

    def _audit(self, token: TokenMessage) -> None:
        """A copy of a logged (so delivered) message to the audit tap, when it is on."""
        tap = self._inspection.tap if self._inspection is not None else None
        if tap is not None and not isinstance(token, BlockedToken):
            tap.copy(token, token.raw)

    def deliver(self, conv: Conversation, token: TokenMessage, *, backlog: bool = False) -> bool:
        """Log `token` and wake the viewers (cutting off the ones too far behind); False when the log
        dropped it (a duplicate, after done)."""
        before, after_done = conv.log.duplicates, conv.log.after_done
        added = conv.log.add(token, backlog=backlog)
        if conv.log.duplicates != before:
            self.metrics.duplicates.inc()
        if added:
            self._wake(conv)
        if conv.log.waiting_for is not None and conv.gap_timer is None and conv.gap_task is None:
            loop = asyncio.get_running_loop()
            conv.gap_timer = loop.call_later(self.settings.gap_timeout, self._gap_timed_out, conv)
        return conv.log.duplicates == before and conv.log.after_done == after_done

    def _wake(self, conv: Conversation) -> None:
        """New entries in the log: a parked viewer with a ready sink gets them written now (`feed`),
        the others' pumps are woken; one too far behind is cut off."""
        limit = self.settings.client_queue
        now = time.monotonic()
        for viewer in list(conv.viewers):
            if viewer.cut_reason is not None:  # cut off already, leaving
                continue
            if viewer.lag(conv.log) > limit:
                reason = f"slow client: more than {limit} tokens behind (--client-queue)"
                self.metrics.slow_drops.inc()
                self._on_cut(viewer, reason)
                viewer.cut(reason)
            else:
                try:
                    parked = feed(viewer, conv.log, now)
                except Exception:  # a framing bug: this viewer ends, the others still get the token
                    self._throttled.exception("feed", "conversation %s: a direct write failed", conv.id)
                    self._on_cut(viewer, "internal error (logged)")
                    viewer.cut("internal error (logged)")
                    continue
                if not parked:
                    viewer.wake.set()

    def _gap_timed_out(self, conv: Conversation) -> None:
        conv.gap_timer = None
        if conv.closed or conv.log.waiting_for is None:
            return
        conv.gap_task = self._spawn(self._fill_gap(conv))

    async def _fill_gap(self, conv: Conversation) -> None:
        """Look for the missing tokens in JetStream; skip what is not there."""
        try:
            missing = conv.log.waiting_for
            if missing is None:
                return
            try:
                found = await self.replay(conv.id, missing - 1, missing + conv.log.max_pending + 1)
            except DependencyError as exc:
                log.warning("conversation %s: gap at %d: JetStream not asked: %s", conv.id, missing, exc)
                found = []
            for token in found:
                before = conv.log.duplicates + conv.log.after_done
                conv.log.add(token)
                if conv.log.duplicates + conv.log.after_done == before:
                    self._audit(token)
            if conv.log.waiting_for is not None:
                skipped = conv.log.skip_gap()
                if skipped is not None:
                    self.metrics.gaps.inc()
                    log.warning(
                        "conversation %s: sequences %d..%d never arrived within %.1f s: skipped (reset sent)",
                        conv.id,
                        skipped.requested,
                        skipped.available_from - 1,
                        self.settings.gap_timeout,
                    )
            self._wake(conv)
        finally:
            conv.gap_task = None
        if conv.log.waiting_for is not None and not conv.closed:
            loop = asyncio.get_running_loop()
            conv.gap_timer = loop.call_later(self.settings.gap_timeout, self._gap_timed_out, conv)

    # -- live mode: catching up on what a lost link lost -------------------------------------------
    def resync(self) -> int:
        """The link to the stream is back after a loss (a cut leaf, a reconnect): in live mode every
        subscribed conversation that is not done reads what the stream stored after its last token
        (core messages sent into a dead link are gone); how many. A consumer heals itself: 0."""
        if not self.settings.live:
            return 0
        count = 0
        for conv in list(self._conversations.values()):
            if conv.closed or conv.log.done_seq is not None:
                continue
            count += 1
            if conv.live_buffer is not None or conv.catch_up is not None:
                # catching up already (a join, an idle check): it may have asked the stream before the
                # loss, so it reads again when it is over
                conv.resync_again = True
            else:
                self._catch_up(conv)
        return count

    async def _idle_rounds(self) -> None:
        """Live mode: a conversation that is not done and was silent for its `idle_wait` is compared
        with the stream (a link lost and back between two readiness checks can lose a conversation's
        last tokens, and nothing after them would show the gap); the wait doubles each time, up to
        `idle_check_max`, and starts again at `idle_check` with the next message."""
        while True:
            await asyncio.sleep(IDLE_TICK)
            now = time.monotonic()
            for i, conv in enumerate(list(self._conversations.values())):
                if i % 512 == 511:
                    await asyncio.sleep(0)  # 10,000 conversations are not one long step
                if conv.closed or conv.live_buffer is not None or conv.log.done_seq is not None:
                    continue
                if now - conv.heard >= conv.idle_wait:
                    conv.heard, conv.idle_wait = now, min(2 * conv.idle_wait, self.settings.idle_check_max)
                    self._catch_up(conv)

    def _catch_up(self, conv: Conversation) -> None:
        if conv.catch_up is not None or conv.closed:
            return
        conv.catch_up = self._spawn(self._read_after_log(conv))

    async def _read_after_log(self, conv: Conversation) -> None:
        try:
            async with self._catching_up:
                if conv.closed:
                    return
                after = None if conv.log.next_seq is None else conv.log.next_seq - 1
                try:
                    found = await self._stored(conv.id, after)
                except DependencyError as exc:
                    self._throttled.warning("catch-up", "conversation %s: not caught up: %s", conv.id, exc)
                    return
                if conv.closed or not found:
                    return
                for token in found:  # as if it came live: a gap in it is held, then filled or skipped
                    if self.deliver(conv, token):
                        self._audit(token)
                log.info("conversation %s: %d stored token(s) read that never came live", conv.id, len(found))
        finally:
            conv.catch_up = None
            if conv.resync_again and not conv.closed:
                conv.resync_again = False
                self._catch_up(conv)

    # -- replay -----------------------------------------------------------------------------------
    async def replay(
        self, conversation_id: str, after: int | None, until: int, *, through: int | None = None
    ) -> list[TokenMessage]:
        """The conversation's stored tokens with `after < sequence < until` (`after` None: from the
        first) and, with `through`, stored at stream sequence `through` or before, sorted and unique,
        from an ephemeral pull consumer that starts near `after`
        (`replay_start`: a binary search, not a read from the conversation's first token);
        `DependencyError` when one step (the search, the consumer, a batch) takes longer than the
        request timeout: a long replay over a distant leaf is bounded per batch, not as a whole."""
        subject = tokens_subject(conversation_id)
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=30.0,
        )
        found: dict[int, TokenMessage] = {}
        step = self.settings.request_timeout
        try:
            if after is not None:
                start = await replay_start(self._js, self.settings.stream, subject, after, probe_timeout=step)
                if start is None:  # nothing stored for it
                    self.metrics.replays.labels("ok").inc()
                    return []
                config.deliver_policy, config.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, start
            async with asyncio.timeout(step):
                psub = await self._js.pull_subscribe(subject, stream=self.settings.stream, config=config)
            try:
                async with asyncio.timeout(step):
                    remaining = (await psub.consumer_info()).num_pending or 0
                while remaining > 0:
                    async with asyncio.timeout(step):
                        batch = await psub.fetch(min(remaining, REPLAY_BATCH), timeout=1.0)
                    for msg in batch:
                        remaining = msg.metadata.num_pending
                        stored_at = msg.metadata.sequence.stream
                        if through is not None and stored_at > through:
                            remaining = 0
                            break
                        if through is not None and stored_at == through:
                            remaining = 0  # the last one to read
                        try:
                            token = parse_token(msg.data, subject=msg.subject)
                        except MalformedToken:
                            self.metrics.malformed.inc()
                            continue
                        if token.sequence >= until:
                            remaining = 0
                            break
                        if after is None or token.sequence > after:
                            found.setdefault(token.sequence, token)
            finally:
                with contextlib.suppress(Exception):
                    await psub.unsubscribe()
                with contextlib.suppress(Exception):
                    await self._js.delete_consumer(self.settings.stream, config.name or "")
        except Exception as exc:
            self.metrics.replays.labels("failed").inc()
            raise DependencyError("nats", f"replay of {subject} failed: {exc!r}") from None
        self.metrics.replays.labels("ok").inc()
        tokens = [found[s] for s in sorted(found)]
        if self._inspection is None:
            return tokens
        out: list[TokenMessage] = []
        for begin in range(0, len(tokens), INSPECT_WINDOW):
            out += await asyncio.gather(*(self._inspected(t) for t in tokens[begin : begin + INSPECT_WINDOW]))
        return out

    # -- shutdown ---------------------------------------------------------------------------------
    def close_viewers(self) -> int:
        """Tell every viewer to reconnect (server shutting down); how many there were."""
        viewers = self.viewers
        for viewer in viewers:
            viewer.close()
        return len(viewers)

    async def close(self) -> None:
        """Drop every subscription (at shutdown, after the listeners stopped)."""
        self._closed = True
        conversations = list(self._conversations.values())
        self._conversations.clear()
        for conv in conversations:
            conv.closed = True
            if conv.gap_timer is not None:
                conv.gap_timer.cancel()
            for check, _ in conv.inspecting:
                check.cancel()
        await asyncio.gather(*(self._unsubscribe(c) for c in conversations), return_exceptions=True)
        await self._heartbeats.close()
        await self._deleter.close()
        if self._idle_task is not None:
            self._idle_task.cancel()
            await asyncio.gather(self._idle_task, return_exceptions=True)
        for task in list(self._background):
            task.cancel()
        self.metrics.conversations.set(0)
