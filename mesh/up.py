"""`meshkit up`: the local stack on one machine, with real processes.

Today: Envoy ingress on 127.0.0.1:10000 -> meshkit auth, body-hash, model-router (ext_authz over HTTP
by default; `--api`) ->
- `/v1/embeddings`: the cache tier — Varnish x2 (the shipped VCL, ring-hashed on `x-body-hash`) ->
  `meshkit embedding-cache` (a `file://` store in the workdir) -> `meshkit dev-upstream` (the stand-in
  provider); `meshkit purge-broadcaster` fans PURGE out to both Varnish pods (purge log in Redis);
- everything else: `meshkit echo` upstreams, which answer with what they received: pod-a and pod-b
  ring-hashed on `x-body-hash` (the default route), pod-gpt-4o for `x-model: gpt-4o`.
A real Redis holds the rate limits and the purge log. Demo credentials (API keys, an HS256 JWT) are
made fresh for each run in the workdir.
It prints curl lines to try and runs until Ctrl-C (or SIGTERM), then stops every process it started.
`--check` sends the walkthrough's requests itself, verifies the answers and exits 0 (all good) or 1.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import jwt
import xxhash
import yaml

from meshkit.errors import HarnessError, MeshkitError
from meshkit.extproc.apis import Api
from meshkit.harness.daemons import (
    DevUpstream,
    Echo,
    Extproc,
    PurgeBroadcaster,
    dev_upstream,
    echo,
    embedding_cache,
    extproc,
    purge_broadcaster,
)
from meshkit.harness.envoy import Envoy, envoy
from meshkit.harness.process import ManagedProcess
from meshkit.harness.redis import redis_server
from meshkit.harness.varnish import VarnishServer, varnish_server
from meshkit.render import FrontConfig, meshkit_vcl

DEMO_BODY = '{"model": "text-embedding-3-small", "input": "hello mesh"}'
EMBEDDINGS = "/v1/embeddings"
ECHO_PATH = "/v1/completions"  # served by the echo pods: they show what reached them
ECHO_BODY = '{"model": "gpt-4o-mini", "prompt": "hello mesh"}'
CHAT_BODY = '{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
CHAIN = ("auth", "body-hash", "model-router")
ROUTED_MODEL = "gpt-4o"
ALLOWED_MODELS = ["text-embedding-3-small", "gpt-4o-mini", "gpt-4o"]
LIMIT = 3  # requests per minute of the demo's rate-limited key


@dataclass(frozen=True)
class Demo:
    """Fresh demo credentials, and the files meshkit reads them from."""

    full_key: str  # scopes embeddings + llm
    reader_key: str  # scope llm only: refused on /v1/embeddings
    limited_key: str  # LIMIT requests a minute
    token: str  # an HS256 JWT, subject demo-user, scope llm
    args: tuple[str, ...]  # meshkit extproc's flags for them


def make_demo(workdir: Path, redis_url: str) -> Demo:
    full, reader, limited = (f"mk_{name}_{secrets.token_hex(12)}" for name in ("full", "reader", "limited"))
    secret = secrets.token_bytes(64)

    def entry(key: str, subject: str, scopes: list[str], **extra: object) -> dict[str, object]:
        return {
            "sha256": hashlib.sha256(key.encode()).hexdigest(),
            "subject": subject,
            "scopes": scopes,
            **extra,
        }

    keys = workdir / "demo-api-keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            [
                entry(full, "demo-service", ["embeddings", "llm"]),
                entry(reader, "demo-reader", ["llm"]),
                entry(limited, "demo-limited", ["embeddings", "llm"], rate_limit=LIMIT),
            ]
        )
    )
    routes = workdir / "demo-routes.yaml"
    routes.write_text(
        yaml.safe_dump(
            {
                "scopes": [
                    {"path": "/v1/embeddings", "scope": "embeddings"},
                    {"path": "/v1/", "scope": "llm"},
                ],
                "models": {"allow": ALLOWED_MODELS},
            }
        )
    )
    secret_file = workdir / "demo-jwt-secret"
    secret_file.write_bytes(secret)
    secret_file.chmod(0o600)
    now = int(time.time())
    token = jwt.encode(
        {"sub": "demo-user", "scope": "llm", "iat": now, "exp": now + 12 * 3600}, secret, algorithm="HS256"
    )
    args = (
        "--filters", ",".join(CHAIN), "--api-keys-file", str(keys), "--routes-file", str(routes),
        "--jwt-secret-file", str(secret_file), "--redis", redis_url,
    )  # fmt: skip
    return Demo(full, reader, limited, token, args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--port", type=int, default=10000, help="ingress port on 127.0.0.1 (default: 10000; 0: any)"
    )
    parser.add_argument(
        "--api",
        choices=[api.value for api in Api],
        default=Api.EXT_AUTHZ_HTTP.value,
        help="how Envoy calls meshkit (default: ext_authz_http, the cheapest path per request)",
    )
    parser.add_argument("--workdir", type=Path, help="where configs and logs go (default: a temp dir)")
    parser.add_argument("--check", action="store_true", help="run the walkthrough, verify it, stop (for CI)")


Answer = tuple[int, dict[str, str], dict[str, Any]]  # status, headers, JSON body


def _post(
    port: int,
    body: str,
    headers: dict[str, str] | None = None,
    path: str = EMBEDDINGS,
    method: str = "POST",
) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(
            method,
            path,
            body=body.encode(),
            headers={"content-type": "application/json", **(headers or {})},
        )
        resp = conn.getresponse()
        status, resp_headers, raw = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    except OSError as exc:  # reset, refused, timed out: a failed check, not a traceback
        return 0, {}, {"error": {"message": f"no answer: {exc}"}}
    finally:
        conn.close()
    try:
        doc = json.loads(raw or b"{}")
    except ValueError:
        doc = {"error": {"message": f"not JSON: {raw[:200]!r}"}}
    return status, resp_headers, doc if isinstance(doc, dict) else {"body": doc}


@dataclass(frozen=True)
class CacheTier:
    """The cache tier's processes: what the walkthrough and the check talk to."""

    pods: tuple[VarnishServer, VarnishServer]
    provider: DevUpstream
    broadcaster: PurgeBroadcaster
    processes: tuple[ManagedProcess, ...]


