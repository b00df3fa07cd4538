"""`meshkit purge-broadcaster`: one PURGE in, the same PURGE to every Varnish pod, one answer once all
of them have answered.

    meshkit purge-broadcaster --listen 127.0.0.1:6090 --targets 10.0.0.7:6081,10.0.0.8:6081 \\
        [--token-file /run/secrets/purge-token] [--redis redis://127.0.0.1:6379/0]
    curl -X PURGE localhost:6090/v1/embeddings                       # that URL, every body variant
    curl -X PURGE localhost:6090/ -H 'X-Purge-All: true'             # everything
    curl -X PURGE localhost:6090/ -H 'Surrogate-Key: team-a v1.2'    # objects tagged so

API (the `--listen` port)
- `PURGE <path>` with optional `X-Purge-All: true` or `Surrogate-Key: k1 k2`: validated the way
  `mesh/varnish/meshkit.vcl` validates them (`meshkit.sidecars.purge_fanout.Purge`); a bad one is 400
  JSON and nothing is sent. Otherwise the path and that header go to every target concurrently (one
  aiohttp session; `--target-timeout` per attempt; `--attempts` attempts when a target does not answer
  or answers 5xx, waiting `--retry-backoff`, then twice that, ... between them; a 4xx is final). The
  answer comes only when every target is done:
  - 200 `{"targets": [{"target": "10.0.0.7:6081", "status": 200, "ms": 3.1}, ...]}` when every
    target answered 200;
  - 502 with the same list otherwise: each target's last status (`null` when it never answered) and,
    for one that failed, `"error"` (the target's own message, or why there was no answer) and
    `"attempts"` when more than one was made;
  - 503 `{"error": ..., "targets": []}` when there are no targets.
  With `--redis`, each failed target's entry also says `"pending": true` when the purge was queued in
  the purge log for it (not for a 400: the target's VCL refuses it, a replay would too).
- `GET /purges`: `{"pending": {"HOST:PORT": [{"id", "at", "purge": {"path", "purge_all", "keys"}}]}}`,
  oldest first (empty without `--redis`).
- `--token-file F`: every request needs `Authorization: Bearer <the file's content, stripped>`
  (compared in constant time), else 401 JSON with `WWW-Authenticate: Bearer`. Read once at start.
- Any other method: 405 JSON (`Allow: PURGE`; `GET, PURGE` on `/purges`). A request body over
  `--max-body-bytes`: 413 JSON. Errors are `{"error": {"type", "message"}}` like the VCL's.
- Admin port (`--admin-listen`): `/healthz`, `/readyz`, `/metrics` with
  `meshkit_purge_requests_total{result=ok|failed|bad_request|unauthorized|no_targets|...}`,
  `meshkit_purge_target_failures_total{target}`, `meshkit_purge_fanout_seconds` (a histogram of the
  whole fan-out), and with `--redis` `meshkit_purge_replays_total{target,result=ok|failed|dropped}`,
  `meshkit_purge_pending`, `meshkit_purge_log_errors_total`.
- SIGTERM: the shared lifecycle (`meshkit.daemon`): readiness off, in-flight fan-outs get
  `--drain-timeout`, then the replay loop, Redis and the HTTP session close.

Purge log (`--redis URL`, `meshkit.sidecars.purge_log`): a purge a target missed (no answer, 5xx,
403) is kept in Redis, a list per target in order, and survives a broadcaster restart. A loop probes
every configured target with pending purges every `--replay-interval` seconds (one attempt each) and
replays them oldest first, removing each once the target answered 200. New purges are still sent to
such a target directly (a 200 is a 200), so a replayed ban may land after a newer one: bans commute,
the cost is at most an extra miss. Redis down: the purge is still fanned out and answered (the 502
says `"pending": false`), logged and counted; Redis unreachable at start: the daemon does not start
(one line, exit 1).

NOT DONE in this slice: `dns:NAME:PORT` and `k8s:NAMESPACE/SERVICE:PORT` targets (refused at start:
static `HOST:PORT` lists only); telling a restarted pod that kept no cache (needs nothing) from one
that was merely unreachable (both get the pending purges: harmless, a ban on an empty cache);
Redis in `/readyz`; pending purges of a target no longer in `--targets` are listed, never replayed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram

from meshkit.daemon import Daemon, Lifecycle, Resolved
from meshkit.errors import ConfigError
from meshkit.options import option, parse_host_port, parse_seconds, parse_size
from meshkit.sidecars.purge_fanout import BadPurge, Delivery, Purge, RetryPolicy, deliver, parse_targets
from meshkit.sidecars.purge_log import PurgeLog, Replayer, ReplayMetrics

log = logging.getLogger("meshkit.purge_broadcaster")

TARGETS_HELP = (
    "comma-separated HOST:PORT of every Varnish pod (a static list; dns: and k8s: targets are not "
    "implemented yet)"
)


def _parse_attempts(value: Any) -> int:
    attempts = int(value)
    if not 1 <= attempts <= 10:
        raise ValueError("expected 1 to 10 attempts")
    return attempts


@dataclass(frozen=True)
class PurgeBroadcasterOptions:
    listen: str = option(
        "127.0.0.1:6090",
        "HOST:PORT to take PURGE on (port 0: any free port)",
        parse=parse_host_port,
        metavar="HOST:PORT",
    )
    targets: tuple[str, ...] = option((), TARGETS_HELP, parse=parse_targets, metavar="HOST:PORT,...")
    token_file: str = option("", "file holding the bearer token every request must carry (empty: none)")
    target_timeout: float = option(
        1.0, "seconds one attempt at one target may take", parse=parse_seconds, metavar="SECONDS"
    )
    attempts: int = option(3, "attempts per target (no answer or 5xx: tried again)", parse=_parse_attempts)
    retry_backoff: float = option(
        0.05,
        "seconds before the 2nd attempt, doubled before each next one",
        parse=parse_seconds,
        metavar="SECONDS",
    )
    max_body_bytes: int = option(
        64 << 10, "largest request body accepted (bigger: 413)", parse=parse_size, metavar="BYTES"
    )
    redis: str = option(
        "",
        "Redis URL of the purge log: missed purges kept and replayed (empty: no log)",
        metavar="URL",
        secret=True,
    )
    redis_prefix: str = option("meshkit:purge-log", "prefix of the purge log's Redis keys")
    replay_interval: float = option(
        1.0,
        "seconds between two probes of the targets with pending purges",
        parse=parse_seconds,
        metavar="SECONDS",
    )


@dataclass
class Metrics:
    requests: Counter
    target_failures: Counter
    fanout: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry) -> Metrics:
        return cls(
            Counter(
                "meshkit_purge_requests", "PURGE requests answered, by result", ["result"], registry=registry
            ),
            Counter(
                "meshkit_purge_target_failures",
                "Purges a target did not confirm with a 200 (after the retries)",
                ["target"],
                registry=registry,
            ),
            Histogram(
                "meshkit_purge_fanout_seconds",
                "Time from a PURGE's arrival to every target's answer",
                buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
                registry=registry,
            ),
        )


@dataclass
class Broadcaster:
    """What a request handler needs: targets, the policy, the session (set at start), metrics."""

    targets: tuple[str, ...]
    policy: RetryPolicy
    token: bytes | None
    metrics: Metrics
    session: aiohttp.ClientSession | None = None
    purge_log: PurgeLog | None = None
    log_errors: Counter | None = None

    def client(self) -> aiohttp.ClientSession:
        assert self.session is not None, "the HTTP session starts before the listener"
        return self.session

    async def keep(self, failed: list[Delivery], purge: Purge) -> set[str]:
        """Queue `purge` for each failed target that may take it later (no answer, 5xx, 403); the
        targets it was queued for."""
        kept: set[str] = set()
        if self.purge_log is None:
            return kept
        for d in failed:
            if d.status == 400:  # the target's VCL refuses it: a replay would too
                continue
            try:
                await self.purge_log.append(d.target, purge)
                kept.add(d.target)
            except Exception as exc:  # Redis down: the 502 still says which target missed it
                if self.log_errors is not None:
                    self.log_errors.inc()
                log.error("purge log: could not keep %s for %s: %r", purge.path, d.target, exc)
        return kept

    async def fan_out(self, purge: Purge) -> list[Delivery]:
        session = self.client()
        return list(await asyncio.gather(*(deliver(session, t, purge, self.policy) for t in self.targets)))


BROADCASTER = web.AppKey("broadcaster", Broadcaster)


def _error(status: int, kind: str, message: str, **extra: Any) -> web.Response:
    headers = extra.pop("headers", None)
    return web.json_response(
        {"error": {"type": kind, "message": message}, **extra}, status=status, headers=headers
    )


def _authorized(request: web.Request, token: bytes | None) -> bool:
    if token is None:
        return True
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    return hmac.compare_digest(value.strip().encode(), token) and scheme.lower() == "bearer"


async def _purge(request: web.Request) -> web.Response:
    b = request.app[BROADCASTER]
    counted = b.metrics.requests
    if not _authorized(request, b.token):
        counted.labels("unauthorized").inc()
        return _error(
            401, "unauthorized", "a bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )
    if request.method == "GET" and request.path == "/purges":
        pending = await b.purge_log.pending() if b.purge_log is not None else {}
        return web.json_response({"pending": pending})
    if request.method != "PURGE":
        counted.labels("method_not_allowed").inc()
        allow = "GET, PURGE" if request.path == "/purges" else "PURGE"
        return _error(405, "method_not_allowed", f"{request.method}: only {allow}", headers={"Allow": allow})
    try:
        await request.read()
    except web.HTTPRequestEntityTooLarge:
        counted.labels("too_large").inc()
        return _error(413, "too_large", "the request body is over --max-body-bytes")
    try:
        purge = Purge.parse(
            request.raw_path,
            request.headers.getall("X-Purge-All", []),
            request.headers.getall("Surrogate-Key", []),
        )
    except BadPurge as exc:
        counted.labels("bad_request").inc()
        return _error(400, "bad_request", str(exc))
    if not b.targets:
        counted.labels("no_targets").inc()
        return _error(503, "no_targets", "no purge targets are configured", targets=[])
    began = time.monotonic()
    deliveries = await b.fan_out(purge)
    b.metrics.fanout.observe(time.monotonic() - began)
    failed = [d for d in deliveries if not d.ok]
    for d in failed:
        b.metrics.target_failures.labels(d.target).inc()
    counted.labels("failed" if failed else "ok").inc()
    kept = await b.keep(failed, purge)
    if failed:
        log.warning(
            "purge %s: %d of %d targets failed: %s",
            purge.path,
            len(failed),
            len(deliveries),
            ", ".join(f"{d.target} ({d.error})" for d in failed),
        )
    listed = [d.as_json() | ({"pending": d.target in kept} if not d.ok else {}) for d in deliveries]
    return web.json_response({"targets": listed}, status=502 if failed else 200)


def purge_broadcaster_app(broadcaster: Broadcaster, *, max_body_bytes: int = 64 << 10) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes)
    app[BROADCASTER] = broadcaster
    app.router.add_route("*", "/{tail:.*}", _purge)
    return app


def _read_token(path: str) -> bytes | None:
    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"--token-file {path}: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"--token-file {path}: the file is empty")
    return token.encode()


async def serve(options: Resolved, life: Lifecycle) -> None:
    opts: PurgeBroadcasterOptions = options[PurgeBroadcasterOptions]
    policy = RetryPolicy(attempts=opts.attempts, timeout=opts.target_timeout, backoff=opts.retry_backoff)
    b = Broadcaster(opts.targets, policy, _read_token(opts.token_file), Metrics.create(life.registry))

    async def open_session() -> None:
        b.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=16), auto_decompress=False
        )

    async def close_session() -> None:
        if b.session is not None:
            await b.session.close()

    await life.start("http client", open_session, close_session)
    if opts.redis:
        purge_log = PurgeLog(opts.redis, opts.redis_prefix)
        replay_metrics = ReplayMetrics.create(life.registry)
        b.purge_log, b.log_errors = purge_log, replay_metrics.errors
        await life.start("redis (purge log)", purge_log.start, purge_log.close)
        replayer = Replayer(purge_log, opts.targets, b.client, policy, opts.replay_interval, replay_metrics)

        async def start_replayer() -> None:
            replayer.start()

        await life.start("purge log replay", start_replayer, replayer.stop)
    if not opts.targets:
        log.warning("no --targets: every PURGE answers 503")
    await life.serve_app("http", opts.listen, purge_broadcaster_app(b, max_body_bytes=opts.max_body_bytes))


def _sections() -> list[type[Any]]:
    return [PurgeBroadcasterOptions]


DAEMON = Daemon(
    name="purge-broadcaster",
    help="fans a PURGE out to every Varnish pod and answers once all did (static targets only)",
    sections=_sections,
    serve=serve,
)
