"""`meshkit purge-broadcaster` run in this process (`meshkit.daemon.run_daemon`), for what a child
process cannot show: the lifecycle's own readiness at the very moment it reports ready, and the
broadcaster's state after a churn of targets. Targets come from a `FakeKube` (its own thread) or are
raw loopback servers; nothing is mocked."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from meshkit.daemon import Daemon, DaemonOptions, Lifecycle, Resolved, run_daemon
from meshkit.harness.fake_kube import FakeKube, endpoint
from meshkit.harness.process import free_port
from meshkit.harness.redis import RedisServer, redis_server, redis_server_binary
from meshkit.options import resolve
from meshkit.sidecars import purge_broadcaster
from meshkit.sidecars.purge_fanout import BadPurge, Purge, PurgeClient, RetryPolicy
from meshkit.sidecars.purge_log import Departures, PurgeLog, Replayer, ReplayMetrics

TOKEN = "test-kube-token"


@dataclass
class Running:
    life: Lifecycle
    stop: asyncio.Event
    task: asyncio.Task[None]

    @property
    def url(self) -> str:
        return f"http://{self.life.addresses['http']}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.life.admin_address}"


def options(**flags: Any) -> Resolved:
    given = {"admin_listen": "127.0.0.1:0", "listen": "127.0.0.1:0", "drain_delay": "0", **flags}
    sections = [*purge_broadcaster._sections(), DaemonOptions]
    return resolve(sections, command="purge-broadcaster", flags={k: str(v) for k, v in given.items()}, env={})


@asynccontextmanager
async def running(**flags: Any) -> AsyncIterator[Running]:
    lives: list[Lifecycle] = []

    async def serve(opts: Resolved, life: Lifecycle) -> None:
        lives.append(life)
        await purge_broadcaster.serve(opts, life)

    spec = Daemon("purge-broadcaster", "in-process", purge_broadcaster._sections, serve)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_daemon(spec, options(**flags), stop, ready=ready))
    waiting = asyncio.ensure_future(ready.wait())
    await asyncio.wait({task, waiting}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if not ready.is_set():
        waiting.cancel()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise AssertionError("the broadcaster did not report ready within 10 s")
    found = Running(lives[0], stop, task)
    try:
        yield found
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await task


async def get(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


async def eventually(what: str, check: Callable[[], Awaitable[bool]], seconds: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        if await check():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {seconds:g} s: {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube(token=TOKEN) as server:
        yield server


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "kube-token"
    path.write_text(TOKEN + "\n")
    return path


def kube_flags(kube: FakeKube, token_file: Path, service: str = "varnish") -> dict[str, Any]:
    return {
        "targets": f"k8s:cache/{service}:http",
        "kube_api": kube.url,
        "kube_token_file": str(token_file),
    }


async def test_not_ready_from_the_moment_it_reports_ready_while_there_are_no_targets(
    kube: FakeKube, token_file: Path
) -> None:
    """The lifecycle switches readiness on when serve() returns; the set is empty then (a Service
    without endpoints): /readyz must say so at once, not a loop turn later."""
    async with running(**kube_flags(kube, token_file)) as pb:
        assert await pb.life.readiness.current() == (False, "no purge targets", {})
        status, doc = await get(pb.admin_url + "/readyz")
        assert status == 503 and doc["reason"] == "no purge targets"
        kube.put_slice("cache", "varnish-a", "varnish", [endpoint("127.0.0.1")], ports=[("http", 6081)])

        async def ready() -> bool:
            return (await get(pb.admin_url + "/readyz"))[0] == 200

        await eventually("ready with a target", ready)
        assert (await get(pb.admin_url + "/readyz"))[1] == {
            "status": "ready",
            "reason": "serving",
            "targets": "1",
        }
        kube.delete_slice("cache", "varnish-a")

        async def not_ready() -> bool:
            return (await get(pb.admin_url + "/readyz"))[1].get("reason") == "no purge targets"

        await eventually("not ready once the set is empty", not_ready)
        kube.put_slice("cache", "varnish-a", "varnish", [endpoint("127.0.0.1")], ports=[("http", 6081)])
        await eventually("ready again", ready)
        pb.stop.set()  # draining: not ready whatever the targets

        async def draining() -> bool:
            return not pb.life.readiness.ready

        await eventually("draining", draining)
        assert (await pb.life.readiness.current())[:2] == (False, "draining")


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    try:
        redis_server_binary()
    except Exception as exc:
        pytest.skip(str(exc))
    with redis_server(tmp_path / "redis", name="pb-unit-redis") as server:
        yield server


async def raw_request(address: str, data: bytes) -> bytes:
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        async with asyncio.timeout(5):
            return await reader.read(1 << 16)
    finally:
        writer.close()


async def test_an_authorization_header_that_is_not_utf8_is_401_not_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    async with running(targets="127.0.0.1:9", token_file=token) as pb:
        answer = await raw_request(
            pb.life.addresses["http"],
            b"PURGE / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n",
        )
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert b'"type": "unauthorized"' in answer and b"WWW-Authenticate: Bearer" in answer
    assert "Traceback" not in caplog.text and "Error handling request" not in caplog.text


async def test_pending_purges_with_redis_down_is_503_json_and_purges_still_answer(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(targets="127.0.0.1:9", redis=redis.url, target_timeout=0.2, attempts=1) as pb:
        assert (await get(pb.url + "/purges"))[0] == 200
        redis.kill()
        status, doc = await get(pb.url + "/purges")
        assert status == 503 and doc["error"]["type"] == "purge_log_unavailable", doc
        async with aiohttp.ClientSession() as session, session.request("PURGE", pb.url + "/x") as resp:
            listed = (await resp.json())["targets"]
        assert resp.status == 502 and listed[0]["pending"] is False
    assert "Error handling request" not in caplog.text


@asynccontextmanager
async def recording_target(port: int = 0) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A target that answers every request head with Varnish's 200 and records the bytes it got."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                received.append(await reader.readuntil(b"\r\n\r\n"))
                writer.write(b"HTTP/1.1 200 Purged\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    listening = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        yield f"127.0.0.1:{listening.sockets[0].getsockname()[1]}", received
    finally:
        listening.close()


async def test_a_purge_log_entry_that_is_not_a_valid_purge_is_dropped_never_sent(redis: RedisServer) -> None:
    """The log is shared (any broadcaster, any version, anything that reaches Redis writes it): an entry
    whose path would inject a header into the request line, or that is not JSON, is dropped and counted,
    and the valid entry behind it is replayed."""
    prefix = "pb-unit-bad-entries"
    client = aioredis.Redis.from_url(redis.url)
    async with recording_target() as (target, received):
        smuggled = "/a HTTP/1.1\r\nHost: x\r\nX-Purge-All: true\r\nContent-Length: 0\r\n\r\nPURGE /b"
        entries = [
            {"id": "1", "at": 0, "purge": {"path": smuggled, "purge_all": False, "keys": []}},
            {"id": "2", "at": 0, "purge": {"path": "/c\n", "purge_all": False, "keys": []}},
            {"id": "3", "at": 0, "purge": {"path": "/", "purge_all": False, "keys": ["a b"]}},
            "not json {",
            {"id": "5", "at": 0, "purge": {"path": "/v1/embeddings", "purge_all": False, "keys": []}},
        ]
        for entry in entries:
            await client.rpush(
                f"{prefix}:pending:{target}", entry if isinstance(entry, str) else json.dumps(entry)
            )
        await client.sadd(f"{prefix}:targets", target)
        await client.rpush(f"{prefix}:pending:127.0.0.1:1", "not json {")  # a departed target's: kept
        await client.sadd(f"{prefix}:targets", "127.0.0.1:1")
        flags = {"redis": redis.url, "redis_prefix": prefix, "replay_interval": 0.1}
        async with running(targets=target, **flags) as pb:

            async def drained() -> bool:
                status, doc = await get(pb.url + "/purges")
                assert status == 200, doc
                return list(doc["pending"]) == ["127.0.0.1:1"]

            await eventually("the log emptied", drained)
            async with aiohttp.ClientSession() as session, session.get(pb.admin_url + "/metrics") as resp:
                metrics = await resp.text()
            assert (await get(pb.url + "/purges"))[1]["pending"] == {
                "127.0.0.1:1": [{"invalid": "not json {"}]
            }
    await client.aclose()
    assert received == [
        f"PURGE /v1/embeddings HTTP/1.1\r\nHost: {target}\r\nContent-Length: 0\r\n\r\n".encode()
    ]
    assert f'meshkit_purge_replays_total{{result="dropped",target="{target}"}} 4.0' in metrics


@pytest.mark.parametrize(
    ("path", "purge_all", "keys"),
    [
        ("/a\n", False, ()),
        ("/a b", False, ()),
        ("/", False, ("a\n",)),
        ("/", False, ("a b",)),
        ("/", True, ("k",)),
    ],
)
def test_a_purge_is_valid_however_it_is_made(path: str, purge_all: bool, keys: tuple[str, ...]) -> None:
    with pytest.raises(BadPurge):
        Purge(path, purge_all, keys)
    with pytest.raises(BadPurge):
        Purge.from_json(json.dumps({"path": path, "purge_all": purge_all, "keys": list(keys)}))
    if keys != ("a b",):  # one header naming two keys: valid as a request, not as one key
        with pytest.raises(BadPurge):
            Purge.parse(path, ["true"] if purge_all else [], list(keys))


async def metric_lines(pb: Running, name: str) -> list[str]:
    async with aiohttp.ClientSession() as session, session.get(pb.admin_url + "/metrics") as resp:
        text = await resp.text()
    return [line for line in text.splitlines() if line.startswith(name + "{")]


async def churn(pb: Running, kube: FakeKube, pods: int) -> None:
    """`pods` pods replacing each other in the Service, each missing one purge (nothing listens on
    port 1): every one of them becomes a label value of the failure counters."""
    for i in range(pods):
        address = f"127.0.0.{i + 2}"
        kube.put_slice("cache", "varnish-a", "varnish", [endpoint(address)], ports=[("http", 1)])

        async def moved(address: str = address) -> bool:
            doc = (await get(pb.url + "/targets"))[1]
            return [t["target"] for t in doc["targets"]] == [f"{address}:1"]

        await eventually(f"{address} is the target", moved)
        async with aiohttp.ClientSession() as session, session.request("PURGE", pb.url + "/x") as resp:
            assert resp.status == 502


async def test_metric_series_of_targets_that_left_are_removed(kube: FakeKube, token_file: Path) -> None:
    async with running(**kube_flags(kube, token_file), attempts=1) as pb:
        await churn(pb, kube, 12)
        failures = await metric_lines(pb, "meshkit_purge_target_failures_total")
    assert failures == ['meshkit_purge_target_failures_total{target="127.0.0.13:1"} 1.0']


async def test_with_a_purge_log_what_is_kept_per_departed_target_is_bounded(
    kube: FakeKube, token_file: Path, redis: RedisServer
) -> None:
    flags = {"redis": redis.url, "redis_prefix": "pb-unit-churn", "replay_interval": 0.05}
    async with running(**kube_flags(kube, token_file), attempts=1, departed_keep=0.2, **flags) as pb:
        await churn(pb, kube, 12)
        current = "127.0.0.13:1"

        async def settled() -> bool:
            failures = await metric_lines(pb, "meshkit_purge_target_failures_total")
            replays = await metric_lines(pb, "meshkit_purge_replays_total")
            doc = (await get(pb.url + "/purges"))[1]
            return (
                all(current in line for line in failures + replays)
                and list(doc["pending"]) == [current]
                and doc["departed"] == []
            )

        await eventually("only the current target's series, entries and departure left", settled)


@asynccontextmanager
async def silent_target() -> AsyncIterator[str]:
    """A target that takes the connection and the request and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()  # until the client gives up

    listening = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{listening.sockets[0].getsockname()[1]}"
    finally:
        for writer in held:
            writer.close()
        listening.close()