def check(port: int, max_body_bytes: int, demo: Demo, tier: CacheTier) -> list[str]:
    """The walkthrough's requests; returns the problems found (empty: all good)."""
    problems = []
    key = {"x-api-key": demo.full_key}
    want = xxhash.xxh3_128_hexdigest(ECHO_BODY.encode())
    status, headers, doc = _post(
        port, ECHO_BODY, {**key, "x-body-hash": "chosen-by-client", "x-auth-subject": "admin"}, ECHO_PATH
    )
    got = doc.get("headers", {})
    if status != 200:
        problems.append(f"POST with the demo key answered {status} {doc}, expected 200")
    elif got.get("x-body-hash") != want:
        problems.append(f"upstream got x-body-hash {got.get('x-body-hash')!r}, expected {want}")
    elif headers.get("x-body-hash") != want:
        problems.append(f"response echoed x-body-hash {headers.get('x-body-hash')!r}, expected {want}")
    elif doc.get("body_sha256") != hashlib.sha256(ECHO_BODY.encode()).hexdigest():
        problems.append("upstream received a different body")
    elif got.get("x-auth-subject") != "demo-service" or "x-api-key" in got:
        problems.append(f"upstream got x-auth-subject {got.get('x-auth-subject')!r} / the key: {sorted(got)}")
    pods = {_post(port, ECHO_BODY, key, ECHO_PATH)[2].get("upstream") for _ in range(3)}
    if len(pods) != 1:
        problems.append(f"the same body reached several pods: {sorted(map(str, pods))}")
    problems += check_cache_tier(port, demo, tier)
    expected: list[tuple[str, Answer, int, str]] = [
        ("no credential", _post(port, DEMO_BODY), 401, "unauthorized"),
        ("an unknown key", _post(port, DEMO_BODY, {"x-api-key": "mk_unknown"}), 401, "unauthorized"),
        (
            "the reader key on /v1/embeddings",
            _post(port, DEMO_BODY, {"x-api-key": demo.reader_key}),
            403,
            "forbidden",
        ),
        (
            "an unknown model",
            _post(port, '{"model": "gpt-2", "messages": []}', key, "/v1/chat/completions"),
            404,
            "invalid_request_error",
        ),
        ("an oversized POST", _post(port, "x" * (max_body_bytes + 1), key), 413, "request_too_large"),
    ]
    for what, (status, _, doc), want_status, want_type in expected:
        if status != want_status or doc.get("error", {}).get("type") != want_type:
            problems.append(f"{what} answered {status} {doc}, expected {want_status} {want_type}")
    status, _, doc = _post(port, CHAT_BODY, {"authorization": f"Bearer {demo.token}"}, "/v1/chat/completions")
    routed = (
        doc.get("upstream"),
        doc.get("headers", {}).get("x-auth-method"),
        doc.get("headers", {}).get("x-model"),
    )
    if status != 200 or routed != (f"pod-{ROUTED_MODEL}", "jwt", ROUTED_MODEL):
        problems.append(f"the JWT chat request answered {status} via {routed}, expected pod-{ROUTED_MODEL}")
    limited = [_post(port, "{}", {"x-api-key": demo.limited_key}, ECHO_PATH) for _ in range(LIMIT + 1)]
    statuses = [answer[0] for answer in limited]
    if statuses != [200] * LIMIT + [429] or "retry-after" not in limited[-1][1]:
        problems.append(f"the rate-limited key answered {statuses}, expected {LIMIT} x 200 then 429")
    return problems


