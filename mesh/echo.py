"""`meshkit echo`: an upstream that answers every request with a JSON account of what it received.

`{"upstream" (its --name), "method", "path", "headers", "body_bytes", "body_sha256"}`. The local
stack puts it behind Envoy so a curl shows what reached the upstream (`x-body-hash` included, and which
pod), and the integration tests read it the same way. It prints `ready: http=HOST:PORT` once it
listens (port 0 picks a free port).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import signal

from aiohttp import web

from meshkit.errors import MeshkitError

log = logging.getLogger("meshkit.echo")

MAX_BODY = 256 << 20


NAME = web.AppKey("name", str)


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    doc = {
        "upstream": request.app[NAME],
        "method": request.method,
        "path": request.path_qs,
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "body_bytes": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    return web.Response(body=json.dumps(doc, indent=1).encode() + b"\n", content_type="application/json")


def echo_app(name: str = "echo") -> web.Application:
    app = web.Application(
        client_max_size=MAX_BODY, handler_args={"max_line_size": 64 << 10, "max_field_size": 64 << 10}
    )
    app[NAME] = name
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


async def serve_echo(listen: str, stop: asyncio.Event, name: str = "echo") -> None:
    host, _, port = listen.rpartition(":")
    runner = web.AppRunner(echo_app(name), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host.strip("[]"), int(port), shutdown_timeout=1.0)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise MeshkitError(f"cannot listen on {listen}: {exc.strerror}") from None
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"ready: http={host}:{bound}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def run_echo(listen: str, name: str = "echo") -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve_echo(listen, stop, name)

    asyncio.run(main())
