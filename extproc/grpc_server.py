"""The grpcio server core: grpc.aio on the daemon's asyncio loop, with health and reflection.

Chosen by measurement through real Envoy (ext_authz, 1 KiB bodies, `make bench` and a constant-answer
probe; see the README): grpcio's thread-pool server cost more CPU per request than grpc.aio with
meshkit's handlers (597 vs 555 µs here), ext_proc streams pin one pool thread each, and async filters
(Redis, NATS) need the loop anyway. grpclib (pure-Python HTTP/2) cost more still.

A handler that is a `Service` is registered with grpc's core (`add_registered_method_handlers`): the core
matches the method path itself, instead of grpc.aio asking every generic handler in Python for every
call; anything else (health and reflection register themselves) is added as a generic handler.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


class Service(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc is untyped
    """One gRPC service's method handlers by method name. `GrpcServer` registers them with the core; any
    other grpc server (tests) can take it as a plain generic handler."""

    def __init__(self, name: str, methods: Mapping[str, grpc.RpcMethodHandler]) -> None:
        self.name = name
        self.methods = dict(methods)
        self._by_path = {f"/{name}/{method}": handler for method, handler in methods.items()}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._by_path.get(handler_call_details.method)


class GrpcServer:
    def __init__(
        self, handlers: Sequence[grpc.GenericRpcHandler], services: Sequence[str], message_limit: int
    ) -> None:
        self.server = grpc.aio.server(options=_server_options(message_limit))
        for handler in handlers:
            if isinstance(handler, Service):
                self.server.add_registered_method_handlers(handler.name, handler.methods)
            else:
                self.server.add_generic_rpc_handlers((handler,))
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
