"""Size limits that Envoy's config and our gRPC server must agree on (see the field notes).

Envoy buffers up to `envoy_buffer_limit(max)`: a body a little over `--max-body-bytes` still reaches
meshkit, which answers 413 with its JSON error; beyond that Envoy answers 413 itself (the rendered
config gives that reply the same JSON body). grpcio must accept the biggest message Envoy can send
(`grpc_message_limit`), or a big body breaks the stream and Envoy answers 500 (or, with
failure_mode_allow, lets it through unprocessed).
"""

from __future__ import annotations

MIB = 1 << 20
ENVOY_BUFFER_HEADROOM = MIB
GRPC_FRAMING_HEADROOM = MIB  # headers, attributes and protobuf framing around the body


def envoy_buffer_limit(max_body_bytes: int) -> int:
    return max_body_bytes + ENVOY_BUFFER_HEADROOM


def grpc_message_limit(max_body_bytes: int) -> int:
    return envoy_buffer_limit(max_body_bytes) + GRPC_FRAMING_HEADROOM
