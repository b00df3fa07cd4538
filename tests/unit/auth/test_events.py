"""EventPublisher without a NATS server: prefix validation, the bounded queue and its drop counters,
the metrics, and start()/close() staying within their deadlines when nothing listens."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import pytest
from prometheus_client import CollectorRegistry

from meshkit.extproc.auth.events import EventPublisher, validate_prefix


def free_port() -> int:
    """A loopback port with nothing listening on it (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nowhere() -> str:
    return f"nats://127.0.0.1:{free_port()}"


EVENT = {
    "ts": 1.0,
    "subject": "alice",
    "method": "jwt",
    "reason": None,
    "path": "/v1/chat/completions",
    "client_ip": "10.0.0.1",
    "request_id": "r-1",
}


@pytest.mark.parametrize("prefix", ["a.*", "a.>", "a..b", "a b", "", ".a", "a.", ">", "*", "a\tb", "ü"])
def test_bad_prefixes_are_refused_with_a_clear_message(prefix: str) -> None:
    with pytest.raises(ValueError, match="event prefix") as info:
        EventPublisher("nats://127.0.0.1:4222", prefix=prefix)
    assert "'*'" in str(info.value)
    assert "empty tokens" in str(info.value)


@pytest.mark.parametrize("prefix", ["meshkit", "prod.gateway", "a-b.c_d.E9"])
def test_good_prefixes_make_the_subjects(prefix: str) -> None:
    assert validate_prefix(prefix) == prefix
    pub = EventPublisher("nats://127.0.0.1:4222", prefix=prefix)
    assert pub.subject("auth.success") == f"{prefix}.auth.success"
    assert pub.subject("auth.failure") == f"{prefix}.auth.failure"
    assert pub.subject("service.health") == f"{prefix}.service.health"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"queue_size": 0},
        {"heartbeat_interval": 0},
        {"connect_timeout": -1},
        {"heartbeat_interval": float("nan")},
    ],
)
def test_bad_numbers_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        EventPublisher("nats://127.0.0.1:4222", **kwargs)  # type: ignore[arg-type]


def test_server_id_defaults_to_host_and_pid() -> None:
    pub = EventPublisher("nats://127.0.0.1:4222")
    assert pub.server_id == f"{socket.gethostname()}:{os.getpid()}"
    assert EventPublisher("nats://127.0.0.1:4222", server_id="gw-1").server_id == "gw-1"


def test_an_unknown_kind_is_a_caller_bug() -> None:
    pub = EventPublisher("nats://127.0.0.1:4222")
    with pytest.raises(ValueError, match=r"auth\.success"):
        pub.emit("auth.maybe", EVENT)
    assert pub.queued == 0


def test_the_queue_is_bounded_and_drops_are_counted_by_reason() -> None:
    pub = EventPublisher("nats://127.0.0.1:4222", queue_size=3)
    for _ in range(5):
        pub.emit("auth.success", EVENT)
    assert pub.queued == 3
    # Not connected (never started): the queue is the outage buffer, what does not fit is "disconnected".
    assert pub.dropped["disconnected"] == 2
    assert pub.dropped["queue_full"] == 0


def test_emit_copies_the_event_and_adds_only_the_server() -> None:
    pub = EventPublisher("nats://127.0.0.1:4222", server_id="gw-1")
    event = dict(EVENT)
    pub.emit("auth.failure", event)
    event["subject"] = "mallory"  # the caller reusing its dict does not change what was queued
    assert list(pub._queue) == [("auth.failure", {**EVENT, "server": "gw-1"})]
    pub.emit("auth.failure", {**EVENT, "server": "caller-chose"})
    assert pub._queue[-1][1]["server"] == "caller-chose"


def test_collectors_expose_the_counters_and_gauges() -> None:
    pub = EventPublisher("nats://127.0.0.1:4222", queue_size=2)
    registry = CollectorRegistry()
    for collector in pub.collectors():
        registry.register(collector)
    for _ in range(3):
        pub.emit("auth.success", EVENT)
    pub.published["auth.failure"] = 7

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("meshkit_auth_events_dropped_total", reason="disconnected") == 1
    assert value("meshkit_auth_events_dropped_total", reason="queue_full") == 0
    assert value("meshkit_auth_events_published_total", kind="auth.failure") == 7
    assert value("meshkit_auth_events_published_total", kind="auth.success") == 0
    assert value("meshkit_auth_events_queued") == 2
    assert value("meshkit_auth_events_nats_connected") == 0


async def test_start_without_nats_returns_within_connect_timeout_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="meshkit.extproc.auth.events")
    pub = EventPublisher(nowhere(), connect_timeout=0.3, queue_size=100)
    began = time.monotonic()
    await pub.start()
    took = time.monotonic() - began
    try:
        assert took < 0.3 + 0.4, took
        assert not pub.connected
        began = time.perf_counter()
        for _ in range(10_000):
            pub.emit("auth.failure", EVENT)
        emitting = time.perf_counter() - began
        assert emitting < 0.1, emitting
        assert pub.queued == 100
        assert pub.dropped["disconnected"] == 9_900
        # Retries go on in the background (every 0.5 s) without a warning each.
        await asyncio.sleep(1.2)
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "not reachable" in warnings[0].getMessage()
    finally:
        began = time.monotonic()
        await pub.close()
        assert time.monotonic() - began < 2.0
    assert pub.queued == 0
    assert pub.dropped["closed"] == 100
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    pub.emit("auth.success", EVENT)  # after close(): dropped, counted, no error
    assert pub.dropped["closed"] == 101


