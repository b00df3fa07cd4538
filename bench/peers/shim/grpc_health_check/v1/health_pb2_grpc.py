"""``grpc_health_check.v1.health_pb2_grpc``: the servicer names the SDK imports, from ``grpc_health.v1``."""

from grpc_health.v1.health_pb2_grpc import HealthServicer, add_HealthServicer_to_server

__all__ = ["HealthServicer", "add_HealthServicer_to_server"]