def _provider_items(tier: CacheTier) -> int:
    return int(tier.provider.stats().get("embedding_items", -1))


def check_cache_tier(port: int, demo: Demo, tier: CacheTier) -> list[str]:
    """Varnish MISS then HIT, the provider asked once; a PURGE through the broadcaster reaches both
    pods, after which Varnish misses and the embedding cache answers without the provider; a client's
    PURGE at the ingress is refused."""
    problems = []
    key = {"x-api-key": demo.full_key}
    body = json.dumps({"model": "text-embedding-3-small", "input": ["check", secrets.token_hex(8)]})
    before = _provider_items(tier)
    answers = [_post(port, body, key) for _ in range(2)]
    verdicts = [(status, headers.get("x-cache")) for status, headers, _ in answers]
    if verdicts != [(200, "MISS"), (200, "HIT")]:
        problems.append(f"/v1/embeddings twice answered {verdicts}, expected 200 MISS then 200 HIT")
    elif len(answers[0][2].get("data", [])) != 2 or answers[0][2] != answers[1][2]:
        problems.append("/v1/embeddings: the cached answer differs from the first (or is not 2 vectors)")
    if _provider_items(tier) - before != 2:
        problems.append(f"the provider was asked for {_provider_items(tier) - before} items, expected 2")
    purge = _post(tier.broadcaster.port, "", path=EMBEDDINGS, method="PURGE")
    statuses = [t.get("status") for t in purge[2].get("targets", [])]
    if purge[0] != 200 or statuses != [200, 200]:
        problems.append(f"PURGE via the broadcaster answered {purge[0]} {purge[2]}, expected 200 from 2 pods")
    status, headers, _ = _post(port, body, key)
    if (status, headers.get("x-cache")) != (200, "MISS") or _provider_items(tier) - before != 2:
        problems.append(
            f"after the purge: {status} {headers.get('x-cache')}, provider items +"
            f"{_provider_items(tier) - before}; expected 200 MISS with the embedding cache answering"
        )
    refused = _post(port, "", key, EMBEDDINGS, method="PURGE")
    if refused[0] != 405:
        problems.append(f"a client's PURGE at the ingress answered {refused[0]}, expected 405")
    return problems


