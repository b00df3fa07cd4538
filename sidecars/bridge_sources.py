"""The bridge's two Redis readers: pub/sub (`PubSubSource`) and Streams with a consumer group
(`StreamSource`). Both hand out batches of `Received` (the raw bytes and where they came from); the
bridge validates, publishes and then calls `confirm()` for what JetStream stored.

Pub/sub (`PSUBSCRIBE <pattern>`, default `chat.*.tokens`): at most once, like Redis pub/sub itself.
A message published while the bridge is disconnected or not running is lost; a bridge that reads
slower than the publishers lets Redis buffer for it (`client-output-buffer-limit pubsub`, past which
Redis drops the connection). The bridge reads only while its in-flight window has room, so the only
queue in between is Redis's. The glob also matches `chat.a.b.tokens`: the channel is validated by the
bridge (`parse_token(raw, subject=channel)`).

Streams (`--stream-key`, default `chat.tokens`; each entry's field `data` is the token JSON):

- the consumer group (`--group`) is created at id `0` with `MKSTREAM` when missing, so entries written
  before the first start are delivered; `NOGROUP` later (Redis restarted without persistence, the key
  deleted) re-creates it the same way;
- on start, and after every reconnect, this consumer's own pending entries are read first (`XREADGROUP
  ... 0`): entries it had read but not acknowledged when it died or lost Redis are published again
  (JetStream's dedup makes that harmless), then new ones (`>`), `COUNT` and `BLOCK` bounded;
- every `claim_every` seconds, `XAUTOCLAIM` takes over entries idle for more than `claim_idle` seconds
  in other consumers' pending lists (a dead bridge's), a bounded batch at a time: that is the HA;
  entries of this process still waiting for their PubAck are never handed out twice; before this
  process publishes one of its entries again (a retry), `owned()` says whether it is still its own:
  one another bridge took over is dropped here, not published a second time;
- `confirm(entry)` queues its `XACK`; `flush_acks()` sends the queued ones in one command (the bridge's
  acker task calls it): an entry is acknowledged only after JetStream confirmed it (or after it was
  dead-lettered). Acks that fail (Redis down) stay queued and go out after the reconnect; until then
  a re-read of the pending list or a claim skips them (published again after an outage longer than
  JetStream's 2-minute duplicate window, they would be stored twice);
- an entry whose fields are empty (deleted from the stream while pending) or have no `data` comes out
  with `data=None`: the bridge dead-letters and acknowledges it, so it is never read again.

Connection errors reach the caller (`redis.exceptions.ConnectionError`/`TimeoutError`, `OSError`); it
backs off and calls `read()` again. Each source reconnects by itself on the next call.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

__all__ = ["PubSubSource", "Received", "Source", "StreamSource", "redis_client"]

log = logging.getLogger("meshkit.bridge.redis")

DATA_FIELD = b"data"
CONNECT_TIMEOUT = 2.0  # s: connecting to Redis
COMMAND_MARGIN = 2.0  # s: a command's socket timeout beyond its own BLOCK


@dataclass(slots=True)
class Received:
    """One message as read: `data` (None: a Streams entry without a `data` field) and where it came
    from (`channel` for pub/sub, `entry_id` for Streams)."""

    data: bytes | None
    channel: str | None = None
    entry_id: bytes | None = None


class Source(Protocol):
    kind: str  # "pubsub" | "stream"

    async def read(self, count: int) -> list[Received]: ...

    def confirm(self, item: Received) -> None: ...

    def release(self, item: Received) -> None: ...

    async def flush_acks(self) -> int: ...

    @property
    def unacked(self) -> int: ...

    async def close(self) -> None: ...

    def reset(self) -> None: ...


def redis_client(url: str, *, block: float, **kwargs: Any) -> aioredis.Redis:
    """One redis-py client with bounded connect and command waits (`block`: the longest BLOCK used)."""
    client: aioredis.Redis = aioredis.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_timeout=block + COMMAND_MARGIN,
        decode_responses=False,
        health_check_interval=0,
        **kwargs,
    )
    return client


class PubSubSource:
    """`PSUBSCRIBE pattern`; `read()` returns what arrived, waiting at most `block` seconds.

    It reads from one redis-py `Connection` (URL, AUTH, TLS, the RESP parser: redis-py's, hiredis when
    installed), with `send_command`/`read_response` and RESP2, not through redis-py's `PubSub`:
    `get_message()` costs two reads, two timeout contexts and a dict per message; this loop reads
    each buffered message with one call (`read_response(timeout=0)`: the next buffered reply or None;
    redis-py's parsers keep a partly read reply across such a timeout). Measured: about 25 % less of
    the bridge's CPU per token than through `PubSub`."""

    kind = "pubsub"

    def __init__(self, url: str, pattern: str, *, block: float = 0.5) -> None:
        self.url, self.pattern, self.block = url, pattern, block
        self._client: aioredis.Redis | None = None
        self._conn: Any = None  # a redis.asyncio Connection, subscribed
        self._failed: Exception | None = None  # raised by the next read(), after what was read

    async def _connect(self) -> Any:
        await self.close()
        self._client = redis_client(self.url, block=self.block, protocol=2)
        conn = await self._client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        self._conn = conn
        await conn.send_command("PSUBSCRIBE", self.pattern)
        answer = await conn.read_response(timeout=CONNECT_TIMEOUT)
        if not (isinstance(answer, list) and answer and answer[0] == b"psubscribe"):
            raise RedisConnectionError(f"PSUBSCRIBE {self.pattern!r} answered {answer!r}")
        return conn

    async def read(self, count: int) -> list[Received]:
        """What arrived, at most `count`. A connection that fails after some messages were read
        returns those first (a killed server's last messages and its EOF arrive together: raising
        then would lose what the socket already held); the error is raised by the next call."""
        if (failed := self._failed) is not None:
            self._failed = None
            raise failed
        conn = self._conn or await self._connect()
        out: list[Received] = []
        try:
            reply = await conn.read_response(timeout=self.block)  # None: nothing within `block`
            while reply is not None:
                if isinstance(reply, list) and len(reply) == 4 and reply[0] == b"pmessage":
                    out.append(Received(reply[3], channel=reply[2].decode("utf-8", "replace")))
                if len(out) >= count:
                    break
                reply = await conn.read_response(timeout=0)  # the next buffered one, or None
            return out
        except BaseException as exc:
            await self.close()  # the next read() subscribes again on a new connection
            if out and isinstance(exc, Exception):  # a cancellation is never held back
                self._failed = exc
                return out
            raise

    def confirm(self, item: Received) -> None:
        """Nothing to acknowledge in pub/sub."""

    def release(self, item: Received) -> None:
        """Nothing to give back in pub/sub (the message is gone)."""

    async def flush_acks(self) -> int:
        return 0

    @property
    def unacked(self) -> int:
        """Nothing waits for an acknowledgement in pub/sub."""
        return 0

    def reset(self) -> None:
        """Nothing to re-read in pub/sub."""

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        client, self._client = self._client, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)  # subscribed: never back into the pool
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()


