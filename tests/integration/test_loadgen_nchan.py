"""`meshkit loadgen` against a real nginx + nchan: every token once, the JSON complete, processes merged."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshkit.edge.loadgen import LoadgenOptions, run_loadgen
from meshkit.harness.nchan import NchanServer, nchan_server
from meshkit.harness.process import free_port


@pytest.fixture(scope="module")
def nchan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NchanServer]:
    with nchan_server(tmp_path_factory.mktemp("nchan")) as server:
        yield server


def loadgen(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshkit", "loadgen", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_every_token_once_with_latency_table_and_complete_json(nchan: NchanServer, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    pids = [a for pid in nchan.pids() for a in ("--target-pid", str(pid))]
    result = loadgen(
        *("--target", "nchan", "--url", nchan.url, "--conversations", "20", "--viewers", "3"),
        *("--rate", "200", "--duration", "3", "--json", str(out), *pids),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "delivered/s" in result.stderr  # the progress line, once a second
    assert "delivered/expected" in result.stdout and "verdict" in result.stdout

    report = json.loads(out.read_text())
    tokens = report["publish"]["tokens"]
    assert 590 <= tokens <= 610  # 200/s for 3 s
    m = report["messages"]
    assert m["expected"] == 3 * (tokens + 20)  # each viewer: its conversation's tokens and its done
    assert m["delivered"] == m["expected"]
    assert (m["missing"], m["duplicates"], m["out_of_order"], m["unexpected"]) == (0, 0, 0, 0)
    assert m["exactly_once_in_order"] is True and m["incomplete_viewers"] == 0
    assert report["streams"]["opened"] == 60 and report["streams"]["outcomes"]["done"] == 60
    lat = report["latency_ms"]
    assert lat["count"] == m["delivered"]  # every message carried its ts
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] < 1000
    assert all(v == 0 for v in report["errors"].values())
    gen = report["generator"]
    assert [p["role"] for p in gen["processes"]] == ["publisher", "viewers-0"]
    assert all(p["loop_lag_ms"]["p99"] is not None for p in gen["processes"])
    assert isinstance(gen["saturated"], bool) and gen["verdict"]
    target = report["target"]
    assert target["pids"] == nchan.pids()
    assert target["cpu_percent"] is not None and target["cpu_percent"] >= 0
    assert target["rss_bytes_max"] > 1_000_000 and target["kb_per_stream"] > 0
    assert len(report["timeline"]) >= 2 and report["timeline"][-1]["delivered"] > 0


async def test_two_processes_merge_to_the_right_totals(nchan: NchanServer) -> None:
    report = await run_loadgen(
        LoadgenOptions(
            target="nchan",
            url=nchan.url,
            conversations=10,
            viewers=4,
            rate=150,
            duration=2,
            processes=2,
            progress=False,
        )
    )
    tokens = report["publish"]["tokens"]
    m = report["messages"]
    assert m["expected"] == 4 * (tokens + 10) and m["delivered"] == m["expected"]
    assert m["exactly_once_in_order"] is True
    roles = {p["role"]: p for p in report["generator"]["processes"]}
    assert set(roles) == {"publisher", "viewers-0", "viewers-1"}
    assert roles["viewers-0"]["streams"] == roles["viewers-1"]["streams"] == 20
    assert roles["viewers-0"]["pid"] != roles["viewers-1"]["pid"]
    assert report["latency_ms"]["count"] == m["delivered"]  # the merged histogram holds every delivery


async def test_websocket_viewers(nchan: NchanServer) -> None:
    report = await run_loadgen(
        LoadgenOptions(
            target="nchan",
            url=nchan.url,
            conversations=5,
            viewers=2,
            rate=100,
            duration=1,
            ws=True,
            progress=False,
        )
    )
    assert report["config"]["ws"] is True
    assert report["messages"]["exactly_once_in_order"] is True
    assert report["streams"]["outcomes"]["done"] == 10


def test_a_target_that_is_not_there_is_counted_not_a_crash(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "r.json"
    result = loadgen(
        *("--target", "nchan", "--url", url, "--conversations", "3", "--viewers", "2", "--rate", "20"),
        *("--duration", "0.5", "--json", str(out), "--drain-timeout", "0.5"),
    )
    assert result.returncode == 3, result.stdout + result.stderr  # ran, not every token once
    assert "Traceback" not in result.stderr + result.stdout
    report = json.loads(out.read_text())
    assert report["errors"]["connect_refused"] == 6
    assert report["errors"]["publish_errors"] == report["publish"]["published"]
    assert (
        report["messages"]["delivered"] == 0
        and report["messages"]["missing"] == report["messages"]["expected"]
    )
    assert "connect" in " ".join(report["error_samples"]).lower()


class KillOnFirstDelivery(io.StringIO):
    """The progress stream: SIGKILLs nginx as soon as a progress line shows tokens being delivered."""

    def __init__(self, server: NchanServer) -> None:
        super().__init__()
        self.server = server
        self.killed = False

    def write(self, text: str) -> int:
        if not self.killed and re.search(r"delivered/s [1-9]", text):
            self.server.process.kill()
            self.killed = True
        return super().write(text)


async def test_nginx_killed_mid_run_is_disconnects_and_missing_tokens(tmp_path: Path) -> None:
    with nchan_server(tmp_path) as server:
        progress = KillOnFirstDelivery(server)
        report = await run_loadgen(
            LoadgenOptions(
                target="nchan",
                url=server.url,
                conversations=5,
                viewers=2,
                rate=50,
                duration=3,
                drain_timeout=1,
            ),
            out=progress,
        )
    assert progress.killed
    m = report["messages"]
    assert 0 < m["delivered"] < m["expected"] and m["missing"] == m["expected"] - m["delivered"]
    assert report["errors"]["disconnects"] == 10 and m["incomplete_viewers"] == 10
    assert report["publish"]["errors"] > 0 and report["publish"]["first_error"]
    assert m["exactly_once_in_order"] is False
