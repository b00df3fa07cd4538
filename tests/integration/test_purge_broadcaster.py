"""`meshkit purge-broadcaster` on real servers: broadcaster -> Varnish x2 (the shipped meshkit.vcl) ->
an echo behind each. Objects are cached by POSTing with an X-Body-Hash straight to each Varnish, then
purged through the broadcaster and requested again on each pod.

Where a test must see exactly what the broadcaster sent (or that it sent nothing), its target is an
echo: it answers every method with 200 and counts requests by method on its /metrics.
"""

from __future__ import annotations

import http.server
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshkit.harness.daemons import Echo, PurgeBroadcaster, echo, purge_broadcaster
from meshkit.harness.process import free_port
from meshkit.harness.redis import RedisServer, redis_server, redis_server_binary
from meshkit.harness.varnish import VarnishServer, varnish_server, varnishd_binary
from meshkit.render import meshkit_vcl

from .conftest import Response, request

pytestmark = pytest.mark.integration

PATH = "/v1/embeddings"


@dataclass(frozen=True)
class Pods:
    a: VarnishServer
    b: VarnishServer
    origin_a: Echo

    @property
    def both(self) -> tuple[VarnishServer, VarnishServer]:
        return (self.a, self.b)

    @property
    def targets(self) -> list[str]:
        return [f"127.0.0.1:{v.port}" for v in self.both]


@pytest.fixture(scope="module")
def pods(workdir: Path) -> Iterator[Pods]:
    try:
        varnishd_binary()
    except Exception as exc:  # the Debian package is missing
        pytest.skip(str(exc))
    with (
        echo(workdir, ["--name", "pod-a"], name="pb-pod-a") as a,
        echo(workdir, ["--name", "pod-b"], name="pb-pod-b") as b,
        varnish_server(workdir, meshkit_vcl(backend=("127.0.0.1", a.port)), name="pb-varnish-a") as va,
        varnish_server(workdir, meshkit_vcl(backend=("127.0.0.1", b.port)), name="pb-varnish-b") as vb,
    ):
        yield Pods(va, vb, a)


@pytest.fixture(scope="module")
def broadcaster(workdir: Path, pods: Pods) -> Iterator[PurgeBroadcaster]:
    with purge_broadcaster(workdir, pods.targets, ["--target-timeout", "2"]) as server:
        yield server


@pytest.fixture(scope="module")
def sink(workdir: Path) -> Iterator[Echo]:
    """An echo as a purge target: it records what reaches it."""
    with echo(workdir, name="pb-sink") as server:
        yield server


@pytest.fixture(scope="module")
def to_sink(workdir: Path, sink: Echo) -> Iterator[PurgeBroadcaster]:
    with purge_broadcaster(workdir, [f"127.0.0.1:{sink.port}"], name="pb-to-sink") as server:
        yield server


# -- helpers ------------------------------------------------------------------------------------------
def post(pod: VarnishServer, path: str, digest: str, headers: dict[str, str] | None = None) -> Response:
    return request(
        pod.url + path,
        body=b'{"input": "x"}',
        headers={"content-type": "application/json", "x-body-hash": digest, **(headers or {})},
    )


def cached(pods: Pods, path: str = PATH, headers: dict[str, str] | None = None) -> str:
    """A fresh object cached on both pods (MISS then HIT on each); its body hash."""
    digest = uuid.uuid4().hex
    for pod in pods.both:
        first, second = post(pod, path, digest, headers), post(pod, path, digest, headers)
        assert [first.headers["x-cache"], second.headers["x-cache"]] == ["MISS", "HIT"]
    return digest


def states(pods: Pods, digest: str, path: str = PATH, headers: dict[str, str] | None = None) -> list[str]:
    return [post(pod, path, digest, headers).headers["x-cache"] for pod in pods.both]


def purge(server: PurgeBroadcaster, path: str = "/", headers: dict[str, str] | None = None) -> Response:
    return request(server.url + path, method="PURGE", headers=headers)


def sink_purges(sink: Echo) -> int:
    text = request(f"{sink.admin_url}/metrics", method="GET").body.decode()
    found = re.search(r'^meshkit_echo_requests_total\{method="PURGE"\} (\S+)$', text, re.M)
    return int(float(found.group(1))) if found else 0


