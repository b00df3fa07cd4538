"""What happens when meshkit's server dies, drains, or gets garbage: through real Envoy and real gRPC."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import grpc
import pytest
import xxhash
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshkit.harness.daemons import Echo, Extproc, extproc
from meshkit.harness.envoy import Envoy
from meshkit.render import Api

from .conftest import front, request

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("api", ["ext_proc", "ext_authz", "ext_authz_http"])
def test_server_killed_mid_run_requests_still_served_unhashed(
    workdir: Path, upstream: Echo, api: Api
) -> None:
    with extproc(workdir, name=f"doomed-{api}") as server, front(workdir, upstream, server, api) as proxy:
        before = [request(proxy.url(), body=f"before {i}".encode()) for i in range(20)]
        assert all(
            r.upstream_headers["x-body-hash"] == xxhash.xxh3_128_hexdigest(f"before {i}".encode())
            for i, r in enumerate(before)
        )
        server.process.kill()
        after = [
            request(proxy.url(), body=f"after {i}".encode(), headers={"x-body-hash": "spoof"})
            for i in range(20)
        ]
        assert [r.status for r in after] == [200] * 20
        # Unhashed, and a client-chosen value never gets through (Envoy strips it before the filter).
        assert all("x-body-hash" not in r.upstream_headers for r in after)


def _grpc_health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status)


def test_sigterm_turns_readiness_off_then_drains_and_exits_zero(workdir: Path) -> None:
    with extproc(workdir, ["--drain-delay", "1.5"], name="draining") as server:
        assert request(f"{server.admin_url}/readyz", method="GET").status == 200
        assert _grpc_health(server.grpc_port) == health_pb2.HealthCheckResponse.SERVING
        assert request(f"{server.admin_url}/healthz", method="GET").status == 200
        started = time.monotonic()
        server.process.signal(signal.SIGTERM)
        deadline = started + 1.0
        status = None
        while time.monotonic() < deadline:
            status = request(f"{server.admin_url}/readyz", method="GET").status
            if status == 503:
                break
            time.sleep(0.01)
        assert status == 503, "readiness still on after SIGTERM"
        assert server.process.wait(10) == 0
        assert time.monotonic() - started >= 1.5  # --drain-delay was honoured
        assert "stopped" in server.process.log_text()


def test_garbage_on_the_stream_gets_grpc_error_and_server_lives(meshkit_server: Extproc) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{meshkit_server.grpc_port}") as channel:
        raw = channel.stream_stream(
            "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as err:
            list(raw(iter([b"\xff\xff\xff\xff garbage"]), timeout=5))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        check = channel.unary_unary(
            "/envoy.service.auth.v3.Authorization/Check",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as err:
            check(b"\xff\xff not a CheckRequest", timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        process = channel.stream_stream(
            "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
            request_serializer=ep.ProcessingRequest.SerializeToString,
            response_deserializer=ep.ProcessingResponse.FromString,
        )
        twice = [
            ep.ProcessingRequest(request_headers=ep.HttpHeaders()),
            ep.ProcessingRequest(request_headers=ep.HttpHeaders()),
        ]
        with pytest.raises(grpc.RpcError) as err:
            list(process(iter(twice), timeout=5))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            list(process(iter([ep.ProcessingRequest()]), timeout=5))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # The server still answers a well-formed stream.
        good = [
            ep.ProcessingRequest(request_headers=ep.HttpHeaders()),
            ep.ProcessingRequest(request_body=ep.HttpBody(body=b"still here", end_of_stream=True)),
        ]
        responses = list(process(iter(good), timeout=5))
        sets = responses[1].request_body.response.header_mutation.set_headers
        assert sets[0].header.raw_value == xxhash.xxh3_128_hexdigest(b"still here").encode()
    assert meshkit_server.process.returncode is None


def test_garbage_bytes_on_the_port_do_not_kill_the_server(meshkit_server: Extproc) -> None:
    with socket.create_connection(("127.0.0.1", meshkit_server.grpc_port), timeout=2) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 10)
        sock.recv(1024)
    assert _grpc_health(meshkit_server.grpc_port) == health_pb2.HealthCheckResponse.SERVING


def test_reflection_and_health_list_the_services(meshkit_server: Extproc) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{meshkit_server.grpc_port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in answer.list_services_response.service}
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("envoy.service.ext_proc.v3.ExternalProcessor", "envoy.service.auth.v3.Authorization"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    assert {
        "envoy.service.ext_proc.v3.ExternalProcessor",
        "envoy.service.auth.v3.Authorization",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


@pytest.mark.parametrize("api", ["ext_proc", "ext_authz", "ext_authz_http"])
def test_fail_closed_config_answers_500_json_when_server_is_down(
    workdir: Path, upstream: Echo, api: Api
) -> None:
    with (
        extproc(workdir, name=f"closed-{api}") as server,
        front(workdir, upstream, server, api, failure_mode_allow=False) as proxy,
    ):
        assert request(proxy.url(), body=b"up").status == 200
        server.process.kill()
        resp = request(proxy.url(), body=b"down")
        assert resp.status == 500
        assert resp.headers["content-type"] == "application/json"
        assert resp.json()["error"]["type"] == "internal_error"


def test_big_headers_pass_and_secrets_stay_out_of_logs(ingress: Envoy, meshkit_server: Extproc) -> None:
    token = "Bearer " + "s3cr3t" * 3000  # 18 KB: over aiohttp's default 8190-byte field limit
    path = "/v1/" + "p" * 9000
    resp = request(ingress.url(path=path), body=b"big headers", headers={"authorization": token})
    assert resp.status == 200, resp.body[:200]
    assert resp.upstream_headers["x-body-hash"] == xxhash.xxh3_128_hexdigest(b"big headers")
    assert "s3cr3t" not in meshkit_server.process.log_text()


def test_sigterm_lets_an_open_stream_finish(workdir: Path) -> None:
    """A stream that is mid-request when SIGTERM arrives still gets its answer; then the server exits 0."""
    import queue

    with extproc(workdir, ["--drain-timeout", "10"], name="drain-inflight") as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        process = channel.stream_stream(
            "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
            request_serializer=ep.ProcessingRequest.SerializeToString,
            response_deserializer=ep.ProcessingResponse.FromString,
        )
        outbox: queue.Queue[ep.ProcessingRequest | None] = queue.Queue()
        responses = process(iter(outbox.get, None), timeout=15)
        outbox.put(ep.ProcessingRequest(request_headers=ep.HttpHeaders()))
        assert next(responses).WhichOneof("response") == "request_headers"  # the stream is open, mid-request
        server.process.signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while request(f"{server.admin_url}/readyz", method="GET").status != 503:
            assert time.monotonic() < deadline, "readiness still on after SIGTERM"
            time.sleep(0.01)
        outbox.put(ep.ProcessingRequest(request_body=ep.HttpBody(body=b"late body", end_of_stream=True)))
        answer = next(responses)
        (option,) = answer.request_body.response.header_mutation.set_headers
        assert option.header.raw_value == xxhash.xxh3_128_hexdigest(b"late body").encode()
        outbox.put(None)
        assert list(responses) == []
        channel.close()
        assert server.process.wait(15) == 0


@pytest.mark.parametrize("api", ["ext_proc", "ext_authz", "ext_authz_http"])
def test_server_killed_with_requests_in_flight(workdir: Path, upstream: Echo, api: Api) -> None:
    """SIGKILL while requests are on the wire: every one still gets 200, hashed correctly or not at all."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    bodies = [f"in flight {i} ".encode() * 200 for i in range(240)]
    done = threading.Semaphore(0)
    with extproc(workdir, name=f"inflight-{api}") as server, front(workdir, upstream, server, api) as proxy:

        def send(body: bytes) -> tuple[int, str | None]:
            resp = request(proxy.url(), body=body)
            done.release()
            return resp.status, resp.upstream_headers.get("x-body-hash") if resp.status == 200 else None

        with ThreadPoolExecutor(max_workers=16) as pool:
            futures = [pool.submit(send, body) for body in bodies]
            for _ in range(40):  # let traffic flow, then kill mid-stream
                assert done.acquire(timeout=30)
            server.process.kill()
            results = [f.result(timeout=60) for f in futures]
    assert [status for status, _ in results] == [200] * len(bodies)
    hashes = [h for _, h in results]
    assert all(h is None or h == xxhash.xxh3_128_hexdigest(b) for h, b in zip(hashes, bodies, strict=True))
    assert 40 <= sum(h is not None for h in hashes) < len(bodies)  # hashed before the kill, not after
