"""The harness launchers against the real servers: NATS origin + leaf, Redis, Varnish, SeaweedFS S3.

Each test skips (with the package to install) only when its server binary is missing; CI installs all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from meshkit.errors import HarnessError
from meshkit.harness.nats import NatsServer, nats_server, nats_server_binary
from meshkit.harness.redis import redis_server, redis_server_binary
from meshkit.harness.s3 import s3_server, weed_binary
from meshkit.harness.varnish import varnish_server, varnishd_binary
from meshkit.nats_flush import flushed

pytestmark = pytest.mark.integration


def require(find_binary: Callable[[], str]) -> None:
    try:
        find_binary()
    except HarnessError as exc:
        pytest.skip(str(exc))


def assert_group_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


# -- NATS ------------------------------------------------------------------------------------------
async def _origin_and_leaf(origin: NatsServer, leaf: NatsServer) -> None:
    import nats
    from nats.errors import NoRespondersError
    from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

    on_origin = await nats.connect(origin.url, connect_timeout=2, max_reconnect_attempts=0)
    on_leaf = await nats.connect(leaf.url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        # Core: published on the leaf, received on the origin. Interest needs a moment to reach the
        # leaf, so publish until the origin's subscription sees one (bounded), not after a sleep.
        sub = await on_origin.subscribe("greet.>")
        await flushed(on_origin)
        received = None
        deadline = time.monotonic() + 5
        while received is None and time.monotonic() < deadline:
            await on_leaf.publish("greet.leaf", b"hello from the leaf")
            await flushed(on_leaf)
            with contextlib.suppress(TimeoutError):
                received = await sub.next_msg(timeout=0.1)
        assert received is not None, "nothing published on the leaf reached the origin within 5 s"
        assert received.subject == "greet.leaf"
        assert received.data == b"hello from the leaf"

        # JetStream lives on the origin; a leaf client reaches it only through the origin's domain.
        await on_origin.jetstream().add_stream(name="ORDERS", subjects=["orders.>"])
        js = on_leaf.jetstream(domain=origin.domain)
        # The new stream's interest in orders.> reaches the leaf a moment later: until it does, a publish
        # from the leaf finds no responder. Retry (bounded) until the stream itself acknowledges one;
        # the Nats-Msg-Id makes a retry safe.
        ack = None
        deadline = time.monotonic() + 5
        while ack is None:
            try:
                ack = await js.publish("orders.1", b"one", headers={"Nats-Msg-Id": "order-1"}, timeout=1)
            except (NoRespondersError, NoStreamResponseError):
                assert time.monotonic() < deadline, "the origin's stream never answered the leaf within 5 s"
                await asyncio.sleep(0.05)
        assert (ack.stream, ack.seq, ack.domain, ack.duplicate) == ("ORDERS", 1, "origin", None)
        again = await js.publish("orders.1", b"one", headers={"Nats-Msg-Id": "order-1"})
        assert (again.seq, again.duplicate) == (1, True)
        info = await on_origin.jetstream().stream_info("ORDERS")
        assert info.state.messages == 1

        # A JetStream publish is a request on the plain subject, which crosses the leaf like any other:
        # it is stored even without the domain. The JetStream API ($JS.API.>) is denied on the leaf.
        plain = await on_leaf.jetstream().publish("orders.2", b"two")
        assert (plain.stream, plain.seq) == ("ORDERS", 2)
        with pytest.raises((ServiceUnavailableError, NoRespondersError)):
            await on_leaf.jetstream().stream_info("ORDERS")
        assert (await js.stream_info("ORDERS")).state.messages == 2
    finally:
        await on_leaf.close()
        await on_origin.close()


def test_nats_origin_with_jetstream_domain_and_a_leaf(tmp_path: Path) -> None:
    require(nats_server_binary)
    with (
        nats_server(tmp_path, name="origin") as origin,
        nats_server(tmp_path, jetstream=False, leaf_remote=origin.leaf_url, name="leaf") as leaf,
    ):
        origin.wait_for_leafnodes(1, timeout=10)
        varz = origin.monitor("varz")
        assert varz["port"] == origin.port
        assert varz["leaf"]["port"] == origin.leaf_port
        assert leaf.monitor("leafz")["leafs"][0]["port"] == origin.leaf_port
        assert leaf.domain is None
        assert leaf.store_dir is None
        asyncio.run(_origin_and_leaf(origin, leaf))
        pids = (origin.process.pid, leaf.process.pid)
    for pid in pids:
        assert_group_gone(pid)


# -- Redis -----------------------------------------------------------------------------------------
def test_redis_set_get_without_persistence(tmp_path: Path) -> None:
    require(redis_server_binary)
    import redis

    with redis_server(tmp_path) as server:
        assert server.ping()
        client = redis.Redis.from_url(server.url)
        try:
            assert client.set("greeting", b"hello") is True
            assert client.get("greeting") == b"hello"
            assert client.config_get("save") == {"save": ""}
            assert client.config_get("appendonly") == {"appendonly": "no"}
        finally:
            client.close()
        pid = server.process.pid
    assert_group_gone(pid)


def test_redis_moves_to_another_port_when_its_port_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require(redis_server_binary)
    import meshkit.harness.redis as harness_redis

    with taken_port() as busy:
        hand_out_first(monkeypatch, harness_redis, busy)
        with redis_server(tmp_path) as server:
            assert server.port != busy
            assert server.ping()
    assert "Address already in use" in (tmp_path / "redis.1.log").read_text()


def hand_out_first(monkeypatch: pytest.MonkeyPatch, module: Any, port: int) -> None:
    """Make `module.free_port` return `port` once, then really free ports."""
    real_free_port = module.free_port
    first = iter([port])
    monkeypatch.setattr(module, "free_port", lambda host: next(first, None) or real_free_port(host))


@contextlib.contextmanager
def taken_port() -> Iterator[int]:
    """A loopback port held by a listening socket of this test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


