"""One lifecycle for every meshkit daemon: options, admin port, readiness, the ready line, the stop order.

A daemon is a `Daemon`: its options dataclasses and an async `serve(options, life)` that opens its
resources (`life.start`) and listeners (`life.serve_app`, `life.add_listener`) and returns. The runner
around it owns the rest:

- the admin port (`--admin-listen`): `/healthz`, `/readyz`, `/metrics` from the daemon's own registry
  (`life.registry`, with process CPU and memory);
- readiness: on only after `serve()` returned, i.e. after every resource it declared has started (a
  start that takes long prints a progress line every few seconds and fails after `--start-timeout`);
  a SIGTERM before that cancels the start-up, closes what had started and exits 0, with no ready line;
- ONE structured ready line, the same for every daemon: `ready daemon=NAME addresses={"http": ...}`
  (text) or `{"msg": "ready", "daemon": NAME, "addresses": {...}}` (JSON), printed whatever
  `--log-level`; `parse_ready()` reads it back, and the harness and `meshkit up` use nothing else;
- the stop order on SIGTERM/SIGINT: readiness off (and `life.on_draining` callbacks: gRPC health
  NOT_SERVING) -> `--drain-delay` so load balancers notice -> every listener stops accepting and its
  in-flight work gets up to `--drain-timeout` -> resources closed in reverse order -> exit 0. A second
  signal exits at once (listeners and resources are still closed, without grace);
- errors: an address that cannot be bound -> `ListenError`, one line, exit 1; a resource that fails
  to start (`DependencyError`, anything it raises) -> `StartError` naming it, one line, exit 1 (an
  unexpected exception's traceback goes to the log first, in the log's format); bad options -> every
  problem at once, exit 2 (`meshkit.cli`).

`bind()` is the one helper that binds `HOST:PORT` (port 0: any free port) and returns the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, PlatformCollector, ProcessCollector

from meshkit.admin import Readiness, admin_app
from meshkit.connection_guard import ConnectionGuard, default_connection_limit
from meshkit.errors import ConfigError, ListenError, MeshkitError, StartError
from meshkit.options import option, parse_host_port, parse_seconds

log = logging.getLogger("meshkit.daemon")

PROGRESS_EVERY = 2.0  # seconds between "still starting" lines
ADMIN_CONNECTIONS = 128  # the admin port's guard: probes and scrapes, never a crowd


@dataclass(frozen=True)
class DaemonOptions:
    admin_listen: str = option(
        "127.0.0.1:9090",
        "HOST:PORT for /healthz, /readyz and /metrics (port 0: any free port)",
        parse=parse_host_port,
        metavar="HOST:PORT",
    )
    log_format: str = option("text", "log format", choices=("text", "json"))
    log_level: str = option("info", "log level", choices=("debug", "info", "warning", "error"))
    drain_delay: float = option(
        0.0,
        "seconds between SIGTERM (readiness off) and closing the listeners",
        parse=parse_seconds,
        metavar="SECONDS",
    )
    drain_timeout: float = option(
        10.0, "seconds in-flight requests get to finish after that", parse=parse_seconds, metavar="SECONDS"
    )
    start_timeout: float = option(
        30.0,
        "seconds each resource (a filter's connection, a key fetch) may take to start",
        parse=parse_seconds,
        metavar="SECONDS",
    )
    event_loop: str = option(
        "auto",
        "asyncio event loop: uvloop when installed (auto), or asyncio",
        choices=("auto", "uvloop", "asyncio"),
    )


# -- what a daemon declares ---------------------------------------------------------------------------
Resolved = Mapping[type[Any], Any]  # options section class -> its instance


@dataclass(frozen=True)
class Daemon:
    """A daemon: `name` (the subcommand), `help`, its option sections and `serve(options, life)`.

    `sections()` and `groups()` are functions so the CLI imports a daemon's modules only when it runs;
    `groups()` maps sections to a YAML key they may be nested under (a filter's name).
    `event_loop` is the loop `--event-loop auto` picks for this daemon (measured per daemon)."""

    name: str
    help: str
    sections: Callable[[], Sequence[type[Any]]]
    serve: Callable[[Resolved, Lifecycle], Awaitable[None]]
    groups: Callable[[], Mapping[type[Any], str]] = dict
    event_loop: str = "uvloop"

    def all_sections(self) -> list[type[Any]]:
        return [*self.sections(), DaemonOptions]


class Listener(Protocol):
    """A server the lifecycle stops: at once stop accepting, give in-flight work `grace` seconds, then
    close what is left (grace 0: close now)."""

    async def stop(self, grace: float) -> None: ...


# -- binding --------------------------------------------------------------------------------------
def split_host_port(address: str) -> tuple[str, int]:
    host, _, port = parse_host_port(address).rpartition(":")
    return host.strip("[]"), int(port)


def bind(address: str, *, what: str = "--listen") -> socket.socket:
    """A TCP socket bound to `HOST:PORT` (port 0: any free port), not yet listening; the one way meshkit
    binds. Raises `ListenError` with one line naming the option when it cannot."""
    try:
        host, port = split_host_port(address)
    except ValueError as exc:
        raise ListenError(f"cannot listen on {address} ({what}): {exc}") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {address} ({what}): {exc.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {address} ({what}): {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def bound_address(address: str, sock: socket.socket) -> str:
    """`HOST:PORT` as the daemon reports it: the host as given, the port as bound."""
    host = parse_host_port(address).rpartition(":")[0]
    return f"{host}:{sock.getsockname()[1]}"


class _AppListener:
    """An aiohttp `web.Application` on a bound socket (echo, admin, later the sidecars' HTTP APIs)."""

    def __init__(self, runner: web.AppRunner) -> None:
        self._runner = runner

    async def stop(self, grace: float) -> None:
        self._runner._shutdown_timeout = grace  # aiohttp reads it in cleanup(); set per stop
        await self._runner.cleanup()


class _GuardedSockSite(web.SockSite):
    """aiohttp's site on a bound socket, each connection's protocol behind a `ConnectionGuard`."""

    def __init__(self, runner: web.AppRunner, sock: socket.socket, guard: ConnectionGuard) -> None:
        super().__init__(runner, sock)
        self._guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._guard.protocol_factory(server), sock=self._sock, backlog=self._backlog
        )


async def start_app(
    address: str,
    app: web.Application,
    what: str,
    *,
    handler_cancellation: bool = False,
    guard: ConnectionGuard | None = None,
) -> tuple[str, _AppListener]:
    """`app` on a socket bound to `address`, its connections bounded by `guard` (default: the fd limit
    less a reserve, 10 s for a first request head; `connection_guard.py`). `handler_cancellation`: a
    client that goes away cancels its handler at once (aiohttp's switch; a long-lived stream leaves
    then, not at its next write)."""
    sock = bind(address, what=what)
    guard = guard or ConnectionGuard()
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        handler_cancellation=handler_cancellation,
        keepalive_timeout=guard.keepalive,  # aiohttp's default is an hour: a connection slot each
    )
    await runner.setup()
    try:
        await _GuardedSockSite(runner, sock, guard).start()
    except BaseException:
        await runner.cleanup()
        sock.close()
        raise
    return bound_address(address, sock), _AppListener(runner)


