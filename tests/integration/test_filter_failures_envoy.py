"""Filters that talk to other servers, through real Envoy on all three paths: a hook that overruns
`--filter-timeout`, a dependency that is down, and filters with start()/close().

The daemon runs in this process (in a thread with its own event loop), with two test filters added to
the registry, so the test can see exactly when they start and close; Envoy is real."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import xxhash

from meshkit.daemon import Lifecycle, Resolved, run_daemon
from meshkit.errors import DependencyError
from meshkit.extproc import Exchange, Filter
from meshkit.extproc import filters as registry
from meshkit.extproc.daemon import DAEMON
from meshkit.harness.daemons import Echo
from meshkit.harness.envoy import envoy
from meshkit.options import resolve
from meshkit.render import Api, FrontConfig

from .conftest import request

pytestmark = pytest.mark.integration

EVENTS: list[tuple[str, float]] = []


@dataclass(frozen=True)
class NoOptions:
    pass


class Guard(Filter):
    """Fails closed like auth will: sleeps when asked (`x-test-sleep`), or finds its server down
    (`x-test-down`); connects in start() and disconnects in close()."""

    name: ClassVar[str] = "test-guard"
    Options: ClassVar[type] = NoOptions
    reads_headers: ClassVar[frozenset[str]] = frozenset({"x-test-sleep", "x-test-down"})

    async def start(self) -> None:
        EVENTS.append(("start guard", time.monotonic()))
        await asyncio.sleep(0.3)  # a slow connect: the daemon must not be ready before it is done
        EVENTS.append(("started guard", time.monotonic()))

    async def close(self) -> None:
        EVENTS.append(("close guard", time.monotonic()))

    async def on_request_headers(self, exchange: Exchange) -> None:
        if exchange.headers.get("x-test-down"):
            raise DependencyError("redis", "connection refused", retry_after=7)
        seconds = float(exchange.headers.get("x-test-sleep", "0"))
        if seconds:
            await asyncio.sleep(seconds)


class Second(Filter):
    name: ClassVar[str] = "test-second"
    Options: ClassVar[type] = NoOptions

    async def start(self) -> None:
        EVENTS.append(("start second", time.monotonic()))

    async def close(self) -> None:
        EVENTS.append(("close second", time.monotonic()))


@contextmanager
def inprocess_extproc(monkeypatch: pytest.MonkeyPatch, *flags: str) -> Iterator[dict[str, str]]:
    """`meshkit extproc` with the test filters, in a thread; yields its addresses once it is ready."""
    monkeypatch.setitem(registry.FILTERS, Guard.name, Guard)
    monkeypatch.setitem(registry.FILTERS, Second.name, Second)
    args = dict(zip(flags[::2], flags[1::2], strict=True))
    resolved = resolve(
        DAEMON.all_sections(),
        command="extproc",
        flags={
            "listen": "127.0.0.1:0",
            "http_listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "filters": "test-guard,test-second,body-hash",
            **args,
        },
        env={},
    )
    lives: list[Lifecycle] = []

    async def serve(options: Resolved, life: Lifecycle) -> None:
        await DAEMON.serve(options, life)
        lives.append(life)

    loop = asyncio.new_event_loop()
    stop, ready = asyncio.Event(), threading.Event()
    failure: list[BaseException] = []

    def main() -> None:
        async def run() -> None:
            ready_event = asyncio.Event()
            task = asyncio.ensure_future(
                run_daemon(dataclasses.replace(DAEMON, serve=serve), resolved, stop, ready=ready_event)
            )
            await asyncio.wait(
                {task, asyncio.ensure_future(ready_event.wait())}, return_when="FIRST_COMPLETED"
            )
            EVENTS.append(("ready", time.monotonic()))
            ready.set()
            await task

        try:
            loop.run_until_complete(run())
        except BaseException as exc:
            failure.append(exc)
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=main, name="extproc", daemon=True)
    thread.start()
    try:
        assert ready.wait(30), "the in-process daemon never became ready"
        assert not failure, failure
        yield {**lives[0].addresses, "admin": lives[0].admin_address}
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(15)
        assert not thread.is_alive()


def port(address: str) -> int:
    return int(address.rpartition(":")[2])


@pytest.fixture(scope="module")
def upstream_echo(workdir: Path) -> Iterator[Echo]:
    from meshkit.harness.daemons import echo

    with echo(workdir, name="guarded-upstream") as server:
        yield server


@pytest.mark.parametrize("api", ["ext_proc", "ext_authz", "ext_authz_http"])
def test_overrun_and_dependency_down_through_envoy(
    monkeypatch: pytest.MonkeyPatch, workdir: Path, upstream_echo: Echo, api: Api
) -> None:
    EVENTS.clear()
    with inprocess_extproc(monkeypatch, "filter_timeout", "0.3") as addresses:
        names = [name for name, _ in EVENTS]
        assert names[:4] == ["start guard", "started guard", "start second", "ready"]  # ready after both
        config = FrontConfig(
            upstream_ports=(upstream_echo.port,),
            extproc_port=port(addresses["http" if api == "ext_authz_http" else "grpc"]),
            api=api,
            listen_port=0,
            filters=("test-guard", "test-second", "body-hash"),
            failure_mode_allow=False,  # the guard fails closed
        )
        with envoy(config.render(), workdir, name=f"guarded-{api}") as proxy:
            ok = request(proxy.url(path="/v1/x"), body=b"fine")
            assert ok.status == 200
            assert ok.upstream_headers["x-body-hash"] == xxhash.xxh3_128_hexdigest(b"fine")

            started = time.monotonic()
            slow = request(proxy.url(path="/v1/x"), body=b"slow", headers={"x-test-sleep": "5"})
            took = time.monotonic() - started
            down = request(proxy.url(path="/v1/x"), body=b"down", headers={"x-test-down": "1"})
            metrics = request(f"http://{addresses['admin']}/metrics", method="GET").body.decode()
            assert proxy.failed_open() == 0
    assert took < 2.5, "meshkit's deadline (0.3 s) should answer long before the hook's 5 s"
    assert slow.headers["content-type"] == "application/json"
    assert down.headers["content-type"] == "application/json"
    if api == "ext_authz_http":
        # Envoy's ext_authz HTTP client reads any 5xx from the check service as "the service failed":
        # the fail-closed config answers with status_on_error (500) and meshkit's JSON body.
        assert (slow.status, json.loads(slow.body)["error"]["type"]) == (500, "internal_error")
        assert (down.status, json.loads(down.body)["error"]["type"]) == (500, "internal_error")
    else:
        assert (slow.status, json.loads(slow.body)["error"]["type"]) == (504, "timeout")
        assert (down.status, json.loads(down.body)["error"]["type"]) == (503, "service_unavailable")
        assert down.headers["retry-after"] == "7"
    assert 'meshkit_extproc_filter_timeouts_total{filter="test-guard"} 1.0' in metrics
    assert 'meshkit_extproc_dependency_errors_total{dependency="redis"} 1.0' in metrics
    closes = [name for name, _ in EVENTS if name.startswith("close")]
    assert closes == ["close second", "close guard"]  # reverse chain order
