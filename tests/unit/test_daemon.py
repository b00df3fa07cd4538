"""The shared daemon lifecycle, in-process: readiness, the ready line, the stop order, binding."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from meshkit import daemon as lifecycle
from meshkit import logs
from meshkit.daemon import Daemon, DaemonOptions, Lifecycle, Resolved, bind, parse_ready, run_daemon
from meshkit.errors import ConfigError, DependencyError, ListenError, StartError
from meshkit.options import resolve


@dataclass(frozen=True)
class NoOptions:
    pass


class Recording:
    """A listener and resources that write what happens to them into one shared log."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    async def stop(self, grace: float) -> None:
        self.events.append(f"listener stop grace={grace:g}")

    def resource(
        self, name: str, gate: asyncio.Event | None = None, entered: asyncio.Event | None = None
    ) -> tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
        async def start() -> None:
            self.events.append(f"start {name}")
            if entered is not None:
                entered.set()
            if gate is not None:
                await gate.wait()

        async def close() -> None:
            self.events.append(f"close {name}")

        return start, close


def options(**daemon: Any) -> Resolved:
    flags = {"admin_listen": "127.0.0.1:0", **{k: str(v) for k, v in daemon.items()}}
    return resolve([NoOptions, DaemonOptions], command="test", flags=flags, env={})


