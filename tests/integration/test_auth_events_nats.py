"""EventPublisher against a real nats-server: subjects and JSON as received by a real subscriber, the
heartbeat, NATS absent at start, stopped and restarted, and stopped with SIGSTOP (slow: it accepts
bytes until the kernel buffers are full, then nothing)."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.subscription import Subscription

from meshkit.errors import HarnessError
from meshkit.extproc.auth.events import EventPublisher
from meshkit.harness.nats import NatsServer, nats_server, nats_server_binary
from meshkit.harness.process import ManagedProcess
from meshkit.nats_flush import flushed

pytestmark = pytest.mark.integration

PREFIX = "gw.test"


@pytest.fixture(autouse=True)
def _require_nats() -> None:
    try:
        nats_server_binary()
    except HarnessError as exc:
        pytest.skip(str(exc))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def nats_on_port(workdir: Path, port: int) -> Iterator[ManagedProcess]:
    """nats-server on a port we chose (the harness picks a random one): to appear on, or come back to,
    an address the publisher already knows."""
    proc = ManagedProcess(
        f"nats-{port}",
        [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)],
        log_dir=workdir,
        ready=lambda p: "Server is ready" in p.log_text(),
        cwd=workdir,
        start_timeout=15.0,
    )
    with proc:
        yield proc


def event(n: int, **extra: Any) -> dict[str, Any]:
    return {
        "ts": 1_700_000_000.0 + n,
        "subject": f"user-{n}",
        "method": "api-key",
        "reason": None,
        "path": "/v1/embeddings",
        "client_ip": "10.1.2.3",
        "request_id": f"req-{n}",
        **extra,
    }


async def subscriber(url: str) -> tuple[Client, Subscription]:
    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
    sub = await nc.subscribe(f"{PREFIX}.>")
    await flushed(nc)
    return nc, sub


async def receive_until(
    sub: Subscription, done: Callable[[list[tuple[str, dict[str, Any]]]], bool], within: float = 10.0
) -> list[tuple[str, dict[str, Any]]]:
    """Messages (subject, JSON body) until `done(messages)` holds; fails after `within` s."""
    got: list[tuple[str, dict[str, Any]]] = []
    deadline = time.monotonic() + within
    while not done(got):
        left = deadline - time.monotonic()
        assert left > 0, f"gave up after {within} s with {len(got)} messages: {got[-3:]}"
        try:
            msg = await sub.next_msg(timeout=min(left, 1.0))
        except nats.errors.TimeoutError:
            continue
        got.append((msg.subject, json.loads(msg.data)))
    return got


async def until(check: Callable[[], bool], within: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.01)


def auth_events(got: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    return [(s, b) for s, b in got if not s.endswith(".service.health")]


def request_ids(got: list[tuple[str, dict[str, Any]]]) -> set[str]:
    return {b["request_id"] for _, b in auth_events(got)}


async def closing(pub: EventPublisher, then: Callable[[], Awaitable[Any]] | None = None) -> None:
    began = time.monotonic()
    await pub.close()
    assert time.monotonic() - began < 2.0
    if then is not None:
        await then()


@pytest.fixture
def nats_srv(tmp_path: Path) -> Iterator[NatsServer]:
    with nats_server(tmp_path, jetstream=False) as server:
        yield server


# -- the messages ----------------------------------------------------------------------------------
async def test_events_arrive_on_their_subjects_with_the_callers_json_and_a_periodic_heartbeat(
    nats_srv: NatsServer,
) -> None:
    nc, sub = await subscriber(nats_srv.url)
    pub = EventPublisher(nats_srv.url, prefix=PREFIX, heartbeat_interval=0.2, server_id="gw-7")
    try:
        await pub.start()
        assert pub.connected
        ok, bad = event(1), event(2, reason="expired", method="jwt", subject=None)
        pub.emit("auth.success", ok)
        pub.emit("auth.failure", bad)
        began = time.monotonic()
        got = await receive_until(sub, lambda g: len(g) - len(auth_events(g)) >= 4)
        elapsed = time.monotonic() - began
    finally:
        await closing(pub, nc.close)

    assert auth_events(got) == [
        (f"{PREFIX}.auth.success", {**ok, "server": "gw-7"}),
        (f"{PREFIX}.auth.failure", {**bad, "server": "gw-7"}),
    ]
    beats = [b for s, b in got if s == f"{PREFIX}.service.health"]
    assert 0.4 <= elapsed < 2.0, elapsed  # 4 beats: one on connect, then every 0.2 s
    for beat in beats:
        assert set(beat) == {
            "ts",
            "server",
            "pid",
            "started_at",
            "uptime_s",
            "version",
            "events_published",
            "events_dropped",
        }
        assert beat["server"] == "gw-7"
        assert beat["version"] == "0.1.0"
        assert beat["events_dropped"] == 0
    gaps = [b["ts"] - a["ts"] for a, b in itertools.pairwise(beats[1:])]
    assert all(0.19 <= gap <= 1.0 for gap in gaps), gaps
    assert beats[-1]["events_published"] == 2
    assert beats[-1]["uptime_s"] > beats[1]["uptime_s"]
    assert pub.published["auth.success"] == 1
    assert pub.published["auth.failure"] == 1


async def test_another_prefix_is_another_subject_tree(nats_srv: NatsServer) -> None:
    nc, sub = await subscriber(nats_srv.url)
    other = EventPublisher(nats_srv.url, prefix="elsewhere", heartbeat_interval=60)
    ours = EventPublisher(nats_srv.url, prefix=PREFIX, heartbeat_interval=60)
    try:
        await other.start()
        await ours.start()
        other.emit("auth.success", event(1))
        await until(lambda: other.published["auth.success"] == 1)
        ours.emit("auth.success", event(2))
        got = await receive_until(sub, lambda g: len(auth_events(g)) >= 1)
        await asyncio.sleep(0.2)
    finally:
        await closing(other)
        await closing(ours, nc.close)
    assert request_ids(got) == {"req-2"}
    assert sub.pending_msgs == 0


# -- NATS absent, lost, slow -----------------------------------------------------------------------
async def test_nats_absent_at_start_then_appearing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="meshkit.extproc.auth.events")
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    pub = EventPublisher(url, prefix=PREFIX, queue_size=100, connect_timeout=0.5, heartbeat_interval=60)
    try:
        began = time.monotonic()
        await pub.start()
        assert time.monotonic() - began < 0.5 + 0.4
        assert not pub.connected

        began = time.perf_counter()
        for n in range(10_000):
            pub.emit("auth.failure", event(n))
        assert time.perf_counter() - began < 0.1
        assert pub.queued == 100  # the outage buffer is the bounded queue
        assert pub.dropped["disconnected"] == 9_900

        with nats_on_port(tmp_path, port):
            await until(lambda: pub.connected, what="publisher connected to the late server")
            # What waited in the queue went out once connected.
            await until(lambda: pub.queued == 0 and pub.published["auth.failure"] == 100)
            nc, sub = await subscriber(url)
            try:
                pub.emit("auth.success", event(20_000))
                got = await receive_until(sub, lambda g: len(auth_events(g)) >= 1)
                assert request_ids(got) == {"req-20000"}
            finally:
                await nc.close()
                await closing(pub)
    finally:
        await pub.close()
    lines = [r.getMessage() for r in caplog.records]
    assert sum("not reachable" in line for line in lines) == 1, lines
    assert sum("connected to NATS" in line for line in lines) == 1, lines


async def test_nats_stopped_mid_run_and_restarted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="meshkit.extproc.auth.events")
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    pub = EventPublisher(url, prefix=PREFIX, queue_size=50, heartbeat_interval=60)
    try:
        with nats_on_port(tmp_path, port):
            await pub.start()
            assert pub.connected
            nc, sub = await subscriber(url)
            pub.emit("auth.success", event(1))
            got = await receive_until(sub, lambda g: len(auth_events(g)) >= 1)
            assert request_ids(got) == {"req-1"}
            await nc.close()
        # The server is gone (SIGTERM, then waited for): the publisher sees it and keeps events.
        await until(lambda: not pub.connected, what="publisher noticed the server stopped")
        published_before = pub.published["auth.success"]
        began = time.perf_counter()
        for n in range(100, 200):
            pub.emit("auth.success", event(n))
        assert time.perf_counter() - began < 0.05
        assert pub.queued == 50  # bounded
        assert pub.dropped["disconnected"] == 50
        assert pub.dropped["queue_full"] == 0
        await asyncio.sleep(1.2)  # a few reconnect attempts (every 0.5 s) meanwhile
        assert pub.queued == 50

        with nats_on_port(tmp_path, port):
            await until(lambda: pub.connected, what="publisher reconnected")
            await until(lambda: pub.queued == 0)
            assert pub.published["auth.success"] == published_before + 50
            nc, sub = await subscriber(url)
            try:
                pub.emit("auth.success", event(300))
                got = await receive_until(sub, lambda g: len(auth_events(g)) >= 1)
                assert request_ids(got) == {"req-300"}
            finally:
                await nc.close()
                await closing(pub)
    finally:
        await pub.close()
    lines = [r.getMessage() for r in caplog.records]
    assert sum("connection lost" in line for line in lines) == 1, lines
    assert sum("connection back" in line for line in lines) == 1, lines


@contextmanager
def stopped(server: NatsServer) -> Iterator[None]:
    """The server process frozen with SIGSTOP (its TCP connections stay open); always SIGCONT."""
    server.process.signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.process.signal(signal.SIGCONT)


async def fill_until_dropped(pub: EventPublisher, within: float = 20.0) -> tuple[int, float, float]:
    """Emit 1 KiB events in bursts smaller than the queue, letting the publisher run in between, until
    it drops one; returns (emitted, slowest emit, total time inside emit())."""
    padding = "x" * 1024
    emitted, slowest, total = 0, 0.0, 0.0
    deadline = time.monotonic() + within
    while pub.dropped["queue_full"] == 0:
        assert time.monotonic() < deadline, f"no drop after {emitted} events: {pub.dropped}"
        for _ in range(pub.queue_size // 4):
            began = time.perf_counter()
            pub.emit("auth.success", event(emitted, padding=padding))
            took = time.perf_counter() - began
            slowest, total = max(slowest, took), total + took
            emitted += 1
        await asyncio.sleep(0.005)
    return emitted, slowest, total


async def test_slow_nats_never_blocks_emit_drops_are_counted_and_it_flows_again(
    nats_srv: NatsServer,
) -> None:
    nc, sub = await subscriber(nats_srv.url)
    pub = EventPublisher(nats_srv.url, prefix=PREFIX, queue_size=200, heartbeat_interval=60)
    try:
        await pub.start()
        assert pub.connected
        with stopped(nats_srv):
            emitted, slowest, total = await fill_until_dropped(pub)
            # Still connected: NATS is slow, not gone. Memory stays bounded by the queue.
            assert pub.connected
            assert pub.queued == 200
            assert pub.dropped["disconnected"] == 0
            assert slowest < 0.05, slowest  # a blocked emit would take as long as the freeze (seconds)
            assert total / emitted < 50e-6, (total, emitted)
            dropped = pub.dropped["queue_full"]
            for n in range(100):
                pub.emit("auth.failure", event(n))
            assert pub.dropped["queue_full"] == dropped + 100
        # Flowing again: the queue empties, and an event emitted now reaches the subscriber.
        await until(lambda: pub.queued == 0, within=20)
        pub.emit("auth.failure", event(10**6))
        got = await receive_until(sub, lambda g: f"req-{10**6}" in request_ids(g), 30)
        # Every event that was not dropped arrives once: nothing lost in the freeze, nothing doubled.
        assert len(auth_events(got)) == emitted - dropped + 1
        assert len(request_ids(got)) == emitted - dropped + 1
    finally:
        await closing(pub, nc.close)


# -- close() never hangs ---------------------------------------------------------------------------
async def test_close_with_nats_gone_returns_within_its_deadline(tmp_path: Path) -> None:
    port = free_port()
    pub = EventPublisher(f"nats://127.0.0.1:{port}", prefix=PREFIX, queue_size=50)
    with nats_on_port(tmp_path, port):
        await pub.start()
        assert pub.connected
    await until(lambda: not pub.connected)
    for n in range(10):
        pub.emit("auth.success", event(n))
    began = time.monotonic()
    await pub.close()
    assert time.monotonic() - began < 1.5 + 0.5
    assert pub.dropped["closed"] == 10
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


async def test_close_with_nats_frozen_returns_within_its_deadline(nats_srv: NatsServer) -> None:
    pub = EventPublisher(nats_srv.url, prefix=PREFIX, queue_size=200)
    await pub.start()
    try:
        with stopped(nats_srv):
            await fill_until_dropped(pub)
            began = time.monotonic()
            await pub.close()
            assert time.monotonic() - began < 1.5 + 0.5
            assert pub.queued == 0
            assert pub.dropped["closed"] == 200
    finally:
        await pub.close()
