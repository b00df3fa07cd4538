"""Naive body-hash ext_proc server: the baseline the benchmark compares meshkit against.

A straightforward grpcio.aio server on the generated xds-protos stub, written the way a competent
developer would write it the first time: one ``async for`` over the stream, every response built
from scratch, no tricks. For Envoy's ext_proc with ``request_header_mode: SEND`` and
``request_body_mode: BUFFERED``: the request headers get an empty CONTINUE, the request body gets
``x-body-hash`` = lowercase hex XXH3-128 of the body (set with ``raw_value``, which Envoy 1.40 needs),
any other message its matching empty response.

    python bench/peers/naive_aio.py --listen 127.0.0.1:0   # prints "READY 127.0.0.1:<port>"; SIGTERM stops it
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import grpc
import xxhash
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    ProcessingRequest,
    ProcessingResponse,
    TrailersResponse,
)
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import (
    ExternalProcessorServicer,
    add_ExternalProcessorServicer_to_server,
)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
HASH_HEADER = "x-body-hash"
# The empty response for each message kind we do not act on.
EMPTY_RESPONSES: dict[str, type[HeadersResponse | BodyResponse | TrailersResponse]] = {
    "request_headers": HeadersResponse,
    "response_headers": HeadersResponse,
    "request_body": BodyResponse,
    "response_body": BodyResponse,
    "request_trailers": TrailersResponse,
    "response_trailers": TrailersResponse,
}


class BodyHashProcessor(ExternalProcessorServicer):  # type: ignore[misc]
    """Answers each ext_proc message; hashes the buffered request body into a header."""

    async def Process(
        self, request_iterator: AsyncIterator[ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ProcessingResponse]:
        async for request in request_iterator:
            kind = request.WhichOneof("request")
            if kind == "request_body":
                yield ProcessingResponse(request_body=self.hash_body(request.request_body.body))
            elif kind is not None:
                yield ProcessingResponse(**{kind: EMPTY_RESPONSES[kind]()})

    @staticmethod
    def hash_body(body: bytes) -> BodyResponse:
        digest = xxhash.xxh3_128(body).hexdigest()
        header = HeaderValueOption(
            header=HeaderValue(key=HASH_HEADER, raw_value=digest.encode()),
            append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )
        return BodyResponse(response=CommonResponse(header_mutation=HeaderMutation(set_headers=[header])))


async def serve(listen: str) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    add_ExternalProcessorServicer_to_server(BodyHashProcessor(), server)
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
    parser = argparse.ArgumentParser(description="Naive grpcio.aio body-hash ext_proc server.")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to bind (port 0: ephemeral)")
    asyncio.run(serve(parser.parse_args().listen))


if __name__ == "__main__":
    main()
