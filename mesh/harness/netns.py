"""A network namespace joined to this host by veth pairs: a second "host" for tests that cut a link.

    with network_namespace(links=2) as ns:
        origin = nats_server(..., host=ns.links[0].host_ip)               # here, on link 0's far end
        leaf = nats_server(..., host=ns.links[1].ns_ip, netns=ns.name,    # there, reachable on link 1
                           leaf_remote=f"nats-leaf://{ns.links[0].host_ip}:{origin.leaf_port}")
        ns.links[0].down()   # the leaf's link to the origin is cut; link 1 (tests -> leaf) stays up
        ns.links[0].up()

Each link is a veth pair with a /30 of link-local addresses (169.254.X.4i+1 here, .4i+2 in the
namespace); X is picked so no address in use on this host collides. Only this process's own namespace
and interfaces are touched, by name, and always removed on exit (deleting the namespace removes its
veth ends, and with them the pairs). Needs root and `ip` (Debian `iproute2`): HarnessError otherwise.

`exec_prefix(ns.name)` is the argv prefix that runs a command inside the namespace (`ip netns exec`,
which execs the command: the PID the harness tracks is the command's own).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from meshkit.errors import HarnessError

__all__ = ["Link", "Namespace", "exec_prefix", "ip_binary", "network_namespace"]


def ip_binary() -> str:
    path = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        raise HarnessError("ip not found: install the Debian package `iproute2`")
    return path


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([ip_binary(), *args], capture_output=True, text=True, timeout=10, check=False)
    if check and result.returncode != 0:
        raise HarnessError(f"ip {' '.join(args)}: status {result.returncode}: {result.stderr.strip()}")
    return result


def exec_prefix(namespace: str) -> list[str]:
    """The argv prefix that runs a command inside `namespace`."""
    return [ip_binary(), "netns", "exec", namespace]


@dataclass(frozen=True)
class Link:
    """One veth pair: `host_iface` here with `host_ip`, its peer in the namespace with `ns_ip`."""

    host_iface: str
    host_ip: str
    ns_ip: str

    def down(self) -> None:
        """Cut the link (both directions drop; sockets on it see nothing, as with a pulled cable)."""
        _ip("link", "set", "dev", self.host_iface, "down")

    def up(self) -> None:
        _ip("link", "set", "dev", self.host_iface, "up")


@dataclass(frozen=True)
class Namespace:
    name: str
    links: tuple[Link, ...]

    def exec_prefix(self) -> list[str]:
        return exec_prefix(self.name)


def _addresses_in_use() -> set[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out = _ip("-o", "-4", "addr", "show").stdout
    nets = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.add(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    return nets


def _pick_block(links: int) -> int:
    used = _addresses_in_use()
    for _ in range(200):
        block = 1 + secrets.randbelow(254)
        wanted = [ipaddress.ip_network(f"169.254.{block}.{4 * i}/30") for i in range(links)]
        if not any(w.overlaps(u) for w in wanted for u in used):
            return block
    raise HarnessError("no free 169.254.X.0/24 block for the veth links")


@contextmanager
def network_namespace(links: int = 1, *, prefix: str = "mk") -> Iterator[Namespace]:
    """A fresh namespace with `links` veth pairs to this host (see the module docstring)."""
    if os.geteuid() != 0:
        raise HarnessError("network namespaces need root (ip netns add)")
    if not 1 <= links <= 4:
        raise ValueError("links: 1 to 4")
    tag = f"{prefix}{secrets.token_hex(3)}"  # interface names: at most 15 characters
    name = f"{tag}-ns"
    block = _pick_block(links)
    _ip("netns", "add", name)
    made: list[Link] = []
    try:
        _ip("-n", name, "link", "set", "dev", "lo", "up")
        for i in range(links):
            host_iface, ns_iface = f"{tag}h{i}", f"{tag}n{i}"
            host_ip, ns_ip = f"169.254.{block}.{4 * i + 1}", f"169.254.{block}.{4 * i + 2}"
            _ip("link", "add", host_iface, "type", "veth", "peer", "name", ns_iface)
            link = Link(host_iface, host_ip, ns_ip)
            made.append(link)
            _ip("link", "set", "dev", ns_iface, "netns", name)
            _ip("addr", "add", f"{host_ip}/30", "dev", host_iface)
            _ip("link", "set", "dev", host_iface, "up")
            _ip("-n", name, "addr", "add", f"{ns_ip}/30", "dev", ns_iface)
            _ip("-n", name, "link", "set", "dev", ns_iface, "up")
        yield Namespace(name, tuple(made))
    finally:
        for link in made:  # gone with the namespace too; a pair not yet moved would stay
            _ip("link", "del", link.host_iface, check=False)
        _ip("netns", "del", name, check=False)
