"""The two grpcio server cores meshkit can run on, behind one small interface.

- `aio`: grpc.aio on the asyncio loop. Filters may have async hooks (Redis, NATS clients).
- `threads`: grpcio's classic server on a thread pool; the asyncio loop then only runs the admin port.
  Only for chains whose hooks are all sync.

Both serve the same method tables (`handler(blocking=...)`), health and reflection. Which one costs less
per request through real Envoy is a question for `make bench`, not for intuition.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

SERVING = health_pb2.HealthCheckResponse.SERVING


class Core(Protocol):
    blocking: bool

    def add_port(self, address: str) -> int: ...
    async def start(self, serving: Sequence[str]) -> None: ...
    async def not_serving(self) -> None: ...
    async def stop(self, grace: float | None) -> None: ...


def _server_options(message_limit: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", message_limit),
        ("grpc.max_send_message_length", message_limit),
        ("grpc.so_reuseport", 0),
        ("grpc.http2.bdp_probe", 0),
    ]


class AioCore:
    blocking = False

    def __init__(
        self, handlers: Sequence[grpc.GenericRpcHandler], services: Sequence[str], message_limit: int
    ) -> None:
        self.server = grpc.aio.server(options=_server_options(message_limit))
        self.server.add_generic_rpc_handlers(tuple(handlers))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*services, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )

    def add_port(self, address: str) -> int:
        return int(self.server.add_insecure_port(address))

    async def start(self, serving: Sequence[str]) -> None:
        await self.server.start()
        for name in ("", *serving):
            await self.health.set(name, SERVING)

    async def not_serving(self) -> None:
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float | None) -> None:
        await self.server.stop(grace)


class ThreadCore:
    blocking = True

    def __init__(
        self,
        handlers: Sequence[grpc.GenericRpcHandler],
        services: Sequence[str],
        message_limit: int,
        threads: int,
    ) -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc")
        self.server = grpc.server(self.pool, options=_server_options(message_limit))
        self.server.add_generic_rpc_handlers(tuple(handlers))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*services, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )

    def add_port(self, address: str) -> int:
        return int(self.server.add_insecure_port(address))

    async def start(self, serving: Sequence[str]) -> None:
        self.server.start()
        for name in ("", *serving):
            self.health.set(name, SERVING)

    async def not_serving(self) -> None:
        self.health.enter_graceful_shutdown()

    async def stop(self, grace: float | None) -> None:
        done = self.server.stop(grace)
        await asyncio.get_running_loop().run_in_executor(None, done.wait)
        self.pool.shutdown(wait=False)
