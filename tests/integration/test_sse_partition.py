"""`meshkit sse` while its leaf is cut from the origin (a real network cut, not a process kill).

The leaf nats-server and the adapter run in their own network namespace; two veth pairs join it to
the host: one carries the leaf's link to the origin (the one that is cut: `ip link set ... down`
for 10 s, as the issue says), the other the test's HTTP client to the adapter (never cut). Tokens
keep being published at the origin before, all through and after the cut; the viewer must get every
token exactly once, in order, the ones stored during the cut within `CATCH_UP_LIMIT` s of the link
returning (the ordered consumer re-creates itself from the next stream sequence; about 1 s here,
printed with -s), then the live ones, and /readyz must say "not ready" while the stream cannot be
reached. Needs root and iproute2 (skipped otherwise).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import nats
import pytest

from meshkit.daemon import parse_ready
from meshkit.edge.token_stream import ensure_stream
from meshkit.harness.nats import nats_server_binary
from meshkit.harness.process import ManagedProcess, log_match, log_matches
from meshkit.render.nats_config import nats_server_config

from .test_sse_support import open_stream, publish, until

pytestmark = pytest.mark.integration

CUT_SECONDS = 10.0  # the cut (the leaf notices a dead link after 3-4 s: ping 1 s x 3)
AFTER_SECONDS = 2.0  # tokens keep coming this long after the link returned and the viewer caught up
CATCH_UP_LIMIT = 5.0  # link up -> the viewer has every token stored during the cut (measured: see -s)
PACE = 0.02  # s between publishes: ~45 tokens/s, ~450 stored during the cut (under --client-queue)


@pytest.fixture(autouse=True)
def _require_root_and_ip() -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip netns)")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass(frozen=True)
class Edge:
    netns: str
    uplink: str  # the host end of the leaf's link to the origin (the one that is cut)
    origin_ip: str  # host side of the uplink
    client_ip: str  # the namespace's end of the client link


@contextmanager
def edge_namespace() -> Iterator[Edge]:
    """A network namespace with two veth pairs to the host (random link-local /30s); deleted after."""
    tag = uuid.uuid4().hex[:6]
    netns = f"h4sse-{tag}"
    a, b = random.sample(range(100, 250), 2)
    uplink, client = f"h4u{tag}", f"h4c{tag}"
    ip("netns", "add", netns)
    try:
        ip("netns", "exec", netns, "ip", "link", "set", "lo", "up")
        for host_end, ns_end, third in ((uplink, f"h4U{tag}", a), (client, f"h4C{tag}", b)):
            ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            ip("link", "set", ns_end, "netns", netns)
            ip("addr", "add", f"169.254.{third}.1/30", "dev", host_end)
            ip("link", "set", host_end, "up")
            ip("netns", "exec", netns, "ip", "addr", "add", f"169.254.{third}.2/30", "dev", ns_end)
            ip("netns", "exec", netns, "ip", "link", "set", ns_end, "up")
        yield Edge(netns, uplink, f"169.254.{a}.1", f"169.254.{b}.2")
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=10)
        for dev in (uplink, client):  # gone with the namespace; just in case
            subprocess.run(["ip", "link", "del", dev], capture_output=True, timeout=10)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


async def test_leaf_cut_from_the_origin_every_token_once_in_order_soon_after(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    c = f"c-{uuid.uuid4().hex[:8]}"
    with edge_namespace() as edge:
        origin_conf = tmp_path / "origin.conf"
        origin_conf.write_text(
            nats_server_config(
                name="cut-origin",
                store_dir=tmp_path / "js",
                domain="origin",
                leaf_remote=None,
                host=edge.origin_ip,
            )
        )
        origin = ManagedProcess(
            "cut-origin",
            [nats_server_binary(), "-c", origin_conf],
            log_dir=tmp_path,
            ready=log_matches("Server is ready"),
            cwd=tmp_path,
        )
        with origin:
            client_port = int(log_match(origin, r"Listening for client connections on [^\s]+:(\d+)").group(1))
            leaf_port = int(log_match(origin, r"Listening for leafnode connections on [^\s]+:(\d+)").group(1))
            leaf_conf = tmp_path / "leaf.conf"
            leaf_conf.write_text(
                nats_server_config(
                    name="cut-leaf",
                    store_dir=None,
                    domain=None,
                    leaf_remote=f"nats-leaf://{edge.origin_ip}:{leaf_port}",
                    host="127.0.0.1",
                )
            )
            leaf = ManagedProcess(
                "cut-leaf",
                ["ip", "netns", "exec", edge.netns, nats_server_binary(), "-c", leaf_conf],
                log_dir=tmp_path,
                ready=log_matches("Leafnode connection created"),
                cwd=tmp_path,
            )
            with leaf:
                leaf_client = int(
                    log_match(leaf, r"Listening for client connections on [^\s]+:(\d+)").group(1)
                )
                nc = await nats.connect(f"nats://{edge.origin_ip}:{client_port}")
                try:
                    js = nc.jetstream()
                    await ensure_stream(js)
                    argv = [
                        *("ip", "netns", "exec", edge.netns, sys.executable, "-m", "meshkit", "sse"),
                        *("--listen", "0.0.0.0:0", "--admin-listen", "0.0.0.0:0"),
                        *("--nats", f"nats://127.0.0.1:{leaf_client}", "--js-domain", "origin"),
                        *("--heartbeat", "0.5", "--consumer-heartbeat", "0.5", "--ready-interval", "0.5"),
                    ]
                    proc = ManagedProcess(
                        "cut-sse",
                        argv,
                        log_dir=tmp_path,
                        ready=lambda p: parse_ready(p.log_text()) is not None,
                    )
                    with proc:
                        ready = parse_ready(proc.log_text())
                        assert ready is not None
                        ports = {k: v.rpartition(":")[2] for k, v in ready[1].items()}
                        addresses = {k: f"{edge.client_ip}:{p}" for k, p in ports.items()}
                        admin = f"http://{addresses['admin']}/readyz"
                        url = f"http://{addresses['http']}/stream/{c}"
                        await until(lambda: _status(admin) == 200, what="adapter ready")
                        reader = await open_stream(session, url)
                        published = 0
                        stop = asyncio.Event()

                        async def produce() -> None:
                            """Tokens before, all through and after the cut, then the done one."""
                            nonlocal published
                            while not stop.is_set():
                                published += 1
                                await publish(js, c, [published])
                                await asyncio.sleep(PACE)
                            published += 1
                            await publish(js, c, [published], done_at=published)

                        producer = asyncio.ensure_future(produce())
                        try:
                            await reader.wait_for(lambda r: len(r.sequences) >= 50, what="first 50")
                            ip("link", "set", edge.uplink, "down")  # the leaf's link to the origin is cut
                            cut_at, published_at_cut = time.monotonic(), published
                            try:
                                await until(
                                    lambda: _status(admin) == 503, within=CUT_SECONDS, what="not ready"
                                )
                                got_during_cut = len(reader.sequences)
                                await asyncio.sleep(max(0.0, CUT_SECONDS - (time.monotonic() - cut_at)))
                                stored_during_cut = published
                            finally:
                                ip("link", "set", edge.uplink, "up")
                            back = time.monotonic()
                            await until(
                                lambda: len(reader.sequences) >= stored_during_cut, within=30, what="backlog"
                            )
                            caught_up = time.monotonic() - back
                            await asyncio.sleep(AFTER_SECONDS)  # live again: tokens still coming
                            live_after = published
                            await until(
                                lambda: len(reader.sequences) >= live_after, within=5, what="live after it"
                            )
                            stop.set()
                            await producer
                            await reader.until_end(within=30)
                            await until(lambda: _status(admin) == 200, within=10, what="ready again")
                        finally:
                            producer.cancel()
                            await reader.close()
                        assert reader.sequences == list(range(1, published + 1)), "every token once, in order"
                        assert not reader.of("reset")
                        assert got_during_cut < stored_during_cut  # the cut was real
                        during = stored_during_cut - published_at_cut
                        after = published - stored_during_cut
                        print(
                            f"cut {CUT_SECONDS:.0f} s, {during} stored meanwhile, all of them in "
                            f"+{caught_up:.2f} s after the link returned; {after} more after it"
                        )
                        assert caught_up <= CATCH_UP_LIMIT
                finally:
                    await nc.close()
