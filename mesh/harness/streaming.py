"""The token-streaming daemons as real child processes: `bridge()` runs `meshkit bridge`.

Built on `meshkit.harness.daemons.daemon()` (port 0 for the admin listener, the ready line read back).
`RunningBridge` adds what tests of the bridge look at: `/readyz` (`wait_ready()`: the bridge prints its
ready line at once and turns `/readyz` on only once Redis and NATS are connected and the stream is
ensured) and its `/metrics` as numbers (`metric()`). `stored_messages()` reads back what a JetStream
stream holds (every message, its subject, exact bytes and `Nats-Msg-Id`), for tests to compare with
what they wrote; `stored_count()` how many it holds; `eventually()` polls an async check (every 50 ms,
with a deadline). `restarted_on_the_same_ports()` starts a (killed) nats-server again where its clients
expect it.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from prometheus_client.parser import text_string_to_metric_families

from meshkit.errors import HarnessError
from meshkit.harness.daemons import RunningDaemon, daemon
from meshkit.harness.nats import NatsServer, nats_server_binary
from meshkit.harness.process import ManagedProcess

__all__ = [
    "RunningBridge",
    "StoredMessage",
    "bridge",
    "eventually",
    "restarted_on_the_same_ports",
    "stored_count",
    "stored_messages",
]


@dataclass(frozen=True)
class RunningBridge(RunningDaemon):
    """A running `meshkit bridge` (only an admin port)."""

    def readyz(self) -> tuple[int, dict[str, Any]]:
        """(status, JSON) of `/readyz`."""
        try:
            with urllib.request.urlopen(f"{self.admin_url}/readyz", timeout=2) as resp:  # noqa: S310
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def wait_ready(self, timeout: float = 15.0) -> dict[str, Any]:
        """Return `/readyz`'s JSON once it answers 200; HarnessError with the log tail after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            status, doc = self.readyz()
            if status == 200:
                return doc
            if self.process.returncode is not None:
                raise HarnessError(f"{self.process.name} exited\n{self.process.tail()}")
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"{self.process.name}: not ready after {timeout:.0f} s: {doc}\n" + self.process.tail()
                )
            time.sleep(0.05)

    def metrics(self) -> dict[str, float]:
        """Every sample of `/metrics` by `name{label="v",...}` (labels sorted), `name` without labels."""
        with urllib.request.urlopen(f"{self.admin_url}/metrics", timeout=2) as resp:  # noqa: S310
            text = resp.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        """One sample (0 when absent): `metric("meshkit_bridge_deadlettered_total", reason="not_json")`."""
        key = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        return self.metrics().get(f"{name}{{{key}}}" if key else name, 0.0)


@contextmanager
def bridge(
    workdir: Path,
    redis_url: str,
    nats_url: str,
    args: Sequence[str] = (),
    *,
    name: str = "bridge",
    start_timeout: float = 30.0,
) -> Iterator[RunningBridge]:
    """`meshkit bridge --redis URL --nats URL` with extra `args` (`--source`, `--consumer`, ...), its
    admin port on 127.0.0.1:0; stopped (TERM, then KILL) on exit. Not waited ready: `wait_ready()`."""
    argv = ["--redis", redis_url, "--nats", nats_url, *args]
    with daemon("bridge", workdir, argv, listeners=(), name=name, start_timeout=start_timeout) as running:
        yield RunningBridge(running.process, running.command, running.addresses)


@dataclass(frozen=True)
class StoredMessage:
    """One message as a JetStream stream holds it."""

    seq: int
    subject: str
    data: bytes
    msg_id: str | None


async def stored_messages(
    nats_url: str,
    stream: str = "CHAT",
    *,
    domain: str | None = None,
    subjects: str = "chat.*.tokens",
    within: float = 10.0,
) -> list[StoredMessage]:
    """Every message of `stream` on `subjects` in stream order, read with an ephemeral pull consumer
    (no acks). Raises HarnessError if they cannot all be read within `within` seconds."""
    nc = await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        js = nc.jetstream(domain=domain, timeout=5)
        info = await js.stream_info(stream, subjects_filter=subjects)
        total = sum((info.state.subjects or {}).values())
        out: list[StoredMessage] = []
        if total == 0:
            return out
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=30.0
        )
        sub = await js.pull_subscribe(subjects, stream=stream, config=config)
        deadline = time.monotonic() + within
        while len(out) < total:
            if time.monotonic() > deadline:
                raise HarnessError(f"read {len(out)} of {total} messages of {stream} in {within:.0f} s")
            try:
                batch = await sub.fetch(min(1000, total - len(out)), timeout=2)
            except nats.errors.TimeoutError:
                continue
            for msg in batch:
                msg_id = msg.headers.get("Nats-Msg-Id") if msg.headers else None
                out.append(StoredMessage(msg.metadata.sequence.stream, msg.subject, msg.data, msg_id))
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


async def stored_count(nats_url: str, stream: str = "CHAT", *, domain: str | None = None) -> int:
    """How many messages `stream` holds (0 while it does not exist)."""
    nc = await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        return int((await nc.jetstream(domain=domain, timeout=5).stream_info(stream)).state.messages)
    except nats.js.errors.NotFoundError:
        return 0
    finally:
        await nc.close()


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = 15.0) -> None:
    """Return once `check()` is true (polled every 50 ms); AssertionError naming `what` after `within` s."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within:.0f} s: {what}")
        await asyncio.sleep(0.05)


@contextmanager
def restarted_on_the_same_ports(server: NatsServer, workdir: Path) -> Iterator[ManagedProcess]:
    """`server` (stopped or killed) started again from its config with the client and monitoring ports
    it had (its clients reconnect to that address); a leaf is ready once its `/leafz` lists the link
    to its origin. Stopped on exit."""
    config = server.config_path.read_text()
    config = config.replace(f'listen: "{server.host}:-1"', f'listen: "{server.host}:{server.port}"', 1)
    config = config.replace(f'http: "{server.host}:-1"', f'http: "{server.host}:{server.http_port}"', 1)
    path = Path(workdir) / f"{server.name}-again.conf"
    path.write_text(config)

    def ready(proc: ManagedProcess) -> bool:
        if "Server is ready" not in proc.log_text():
            return False
        if server.leaf_remote is None:
            return True
        try:
            return server.leafnode_count() >= 1
        except (urllib.error.URLError, OSError, ValueError):
            return False

    proc = ManagedProcess(
        f"{server.name}-again",
        [nats_server_binary(), "-c", str(path)],
        log_dir=Path(workdir),
        ready=ready,
        cwd=Path(workdir),
        start_timeout=15,
        stop_timeout=10.0,
    )
    with proc:
        yield proc