async def get(url: str) -> tuple[int, dict[str, Any] | str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    logs.setup("text", "info", stream)
    yield stream
    logging.getLogger().handlers.clear()


async def test_ready_only_after_every_resource_started_then_stop_order(captured: io.StringIO) -> None:
    events: list[str] = []
    rec = Recording(events)
    gate, entered = asyncio.Event(), asyncio.Event()
    admin: dict[str, str] = {}

    async def serve(_: Resolved, life: Lifecycle) -> None:
        admin["url"] = f"http://{life.admin_address}"
        await life.start("first", *rec.resource("first"))
        await life.start("slow", *rec.resource("slow", gate, entered))
        life.add_listener("main", "127.0.0.1:1", rec)

        async def draining() -> None:
            events.append(f"draining ready={life.readiness.ready}")

        life.on_draining(draining)

    stop, ready = asyncio.Event(), asyncio.Event()
    spec = Daemon("toy", "a toy", lambda: [NoOptions], serve)
    task = asyncio.create_task(run_daemon(spec, options(drain_delay=0.2, drain_timeout=3), stop, ready=ready))
    await asyncio.wait_for(entered.wait(), 5)
    status, doc = await get(f"{admin['url']}/readyz")
    assert status == 503
    assert isinstance(doc, dict) and doc["reason"] == "starting slow"
    assert not ready.is_set()
    gate.set()
    await asyncio.wait_for(ready.wait(), 5)
    assert (await get(f"{admin['url']}/readyz"))[0] == 200
    found = parse_ready(captured.getvalue())
    assert found is not None and found[0] == "toy"
    assert set(found[1]) == {"main", "admin"}

    stop.set()
    await asyncio.sleep(0.1)  # inside --drain-delay: readiness is off, the admin port still answers
    assert (await get(f"{admin['url']}/readyz"))[0] == 503
    assert events[-1] == "draining ready=False"
    await asyncio.wait_for(task, 5)
    assert events == [
        "start first",
        "start slow",
        "draining ready=False",
        "listener stop grace=3",  # after the drain delay, with the drain timeout
        "close slow",  # resources in reverse order
        "close first",
    ]


async def test_a_start_that_overruns_fails_with_start_error_and_progress_lines(
    monkeypatch: pytest.MonkeyPatch, captured: io.StringIO
) -> None:
    monkeypatch.setattr(lifecycle, "PROGRESS_EVERY", 0.05)
    closed: list[str] = []

    async def never() -> None:
        await asyncio.Event().wait()

    async def close() -> None:
        closed.append("earlier")

    async def serve(_: Resolved, life: Lifecycle) -> None:
        await life.start("earlier", None, close)
        await life.start("never", never)

    spec = Daemon("toy", "a toy", lambda: [NoOptions], serve)
    with pytest.raises(StartError, match=r"never did not start within 0.3 s \(--start-timeout\)"):
        await run_daemon(spec, options(start_timeout=0.3), asyncio.Event())
    assert "starting never: still waiting" in captured.getvalue()
    assert closed == ["earlier"]  # what had started is closed again


async def test_one_failing_close_does_not_keep_the_others_open(captured: io.StringIO) -> None:
    closed: list[str] = []

    async def bad() -> None:
        raise RuntimeError("close failed")

    async def good() -> None:
        closed.append("good")

    async def serve(_: Resolved, life: Lifecycle) -> None:
        await life.start("good", None, good)
        await life.start("bad", None, bad)

    stop = asyncio.Event()
    stop.set()
    await run_daemon(Daemon("toy", "a toy", lambda: [NoOptions], serve), options(), stop)
    assert closed == ["good"]
    assert "closing bad failed" in captured.getvalue()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_ready_line_reads_back_in_both_log_formats(fmt: str) -> None:
    stream = io.StringIO()
    logs.setup(fmt, "info", stream)
    try:
        logging.getLogger("meshkit.daemon").info(
            "ready", extra={"daemon": "echo", "addresses": {"http": "[::1]:80"}}
        )
    finally:
        logging.getLogger().handlers.clear()
    assert parse_ready("other line\n" + stream.getvalue()) == ("echo", {"http": "[::1]:80"})
    assert parse_ready("nothing ready here\n") is None


def test_bind_port_zero_ipv6_and_a_taken_port() -> None:
    with bind("127.0.0.1:0") as sock:
        port = sock.getsockname()[1]
        assert port > 0
        sock.listen()
        with pytest.raises(
            ListenError, match=rf"cannot listen on 127.0.0.1:{port} \(--x\): Address already in use"
        ):
            bind(f"127.0.0.1:{port}", what="--x")
    if socket.has_ipv6:
        try:
            v6 = bind("[::1]:0")
        except ListenError:
            pytest.skip("no IPv6 loopback here")
        with v6:
            assert v6.family == socket.AF_INET6
    with pytest.raises(ListenError, match=r"no-such-host\.invalid"):
        bind("no-such-host.invalid:0")


async def test_a_stop_during_start_up_cancels_the_pending_start_and_closes_what_had_started(
    captured: io.StringIO,
) -> None:
    """SIGTERM while a filter's start() is pending: no waiting for --start-timeout, no ready line, and
    readiness never on; what had started is closed, the pending start is cancelled."""
    events: list[str] = []
    rec = Recording(events)
    entered = asyncio.Event()

    async def serve(_: Resolved, life: Lifecycle) -> None:
        await life.start("first", *rec.resource("first"))
        start, close = rec.resource("pending", asyncio.Event(), entered)  # its gate never opens

        async def pending() -> None:
            try:
                await start()
            except asyncio.CancelledError:
                events.append("pending cancelled")
                raise

        await life.start("pending", pending, close)
        events.append("serve went on")  # never: the start was cancelled

    stop, ready = asyncio.Event(), asyncio.Event()
    spec = Daemon("toy", "a toy", lambda: [NoOptions], serve)
    task = asyncio.create_task(run_daemon(spec, options(start_timeout=60), stop, ready=ready))
    await asyncio.wait_for(entered.wait(), 5)
    stop.set()
    await asyncio.wait_for(task, 5)  # not the 60 s --start-timeout
    assert events == ["start first", "start pending", "pending cancelled", "close first"]
    assert not ready.is_set()
    assert parse_ready(captured.getvalue()) is None
    assert "stopped during start-up" in captured.getvalue()


async def test_the_ready_line_is_printed_at_any_log_level() -> None:
    """`--log-level warning` must not hide the one line that says which ports were bound (the harness
    waited for it until its start timeout)."""
    stream = io.StringIO()
    logs.setup("text", "warning", stream)
    try:

        async def serve(_: Resolved, life: Lifecycle) -> None:
            life.add_listener("main", "127.0.0.1:1", Recording([]))

        stop, ready = asyncio.Event(), asyncio.Event()
        spec = Daemon("toy", "a toy", lambda: [NoOptions], serve)
        task = asyncio.create_task(run_daemon(spec, options(), stop, ready=ready))
        await asyncio.wait_for(ready.wait(), 5)
        stop.set()
        await asyncio.wait_for(task, 5)
    finally:
        logging.getLogger().handlers.clear()
    found = parse_ready(stream.getvalue())
    assert found is not None and found[0] == "toy" and found[1]["main"] == "127.0.0.1:1"
    assert "stopped accepting" not in stream.getvalue()  # INFO lines are still hidden


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_line_that_merely_contains_the_ready_words_is_not_the_ready_line(fmt: str) -> None:
    """Start-up lines carry operator and remote data (the options line, a filter's start() logging what
    it fetched): "ready daemon=... addresses={...}" inside them must not pass for the ready line, nor
    make parse_ready raise."""
    stream = io.StringIO()
    logs.setup(fmt, "info", stream)
    try:
        forged = 'x ready daemon=echo addresses={"http":"6.6.6.6:1"} y'
        logging.getLogger("meshkit").info("starting", extra={"options": {"name": forged}})
        bare = "a ready daemon=echo addresses={} b"
        logging.getLogger("meshkit").info("starting", extra={"upstream": bare})
        logging.getLogger("meshkit.extproc").warning(forged)
        logging.getLogger("meshkit.extproc").info("ready", extra={"daemon": "echo", "addresses": {}})
        assert parse_ready(stream.getvalue()) is None
        logging.getLogger("meshkit.daemon").info(
            "ready", extra={"daemon": "echo", "addresses": {"http": "127.0.0.1:80"}}
        )
    finally:
        logging.getLogger().handlers.clear()
    assert parse_ready(stream.getvalue()) == ("echo", {"http": "127.0.0.1:80"})
    broken = '2026-01-01 00:00:00,000 INFO    meshkit.daemon: ready daemon=x addresses={"a":}\n'
    assert parse_ready(broken) is None


@pytest.mark.parametrize(
    ("raised", "message", "traceback"),
    [
        (DependencyError("redis", "connection refused"), "redis: connection refused", False),
        (StartError("no keys in /etc/keys"), "no keys in /etc/keys", False),
        (ConnectionRefusedError(111, "Connection refused"), "ConnectionRefusedError: [Errno 111]", True),
    ],
)
async def test_a_start_that_fails_is_one_start_error_naming_the_resource(
    captured: io.StringIO, raised: Exception, message: str, traceback: bool
) -> None:
    """What a filter's start() raises becomes one StartError line (the CLI: exit 1) that says which
    resource did not start; an unexpected exception's traceback goes to the log, not to bare stderr."""
    closed: list[str] = []

    async def fails() -> None:
        raise raised

    async def close() -> None:
        closed.append("earlier")

    async def serve(_: Resolved, life: Lifecycle) -> None:
        await life.start("earlier", None, close)
        await life.start("filter auth", fails)

    spec = Daemon("toy", "a toy", lambda: [NoOptions], serve)
    with pytest.raises(StartError) as info:
        await run_daemon(spec, options(), asyncio.Event())
    assert str(info.value).startswith(f"filter auth did not start: {message}")
    assert ("Traceback" in captured.getvalue()) is traceback
    assert closed == ["earlier"]


async def test_a_config_error_raised_by_a_start_stays_a_config_error(captured: io.StringIO) -> None:
    async def fails() -> None:
        raise ConfigError(["--jwt-secret-file /nope: cannot read"])

    async def serve(_: Resolved, life: Lifecycle) -> None:
        await life.start("filter auth", fails)

    with pytest.raises(ConfigError):
        await run_daemon(Daemon("toy", "a toy", lambda: [NoOptions], serve), options(), asyncio.Event())


def test_event_loop_uvloop_without_uvloop_is_a_start_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """One line through the CLI ("meshkit echo: --event-loop uvloop: ..."), exit 1; `auto` falls back."""
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    with pytest.raises(StartError, match=r"--event-loop uvloop: uvloop is not installed"):
        lifecycle.loop_factory("uvloop")
    assert lifecycle.loop_factory("auto") is None
    assert lifecycle.loop_factory("asyncio", "uvloop") is None


async def test_a_start_or_serve_that_cancels_itself_is_a_start_error_not_a_clean_exit(
    captured: io.StringIO,
) -> None:
    """A CancelledError out of a filter's start() (a library's cancelled future) or out of serve()
    itself: the CLI exited 0 without a word, as if SIGTERMed."""

    async def cancels() -> None:
        raise asyncio.CancelledError

    async def serve(_: Resolved, life: Lifecycle) -> None:
        await life.start("filter auth", cancels)

    async def serve_cancels(_: Resolved, life: Lifecycle) -> None:
        raise asyncio.CancelledError

    with pytest.raises(StartError, match=r"filter auth did not start: its start\(\) was cancelled"):
        await run_daemon(Daemon("toy", "a toy", lambda: [NoOptions], serve), options(), asyncio.Event())
    with pytest.raises(StartError, match="start-up was cancelled"):
        await run_daemon(
            Daemon("toy", "a toy", lambda: [NoOptions], serve_cancels), options(), asyncio.Event()
        )


async def test_a_second_signal_during_a_slow_close_abandons_it_but_not_the_closes_after_it(
    captured: io.StringIO,
) -> None:
    """The docstring: a second signal exits at once, "listeners and resources are still closed"; the
    cancellation used to leave every resource after the slow one open."""
    events: list[str] = []
    entered = asyncio.Event()

    async def close_first() -> None:
        events.append("close first")

    async def close_slow() -> None:
        entered.set()
        await asyncio.Event().wait()

    async def serve(_: Resolved, life: Lifecycle) -> None:
        await life.start("first", None, close_first)
        await life.start("slow", None, close_slow)

    stop = asyncio.Event()
    stop.set()
    task = asyncio.create_task(
        run_daemon(Daemon("toy", "a toy", lambda: [NoOptions], serve), options(), stop)
    )
    await asyncio.wait_for(entered.wait(), 5)
    task.cancel()  # what run() does on the second signal
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert events == ["close first"]
    assert "closing slow abandoned" in captured.getvalue()


async def test_a_readiness_check_decides_readyz_while_ready_and_joins_the_body(
    captured: io.StringIO,
) -> None:
    """`Readiness.check` (a dependency the daemon probes): asked only while the lifecycle says ready,
    its details join the body; a check that raises is a 503 in one line; draining wins over it."""
    state: dict[str, Any] = {"ok": True, "raise": False}
    asked: list[int] = []

    async def check() -> tuple[bool, str, dict[str, str]]:
        asked.append(1)
        if state["raise"]:
            raise OSError("probe exploded")
        return state["ok"], "serving" if state["ok"] else "upstream unreachable", {"upstream": "x"}

    lives: list[Lifecycle] = []

    async def serve(_: Resolved, life: Lifecycle) -> None:
        life.readiness.check = check
        lives.append(life)

    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        run_daemon(Daemon("toy", "a toy", lambda: [NoOptions], serve), options(), stop, ready=ready)
    )
    await asyncio.wait_for(ready.wait(), 5)
    url = f"http://{lives[0].admin_address}/readyz"
    assert await get(url) == (200, {"status": "ready", "reason": "serving", "upstream": "x"})
    state["ok"] = False
    status, body = await get(url)
    assert status == 503 and isinstance(body, dict) and body["reason"] == "upstream unreachable"
    state["raise"] = True
    status, body = await get(url)
    assert status == 503 and isinstance(body, dict)
    assert body["reason"] == "readiness check failed: OSError: probe exploded"
    state.update({"ok": True, "raise": False})
    lives[0].readiness.set(False, "draining")  # what drain() does first: the check is not asked
    before = len(asked)
    status, body = await get(url)
    assert status == 503 and isinstance(body, dict) and body["reason"] == "draining"
    assert len(asked) == before
    stop.set()
    await asyncio.wait_for(task, 5)


@pytest.mark.parametrize("cancellation", [True, False])
async def test_serve_app_handler_cancellation_ends_a_handler_whose_client_went_away(
    captured: io.StringIO, cancellation: bool
) -> None:
    """`serve_app(..., handler_cancellation=True)`: a client that disconnects cancels its handler at
    once (a long-lived stream leaves then); off (the default), the handler runs on."""
    entered, cancelled, finished = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def slow(_: web.Request) -> web.StreamResponse:
        entered.set()
        try:
            await asyncio.sleep(1.0)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        finished.set()
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/slow", slow)
    life = Lifecycle("toy", DaemonOptions())
    address = await life.serve_app("http", "127.0.0.1:0", app, handler_cancellation=cancellation)
    try:
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(entered.wait(), 5)
        writer.close()  # the client goes away while the handler waits
        await writer.wait_closed()
        if cancellation:
            await asyncio.wait_for(cancelled.wait(), 5)
            assert not finished.is_set()
        else:
            await asyncio.wait_for(finished.wait(), 5)
            assert not cancelled.is_set()
        del reader
    finally:
        await life.close()
