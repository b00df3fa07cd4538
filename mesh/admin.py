"""The admin port every daemon serves beside its main one: `/healthz`, `/readyz`, `/metrics`.

- `/healthz`: 200 while the process runs its loop (liveness).
- `/readyz`: 200 only while the daemon takes traffic; 503 from the moment SIGTERM arrives, so load
  balancers stop sending before the daemon stops accepting. A daemon whose readiness depends on
  something it cannot see by itself (a dependency that went away) sets `Readiness.check`: an async
  function asked on each `/readyz` while the daemon is otherwise ready, answering `(ready, reason,
  details)`; the details join the JSON body. The check bounds and caches its own probes (a probe storm
  must cost nothing); one that raises is a 503 naming the exception, never a traceback.
- `/metrics`: Prometheus text format from the daemon's registry.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

# A readiness check: (ready, reason, details for the /readyz body).
ReadyCheck = Callable[[], Awaitable[tuple[bool, str, dict[str, str]]]]


@dataclass
class Readiness:
    ready: bool = False
    reason: str = "starting"
    details: dict[str, str] = field(default_factory=dict)
    check: ReadyCheck | None = None  # asked while `ready` (see the module docstring)

    async def current(self) -> tuple[bool, str, dict[str, str]]:
        """(ready, reason, details) now: the lifecycle's state, then the check's word while ready."""
        ready, reason, details = self.ready, self.reason, dict(self.details)
        if ready and self.check is not None:
            try:
                ready, reason, more = await self.check()
            except Exception as exc:  # a broken check: not ready, said in one line
                ready, reason, more = False, f"readiness check failed: {type(exc).__name__}: {exc}", {}
            details.update(more)
        return ready, reason, details

    def set(self, ready: bool, reason: str) -> None:
        self.ready, self.reason = ready, reason


def _json(status: int, doc: dict[str, object]) -> web.Response:
    return web.Response(status=status, body=json.dumps(doc).encode(), content_type="application/json")


def admin_app(readiness: Readiness, registry: CollectorRegistry) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return _json(200, {"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ready, reason, details = await readiness.current()
        return _json(
            200 if ready else 503,
            {"status": "ready" if ready else "not_ready", "reason": reason, **details},
        )

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"content-type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
