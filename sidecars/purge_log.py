"""The purge broadcaster's purge log: purges a target missed, kept in Redis until that target takes them.

Layout (prefix `--redis-prefix`, default `meshkit:purge-log`):
- `<prefix>:targets`: a set of the targets that have pending purges;
- `<prefix>:pending:<HOST:PORT>`: a list, oldest first, of JSON entries
  `{"id", "at" (unix seconds), "purge": {"path", "purge_all", "keys"}}`, at most `max_pending`
  (`--max-pending`, 10,000) per target: one more and the list is replaced, atomically, by a single
  purge of everything (`"collapsed": true`), which covers every purge it held; a target that stays
  unreachable for days (or refuses with 403 for ever) cannot grow Redis without bound;
- `<prefix>:departed`: a hash, target -> unix seconds it left the set (see below).
Redis keeps them across a broadcaster restart (and several broadcasters may share one log: an entry is
removed only by the one that saw it at the head, by its id, atomically).

`Replayer` is the background loop: every `interval` seconds each current target (the broadcaster's
`TargetSet`, which changes under it with dns:/k8s: sources) with pending purges is sent its oldest one
(one attempt); on a 200 it is removed and the next one follows at once; on anything else the target
waits for the next round. A 400 (the target's VCL refuses it; cannot change) is dropped with a log line
rather than blocking everything behind it, and so is an entry that is not a valid purge (bad JSON, or a
path or key `Purge` refuses: the log is shared and may be written by anything that reaches Redis) —
never sent, since its path would go into the request line as it is.

A target that left the set (a pod that went unready, was deleted, a name that stopped resolving to it)
is "departed" (kept in `<prefix>:departed` too, synced each replay round: a broadcaster restarted
while a pod was away still knows it, and broadcasters sharing the log share their departures): its
pending purges stay for `keep` seconds, and the broadcaster keeps queueing new purges for it
meanwhile, because a pod that was only unready comes back with its cache and must not serve what was
purged while it was away; if it comes back in time it gets them all replayed. After `keep` seconds
its list is dropped (`meshkit_purge_replays_total{result="expired"}` counts the entries): a pod that
stayed gone took its cache with it, and a new pod on the same address starts empty. Pending entries
of a target the broadcaster never saw in its set (from before a restart, or one removed from
`--targets`) count as departed from the first round on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge

from meshkit.errors import DependencyError
from meshkit.sidecars.purge_fanout import BadPurge, Purge, PurgeClient, RetryPolicy, deliver

log = logging.getLogger("meshkit.purge_log")

# Remove the head entry only if it is still the one replayed (another broadcaster may have taken it),
# and forget the target once its list is empty.
_POP_HEAD = """
if redis.call('LINDEX', KEYS[1], 0) == ARGV[1] then redis.call('LPOP', KEYS[1]) end
if redis.call('LLEN', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[2]) end
return redis.call('LLEN', KEYS[1])
"""


# Append an entry; past `cap` entries the whole list becomes one purge of everything (which covers
# every purge in it): a target that stays unreachable, or refuses with 403 for ever, costs at most
# `cap` entries. Returns the list's length, -1 when it was collapsed.
_APPEND = """
local n = redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
if n > tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[1])
  redis.call('RPUSH', KEYS[1], ARGV[4])
  return -1
