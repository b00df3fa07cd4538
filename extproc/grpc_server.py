"""The grpcio server core: grpc.aio on the daemon's asyncio loop, with health and reflection.

Chosen by measurement through real Envoy (ext_authz, 1 KiB bodies, `make bench` and a constant-answer
probe; see the README): grpcio's thread-pool server cost more CPU per request than grpc.aio with
meshkit's handlers (597 vs 555 µs here), ext_proc streams pin one pool thread each, and async filters
(Redis, NATS) need the loop anyway. grpclib (pure-Python HTTP/2) cost more still.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from meshkit.errors import ListenError

SERVING = health_pb2.HealthCheckResponse.SERVING


def _server_options(message_limit: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", message_limit),
        ("grpc.max_send_message_length", message_limit),
        ("grpc.so_reuseport", 0),
        ("grpc.http2.bdp_probe", 0),
    ]


class GrpcServer:
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

    def listen(self, address: str) -> str:
        """Bind `HOST:PORT` (port 0: any free port) and return the bound `HOST:PORT`. grpcio binds its
        own sockets, so this is the one listener that does not go through `meshkit.daemon.bind`; its
        failure reads the same (`ListenError`, one line)."""
        host = address.rpartition(":")[0]
        try:
            port = int(self.server.add_insecure_port(address))
        except RuntimeError as exc:
            raise ListenError(f"cannot listen on {address} (--listen): {exc}") from None
        return f"{host}:{port}"

    async def start(self, serving: Sequence[str]) -> None:
        await self.server.start()
        for name in ("", *serving):
            await self.health.set(name, SERVING)

    async def not_serving(self) -> None:
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        await self.server.stop(grace or None)
