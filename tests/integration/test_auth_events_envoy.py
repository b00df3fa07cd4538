"""Auth events on a real NATS from a real meshkit behind a real Envoy (all three paths): what a
subscriber receives, the heartbeat, and that a NATS that is down or frozen never slows a request."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml

from meshkit.harness.daemons import Echo, Extproc, extproc
from meshkit.harness.envoy import Envoy
from meshkit.harness.nats import NatsServer, nats_server
from meshkit.nats_flush import flushed
from meshkit.render import Api

from .conftest import front, request

pytestmark = pytest.mark.integration

KEY = "mk_events_0123456789abcdef"
PREFIX = "test.gw"


@pytest.fixture(scope="module")
def nats_srv(workdir: Path) -> Iterator[NatsServer]:
    with nats_server(workdir / "nats", jetstream=False, name="events-nats") as server:
        yield server


def _keys(workdir: Path) -> Path:
    path = workdir / "events-keys.yaml"
    path.write_text(
        yaml.safe_dump([{"sha256": hashlib.sha256(KEY.encode()).hexdigest(), "subject": "svc-events"}])
    )
    return path


@pytest.fixture(scope="module")
def meshkit_server(workdir: Path, nats_srv: NatsServer) -> Iterator[Extproc]:
    args = [
        "--filters",
        "auth",
        "--api-keys-file",
        str(_keys(workdir)),
        "--nats",
        nats_srv.url,
        "--event-prefix",
        PREFIX,
    ]
    with extproc(workdir, args, name="meshkit-events") as server:
        yield server


@pytest.fixture(scope="module", params=["ext_proc", "ext_authz", "ext_authz_http"])
def ingress(
    request: pytest.FixtureRequest, workdir: Path, upstream: Echo, meshkit_server: Extproc
) -> Iterator[Envoy]:
    with front(workdir, upstream, meshkit_server, request.param, filters=("auth",)) as proxy:
        yield proxy


def call(proxy: Envoy, key: str | None, path: str = "/v1/chat/completions") -> int:
    headers = {"x-api-key": key} if key else {}
    spoofed = {"x-request-id": "req-42", "x-forwarded-for": "6.6.6.6"}
    return request(proxy.url(path=path), body=b"{}", headers={**spoofed, **headers}).status


async def _collect(
    url: str, subject: str, action: Any, want: int, within: float = 5.0
) -> list[dict[str, Any]]:
    nc = await nats.connect(url)
    got: list[dict[str, Any]] = []
    try:
        sub = await nc.subscribe(subject)
        await flushed(nc)
        await asyncio.to_thread(action)
        deadline = time.monotonic() + within
        while len(got) < want and time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                break
            got.append({**json.loads(msg.data), "nats_subject": msg.subject})
    finally:
        await nc.close()
    return got


def test_success_and_failure_events_arrive(ingress: Envoy, nats_srv: NatsServer) -> None:
    def action() -> None:
        assert call(ingress, KEY) == 200
        assert call(ingress, "mk_nobody_0123456789", path="/v1/embeddings") == 401

    got = asyncio.run(_collect(nats_srv.url, f"{PREFIX}.auth.>", action, want=2))
    by_subject = {e["nats_subject"]: e for e in got}
    success = by_subject[f"{PREFIX}.auth.success"]
    assert success["reason"] == "ok"
    assert success["subject"] == "svc-events"
    assert success["method"] == "api-key"
    assert success["path"] == "/v1/chat/completions"
    # The peer Envoy saw (for a loopback peer Envoy names this host's own address), never what the
    # client wrote into x-forwarded-for.
    assert ipaddress.ip_address(success["client_ip"])
    assert success["client_ip"] != "6.6.6.6"
    # Envoy's own id (use_remote_address: a client's x-request-id is not trusted), as in meshkit's logs.
    assert uuid.UUID(success["request_id"])
    assert isinstance(success["ts"], float) and abs(success["ts"] - time.time()) < 60
    failure = by_subject[f"{PREFIX}.auth.failure"]
    assert failure["reason"] == "unknown_key"
    assert failure["path"] == "/v1/embeddings"
    assert failure["method"] is None
    assert failure["subject"] is None


def test_heartbeat_arrives(nats_srv: NatsServer, meshkit_server: Extproc) -> None:
    got = asyncio.run(_collect(nats_srv.url, f"{PREFIX}.service.health", lambda: None, want=1, within=12.0))
    assert got, "no heartbeat within 12 s"
    assert got[0]["server"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _timed_calls(proxy: Envoy, n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.monotonic()
        assert call(proxy, KEY) == 200
        times.append(time.monotonic() - started)
    return sorted(times)


def test_nats_absent_never_slows_requests(workdir: Path, upstream: Echo) -> None:
    args = [
        "--filters",
        "auth",
        "--api-keys-file",
        str(_keys(workdir)),
        "--nats",
        f"nats://127.0.0.1:{_free_port()}",
    ]
    started = time.monotonic()
    with extproc(workdir, args, name="meshkit-no-nats") as server:
        assert time.monotonic() - started < 10  # the start does not wait for NATS
        with front(workdir, upstream, server, Api.EXT_AUTHZ_HTTP, filters=("auth",)) as proxy:
            times = _timed_calls(proxy, 200)
    # No request waits for NATS (a connect attempt alone would take its 2 s connect timeout).
    assert times[-1] < 1.0, times[-5:]
    assert times[len(times) // 2] < 0.1, times[len(times) // 2]


def test_frozen_nats_never_slows_requests(workdir: Path, upstream: Echo) -> None:
    with nats_server(workdir / "frozen-nats", jetstream=False, name="frozen-nats") as frozen:
        args = ["--filters", "auth", "--api-keys-file", str(_keys(workdir)), "--nats", frozen.url]
        with (
            extproc(workdir, args, name="meshkit-frozen-nats") as server,
            front(workdir, upstream, server, Api.EXT_PROC, filters=("auth",)) as proxy,
        ):
            assert call(proxy, KEY) == 200
            frozen.process.signal(signal.SIGSTOP)
            try:
                times = _timed_calls(proxy, 300)
            finally:
                frozen.process.signal(signal.SIGCONT)
            assert times[-1] < 1.0, times[-5:]
            assert call(proxy, KEY) == 200