end
return n
"""

MAX_PENDING = 10_000  # entries per target before they collapse into one X-Purge-All (~1.5 MB)


class PurgeLog:
    def __init__(self, url: str, prefix: str = "meshkit:purge-log", max_pending: int = MAX_PENDING) -> None:
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=2.0
        )
        self._prefix = prefix
        self._max_pending = max_pending
        self._pop = self._redis.register_script(_POP_HEAD)
        self._append = self._redis.register_script(_APPEND)
        self.collapsed = 0  # lists collapsed into one purge of everything (by this process)

    @property
    def _targets_key(self) -> str:
        return f"{self._prefix}:targets"

    @property
    def _departed_key(self) -> str:
        return f"{self._prefix}:departed"

    def _list_key(self, target: str) -> str:
        return f"{self._prefix}:pending:{target}"

    async def start(self) -> None:
        try:
            await self._redis.ping()
        except (aioredis.RedisError, OSError) as exc:
            raise DependencyError("redis", f"the purge log (--redis) is unreachable: {exc}") from None

    async def close(self) -> None:
        await self._redis.aclose()

    async def append(self, target: str, purge: Purge) -> None:
        """Queue `purge` for `target`; over `max_pending` entries the list collapses (see `_APPEND`)."""
        everything = _entry(Purge("/", purge_all=True), collapsed=True)
        found = await self._append(
            keys=[self._list_key(target), self._targets_key],
            args=[_entry(purge), target, self._max_pending, everything],
        )
        if int(found) < 0:
            self.collapsed += 1
            log.warning(
                "purge log: over %d purges pending for %s: replaced by one purge of everything",
                self._max_pending,
                target,
            )

    async def targets(self) -> list[str]:
        members = await self._redis.smembers(self._targets_key)
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    async def head(self, target: str) -> tuple[bytes | str, Purge | BadPurge] | None:
        """`target`'s oldest entry as stored, and its purge (or why it is not one: see `Replayer`)."""
        raw = await self._redis.lindex(self._list_key(target), 0)
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
            return raw, Purge.from_json(doc["purge"] if isinstance(doc, dict) else doc)
        except BadPurge as exc:
            return raw, exc
        except (ValueError, KeyError) as exc:
            return raw, BadPurge(f"not a purge log entry: {type(exc).__name__}: {exc}"[:200])

    async def pop(self, target: str, raw: bytes | str) -> int:
        """Remove `raw` if it is still `target`'s oldest entry; what is left."""
        left = await self._pop(keys=[self._list_key(target), self._targets_key], args=[raw, target])
        return int(left)

    async def drop(self, target: str) -> int:
        """Forget every pending purge of `target`; how many there were."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.llen(self._list_key(target))
            pipe.delete(self._list_key(target))
            pipe.srem(self._targets_key, target)
            dropped, _, _ = await pipe.execute()
        return int(dropped)

    async def count(self) -> int:
        """How many entries are pending, every target together (LLEN each: nothing read or parsed)."""
        targets = await self.targets()
        if not targets:
            return 0
        async with self._redis.pipeline(transaction=False) as pipe:
            for target in targets:
                pipe.llen(self._list_key(target))
            return sum(int(n) for n in await pipe.execute())

    async def departed(self) -> dict[str, float]:
        """The departures the log holds: target -> when it left (unix seconds)."""
        found = await self._redis.hgetall(self._departed_key)
        return {_text(k): float(v) for k, v in found.items()}

    async def save_departed(self, left: dict[str, float], drop: Collection[str]) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            if left:
                pipe.hset(self._departed_key, mapping={t: round(at, 3) for t, at in left.items()})
            if drop:
                pipe.hdel(self._departed_key, *drop)
            await pipe.execute()

    async def pending(self) -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = {}
        for target in await self.targets():
            entries = await self._redis.lrange(self._list_key(target), 0, -1)
            if entries:
                found[target] = [_shown(e) for e in entries]
        return found


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry(purge: Purge, *, collapsed: bool = False) -> str:
    doc = {"id": uuid.uuid4().hex, "at": round(time.time(), 3), "purge": json.loads(purge.to_json())}
    if collapsed:
        doc["collapsed"] = True
    return json.dumps(doc)


def _shown(raw: bytes | str) -> dict[str, Any]:
    """An entry for `GET /purges`; one that is not a JSON object is shown as `{"invalid": <its start>}`
    (the replayer drops it)."""
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        return doc
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return {"invalid": text[:200]}


@dataclass
class ReplayMetrics:
    replays: Counter
    pending: Gauge
    errors: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> ReplayMetrics:
        return cls(
            Counter(
                "meshkit_purge_replays",
                "Pending purges replayed to a target, by result (ok, failed, dropped; expired: a "
                "departed target's entries, dropped after --departed-keep)",
                ["target", "result"],
                registry=registry,
            ),
            Gauge(
                "meshkit_purge_pending",
                "Purges pending in the purge log (last replay round)",
                registry=registry,
            ),
            Counter(
                "meshkit_purge_log_errors", "Purge log (Redis) operations that failed", registry=registry
            ),
        )

    def forget(self, target: str) -> None:
        """Remove `target`'s series (a target forgotten by `Departures`)."""
        for result in REPLAY_RESULTS:
            remove_series(self.replays, target, result)


REPLAY_RESULTS = ("ok", "failed", "dropped", "expired")
STOP_DEADLINE = 3.0  # seconds Replayer.stop waits for the loop (a Redis call under way: its 2 s timeout)


def remove_series(counter: Counter, *labels: str) -> None:
    """Remove one labelled series of `counter` if it exists."""
    with contextlib.suppress(KeyError):
        counter.remove(*labels)


