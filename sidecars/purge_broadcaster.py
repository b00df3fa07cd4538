"""`meshkit purge-broadcaster`: one PURGE in, the same PURGE to every Varnish pod, one answer once all
of them have answered.

    meshkit purge-broadcaster --listen 127.0.0.1:6090 --targets 10.0.0.7:6081,10.0.0.8:6081 \\
        [--token-file /run/secrets/purge-token] [--redis redis://127.0.0.1:6379/0]
    meshkit purge-broadcaster --targets dns:varnish-headless.cache.svc.cluster.local:6081
    meshkit purge-broadcaster --targets k8s:cache/varnish:http      # the Service's EndpointSlices
    curl -X PURGE localhost:6090/v1/embeddings                       # that URL, every body variant
    curl -X PURGE localhost:6090/ -H 'X-Purge-All: true'             # everything
    curl -X PURGE localhost:6090/ -H 'Surrogate-Key: team-a v1.2'    # objects tagged so

API (the `--listen` port)
- `PURGE <path>` with optional `X-Purge-All: true` or `Surrogate-Key: k1 k2`: validated the way
  `mesh/varnish/meshkit.vcl` validates them (`meshkit.sidecars.purge_fanout.Purge`); a bad one is 400
  JSON and nothing is sent. The path is normalised as the ingress normalises the URLs Varnish stores
  (`purge_fanout.ingress_path`: `//v1/./%65mbeddings` purges `/v1/embeddings`). Otherwise the path
  and that header go to every target concurrently (one keep-alive `PurgeClient`, connections kept
  per target; `--target-timeout` per attempt; `--attempts` attempts when a target does not answer or
  answers 5xx, waiting `--retry-backoff`, then twice that, ... between them; a 4xx is final). The
  answer comes only when every target is done:
  - 200 `{"targets": [{"target": "10.0.0.7:6081", "status": 200, "ms": 3.1}, ...]}` when every
    target answered 200;
  - 502 with the same list otherwise: each target's last status (`null` when it never answered) and,
    for one that failed, `"error"` (the target's own message, or why there was no answer) and
    `"attempts"` when more than one was made;
  - 503 `{"error": ..., "targets": []}` when there are no targets (none configured, or dns:/k8s:
    sources that found none yet);
  - 503 `busy` (`Retry-After: 1`) at once when `--max-inflight` PURGEs (1024) are being fanned out
    already: a flood of purges against a slow target holds a bounded number of tasks and sockets.
  With `--redis`, each failed target's entry also says `"pending": true` when the purge was queued in
  the purge log for it (not for a 400: the target's VCL refuses it, a replay would too).
- `GET /purges`: `{"pending": {"HOST:PORT": [{"id", "at", "purge": {"path", "purge_all", "keys"}}]}}`,
  oldest first (empty without `--redis`), and `"departed"`: the targets that left the set less than
  `--departed-keep` seconds ago (their purges are kept, see below); 503 JSON
  (`purge_log_unavailable`) while Redis does not answer.
- `GET /targets`: `{"targets": [{"target", "sources": [...]}], "sources": [{"source", "kind",
  "targets", ...}]}`: the current set, which source named each target, and each source's own state
  (dns: `resolved_at`, `last_error`; k8s: `connected`, `resource_version`, `slices`, `last_error`).
- `--token-file F`: every request needs `Authorization: Bearer <the file's content, stripped>`
  (compared in constant time), else 401 JSON with `WWW-Authenticate: Bearer`. Read once at start.
- Any other method: 405 JSON (`Allow: PURGE`; `GET, PURGE` on `/purges` and `/targets`). A request body over
  `--max-body-bytes`: 413 JSON. Errors are `{"error": {"type", "message"}}` like the VCL's.
- Targets (`meshkit.sidecars.purge_targets`): `--targets` mixes `HOST:PORT`, `dns:NAME:PORT`
  (re-resolved every `--resolve-interval` s, `--resolve-timeout` each; a failure keeps the last set) and
  `k8s:[NAMESPACE/]SERVICE:PORT|PORTNAME` (EndpointSlices listed and watched, in-cluster config or
  `--kube-api URL --kube-token-file F [--kube-ca-file F]`; `meshkit.sidecars.kube_endpoints` says which
  endpoints count and the RBAC it needs). The set changes under the broadcaster: each PURGE goes to the
  set of the moment it arrived. A target that joins gets nothing replayed (a new pod starts empty).
- Admin port (`--admin-listen`): `/healthz`, `/readyz` (503 `"no purge targets"` while the set is
  empty, e.g. before the first resolution or list, or with a rejected token), `/metrics` with
  `meshkit_purge_requests_total{result=ok|failed|bad_request|unauthorized|no_targets|busy|...}`,
  `meshkit_purge_target_failures_total{target}`, `meshkit_purge_fanout_seconds` (a histogram of the
  whole fan-out), `meshkit_purge_targets{source}` (targets per source),
  `meshkit_purge_target_source_errors_total{source,kind}` (resolution and list/watch errors),
  `meshkit_purge_watch_restarts_total{source,reason=timeout|gone|error}`, and with `--redis`
  `meshkit_purge_replays_total{target,result=ok|failed|dropped|expired}`, `meshkit_purge_pending`,
  `meshkit_purge_log_errors_total`. The `target` series of a target that left the set are removed
  (without `--redis` at once; with it once the purge log forgot the target: `--departed-keep` after
  it left with nothing pending, or after its entries expired, plus `--departed-keep` more so a scrape
  sees the last counts): pods that come and go do not grow the label values without bound.
- SIGTERM: the shared lifecycle (`meshkit.daemon`): readiness off, in-flight fan-outs get
  `--drain-timeout` (one still retrying a target then is cancelled: its client gets no answer, and
  with `--redis` the purge is first queued for every target that had not confirmed it), then the
  replay loop (at most 3 s), Redis, the target sources and the HTTP clients close.

Purge log (`--redis URL`, `meshkit.sidecars.purge_log`): a purge a target missed (no answer, 5xx,
403) is kept in Redis, a list per target in order, and survives a broadcaster restart; past
`--max-pending` entries for one target they are replaced by one purge of everything. A loop probes
every current target with pending purges every `--replay-interval` seconds (one attempt each) and
replays them oldest first, removing each once the target answered 200 (an entry that is not a valid
purge is dropped, never sent). A target that left the set is kept `--departed-keep` seconds (new
purges are queued for it meanwhile; it gets them if it comes back; departures are kept in Redis too,
so a restarted broadcaster still knows a pod that was away), then its entries are dropped and counted
(`meshkit.sidecars.purge_log`). New purges are still sent to
such a target directly (a 200 is a 200), so a replayed ban may land after a newer one: bans commute,
the cost is at most an extra miss. Redis down: the purge is still fanned out and answered (the 502
says `"pending": false`), logged and counted; Redis unreachable at start: the daemon does not start
(one line, exit 1).

Readiness with no targets: `/readyz` asks `ready_when_targets`, the lifecycle's `Readiness.check`
(`meshkit.admin`), which says 503 `"no purge targets"` whenever the set is empty: from the first
`/readyz` on, with no window after `serve()` returns (a task that switched readiness off once the
lifecycle had switched it on left one of an event-loop turn or two), and never once draining (the
lifecycle asks the check only while it is otherwise ready). A ready answer says `"targets": "N"`.

NOT DONE: telling a restarted pod that kept no cache (needs nothing) from one that was merely
unreachable (both get the pending purges: harmless, a ban on an empty cache); Redis in `/readyz`;
EndpointSlice list pagination (`limit`/`continue`: the whole list in one answer).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from redis.exceptions import RedisError

from meshkit.admin import ReadyCheck
from meshkit.daemon import Daemon, Lifecycle, Resolved
from meshkit.errors import ConfigError
from meshkit.options import option, parse_host_port, parse_non_negative_int, parse_seconds, parse_size
from meshkit.sidecars.kube_endpoints import KubeConfig
from meshkit.sidecars.purge_fanout import BadPurge, Delivery, Purge, PurgeClient, RetryPolicy, deliver
from meshkit.sidecars.purge_log import (
    MAX_PENDING,
    Departures,
    PurgeLog,
    Replayer,
    ReplayMetrics,
    remove_series,
)
from meshkit.sidecars.purge_targets import (
    DnsSource,
    KubeSource,
    SourceHooks,
    StaticSource,
    TargetSet,
    TargetSpec,
    parse_target_spec,
    parse_target_specs,
)

log = logging.getLogger("meshkit.purge_broadcaster")

TARGETS_HELP = (
    "comma-separated Varnish pods: HOST:PORT, dns:NAME:PORT (every A/AAAA record, re-resolved), "
    "k8s:NAMESPACE/SERVICE:PORT (the Service's ready EndpointSlice endpoints; PORT a number or a port name)"
)


def _parse_attempts(value: Any) -> int:
    attempts = int(value)
    if not 1 <= attempts <= 10:
        raise ValueError("expected 1 to 10 attempts")
    return attempts


def _parse_max_inflight(value: Any) -> int:
    count = parse_non_negative_int(value)
    if not 1 <= count <= 100_000:
        raise ValueError("expected 1 to 100000")
    return count


def _parse_max_pending(value: Any) -> int:
    count = parse_non_negative_int(value)
    if count < 1:
        raise ValueError("expected at least 1")
    return count


def _parse_watch_timeout(value: Any) -> int:
    seconds = parse_non_negative_int(value)
    if not 1 <= seconds <= 3600:
        raise ValueError("expected 1 to 3600 seconds")
    return seconds


@dataclass(frozen=True)
class PurgeBroadcasterOptions:
    listen: str = option(
        "127.0.0.1:6090",
        "HOST:PORT to take PURGE on (port 0: any free port)",
        parse=parse_host_port,
        metavar="HOST:PORT",
    )
    targets: tuple[str, ...] = option((), TARGETS_HELP, parse=parse_target_specs, metavar="TARGET,...")
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
    max_inflight: int = option(
        1024,
        "PURGEs fanned out at once; one more is 503 busy at once (Retry-After: 1)",
        parse=_parse_max_inflight,
    )
    redis: str = option(
        "",
        "Redis URL of the purge log: missed purges kept and replayed (empty: no log)",
        metavar="URL",
        secret=True,
    )
    redis_prefix: str = option("meshkit:purge-log", "prefix of the purge log's Redis keys")
    max_pending: int = option(
        MAX_PENDING,
        "purges kept per target in the purge log; one more and they become one purge of everything",
        parse=_parse_max_pending,
    )
    replay_interval: float = option(
        1.0,
        "seconds between two probes of the targets with pending purges",
        parse=parse_seconds,
        metavar="SECONDS",
    )
    departed_keep: float = option(
        300.0,
        "seconds the purges of a target that left the set are kept (and queued) in case it comes back",
        parse=parse_seconds,
        metavar="SECONDS",
    )
    resolve_interval: float = option(
        5.0, "seconds between two resolutions of a dns: target", parse=parse_seconds, metavar="SECONDS"
    )
    resolve_timeout: float = option(
        2.0, "seconds one resolution of a dns: target may take", parse=parse_seconds, metavar="SECONDS"
    )
    kube_api: str = option(
        "",
        "URL of the Kubernetes API for k8s: targets (empty: in-cluster, KUBERNETES_SERVICE_HOST/PORT)",
        metavar="URL",
    )
    kube_token_file: str = option(
        "", "bearer token file for the Kubernetes API (empty: the pod's service account token)"
    )
    kube_ca_file: str = option("", "CA bundle of the Kubernetes API (empty: the service account's ca.crt)")
    kube_watch_timeout: int = option(
        300,
        "seconds the API server keeps one EndpointSlice watch open (timeoutSeconds) before it is reopened",
        parse=_parse_watch_timeout,
        metavar="SECONDS",
    )


@dataclass
class Metrics:
    requests: Counter
    target_failures: Counter
    fanout: Histogram
    targets: Gauge
    source_errors: Counter
    watch_restarts: Counter

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
            Gauge(
                "meshkit_purge_targets",
                "Targets each --targets source gives now",
                ["source"],
                registry=registry,
            ),
            Counter(
                "meshkit_purge_target_source_errors",
                "dns: resolutions and k8s: lists/watches that failed (the last set is kept), by kind",
                ["source", "kind"],
                registry=registry,
            ),
            Counter(
                "meshkit_purge_watch_restarts",
                "k8s: watches reopened, by reason (timeout: the server's timeoutSeconds; gone: 410, listed "
                "again; error)",
                ["source", "reason"],
                registry=registry,
            ),
        )


@dataclass
class Broadcaster:
    """What a request handler needs: targets, the policy, the purge client (set at start), metrics."""

    targets: TargetSet
    policy: RetryPolicy
    token: bytes | None
    metrics: Metrics
    session: PurgeClient | None = None
    purge_log: PurgeLog | None = None
    log_errors: Counter | None = None
    departures: Departures | None = None
    keeping: set[asyncio.Task[set[str]]] = field(default_factory=set)
    max_inflight: int = 1024
    inflight: int = 0  # PURGEs being fanned out now

    def client(self) -> PurgeClient:
        assert self.session is not None, "the purge client starts before the listener"
        return self.session

    async def keep(self, failed: list[Delivery], purge: Purge) -> set[str]:
        """Queue `purge` for each failed target that may take it later (no answer, 5xx, 403) and for
        each departed one (it may come back with its cache); the targets it was queued for."""
        kept: set[str] = set()
        if self.purge_log is None:
            return kept
        away = self.departures.away() if self.departures is not None else []
        # once each (a target that failed may have left the set meanwhile), all at once: a Redis that
        # does not answer costs one timeout, not one per target; 400: a replay would be refused too
        targets = list(dict.fromkeys([d.target for d in failed if d.status != 400] + away))
        log_ = self.purge_log
        results = await asyncio.gather(*(log_.append(t, purge) for t in targets), return_exceptions=True)
        for target, result in zip(targets, results, strict=True):
            if result is None:
                kept.add(target)
            elif isinstance(result, Exception):  # Redis down: the 502 still says which target missed it
                if self.log_errors is not None:
                    self.log_errors.inc()
                log.error("purge log: could not keep %s for %s: %r", purge.path, target, result)
            else:
                raise result
        return kept

    async def fan_out(self, purge: Purge, targets: tuple[str, ...]) -> list[Delivery]:
        """Every target's delivery. Cancelled (the drain timeout ran out on SIGTERM while a target was
        still being retried), the purge is first queued for each target that had not confirmed it:
        the client gets no answer, and the purge is not lost for the pods that missed it."""
        session = self.client()
        tasks = [asyncio.ensure_future(deliver(session, t, purge, self.policy)) for t in targets]
        try:
            return list(await asyncio.gather(*tasks))
        except asyncio.CancelledError:
            confirmed = {
                t
                for t, task in zip(targets, tasks, strict=True)
                if task.done() and not task.cancelled() and task.result().ok
            }
            missed = [Delivery(t, None, 0.0, error="cancelled") for t in targets if t not in confirmed]
            keeping = asyncio.ensure_future(self.keep(missed, purge))
            self.keeping.add(keeping)  # the purge log's close waits for these
            keeping.add_done_callback(self.keeping.discard)
            kept = await asyncio.shield(keeping)
            log.warning("purge %s cancelled (stopping): queued for %s", purge.path, ", ".join(kept) or "none")
            raise


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
    # the bytes as sent: aiohttp hands bytes that are not UTF-8 over as surrogates
    sent = value.strip().encode("utf-8", "surrogateescape")
    return hmac.compare_digest(sent, token) and scheme.lower() == "bearer"


async def _purge(request: web.Request) -> web.Response:
    b = request.app[BROADCASTER]
    counted = b.metrics.requests
    if not _authorized(request, b.token):
        counted.labels("unauthorized").inc()
        return _error(
            401, "unauthorized", "a bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )
    if request.method == "GET" and request.path == "/purges":
        try:
            pending = await b.purge_log.pending() if b.purge_log is not None else {}
        except (RedisError, OSError) as exc:
            if b.log_errors is not None:
                b.log_errors.inc()
            return _error(503, "purge_log_unavailable", f"the purge log (Redis) did not answer: {exc}"[:300])
        departed = b.departures.away() if b.departures is not None else []
        return web.json_response({"pending": pending, "departed": departed})
    if request.method == "GET" and request.path == "/targets":
        return web.json_response(b.targets.describe())
    if request.method != "PURGE":
        counted.labels("method_not_allowed").inc()
        allow = "GET, PURGE" if request.path in ("/purges", "/targets") else "PURGE"
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
    targets = b.targets.current()  # the set of this moment: it may change during the fan-out
    if not targets:
        counted.labels("no_targets").inc()
        why = "no purge targets are configured" if not b.targets.sources else "no purge targets found yet"
        return _error(503, "no_targets", why, targets=[])
    if b.inflight >= b.max_inflight:
        counted.labels("busy").inc()
        busy = f"{b.max_inflight} purges are being fanned out already (--max-inflight): try again"
        return _error(503, "busy", busy, headers={"Retry-After": "1"})
    b.inflight += 1
    try:
        began = time.monotonic()
        deliveries = await b.fan_out(purge, targets)
        b.metrics.fanout.observe(time.monotonic() - began)
        failed = [d for d in deliveries if not d.ok]
        for d in failed:
            b.metrics.target_failures.labels(d.target).inc()
        counted.labels("failed" if failed else "ok").inc()
        kept = await b.keep(failed, purge)
    finally:
        b.inflight -= 1
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
        token = Path(path).read_bytes().strip()  # bytes: compared with the header's bytes as sent
    except OSError as exc:
        raise ConfigError([f"--token-file {path}: {exc.strerror}"]) from None
    if not token:
        raise ConfigError([f"--token-file {path}: the file is empty"])
    return token


def _kube_config(opts: PurgeBroadcasterOptions, specs: list[TargetSpec]) -> KubeConfig | None:
    if not any(spec.kind == "k8s" for spec in specs):
        return None
    return KubeConfig.resolve(opts.kube_api, opts.kube_token_file, opts.kube_ca_file)


def _target_set(
    opts: PurgeBroadcasterOptions, metrics: Metrics, session: Callable[[], aiohttp.ClientSession]
) -> TargetSet:
    specs = [parse_target_spec(text) for text in opts.targets]
    kube = _kube_config(opts, specs)
    targets = TargetSet()

    def changed() -> None:
        for source in targets.sources:
            metrics.targets.labels(source.spec.text).set(len(source.current()))
        targets.changed()

    hooks = SourceHooks(
        changed=changed,
        error=lambda spec, kind: metrics.source_errors.labels(spec.text, kind).inc(),
        restart=lambda spec, reason: metrics.watch_restarts.labels(spec.text, reason).inc(),
    )
    for spec in specs:
        if spec.kind == "dns":
            interval, timeout = opts.resolve_interval, opts.resolve_timeout
            targets.add(DnsSource(spec, hooks, interval=interval, timeout=timeout))
        elif spec.kind == "k8s":
            assert kube is not None
            targets.add(KubeSource(spec, hooks, kube, session, watch_timeout=opts.kube_watch_timeout))
        else:
            targets.add(StaticSource(spec))
        metrics.targets.labels(spec.text).set(len(targets.sources[-1].current()))
    return targets


def ready_when_targets(targets: TargetSet) -> ReadyCheck:
    """The `Readiness.check` of the broadcaster: not ready while the target set is empty (the lifecycle
    asks it only while it is otherwise ready, so draining stays draining)."""

    async def check() -> tuple[bool, str, dict[str, str]]:
        current = targets.current()
        if not current:
            return False, "no purge targets", {}
        return True, "serving", {"targets": str(len(current))}

    return check


async def serve(options: Resolved, life: Lifecycle) -> None:
    opts: PurgeBroadcasterOptions = options[PurgeBroadcasterOptions]
    policy = RetryPolicy(attempts=opts.attempts, timeout=opts.target_timeout, backoff=opts.retry_backoff)
    metrics = Metrics.create(life.registry)
    token = _read_token(opts.token_file)
    kube_session: list[aiohttp.ClientSession] = []  # the Kubernetes API's (k8s: targets only)

    def kube_client() -> aiohttp.ClientSession:
        return kube_session[0]

    targets = _target_set(opts, metrics, kube_client)
    b = Broadcaster(targets, policy, token, metrics, max_inflight=opts.max_inflight)

    known = set(targets.current())

    def left(current: tuple[str, ...]) -> None:  # targets that left the set leave nothing behind
        gone = known - set(current)
        known.clear()
        known.update(current)
        if b.session is not None:
            b.session.forget(gone)
        if b.departures is None:  # without a purge log: their series go at once (else: Departures)
            for target in gone:
                remove_series(metrics.target_failures, target)

    targets.on_change(left)

    async def open_clients() -> None:
        b.session = PurgeClient()
        if any(isinstance(source, KubeSource) for source in targets.sources):
            kube_session.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)))

    async def close_clients() -> None:
        if b.session is not None:
            await b.session.close()
        for session in kube_session:
            await session.close()

    await life.start("http clients", open_clients, close_clients)
    if opts.redis:
        purge_log = PurgeLog(opts.redis, opts.redis_prefix, opts.max_pending)
        replay_metrics = ReplayMetrics.create(life.registry)
        b.purge_log, b.log_errors = purge_log, replay_metrics.errors

        def forgotten(target: str) -> None:  # gone for good: its series go too (bounded under churn)
            remove_series(metrics.target_failures, target)
            replay_metrics.forget(target)

        b.departures = Departures(opts.departed_keep, forgotten)
        targets.on_change(b.departures.update)
        b.departures.update(targets.current())

        async def close_log() -> None:  # after the purges cancelled by the drain are queued
            if b.keeping:
                await asyncio.wait(set(b.keeping), timeout=5)
            await purge_log.close()

        await life.start("redis (purge log)", purge_log.start, close_log)
        replayer = Replayer(
            purge_log, targets.current, b.client, policy, opts.replay_interval, replay_metrics, b.departures
        )

        async def start_replayer() -> None:
            replayer.start()

        await life.start("purge log replay", start_replayer, replayer.stop)
    if not opts.targets:
        log.warning("no --targets: every PURGE answers 503")
    await life.start("target sources", targets.start, targets.stop)
    life.readiness.check = ready_when_targets(targets)
    await life.serve_app("http", opts.listen, purge_broadcaster_app(b, max_body_bytes=opts.max_body_bytes))


def _sections() -> list[type[Any]]:
    return [PurgeBroadcasterOptions]


DAEMON = Daemon(
    name="purge-broadcaster",
    help="fans a PURGE out to every Varnish pod (static, dns: or k8s: targets) and answers once all did",
    sections=_sections,
    serve=serve,
)
