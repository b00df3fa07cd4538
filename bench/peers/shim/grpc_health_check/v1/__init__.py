"""``grpc_health_check.v1``: re-exports of ``grpc_health.v1`` (see the package docstring)."""
