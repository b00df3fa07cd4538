"""`meshkit echo`: an upstream that answers every request with a JSON account of what it received.

`{"upstream" (its --name), "method", "path", "headers", "body_bytes", "body_sha256"}`. The local
stack puts it behind Envoy so a curl shows what reached the upstream (`x-body-hash` included, and which
pod), and the integration tests read it the same way. A daemon like every other (`meshkit.daemon`):
`--admin-listen` with `/healthz`, `/readyz`, `/metrics`, `--log-format json`, the ready line, SIGTERM
drain.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from meshkit.daemon import Daemon, Lifecycle, Resolved
from meshkit.options import option, parse_host_port, parse_size

NAME = web.AppKey("name", str)
REQUESTS = web.AppKey("requests", Counter)


@dataclass(frozen=True)
class EchoOptions:
    listen: str = option(
        "127.0.0.1:8080",
        "HOST:PORT to answer on (port 0: any free port)",
        parse=parse_host_port,
        metavar="HOST:PORT",
    )
    name: str = option("echo", 'reported as "upstream" in every answer')
    max_body_bytes: int = option(
        256 << 20, "largest request body read (bigger: 413)", parse=parse_size, metavar="BYTES"
    )


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    request.app[REQUESTS].labels(request.method).inc()
    doc = {
        "upstream": request.app[NAME],
        "method": request.method,
        "path": request.path_qs,
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "body_bytes": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    return web.Response(body=json.dumps(doc, indent=1).encode() + b"\n", content_type="application/json")


def echo_app(
    name: str = "echo", *, max_body_bytes: int = 256 << 20, registry: CollectorRegistry | None = None
) -> web.Application:
    app = web.Application(
        client_max_size=max_body_bytes, handler_args={"max_line_size": 64 << 10, "max_field_size": 64 << 10}
    )
    app[NAME] = name
    app[REQUESTS] = Counter(
        "meshkit_echo_requests", "Requests answered", ["method"], registry=registry or CollectorRegistry()
    )
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


async def serve(options: Resolved, life: Lifecycle) -> None:
    echo: EchoOptions = options[EchoOptions]
    app = echo_app(echo.name, max_body_bytes=echo.max_body_bytes, registry=life.registry)
    await life.serve_app("http", echo.listen, app)


def _sections() -> list[type[Any]]:
    return [EchoOptions]


DAEMON = Daemon(
    name="echo",
    help="a small HTTP upstream that answers with what it received (JSON)",
    sections=_sections,
    serve=serve,
)
