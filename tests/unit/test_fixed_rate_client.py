"""bench/fixed_rate.py, the cache tier's load client, against a real HTTP/1.1 keep-alive server in a thread:
it must measure from when a request was due (a stall counts for every request it held back), spread
requests evenly instead of in bursts, and refuse answers it cannot read."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from meshkit.harness.process import free_port

CLIENT = Path(__file__).resolve().parents[2] / "bench" / "fixed_rate.py"


class Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.arrivals: list[float] = []
        self.delay_s = 0.0
        self.stall_at: int | None = None  # the request (0-based) that takes STALL_S
        self.chunked = False
        self.lock = threading.Lock()


STALL_S = 0.3


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK wait between
    server: Recorder

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        with self.server.lock:
            index = len(self.server.arrivals)
            self.server.arrivals.append(time.perf_counter())
        time.sleep(STALL_S if index == self.server.stall_at else self.server.delay_s)
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("X-Cache", "HIT")
        if self.server.chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Recorder]:
    srv = Recorder()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def load(
    srv: Recorder, tmp_path: Path, rate: int, seconds: float, connections: int
) -> subprocess.CompletedProcess[str]:
    body = tmp_path / "body.json"
    body.write_bytes(b'{"input": "x"}')
    argv = [sys.executable, str(CLIENT), "--url", f"http://127.0.0.1:{srv.server_port}/v1/embeddings"]
    argv += ["--rate", str(rate), "--duration", str(seconds), "--connections", str(connections)]
    argv += ["--body", str(body), "-H", "content-type: application/json"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def result(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr
    parsed: dict[str, Any] = json.loads(done.stdout)
    return parsed


def test_every_answer_is_counted_and_no_latency_is_below_the_servers_delay(
    server: Recorder, tmp_path: Path
) -> None:
    server.delay_s = 0.005
    got = result(load(server, tmp_path, rate=200, seconds=1, connections=4))
    assert got["requests"] == len(server.arrivals) == 200
    assert got["statuses"] == {"200": 200} and got["x_cache"] == {"HIT": 200}
    assert got["unfinished"] == 0 and got["errors"] == 0
    assert min(got["latency_ms"]) >= 5.0
    assert min(got["service_ms"]) >= 5.0
    assert got["cpu_s"] > 0


def test_a_stall_counts_for_every_request_it_held_back(server: Recorder, tmp_path: Path) -> None:
    """One connection, 200 req/s, the 50th answer takes 300 ms: the ~60 requests due meanwhile waited for
    it, and their latency says so (a closed-loop client would report one slow request)."""
    server.stall_at = 50
    got = result(load(server, tmp_path, rate=200, seconds=1, connections=1))
    assert got["requests"] == 200
    held_back = [ms for ms in got["latency_ms"] if ms >= 100]
    assert len(held_back) >= 30, sorted(got["latency_ms"])[-5:]
    assert max(got["latency_ms"]) >= STALL_S * 1000
    slow_service = [ms for ms in got["service_ms"] if ms >= 100]
    assert len(slow_service) == 1  # only the stalled request itself was slow once sent


def test_requests_are_spread_evenly_over_the_connections_not_sent_in_bursts(
    server: Recorder, tmp_path: Path
) -> None:
    """hey -c 4 sends 4 requests at the same instant every 4/rate s; here they arrive 1/rate apart."""
    got = result(load(server, tmp_path, rate=200, seconds=1, connections=4))
    assert got["requests"] == 200
    gaps = [b - a for a, b in zip(server.arrivals, server.arrivals[1:], strict=False)]
    assert 0.004 <= statistics.median(gaps) <= 0.006
    assert sum(1 for g in gaps if g < 0.001) < len(gaps) * 0.1


def test_an_answer_without_content_length_is_refused_with_a_message(server: Recorder, tmp_path: Path) -> None:
    server.chunked = True
    done = load(server, tmp_path, rate=50, seconds=0.2, connections=1)
    assert done.returncode == 1
    assert "without Content-Length" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_refused_connection_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    body = tmp_path / "body.json"
    body.write_bytes(b"{}")
    port = free_port()  # nothing listens there
    argv = [
        sys.executable,
        str(CLIENT),
        "--url",
        f"http://127.0.0.1:{port}/",
        "--rate",
        "10",
        "--duration",
        "1",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1
    assert "fixed_rate:" in done.stderr and "Traceback" not in done.stderr
