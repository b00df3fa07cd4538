"""Publishing into JetStream with a bounded window of unacknowledged messages (`AckWindow`).

nats-py's `js.publish()` is a request: one await per message, which caps a bridge near 20k msgs/s here
(field notes) while the server stores ~85k/s. `AckWindow` instead publishes each message with a core
`PUB` (header `Nats-Msg-Id`) whose reply subject is one of its own inboxes, `<inbox>.<n>`, and matches
the PubAcks that come back on ONE wildcard subscription `<inbox>.*` to the messages still in flight:

- `publish_many()` never awaits an ack: it builds the batch's `HPUB` commands itself and hands them
  to nats-py's outbound buffer as one write (nats-py's `publish()` costs a few coroutines, a header
  encoding and a subject check per message). The reader waits (with a deadline,
  `wait_for_room(within, need)`) only while the window has no room for its next batch: the window is
  the back-pressure that stops it.
- PubAcks are taken straight from nats-py's protocol parser for the ack inbox's subscription
  (`_install_fast_path`, `fast_acks`), skipping the `Msg`, header parsing and queue nats-py builds
  for each message: measured, that was about half the bridge's CPU at 50k acks/s.
- Both are nats-py private hooks (`_send_command`, `_flush_pending`, `_process_msg`; 2.16): `start()`
  checks each is there with the parameters it was written against (`_HOOKS`) and otherwise, logged
  once, publishes with `nc.publish()` and takes acks through the subscription's callback (slower:
  nats-py's per-message publish, a `Msg` and a queue per ack; the same guarantees;
  `private_hooks=False` forces that path, which the tests run too).
- A PubAck (`{"stream": ..., "seq": ...}`, `"duplicate": true` when JetStream deduplicated it) calls
  `on_done(pending, duplicate)` once; the caller acks its source there (a Redis Stream entry is XACKed
  only now). Acks are recognised without a JSON parse (`"duplicate"` / `"error"` looked for in the
  bytes); only an error ack is parsed.
- No ack within `ack_timeout`, a `503` status (no responders: JetStream or the stream not there), or
  a publish that raised (disconnected and nats-py's buffer full): the SAME message (same `Nats-Msg-Id`,
  so a retry of one that was in fact stored is a duplicate, not a second copy) is published again
  after a backoff (`retry_backoff`, doubled up to `max_backoff`), in the order the messages were
  first sent, forever: a message in the window is never given up while JetStream may come back.
- An error PubAck (JetStream refused the message: too big for the stream's `max_msg_size`, ...) is
  retried `max_rejections` times, then `on_rejected(pending, description)`: the caller dead-letters
  it. Such a message cannot be stored, and retrying it forever would keep a window slot forever.
- NATS reconnected (`connection_lost()` / `reconnected()`, called from the client's callbacks): the
  messages sent before the connection was lost get no PubAck on the new one (the server never read
  them, or its acks went down with the old connection), so they are published again at once (same
  `Nats-Msg-Id`) instead of after `ack_timeout`, which kept a full window, and so the reader, stopped
  that long after every reconnect; retries backing off are due at once too. Those sent while
  disconnected sat in nats-py's buffer and go out on the new connection: they wait for their acks.
- `recheck` (optional, async): asked with each batch of retries before it goes out; what it leaves
  out leaves the window unpublished. The bridge's Streams source drops the entries another bridge
  took over meanwhile (`XAUTOCLAIM`): published again after JetStream's duplicate window, they
  would be stored twice.
- `drain(within)` waits for the window to empty (SIGTERM: what is in flight gets its acks).

Order: messages go out in the order `publish()` was called; a retried one is sent again after the
ones published meanwhile (JetStream then stores it after later tokens of the same conversation, a
case limited to lost or timed-out publishes: the SSE adapter orders by the token's own `sequence`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import ConnectionClosedError, OutboundBufferLimitError

from meshkit.logs import Throttle

__all__ = ["AckWindow", "LatencyBuckets", "Pending", "PublisherStats"]

# nats-py's private hooks used here (2.16), with the parameters they must have: when a release changes
# one, the window falls back to the public API (`nc.publish()` and the subscription's callback)
# instead of publishing nothing or breaking nats-py's reader.
_HOOKS = {
    "_send_command": ("cmd", "priority"),
    "_flush_pending": ("force_flush",),
    "_process_msg": ("sid", "subject", "reply", "data", "headers"),
}

log = logging.getLogger("meshkit.bridge.jetstream")

MSG_ID = "Nats-Msg-Id"
_HEADER_SIZE = len(b"NATS/1.0\r\nNats-Msg-Id: \r\n\r\n")  # + the id
_NO_RESPONDERS = "503"
_RECONNECT_BUFFER = 8 * 1024 * 1024  # bytes buffered while reconnecting, at most (nats-py's pending_size)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass(eq=False, slots=True)
class Pending:
    """One message in the window: what to send again, the caller's `context`, attempts so far."""

    subject: str
    payload: bytes
    msg_id: str
    context: Any
    attempts: int = 0
    rejections: int = 0
    sent_at: float = 0.0
    retry_at: float = 0.0
    token: bytes = b""


