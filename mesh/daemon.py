"""What every meshkit daemon shares: its common options and the run loop around `serve()`.

Shutdown order (aiohttp's, with the readiness step first): SIGTERM/SIGINT -> `/readyz` and gRPC health
say NOT_SERVING -> wait `--drain-delay` so load balancers notice -> stop accepting -> in-flight work gets
up to `--drain-timeout` -> exit 0. A second signal during the drain exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from meshkit.options import option, parse_host_port, parse_seconds

log = logging.getLogger("meshkit")


@dataclass(frozen=True)
class DaemonOptions:
    admin_listen: str = option(
        "127.0.0.1:9090",
        "HOST:PORT for /healthz, /readyz and /metrics",
        parse=parse_host_port,
        metavar="HOST:PORT",
    )
    log_format: str = option("text", "log format", choices=("text", "json"))
    log_level: str = option("info", "log level", choices=("debug", "info", "warning", "error"))
    drain_delay: float = option(
        0.0,
        "seconds between SIGTERM (readiness off) and closing the listener",
        parse=parse_seconds,
        metavar="SECONDS",
    )
    drain_timeout: float = option(
        10.0, "seconds in-flight requests get to finish after that", parse=parse_seconds, metavar="SECONDS"
    )
    event_loop: str = option(
        "auto",
        "asyncio event loop: uvloop when installed (auto), or asyncio",
        choices=("auto", "uvloop", "asyncio"),
    )


def run(main: Callable[[asyncio.Event], Coroutine[Any, Any, None]], options: DaemonOptions) -> None:
    """Run `main(stop)` until it returns; SIGTERM/SIGINT set `stop`, a second one cancels the drain."""

    async def runner() -> None:
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
            await main(stop)

    factory = _loop_factory(options.event_loop)
    with asyncio.Runner(loop_factory=factory) as r:
        r.run(runner())


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit(
                "--event-loop uvloop: uvloop is not installed (pip install 'meshkit[fast]')"
            ) from None
        return None
    return uvloop.new_event_loop
