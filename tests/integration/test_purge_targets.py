"""`meshkit purge-broadcaster` with dns: and k8s: targets: a real name this machine resolves
(`localhost`) in front of a real Varnish, and a fake Kubernetes API (`meshkit.harness.fake_kube`, the
real list/watch JSON of `discovery.k8s.io/v1` EndpointSlices) whose endpoints are real Varnish ports on
127.0.0.1, so a PURGE really lands. Changes made to the fake during a test must reach the broadcaster's
set within a second (watch), or within the backoff after an outage.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshkit.harness.daemons import PurgeBroadcaster, echo, meshkit_argv, purge_broadcaster
from meshkit.harness.fake_kube import FakeKube, endpoint
from meshkit.harness.redis import RedisServer
from meshkit.harness.varnish import VarnishServer, varnish_server, varnishd_binary
from meshkit.render import meshkit_vcl

from .conftest import Response, request

pytestmark = pytest.mark.integration

PATH = "/v1/embeddings"
TOKEN = "fake-kube-test-token"


@dataclass(frozen=True)
class Pods:
    a: VarnishServer
    b: VarnishServer

    @property
    def both(self) -> tuple[VarnishServer, VarnishServer]:
        return (self.a, self.b)


@pytest.fixture(scope="module")
def pods(workdir: Path) -> Iterator[Pods]:
    try:
        varnishd_binary()
    except Exception as exc:  # the Debian package is missing
        pytest.skip(str(exc))
    with (
        echo(workdir, ["--name", "origin"], name="pt-origin") as origin,
        varnish_server(workdir, meshkit_vcl(backend=("127.0.0.1", origin.port)), name="pt-varnish-a") as va,
        varnish_server(workdir, meshkit_vcl(backend=("127.0.0.1", origin.port)), name="pt-varnish-b") as vb,
    ):
        yield Pods(va, vb)


@pytest.fixture(scope="module")
def kube() -> Iterator[FakeKube]:
    with FakeKube(token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def token_file(workdir: Path) -> Path:
    path = workdir / "kube-token"
    path.write_text(TOKEN + "\n")
    return path


def kube_args(kube: FakeKube, token_file: Path, *more: str) -> list[str]:
    return ["--kube-api", kube.url, "--kube-token-file", str(token_file), *more]


# -- helpers ------------------------------------------------------------------------------------------
def post(pod: VarnishServer, path: str, digest: str) -> Response:
    return request(
        pod.url + path,
        body=b'{"input": "x"}',
        headers={"content-type": "application/json", "x-body-hash": digest},
    )


def cached(pods: Pods, path: str = PATH) -> str:
    digest = uuid.uuid4().hex
    for pod in pods.both:
        assert [post(pod, path, digest).headers["x-cache"] for _ in range(2)] == ["MISS", "HIT"]
    return digest


def states(pods: Pods, digest: str, path: str = PATH) -> list[str]:
    return [post(pod, path, digest).headers["x-cache"] for pod in pods.both]


def purge(server: PurgeBroadcaster, path: str = PATH) -> Response:
    return request(server.url + path, method="PURGE")


def described(server: PurgeBroadcaster) -> dict[str, Any]:
    resp = request(server.url + "/targets", method="GET")
    assert resp.status == 200, resp.body
    doc: dict[str, Any] = resp.json()
    return doc


def targets(server: PurgeBroadcaster) -> list[str]:
    return [t["target"] for t in described(server)["targets"]]


def readyz(server: PurgeBroadcaster) -> Response:
    return request(server.admin_url + "/readyz", method="GET")


def metric(server: PurgeBroadcaster, name: str, labels: str = "") -> float:
    text = request(f"{server.admin_url}/metrics", method="GET").body.decode()
    wanted = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "")
    found = re.search(rf"^{wanted} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def within(seconds: float, check: Callable[[], bool], what: str) -> float:
    """Poll `check` until true (fail after `seconds`); how long it took."""
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > seconds:
            pytest.fail(f"not within {seconds} s: {what}")
        time.sleep(0.02)
    return time.monotonic() - began


def target(pod: VarnishServer) -> str:
    return f"127.0.0.1:{pod.port}"


def lists(kube: FakeKube, namespace: str) -> int:
    return sum(1 for m, p, q in kube.requests if f"/namespaces/{namespace}/" in p and "watch" not in q)


# -- dns: -----------------------------------------------------------------------------------------------
def test_a_dns_target_is_resolved_and_a_purge_reaches_its_varnish(workdir: Path, pods: Pods) -> None:
    spec = f"dns:localhost:{pods.a.port}"
    with purge_broadcaster(workdir, [spec], ["--resolve-interval", "0.2"], name="pt-dns") as server:
        within(2, lambda: targets(server) == [target(pods.a)], "localhost resolved")
        doc = described(server)
        assert doc["targets"] == [{"target": target(pods.a), "sources": [spec]}]
        source = doc["sources"][0]
        assert source["kind"] == "dns" and source["last_error"] is None and source["resolved_at"] > 0
        assert readyz(server).status == 200
        assert metric(server, "meshkit_purge_targets", f'source="{spec}"') == 1
        digest = cached(pods)
        resp = purge(server)
        assert resp.status == 200, resp.body
        assert [t["target"] for t in resp.json()["targets"]] == [target(pods.a)]
        assert states(pods, digest) == ["MISS", "HIT"]  # b is not behind that name
        first = described(server)["sources"][0]["resolved_at"]
        within(2, lambda: described(server)["sources"][0]["resolved_at"] > first, "re-resolved")


def test_a_name_that_does_not_resolve_gives_no_targets_and_is_counted(workdir: Path) -> None:
    spec = "dns:no-such-varnish.invalid:6081"
    args = ["--resolve-interval", "0.1", "--resolve-timeout", "0.5"]
    with purge_broadcaster(workdir, [spec], args, name="pt-dns-none") as server:
        within(
            3,
            lambda: (
                metric(server, "meshkit_purge_target_source_errors_total", f'kind="resolve",source="{spec}"')
                >= 2
            ),
            "errors counted",
        )
        ready = readyz(server)
        assert ready.status == 503 and ready.json()["reason"] == "no purge targets"
        resp = purge(server)
        assert resp.status == 503 and resp.json()["error"]["type"] == "no_targets"
        assert "no purge targets found yet" in resp.json()["error"]["message"]
        assert described(server)["sources"][0]["last_error"].startswith("resolve:")
        assert "resolution failed" in server.process.log_text()


# -- k8s: -----------------------------------------------------------------------------------------------
def test_the_ready_endpoints_of_the_list_are_the_targets_and_a_purge_lands(
    workdir: Path, pods: Pods, kube: FakeKube, token_file: Path
) -> None:
    ns = f"ns-{uuid.uuid4().hex[:6]}"
    # one slice per pod: both listen on 127.0.0.1 with their own port (a port name resolves per slice)
    kube.put_slice(
        ns,
        "varnish-a",
        "varnish",
        [endpoint("127.0.0.1"), endpoint("127.0.0.9", ready=False)],
        ports=[("http", pods.a.port)],
    )
    kube.put_slice(ns, "varnish-b", "varnish", [endpoint("127.0.0.1")], ports=[("http", pods.b.port)])
    kube.put_slice(ns, "other-x", "other", [endpoint("127.0.0.2")], ports=[("http", pods.a.port)])
    spec = f"k8s:{ns}/varnish:http"
    with purge_broadcaster(workdir, [spec], kube_args(kube, token_file), name="pt-k8s-list") as server:
        within(2, lambda: sorted(targets(server)) == sorted([target(pods.a), target(pods.b)]), "listed")
        source = described(server)["sources"][0]
        assert source["kind"] == "k8s" and source["connected"] and source["slices"] == 2
        assert readyz(server).status == 200
        assert metric(server, "meshkit_purge_targets", f'source="{spec}"') == 2
        digest = cached(pods)
        resp = purge(server)
        assert resp.status == 200, resp.body
        assert states(pods, digest) == ["MISS", "MISS"]
        server.process.stop()  # SIGTERM with a watch open: drained and closed, exit 0
        assert server.process.returncode == 0
    listed = [q for m, p, q in kube.requests if f"/namespaces/{ns}/" in p]
    assert listed[0] == {"labelSelector": "kubernetes.io/service-name=varnish"}
    assert listed[1]["watch"] == "1" and listed[1]["allowWatchBookmarks"] == "true"
    assert int(listed[1]["resourceVersion"]) > 0 and int(listed[1]["timeoutSeconds"]) > 0


def test_added_modified_and_deleted_slices_change_the_set_within_a_second(
    workdir: Path, pods: Pods, kube: FakeKube, token_file: Path
) -> None:
    ns = f"ns-{uuid.uuid4().hex[:6]}"
    a, b = target(pods.a), target(pods.b)
    kube.put_slice(ns, "varnish-a", "varnish", [endpoint("127.0.0.1")], ports=[("http", pods.a.port)])
    with purge_broadcaster(
        workdir, [f"k8s:{ns}/varnish:http"], kube_args(kube, token_file), name="pt-k8s-watch"
    ) as server:
        within(2, lambda: targets(server) == [a], "listed")
        within(2, lambda: kube.watchers >= 1, "watching")
        kube.put_slice(ns, "varnish-b", "varnish", [endpoint("127.0.0.1")], ports=[("http", pods.b.port)])
        assert within(1, lambda: sorted(targets(server)) == sorted([a, b]), "ADDED") < 1
        kube.put_slice(
            ns, "varnish-a", "varnish", [endpoint("127.0.0.1", ready=False)], ports=[("http", pods.a.port)]
        )
        assert within(1, lambda: targets(server) == [b], "MODIFIED to not ready") < 1
        digest = cached(pods)
        assert [t["target"] for t in purge(server).json()["targets"]] == [b]
        assert states(pods, digest) == ["HIT", "MISS"]  # a left the set: not purged
        # terminating but still serving: a target again (it still holds its cache)
        terminating = endpoint("127.0.0.1", ready=False, serving=True, terminating=True)
        kube.put_slice(ns, "varnish-a", "varnish", [terminating], ports=[("http", pods.a.port)])
        assert within(1, lambda: sorted(targets(server)) == sorted([a, b]), "terminating, serving") < 1
        kube.delete_slice(ns, "varnish-a")
        kube.delete_slice(ns, "varnish-b")
        assert within(1, lambda: targets(server) == [], "DELETED") < 1
        assert within(1, lambda: readyz(server).status == 503, "not ready without targets") < 1
        assert purge(server).status == 503
        kube.put_slice(ns, "varnish-b", "varnish", [endpoint("127.0.0.1")], ports=[("http", pods.b.port)])
        within(1, lambda: readyz(server).status == 200, "ready again")
    assert lists(kube, ns) == 1  # all of that on one watch


@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-410"])
def test_an_expired_resource_version_is_listed_again(
    workdir: Path, pods: Pods, kube: FakeKube, token_file: Path, as_http: bool
) -> None:
    ns = f"ns-{uuid.uuid4().hex[:6]}"
    spec = f"k8s:{ns}/varnish:http"
    kube.put_slice(ns, "varnish-a", "varnish", [endpoint("127.0.0.1")], ports=[("http", pods.a.port)])
    args = kube_args(kube, token_file, "--kube-watch-timeout", "1")
    kube.gone_as_http = as_http
    kube.bookmarks = False  # a bookmark at the watch's end would carry it past the compaction
    try:
        with purge_broadcaster(workdir, [spec], args, name="pt-k8s-gone") as server:
            within(2, lambda: targets(server) == [target(pods.a)], "listed")
            within(2, lambda: kube.watchers >= 1, "watching")
            kube.put_slice(ns, "varnish-b", "varnish", [endpoint("127.0.0.1")], ports=[("http", pods.b.port)])
            within(1, lambda: len(targets(server)) == 2, "watched")
            kube.compact()  # the open watch goes on; reopened after timeoutSeconds from its version: 410
            within(3, lambda: lists(kube, ns) >= 2, "listed again")
            gone = f'reason="gone",source="{spec}"'
            assert metric(server, "meshkit_purge_watch_restarts_total", gone) >= 1
            assert sorted(targets(server)) == sorted([target(pods.a), target(pods.b)])
            kube.delete_slice(ns, "varnish-a")  # the watch after the new list works
            within(1, lambda: targets(server) == [target(pods.b)], "watched after the re-list")
    finally:
        kube.gone_as_http, kube.bookmarks = False, True


def test_the_api_going_away_keeps_the_set_and_it_reconnects(
    workdir: Path, pods: Pods, token_file: Path
) -> None:
    ns = "cache"
    with FakeKube(token=TOKEN) as kube:
        kube.put_slice(ns, "varnish-a", "varnish", [endpoint("127.0.0.1")], ports=[("http", pods.a.port)])
        spec = f"k8s:{ns}/varnish:http"
        with purge_broadcaster(workdir, [spec], kube_args(kube, token_file), name="pt-k8s-restart") as server:
            within(2, lambda: targets(server) == [target(pods.a)], "listed")
            kube.stop()
            within(2, lambda: not described(server)["sources"][0]["connected"], "noticed")
            assert targets(server) == [target(pods.a)] and readyz(server).status == 200  # kept
            digest = cached(pods)
            assert purge(server).status == 200
            assert states(pods, digest) == ["MISS", "HIT"]
            errors = f'kind="connection",source="{spec}"'
            within(
                2, lambda: metric(server, "meshkit_purge_target_source_errors_total", errors) >= 1, "counted"
            )
            kube.put_slice(ns, "varnish-b", "varnish", [endpoint("127.0.0.1")], ports=[("http", pods.b.port)])
            kube.start()  # the same port
            within(5, lambda: len(targets(server)) == 2, "reconnected and listed")
            assert described(server)["sources"][0]["connected"]
            assert (
                metric(server, "meshkit_purge_watch_restarts_total", f'reason="error",source="{spec}"') >= 1
            )


def test_watches_cut_at_once_are_reopened_with_a_backoff_not_in_a_loop(
    workdir: Path, pods: Pods, kube: FakeKube, token_file: Path
) -> None:
    ns = f"ns-{uuid.uuid4().hex[:6]}"
    kube.put_slice(ns, "varnish-a", "varnish", [endpoint("127.0.0.1")], ports=[("http", pods.a.port)])
    kube.cut_watches = True
    try:
        with purge_broadcaster(
            workdir, [f"k8s:{ns}/varnish:http"], kube_args(kube, token_file), name="pt-cut"
        ) as server:
            within(2, lambda: targets(server) == [target(pods.a)], "listed")
            time.sleep(1.5)  # what is measured: how many watches 1.5 s of cut watches make
            watches = sum(1 for m, p, q in kube.requests if f"/namespaces/{ns}/" in p and "watch" in q)
            assert 2 <= watches <= 8, watches  # 0.2 + 0.4 + 0.8 s of backoff, not hundreds
            assert targets(server) == [target(pods.a)]  # the set is kept
    finally:
        kube.cut_watches = False


def test_a_wrong_token_is_logged_gives_no_targets_and_a_rotated_one_is_read(
    workdir: Path, pods: Pods, kube: FakeKube
) -> None:
    ns = f"ns-{uuid.uuid4().hex[:6]}"
    kube.put_slice(ns, "varnish-a", "varnish", [endpoint("127.0.0.1")], ports=[("http", pods.a.port)])
    wrong = workdir / f"token-{ns}"
    wrong.write_text("not-the-token\n")
    spec = f"k8s:{ns}/varnish:http"
    with purge_broadcaster(workdir, [spec], kube_args(kube, wrong), name="pt-k8s-token") as server:
        kind = f'kind="unauthorized",source="{spec}"'
        within(2, lambda: metric(server, "meshkit_purge_target_source_errors_total", kind) >= 1, "refused")
        assert targets(server) == []
        ready = readyz(server)
        assert ready.status == 503 and ready.json()["reason"] == "no purge targets"
        assert purge(server).status == 503
        assert "HTTP 401" in described(server)["sources"][0]["last_error"]
        assert "HTTP 401" in server.process.log_text()
        assert TOKEN not in server.process.log_text() and "not-the-token" not in server.process.log_text()
        wrong.write_text(TOKEN + "\n")  # the projected token rotated
        within(5, lambda: targets(server) == [target(pods.a)], "the new token read")
        assert readyz(server).status == 200


def test_k8s_options_are_checked_at_start(workdir: Path, token_file: Path) -> None:
    for args, says in [
        (["--targets", "k8s:cache/varnish:http"], "KUBERNETES_SERVICE_HOST"),
        (
            [
                "--targets",
                "k8s:cache/varnish:http",
                "--kube-api",
                "http://127.0.0.1:1",
                "--kube-token-file",
                str(workdir / "absent"),
            ],
            "--kube-token-file",
        ),
        (["--targets", "10.0.0.1:80,k8s:Cache/varnish:http"], "k8s:NAMESPACE/SERVICE:PORT"),
        (["--targets", "dns:varnish"], "dns:NAME:PORT"),
        (
            [
                "--targets",
                "k8s:varnish:80",
                "--kube-api",
                "http://127.0.0.1:1",
                "--kube-token-file",
                str(token_file),
            ],
            "namespace",
        ),
        (["--targets", "k8s:cache/varnish:80", "--kube-watch-timeout", "0"], "1 to 3600"),
    ]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        done = subprocess.run(
            meshkit_argv(
                "purge-broadcaster", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", *args
            ),
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            check=False,
        )
        assert done.returncode == 2, (args, done.stderr)
        assert says in done.stderr and "Traceback" not in done.stderr


# -- the purge log and targets that leave ----------------------------------------------------------
def test_a_target_away_for_a_while_gets_the_purges_it_missed_when_it_comes_back(
    workdir: Path, pods: Pods, kube: FakeKube, token_file: Path, redis: RedisServer
) -> None:
    ns = f"ns-{uuid.uuid4().hex[:6]}"
    a, b = target(pods.a), target(pods.b)
    kube.put_slice(ns, "varnish-a", "varnish", [endpoint("127.0.0.1")], ports=[("http", pods.a.port)])
    kube.put_slice(ns, "varnish-b", "varnish", [endpoint("127.0.0.1")], ports=[("http", pods.b.port)])
    args = kube_args(kube, token_file, "--redis", redis.url, "--replay-interval", "0.2")
    with purge_broadcaster(workdir, [f"k8s:{ns}/varnish:http"], args, name="pt-departed") as server:
        within(2, lambda: len(targets(server)) == 2, "listed")
        digest = cached(pods)
        kube.put_slice(
            ns, "varnish-b", "varnish", [endpoint("127.0.0.1", ready=False)], ports=[("http", pods.b.port)]
        )
        within(1, lambda: targets(server) == [a], "b unready")
        resp = purge(server)
        assert resp.status == 200 and [t["target"] for t in resp.json()["targets"]] == [a]
        kept = request(server.url + "/purges", method="GET").json()
        assert kept["departed"] == [b] and [e["purge"]["path"] for e in kept["pending"][b]] == [PATH]
        assert states(pods, digest) == ["MISS", "HIT"]  # b still holds it while away
        kube.put_slice(ns, "varnish-b", "varnish", [endpoint("127.0.0.1")], ports=[("http", pods.b.port)])
        within(3, lambda: request(server.url + "/purges", method="GET").json()["pending"] == {}, "replayed")
        assert states(pods, digest)[1] == "MISS"
        assert metric(server, "meshkit_purge_replays_total", f'result="ok",target="{b}"') == 1


def test_a_target_gone_longer_than_departed_keep_has_its_purges_dropped(
    workdir: Path, pods: Pods, kube: FakeKube, token_file: Path, redis: RedisServer
) -> None:
    ns = f"ns-{uuid.uuid4().hex[:6]}"
    a, b = target(pods.a), target(pods.b)
    kube.put_slice(ns, "varnish-a", "varnish", [endpoint("127.0.0.1")], ports=[("http", pods.a.port)])
    kube.put_slice(ns, "varnish-b", "varnish", [endpoint("127.0.0.1")], ports=[("http", pods.b.port)])
    args = kube_args(
        kube, token_file, "--redis", redis.url, "--replay-interval", "0.2", "--departed-keep", "0.5"
    )
    with purge_broadcaster(workdir, [f"k8s:{ns}/varnish:http"], args, name="pt-expired") as server:
        within(2, lambda: len(targets(server)) == 2, "listed")
        kube.delete_slice(ns, "varnish-b")
        within(1, lambda: targets(server) == [a], "b deleted")
        assert purge(server).status == 200
        assert list(request(server.url + "/purges", method="GET").json()["pending"]) == [b]
        within(3, lambda: request(server.url + "/purges", method="GET").json()["pending"] == {}, "dropped")
        assert metric(server, "meshkit_purge_replays_total", f'result="expired",target="{b}"') == 1
        assert request(server.url + "/purges", method="GET").json()["departed"] == []


def self_signed(workdir: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, made by the openssl command."""
    cert, key = workdir / "fake-kube.crt", workdir / "fake-kube.key"
    if not cert.exists():
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
                *("-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=fake-kube"),
                *("-addext", "subjectAltName=IP:127.0.0.1"),
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
    return cert, key


