"""The daemon example in the README runs as printed, on the shared lifecycle."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from meshkit import logs
from meshkit.daemon import DaemonOptions, parse_ready, run_daemon
from meshkit.options import resolve


async def test_readme_daemon_example(readme_example: Callable[[str], dict[str, Any]]) -> None:
    ns = readme_example("### Writing a daemon")
    spec = ns["DAEMON"]
    options = resolve(
        spec.all_sections(),
        command=spec.name,
        flags={"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "greeting": "hi"},
        env={},
    )
    assert options[DaemonOptions].drain_timeout == 10.0  # the shared options come with it
    stream = io.StringIO()
    logs.setup("text", "info", stream)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_daemon(spec, options, stop, ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        found = parse_ready(stream.getvalue())
        assert found is not None and found[0] == "hello"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{found[1]['http']}/") as resp:
                assert await resp.json() == {"greeting": "hi"}
            async with session.get(f"http://{found[1]['admin']}/readyz") as resp:
                assert resp.status == 200
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        logging.getLogger().handlers.clear()
    assert "stopped" in stream.getvalue()
