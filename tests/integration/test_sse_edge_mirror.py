"""`meshkit sse --mirror-of CHAT@origin` on a leaf with JetStream of its own (domain edge), while the
leaf is cut from the origin by a real network cut (network namespace, veth link down).

Without the mirror, a viewer who (re)connects during a cut gets nothing until the link returns: the
stream lives at the origin. With it, the edge replays what it stored before the cut — to a viewer
resuming with Last-Event-ID, to a viewer of a conversation that ended before the cut, and through an
adapter restarted during the cut — stays ready, and after the link returns every viewer has every token
once, in order. Needs root and iproute2 (skipped otherwise).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import nats
import pytest
from nats.js.api import StreamConfig

from meshkit.daemon import parse_ready
from meshkit.edge.token_stream import ensure_stream
from meshkit.harness.nats import NatsServer, nats_server
from meshkit.harness.netns import Namespace
from meshkit.harness.process import ManagedProcess

from .test_sse_partition import _status
from .test_sse_support import SseReader, open_stream, publish, session, until

pytestmark = pytest.mark.integration
__all__ = ["session"]  # the fixture, used from test_sse_support

CUT_SECONDS = 6.0  # the leaf drops a dead link after 3-4 s (ping 1 s x 3)


@contextmanager
def adapter(edge: Namespace, leaf: NatsServer, tmp_path: Path, name: str) -> Iterator[tuple[str, str]]:
    """`meshkit sse` in the namespace, reading the edge mirror; (stream base URL, /readyz URL)."""
    argv = [
        *edge.exec_prefix(), sys.executable, "-m", "meshkit", "sse",
        "--listen", "0.0.0.0:0", "--admin-listen", "0.0.0.0:0",
        "--nats", leaf.url, "--js-domain", "edge", "--stream", "CHAT_EDGE", "--mirror-of", "CHAT@origin",
        "--heartbeat", "0.5", "--consumer-heartbeat", "0.5", "--ready-interval", "0.5",
    ]  # fmt: skip
    proc = ManagedProcess(name, argv, log_dir=tmp_path, ready=lambda p: parse_ready(p.log_text()) is not None)
    with proc:
        ready = parse_ready(proc.log_text())
        assert ready is not None
        ports = {k: v.rpartition(":")[2] for k, v in ready[1].items()}
        at = edge.links[1].ns_ip
        yield f"http://{at}:{ports['http']}", f"http://{at}:{ports['admin']}/readyz"


def _gauge(readyz: str, name: str) -> float:
    with urllib.request.urlopen(readyz.replace("/readyz", "/metrics"), timeout=3) as resp:
        text = resp.read().decode()
    (line,) = [x for x in text.splitlines() if x.startswith(name + " ")]
    return float(line.split()[1])


async def test_the_edge_replays_from_its_mirror_while_cut_from_the_origin(
    netns_edge: Namespace, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    edge = netns_edge
    live, ended = f"live-{uuid.uuid4().hex[:8]}", f"ended-{uuid.uuid4().hex[:8]}"
    total = 600
    uplink = edge.links[0]
    with (
        nats_server(tmp_path / "o", name="m-origin", host=uplink.host_ip) as origin,
        nats_server(
            tmp_path / "e",
            name="m-leaf",
            domain="edge",
            leaf_remote=origin.leaf_url,
            host=edge.links[1].ns_ip,
            netns=edge.name,
        ) as leaf,
    ):
        nc = await nats.connect(origin.url)
        try:
            js = nc.jetstream()
            await ensure_stream(js)
            await publish(js, ended, range(1, 101), done_at=100)  # ends before the cut
            readers: list[SseReader] = []
            producer: asyncio.Future[None] | None = None
            link_down = False
            published = 0

            async def produce() -> None:
                nonlocal published
                for seq in range(1, total + 1):
                    await publish(js, live, [seq], done_at=total)
                    published = seq
                    await asyncio.sleep(0.01)  # ~80 tokens/s, on through the cut

            try:
                with adapter(edge, leaf, tmp_path, "m-sse-1") as (base, readyz):
                    await until(lambda: _status(readyz) == 200, what="adapter ready")
                    reader = await open_stream(session, f"{base}/stream/{live}")
                    readers.append(reader)
                    producer = asyncio.ensure_future(produce())
                    await reader.wait_for(lambda r: len(r.sequences) >= 50, what="first 50")
                    uplink.down()
                    link_down, cut_at = True, time.monotonic()
                    await asyncio.sleep(4.5)  # the leaf has dropped the link by now
                    at_cut = len(reader.sequences)
                    assert at_cut < published  # the cut is real: the origin has more
                    assert _status(readyz) == 200  # the edge's own stream still answers
                    await until(
                        lambda: _gauge(readyz, "meshkit_sse_mirror_last_contact_seconds") >= 2.0,
                        within=3,
                        what="the mirror's last contact growing",
                    )
                    # a conversation that ended before the cut, opened during it: all of it
                    old = await open_stream(session, f"{base}/stream/{ended}")
                    readers.append(old)
                    await old.until_end(within=5)
                    assert old.sequences == list(range(1, 101))
                    # a resume during the cut: what the mirror holds after 10, at once
                    resumed = await open_stream(
                        session, f"{base}/stream/{live}", headers={"Last-Event-ID": "10"}
                    )
                    readers.append(resumed)
                    await resumed.wait_for(
                        lambda r: len(r.sequences) >= at_cut - 10, within=5, what="resume in the cut"
                    )
                    assert resumed.sequences[: at_cut - 10] == list(range(11, at_cut + 1))
                # that adapter is gone (SIGTERM); a new one starts while the link is still down
                with adapter(edge, leaf, tmp_path, "m-sse-2") as (base, readyz):
                    await until(lambda: _status(readyz) == 200, within=10, what="restarted, ready")
                    again = await open_stream(
                        session, f"{base}/stream/{live}", headers={"Last-Event-ID": str(at_cut - 5)}
                    )
                    readers.append(again)
                    await again.wait_for(lambda r: len(r.sequences) >= 5, within=5, what="replayed")
                    assert again.sequences[:5] == list(range(at_cut - 4, at_cut + 1))
                    await asyncio.sleep(max(0.0, CUT_SECONDS - (time.monotonic() - cut_at)))
                    uplink.up()
                    link_down = False
                    await again.until_end(within=30)
                    await producer
            finally:
                if link_down:
                    uplink.up()
                if producer is not None:
                    producer.cancel()
                for r in readers:
                    await r.close()
            # the viewer who resumed on the new adapter has the rest, once, in order
            assert again.sequences == list(range(at_cut - 4, total + 1)), "every token once, in order"
            assert not again.of("reset")
            assert reader.sequences == list(range(1, len(reader.sequences) + 1))
            print(f"cut {CUT_SECONDS:.0f} s; {at_cut} tokens before it; resumed across a restart")
        finally:
            await nc.close()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--mirror-of", "CHAT"], "is not STREAM@DOMAIN"),
        (["--mirror-of", "CHAT@or.igin", "--js-domain", "edge"], "is not STREAM@DOMAIN"),
        (["--mirror-of", "CHAT@origin", "--js-domain", "origin"], "--js-domain must be the edge's own"),
    ],
)
def test_bad_mirror_options_are_exit_2(argv: list[str], needle: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "meshkit", "sse", *argv], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr and "Traceback" not in done.stderr


def test_a_stream_of_that_name_that_mirrors_nothing_is_not_served(tmp_path: Path) -> None:
    """The edge already has a plain CHAT_EDGE: the adapter says so and does not start (exit 1 after
    --start-timeout), instead of serving a stream that the origin never fills."""

    async def plain_stream(leaf: NatsServer) -> None:
        nc = await nats.connect(leaf.url)
        try:
            await nc.jetstream(domain="edge").add_stream(StreamConfig(name="CHAT_EDGE", subjects=["x.>"]))
        finally:
            await nc.close()

    with (
        nats_server(tmp_path, name="p-origin") as origin,
        nats_server(tmp_path, name="p-leaf", domain="edge", leaf_remote=origin.leaf_url) as leaf,
    ):
        asyncio.run(plain_stream(leaf))
        argv = [
            "--nats",
            leaf.url,
            "--js-domain",
            "edge",
            "--stream",
            "CHAT_EDGE",
            "--mirror-of",
            "CHAT@origin",
        ]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "meshkit",
                "sse",
                *argv,
                "--listen",
                "127.0.0.1:0",
                "--start-timeout",
                "3",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1, done.stderr
    assert "'CHAT_EDGE' exists and mirrors nothing, not CHAT@origin" in done.stderr
    assert "Traceback" not in done.stderr