async def test_a_target_that_leaves_during_the_purge_it_misses_gets_it_queued_once(
    kube: FakeKube, token_file: Path, redis: RedisServer
) -> None:
    flags = {"redis": redis.url, "redis_prefix": "pb-unit-once", "replay_interval": 5}
    async with silent_target() as target, running(**kube_flags(kube, token_file), **flags, attempts=1) as pb:
        host, _, port = target.rpartition(":")
        kube.put_slice("cache", "varnish-a", "varnish", [endpoint(host)], ports=[("http", int(port))])
        await eventually("the target is in the set", lambda: _ready(pb))
        async with aiohttp.ClientSession() as session:
            purging = asyncio.ensure_future(session.request("PURGE", pb.url + "/x"))
            await asyncio.sleep(0.3)  # its attempt is under way (--target-timeout 1)
            kube.delete_slice("cache", "varnish-a")  # the pod leaves (unready) meanwhile
            resp = await purging
            assert resp.status == 502
            resp.release()
        pending = (await get(pb.url + "/purges"))[1]["pending"]
    assert [e["purge"]["path"] for e in pending[target]] == ["/x"]


async def _ready(pb: Running) -> bool:
    return (await get(pb.admin_url + "/readyz"))[0] == 200


async def test_a_redis_that_does_not_answer_costs_one_timeout_per_purge_and_does_not_hold_the_stop(
    redis: RedisServer,
) -> None:
    """Redis stalls (SIGSTOP: it takes connections, answers nothing) during a purge four targets miss:
    the 502 comes after one Redis timeout (2 s), not one per target; SIGTERM right after it, as the
    replay loop's own Redis call times out, stops the daemon at once. (Before: redis-py could turn
    that cancellation into a retried timeout, the loop went on and the stop waited for the closer's
    30 s deadline: about one run in two. Three runs here.)"""
    dead = ",".join(f"127.0.0.{i}:1" for i in range(2, 6))  # four targets, every one refuses
    flags = {"redis": redis.url, "redis_prefix": "pb-unit-slow", "attempts": 1, "replay_interval": 0.01}
    for _ in range(3):
        async with running(targets=dead, **flags) as pb:
            os.kill(redis.process.pid, signal.SIGSTOP)
            try:
                began = time.monotonic()
                async with (
                    aiohttp.ClientSession() as session,
                    session.request("PURGE", pb.url + "/x") as resp,
                ):
                    listed = (await resp.json())["targets"]
                took = time.monotonic() - began
            finally:
                os.kill(redis.process.pid, signal.SIGCONT)
            assert resp.status == 502 and [t["pending"] for t in listed] == [False] * 4
            assert took < 3.5, f"{took:.1f} s"  # the purge log's Redis timeout is 2 s
            stopping = time.monotonic()
        assert time.monotonic() - stopping < 4.0


