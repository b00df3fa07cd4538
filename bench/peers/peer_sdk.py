"""Body-hash ext_proc server written with the public PyPI SDK ``envoy-extproc-sdk`` 0.1.1: the peer to beat.

The same behaviour as ``naive_aio.py`` (empty CONTINUE for the request headers, ``x-body-hash`` =
lowercase hex XXH3-128 of the buffered request body), written the way the SDK's users write it: a
``BaseExtProcService`` subclass with a ``process_request_body`` handler, served by the SDK's own
``Process`` stream loop, servicer registration and health service.

Runs only in the separate venv that ``setup_peer.sh`` builds (the SDK needs ``ddtrace<2``):

    bench/peers/setup_peer.sh build/peer-venv
    build/peer-venv/bin/python bench/peers/peer_sdk.py --listen 127.0.0.1:0  # READY 127.0.0.1:<port>

Deviations from a stock SDK app, each forced by a defect of the SDK and kept minimal:
- ``shim/`` goes on ``sys.path``: the SDK imports ``grpc_health_check``, which no PyPI package provides.
- ``add_header`` is overridden to set ``raw_value`` (the SDK's sets ``value``, which Envoy 1.40 forwards
  as an empty header) with OVERWRITE_IF_EXISTS_OR_ADD.
- The server is assembled here from the SDK's parts instead of ``envoy_extproc_sdk.serve``, which binds
  ``[::]:PORT`` only, cannot report an ephemeral port, has no receive-size option and no SIGTERM handling.
  The receive limit is raised to 16 MiB like the naive baseline's.
- ddtrace's tracer stays in the request path (the SDK calls it on every message) but, unless the
  environment says otherwise, does not try to ship spans to a Datadog agent that is not there.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "shim"))
for _name in ("DD_TRACE_ENABLED", "DD_INSTRUMENTATION_TELEMETRY_ENABLED", "DD_REMOTE_CONFIGURATION_ENABLED"):
    os.environ.setdefault(_name, "false")

import grpc  # noqa: E402
import xxhash  # noqa: E402
from envoy_extproc_sdk import BaseExtProcService, ext_api  # noqa: E402
from envoy_extproc_sdk.health import HealthService, add_HealthServicer_to_server  # noqa: E402
from envoy_extproc_sdk.util.envoy import (  # noqa: E402
    EnvoyHeaderValue,
    EnvoyHeaderValueOption,
    add_ExternalProcessorServicer_to_server,
)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
HASH_HEADER = "x-body-hash"


class BodyHashService(BaseExtProcService):  # type: ignore[misc]
    """SDK processor: hashes the buffered request body into ``x-body-hash``; other phases pass."""

    @staticmethod
    def add_header(response: ext_api.CommonResponse, key: str, value: str) -> ext_api.CommonResponse:
        """The SDK's helper, but with ``raw_value`` (Envoy 1.40 ignores ``value``) and overwrite."""
        header = EnvoyHeaderValue(key=key, raw_value=value.encode())
        option = EnvoyHeaderValueOption(
            header=header, append_action=EnvoyHeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        )
        response.header_mutation.set_headers.append(option)
        return response

    async def process_request_body(
        self,
        body: ext_api.HttpBody,
        context: grpc.aio.ServicerContext,
        request: dict[str, object],
        response: ext_api.CommonResponse,
    ) -> ext_api.CommonResponse:
        return self.add_header(response, HASH_HEADER, xxhash.xxh3_128(body.body).hexdigest())


async def serve(listen: str) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    add_ExternalProcessorServicer_to_server(BodyHashService(), server)
    add_HealthServicer_to_server(HealthService(), server)
    port = server.add_insecure_port(listen)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {listen.rsplit(':', 1)[0]}:{port}", flush=True)
    await stop.wait()
    await server.stop(grace=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description="envoy-extproc-sdk 0.1.1 body-hash ext_proc server.")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to bind (port 0: ephemeral)")
    asyncio.run(serve(parser.parse_args().listen))


if __name__ == "__main__":
    main()