def metric(server: PurgeBroadcaster, name: str, labels: str) -> float:
    text = request(f"{server.admin_url}/metrics", method="GET").body.decode()
    wanted = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "")
    found = re.search(rf"^{wanted} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def assert_all_ok(resp: Response, targets: list[str]) -> None:
    assert resp.status == 200, resp.body
    assert resp.headers["content-type"].startswith("application/json")
    listed = resp.json()["targets"]
    assert [t["target"] for t in listed] == targets
    assert [t["status"] for t in listed] == [200] * len(targets)
    assert all(isinstance(t["ms"], int | float) and t["ms"] >= 0 for t in listed)


# -- the purges -----------------------------------------------------------------------------------------
def test_purge_of_a_path_reaches_both_pods(pods: Pods, broadcaster: PurgeBroadcaster) -> None:
    path, other = f"{PATH}?p={uuid.uuid4().hex}", f"/v1/other-{uuid.uuid4().hex}"
    digest, kept = cached(pods, path), cached(pods, other)
    before = metric(broadcaster, "meshkit_purge_requests_total", 'result="ok"')
    resp = purge(broadcaster, path)
    assert_all_ok(resp, pods.targets)
    assert states(pods, digest, path) == ["MISS", "MISS"]
    assert states(pods, kept, other) == ["HIT", "HIT"]
    assert metric(broadcaster, "meshkit_purge_requests_total", 'result="ok"') == before + 1
    assert metric(broadcaster, "meshkit_purge_fanout_seconds_count", "") >= 1


def test_purge_all(pods: Pods, broadcaster: PurgeBroadcaster) -> None:
    digest = cached(pods)
    assert_all_ok(purge(broadcaster, "/", {"X-Purge-All": "true"}), pods.targets)
    assert states(pods, digest) == ["MISS", "MISS"]


def test_purge_by_surrogate_key(pods: Pods, broadcaster: PurgeBroadcaster) -> None:
    run = uuid.uuid4().hex[:8]
    tagged = {"x-echo-header": f"Surrogate-Key: team-{run} v1.2-{run}"}
    digest, untagged = cached(pods, headers=tagged), cached(pods)
    assert_all_ok(purge(broadcaster, "/", {"Surrogate-Key": f"nothing-{run}  v1.2-{run}"}), pods.targets)
    assert states(pods, digest, headers=tagged) == ["MISS", "MISS"]
    assert states(pods, untagged) == ["HIT", "HIT"]


@pytest.mark.parametrize(
    ("headers", "path"),
    [
        ({"Surrogate-Key": ".*"}, "/"),
        ({"Surrogate-Key": "a|b"}, "/"),
        ({"Surrogate-Key": '"x"'}, "/"),
        ({"Surrogate-Key": "x\ty"}, "/"),
        ({"X-Purge-All": "yes"}, "/"),
        ({"X-Purge-All": "true", "Surrogate-Key": "k"}, "/"),
        ({}, "/v1/x<y>"),
    ],
)
def test_a_bad_purge_is_400_and_nothing_is_sent(
    pods: Pods,
    broadcaster: PurgeBroadcaster,
    sink: Echo,
    to_sink: PurgeBroadcaster,
    headers: dict[str, str],
    path: str,
) -> None:
    digest = cached(pods, headers={"x-echo-header": "Surrogate-Key: x"})
    sent = sink_purges(sink)
    for server in (broadcaster, to_sink):
        resp = purge(server, path, headers)
        assert resp.status == 400, resp.body
        assert resp.json()["error"]["type"] == "bad_request"
    assert sink_purges(sink) == sent  # nothing reached the target
    assert states(pods, digest, headers={"x-echo-header": "Surrogate-Key: x"}) == ["HIT", "HIT"]


class Recorder(http.server.ThreadingHTTPServer):
    """An in-test target that answers every PURGE 200 and keeps (path, headers) of each."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PURGE(self) -> None:
                outer.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


def test_what_reaches_a_target_is_the_path_and_the_purge_header(workdir: Path) -> None:
    recorder = Recorder()
    try:
        with purge_broadcaster(workdir, [recorder.target], name="pb-recorded") as server:
            headers = {"Surrogate-Key": " k1  k.2 ", "X-Other": "x", "Authorization": "Bearer t"}
            assert purge(server, "/a/b%20c?d=1&e", headers).status == 200
            assert purge(server, "/", {"X-Purge-All": "true"}).status == 200
            assert purge(server, "/v1/embeddings").status == 200
    finally:
        recorder.shutdown()
        recorder.server_close()
    assert [path for path, _ in recorder.seen] == ["/a/b%20c?d=1&e", "/", "/v1/embeddings"]
    first, every, plain = (h for _, h in recorder.seen)
    assert first["surrogate-key"] == "k1 k.2" and "x-purge-all" not in first
    assert "x-other" not in first and "authorization" not in first  # only what the VCL reads
    assert every["x-purge-all"] == "true" and "surrogate-key" not in every
    assert "x-purge-all" not in plain and "surrogate-key" not in plain


def test_one_target_down_is_502_with_per_target_status_and_the_other_is_purged(
    workdir: Path, pods: Pods
) -> None:
    closed = f"127.0.0.1:{free_port()}"
    targets = [pods.targets[0], closed]
    with purge_broadcaster(workdir, targets, ["--retry-backoff", "0.01"], name="pb-one-down") as server:
        digest = cached(pods)
        resp = purge(server, PATH)
        assert resp.status == 502, resp.body
        listed = resp.json()["targets"]
        assert [t["target"] for t in listed] == targets
        assert listed[0]["status"] == 200 and "error" not in listed[0]
        assert listed[1]["status"] is None and listed[1]["error"] and listed[1]["attempts"] == 3
        assert states(pods, digest) == ["MISS", "HIT"]  # pod a purged through it, pod b not a target
        assert metric(server, "meshkit_purge_target_failures_total", f'target="{closed}"') == 1
        assert metric(server, "meshkit_purge_requests_total", 'result="failed"') == 1


def test_a_target_that_never_answers_times_out_while_the_other_is_answered_at_once(
    workdir: Path, pods: Pods
) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        mute = f"127.0.0.1:{silent.getsockname()[1]}"
        args = ["--target-timeout", "0.3", "--retry-backoff", "0.05"]
        with purge_broadcaster(workdir, [mute, pods.targets[1]], args, name="pb-mute") as server:
            began = time.monotonic()
            resp = purge(server, PATH)
            took = time.monotonic() - began
    assert resp.status == 502
    listed = resp.json()["targets"]
    assert listed[0]["status"] is None and "no answer" in listed[0]["error"]
    assert listed[0]["attempts"] == 3 and listed[0]["ms"] >= 3 * 300 + 50 + 100 - 20
    assert listed[1]["status"] == 200 and listed[1]["ms"] < 500  # concurrently, not after the mute one
    assert 1.0 <= took < 3.0  # answered only when done, and retries are bounded


def test_no_targets_is_503(workdir: Path) -> None:
    with purge_broadcaster(workdir, [], name="pb-none") as server:
        resp = purge(server, PATH)
        assert resp.status == 503
        assert resp.json()["targets"] == [] and resp.json()["error"]["type"] == "no_targets"


def test_a_token_is_required_when_configured(workdir: Path, pods: Pods) -> None:
    token = uuid.uuid4().hex
    path = workdir / "purge-token"
    path.write_text(f"{token}\n")
    with purge_broadcaster(workdir, pods.targets, ["--token-file", str(path)], name="pb-token") as server:
        digest = cached(pods)
        for headers in ({}, {"Authorization": f"Bearer {token[:-1]}x"}, {"Authorization": f"Basic {token}"}):
            resp = purge(server, PATH, headers)
            assert resp.status == 401, headers
            assert resp.json()["error"]["type"] == "unauthorized"
            assert resp.headers["www-authenticate"] == "Bearer"
        assert states(pods, digest) == ["HIT", "HIT"]
        assert_all_ok(purge(server, PATH, {"Authorization": f"Bearer {token}"}), pods.targets)
        assert states(pods, digest) == ["MISS", "MISS"]


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE"])
def test_other_methods_are_405(broadcaster: PurgeBroadcaster, method: str) -> None:
    resp = request(broadcaster.url + PATH, method=method, body=b"" if method == "POST" else None)
    assert resp.status == 405
    assert resp.json()["error"]["type"] == "method_not_allowed"
    assert resp.headers["allow"] == "PURGE"


def test_a_body_over_the_limit_is_413(workdir: Path, sink: Echo) -> None:
    args = ["--max-body-bytes", "1KiB"]
    with purge_broadcaster(workdir, [f"127.0.0.1:{sink.port}"], args, name="pb-small") as server:
        sent = sink_purges(sink)
        resp = request(server.url + PATH, method="PURGE", body=b"x" * 2048)
        assert resp.status == 413
        assert resp.json()["error"]["type"] == "too_large"
        assert request(server.url + PATH, method="PURGE", body=b"x" * 100).status == 200
        assert sink_purges(sink) == sent + 1


def test_sigterm_stops_it_cleanly(workdir: Path, sink: Echo) -> None:
    with purge_broadcaster(workdir, [f"127.0.0.1:{sink.port}"], name="pb-term") as server:
        assert purge(server, PATH).status == 200
        server.process.stop()
        assert server.process.returncode == 0


# -- the purge log ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def redis(workdir: Path) -> Iterator[RedisServer]:
    try:
        redis_server_binary()
    except Exception as exc:
        pytest.skip(str(exc))
    with redis_server(workdir / "pb-redis", name="pb-redis") as server:
        yield server


def pending(server: PurgeBroadcaster) -> dict[str, list[dict[str, object]]]:
    resp = request(server.url + "/purges", method="GET")
    assert resp.status == 200
    found: dict[str, list[dict[str, object]]] = resp.json()["pending"]
    return found


def test_a_purge_a_stopped_pod_missed_is_replayed_after_a_broadcaster_restart(
    workdir: Path, pods: Pods, redis: RedisServer
) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    args = ["--redis", redis.url, "--redis-prefix", prefix, "--target-timeout", "0.3"]
    args += ["--replay-interval", "0.5"]
    path = f"{PATH}?log={uuid.uuid4().hex}"
    digest = cached(pods, path)
    stopped = pods.b.process.pid  # varnishd runs in its own group: manager and child stop together
    try:
        with purge_broadcaster(workdir, pods.targets, args, name="pb-log-1") as first:
            os.killpg(stopped, signal.SIGSTOP)
            resp = purge(first, path)
            assert resp.status == 502, resp.body
            listed = resp.json()["targets"]
            assert [t["status"] for t in listed] == [200, None]
            assert listed[1]["pending"] is True and "pending" not in listed[0]
            kept = pending(first)
            assert list(kept) == [pods.targets[1]]
            assert [e["purge"] for e in kept[pods.targets[1]]] == [
                {"path": path, "purge_all": False, "keys": []}
            ]
            time.sleep(1.2)  # two replay rounds against the stopped pod: still pending
            assert list(pending(first)) == [pods.targets[1]]
            replays = metric(
                first, "meshkit_purge_replays_total", f'result="failed",target="{pods.targets[1]}"'
            )
            assert replays >= 1  # probed, not taken (labels as printed: sorted)
            assert (
                metric(first, "meshkit_purge_replays_total", f'result="ok",target="{pods.targets[1]}"') == 0
            )
        # the first broadcaster is gone; a new one finds the purge in Redis
        with purge_broadcaster(workdir, pods.targets, args, name="pb-log-2") as second:
            assert list(pending(second)) == [pods.targets[1]]
            os.killpg(stopped, signal.SIGCONT)
            deadline = time.monotonic() + 5
            while pending(second) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert pending(second) == {}
            ok = metric(second, "meshkit_purge_replays_total", f'result="ok",target="{pods.targets[1]}"')
            assert ok == 1
    finally:
        os.killpg(stopped, signal.SIGCONT)
    assert states(pods, digest, path) == ["MISS", "MISS"]  # a: purged at once; b: by the replay


def test_without_a_log_nothing_is_pending(broadcaster: PurgeBroadcaster) -> None:
    assert pending(broadcaster) == {}
    resp = request(broadcaster.url + "/purges", method="DELETE")
    assert resp.status == 405 and resp.headers["allow"] == "GET, PURGE"