class LatencyBuckets:
    """A cumulative histogram kept as plain integers (cheaper than prometheus_client's per observe)."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        self.counts[bisect_left(self.bounds, value)] += 1

    def cumulative(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, float(total)))
        return out


@dataclass
class PublisherStats:
    published: int = 0  # stored (new)
    duplicates: int = 0  # PubAck duplicate=true
    retries: dict[str, int] = field(
        default_factory=lambda: {"timeout": 0, "no_responders": 0, "error": 0, "reconnect": 0}
    )
    rejected: int = 0
    latency: LatencyBuckets = field(default_factory=LatencyBuckets)


class AckWindow:
    """Core publishes with a reply inbox, PubAcks matched asynchronously (see the module docstring)."""

    def __init__(
        self,
        nc: Client,
        *,
        on_done: Callable[[Pending, bool], None],
        on_rejected: Callable[[Pending, str], None],
        max_inflight: int = 1024,
        ack_timeout: float = 5.0,
        retry_backoff: float = 0.1,
        max_backoff: float = 2.0,
        max_rejections: int = 3,
        stats: PublisherStats | None = None,
        private_hooks: bool = True,
    ) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self._nc = nc
        self._on_done = on_done
        self._on_rejected = on_rejected
        self.max_inflight = max_inflight
        self.ack_timeout = ack_timeout
        self.retry_backoff = retry_backoff
        self.max_backoff = max_backoff
        self.max_rejections = max_rejections
        self.stats = stats or PublisherStats()
        self.private_hooks = private_hooks
        self.raw_writes = False  # HPUB commands into nats-py's buffer (start(): when its hooks fit)
        self._inflight: dict[bytes, Pending] = {}  # token -> pending, in send order
        self._retry: deque[Pending] = deque()  # waiting for their retry_at, in first-send order
        self._room = asyncio.Event()
        self._room.set()
        self._room_need = 1
        self._room_waiting = False
        self._empty = asyncio.Event()
        self._empty.set()
        self._prefix = ""
        self._prefix_bytes = b""
        self._prefix_len = 0
        self._restore: Callable[[], None] | None = None
        self._next = 0
        self._sub: Subscription | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._throttle = Throttle(log, interval=10.0)
        self._lost_at: float | None = None
        self._checking = 0  # due retries handed to `recheck`, still counted in the window
        self.on_no_responders: Callable[[], None] | None = None
        # Asked before a retry goes out: which of these may still be published (a Streams source
        # drops the entries another consumer took over meanwhile); None: all of them.
        self.recheck: Callable[[list[Pending]], Awaitable[list[Pending]]] | None = None

    # -- state ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._inflight) + len(self._retry) + self._checking

    @property
    def fast_acks(self) -> bool:
        """True when PubAcks are taken straight from nats-py's parser (`_install_fast_path`)."""
        return self._restore is not None

    @property
    def retrying(self) -> int:
        return len(self._retry)

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        self._prefix = self._nc.new_inbox() + "."
        self._prefix_bytes = self._prefix.encode()
        self._prefix_len = len(self._prefix_bytes)
        self._sub = await self._nc.subscribe(
            self._prefix + "*", cb=self._on_ack, pending_msgs_limit=4 * self.max_inflight + 1024
        )
        missing = _hooks_missing(self._nc) if self.private_hooks else "turned off"
        if missing is None:
            self.raw_writes = True
            self._install_fast_path()
        else:
            log.warning(
                "bridge: nats-py's private hooks do not fit (%s): publishing with nc.publish() and "
                "taking PubAcks through the subscription's callback (correct, slower)",
                missing,
            )
        self._sweeper = asyncio.create_task(self._sweep(), name="jetstream-ack-sweeper")

    async def close(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    def room(self) -> int:
        """How many more messages fit in the window."""
        return max(0, self.max_inflight - len(self))

    async def wait_for_room(self, within: float, need: int = 1) -> bool:
        """True once at least `need` (at most `max_inflight`) more messages fit (at most `within` s).
        A reader asks for a whole batch: woken for every single ack, it would read one message per
        round trip."""
        need = max(1, min(need, self.max_inflight))
        if self.room() >= need:
            return True
        self._room_need = need
        self._room_waiting = True
        self._room.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._room.wait(), within)
        return self.room() >= need

    async def drain(self, within: float) -> int:
        """Wait until every message in the window is acknowledged (at most `within` s); how many are
        left."""
        if len(self):
            self._empty.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._empty.wait(), within)
        return len(self)

    def connection_lost(self) -> None:
        """The NATS connection went down: what was sent until now may be lost with it."""
        if self._lost_at is None:
            self._lost_at = time.monotonic()

    def reconnected(self) -> int:
        """The NATS connection is back: the messages sent before it was lost are published again now
        (see the module docstring); how many."""
        now = time.monotonic()
        lost_at = self._lost_at if self._lost_at is not None else now
        self._lost_at = None
        moved = []
        for p in self._inflight.values():  # in send order
            if p.sent_at > lost_at:
                break
            moved.append(p)
        for p in self._retry:
            p.retry_at = now
        for p in moved:
            del self._inflight[p.token]
            p.retry_at = now
            self._retry.append(p)
        self.stats.retries["reconnect"] += len(moved)
        if moved:
            log.info("bridge: publishing %d messages again after the NATS reconnect", len(moved))
        return len(moved)

    # -- publishing ----------------------------------------------------------------------------------
    async def publish(self, subject: str, payload: bytes, msg_id: str, context: Any) -> None:
        """Send one message (see `publish_many`)."""
        await self.publish_many([(subject, payload, msg_id, context)])

    async def publish_many(self, messages: list[tuple[str, bytes, str, Any]]) -> None:
        """Send `(subject, payload, msg_id, context)` messages as ONE write to the NATS client. The
        window may go past `max_inflight` by this batch: the caller waits with `wait_for_room()`
        before reading more. Subjects and msg ids must be valid NATS tokens (the caller checked
        them: `parse_token`), they are written as they are."""
        now = time.monotonic()
        limit = self._limit()
        prefix, inflight, number = self._prefix_bytes, self._inflight, self._next
        commands: list[bytes] = []
        sent: list[Pending] = []
        for subject, payload, msg_id, context in messages:
            number += 1
            token = b"%d" % number
            mid = msg_id.encode()
            header_size = _HEADER_SIZE + len(mid)
            size = header_size + len(payload)
            p = Pending(subject, payload, msg_id, context, 1, 0, now, 0.0, token)
            if size > limit:  # the server would close the connection on it
                self._too_big(p, size, limit)
                continue
            commands.append(
                b"HPUB %s %s%s %d %d\r\nNATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n%s\r\n"
                % (subject.encode(), prefix, token, header_size, size, mid, payload)
            )
            inflight[token] = p
            sent.append(p)
        self._next = number
        await self._write(commands, sent)

    async def _send(self, batch: list[Pending]) -> None:
        """`batch` (retries) sent again as HPUB commands in one write (see `publish_many`), each
        with a new reply token: a late ack of an earlier attempt is then recognised and ignored."""
        now = time.monotonic()
        limit = self._limit()
        commands: list[bytes] = []
        sent: list[Pending] = []
        for p in batch:
            self._next += 1
            p.token = b"%d" % self._next
            p.attempts += 1
            p.sent_at = now
            mid = p.msg_id.encode()
            header_size = _HEADER_SIZE + len(mid)
            size = header_size + len(p.payload)
            if size > limit:
                self._too_big(p, size, limit)
                continue
            commands.append(
                b"HPUB %s %s%s %d %d\r\nNATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n%s\r\n"
                % (p.subject.encode(), self._prefix_bytes, p.token, header_size, size, mid, p.payload)
            )
            self._inflight[p.token] = p
            sent.append(p)
        await self._write(commands, sent)

    def _limit(self) -> int:
        nc = self._nc
        return nc.max_payload if nc.is_connected else 1 << 20

    def _too_big(self, p: Pending, size: int, limit: int) -> None:
        self.stats.rejected += 1
        self._on_rejected(p, f"{size} bytes with its header is over NATS's max_payload ({limit})")

    async def _write(self, commands: list[bytes], sent: list[Pending]) -> None:
        """The HPUB commands handed to nats-py's outbound buffer in one piece: its `publish()` costs a
        few coroutines, a header dict encoding and a subject check per message, most of the bridge's
        time at 50k messages/s (measured). The checks `publish()` makes that matter are made here: a
        closed client, a full buffer while reconnecting (max_payload: the callers)."""
        if not sent:
            return
        nc = self._nc
        self._empty.clear()
        try:
            if not self.raw_writes:  # nats-py's public API, one message at a time
                for p in sent:
                    reply = self._prefix + p.token.decode()
                    await nc.publish(p.subject, p.payload, reply=reply, headers={MSG_ID: p.msg_id})
                return
            data = b"".join(commands)
            if nc.is_closed:
                raise ConnectionClosedError
            if not nc.is_connected and len(data) + nc.pending_data_size > _RECONNECT_BUFFER:
                raise OutboundBufferLimitError
            await nc._send_command(data)
            nc.stats["out_msgs"] += len(sent)
            if nc._flush_queue is not None and nc._flush_queue.empty():
                await nc._flush_pending()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # disconnected with a full buffer, closed, ...: retried
            self.stats.retries["error"] += len(sent)
            self._throttle.warning("publish", "bridge: publishing to NATS failed (%r); retrying", exc)
            for p in sent:
                if self._inflight.pop(p.token, None) is not None:
                    self._schedule_retry(p)

    def _schedule_retry(self, p: Pending) -> None:
        backoff = min(self.max_backoff, self.retry_backoff * (2 ** min(p.attempts - 1, 16)))
        p.retry_at = time.monotonic() + backoff
        self._retry.append(p)

    # -- acks ----------------------------------------------------------------------------------------
    async def _on_ack(self, msg: Msg) -> None:
        """The subscription's callback (used when the fast path below is not installed)."""
        status = msg.headers.get("Status") if msg.headers else None
        self._ack(msg.subject.encode(), msg.data, status == _NO_RESPONDERS)

    def _install_fast_path(self) -> None:
        """Take this subscription's messages straight from nats-py's protocol parser.

        nats-py hands every message to `Client._process_msg(sid, subject, reply, data, headers)`,
        which builds a `Msg`, parses its headers and queues it for the subscription's task, which then
        awaits the callback: about half of the bridge's CPU at 50k acks/s (measured). The acks need
        none of it, so `_process_msg` is wrapped: a message for this subscription's sid goes to
        `_ack()` as raw bytes, every other one to nats-py as before. A private hook of nats-py: if
        its shape is not the one expected (a newer release), the ordinary callback stays in use."""
        nc, sub = self._nc, self._sub
        process = nc._process_msg
        sid = getattr(sub, "_id", None)
        if not isinstance(sid, int):
            log.warning("bridge: nats-py's subscription has no integer _id; using the plain callback")
            return

        async def process_msg(
            msg_sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
        ) -> None:
            if msg_sid == sid:
                self._ack(subject, data, bool(headers) and headers.startswith(b"NATS/1.0 503"))
                return
            await process(msg_sid, subject, reply, data, headers)

        shadowed = "_process_msg" in vars(nc)  # already an instance attribute (another wrapper)

        def restore() -> None:
            if shadowed:
                setattr(nc, "_process_msg", process)  # noqa: B010 - a method, not a field
            else:
                vars(nc).pop("_process_msg", None)  # the class's method again

        setattr(nc, "_process_msg", process_msg)  # noqa: B010
        self._restore = restore

    def _ack(self, subject: bytes, data: bytes, no_responders: bool) -> None:
        """One PubAck (or a no-responders status) for `<inbox>.<token>`. The common case (stored, or a
        duplicate) is kept to a few operations: it runs once per token."""
        p = self._inflight.pop(subject[self._prefix_len :], None)
        if p is None:  # a late ack of a message already sent again: the other ack settles it
            return
        if no_responders:
            self.stats.retries["no_responders"] += 1
            self._throttle.warning(
                "no_responders",
                "bridge: no JetStream stream answers for %s; retrying (through a leaf that denies "
                "chat.*.tokens, as meshkit's shipped leaf configs do? connect to the origin)",
                p.subject,
            )
            if self.on_no_responders is not None:
                self.on_no_responders()
            self._schedule_retry(p)
        elif b'"error"' in data:
            self._rejected(p, data)
        else:
            latency = time.monotonic() - p.sent_at
            buckets = self.stats.latency
            buckets.sum += latency
            buckets.counts[bisect_left(buckets.bounds, latency)] += 1
            if b'"duplicate"' in data and (b'"duplicate": true' in data or b'"duplicate":true' in data):
                self.stats.duplicates += 1  # 2.9 writes the space
                self._on_done(p, True)
            else:
                self.stats.published += 1
                self._on_done(p, False)
        # settled: room for the reader once it is what it waits for; empty for drain()
        size = len(self._inflight) + len(self._retry) + self._checking
        if self._room_waiting and self.max_inflight - size >= self._room_need:
            self._room_waiting = False
            self._room.set()
        if not size:
            self._empty.set()

    def _rejected(self, p: Pending, data: bytes) -> None:
        try:
            error: Any = json.loads(data).get("error", {})
            description = f"{error.get('description', 'error')} (code {error.get('err_code', '?')})"
        except (ValueError, AttributeError):
            description = data[:200].decode("utf-8", "replace")
        p.rejections += 1
        if p.rejections < self.max_rejections:
            self.stats.retries["error"] += 1
            self._schedule_retry(p)
            return
        self.stats.rejected += 1
        self._on_rejected(p, description)

    # -- timeouts and retries ------------------------------------------------------------------------
    async def _sweep(self) -> None:
        interval = max(0.01, min(0.1, self.ack_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                await self._sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the sweeper must keep running
                self._throttle.exception("sweep", "bridge: the ack sweeper failed")

    async def _sweep_once(self) -> None:
        now = time.monotonic()
        expired: list[Pending] = []
        for p in self._inflight.values():  # in send order: stop at the first one still in time
            if now - p.sent_at < self.ack_timeout:
                break
            expired.append(p)
        for p in expired:
            del self._inflight[p.token]
            self.stats.retries["timeout"] += 1
            self._schedule_retry(p)
        if expired:
            self._throttle.warning(
                "timeout",
                "bridge: %d PubAcks not received within %.1f s; publishing them again",
                len(expired),
                self.ack_timeout,
            )
        if not self._retry or not self._nc.is_connected:
            return
        due: list[Pending] = []
        while self._retry and len(due) < self.max_inflight:
            p = self._retry[0]
            if p.retry_at > now:
                break
            due.append(self._retry.popleft())
        if due and self.recheck is not None:
            due = await self._rechecked(due)
        if due:
            await self._send(due)

    async def _rechecked(self, due: list[Pending]) -> list[Pending]:
        """`recheck(due)`: those still to publish; the others leave the window. Should it fail, all
        of them are sent (at least once, as without the check)."""
        self._checking += len(due)
        try:
            keep = await self.recheck(due) if self.recheck is not None else due
        except asyncio.CancelledError:
            self._retry.extendleft(reversed(due))
            raise
        except Exception:
            self._throttle.exception("recheck", "bridge: checking retries before sending them failed")
            keep = due
        finally:
            self._checking -= len(due)
        if len(keep) < len(due):
            self._settle()
        return keep

    def _settle(self) -> None:
        size = len(self)
        if self.max_inflight - size >= self._room_need:
            self._room_waiting = False
            self._room.set()
        if not size:
            self._empty.set()


def _hooks_missing(nc: Client) -> str | None:
    """None when nats-py's private hooks are the ones `AckWindow` was written against (`_HOOKS`, plus
    `_flush_queue`, `pending_data_size`, `stats`), else what differs."""
    for name, params in _HOOKS.items():
        hook = getattr(nc, name, None)
        if hook is None or getattr(hook, "__self__", None) is not nc:
            return f"{name} missing or not a method of the client"
        if not inspect.iscoroutinefunction(hook):
            return f"{name} is not a coroutine function"
        try:
            names = tuple(inspect.signature(hook).parameters)
        except (TypeError, ValueError):
            return f"{name} has no signature"
        if names != params:
            return f"{name}{names} is not {name}{params}"
    if not hasattr(nc, "_flush_queue") or not isinstance(getattr(nc, "stats", None), dict):
        return "_flush_queue or stats missing"
    if not isinstance(getattr(type(nc), "pending_data_size", None), property):
        return "pending_data_size missing"
    return None