async def test_purges_pending_for_a_target_past_max_pending_become_one_purge_of_everything(
    redis: RedisServer,
) -> None:
    port = free_port("127.0.0.1")
    target = f"127.0.0.1:{port}"  # nothing listens there yet
    flags = {"redis": redis.url, "redis_prefix": "pb-unit-cap", "max_pending": 5, "replay_interval": 0.1}
    async with running(targets=target, attempts=1, **flags) as pb:
        async with aiohttp.ClientSession() as session:
            for i in range(8):
                async with session.request("PURGE", f"{pb.url}/p{i}") as resp:
                    assert resp.status == 502 and (await resp.json())["targets"][0]["pending"] is True
        entries = (await get(pb.url + "/purges"))[1]["pending"][target]
        assert [e["purge"] for e in entries] == [
            {"path": "/", "purge_all": True, "keys": []},
            {"path": "/p6", "purge_all": False, "keys": []},
            {"path": "/p7", "purge_all": False, "keys": []},
        ]
        assert entries[0]["collapsed"] is True
        async with recording_target(port) as (_, received):

            async def replayed() -> bool:
                return not (await get(pb.url + "/purges"))[1]["pending"]

            await eventually("replayed", replayed)
    assert [r.split(b"\r\n")[0] for r in received] == [b"PURGE / HTTP/1.1"] + [
        f"PURGE /p{i} HTTP/1.1".encode() for i in (6, 7)
    ]
    assert b"X-Purge-All: true" in received[0]