async def test_close_is_idempotent_and_works_without_start() -> None:
    pub = EventPublisher(nowhere())
    pub.emit("auth.success", EVENT)
    await pub.close()
    await pub.close()
    assert pub.dropped["closed"] == 1


@pytest.mark.parametrize("after", [0.0, 0.2, 0.45, 0.7, 1.2])
async def test_close_while_connecting_leaves_no_task_behind(after: float) -> None:
    # Retries come every 0.5 s: closing on that beat (0.3 s in start() + `after`) is where Python 3.11's
    # wait_for can lose a cancel, which left nats-py's connect loop retrying forever.
    pub = EventPublisher(nowhere(), connect_timeout=0.3)
    await pub.start()
    await asyncio.sleep(after)
    began = time.monotonic()
    await pub.close()
    assert time.monotonic() - began < 2.0
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert others == []


async def test_the_url_in_log_lines_has_no_password(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    pub = EventPublisher(f"nats://user:s3cret@127.0.0.1:{port}", connect_timeout=0.1)
    await pub.start()
    await pub.close()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"nats://127.0.0.1:{port}" in text
    assert "s3cret" not in text


class _FrozenClient:
    """Stands in for nats-py's Client on a NATS that stopped reading: connected, and its outbound
    buffer stays above the publisher's high-water mark once it got there. `looks` counts how often the
    publisher looked at the buffer (once or twice per turn of its loop)."""

    is_connected = True
    is_closed = False

    def __init__(self) -> None:
        self.size = 0
        self.looks = 0
        self.subjects: list[str] = []

    @property
    def pending_data_size(self) -> int:
        self.looks += 1
        return self.size

    async def publish(self, subject: str, payload: bytes) -> None:
        self.subjects.append(subject)
        self.size += len(payload)


async def test_a_full_nats_buffer_with_a_heartbeat_due_does_not_spin_the_loop() -> None:
    # Found in review: with nats-py's buffer over half full and the heartbeat due, the task waited with
    # a zero timeout: a busy loop taking all of the event loop's spare CPU until NATS was found stale.
    from meshkit.extproc.auth import events

    publisher = EventPublisher(nowhere(), heartbeat_interval=0.05)
    client = _FrozenClient()
    publisher._nc = client  # type: ignore[assignment]
    publisher._connected = True
    run = asyncio.create_task(publisher._run())
    await asyncio.sleep(0.02)
    assert client.subjects == ["meshkit.service.health"]
    client.size = events._PENDING_HIGH + 1
    client.looks = 0
    cpu = time.process_time()
    await asyncio.sleep(0.3)
    cpu = time.process_time() - cpu
    # Polling every 10 ms is ~30 looks; the spin made ~100,000.
    assert client.looks < 200, client.looks
    assert cpu < 0.1, cpu
    publisher.emit("auth.success", EVENT)
    await asyncio.sleep(0.05)
    assert publisher.queued == 1  # kept back while the buffer is full
    client.size = 0  # drained: the event and the due heartbeat go out
    await asyncio.sleep(0.05)
    assert publisher.queued == 0
    assert client.subjects.count("meshkit.auth.success") == 1
    assert client.subjects.count("meshkit.service.health") >= 2
    publisher._closing = True
    publisher._wakeup.set()
    await asyncio.wait_for(run, 1.0)


async def test_events_that_do_not_serialise_are_dropped_one_by_one_and_the_task_keeps_going(
    caplog: pytest.LogCaptureFixture,
) -> None:
    publisher = EventPublisher(nowhere(), heartbeat_interval=60)
    client = _FrozenClient()
    publisher._nc = client  # type: ignore[assignment]
    publisher._connected = True
    run = asyncio.create_task(publisher._run())
    loop: dict[str, object] = {}
    loop["self"] = loop
    publisher.emit("auth.failure", {**EVENT, "path": loop})  # circular: ValueError
    publisher.emit("auth.failure", {**EVENT, (1, 2): "tuple key"})  # type: ignore[dict-item]
    publisher.emit("auth.failure", {**EVENT, "when": object(), "raw": b"\xff"})  # default=str
    publisher.emit("auth.success", EVENT)
    await asyncio.sleep(0.05)
    assert publisher.dropped["error"] == 2
    assert client.subjects.count("meshkit.auth.failure") == 1
    assert client.subjects.count("meshkit.auth.success") == 1
    assert not run.done()
    publisher._closing = True
    publisher._wakeup.set()
    await asyncio.wait_for(run, 1.0)