# -- Varnish ---------------------------------------------------------------------------------------
class _CountingHandler(BaseHTTPRequestHandler):
    hits: int = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        body = f"backend answer for {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=60")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def backend() -> Iterator[tuple[str, int, type[_CountingHandler]]]:
    handler = type("Handler", (_CountingHandler,), {"hits": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="http-backend", daemon=True)
    thread.start()
    try:
        yield "127.0.0.1", int(server.server_address[1]), handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


VCL = """vcl 4.1;

sub vcl_recv {
    set req.backend_hint = origin;
}
"""


VCL_NO_BACKEND = "vcl 4.1;\nbackend default none;\n"


def _get(url: str) -> tuple[bytes, dict[str, str]]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read(), {k.lower(): v for k, v in resp.headers.items()}


def test_varnish_proxies_and_caches(tmp_path: Path, backend: tuple[str, int, type[_CountingHandler]]) -> None:
    require(varnishd_binary)
    host, port, handler = backend
    with varnish_server(tmp_path, VCL, backends={"origin": (host, port)}) as varnish:
        first_body, first = _get(f"{varnish.url}/item")
        second_body, second = _get(f"{varnish.url}/item")
        assert first_body == second_body == b"backend answer for /item"
        assert len(first["x-varnish"].split()) == 1  # a miss: only this request's id
        assert len(second["x-varnish"].split()) == 2  # a hit: this request's id + the object's
        assert handler.hits == 1
        assert "origin" in varnish.adm("backend.list")
        pid = varnish.process.pid
    assert_group_gone(pid)
    assert not varnish.vcl_path.exists()


def test_varnish_moves_to_other_ports_when_a_port_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require(varnishd_binary)
    import meshkit.harness.varnish as harness_varnish

    with taken_port() as busy:
        hand_out_first(monkeypatch, harness_varnish, busy)
        with varnish_server(tmp_path, VCL_NO_BACKEND) as varnish:
            assert busy not in (varnish.port, varnish.admin_port)
            with pytest.raises(urllib.error.HTTPError) as excinfo:
                _get(f"{varnish.url}/")
            assert excinfo.value.code == 503  # no backend: Varnish itself answered
            excinfo.value.close()
    assert "Address already in use" in (tmp_path / "varnish.1.log").read_text()


# -- S3 ----------------------------------------------------------------------------------------
def test_s3_put_get_and_signature_check(tmp_path: Path) -> None:
    require(weed_binary)
    import boto3
    from botocore.exceptions import ClientError

    with s3_server(tmp_path, "harness-key", "harness-secret") as s3:
        with contextlib.closing(boto3.client("s3", **s3.client_kwargs())) as client:
            client.create_bucket(Bucket="harness-bucket")
            client.put_object(Bucket="harness-bucket", Key="vectors/1", Body=b"\x00\x01payload")
            got = client.get_object(Bucket="harness-bucket", Key="vectors/1")
            assert got["Body"].read() == b"\x00\x01payload"

        wrong_secret = {**s3.client_kwargs(), "aws_secret_access_key": "not-the-secret"}
        with contextlib.closing(boto3.client("s3", **wrong_secret)) as wrong:
            with pytest.raises(ClientError) as excinfo:
                wrong.get_object(Bucket="harness-bucket", Key="vectors/1")
            assert excinfo.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
        pid = s3.process.pid
    assert_group_gone(pid)


# -- every launcher stops its whole process group, also when the body raises -------------------------
LAUNCHERS: dict[str, tuple[Callable[[], str], Callable[[Path], AbstractContextManager[Any]]]] = {
    "nats": (nats_server_binary, lambda d: nats_server(d)),
    "redis": (redis_server_binary, lambda d: redis_server(d)),
    "varnish": (varnishd_binary, lambda d: varnish_server(d, VCL_NO_BACKEND)),
    "s3": (weed_binary, lambda d: s3_server(d)),
}


class _BodyFailed(Exception):
    pass


@pytest.mark.parametrize("raises", [False, True], ids=["clean-exit", "body-raises"])
@pytest.mark.parametrize("kind", sorted(LAUNCHERS))
def test_process_group_is_gone_after_exit(tmp_path: Path, kind: str, raises: bool) -> None:
    find_binary, launch = LAUNCHERS[kind]
    require(find_binary)
    pid = 0
    outside: AbstractContextManager[Any] = pytest.raises(_BodyFailed) if raises else contextlib.nullcontext()
    with outside, launch(tmp_path) as server:
        pid = server.process.pid
        os.killpg(pid, 0)  # alive while inside
        if raises:
            raise _BodyFailed
    assert pid
    assert_group_gone(pid)
