"""`meshkit echo`: an upstream that answers every request with a JSON account of what it received.

`{"upstream" (its --name), "method", "path", "headers", "body_bytes", "body_sha256", "answer"}`
("answer": a random id, new on every call, so a cache that replays an answer is visible). The local
stack puts it behind Envoy so a curl shows what reached the upstream (`x-body-hash` included, and which
pod), and the integration tests read it the same way. A daemon like every other (`meshkit.daemon`):
`--admin-listen` with `/healthz`, `/readyz`, `/metrics`, `--log-format json`, the ready line, SIGTERM
drain.

Test switches, request headers read only when a request carries them (a cache tier's tests need
answers a cache must refuse to store, or a stream):
    x-echo-status: NNN            answer with that status (100-599 is not checked further)
    x-echo-header: Name: value    add that response header; repeat the header for several
    x-echo-sse: N                 answer `text/event-stream`: N events `data: {"index", "of",
                                  "answer", "body_sha256"}` then `data: [DONE]`, each written and
                                  flushed on its own (N at most 1000)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
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


STATUS_SWITCH = "x-echo-status"
HEADER_SWITCH = "x-echo-header"
SSE_SWITCH = "x-echo-sse"
MAX_EVENTS = 1000


async def _echo(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    request.app[REQUESTS].labels(request.method).inc()
    digest = hashlib.sha256(body).hexdigest()
    answer = uuid.uuid4().hex
    doc = {
        "upstream": request.app[NAME],
        "method": request.method,
        "path": request.path_qs,
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "body_bytes": len(body),
        "body_sha256": digest,
        "answer": answer,
    }
    headers = request.headers
    if STATUS_SWITCH in headers or HEADER_SWITCH in headers or SSE_SWITCH in headers:
        return await _switched(request, doc, digest, answer)
    return web.Response(body=json.dumps(doc, indent=1).encode() + b"\n", content_type="application/json")


async def _switched(
    request: web.Request, doc: dict[str, Any], digest: str, answer: str
) -> web.StreamResponse:
    """The answer the test switches ask for (400 naming the switch when one is malformed)."""
    try:
        status = int(request.headers.get(STATUS_SWITCH, "200"))
        events = int(request.headers.get(SSE_SWITCH, "-1"))
        extra = [tuple(v.split(":", 1)) for v in request.headers.getall(HEADER_SWITCH, [])]
        if not 100 <= status <= 599 or events > MAX_EVENTS or any(len(h) != 2 for h in extra):
            raise ValueError
    except ValueError:
        return web.json_response(
            {"error": f"bad {STATUS_SWITCH}, {SSE_SWITCH} or {HEADER_SWITCH}"}, status=400
        )
    if events < 0:
        plain = web.Response(
            status=status, body=json.dumps(doc, indent=1).encode() + b"\n", content_type="application/json"
        )
        for name, value in extra:
            plain.headers.add(name.strip(), value.strip())
        return plain
    response = web.StreamResponse(status=status)
    response.content_type = "text/event-stream"
    for name, value in extra:
        response.headers.add(name.strip(), value.strip())
    await response.prepare(request)
    for i in range(events):
        event = {"index": i, "of": events, "answer": answer, "body_sha256": digest}
        await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        await asyncio.sleep(0.005)  # a stream in several writes, as a model's tokens arrive
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


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
