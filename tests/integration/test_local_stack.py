"""`meshkit up` as a user runs it: the walkthrough works, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from meshkit.harness.process import ManagedProcess, log_match, log_matches

from .conftest import request

pytestmark = pytest.mark.integration


def children_of(pid: int) -> set[int]:
    """Every live process whose parent is `pid` (the stack's servers run in sessions of their own)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.add(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_up_check_passes(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshkit", "up", "--check", "--port", "0", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check: OK" in result.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_stops_every_process(tmp_path: Path, sig: signal.Signals) -> None:
    up = ManagedProcess(
        "up",
        [sys.executable, "-m", "meshkit", "up", "--port", "0", "--workdir", str(tmp_path)],
        log_dir=tmp_path / "logs",
        ready=log_matches("Ctrl-C stops everything"),
        start_timeout=60,
    )
    with up:
        url = log_match(up, r"curl -si (http://127\.0\.0\.1:\d+)/v1/completions").group(1)
        key = log_match(up, r"export FULL=(mk_\w+)").group(1)
        assert request(f"{url}/v1/completions", body=b'{"prompt": "x"}').status == 401  # the key is needed
        resp = request(f"{url}/v1/completions", body=b'{"prompt": "x"}', headers={"x-api-key": key})
        assert resp.status == 200
        assert re.fullmatch(r"[0-9a-f]{32}", resp.upstream_headers["x-body-hash"])
        assert resp.upstream_headers["x-auth-subject"] == "demo-service"
        embedded = request(
            f"{url}/v1/embeddings",
            body=b'{"model": "text-embedding-3-small", "input": "x"}',
            headers={"x-api-key": key},
        )
        assert embedded.status == 200 and embedded.headers["x-cache"] == "MISS"
        assert embedded.json()["object"] == "list"
        children = children_of(up.pid)
        # Redis, echo pod-a, pod-b and pod-gpt-4o, dev-upstream, embedding-cache, Varnish x2, the purge
        # broadcaster, meshkit extproc, Envoy
        assert len(children) == 11
        up.signal(sig)  # like Ctrl-C in a terminal: to the leader only
        assert up.wait(30) == 0
        assert "every process of the stack has exited" in up.log_text()
    assert not [pid for pid in children if alive(pid)]
