"""`meshkit loadgen --target sse --publish redis-stream`, the real command line as a child process, through
the whole chain: it XADDs tokens to a Redis Stream, a real `meshkit bridge` (Streams source) stores
them in the origin's JetStream, the real `meshkit sse` on the NATS leaf serves the generator's viewers.

Small load (20 conversations x 3 viewers, 200 tokens/s for 3 s, two viewer processes): exit status 0
(every viewer got every token once, in order: the command's own verdict), and the `--json` report is
complete and agrees with itself and with what the bridge says it stored.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshkit.harness.edge_daemons import SseAdapter, sse_adapter
from meshkit.harness.streaming import RunningBridge, bridge
from meshkit.harness.streaming_stack import StreamingServers, streaming_servers

pytestmark = pytest.mark.integration

CONVERSATIONS = 20
VIEWERS = 3
RATE = 200
DURATION = 3
RUN_TIMEOUT = 90  # the whole command, start to report (it takes ~6 s here)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("streaming-loadgen")


@pytest.fixture(scope="module")
def servers(workdir: Path) -> Iterator[StreamingServers]:
    with streaming_servers(workdir, prefix="lg") as running:
        yield running


@pytest.fixture(scope="module")
def streams_bridge(workdir: Path, servers: StreamingServers) -> Iterator[RunningBridge]:
    with bridge(
        workdir, servers.redis.url, servers.origin.url, ["--source", "stream", "--consumer", "lg"]
    ) as running:
        running.wait_ready()
        yield running


@pytest.fixture(scope="module")
def adapter(workdir: Path, servers: StreamingServers, streams_bridge: RunningBridge) -> Iterator[SseAdapter]:
    with sse_adapter(workdir, servers.leaf.url, name="lg-sse") as running:
        yield running


def test_loadgen_through_redis_streams_the_bridge_and_the_adapter_on_a_leaf_every_token_once(
    tmp_path: Path, servers: StreamingServers, streams_bridge: RunningBridge, adapter: SseAdapter
) -> None:
    report_path = tmp_path / "report.json"
    stored_before = streams_bridge.metric("meshkit_bridge_published_total")
    argv = [
        sys.executable,
        "-m",
        "meshkit",
        "loadgen",
        "--target",
        "sse",
        "--url",
        adapter.url,
        "--publish",
        "redis-stream",
        "--redis",
        servers.redis.url,
        "--conversations",
        str(CONVERSATIONS),
        "--viewers",
        str(VIEWERS),
        "--rate",
        str(RATE),
        "--duration",
        str(DURATION),
        "--processes",
        "2",
        "--target-pid",
        str(adapter.process.pid),
        "--json",
        str(report_path),
        "--no-progress",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    report = json.loads(report_path.read_text())

    # every section is there
    for section in (
        "config",
        "streams",
        "publish",
        "messages",
        "latency_ms",
        "errors",
        "error_samples",
        "generator",
        "target",
        "timeline",
    ):
        assert section in report, section
    config = report["config"]
    assert (config["target"], config["publish"], config["processes"]) == ("sse", "redis-stream", 2)
    assert (config["conversations"], config["viewers_per_conversation"]) == (CONVERSATIONS, VIEWERS)

    # every stream opened and ended with its done; every token once, in order
    streams = report["streams"]
    assert streams["planned"] == streams["opened"] == CONVERSATIONS * VIEWERS
    outcomes = {k: v for k, v in streams["outcomes"].items() if v}
    assert outcomes == {"done": CONVERSATIONS * VIEWERS}, streams["outcomes"]
    publish = report["publish"]
    assert publish["errors"] == 0 and publish["done_messages"] == CONVERSATIONS
    assert publish["tokens"] >= 0.8 * RATE * DURATION, publish
    m = report["messages"]
    assert m["exactly_once_in_order"] is True, (m, report["error_samples"])
    assert m["expected"] == VIEWERS * publish["published"]
    assert m["delivered"] == m["expected"]
    assert m["missing"] == m["duplicates"] == m["out_of_order"] == m["unexpected"] == 0
    assert report["error_samples"] == []

    # the measurements are filled in: latency of every delivery, the generator's verdict, the target
    latency = report["latency_ms"]
    assert latency["count"] == m["delivered"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"]
    generator = report["generator"]
    assert len(generator["processes"]) >= 2 and generator["verdict"]
    assert generator["saturated"] is False, generator["verdict"]
    target = report["target"]
    assert target["pids"] == [adapter.process.pid]
    assert target["cpu_percent"] is not None and target["rss_bytes_max"] > 0
    assert report["timeline"], "a per-second timeline"

    # the table on stdout (its numbers measured here go into the report); the bridge stored each
    # published message once
    expected = f"{m['expected']:,}"
    assert re.search(rf"delivered/expected +{expected} / {expected} \(100\.0000%\)", done.stdout), done.stdout
    assert streams_bridge.metric("meshkit_bridge_published_total") - stored_before == publish["published"]
    assert streams_bridge.metric("meshkit_bridge_duplicates_total") == 0
