"""Auth events on NATS: fire-and-forget, through one bounded queue, never on the request path's clock.

    publisher = EventPublisher("nats://nats:4222", prefix="meshkit")
    await publisher.start()                      # returns within connect_timeout, NATS up or not
    publisher.emit("auth.failure", {"ts": ..., "subject": None, "method": "jwt", "reason": "expired",
                                    "path": "/v1/chat/completions", "client_ip": ..., "request_id": ...})
    await publisher.close()                      # flushes for at most ~1 s, then closes; never hangs

Subjects: `<prefix>.auth.success`, `<prefix>.auth.failure` (the caller's dict as JSON, plus `server`
when the caller did not set one) and `<prefix>.service.health`, a heartbeat every `heartbeat_interval`:
`{ts, server, pid, started_at, uptime_s, version, events_published, events_dropped}` (`ts` and
`started_at` in epoch seconds; the two counters are auth events only). Core NATS publishes: no
JetStream, no acknowledgement, at most once.

How it stays off the request path:

- `emit()` appends to a deque of at most `queue_size` events and wakes the one background task; it
  does no I/O and no JSON (the task serialises). A full queue drops the new event and counts it:
  `reason="disconnected"` when NATS is not connected at that moment, `reason="queue_full"` when it is
  (NATS is slow or a burst outran us), `reason="closed"` after `close()` began.
- While NATS is disconnected (down at start, or lost later) the task publishes nothing: the queue is
  the outage buffer. Up to `queue_size` events wait and go out when the connection comes back (oldest
  first; their `ts` says when they happened); later ones are dropped as `disconnected`. Heartbeats
  are not buffered: one is sent as soon as the connection is (re)established, then every interval.
- nats-py has its own outbound buffer: it is bounded (`pending_size`, 2 MiB) and the task stops
  handing it events above half of that, so a NATS that accepts the TCP connection but does not read
  (a stopped process, a full network path) never makes `publish()` block on a forced flush: the
  events stay in our bounded queue instead. Memory is therefore bounded by `queue_size` events plus
  about 2 MiB plus the kernel's socket buffers.
- Connecting: nats-py's `connect()` is run in a background task with `max_reconnect_attempts=-1`, so
  it retries (every `_RECONNECT_WAIT` s) until a server answers, also one that did not exist when
  `start()` ran; once connected, nats-py reconnects by itself, forever. `start()` waits for the
  first connection for at most `connect_timeout` and otherwise logs one warning and returns.
- Delivery is at most once: an event already handed to nats-py when the link breaks is resent by
  nats-py after the reconnect if it was still in its buffer, and lost if it was already written into
  the dead TCP connection. A frozen server is found stale by client pings within ~15 s.
- `close()`: up to 1 s to publish what is queued (only while connected; the rest counts as `closed`),
  then up to 0.5 s to drain the connection, after which its socket is aborted. nats-py's connect and
  reconnect tasks are cancelled until they stop (see `_cancel`: Python 3.11 can lose a cancel).
- Logs: one line when the connection is lost, one when it comes back; failed attempts in between are
  DEBUG only. The counters are where drops are seen:

    meshkit_auth_events_published_total{kind}       handed to the NATS client (kind: auth.success,
                                                    auth.failure, service.health)
    meshkit_auth_events_dropped_total{reason}       queue_full | disconnected | closed | too_large | error
    meshkit_auth_events_queued                      events waiting in the queue
    meshkit_auth_events_nats_connected              1 while connected to NATS, else 0

`emit()` must be called on the event loop's thread (the one `start()` ran on), like every other part
of the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from nats.aio.client import Client
from nats.errors import ConnectionClosedError, MaxPayloadError, OutboundBufferLimitError
from nats.errors import Error as NatsError
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshkit import __version__
from meshkit.logs import Throttle

__all__ = ["HEALTH", "KINDS", "EventPublisher", "validate_prefix"]

log = logging.getLogger(__name__)

KINDS = ("auth.success", "auth.failure")
HEALTH = "service.health"
DROP_REASONS = ("queue_full", "disconnected", "closed", "too_large", "error")

_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_PENDING_SIZE = 2 * 1024 * 1024  # nats-py's outbound buffer (bytes)
_PENDING_HIGH = _PENDING_SIZE // 2  # above this the task stops handing events to nats-py
_BATCH = 256  # events published before yielding to the loop (nats-py's flusher, the requests)
_BACKPRESSURE_POLL = 0.01  # s: how often a full nats-py buffer is looked at again
_RECONNECT_WAIT = 0.5  # s between connection attempts
_PING_INTERVAL = 5  # s: client pings, so a silent server is found stale within ~15 s
_MAX_OUTSTANDING_PINGS = 2
_CLOSE_FLUSH_SECONDS = 1.0  # close(): time to publish what is queued
_CLOSE_CONNECTION_SECONDS = 0.5  # close(): time to flush and close the connection


def validate_prefix(prefix: str) -> str:
    """`prefix` if it is a literal NATS subject prefix (dot-separated tokens of `[A-Za-z0-9_-]`), else
    ValueError: `*` and `>` are wildcards, `.` separates tokens, and an empty token or a space makes an
    invalid subject."""
    if not isinstance(prefix, str) or not all(_TOKEN.fullmatch(t) for t in prefix.split(".")):
        raise ValueError(
            f"event prefix {prefix!r}: expected dot-separated tokens of letters, digits, '_' and '-' "
            "(such as 'meshkit' or 'prod.gateway'); NATS subjects cannot contain '*', '>', spaces "
            "or empty tokens"
        )
    return prefix


async def _cancel(task: asyncio.Task[Any], within: float = 0.5) -> None:
    """Cancel `task` and wait for it, cancelling again until it is done (at most `within` s).

    On Python 3.11 `asyncio.wait_for` loses a cancellation that arrives just as the awaited call
    finishes (it returns or raises the call's outcome instead). nats-py's connect and reconnect loops
    wait for each TCP connect that way and retry on OSError, so one cancel that lands on a refused
    connection leaves them retrying forever; the next cancel, at their next await, ends them."""
    deadline = time.monotonic() + within
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=min(0.05, max(0.0, deadline - time.monotonic())))
        if time.monotonic() >= deadline:
            break
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: a failure was already logged by _task_done
    elif not task.done():
        log.warning("auth events: background task %s did not stop", task.get_name())


def _abort(nc: Client) -> None:
    """Drop `nc`'s socket now. A server that stopped reading (SIGSTOP, a full network path) never takes
    the bytes nats-py still has to write, so its close() waits forever and the socket would stay open;
    nats-py has no abort, so this reaches the asyncio transport under its TCP transport."""
    transport = getattr(nc, "_transport", None)
    for name in ("_io_writer", "_bare_io_writer"):
        writer = getattr(transport, name, None)
        if isinstance(writer, asyncio.StreamWriter):
            writer.transport.abort()


def _redact_url(url: str) -> str:
    """`url` without a user or password, for log lines."""
    try:
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "<nats url>"


class EventPublisher:
    """Publishes auth events and a heartbeat to NATS without ever making a request wait (module doc)."""

    def __init__(
        self,
        nats_url: str,
        *,
        prefix: str = "meshkit",
        queue_size: int = 10_000,
        heartbeat_interval: float = 5.0,
        server_id: str | None = None,
        connect_timeout: float = 2.0,
    ) -> None:
        validate_prefix(prefix)
        if not nats_url or not nats_url.strip():
            raise ValueError("nats_url: empty")
        if queue_size < 1:
            raise ValueError(f"queue_size {queue_size}: must be at least 1")
        if not heartbeat_interval > 0:
            raise ValueError(f"heartbeat_interval {heartbeat_interval}: must be > 0 seconds")
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout {connect_timeout}: must be > 0 seconds")
        self.prefix = prefix
        self.queue_size = queue_size
        self.heartbeat_interval = float(heartbeat_interval)
        self.connect_timeout = float(connect_timeout)
        self.server_id = server_id or f"{socket.gethostname()}:{os.getpid()}"
        self._servers = [u.strip() for u in nats_url.split(",") if u.strip()]
        self._where = ",".join(_redact_url(u) for u in self._servers)
        self._subjects = {kind: f"{prefix}.{kind}" for kind in (*KINDS, HEALTH)}

        self._queue: deque[tuple[str, dict[str, Any]]] = deque()
        self._wakeup = asyncio.Event()  # an emit, a connection change, close()
        self._first_connect = asyncio.Event()
        self._nc: Client | None = None
        self._connected = False
        self._started = False
        self._closing = False
        self._warned_unreachable = False
        self._started_once = False  # connected at least once: the next connection is "back"
        self._connect_task: asyncio.Task[None] | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._throttle = Throttle(log, interval=30.0)
        self._started_at = time.time()
        self._started_mono = time.monotonic()

        self.published: dict[str, int] = dict.fromkeys((*KINDS, HEALTH), 0)
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)

    # -- the request path ----------------------------------------------------------------------------
    def emit(self, kind: str, event: Mapping[str, Any]) -> None:
        """Queue one auth event (`auth.success` or `auth.failure`); never blocks, never raises on a full
        queue or a NATS that is down: the event is dropped and counted. An unknown kind is a caller bug:
        ValueError."""
        if kind not in KINDS:
            raise ValueError(f"event kind {kind!r}: expected one of {', '.join(KINDS)}")
        if self._closing:
            self.dropped["closed"] += 1
            return
        if len(self._queue) >= self.queue_size:
            self.dropped["queue_full" if self._connected else "disconnected"] += 1
            return
        item = dict(event)
        item.setdefault("server", self.server_id)
        self._queue.append((kind, item))
        self._wakeup.set()

    # -- state ---------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def queued(self) -> int:
        return len(self._queue)

    def subject(self, kind: str) -> str:
        """The NATS subject of `kind` (`auth.success`, `auth.failure`, `service.health`)."""
        return self._subjects[kind]

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start connecting and publishing. Waits for the first connection at most `connect_timeout`;
        without one it logs one warning and keeps connecting in the background. Idempotent."""
        if self._started:
            return
        self._started = True
        self._started_at = time.time()
        self._started_mono = time.monotonic()
        self._connect_task = asyncio.create_task(self._connect_loop(), name="auth-events-connect")
        self._run_task = asyncio.create_task(self._run(), name="auth-events-publish")
        for task in (self._connect_task, self._run_task):
            task.add_done_callback(self._task_done)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_connect.wait(), self.connect_timeout)
        if not self._connected and not self._closing:
            self._warned_unreachable = True
            log.warning(
                "auth events: NATS at %s not reachable within %.1f s; connecting in the background, "
                "up to %d events are kept meanwhile",
                self._where,
                self.connect_timeout,
                self.queue_size,
            )

    async def close(self) -> None:
        """Publish what is queued (at most ~1 s, and only while connected), then flush and close the
        connection (at most ~0.5 s more). What could not go out is counted as dropped (`closed`).
        Never raises, never hangs; idempotent."""
        if self._closing:
            return
        self._closing = True
        self._wakeup.set()
        run = self._run_task
        if run is not None and not run.done():
            await asyncio.wait({run}, timeout=_CLOSE_FLUSH_SECONDS)
            await _cancel(run)
        if self._queue:
            self.dropped["closed"] += len(self._queue)
            self._queue.clear()
        if self._connect_task is not None:
            await _cancel(self._connect_task)
        nc, self._nc = self._nc, None
        if nc is not None:
            try:
                await asyncio.wait_for(self._close_connection(nc), _CLOSE_CONNECTION_SECONDS)
            except TimeoutError:
                _abort(nc)
                log.warning(
                    "auth events: NATS connection not closed cleanly within %.1f s: dropped",
                    _CLOSE_CONNECTION_SECONDS,
                )
            except Exception:  # closing must not fail a shutdown
                log.debug("auth events: error closing the NATS connection", exc_info=True)
            # nats-py cancels its reconnecting task once; on Python 3.11 that cancel can be lost (below).
            reconnecting = getattr(nc, "_reconnection_task", None)
            if isinstance(reconnecting, asyncio.Task):
                await _cancel(reconnecting)
        self._set_connected(False)

    @staticmethod
    async def _close_connection(nc: Client) -> None:
        if nc.is_connected:
            try:
                await nc.drain()  # flush (PING/PONG) what nats-py still holds, then close
                return
            except NatsError:
                pass
        if not nc.is_closed:
            await nc.close()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("auth events: background task %s failed", task.get_name(), exc_info=exc)

    # -- the connection ------------------------------------------------------------------------------
    async def _connect_loop(self) -> None:
        """Connect until it works. nats-py retries by itself with max_reconnect_attempts=-1; the loop is
        the safety net if `connect()` ever gives up (a new client each time)."""
        while not self._closing:
            nc = Client()
            self._nc = nc
            options: dict[str, Any] = {
                "servers": self._servers,
                "name": f"meshkit-auth-events {self.server_id}",
                "connect_timeout": self.connect_timeout,
                "allow_reconnect": True,
                "max_reconnect_attempts": -1,
                "reconnect_time_wait": _RECONNECT_WAIT,
                "ping_interval": _PING_INTERVAL,
                "max_outstanding_pings": _MAX_OUTSTANDING_PINGS,
                "pending_size": _PENDING_SIZE,
                "flush_timeout": 1.0,
                "drain_timeout": 1,
                "error_cb": self._on_error,
                "disconnected_cb": self._on_disconnected,
                "reconnected_cb": self._on_reconnected,
                "closed_cb": self._on_closed,
            }
            try:
                await nc.connect(**options)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: a fresh client, a little later
                log.debug("auth events: connecting to NATS at %s failed: %r", self._where, exc)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.close(), _CLOSE_CONNECTION_SECONDS)
                await asyncio.sleep(_RECONNECT_WAIT)
                continue
            if self._closing:
                return
            self._set_connected(True)
            return

    async def _on_error(self, exc: Exception) -> None:
        log.debug("auth events: NATS client error: %r", exc)

    async def _on_disconnected(self) -> None:
        self._set_connected(False)

    async def _on_reconnected(self) -> None:
        self._set_connected(True)

    async def _on_closed(self) -> None:
        # With infinite reconnects nats-py closes only when we do; if it ever gave up, start over.
        self._set_connected(False)
        if not self._closing and (self._connect_task is None or self._connect_task.done()):
            self._connect_task = asyncio.create_task(self._connect_loop(), name="auth-events-connect")
            self._connect_task.add_done_callback(self._task_done)

    def _set_connected(self, connected: bool) -> None:
        if connected == self._connected:
            return
        self._connected = connected
        self._wakeup.set()
        if self._closing:
            return
        if connected:
            self._first_connect.set()
            if self._warned_unreachable:
                self._warned_unreachable = False
                log.info("auth events: connected to NATS at %s; %d events queued", self._where, self.queued)
            elif self._started_once:
                log.info("auth events: NATS connection back; %d events queued", self.queued)
            else:
                log.info("auth events: connected to NATS at %s", self._where)
            self._started_once = True
        else:
            log.warning(
                "auth events: NATS connection lost; reconnecting, up to %d events are kept meanwhile",
                self.queue_size,
            )

    # -- the publishing task -------------------------------------------------------------------------
    async def _run(self) -> None:
        next_beat = 0.0  # the first heartbeat goes out as soon as a connection is up
        was_connected = False
        while True:
            self._wakeup.clear()
            nc = self._nc
            ready = nc is not None and self._connected and nc.is_connected
            room = False
            if ready and not was_connected:
                next_beat = 0.0  # (re)connected: say so at once
            was_connected = ready
            if ready and nc is not None:
                room = nc.pending_data_size < _PENDING_HIGH
                now = time.monotonic()
                if room and now >= next_beat and not self._closing:
                    next_beat = now + self.heartbeat_interval
                    await self._publish(nc, HEALTH, self._heartbeat())
                    continue
                if room and self._queue:
                    for _ in range(_BATCH):
                        if not self._queue or not nc.is_connected or nc.pending_data_size >= _PENDING_HIGH:
                            break
                        kind, event = self._queue.popleft()
                        await self._publish(nc, kind, event)
                    await asyncio.sleep(0)
                    continue
            if self._closing and (not self._queue or not ready):
                return
            # Nothing to do until an emit, a connection change, close(), the next heartbeat, or (when
            # nats-py's buffer is full) a little later.
            timeout: float | None = None
            if ready and not room:
                # Above the high-water mark nothing goes out, the heartbeat included: look again a
                # little later (a due heartbeat must not make this a zero timeout: a busy loop).
                timeout = _BACKPRESSURE_POLL
            elif ready:
                timeout = max(0.0, next_beat - time.monotonic())
                if self._queue:
                    timeout = min(timeout, _BACKPRESSURE_POLL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)

    async def _publish(self, nc: Client, kind: str, body: Mapping[str, Any]) -> None:
        try:
            payload = json.dumps(body, default=str, separators=(",", ":")).encode()
            await nc.publish(self._subjects[kind], payload)
        except (OutboundBufferLimitError, ConnectionClosedError):
            if kind != HEALTH:
                self.dropped["disconnected"] += 1
            return
        except MaxPayloadError:
            if kind != HEALTH:
                self.dropped["too_large"] += 1
            self._throttle.warning("too_large", "auth events: an event over NATS's max_payload was dropped")
            return
        except asyncio.CancelledError:
            raise
        except Exception:  # one bad event must not stop the publisher
            if kind != HEALTH:
                self.dropped["error"] += 1
            self._throttle.exception("error", "auth events: publishing an event failed")
            return
        self.published[kind] += 1

    def _heartbeat(self) -> dict[str, Any]:
        now = time.time()
        return {
            "ts": round(now, 3),
            "server": self.server_id,
            "pid": os.getpid(),
            "started_at": round(self._started_at, 3),
            "uptime_s": round(time.monotonic() - self._started_mono, 3),
            "version": __version__,
            "events_published": sum(self.published[k] for k in KINDS),
            "events_dropped": sum(self.dropped.values()),
        }

    # -- metrics -------------------------------------------------------------------------------------
    def collectors(self) -> Iterable[Collector]:
        """One collector (not registered anywhere): the daemon registers it on its registry."""
        return (_EventsCollector(self),)


class _EventsCollector(Collector):
    def __init__(self, publisher: EventPublisher) -> None:
        self._publisher = publisher

    def collect(self) -> Iterator[Metric]:
        p = self._publisher
        published = CounterMetricFamily(
            "meshkit_auth_events_published", "Events handed to the NATS client, by kind", labels=["kind"]
        )
        for kind, count in p.published.items():
            published.add_metric([kind], count)
        yield published
        dropped = CounterMetricFamily(
            "meshkit_auth_events_dropped", "Auth events dropped before NATS, by reason", labels=["reason"]
        )
        for reason, count in p.dropped.items():
            dropped.add_metric([reason], count)
        yield dropped
        yield GaugeMetricFamily("meshkit_auth_events_queued", "Auth events waiting to be published", p.queued)
        yield GaugeMetricFamily(
            "meshkit_auth_events_nats_connected", "1 while connected to NATS, else 0", int(p.connected)
        )