def test_https_with_the_api_servers_ca_and_not_without_it(
    workdir: Path, pods: Pods, token_file: Path
) -> None:
    if subprocess.run(["which", "openssl"], capture_output=True, check=False).returncode != 0:
        pytest.skip("no openssl command to make a certificate")
    cert, key = self_signed(workdir)
    with FakeKube(token=TOKEN, tls=(cert, key)) as kube:
        kube.put_slice(
            "cache", "varnish-a", "varnish", [endpoint("127.0.0.1")], ports=[("http", pods.a.port)]
        )
        spec = "k8s:cache/varnish:http"
        args = kube_args(kube, token_file, "--kube-ca-file", str(cert))
        with purge_broadcaster(workdir, [spec], args, name="pt-k8s-tls") as server:
            within(3, lambda: targets(server) == [target(pods.a)], "listed over HTTPS")
        other_ca = Path("/etc/ssl/certs/ca-certificates.crt")
        if other_ca.exists():  # a CA that did not sign it: refused, counted, no targets
            args = kube_args(kube, token_file, "--kube-ca-file", str(other_ca))
            with purge_broadcaster(workdir, [spec], args, name="pt-k8s-tls-bad") as server:
                errors = f'kind="connection",source="{spec}"'
                within(
                    3,
                    lambda: metric(server, "meshkit_purge_target_source_errors_total", errors) >= 1,
                    "refused",
                )
                assert targets(server) == [] and "CERTIFICATE_VERIFY_FAILED" in server.process.log_text()