def walkthrough(
    proxy: Envoy, port: int, admin_port: int, api: str, max_body_bytes: int, demo: Demo, tier: CacheTier
) -> str:
    url = f"http://127.0.0.1:{port}"
    va, vb = (pod.url for pod in tier.pods)
    provider, broadcaster = tier.provider.url, tier.broadcaster.url
    json_header = "-H 'content-type: application/json'"
    unknown = '{"model": "gpt-2", "messages": []}'
    status_only = "-s -o /dev/null -w '%{http_code}\\n'"
    return f"""
meshkit local stack is up:
  client -> Envoy {url} -> meshkit {",".join(CHAIN)} ({api})
    {EMBEDDINGS}: Varnish {va} | {vb} (ring-hashed on x-body-hash) -> embedding cache -> provider {provider}
    other paths: echo pod-a | pod-b (ring-hashed on x-body-hash), pod-{ROUTED_MODEL} (x-model: {ROUTED_MODEL})
  purge broadcaster {broadcaster} -> both Varnish pods. Redis holds the rate limits and the purge log.
  Demo credentials, fresh for this run (paste these into your shell):
    export FULL={demo.full_key}        # scopes embeddings, llm
    export READER={demo.reader_key}    # scope llm
    export LIMITED={demo.limited_key}  # {LIMIT} requests a minute
    export TOKEN={demo.token}  # a JWT (HS256), scope llm

  # the cache tier: X-Cache MISS, then HIT from the same Varnish pod (the same body, the same x-body-hash)
  curl -si {url}{EMBEDDINGS} -H "x-api-key: $FULL" {json_header} -d '{DEMO_BODY}' | grep -i '^x-'
  # PURGE through the broadcaster (both pods confirm); then Varnish misses, and the embedding cache
  # answers without asking the provider (its /stats: embedding_items stays the same)
  curl -s -X PURGE {broadcaster}{EMBEDDINGS}
  curl -s {provider}/stats
  # a client's PURGE at the ingress: 405
  curl -si -X PURGE {url}{EMBEDDINGS} -H "x-api-key: $FULL"

  # the echo pods answer with what they received: x-auth-subject, "x-body-hash" (also echoed as a
  # response header) and "upstream": the same body always lands on the same pod; change it to move it
  curl -si {url}{ECHO_PATH} -H "x-api-key: $FULL" {json_header} -d '{ECHO_BODY}'

  # no credential: 401; a key without the route's scope: 403
  curl -si {url}/v1/embeddings {json_header} -d '{DEMO_BODY}'
  curl -si {url}/v1/embeddings -H "x-api-key: $READER" {json_header} -d '{DEMO_BODY}'

  # a JWT; the body's model picks the upstream (x-model), an unknown model is 404
  curl -s {url}/v1/chat/completions -H "authorization: Bearer $TOKEN" {json_header} -d '{CHAT_BODY}'
  curl -si {url}/v1/chat/completions -H "x-api-key: $FULL" {json_header} -d '{unknown}'

  # the rate limit: the fourth within a minute gets 429 with Retry-After and x-ratelimit-*
  for i in 1 2 3 4; do curl {status_only} {url}{ECHO_PATH} -H "x-api-key: $LIMITED" -d '{{}}'; done

  # over --max-body-bytes ({max_body_bytes} bytes): 413 with a JSON error
  head -c {max_body_bytes + 1} /dev/zero | curl -s {url}/v1/embeddings -H "x-api-key: $FULL" --data-binary @-

  # meshkit's metrics and readiness; Envoy's admin
  curl -s http://127.0.0.1:{admin_port}/metrics | grep -E 'meshkit_(extproc_requests|ratelimit_checks)_total'
  curl -s http://127.0.0.1:{admin_port}/readyz
  curl -s {proxy.admin_url}/stats | grep -E 'ext_(authz|proc)'

Logs: {proxy.config_path.parent}   Ctrl-C stops everything.
"""


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP act like Ctrl-C: unwind, and every context manager stops its process."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_up(args: argparse.Namespace) -> int:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="meshkit-up-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"starting the local stack in {workdir} ...", flush=True)
    with _signals_interrupt():
        try:
            with (
                redis_server(workdir / "redis") as redis,
                echo(workdir, name="pod-a") as pod_a,
                echo(workdir, name="pod-b") as pod_b,
                echo(workdir, name=f"pod-{ROUTED_MODEL}") as pod_model,
            ):
                demo = make_demo(workdir, redis.url)
                print(f"  redis on 127.0.0.1:{redis.port}", flush=True)
                print(
                    f"  echo upstreams pod-a on 127.0.0.1:{pod_a.port}, pod-b on 127.0.0.1:{pod_b.port}, "
                    f"pod-{ROUTED_MODEL} on 127.0.0.1:{pod_model.port}",
                    flush=True,
                )
                with (
                    cache_tier(workdir, redis.url) as tier,
                    extproc(workdir, ["--log-format", "json", *demo.args]) as server,
                ):
                    pods = (pod_a, pod_b, pod_model)
                    return _serve(args, workdir, demo, pods, server, redis.process, tier)
        except KeyboardInterrupt:
            pass
        except HarnessError as exc:
            if "Address already in use" in str(exc) or "address already in use" in str(exc):
                raise MeshkitError(f"port {args.port} is taken: stop what uses it or pass --port N") from None
            raise
    print("stopped: every process of the stack has exited", flush=True)
    return 0


