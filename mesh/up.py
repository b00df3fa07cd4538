"""`meshkit up`: the local stack on one machine, with real processes.

Today: Envoy ingress on 127.0.0.1:10000 -> meshkit body-hash (ext_authz over HTTP by default; `--api`)
-> `meshkit echo` upstream, which answers with what it received. It prints curl lines to try and runs
until Ctrl-C (or SIGTERM), then stops every process it started. `--check` sends the walkthrough's
requests itself, verifies the answers and exits 0 (all good) or 1.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import xxhash

from meshkit.errors import HarnessError, MeshkitError
from meshkit.extproc.apis import Api
from meshkit.harness.daemons import echo, extproc
from meshkit.harness.envoy import Envoy, envoy
from meshkit.render import FrontConfig

DEMO_BODY = '{"model": "text-embedding-3-small", "input": "hello mesh"}'


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


def _post(port: int, body: str, headers: dict[str, str] | None = None) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(
            "POST",
            "/v1/embeddings",
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


def check(port: int, max_body_bytes: int) -> list[str]:
    """The walkthrough's requests; returns the problems found (empty: all good)."""
    problems = []
    want = xxhash.xxh3_128_hexdigest(DEMO_BODY.encode())
    status, headers, doc = _post(port, DEMO_BODY, {"x-body-hash": "chosen-by-client"})
    if status != 200:
        problems.append(f"POST answered {status}, expected 200")
    elif doc.get("headers", {}).get("x-body-hash") != want:
        problems.append(
            f"upstream got x-body-hash {doc.get('headers', {}).get('x-body-hash')!r}, expected {want}"
        )
    elif headers.get("x-body-hash") != want:
        problems.append(f"response echoed x-body-hash {headers.get('x-body-hash')!r}, expected {want}")
    elif doc.get("body_sha256") != hashlib.sha256(DEMO_BODY.encode()).hexdigest():
        problems.append("upstream received a different body")
    pods = {_post(port, DEMO_BODY)[2].get("upstream") for _ in range(3)}
    if len(pods) != 1:
        problems.append(f"the same body reached several pods: {sorted(map(str, pods))}")
    status, _, doc = _post(port, "x" * (max_body_bytes + 1))
    if status != 413 or doc.get("error", {}).get("type") != "request_too_large":
        problems.append(f"oversized POST answered {status} {doc}, expected 413 request_too_large")
    return problems


def walkthrough(proxy: Envoy, port: int, admin_port: int, api: str, max_body_bytes: int) -> str:
    url = f"http://127.0.0.1:{port}"
    return f"""
meshkit local stack is up:
  client -> Envoy {url} -> meshkit body-hash ({api}) -> echo pod-a | pod-b, ring-hashed on x-body-hash

  # the upstream answers with what it received: look for "x-body-hash" (also echoed as a response header)
  # and "upstream": the same body always lands on the same pod; change the input to move it
  curl -si {url}/v1/embeddings -H 'content-type: application/json' -d '{DEMO_BODY}'

  # a spoofed hash never survives; no body, no hash
  curl -s {url}/v1/models -H 'x-body-hash: mine'

  # over --max-body-bytes ({max_body_bytes} bytes): 413 with a JSON error
  head -c {max_body_bytes + 1} /dev/zero | curl -s {url}/v1/embeddings --data-binary @-

  # meshkit's metrics and readiness; Envoy's admin
  curl -s http://127.0.0.1:{admin_port}/metrics | grep meshkit_extproc_requests_total
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
                echo(workdir, name="pod-a") as pod_a,
                echo(workdir, name="pod-b") as pod_b,
                extproc(workdir, ["--log-format", "json"]) as server,
            ):
                print(
                    f"  echo upstreams pod-a on 127.0.0.1:{pod_a.port}, pod-b on 127.0.0.1:{pod_b.port}",
                    flush=True,
                )
                print(
                    f"  meshkit extproc: gRPC on 127.0.0.1:{server.grpc_port}, ext_authz HTTP on "
                    f"127.0.0.1:{server.http_port}, admin on 127.0.0.1:{server.admin_port}",
                    flush=True,
                )
                # The chain and the body limit are meshkit's defaults, which are FrontConfig's too.
                config = FrontConfig(
                    upstream_ports=(pod_a.port, pod_b.port),
                    extproc_port=server.port_for(args.api),
                    api=Api(args.api),
                    listen_port=args.port,
                )
                with envoy(config.render(), workdir, name="envoy-ingress") as proxy:
                    port = proxy.listeners["ingress"][1]  # --port 0 picks a free one
                    if args.check:
                        problems = check(port, config.max_body_bytes)
                        for p in problems:
                            print(f"FAIL: {p}", file=sys.stderr)
                        print("check: OK" if not problems else "check: FAILED", flush=True)
                        return 1 if problems else 0
                    print(
                        walkthrough(proxy, port, server.admin_port, args.api, config.max_body_bytes),
                        flush=True,
                    )
                    while True:
                        time.sleep(0.5)
                        for proc in (pod_a.process, pod_b.process, server.process, proxy.process):
                            if proc.returncode is not None:
                                raise HarnessError(
                                    f"{proc.name} exited with {proc.returncode}\n{proc.tail()}"
                                )
        except KeyboardInterrupt:
            pass
        except HarnessError as exc:
            if "Address already in use" in str(exc) or "address already in use" in str(exc):
                raise MeshkitError(f"port {args.port} is taken: stop what uses it or pass --port N") from None
            raise
    print("stopped: every process of the stack has exited", flush=True)
    return 0
