"""What the rendered front config promises in its comments, checked through a real Envoy where a
config test (tests/mesh) can only see the field: the ext_authz HTTP check retried when its connection
closed under it; more than 1,024 concurrent requests over ext_proc (Envoy's default circuit breaker);
`localhost` for meshkit and the upstream."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import socketserver
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import aiohttp
import pytest
import xxhash
from aiohttp import web

from meshkit.harness.daemons import Echo, Extproc
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


# -- more concurrent requests than Envoy's default circuit breaker ------------------------------------
CONCURRENT = 1100  # over the 1,024 requests Envoy allows a cluster by default
HELD = 1024  # what reaches the upstream at once (its own cluster's default connection limit)


@contextmanager
def holding_upstream() -> Iterator[int]:
    """An upstream (in a thread) that holds every request until HELD have arrived (or 20 s passed), so
    that CONCURRENT requests are in flight through Envoy at once; it answers with the x-body-hash it got."""
    loop = asyncio.new_event_loop()
    arrived = 0
    all_in = asyncio.Event()

    async def hold(request: web.Request) -> web.Response:
        nonlocal arrived
        await request.read()
        arrived += 1
        if arrived >= HELD:
            all_in.set()
        await asyncio.wait_for(all_in.wait(), 20)
        return web.json_response({"x-body-hash": request.headers.get("x-body-hash")})

    async def start() -> tuple[web.AppRunner, int]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", hold)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, backlog=4096).start()  # Envoy connects 1,024 at once
        return runner, int(runner.addresses[0][1])

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


async def _concurrent_posts(url: str, count: int) -> list[tuple[int, bytes, str | None]]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def post(n: int) -> tuple[int, bytes, str | None]:
            body = json.dumps({"input": f"request {n}"}).encode()
            async with session.post(url, data=body, timeout=aiohttp.ClientTimeout(total=60)) as resp:
                answer = await resp.json() if resp.status == 200 else {}
                return resp.status, body, answer.get("x-body-hash")

        return await asyncio.gather(*(post(n) for n in range(count)))


def test_ext_proc_takes_more_concurrent_requests_than_envoys_default_circuit_breaker(
    workdir: Path, meshkit_server: Extproc
) -> None:
    # ext_proc holds a stream to meshkit for each request's whole life: with Envoy's default limit of
    # 1,024 requests to the meshkit cluster, the 1,025th concurrent request went through unhashed.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * CONCURRENT + 1024  # this process: clients and the upstream; Envoy inherits it
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    try:
        with holding_upstream() as port:
            config = FrontConfig(
                upstream_ports=(port,), extproc_port=meshkit_server.grpc_port, api=Api.EXT_PROC, listen_port=0
            )
            with envoy(config.render(), workdir, name="many-streams") as proxy:
                results = asyncio.run(_concurrent_posts(proxy.url(path="/v1/embeddings"), CONCURRENT))
                overflow = proxy.stats("cluster.meshkit_extproc.upstream_rq_pending_overflow")
                failed_open = proxy.failed_open()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert failed_open == 0, f"{failed_open} requests let through unprocessed"
    assert sum(overflow.values()) == 0
    assert [status for status, _, _ in results] == [200] * CONCURRENT
    assert all(got == xxhash.xxh3_128_hexdigest(body) for _, body, got in results)


@pytest.mark.parametrize("api", [Api.EXT_AUTHZ_HTTP, Api.EXT_PROC])
def test_localhost_reaches_servers_on_127_0_0_1(
    workdir: Path, upstream: Echo, meshkit_server: Extproc, api: Api
) -> None:
    # Envoy's default dns_lookup_family (AUTO) resolved localhost to ::1 first: every connection to
    # meshkit and the upstream (both on 127.0.0.1) was refused, and each request answered 500.
    config = FrontConfig(
        upstream_ports=(upstream.port,),
        upstream_host="localhost",
        extproc_host="localhost",
        extproc_port=meshkit_server.port_for(api),
        api=api,
        listen_port=0,
        failure_mode_allow=False,
    )
    with envoy(config.render(), workdir, name=f"localhost-{api}") as proxy:
        resp = request(proxy.url(path="/v1/x"), body=b"{}")
    assert resp.status == 200, resp.body[:200]
    assert resp.upstream_headers["x-body-hash"] == xxhash.xxh3_128_hexdigest(b"{}")
