"""ext_proc through a real Envoy where Envoy's own behaviour is the point: HTTP/2 requests with trailers.

With `request_body_mode: BUFFERED` and `request_trailer_mode: SKIP` (what meshkit renders), Envoy 1.40
sends the whole body of an HTTP/2 request with trailers in ONE `request_body` message with
end_of_stream=false and nothing after it; with trailers SEND, a `request_trailers` message follows.
Either way the upstream must get `x-body-hash`. The client is a small hand-written HTTP/2
prior-knowledge (h2c) client: no HTTP/2 package is needed, and it can end the stream with a trailers
HEADERS frame after DATA frames that do not end it, which ordinary clients cannot be made to do.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import xxhash
import yaml

from meshkit.harness.daemons import Echo, Extproc
from meshkit.harness.envoy import Envoy, envoy
from meshkit.render import FrontConfig

pytestmark = pytest.mark.integration


# -- a minimal h2c client --------------------------------------------------------------------------
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
STREAM = 1
# HPACK static-table entries Envoy uses for common statuses (RFC 7541 appendix A, indexes 8-14).
STATIC_STATUS = {0x88: 200, 0x89: 204, 0x8A: 206, 0x8B: 304, 0x8C: 400, 0x8D: 404, 0x8E: 500}


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def hpack_int(value: int, prefix_bits: int = 7) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out, value = bytearray([limit]), value - limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def header_block(headers: Sequence[tuple[str, str]]) -> bytes:
    """HPACK "literal header field without indexing, new name", no Huffman: valid and stateless."""
    out = b""
    for name, value in headers:
        n, v = name.encode(), value.encode()
        out += b"\x00" + hpack_int(len(n)) + n + hpack_int(len(v)) + v
    return out


@dataclass(frozen=True)
class H2Response:
    status: int | None  # None: a status this client does not decode (not one of STATIC_STATUS)
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class _Frames:
    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""

    def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            got = self.sock.recv(65536)
            if not got:
                raise ConnectionError("Envoy closed the connection before the response ended")
            self.buf += got
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def __iter__(self) -> Iterator[tuple[int, int, int, bytes]]:
        while True:
            head = self.read(9)
            length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
            stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            yield kind, flags, stream, self.read(length)


def h2c_post(
    host: str, port: int, path: str, chunks: Sequence[bytes], trailers: Sequence[tuple[str, str]] = ()
) -> H2Response:
    """POST `chunks` as DATA frames; the stream ends with a trailers HEADERS frame when `trailers` is
    given, else with the last DATA frame. Bodies must fit HTTP/2's initial 64 KiB window."""
    assert sum(map(len, chunks)) < 65535 and all(len(c) <= 16384 for c in chunks)
    request = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", f"{host}:{port}")]
    out = PREFACE + frame(SETTINGS, 0, 0)
    out += frame(HEADERS, END_HEADERS, STREAM, header_block([*request, ("content-type", "text/plain")]))
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1 and not trailers
        out += frame(DATA, END_STREAM if last else 0, STREAM, chunk)
    if trailers:
        out += frame(HEADERS, END_HEADERS | END_STREAM, STREAM, header_block(trailers))
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(out)
        status: int | None = None
        body = b""
        for kind, flags, stream, payload in _Frames(sock):
            if kind == SETTINGS and not flags & ACK:
                sock.sendall(frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                sock.sendall(frame(PING, ACK, 0, payload))
            elif kind in (RST_STREAM, GOAWAY):
                raise ConnectionError(f"Envoy sent frame type {kind}: {payload!r}")
            elif stream == STREAM and kind in (HEADERS, DATA):
                if kind == HEADERS and status is None:
                    status = STATIC_STATUS.get(payload[0])
                body += payload if kind == DATA else b""
                if flags & END_STREAM:
                    return H2Response(status, body)
    raise AssertionError("unreachable: the frame loop returns or raises")


# -- the tests ----------------------------------------------------------------------------------------
BODY = b'{"model": "m", "input": "' + b"x" * 3000 + b'"}'
CHUNKS = [BODY[:1000], BODY[1000:2000], BODY[2000:]]


def ext_proc_config(upstream: Echo, server: Extproc, **processing_mode: str) -> str:
    """The rendered ext_proc front config, with `processing_mode` fields changed (e.g. trailers SEND)."""
    config = FrontConfig(upstream_ports=(upstream.port,), extproc_port=server.grpc_port, listen_port=0)
    doc = yaml.safe_load(config.render())
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (ext_proc,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc"]
    ext_proc["typed_config"]["processing_mode"].update(processing_mode)
    return yaml.safe_dump(doc)


@pytest.fixture(scope="module")
def h2_ingress(workdir: Path, upstream: Echo, meshkit_server: Extproc) -> Iterator[Envoy]:
    """The front Envoy exactly as meshkit renders it (BUFFERED body, trailers SKIP)."""
    with envoy(ext_proc_config(upstream, meshkit_server), workdir, name="h2-ingress") as proxy:
        yield proxy


def post_and_check(proxy: Envoy, chunks: Sequence[bytes], trailers: Sequence[tuple[str, str]]) -> None:
    host, port = proxy.listeners["ingress"]
    before = proxy.failed_open()
    resp = h2c_post(host, port, "/v1/embeddings", chunks, trailers)
    assert resp.status == 200
    body = b"".join(chunks)
    got = resp.json()
    assert got["body_bytes"] == len(body)
    assert got["body_sha256"] == hashlib.sha256(body).hexdigest()  # the body reached the upstream whole
    assert got["headers"].get("x-body-hash") == xxhash.xxh3_128_hexdigest(body)
    assert proxy.failed_open() == before, "Envoy let the request through because meshkit failed"


@pytest.mark.parametrize("chunks", [[BODY], CHUNKS], ids=["one-data-frame", "three-data-frames"])
def test_h2_request_with_trailers_gets_the_hash(h2_ingress: Envoy, chunks: list[bytes]) -> None:
    post_and_check(h2_ingress, chunks, trailers=[("x-checksum", "done")])


def test_h2_request_without_trailers_gets_the_hash(h2_ingress: Envoy) -> None:
    post_and_check(h2_ingress, CHUNKS, trailers=())


def test_h2_request_with_trailers_sent_to_meshkit_gets_the_hash(
    workdir: Path, upstream: Echo, meshkit_server: Extproc
) -> None:
    """`request_trailer_mode: SEND`: the body message, then a trailers message that gets its answer."""
    config = ext_proc_config(upstream, meshkit_server, request_trailer_mode="SEND")
    with envoy(config, workdir, name="h2-trailers-send") as proxy:
        post_and_check(proxy, CHUNKS, trailers=[("x-checksum", "done")])
