"""Rate limits per subject that hold across replicas: GCRA (see `gcra.py` for the semantics) in Redis.

One check is one atomic round trip: `EVALSHA` of a Lua script that reads Redis' own clock (`TIME`: one
clock for every replica, so no skew between pods), moves the subject's TAT, stores it with an expiry
(an idle subject's key vanishes after a minute) and answers `allowed, remaining, reset, retry`. A
Redis that forgot the script (restarted, `SCRIPT FLUSH`) answers NOSCRIPT and the same request is sent
once more as `EVAL`, which loads it again.

Keys: `key_prefix` + `s:` + the subject percent-encoded (UTF-8; everything but `A-Za-z0-9._-@` is
escaped, `%` included, so the encoding is one-to-one and never contains `:`), or, when that is longer
than 200 characters, `key_prefix` + `h:` + the SHA-256 of the subject. No two subjects share a key.

When Redis cannot be reached (connection refused or reset, no answer within `redis_timeout`, an error
reply other than NOSCRIPT), the limiter marks it down at once and decides by `on_redis_down`:

- `local` (the default): each replica enforces its share, `max(1, per_minute // replicas)`, in memory
  with the same GCRA (`source="local"`; `limit` is then the share);
- `open`: every request is allowed (`source="open"`);
- `closed`: `check` raises `DependencyError("redis", ...)`: the chain answers 503.

While it is down no request waits on it: a background probe (connect, `PING`, `SCRIPT LOAD`, the script
on the key `key_prefix` + `probe`) runs every
`probe_interval` seconds and, once it succeeds, requests use Redis again. An outage lasts at least one
probe interval (so a flapping Redis logs at most two lines per interval): one line when it starts and
one when it ends, with its duration and how many requests were decided without Redis. Redis down at
`start()` is not fatal: the limiter starts down and probes. With `redis_url=None` the limiter is
local only (a single replica without Redis).

The Redis client is a minimal asyncio RESP2 client for this one script (one connection, commands
pipelined and written together once per loop turn, replies matched in order, a deadline on every
command; any failure closes the connection and the probe opens a new one). Measured here (2 shared cores,
asyncio loop, CPU of this process, kernel time included, 3,000 checks a run): redis-py 8.1's asyncio
`evalsha` 80-165 µs per call one at a time and 73-110 µs with 16 in flight; `check()` with this
client 21-25 µs one at a time on a quiet machine (60-70 µs while others loaded it, in the same runs
as redis-py's 143-165) and 8-19 µs with 16 in flight (one write per loop turn).

Metrics (`collectors()`; plain ints on the request path, turned into families on scrape):

    meshkit_ratelimit_checks_total{source, result}   source: redis | local | open | closed,
                                                     result: allowed | limited | unavailable
    meshkit_ratelimit_redis_outages_total            outages begun (Redis down at start counts as one)
    meshkit_ratelimit_redis_up                       1 while checks go to Redis, else 0
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qs, quote, unquote, urlsplit

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshkit.errors import ConfigError, DependencyError
from meshkit.extproc.auth.gcra import Decision, LocalLimiter, check_per_minute, share

__all__ = ["MODES", "Decision", "RateLimiter", "RedisTarget", "RedisUnavailable", "RespError", "subject_key"]

log = logging.getLogger("meshkit.auth.rate_limit")

MODES = ("local", "open", "closed")

# KEYS[1]: the subject's key; ARGV[1]: requests per minute. Times in microseconds (Redis' TIME).
# Returns {allowed 0|1, remaining, reset_after µs, retry_after µs}.
# A stored TAT is only believed between now and a minute ahead (what the script itself stores):
# anything else (no key, a key of another type, `inf`, `nan`, text, a TAT far ahead after Redis'
# clock was set back) counts as idle, and the SET that follows overwrites it. Without that one such
# key made every check of its subject an error reply (the limiter then marked all of Redis down) or
# refused the subject until the key expired, with a negative Retry-After.
SCRIPT = b"""\
local per_minute = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = math.floor(60000000 / per_minute)
local window = interval * per_minute
local tat = redis.pcall('GET', KEYS[1])
tat = type(tat) == 'string' and tonumber(tat)
if not tat or not (tat >= now and tat <= now + 60000000) then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - window
if now < allow_at then
  return {0, 0, math.ceil(tat - now), math.ceil(allow_at - now)}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