class Departures:
    """When each target that left the set left it (monotonic seconds); fed by the set's changes.

    Bounded whatever the churn (a Service whose pods come and go for months): a target away for longer
    than `keep` is forgotten once nothing is pending for it (`prune`, each replay round; `forget` once
    its entries expired), and `forgotten(target)` is called `keep` seconds after that: the broadcaster
    removes the target's metric series then (a last scrape still sees an `expired` count)."""

    def __init__(self, keep: float, forgotten: Callable[[str], None] = lambda target: None) -> None:
        self.keep = keep
        self._left: dict[str, float] = {}
        self._known: set[str] = set()
        self._gone: dict[str, float] = {}  # forgotten, series still shown until keep after this
        self._forgotten = forgotten

    def update(self, current: Collection[str]) -> None:
        now = time.monotonic()
        for target in self._known - set(current):
            self._left.setdefault(target, now)
        for target in current:
            self._left.pop(target, None)
            self._gone.pop(target, None)
        self._known = set(current)

    def seen_away(self, target: str) -> None:
        """A target with pending purges that is not in the set: departed now if not already."""
        self._left.setdefault(target, time.monotonic())

    def away(self) -> list[str]:
        """Departed targets still within `keep`: new purges are queued for them."""
        now = time.monotonic()
        return sorted(t for t, left in self._left.items() if now - left <= self.keep)

    def expired(self, target: str) -> bool:
        left = self._left.get(target)
        return left is not None and time.monotonic() - left > self.keep

    def adopt(self, target: str, left_at: float) -> None:
        """A departure the purge log holds (`left_at`: unix seconds), from before a restart or from
        another broadcaster: taken unless this one knows better (the target is in its set, or it
        already saw it leave)."""
        if target not in self._known and target not in self._left and target not in self._gone:
            self._left[target] = time.monotonic() - max(0.0, time.time() - left_at)

    def departed(self) -> dict[str, float]:
        """Every departure held, as unix seconds (for the purge log)."""
        now, wall = time.monotonic(), time.time()
        return {t: wall - (now - left) for t, left in self._left.items()}

    def forget(self, target: str) -> None:
        if self._left.pop(target, None) is not None:
            self._gone.setdefault(target, time.monotonic())

    def prune(self, pending: Collection[str]) -> None:
        """Forget the targets away longer than `keep` with nothing in `pending` (the targets that have
        entries); call `forgotten` for those forgotten over `keep` ago."""
        now = time.monotonic()
        for target in [t for t, left in self._left.items() if now - left > self.keep and t not in pending]:
            self.forget(target)
        for target in [t for t, at in self._gone.items() if now - at > self.keep]:
            del self._gone[target]
            self._forgotten(target)

    def remembered(self) -> int:
        """How many targets this holds anything for (the bound the tests check)."""
        return len(self._left) + len(self._gone)


class Replayer:
    """The loop that replays pending purges to the current `targets()`, and expires departed ones."""

    def __init__(
        self,
        purge_log: PurgeLog,
        targets: Callable[[], Collection[str]],
        session: Callable[[], PurgeClient],
        policy: RetryPolicy,
        interval: float,
        metrics: ReplayMetrics,
        departures: Departures | None = None,
    ) -> None:
        self._log, self._targets, self._session = purge_log, targets, session
        self._policy = RetryPolicy(attempts=1, timeout=policy.timeout, backoff=0.0)  # the next round retries
        self._interval, self._metrics = interval, metrics
        self._departures = departures
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="purge-log-replay")

    async def stop(self, deadline: float = STOP_DEADLINE) -> None:
        """Cancel the loop and wait for it, at most `deadline` seconds. redis-py can turn a cancellation
        that lands as its socket timeout fires into a TimeoutError it then retries: the round goes on
        as if nothing happened, so the loop also checks `_stopping` between rounds."""
        if self._task is None:
            return
        self._stopping = True
        self._task.cancel()
        done, _ = await asyncio.wait({self._task}, timeout=deadline)
        if not done:
            log.warning("purge log: the replay loop did not stop within %g s: abandoned", deadline)

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.replay_round()
            except Exception as exc:  # Redis down: try again next round
                self._metrics.errors.inc()
                log.warning("purge log: replay round failed: %r", exc)
            if self._stopping:
                return
            await asyncio.sleep(self._interval)

    async def replay_round(self) -> None:
        current = set(self._targets())
        if self._departures is not None:
            await self._share_departures(current)
        logged = await self._log.targets()
        await asyncio.gather(*(self._replay(t) for t in logged if t in current))
        if self._departures is not None:
            for target in (t for t in logged if t not in current):
                self._departures.seen_away(target)
                if self._departures.expired(target):
                    dropped = await self._log.drop(target)
                    self._departures.forget(target)
                    self._metrics.replays.labels(target, "expired").inc(dropped)
                    log.info(
                        "purge log: %s departed over %g s ago: %d pending dropped",
                        target,
                        self._departures.keep,
                        dropped,
                    )
            self._departures.prune(await self._log.targets())
        self._metrics.pending.set(await self._log.count())

    async def _share_departures(self, current: set[str]) -> None:
        """Departures live in the purge log too: a broadcaster restarted while a pod was away (with
        nothing pending for it yet) still queues new purges for it."""
        assert self._departures is not None
        stored = await self._log.departed()
        for target, left_at in stored.items():
            if target not in current:
                self._departures.adopt(target, left_at)
        mine = self._departures.departed()
        await self._log.save_departed(mine, [t for t in stored if t not in mine])

    async def _replay(self, target: str) -> None:
        while (head := await self._log.head(target)) is not None:
            raw, purge = head
            if isinstance(purge, BadPurge):  # never sent: it would reach the request line as it is
                self._metrics.replays.labels(target, "dropped").inc()
                await self._log.pop(target, raw)
                log.error("purge log: an entry for %s is not a valid purge (%s): dropped", target, purge)
                continue
            delivery = await deliver(self._session(), target, purge, self._policy)
            if delivery.ok or delivery.status == 400:
                result = "ok" if delivery.ok else "dropped"
                if not delivery.ok:
                    log.error("purge log: %s refused %s (%s): dropped", target, purge, delivery.error)
                self._metrics.replays.labels(target, result).inc()
                left = await self._log.pop(target, raw)
                log.info("purge log: replayed %s to %s (%s), %d left", purge.path, target, result, left)
                continue
            self._metrics.replays.labels(target, "failed").inc()
            return