async def test_a_replay_round_counts_what_is_pending_without_reading_it(redis: RedisServer) -> None:
    """20,000 entries pending for targets that are away: a round costs next to no CPU (it read and
    parsed every entry to set meshkit_purge_pending before: 0.77 s of CPU a round with 8 targets at
    10,000 each, every --replay-interval)."""
    purge_log = PurgeLog(redis.url, "pb-unit-count")
    await purge_log.start()
    entry = json.dumps({"id": "0" * 32, "at": 0, "purge": {"path": "/v1/x", "purge_all": False, "keys": []}})
    try:
        for t in range(2):
            await purge_log._redis.rpush(f"pb-unit-count:pending:10.0.0.{t}:1", *[entry] * 10_000)
            await purge_log._redis.sadd("pb-unit-count:targets", f"10.0.0.{t}:1")
        metrics = ReplayMetrics.create(CollectorRegistry())
        replayer = Replayer(purge_log, list, PurgeClient, RetryPolicy(), 1.0, metrics, Departures(60.0))
        began = time.process_time()
        await replayer.replay_round()
        cpu = time.process_time() - began
    finally:
        await purge_log.close()
    assert metrics.pending._value.get() == 20_000
    assert cpu < 0.03, f"{cpu * 1000:.0f} ms of CPU"