def _raise_start_failure(what: str, exc: BaseException | None) -> None:
    """A failed start as one line naming the resource (`StartError`, exit 1): `DependencyError` and
    meshkit's other errors as they read, anything else (a bug, an OSError from a client library) with
    its type, and its traceback logged first. `ConfigError` stays itself (exit 2)."""
    if exc is None:
        return
    if isinstance(exc, ConfigError) or not isinstance(exc, Exception):
        raise exc
    if isinstance(exc, MeshkitError):
        raise StartError(f"{what} did not start: {exc}") from exc
    log.error("%s did not start", what, exc_info=exc)
    raise StartError(f"{what} did not start: {type(exc).__name__}: {exc}") from exc


# -- the lifecycle handed to serve() ------------------------------------------------------------------
@dataclass
class Lifecycle:
    name: str
    options: DaemonOptions
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    readiness: Readiness = field(default_factory=Readiness)
    addresses: dict[str, str] = field(default_factory=dict)
    admin_address: str = ""  # bound before serve() runs: /readyz answers "starting ..." meanwhile
    _listeners: list[tuple[str, Listener]] = field(default_factory=list)
    _closers: list[tuple[str, Callable[[], Awaitable[None]]]] = field(default_factory=list)
    _draining: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._open = Gauge(
            "meshkit_http_connections", "Open HTTP connections", ["listener"], registry=self.registry
        )
        self._closed = Counter(
            "meshkit_http_connections_closed",
            "HTTP connections closed by the guard: over the limit (refused, or evicted for a new one), "
            "no request head in time",
            ["listener", "reason"],
            registry=self.registry,
        )

    async def start(
        self,
        what: str,
        start: Callable[[], Awaitable[None]] | None,
        close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Start a resource (`what`: "filter auth", "redis", ...) within `--start-timeout`, printing a
        progress line while it takes long; `close` runs at shutdown, in reverse order of starting."""
        if start is not None:
            await self._started(what, start)
        if close is not None:
            self._closers.append((what, close))

    async def _started(self, what: str, start: Callable[[], Awaitable[None]]) -> None:
        self.readiness.reason = f"starting {what}"
        began = time.monotonic()
        task: asyncio.Task[None] = asyncio.ensure_future(start())
        try:
            while True:
                left = self.options.start_timeout - (time.monotonic() - began)
                done, _ = await asyncio.wait({task}, timeout=max(0.0, min(PROGRESS_EVERY, left)))
                if done:
                    if task.cancelled():  # by itself (we cancel it only below): not a clean exit 0
                        raise StartError(f"{what} did not start: its start() was cancelled")
                    _raise_start_failure(what, task.exception())
                    return
                if left <= PROGRESS_EVERY:
                    raise StartError(
                        f"{what} did not start within {self.options.start_timeout:g} s (--start-timeout)"
                    )
                log.info("starting %s: still waiting after %.0f s", what, time.monotonic() - began)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    def add_listener(self, name: str, address: str, listener: Listener) -> None:
        """Report `listener` (already accepting on `address`) on the ready line and stop it in order."""
        self.addresses[name] = address
        self._listeners.append((name, listener))

    async def serve_app(
        self,
        name: str,
        address: str,
        app: web.Application,
        what: str = "--listen",
        *,
        handler_cancellation: bool = False,
        max_connections: int | None = None,
    ) -> str:
        """Serve an aiohttp application on `address`; return the bound `HOST:PORT`
        (`handler_cancellation`: see `start_app`; `max_connections`: the guard's limit, default the fd
        limit less a reserve)."""
        bound, listener = await start_app(
            address,
            app,
            what,
            handler_cancellation=handler_cancellation,
            guard=self.guard(name, max_connections),
        )
        self.add_listener(name, bound, listener)
        return bound

    def guard(self, listener: str, limit: int | None = None) -> ConnectionGuard:
        """A `ConnectionGuard` for one listener, counted in `meshkit_http_connections{listener}` and
        `meshkit_http_connections_closed_total{listener,reason}`."""
        guard = ConnectionGuard(
            limit=default_connection_limit() if limit is None else limit,
            on_event=lambda reason: self._closed.labels(listener, reason).inc(),
        )
        self._open.labels(listener).set_function(lambda: guard.open)
        return guard

    def on_draining(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run `callback` when readiness turns off (before `--drain-delay`): gRPC health NOT_SERVING."""
        self._draining.append(callback)

    # -- the runner's part ------------------------------------------------------------------------
    async def drain(self) -> None:
        """SIGTERM: readiness off -> drain delay -> listeners stop with the drain timeout."""
        self.readiness.set(False, "draining")
        for callback in self._draining:
            await callback()
        if self.options.drain_delay:
            log.info(
                "readiness off; closing the listeners in %.1f s (--drain-delay)", self.options.drain_delay
            )
            await asyncio.sleep(self.options.drain_delay)
        log.info("stopped accepting; in-flight requests get up to %.1f s", self.options.drain_timeout)
        await self._stop_listeners(self.options.drain_timeout)

    async def _stop_listeners(self, grace: float) -> None:
        listeners, self._listeners = self._listeners, []
        results = await asyncio.gather(*(lst.stop(grace) for _, lst in listeners), return_exceptions=True)
        for (name, _), result in zip(listeners, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error("listener %s did not stop cleanly: %r", name, result)

    async def close(self) -> None:
        """Whatever is still open, without grace: listeners, then resources in reverse order. A
        second signal (cancellation) abandons the close under way, not the ones after it."""
        await self._stop_listeners(0)
        closers, self._closers = self._closers, []
        cancelled = False
        for what, close in reversed(closers):
            try:
                async with asyncio.timeout(self.options.start_timeout):
                    await close()
            except asyncio.CancelledError:
                cancelled = True
                log.warning("closing %s abandoned", what)
            except Exception as exc:  # one bad close must not keep the others open
                log.error("closing %s failed: %r", what, exc)
        if cancelled:
            raise asyncio.CancelledError


# -- the ready line -------------------------------------------------------------------------------
READY = "ready"
# The ready line as meshkit.logs.TextFormatter writes it: time, level, this logger, then the message and
# its two fields, nothing before them: a line that merely contains "ready daemon=" (a logged option or
# header value, JSON-quoted or not) is not it.
_TEXT_READY = re.compile(
    rf"^\S+ \S+ \w+ +{re.escape(log.name)}: {READY} daemon=(\S+) addresses=(\{{\S*\}})(?: |$)"
)


def parse_ready(log_text: str) -> tuple[str, dict[str, str]] | None:
    """(daemon name, addresses by name) from a daemon's ready line, text or JSON; None before it."""
    for line in log_text.splitlines():
        addresses: object = None
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and doc.get("msg") == READY and doc.get("logger") == log.name:
                name, addresses = doc.get("daemon"), doc.get("addresses")
        elif match := _TEXT_READY.match(line):
            name = match.group(1)
            with contextlib.suppress(ValueError):
                addresses = json.loads(match.group(2))
        if isinstance(addresses, dict):
            return str(name), {str(k): str(v) for k, v in addresses.items()}
    return None


# -- running ----------------------------------------------------------------------------------------
async def run_daemon(
    daemon: Daemon, options: Resolved, stop: asyncio.Event, *, ready: asyncio.Event | None = None
) -> None:
    """Run `daemon` in this event loop until `stop` is set, then drain and close (tests call this)."""
    daemon_options: DaemonOptions = options[DaemonOptions]
    life = Lifecycle(daemon.name, daemon_options)
    # The admin port is up first (/readyz says "starting ...") and last (503 "draining" meanwhile).
    app = admin_app(life.readiness, life.registry)
    life.admin_address, admin = await start_app(
        daemon_options.admin_listen, app, "--admin-listen", guard=life.guard("admin", ADMIN_CONNECTIONS)
    )
    try:
        try:
            if await _unless_stopped(daemon.serve(options, life), stop):
                life.readiness.set(True, "serving")
                addresses = {**life.addresses, "admin": life.admin_address}
                _log_whatever_the_level(READY, {"daemon": daemon.name, "addresses": addresses})
                if ready is not None:
                    ready.set()
                await stop.wait()
                await life.drain()
            else:
                log.info("stopped during start-up: closing what had started")
        finally:
            await life.close()
    finally:
        await admin.stop(0)
    log.info("stopped")


def _log_whatever_the_level(msg: str, extra: Mapping[str, Any]) -> None:
    """An INFO line that `--log-level warning` does not hide: the ready line is how the harness,
    `meshkit up` and a user with port 0 learn the bound addresses."""
    log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, msg, (), None, extra=dict(extra)))


