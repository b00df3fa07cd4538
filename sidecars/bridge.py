"""`meshkit bridge`: LLM tokens from Redis (Streams or pub/sub) into NATS JetStream, each stored once.

    meshkit bridge --redis redis://127.0.0.1:6379/0 --nats nats://127.0.0.1:4222 \\
        [--source stream|pubsub] [--stream-key chat.tokens] [--group meshkit-bridge] [--consumer NAME] \\
        [--pattern 'chat.*.tokens'] [--js-domain origin] [--stream CHAT] [--max-inflight 1024] \\
        --admin-listen 127.0.0.1:9095

What it does (the contract is `meshkit.edge.token_contract`; the stream `meshkit.edge.token_stream`):

- reads token messages from Redis (`meshkit.sidecars.bridge_sources`): a Streams consumer group
  (default; entries written while no bridge ran are delivered, an entry is acknowledged only once
  JetStream stored it, a restarted bridge re-reads its own pending entries and live bridges take over
  a dead one's after `--claim-idle`) or pub/sub (`PSUBSCRIBE --pattern`, at most once);
- checks each one (`parse_token`; on pub/sub the channel must be exactly `chat.<id>.tokens` naming
  the same conversation) and publishes the exact bytes to `chat.<id>.tokens` with
  `Nats-Msg-Id: <id>:<sequence>`, so two bridges side by side (or one re-publishing after a crash)
  store each token once; PubAcks are collected asynchronously within `--max-inflight`
  (`meshkit.sidecars.jetstream_publisher`), a publish without an ack in `--ack-timeout` is sent again;
- dead-letters what breaks the contract (`meshkit.sidecars.bridge_deadletter`): counted, logged at
  most once per reason every 10 s, published to `chat.deadletter` with the reason; a Streams entry
  is then acknowledged (never read forever);
- `--js-domain D`: the JetStream API calls (the stream check) go to domain D (a bridge on a leaf
  node reaches the origin's JetStream only so); the tokens themselves are core publishes on the
  stream's subjects and reach the origin's stream across the leaf — but not across meshkit's shipped
  leaf configs (`mesh/nats/leaf*.conf` deny `chat.*.tokens` upward, so edge clients cannot forge
  tokens): with those, connect the bridge to the origin.

Start and outages: the bridge never exits because Redis or NATS is down. It keeps connecting (a
progress line every 5 s), `ensure_stream` runs once NATS answers (again when publishes find no stream),
and `/readyz` is 200 only while Redis and NATS are connected and the stream is ensured (the JSON says
which is missing; the lifecycle's `Readiness.check` hook, `meshkit.admin`, asks the bridge's state).
Redis lost: reads stop, reconnects with backoff (0.1 s doubled up to 2 s), a Streams consumer
re-reads its pending entries; NATS lost: nats-py reconnects (every 0.5 s, forever),
the publishes sent before the loss are sent again as soon as it is back (no waiting for
`--ack-timeout`), others without a PubAck after `--ack-timeout`. Reading stops while the window is
full, and while 8 x `--max-inflight` stored entries wait for their XACK (Redis refusing XACK), so
memory is bounded by `--max-inflight` messages plus one `--read-batch` plus those ids.

SIGTERM (the shared lifecycle, `meshkit.daemon`): readiness off and reading stops at once; the
messages in flight get up to `--drain-timeout` for their PubAcks; the confirmed Streams entries are
acknowledged; then the connections close. A Streams entry still unacknowledged stays pending in the
group: the next start (same `--consumer`) or another bridge (`--claim-idle`) publishes it again.

Metrics (`/metrics`, admin port): `meshkit_bridge_received_total{source}`,
`meshkit_bridge_published_total` (stored), `meshkit_bridge_duplicates_total` (PubAck duplicate),
`meshkit_bridge_deadlettered_total{reason}`, `meshkit_bridge_deadletter_failures_total`,
`meshkit_bridge_acked_total` (XACK), `meshkit_bridge_taken_over_total`,
`meshkit_bridge_retries_total{reason=timeout|no_responders|error|reconnect}`,
`meshkit_bridge_inflight`, `meshkit_bridge_publish_ack_seconds` (histogram), `meshkit_bridge_stream_lag`
and `meshkit_bridge_stream_pending` (`XINFO GROUPS`, every 2 s), `meshkit_bridge_claimed_total`,
`meshkit_bridge_reconnects_total{dependency=redis|nats}`, `meshkit_bridge_connected{dependency}`.

Throughput (`bench/bridge_rate.py`, 200,000 tokens over 1,000 conversations, 2 shared cores,
2026-12-02): the reader waits for a whole batch's room in the window, each batch goes to NATS as one
write of HPUB commands, PubAcks are taken straight from nats-py's parser
(`meshkit.sidecars.jetstream_publisher`), XREADGROUP replies are read as the parser gives them and
XACKs packed by the source. Streams with `hiredis`: 112k tokens/s, the bridge ~7.2 us of CPU per
token, nats-server ~7.0 us, redis ~1.3 us (an earlier run on a busier machine: 47k/s at ~18 us).
About a quarter of the bridge's part is the contract check (`parse_token`: `json.loads` and the
field checks), a fifth nats-py's reader and the PubAck bookkeeping. Pub/sub: 62k/s (~11 us per
token: one redis-py `read_response` per message).

Not done: TLS/credentials options for NATS beyond what the URL carries; a dead-letter stream (the
dead letters are core publishes: a subscriber or a stream of the operator's must keep them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.errors import Error as NatsError
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from meshkit.daemon import Daemon, Lifecycle, Resolved
from meshkit.edge.token_contract import DEADLETTER_SUBJECT, DEFAULT_STREAM, MalformedToken, parse_token
from meshkit.edge.token_stream import ensure_stream
from meshkit.errors import ConfigError
from meshkit.extproc.auth.events import _abort, _cancel, _redact_url
from meshkit.logs import Throttle
from meshkit.nats_flush import flushed
from meshkit.options import option, parse_seconds
from meshkit.sidecars.bridge_deadletter import (
    MAX_LETTER_BYTES,
    MISSING_DATA,
    REASONS,
    REJECTED,
    dead_letter,
    reason_label,
)
from meshkit.sidecars.bridge_sources import PubSubSource, Received, Source, StreamSource
from meshkit.sidecars.jetstream_publisher import AckWindow, Pending, PublisherStats

__all__ = ["DAEMON", "Bridge", "BridgeOptions"]

log = logging.getLogger("meshkit.bridge")

PROGRESS_EVERY = 5.0  # s between "still waiting for ..." lines
LAG_EVERY = 2.0  # s between XINFO GROUPS
UNACKED_PER_INFLIGHT = 8  # stored entries waiting for their XACK, at most, per --max-inflight
REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)
_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,255}")
_DOMAIN = re.compile(r"[A-Za-z0-9_-]{0,255}")


def _positive_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a whole number, 1 or more")
    try:
        number = int(str(value))
    except ValueError:
        raise ValueError("expected a whole number, 1 or more") from None
    if not 1 <= number <= 1_000_000:
        raise ValueError("expected a whole number from 1 to 1000000")
    return number


def _stream_name(value: Any) -> str:
    text = str(value)
    if not _STREAM_NAME.fullmatch(text):
        raise ValueError("a JetStream stream name: letters, digits, '_' and '-' (no '.', '*', '>', spaces)")
    return text


def _domain(value: Any) -> str:
    text = str(value)
    if not _DOMAIN.fullmatch(text):
        raise ValueError("a JetStream domain: letters, digits, '_' and '-'")
    return text


@dataclass(frozen=True)
class BridgeOptions:
    redis: str = option("", "Redis URL to read tokens from (required)", metavar="URL", secret=True)
    nats: str = option(
        "", "NATS URL(s), comma-separated, of the server to publish to (required)", metavar="URL", secret=True
    )
    source: str = option(
        "stream",
        "stream: a Redis Streams consumer group (loses nothing); pubsub: PSUBSCRIBE (at most once)",
        choices=("stream", "pubsub"),
    )
    pattern: str = option("chat.*.tokens", "pub/sub: the PSUBSCRIBE pattern")
    stream_key: str = option("chat.tokens", "Streams: the key; each entry's field `data` is the token JSON")
    group: str = option("meshkit-bridge", "Streams: the consumer group (created at id 0 when missing)")
    consumer: str = option(
        "",
        "Streams: this bridge's consumer name, one per bridge, kept across its restarts (default: host name)",
    )
    claim_idle: float = option(
        30.0,
        "Streams: seconds an entry may sit unacknowledged in another consumer's list before it is taken over",
        parse=parse_seconds,
        metavar="SECONDS",
    )
    claim_every: float = option(
        5.0, "Streams: seconds between two looks for such entries", parse=parse_seconds, metavar="SECONDS"
    )
    js_domain: str = option(
        "",
        "JetStream domain of the origin (through a leaf node; meshkit's shipped leaf configs refuse "
        "token publishes: connect to the origin)",
        parse=_domain,
    )
    stream: str = option(
        DEFAULT_STREAM, "JetStream stream (created with meshkit's limits if missing)", parse=_stream_name
    )
    max_inflight: int = option(1024, "publishes waiting for their PubAck, at most", parse=_positive_int)
    read_batch: int = option(512, "messages read from Redis in one call, at most", parse=_positive_int)
    read_block: float = option(
        0.5,
        "seconds one Redis read waits for messages (and SIGTERM waits for it)",
        parse=parse_seconds,
        metavar="SECONDS",
    )
    ack_timeout: float = option(
        5.0,
        "seconds to wait for a PubAck before publishing the message again",
        parse=parse_seconds,
        metavar="SECONDS",
    )


@dataclass
class BridgeStats:
    received: int = 0
    deadlettered: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    deadletter_failures: int = 0
    taken_over: int = 0  # in flight here, another consumer's (or acknowledged) before a retry
    reconnects: dict[str, int] = field(default_factory=lambda: {"redis": 0, "nats": 0})
    lag: int | None = None
    pending: int | None = None
    publisher: PublisherStats = field(default_factory=PublisherStats)


class Backoff:
    """0.1 s, doubled after each failure up to 2 s; `reset()` after a success."""

    def __init__(self, first: float = 0.1, most: float = 2.0) -> None:
        self.first, self.most, self.current = first, most, first

    def next(self) -> float:
        value, self.current = self.current, min(self.most, self.current * 2)
        return value

    def reset(self) -> None:
        self.current = self.first


def make_source(opts: BridgeOptions) -> Source:
    if opts.source == "pubsub":
        return PubSubSource(opts.redis, opts.pattern, block=opts.read_block)
    return StreamSource(
        opts.redis,
        opts.stream_key,
        opts.group,
        opts.consumer or socket.gethostname(),
        block=opts.read_block,
        claim_idle=opts.claim_idle,
        claim_every=opts.claim_every,
    )


class Bridge:
    """Redis -> JetStream (see the module docstring): connections, the relay loop, the acker."""

    def __init__(self, opts: BridgeOptions, *, drain_timeout: float = 10.0) -> None:
        self.opts = opts
        self.drain_timeout = drain_timeout
        self.stats = BridgeStats()
        self.source = make_source(opts)
        self.nc: Client | None = None
        self.window: AckWindow | None = None
        self.redis_connected = False
        self.nats_connected = False
        self.stream_ensured = False
        self._servers = [u.strip() for u in opts.nats.split(",") if u.strip()]
        self._where = ",".join(_redact_url(u) for u in self._servers)
        self._stop_reading = asyncio.Event()
        self._ack_wake = asyncio.Event()
        self._ensure_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._relay_task: asyncio.Task[None] | None = None
        self._throttle = Throttle(log, interval=10.0)
        self._closing = False
        self._last_nats_error = ""

    # -- state ---------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.redis_connected and self.nats_connected and self.stream_ensured

    def not_ready_reason(self) -> str:
        missing = [
            what
            for what, ok in (
                ("redis", self.redis_connected),
                ("nats", self.nats_connected),
                (f"stream {self.opts.stream}", self.stream_ensured),
            )
            if not ok
        ]
        return "waiting for " + ", ".join(missing) if missing else "serving"

    def details(self) -> dict[str, str]:
        return {
            "redis": "connected" if self.redis_connected else "disconnected",
            "nats": "connected" if self.nats_connected else "disconnected",
            "stream": "ensured" if self.stream_ensured else "not yet",
        }

    @property
    def inflight(self) -> int:
        return len(self.window) if self.window is not None else 0

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start connecting in the background and return at once: an outage at start is waited out."""
        self._spawn(self._supervise(), "bridge-supervisor")

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)  # bounded: only running tasks are kept
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("bridge: task %s failed", task.get_name(), exc_info=exc)

    def stop_reading(self) -> None:
        self._stop_reading.set()

    async def close(self) -> None:
        """Stop reading, give the messages in flight `drain_timeout` for their PubAcks, acknowledge
        what was confirmed, close the connections. Bounded throughout."""
        self._stop_reading.set()
        self._closing = True
        if self._relay_task is not None and not self._relay_task.done():
            await asyncio.wait({self._relay_task}, timeout=self.opts.read_block + 2.0)
        if self.window is not None and len(self.window):
            left = await self.window.drain(self.drain_timeout)
            if left:
                log.warning(
                    "bridge: %d messages still without a PubAck after %.1f s: they stay pending "
                    "(Streams) or are lost (pub/sub)",
                    left,
                    self.drain_timeout,
                )
        for task in list(self._tasks):  # the acker too: a batch it was sending goes back to the queue
            await _cancel(task, within=1.0)
        with contextlib.suppress(*REDIS_ERRORS, RedisError, TimeoutError):
            async with asyncio.timeout(2.0):
                await self.source.flush_acks()
        if self.window is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self.window.close()
        await self.source.close()
        nc, self.nc = self.nc, None
        if nc is not None:
            try:
                async with asyncio.timeout(1.0):
                    if nc.is_connected:
                        await flushed(nc, 0.45)  # two round trips within the 1 s
                    await nc.close()
            except Exception:
                _abort(nc)
            reconnecting = getattr(nc, "_reconnection_task", None)
            if isinstance(reconnecting, asyncio.Task):
                await _cancel(reconnecting)
        self.nats_connected = self.redis_connected = False

    # -- connecting ----------------------------------------------------------------------------------
    async def _supervise(self) -> None:
        self.nc = await self._connect_nats()
        await self._ensure_stream_until_done()
        window = AckWindow(
            self.nc,
            on_done=self._stored,
            on_rejected=self._rejected,
            max_inflight=self.opts.max_inflight,
            ack_timeout=self.opts.ack_timeout,
            stats=self.stats.publisher,
        )
        window.on_no_responders = self._ensure_wake.set
        if isinstance(self.source, StreamSource):
            window.recheck = self._still_ours
        await window.start()
        self.window = window
        self._relay_task = self._spawn(self._relay(window), "bridge-relay")
        self._spawn(self._re_ensure(), "bridge-ensure-stream")
        if isinstance(self.source, StreamSource):
            self._spawn(self._acker(self.source), "bridge-acker")
            self._spawn(self._lag(self.source), "bridge-lag")

    async def _connect_nats(self) -> Client:
        """A connected client. nats-py's connect() with unlimited reconnects keeps trying by itself
        (its errors reach `_nats_error`); this waits for it with a progress line, and starts over
        with a fresh client should it ever give up."""
        began = time.monotonic()
        next_line = began + 1.0
        while True:
            nc = Client()
            options: dict[str, Any] = {
                "servers": self._servers,
                "name": f"meshkit-bridge {socket.gethostname()}",
                "connect_timeout": 2,
                "allow_reconnect": True,
                "max_reconnect_attempts": -1,
                "reconnect_time_wait": 0.5,
                "ping_interval": 5,
                "max_outstanding_pings": 2,
                "pending_size": 8 * 1024 * 1024,
                "flush_timeout": 2.0,
                "error_cb": self._nats_error,
                "disconnected_cb": self._nats_disconnected,
                "reconnected_cb": self._nats_reconnected,
                "closed_cb": self._nats_closed,
            }
            connecting = asyncio.ensure_future(nc.connect(**options))
            try:
                while not connecting.done():
                    await asyncio.wait({connecting}, timeout=max(0.0, next_line - time.monotonic()))
                    if not connecting.done() and time.monotonic() >= next_line:
                        next_line = time.monotonic() + PROGRESS_EVERY
                        log.warning(
                            "bridge: waiting for NATS at %s (%.0f s): %s",
                            self._where,
                            time.monotonic() - began,
                            self._last_nats_error or "no answer yet",
                        )
            finally:
                if not connecting.done():  # cancelled (SIGTERM during start-up)
                    await _cancel(connecting)
            if connecting.exception() is None:
                self.nats_connected = True
                log.info("bridge: connected to NATS at %s", self._where)
                return nc
            self._last_nats_error = repr(connecting.exception())
            with contextlib.suppress(Exception):
                async with asyncio.timeout(0.5):
                    await nc.close()
            await asyncio.sleep(0.5)

    async def _ensure_stream_until_done(self) -> None:
        assert self.nc is not None
        js = self.nc.jetstream(domain=self.opts.js_domain or None, timeout=2.0)
        began = last_line = time.monotonic()
        first = True
        while True:
            try:
                config = await ensure_stream(js, self.opts.stream)
            except ValueError as exc:  # a stream of that name without chat.*.tokens: an operator's fix
                msg = str(exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                msg = repr(exc)
            else:
                self.stream_ensured = True
                log.info(
                    "bridge: JetStream stream %s ready (subjects %s%s)",
                    config.name,
                    config.subjects,
                    f", domain {self.opts.js_domain}" if self.opts.js_domain else "",
                )
                return
            now = time.monotonic()
            if first or now - last_line >= PROGRESS_EVERY:
                first, last_line = False, now
                log.warning(
                    "bridge: JetStream stream %s not ensured yet (%.0f s%s): %s",
                    self.opts.stream,
                    now - began,
                    f", domain {self.opts.js_domain}" if self.opts.js_domain else "",
                    msg,
                )
            await asyncio.sleep(0.5)

    async def _re_ensure(self) -> None:
        """Publishes that found no stream (deleted, JetStream restarted empty): ensure it again, at most
        once a second."""
        while True:
            await self._ensure_wake.wait()
            self._ensure_wake.clear()
            self.stream_ensured = False
            await self._ensure_stream_until_done()
            await asyncio.sleep(1.0)

    async def _nats_error(self, exc: Exception) -> None:
        self._last_nats_error = repr(exc)
        self._throttle.log(logging.DEBUG, "nats_error", "bridge: NATS client error: %r", exc)

    async def _nats_disconnected(self) -> None:
        if self.nats_connected and not self._closing:
            log.warning("bridge: NATS connection lost; reconnecting (unacknowledged publishes are retried)")
        self.nats_connected = False
        if self.window is not None:
            self.window.connection_lost()

    async def _nats_reconnected(self) -> None:
        self.stats.reconnects["nats"] += 1
        self.nats_connected = True
        if self.window is not None:
            self.window.reconnected()  # what went down with the old connection is sent again now
        self.source.reset()  # Streams: re-read what this consumer had pending (skips what is in flight)
        log.info("bridge: NATS connection back")

    async def _nats_closed(self) -> None:
        self.nats_connected = False

    # -- the relay -----------------------------------------------------------------------------------
    async def _relay(self, window: AckWindow) -> None:
        backoff = Backoff()
        down_since: float | None = None
        last_line = 0.0
        source = self.source
        unacked_limit = UNACKED_PER_INFLIGHT * window.max_inflight
        while not self._stop_reading.is_set():
            # A whole batch's room (or half the window when that is smaller), then one read.
            if not await window.wait_for_room(
                0.5, need=min(self.opts.read_batch, max(1, window.max_inflight // 2))
            ):
                continue
            if source.unacked >= unacked_limit:  # XACKs refused or slow: reading on would only queue more
                self._throttle.warning(
                    "unacked",
                    "bridge: %d stored entries are waiting for their XACK; reading paused",
                    source.unacked,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_reading.wait(), 0.05)
                continue
            count = max(1, min(self.opts.read_batch, window.room()))
            try:
                batch = await source.read(count)
            except asyncio.CancelledError:
                raise
            except (*REDIS_ERRORS, RedisError) as exc:
                now = time.monotonic()
                if self.redis_connected or down_since is None:
                    if self.redis_connected:
                        self.stats.reconnects["redis"] += 1
                        log.warning("bridge: Redis connection lost (%r); reconnecting", exc)
                    else:
                        log.warning("bridge: waiting for Redis at %s: %r", _redact_url(self.opts.redis), exc)
                    down_since = last_line = now
                elif now - last_line >= PROGRESS_EVERY:
                    last_line = now
                    log.warning("bridge: Redis still unreachable after %.0f s: %r", now - down_since, exc)
                self.redis_connected = False
                source.reset()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_reading.wait(), backoff.next())
                continue
            if not self.redis_connected:
                if down_since is not None and self.stats.reconnects["redis"]:
                    log.info("bridge: Redis connection back")
                self.redis_connected, down_since = True, None
                backoff.reset()
            self.stats.received += len(batch)
            good: list[tuple[str, bytes, str, Any]] = []
            for item in batch:
                raw = item.data
                if raw is None:
                    await self._dead_letter(item, MISSING_DATA, "the entry has no `data` field")
                    continue
                try:
                    msg = parse_token(raw, subject=item.channel)
                except MalformedToken as exc:
                    await self._dead_letter(item, reason_label(exc), exc.reason)
                    continue
                good.append((msg.subject, raw, msg.message_id, item))
            if good:
                await window.publish_many(good)

    async def _dead_letter(self, item: Received, reason: str, detail: str) -> None:
        nc = self.nc
        payload = dead_letter(
            reason,
            detail,
            source=self.source.kind,
            data=item.data,
            channel=item.channel,
            entry_id=item.entry_id,
            max_bytes=nc.max_payload if nc is not None and nc.is_connected else MAX_LETTER_BYTES,
        )
        where = (
            item.channel if item.channel is not None else (item.entry_id or b"").decode("ascii", "replace")
        )
        try:
            if nc is None:
                raise ConnectionError("not connected to NATS")
            await nc.publish(DEADLETTER_SUBJECT, payload)
        except (NatsError, ConnectionError) as exc:
            self.stats.deadletter_failures += 1
            self.source.release(item)
            self._throttle.warning(
                "deadletter_failed",
                "bridge: could not publish a dead letter (%r); a "
                "Streams entry stays pending and is read again",
                exc,
            )
            return
        self.stats.deadlettered[reason] += 1
        self._throttle.warning(
            f"dead:{reason}",
            "bridge: dead-lettered a message from %s %s: %s",
            self.source.kind,
            where,
            detail,
            reason=reason,
        )
        self.source.confirm(item)
        self._ack_wake.set()

    async def _still_ours(self, batch: list[Pending]) -> list[Pending]:
        """Retries about to go out: those whose Streams entry another bridge took over meanwhile
        (XAUTOCLAIM after --claim-idle, e.g. while this one's NATS link was down) are dropped, not
        published again (past JetStream's duplicate window that would store them twice). Redis not
        answering: all are sent."""
        source = self.source
        assert isinstance(source, StreamSource)
        try:
            async with asyncio.timeout(2.0):
                owned = await source.owned([p.context for p in batch])
        except (*REDIS_ERRORS, RedisError):
            return batch
        keep = []
        for p in batch:
            if p.context.entry_id in owned:
                keep.append(p)
            else:
                source.release(p.context)
                self.stats.taken_over += 1
        if len(keep) < len(batch):
            self._throttle.warning(
                "taken_over",
                "bridge: %d entries in flight here were taken over by another consumer; not "
                "publishing them again",
                len(batch) - len(keep),
            )
        return keep

    def _stored(self, pending: Pending, duplicate: bool) -> None:
        self.source.confirm(pending.context)
        self._ack_wake.set()

    def _rejected(self, pending: Pending, description: str) -> None:
        self._spawn(
            self._dead_letter(pending.context, REJECTED, f"JetStream refused it: {description}"),
            "bridge-dead-letter",
        )

    # -- Streams: acks and lag -----------------------------------------------------------------------
    async def _acker(self, source: StreamSource) -> None:
        backoff = Backoff()
        while True:
            await self._ack_wake.wait()
            self._ack_wake.clear()
            await asyncio.sleep(0.002)  # let a few more confirmations join this XACK
            try:
                await source.flush_acks()
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except (*REDIS_ERRORS, RedisError) as exc:
                self._throttle.warning("xack", "bridge: XACK failed (%r); retrying after a reconnect", exc)
                await asyncio.sleep(backoff.next())
                self._ack_wake.set()

    async def _lag(self, source: StreamSource) -> None:
        while True:
            if self.redis_connected:
                try:
                    async with asyncio.timeout(2.0):
                        self.stats.lag, self.stats.pending = await source.lag()
                except asyncio.CancelledError:
                    raise
                except (*REDIS_ERRORS, RedisError):
                    pass
            await asyncio.sleep(LAG_EVERY)

    # -- metrics -------------------------------------------------------------------------------------
    def collector(self) -> Collector:
        return _BridgeCollector(self)


class _BridgeCollector(Collector):
    def __init__(self, bridge: Bridge) -> None:
        self._bridge = bridge

    def collect(self) -> Iterator[Metric]:
        b = self._bridge
        s, p = b.stats, b.stats.publisher
        received = CounterMetricFamily(
            "meshkit_bridge_received", "Messages read from Redis", labels=["source"]
        )
        received.add_metric([b.source.kind], s.received)
        yield received
        yield CounterMetricFamily("meshkit_bridge_published", "Tokens JetStream stored (new)", p.published)
        yield CounterMetricFamily(
            "meshkit_bridge_duplicates", "Publishes JetStream deduplicated (PubAck duplicate)", p.duplicates
        )
        dead = CounterMetricFamily(
            "meshkit_bridge_deadlettered",
            "Messages published to chat.deadletter, by reason",
            labels=["reason"],
        )
        for reason, count in s.deadlettered.items():
            dead.add_metric([reason], count)
        yield dead
        yield CounterMetricFamily(
            "meshkit_bridge_taken_over",
            "Streams entries in flight here that another consumer took over before a retry (dropped)",
            s.taken_over,
        )
        yield CounterMetricFamily(
            "meshkit_bridge_deadletter_failures",
            "Dead letters that could not be published",
            s.deadletter_failures,
        )
        retries = CounterMetricFamily(
            "meshkit_bridge_retries", "Publishes sent again, by why", labels=["reason"]
        )
        for reason, count in p.retries.items():
            retries.add_metric([reason], count)
        yield retries
        acked = b.source.acked if isinstance(b.source, StreamSource) else 0
        yield CounterMetricFamily("meshkit_bridge_acked", "Redis Stream entries acknowledged (XACK)", acked)
        claimed = b.source.claimed if isinstance(b.source, StreamSource) else 0
        yield CounterMetricFamily(
            "meshkit_bridge_claimed", "Redis Stream entries taken over from other consumers", claimed
        )
        yield GaugeMetricFamily("meshkit_bridge_inflight", "Publishes waiting for their PubAck", b.inflight)
        hist = HistogramMetricFamily(
            "meshkit_bridge_publish_ack_seconds", "Time from a publish to its PubAck"
        )
        hist.add_metric([], p.latency.cumulative(), p.latency.sum)
        yield hist
        lag = GaugeMetricFamily("meshkit_bridge_stream_lag", "Stream entries not yet read by the group")
        pending = GaugeMetricFamily("meshkit_bridge_stream_pending", "Stream entries read, not acknowledged")
        if s.lag is not None:
            lag.add_metric([], s.lag)
        if s.pending is not None:
            pending.add_metric([], s.pending)
        yield lag
        yield pending
        reconnects = CounterMetricFamily(
            "meshkit_bridge_reconnects", "Connections lost and re-established", labels=["dependency"]
        )
        connected = GaugeMetricFamily("meshkit_bridge_connected", "1 while connected", labels=["dependency"])
        for dep, count in s.reconnects.items():
            reconnects.add_metric([dep], count)
        connected.add_metric(["redis"], int(b.redis_connected))
        connected.add_metric(["nats"], int(b.nats_connected))
        yield reconnects
        yield connected


def _check(opts: BridgeOptions) -> None:
    problems = [
        f"{flag} is required"
        for flag, value in (("--redis", opts.redis), ("--nats", opts.nats))
        if not value.strip()
    ]
    if opts.source == "stream" and not opts.stream_key:
        problems.append("--stream-key must not be empty")
    if opts.source == "stream" and not opts.group:
        problems.append("--group must not be empty")
    if opts.source == "pubsub" and not opts.pattern:
        problems.append("--pattern must not be empty")
    if not opts.read_block > 0:
        problems.append("--read-block must be more than 0 seconds")
    if not opts.ack_timeout > 0:
        problems.append("--ack-timeout must be more than 0 seconds")
    if problems:
        raise ConfigError(problems)


async def serve(options: Resolved, life: Lifecycle) -> None:
    opts: BridgeOptions = options[BridgeOptions]
    _check(opts)
    bridge = Bridge(opts, drain_timeout=life.options.drain_timeout)
    life.registry.register(bridge.collector())

    async def on_draining() -> None:
        bridge.stop_reading()

    async def readiness() -> tuple[bool, str, dict[str, str]]:
        """/readyz while the lifecycle says ready: 200 only while Redis and NATS are connected and the
        stream is ensured (the lifecycle turns readiness on once serve() returned, which here is
        before they answer); the body says which is missing. A read of the bridge's state: free."""
        ready = bridge.ready
        return ready, "serving" if ready else bridge.not_ready_reason(), bridge.details()

    life.readiness.check = readiness
    await life.start("bridge", bridge.start, bridge.close)
    life.on_draining(on_draining)


def _sections() -> list[type[Any]]:
    return [BridgeOptions]


DAEMON = Daemon(
    name="bridge",
    help="moves LLM tokens from Redis (Streams or pub/sub) into NATS JetStream, each stored once",
    sections=_sections,
    serve=serve,
)