async def test_a_purge_still_being_retried_when_the_drain_ends_is_queued_for_who_missed_it(
    redis: RedisServer,
) -> None:
    """SIGTERM while a target is still being retried, and the drain timeout runs out first: the client
    gets no answer, the pod that confirmed has it, and the pod that had not has it queued."""
    prefix = "pb-unit-drain"
    async with silent_target() as silent, recording_target() as (answering, _):
        flags = {"redis": redis.url, "redis_prefix": prefix, "target_timeout": 5, "drain_timeout": 0.3}
        async with (
            running(targets=f"{answering},{silent}", **flags) as pb,
            aiohttp.ClientSession() as session,
        ):
            purging = asyncio.ensure_future(session.request("PURGE", pb.url + "/v1/x"))
            await asyncio.sleep(0.3)  # delivered to one, waiting on the other (5 s per attempt)
            pb.stop.set()
            with pytest.raises(aiohttp.ClientError):
                await purging
    client = aioredis.Redis.from_url(redis.url)
    try:
        kept = await client.lrange(f"{prefix}:pending:{silent}", 0, -1)
        others = await client.lrange(f"{prefix}:pending:{answering}", 0, -1)
    finally:
        await client.aclose()
    assert [json.loads(e)["purge"]["path"] for e in kept] == ["/v1/x"] and others == []


async def test_kept_connections_to_targets_that_left_are_closed(kube: FakeKube, token_file: Path) -> None:
    open_now: dict[str, int] = {}
    servers: list[asyncio.Server] = []

    async def start(host: str) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            open_now[target] += 1
            try:
                while True:
                    await reader.readuntil(b"\r\n\r\n")
                    writer.write(b"HTTP/1.1 200 Purged\r\nContent-Length: 2\r\n\r\n{}")
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                open_now[target] -= 1
                writer.close()

        server = await asyncio.start_server(handle, host, 0)
        servers.append(server)
        target = f"{host}:{server.sockets[0].getsockname()[1]}"
        open_now[target] = 0
        return target

    try:
        pods = [await start(f"127.0.0.{i}") for i in range(2, 6)]
        async with running(**kube_flags(kube, token_file)) as pb, aiohttp.ClientSession() as session:
            for target in pods:
                host, _, port = target.rpartition(":")
                kube.put_slice("cache", "varnish-a", "varnish", [endpoint(host)], ports=[("http", int(port))])

                async def moved(target: str = target) -> bool:
                    doc = (await get(pb.url + "/targets"))[1]
                    return [t["target"] for t in doc["targets"]] == [target]

                await eventually(f"{target} is the target", moved)
                async with session.request("PURGE", pb.url + "/x") as resp:
                    assert resp.status == 200

            async def closed() -> bool:
                return all(open_now[t] == 0 for t in pods[:-1])

            await eventually("the connections to the pods that left closed", closed, seconds=2)
            assert open_now[pods[-1]] == 1  # the current pod's connection is kept
    finally:
        for server in servers:
            server.close()