class StreamSource:
    """A consumer of a Redis Streams consumer group (see the module docstring)."""

    kind = "stream"

    def __init__(
        self,
        url: str,
        key: str,
        group: str,
        consumer: str,
        *,
        block: float = 0.5,
        claim_idle: float = 30.0,
        claim_every: float = 5.0,
        ack_batch: int = 1000,
    ) -> None:
        self.url, self.key, self.group, self.consumer = url, key, group, consumer
        self.block = block
        self.claim_idle = claim_idle
        self.claim_every = claim_every
        self.ack_batch = ack_batch
        self._client: aioredis.Redis | None = None
        self._cursor = "0"  # "0": re-reading this consumer's own pending entries; ">": new ones
        self._claim_cursor = "0-0"
        self._next_claim = time.monotonic() + claim_every
        self._group_ready = False
        self._inflight: set[bytes] = set()  # read, not yet confirmed
        self._to_ack: list[bytes] = []  # confirmed, XACK not sent yet (in order)
        self._confirmed: set[bytes] = set()  # the same ids, to skip them on a re-read
        self._xack_head = b""
        self.claimed = 0
        self.acked = 0

    def client(self) -> aioredis.Redis:
        if self._client is None:
            client = redis_client(self.url, block=self.block)
            # XREADGROUP's replies as the parser gives them (`[[key, [[id, [field, value, ...]], ...]]]`):
            # redis-py's callback builds a dict per entry, a good part of the read's cost per token.
            client.set_response_callback("XREADGROUP", _as_is)
            client.set_response_callback("XAUTOCLAIM", _as_is)  # [cursor, entries like those, deleted]
            self._client = client
            self._xack_head = b"$4\r\nXACK\r\n" + _bulk(self.key.encode()) + _bulk(self.group.encode())
        return self._client

    async def ensure_group(self) -> None:
        try:
            await self.client().xgroup_create(self.key, self.group, id="0", mkstream=True)
            log.info("bridge: created consumer group %s on %s at id 0", self.group, self.key)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def reset(self) -> None:
        """After a reconnect: read this consumer's pending entries again before new ones (the group is
        checked again too: a Redis that restarted empty has none)."""
        self._cursor = "0"
        self._group_ready = False

    async def read(self, count: int) -> list[Received]:
        if not self._group_ready:
            await self.ensure_group()
        try:
            if self._cursor != ">":
                entries = await self._read_pending(count)
                if entries is not None:
                    return entries
            if time.monotonic() >= self._next_claim:
                claimed = await self._claim(count)
                if claimed:
                    return claimed
            reply = await self.client().xreadgroup(
                self.group, self.consumer, {self.key: ">"}, count=count, block=int(self.block * 1000)
            )
            return self._take(_entries(reply))
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning(
                "bridge: consumer group %s on %s is gone (Redis restarted empty?): re-creating it",
                self.group,
                self.key,
            )
            self.reset()
            return []

    async def _read_pending(self, count: int) -> list[Received] | None:
        """The next batch of this consumer's own pending entries that are not in flight here, or None
        once there are no more (the walk over the pending list goes on past entries in flight)."""
        while True:
            reply = await self.client().xreadgroup(
                self.group, self.consumer, {self.key: self._cursor}, count=count
            )
            entries = _entries(reply)
            if not entries:
                self._cursor = ">"
                return None
            self._cursor = entries[-1][0].decode()
            fresh = self._fresh(entries)
            if fresh:
                log.info("bridge: re-reading %d pending entries of consumer %s", len(fresh), self.consumer)
                return self._take(fresh)

    async def _claim(self, count: int) -> list[Received]:
        reply: Any = await self.client().xautoclaim(
            self.key, self.group, self.consumer, int(self.claim_idle * 1000), self._claim_cursor, count=count
        )
        next_cursor = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        if next_cursor == "0-0":  # a whole pass over the pending lists: the next one later
            self._next_claim = time.monotonic() + self.claim_every
        self._claim_cursor = next_cursor
        fresh = self._fresh(reply[1])
        if fresh:
            self.claimed += len(fresh)
            log.info(
                "bridge: claimed %d entries idle over %.1f s from other consumers",
                len(fresh),
                self.claim_idle,
            )
        return self._take(fresh)

    def _fresh(self, entries: list[Any]) -> list[Any]:
        """Entries of a re-read or a claim that are not being handled here already: neither in flight
        nor confirmed and waiting for their XACK (published again, such an entry would be stored twice
        once JetStream's duplicate window has passed, e.g. after a long Redis outage)."""
        busy_a, busy_b = self._inflight, self._confirmed
        return [e for e in entries if e[0] not in busy_a and e[0] not in busy_b]

    def _take(self, entries: list[Any]) -> list[Received]:
        """`Received` for raw `[id, fields]` entries (fields: a flat list, None or empty for an entry
        deleted while pending), now in flight."""
        out = []
        add = self._inflight.add
        for entry_id, fields in entries:
            add(entry_id)
            # the usual entry has `data` as its only field
            data = fields[1] if fields and fields[0] == DATA_FIELD else _data_field(fields)
            out.append(Received(data, None, entry_id))
        return out

    def confirm(self, item: Received) -> None:
        if item.entry_id is not None:
            self._inflight.discard(item.entry_id)
            self._to_ack.append(item.entry_id)
            self._confirmed.add(item.entry_id)

    def release(self, item: Received) -> None:
        """`item` could not be handled now (its dead letter was not published): no longer in flight,
        so the next re-read of this consumer's pending entries (after a reconnect) takes it again."""
        if item.entry_id is not None:
            self._inflight.discard(item.entry_id)

    async def owned(self, items: list[Received]) -> set[bytes]:
        """The entry ids of `items` still pending with this consumer (not taken over by another with
        XAUTOCLAIM, not acknowledged), from one `XPENDING` over their id range. Should the range hold
        more than it reads, every id counts as owned (published again rather than lost)."""
        ids = {item.entry_id for item in items if item.entry_id is not None}
        if not ids:
            return set()
        ordered = sorted(ids, key=_id_order)
        count = 2 * len(ids) + 1000
        rows = await self.client().xpending_range(
            self.key, self.group, min=ordered[0], max=ordered[-1], count=count, consumername=self.consumer
        )
        if len(rows) >= count:
            return ids
        return ids & {row["message_id"] for row in rows}

    @property
    def unacked(self) -> int:
        return len(self._to_ack)

    async def flush_acks(self) -> int:
        """XACK what was confirmed, `ack_batch` ids per command; the number acknowledged. Each batch is
        taken off the queue before its command (two flushes at once never send or drop the same ids);
        one that fails (Redis down, cancelled) is put back first, and the error raised."""
        done = 0
        while self._to_ack:
            batch = self._to_ack[: self.ack_batch]
            del self._to_ack[: len(batch)]
            try:
                await self._xack(batch)
            except BaseException:
                self._to_ack[:0] = batch
                raise
            self._confirmed.difference_update(batch)
            done += len(batch)
            self.acked += len(batch)
        return done

    async def _xack(self, ids: list[bytes]) -> None:
        """`XACK key group ids...` packed here (redis-py's `pack_command` costs ~0.8 us per id, this
        ~0.15) and sent on a connection of the client's pool; a connection that fails is dropped."""
        pool = self.client().connection_pool
        packed = b"".join([b"*%d\r\n" % (3 + len(ids)), self._xack_head, *map(_bulk, ids)])
        conn: Any = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(packed, check_health=False)
            await conn.read_response()
        except ResponseError:
            raise  # an error reply (NOPERM, ...): the connection itself is fine
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)

    async def lag(self) -> tuple[int | None, int | None]:
        """The group's `lag` (entries not yet delivered to any consumer) and `pending` (delivered, not
        acknowledged), from `XINFO GROUPS`; None when Redis does not say."""
        for group in await self.client().xinfo_groups(self.key):
            name = group.get("name")
            if name in (self.group, self.group.encode()):
                lag = group.get("lag")
                pending = group.get("pending")
                return (int(lag) if lag is not None else None, int(pending) if pending is not None else None)
        return None, None

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()


def _entries(reply: Any) -> list[Any]:
    """The `[id, fields]` entries of a raw XREADGROUP reply: `{key: [[id, fields], ...]}` (RESP3, redis-py's
    default) or `[[key, [[id, fields], ...]]]` (RESP2)."""
    if not reply:
        return []
    per_key: list[Any] = list(reply.values()) if isinstance(reply, dict) else [e for _, e in reply]
    if len(per_key) == 1:  # one key: the list as it is
        only: list[Any] = per_key[0]
        return only
    return [e for entries in per_key for e in entries]


def _data_field(fields: Any) -> bytes | None:
    """The `data` field of an entry's flat field list (None: deleted or without it)."""
    if not fields:
        return None
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == DATA_FIELD:
            value: bytes = fields[i + 1]
            return value
    return None


def _id_order(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def _as_is(response: Any, **_: Any) -> Any:
    return response


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)
