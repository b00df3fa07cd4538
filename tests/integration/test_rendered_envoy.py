"""What the rendered front config promises in its comments, checked through a real Envoy where a
config test (tests/mesh) can only see the field: the ext_authz HTTP check retried when its connection
closed under it."""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import pytest

from meshkit.harness.daemons import Echo
from meshkit.harness.envoy import envoy
from meshkit.render import Api, FrontConfig

from .conftest import request

pytestmark = pytest.mark.integration


class _ClosesItsFirstCheck(socketserver.BaseRequestHandler):
    """A check server that resets the connection its first check came on, unanswered (as meshkit does
    to a pooled connection it closes the moment Envoy writes into it), and allows every later one."""

    server: _CheckServer

    def handle(self) -> None:
        stream = self.request.makefile("rb")
        while head := _read_head(stream):
            length = next(
                (
                    int(v)
                    for k, _, v in (line.partition(b":") for line in head)
                    if k.lower() == b"content-length"
                ),
                0,
            )
            stream.read(length)
            with self.server.lock:
                self.server.checks += 1
                first = self.server.checks == 1
            if first:
                self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return  # closed with RST, no answer
            self.request.sendall(b"HTTP/1.1 200 OK\r\nx-body-hash: allowed\r\ncontent-length: 0\r\n\r\n")


def _read_head(stream: BinaryIO) -> list[bytes]:
    lines = []
    while (line := stream.readline()) not in (b"\r\n", b""):
        lines.append(line.strip())
    return lines


class _CheckServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ClosesItsFirstCheck)
        self.lock = threading.Lock()
        self.checks = 0


@contextmanager
def check_server() -> Iterator[_CheckServer]:
    server = _CheckServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_ext_authz_http_check_is_retried_when_its_connection_closes_unanswered(
    workdir: Path, upstream: Echo
) -> None:
    with check_server() as checks:
        config = FrontConfig(
            upstream_ports=(upstream.port,),
            api=Api.EXT_AUTHZ_HTTP,
            extproc_port=checks.server_address[1],
            listen_port=0,
            failure_mode_allow=False,  # without the retry: 500 (fail open: through unhashed)
        )
        with envoy(config.render(), workdir, name="retried-check") as proxy:
            resp = request(proxy.url(path="/v1/x"), body=b"{}")
            retried = proxy.stats("cluster.meshkit_extproc.upstream_rq_retry")
    assert resp.status == 200, resp.body[:200]
    assert resp.upstream_headers["x-body-hash"] == "allowed"
    assert checks.checks == 2
    assert retried.get("cluster.meshkit_extproc.upstream_rq_retry") == 1