local remaining = math.floor((now - allow_at) / interval)
if remaining > per_minute - 1 then remaining = per_minute - 1 end
return {1, remaining, math.ceil(new_tat - now), 0}
"""
SCRIPT_SHA = hashlib.sha1(SCRIPT, usedforsecurity=False).hexdigest().encode()

_KEY_SAFE = "._-@"
_MAX_ESCAPED = 200


def subject_key(prefix: str, subject: str) -> bytes:
    """The Redis key of `subject`'s TAT: one-to-one for short subjects, SHA-256 for long ones."""
    raw = subject.encode("utf-8", "surrogatepass")
    escaped = quote(raw, safe=_KEY_SAFE)
    if len(escaped) <= _MAX_ESCAPED:
        return f"{prefix}s:{escaped}".encode()
    return f"{prefix}h:{hashlib.sha256(raw).hexdigest()}".encode()


# -- a minimal RESP2 client ---------------------------------------------------------------------------


class RedisUnavailable(Exception):
    """No answer from Redis: refused, reset, closed, or past the deadline."""


class RespError(Exception):
    """An error reply (`-ERR ...`, `-NOSCRIPT ...`)."""


def command(*args: bytes) -> bytes:
    """`args` as one RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


def parse(buf: bytes | bytearray, pos: int = 0) -> tuple[Any, int] | None:
    """One RESP2 reply from `buf` at `pos`: (value, position after it), or None when it is not all
    there yet. Integers are ints, simple and bulk strings bytes, a nil None, arrays lists, and an error
    reply a `RespError` (returned, not raised)."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None
    kind = buf[pos]
    if kind == 0x3A:  # ':'
        return int(buf[pos + 1 : end]), end + 2
    if kind == 0x24:  # '$'
        size = int(buf[pos + 1 : end])
        if size < 0:
            return None, end + 2
        stop = end + 2 + size
        if len(buf) < stop + 2:
            return None
        return bytes(buf[end + 2 : stop]), stop + 2
    if kind == 0x2A:  # '*'
        count = int(buf[pos + 1 : end])
        if count < 0:
            return None, end + 2
        items: list[Any] = []
        at = end + 2
        for _ in range(count):
            item = parse(buf, at)
            if item is None:
                return None
            items.append(item[0])
            at = item[1]
        return items, at
    if kind == 0x2B:  # '+'
        return bytes(buf[pos + 1 : end]), end + 2
    if kind == 0x2D:  # '-'
        return RespError(bytes(buf[pos + 1 : end]).decode(errors="replace")), end + 2
    raise RedisUnavailable(f"not a RESP reply: {bytes(buf[pos : pos + 16])!r}")


