"""Shim for the ``grpc_health_check`` module that envoy-extproc-sdk 0.1.1 imports.

No PyPI package provides ``grpc_health_check``; the SDK's ``health.py`` expects the standard
gRPC health service there. This package maps those names onto grpcio-health-checking's
``grpc_health.v1``. It exists only so that the benchmark peer (``bench/peers/peer_sdk.py``)
can import the unmodified SDK.
"""