async def _unless_stopped(starting: Awaitable[None], stop: asyncio.Event) -> bool:
    """Await `starting` (the daemon's serve()); True once it is done, False if `stop` was set first: a
    SIGTERM during start-up cancels it (a filter's pending start() with it) instead of waiting for
    every resource to start, reporting ready and only then draining."""
    task = asyncio.ensure_future(starting)
    stopped = asyncio.ensure_future(stop.wait())
    cancelled = False
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            cancelled = True
            task.cancel()
            await asyncio.wait({task})  # its cancellation has run (a start() being cancelled)
    if cancelled:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("start-up ended with %r while stopping", exc)
        return False
    if task.cancelled():  # serve() cancelled itself: a failure, not the silent exit 0 of a SIGTERM
        raise StartError("start-up was cancelled (by serve() itself, not by a signal)")
    task.result()  # raises what serve() raised
    return True


def run(daemon: Daemon, options: Resolved) -> None:
    """Run `daemon` as the process: signals, event loop; returns once it has stopped."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        task = asyncio.current_task()

        def on_signal(sig: signal.Signals) -> None:
            if stop.is_set():
                log.warning("second %s: exiting without waiting for the drain", sig.name)
                if task is not None:
                    task.cancel()
                return
            log.info("%s received: draining", sig.name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        with contextlib.suppress(asyncio.CancelledError):  # a second signal: no drain
            await run_daemon(daemon, options, stop)

    with asyncio.Runner(loop_factory=loop_factory(options[DaemonOptions].event_loop, daemon.event_loop)) as r:
        r.run(main())


def loop_factory(choice: str, auto: str = "uvloop") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop for `--event-loop`: `auto` means the daemon's measured choice, uvloop only if installed."""
    wanted = auto if choice == "auto" else choice
    if wanted == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":  # asked for by name: one line, exit 1, like every other start-up error
            missing = "--event-loop uvloop: uvloop is not installed (pip install 'meshkit[fast]')"
            raise StartError(missing) from None
        return None
    return uvloop.new_event_loop