@contextlib.contextmanager
def cache_tier(workdir: Path, redis_url: str) -> Iterator[CacheTier]:
    """dev-upstream <- embedding-cache (file:// store in the workdir) <- Varnish x2; the broadcaster."""
    store = (workdir / "vectors").resolve().as_uri()
    json_logs = ["--log-format", "json"]
    with (
        dev_upstream(workdir, json_logs, name="provider") as provider,
        embedding_cache(workdir, provider.base_url, store, json_logs) as cache,
        varnish_server(workdir, meshkit_vcl(backend=("127.0.0.1", cache.port)), name="varnish-a") as va,
        varnish_server(workdir, meshkit_vcl(backend=("127.0.0.1", cache.port)), name="varnish-b") as vb,
        purge_broadcaster(
            workdir, [f"127.0.0.1:{va.port}", f"127.0.0.1:{vb.port}"], ["--redis", redis_url, *json_logs]
        ) as broadcaster,
    ):
        print(
            f"  cache tier: varnish-a on 127.0.0.1:{va.port}, varnish-b on 127.0.0.1:{vb.port} -> "
            f"embedding-cache on 127.0.0.1:{cache.port} -> provider (dev-upstream) on "
            f"127.0.0.1:{provider.port}; purge broadcaster on 127.0.0.1:{broadcaster.port}",
            flush=True,
        )
        processes = (provider.process, cache.process, va.process, vb.process, broadcaster.process)
        yield CacheTier((va, vb), provider, broadcaster, processes)


def _serve(
    args: argparse.Namespace,
    workdir: Path,
    demo: Demo,
    pods: tuple[Echo, ...],
    server: Extproc,
    redis: ManagedProcess,
    tier: CacheTier,
) -> int:
    """Envoy in front of the running servers, then the check, or the walkthrough until Ctrl-C."""
    pod_a, pod_b, pod_model = pods
    print(
        f"  meshkit extproc: gRPC on 127.0.0.1:{server.grpc_port}, ext_authz HTTP on "
        f"127.0.0.1:{server.http_port}, admin on 127.0.0.1:{server.admin_port}",
        flush=True,
    )
    # The body limit is meshkit's default, which is FrontConfig's too.
    config = FrontConfig(
        upstream_ports=(pod_a.port, pod_b.port),
        extproc_port=server.port_for(args.api),
        api=Api(args.api),
        filters=CHAIN,
        model_routes=((ROUTED_MODEL, (pod_model.port,)),),
        path_routes=((EMBEDDINGS, tuple(pod.port for pod in tier.pods)),),
        listen_port=args.port,
    )
    with envoy(config.render(), workdir, name="envoy-ingress") as proxy:
        port = proxy.listeners["ingress"][1]  # --port 0 picks a free one
        if args.check:
            problems = check(port, config.max_body_bytes, demo, tier)
            for problem in problems:
                print(f"FAIL: {problem}", file=sys.stderr)
            print("check: OK" if not problems else "check: FAILED", flush=True)
            return 1 if problems else 0
        text = walkthrough(proxy, port, server.admin_port, args.api, config.max_body_bytes, demo, tier)
        print(text, flush=True)
        watched = (*(pod.process for pod in pods), *tier.processes, server.process, redis, proxy.process)
        while True:
            time.sleep(0.5)
            for proc in watched:
                if proc.returncode is not None:
                    raise HarnessError(f"{proc.name} exited with {proc.returncode}\n{proc.tail()}")
