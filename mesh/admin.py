"""The admin port every daemon serves beside its main one: `/healthz`, `/readyz`, `/metrics`.

- `/healthz`: 200 while the process runs its loop (liveness).
- `/readyz`: 200 only while the daemon takes traffic; 503 from the moment SIGTERM arrives, so load
  balancers stop sending before the daemon stops accepting.
- `/metrics`: Prometheus text format from the daemon's registry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


@dataclass
class Readiness:
    ready: bool = False
    reason: str = "starting"
    details: dict[str, str] = field(default_factory=dict)

    def set(self, ready: bool, reason: str) -> None:
        self.ready, self.reason = ready, reason


def _json(status: int, doc: dict[str, object]) -> web.Response:
    return web.Response(status=status, body=json.dumps(doc).encode(), content_type="application/json")


def admin_app(readiness: Readiness, registry: CollectorRegistry) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return _json(200, {"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        status = 200 if readiness.ready else 503
        return _json(
            status,
            {
                "status": "ready" if readiness.ready else "not_ready",
                "reason": readiness.reason,
                **readiness.details,
            },
        )

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"content-type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
