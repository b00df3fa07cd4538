"""A NATS leaf on a second "host" (a network namespace): its link to the origin cut and restored.

The origin listens on this host's end of link 0; the leaf runs inside the namespace and reaches the
origin over link 0, while tests reach the leaf over link 1 (which stays up). With meshkit's ping
settings (1 s x 3) the leaf drops a dead link within seconds and reconnects soon after it returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from meshkit.harness.nats import NatsServer, nats_server
from meshkit.harness.netns import Namespace

pytestmark = pytest.mark.integration


def wait_for(predicate: Callable[[], bool], timeout: float) -> float:
    """Seconds until `predicate()` held, or AssertionError after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s")


def test_the_namespace_is_another_host_reached_only_over_its_links(
    netns_edge: Namespace, tmp_path: Path
) -> None:
    edge = netns_edge
    origin_ip = edge.links[0].host_ip
    with (
        nats_server(tmp_path / "o", name="netns-origin", host=origin_ip) as origin,
        nats_server(
            tmp_path / "l",
            name="netns-leaf",
            jetstream=False,
            leaf_remote=origin.leaf_url,
            host=edge.links[1].ns_ip,
            netns=edge.name,
        ) as leaf,
    ):
        origin.wait_for_leafnodes(1)
        assert leaf.leafnode_count() == 1
        remote = leaf.monitor("leafz")["leafs"][0]
        assert remote["ip"] == origin_ip  # the leaf dialled the origin over link 0

        edge.links[0].down()
        try:
            noticed = wait_for(lambda: _count(leaf) == 0, timeout=10)
            assert noticed < 8  # ping 1 s x 3: a dead link is dropped within seconds
        finally:
            edge.links[0].up()
        back = wait_for(lambda: _count(leaf) == 1, timeout=10)
        assert back < 8
        origin.wait_for_leafnodes(1)


def _count(server: NatsServer) -> int:
    try:
        return server.leafnode_count()
    except OSError:
        return -1
