"""`meshkit echo` is a daemon like every other: admin port, JSON logs, the ready line, SIGTERM drain."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from meshkit.harness.daemons import daemon, echo

from .conftest import request

pytestmark = pytest.mark.integration


def test_echo_has_an_admin_port_with_health_readiness_and_metrics(tmp_path: Path) -> None:
    with echo(tmp_path, ["--log-format", "json"], name="admin-echo") as upstream:
        assert request(f"http://127.0.0.1:{upstream.port}/v1/x", body=b"hello").json()["body_bytes"] == 5
        assert request(f"{upstream.admin_url}/healthz", method="GET").status == 200
        ready = request(f"{upstream.admin_url}/readyz", method="GET")
        assert (ready.status, ready.json()["status"]) == (200, "ready")
        metrics = request(f"{upstream.admin_url}/metrics", method="GET").body.decode()
        assert 'meshkit_echo_requests_total{method="POST"} 1.0' in metrics
        assert "process_resident_memory_bytes" in metrics
        log_lines = upstream.process.log_text().splitlines()
    docs = [json.loads(line) for line in log_lines if line.strip()]  # every line is JSON
    (ready_line,) = [d for d in docs if d["msg"] == "ready"]
    assert ready_line["daemon"] == "echo"
    assert set(ready_line["addresses"]) == {"http", "admin"}


def test_sigterm_drains_then_exits_zero_and_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    with daemon("echo", tmp_path, ["--drain-delay", "30"], name="drained-echo") as running:
        running.process.signal(signal.SIGTERM)
        status, deadline = None, time.monotonic() + 5
        while status != 503 and time.monotonic() < deadline:
            status = request(f"{running.admin_url}/readyz", method="GET").status
        assert status == 503  # readiness off first, the admin port still answers during the delay
        running.process.signal(signal.SIGTERM)  # a second signal: no waiting for the 30 s delay
        assert running.process.wait(10) == 0
        assert "second SIGTERM: exiting without waiting" in running.process.log_text()