async def test_a_pod_away_across_a_broadcaster_restart_still_gets_the_purges_it_missed(
    kube: FakeKube, token_file: Path, redis: RedisServer
) -> None:
    """A pod goes unready (its cache intact); the broadcaster restarts with nothing pending for it; a
    purge comes; the pod comes back: it must get that purge. The restarted broadcaster knows the pod
    is away only from the purge log."""
    flags = {**kube_flags(kube, token_file), "redis": redis.url, "redis_prefix": "pb-unit-away"}
    flags["replay_interval"] = 0.05
    async with recording_target() as (a, _), recording_target() as (b, got_b):
        (host_a, _, port_a), (host_b, _, port_b) = a.rpartition(":"), b.rpartition(":")

        def pods(b_ready: bool) -> None:
            for name, host, port, ready in (("a", host_a, port_a, True), ("b", host_b, port_b, b_ready)):
                kube.put_slice(
                    "cache",
                    f"varnish-{name}",
                    "varnish",
                    [endpoint(host, ready=ready)],
                    ports=[("http", int(port))],
                )

        async def targets(pb: Running) -> list[str]:
            return [t["target"] for t in (await get(pb.url + "/targets"))[1]["targets"]]

        pods(b_ready=True)
        async with running(**flags) as first:
            await eventually("both pods", lambda: _has(targets(first), [a, b]))
            pods(b_ready=False)  # b goes unready
            await eventually("b away", lambda: _has(targets(first), [a]))
            await eventually("b departed", lambda: _departed(first, [b]))
            await asyncio.sleep(0.2)  # a few replay rounds
        async with running(**flags) as second, aiohttp.ClientSession() as session:
            await eventually("a only", lambda: _has(targets(second), [a]))
            async with session.request("PURGE", second.url + "/v1/x") as resp:
                assert resp.status == 200 and [t["target"] for t in (await resp.json())["targets"]] == [a]
            assert list((await get(second.url + "/purges"))[1]["pending"]) == [b]
            pods(b_ready=True)  # b is back: the purge it missed is replayed
            await eventually("replayed to b", lambda: _pending_empty(second))
    assert [r.split(b"\r\n")[0] for r in got_b] == [b"PURGE /v1/x HTTP/1.1"]


async def _has(found: Awaitable[list[str]], wanted: list[str]) -> bool:
    return sorted(await found) == sorted(wanted)


async def _departed(pb: Running, wanted: list[str]) -> bool:
    return bool((await get(pb.url + "/purges"))[1]["departed"] == wanted)


async def _pending_empty(pb: Running) -> bool:
    return not (await get(pb.url + "/purges"))[1]["pending"]


async def test_purges_past_max_inflight_are_503_busy_at_once() -> None:
    async with (
        silent_target() as silent,
        running(targets=silent, max_inflight=2, attempts=1) as pb,
        aiohttp.ClientSession() as session,
    ):
        held = [asyncio.ensure_future(session.request("PURGE", f"{pb.url}/{i}")) for i in range(2)]
        await asyncio.sleep(0.2)  # both waiting on the silent target (1 s per attempt)
        began = time.monotonic()
        async with session.request("PURGE", pb.url + "/more") as resp:
            doc = await resp.json()
        assert resp.status == 503 and doc["error"]["type"] == "busy", doc
        assert resp.headers["Retry-After"] == "1" and time.monotonic() - began < 0.5
        for answer in await asyncio.gather(*held):
            assert answer.status == 502
            answer.release()
        async with session.request("PURGE", pb.url + "/again") as resp:
            assert resp.status == 502  # room again: fanned out (and missed by the silent target)


async def test_a_token_file_that_is_not_utf8_is_read_as_bytes_not_a_traceback(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_bytes(b"tok\xff\xfe\n")
    async with recording_target() as (target, received), running(targets=target, token_file=token) as pb:
        address = pb.life.addresses["http"]
        ok = await raw_request(
            address,
            b"PURGE /a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\xff\xfe\r\nConnection: close\r\n\r\n",
        )
        wrong = await raw_request(
            address, b"PURGE /a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\nConnection: close\r\n\r\n"
        )
    assert ok.startswith(b"HTTP/1.1 200 "), ok[:200]
    assert wrong.startswith(b"HTTP/1.1 401 ") and len(received) == 1