@dataclass(frozen=True)
class RedisTarget:
    """Where a Redis URL points. `parse` takes `redis://[[user]:password@]host[:port][/db]`,
    `rediss://...` (TLS) and `unix:///path/to/redis.sock`, with `?db=`, `?password=` and `?username=`
    as redis-py reads them (other query keys are redis-py's client options: ignored here)."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a unix socket
    tls: bool = False
    username: str = "default"
    password: str | None = field(default=None, repr=False)
    db: int = 0

    @classmethod
    def parse(cls, url: str) -> RedisTarget:
        """ValueError, never naming the password, for a URL that cannot be right."""
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError as exc:  # a bad port or a bracketed host that is not an IPv6 address
            raise ValueError(f"not a valid Redis URL ({exc})") from None
        scheme = parts.scheme.lower()
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"unsupported Redis URL scheme {parts.scheme!r}: expected redis://host:port/db, "
                "rediss:// (TLS) or unix:///path/to/socket"
            )
        query = parse_qs(parts.query)

        def one(name: str) -> str | None:
            values = query.get(name)
            return values[-1] if values else None

        db_text = one("db") if scheme == "unix" else (one("db") or parts.path.strip("/"))
        db = 0
        if db_text:
            if not db_text.isdigit() or not db_text.isascii():
                raise ValueError(
                    f"the Redis database must be a number (redis://host:port/0), not {db_text!r}"
                )
            db = int(db_text)
        password = unquote(parts.password) if parts.password is not None else one("password")
        username = (unquote(parts.username) if parts.username else None) or one("username") or "default"
        if scheme == "unix":
            if not parts.path:
                raise ValueError("a unix:// Redis URL needs the socket's path: unix:///path/to/redis.sock")
            return cls(path=parts.path, username=username, password=password, db=db)
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=port or 6379,
            tls=scheme == "rediss",
            username=username,
            password=password,
            db=db,
        )


class RespConnection(asyncio.Protocol):
    """One connection: `request(payload)` queues a command and returns a future of its reply. Commands
    queued in one loop turn are written together; replies resolve futures in order. A command without
    an answer after `timeout` seconds fails the connection: every pending future gets RedisUnavailable
    and `closed` is set (a connection is never reused after a fault)."""

    def __init__(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._inbox = bytearray()
        self._outbox: list[bytes] = []
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self.closed = False
        self.fault: str | None = None
        self.on_fail: Callable[[str], None] | None = None  # called once, when the connection fails

    @classmethod
    async def open(cls, url: str | RedisTarget, deadline: float) -> RespConnection:
        """Connect to a Redis URL (see `RedisTarget.parse`), authenticate and select the database,
        each step within `deadline` seconds."""
        target = url if isinstance(url, RedisTarget) else RedisTarget.parse(url)
        loop = asyncio.get_running_loop()
        conn = cls(deadline)
        try:
            async with asyncio.timeout(deadline):
                if target.path is not None:
                    await loop.create_unix_connection(lambda: conn, target.path)
                else:
                    context = ssl.create_default_context() if target.tls else None
                    await loop.create_connection(lambda: conn, target.host, target.port, ssl=context)
        except (OSError, TimeoutError) as exc:
            raise RedisUnavailable(f"connect: {exc or type(exc).__name__}") from exc
        try:
            if target.password is not None:
                await conn.call(b"AUTH", target.username.encode(), target.password.encode())
            if target.db:
                await conn.call(b"SELECT", b"%d" % target.db)
        except BaseException:
            conn.close()
            raise
        return conn

    # -- asyncio.Protocol --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        inbox = self._inbox
        inbox += data
        pending = self._pending
        pos = 0
        try:
            while pos < len(inbox):
                item = parse(inbox, pos)
                if item is None:
                    break
                if not pending:
                    raise RedisUnavailable("a reply nobody asked for")
                fut = pending.popleft()[0]
                value, pos = item
                if not fut.done():
                    if isinstance(value, RespError):
                        fut.set_exception(value)
                    else:
                        fut.set_result(value)
        except (RedisUnavailable, ValueError) as exc:
            self._fail(f"protocol: {exc}")
            return
        del inbox[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost: {exc}" if exc else "connection closed by Redis")

    # -- requests ------------------------------------------------------------------------------------
    def request(self, payload: bytes) -> asyncio.Future[Any]:
        """Queue one encoded command; the future resolves to its reply (RespError and RedisUnavailable
        as exceptions)."""
        if self.closed:
            raise RedisUnavailable(self.fault or "closed")
        loop = self._loop
        fut = loop.create_future()
        deadline = loop.time() + self._timeout
        if self._pending or self._flush_scheduled or self._transport is None:
            # Others are in flight: gather what this loop turn sends into one write.
            self._outbox.append(payload)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                loop.call_soon(self._flush)
        else:
            self._transport.write(payload)
        self._pending.append((fut, deadline))
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._check_deadline)
        return fut

    async def call(self, *args: bytes) -> Any:
        return await self.request(command(*args))

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._transport is None or self.closed or not self._outbox:
            return
        out = self._outbox
        self._outbox = []
        self._transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _check_deadline(self) -> None:
        # One timer at a time, at the oldest pending command's deadline (replies come in order, so
        # it is always the first to be overdue).
        self._timer = None
        if self.closed or not self._pending:
            return
        deadline = self._pending[0][1]
        if deadline <= self._loop.time():
            self._fail(f"no answer within {self._timeout:g} s")
        else:
            self._timer = self._loop.call_at(deadline, self._check_deadline)

    def _fail(self, reason: str) -> None:
        first = not self.closed
        if first:
            self.closed = True
            self.fault = reason
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._outbox.clear()
        while self._pending:
            fut = self._pending.popleft()[0]
            if not fut.done():
                fut.set_exception(RedisUnavailable(reason))
        if self._transport is not None:
            self._transport.abort()
        if first and self.on_fail is not None:
            self.on_fail(reason)

    def close(self) -> None:
        self._fail("closed")


# -- the limiter --------------------------------------------------------------------------------------

_RESULTS = ("allowed", "limited")


class RateLimiter:
    """Per-subject rate limits: GCRA in Redis, shared by every replica; by `on_redis_down` when Redis
    is unreachable (see the module docstring). All methods run on one event loop."""

    def __init__(
        self,
        redis_url: str | None,
        *,
        on_redis_down: str = "local",
        replicas: int = 1,
        key_prefix: str = "meshkit:rl:",
        redis_timeout: float = 0.1,
        probe_interval: float = 1.0,
        local_max_subjects: int = 100_000,
    ) -> None:
        if on_redis_down not in MODES:
            raise ValueError(f"on_redis_down must be one of {', '.join(MODES)}, not {on_redis_down!r}")
        if replicas < 1:
            raise ValueError("replicas must be 1 or more")
        if redis_timeout <= 0 or probe_interval <= 0:
            raise ValueError("redis_timeout and probe_interval must be positive")
        self.redis_url = redis_url
        # A URL that cannot be right is a ConfigError from start() (the daemon's "invalid
        # configuration", exit 2), not a ValueError traceback nor SELECT garbage taken for an outage.
        self._target: RedisTarget | None = None
        self._bad_url: str | None = None
        if redis_url is not None:
            try:
                self._target = RedisTarget.parse(redis_url)
            except ValueError as exc:
                self._bad_url = f"--redis: {exc}"
        self.on_redis_down = on_redis_down if redis_url is not None else "local"
        self.replicas = replicas
        self.key_prefix = key_prefix
        self.redis_timeout = redis_timeout
        self.probe_interval = probe_interval
        self.local = LocalLimiter(local_max_subjects)
        self._conn: RespConnection | None = None
        self._up = False
        self._down_since: float | None = None
        self._decided_without = 0
        self._went_down: asyncio.Event | None = None
        self._probe: asyncio.Task[None] | None = None
        self._keys: dict[str, bytes] = {}
        self._evalsha = b"*5\r\n$7\r\nEVALSHA\r\n$40\r\n" + SCRIPT_SHA + b"\r\n$1\r\n1\r\n"
        self._eval = b"*5\r\n$4\r\nEVAL\r\n$%d\r\n%s\r\n$1\r\n1\r\n" % (len(SCRIPT), SCRIPT)
        self.checks: dict[tuple[str, str], int] = {}
        self.outages = 0

    @property
    def redis_up(self) -> bool:
        return self._up

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect and load the script. Redis down now is not fatal: the limiter starts down (one
        outage) and the probe connects once Redis answers."""
        if self._bad_url is not None:
            raise ConfigError([self._bad_url])
        if self.redis_url is None or self._probe is not None:
            return
        self._went_down = asyncio.Event()
        try:
            self._use(await self._connect())
        except (RedisUnavailable, RespError) as exc:
            self._down_since = time.monotonic()
            self._decided_without = 0
            self.outages += 1
            self._went_down.set()
            log.warning(
                "rate limits: Redis unreachable at start (%s); deciding %s until it answers",
                exc,
                self._mode_text(),
                extra={"dependency": "redis"},
            )
        self._probe = asyncio.create_task(self._probe_loop(), name="meshkit-ratelimit-probe")

    async def close(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
        conn, self._conn = self._conn, None
        self._up = False
        if conn is not None:
            conn.on_fail = None
            conn.close()

    async def _connect(self) -> RespConnection:
        assert self._target is not None
        conn = await RespConnection.open(self._target, self.redis_timeout)
        try:
            if await conn.call(b"PING") != b"PONG":
                raise RedisUnavailable("PING not answered PONG")
            sha = await conn.call(b"SCRIPT", b"LOAD", SCRIPT)
            if sha != SCRIPT_SHA:
                raise RedisUnavailable(f"SCRIPT LOAD answered {sha!r}")
            # The script itself, on a key of its own (60,000,000/min: it lives 1 ms): a Redis that
            # answers PING but refuses writes (a read-only replica, maxmemory reached with noeviction,
            # an ACL without the prefix) fails here, not on the first request after every probe.
            await conn.call(b"EVALSHA", SCRIPT_SHA, b"1", self.key_prefix.encode() + b"probe", b"60000000")
        except BaseException:
            conn.close()
            raise
        return conn

    async def _probe_loop(self) -> None:
        assert self._went_down is not None
        while True:
            await self._went_down.wait()
            await asyncio.sleep(self.probe_interval)
            try:
                conn = await self._connect()
            except (RedisUnavailable, RespError) as exc:
                log.debug("rate limits: Redis probe failed: %s", exc)
                continue
            self._use(conn)
            self._came_back()

    def _use(self, conn: RespConnection) -> None:
        def failed(reason: str) -> None:
            if self._conn is conn:
                self._went_away(reason)

        conn.on_fail = failed
        self._conn = conn
        self._up = True

    def _came_back(self) -> None:
        assert self._went_down is not None
        self._went_down.clear()
        since = self._down_since
        duration = time.monotonic() - since if since is not None else 0.0
        log.info(
            "rate limits: Redis is back after %.1f s; %d requests were decided without it (%s)",
            duration,
            self._decided_without,
            self._mode_text(),
            extra={
                "dependency": "redis",
                "outage_seconds": round(duration, 3),
                "decided_without_redis": self._decided_without,
            },
        )
        self._down_since = None
        self._decided_without = 0
        self.local.clear()  # a replica's share during the outage; Redis holds the truth again

    def _went_away(self, reason: str) -> None:
        if not self._up:
            return
        self._up = False
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        self._down_since = time.monotonic()
        self._decided_without = 0
        self.outages += 1
        assert self._went_down is not None
        self._went_down.set()
        log.warning(
            "rate limits: Redis unreachable (%s); deciding %s until it answers",
            reason,
            self._mode_text(),
            extra={"dependency": "redis"},
        )

    def _mode_text(self) -> str:
        if self.on_redis_down == "local":
            return f"locally, each of {self.replicas} replica(s) enforcing its share"
        if self.on_redis_down == "open":
            return "open (every request allowed)"
        return "closed (503)"

    # -- the request path ------------------------------------------------------------------------------
    async def check(self, subject: str, per_minute: int) -> Decision:
        """Decide one request of `subject`, allowed `per_minute` requests per minute."""
        check_per_minute(per_minute)
        conn = self._conn
        if self._up and conn is not None:
            key = self._keys.get(subject)
            if key is None:
                if len(self._keys) >= 65_536:
                    self._keys.clear()
                key = self._keys[subject] = subject_key(self.key_prefix, subject)
            arg = b"%d" % per_minute
            tail = b"$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key), key, len(arg), arg)
            try:
                try:
                    reply = await conn.request(self._evalsha + tail)
                except RespError as exc:
                    if not str(exc).startswith("NOSCRIPT"):
                        raise
                    reply = await conn.request(self._eval + tail)
                allowed = reply[0] == 1
                decision = Decision(
                    allowed,
                    per_minute,
                    reply[1],
                    reply[2] / 1e6,
                    reply[3] / 1e6 if not allowed else 0.0,
                    "redis",
                )
            except RedisUnavailable as exc:
                self._went_away(str(exc))
            except (RespError, TypeError, IndexError) as exc:
                self._went_away(f"unexpected reply: {exc}")
            else:
                self._count("redis", _RESULTS[not allowed])
                return decision
        return self._without_redis(subject, per_minute)

    def _without_redis(self, subject: str, per_minute: int) -> Decision:
        if self.redis_url is not None:
            self._decided_without += 1
        mode = self.on_redis_down
        if mode == "local":
            decision = self.local.check(subject, share(per_minute, self.replicas))
            self._count("local", _RESULTS[not decision.allowed])
            return decision
        if mode == "open":
            self._count("open", "allowed")
            return Decision(True, per_minute, per_minute, 0.0, 0.0, "open")
        self._count("closed", "unavailable")
        raise DependencyError("redis", "the rate-limit store (Redis) is unreachable", retry_after=1)

    def _count(self, source: str, result: str) -> None:
        key = (source, result)
        self.checks[key] = self.checks.get(key, 0) + 1

    # -- metrics ---------------------------------------------------------------------------------------
    def collectors(self) -> Iterable[Collector]:
        """One collector, not registered anywhere (`registry=None`): the daemon registers it."""
        return (_Collector(self),)


class _Collector(Collector):
    def __init__(self, limiter: RateLimiter) -> None:
        self._limiter = limiter

    def collect(self) -> Iterator[Metric]:
        limiter = self._limiter
        checks = CounterMetricFamily(
            "meshkit_ratelimit_checks",
            "Rate-limit checks by who decided and how",
            labels=["source", "result"],
        )
        for (source, result), count in sorted(limiter.checks.items()):
            checks.add_metric([source, result], count)
        yield checks
        if limiter.redis_url is None:
            return
        yield CounterMetricFamily(
            "meshkit_ratelimit_redis_outages", "Times Redis became unreachable", value=limiter.outages
        )
        yield GaugeMetricFamily(
            "meshkit_ratelimit_redis_up",
            "1 while rate limits are decided in Redis",
            value=int(limiter.redis_up),
        )
