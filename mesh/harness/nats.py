"""A real nats-server (Debian `nats-server` 2.9) for tests and the local stack.

`nats_server()` writes a config file into `workdir` (built by `meshkit.render.nats_config`), starts the
server on 127.0.0.1 with random ports (`-1`: client, HTTP monitoring and leafnode listeners), reads the
bound ports back from its log and yields a `NatsServer`. Two shapes matter:

- an origin: JetStream with a `domain` (without one, JetStream cannot be reached from a leaf at all)
  and a leafnode listener (every server gets one);
- a leaf: `leaf_remote=origin.leaf_url`; usually `jetstream=False`. Its clients reach the origin's
  JetStream with `nc.jetstream(domain=origin.domain)`.

A leaf is ready only once its own `/leafz` lists the link. The origin registers the leaf at the same
moment, but a leaf started before its origin listens retries only after 1 s; `wait_for_leafnodes()`
waits on either side. Every server gets `ping_interval`/`ping_max` (default 1 s x 3): with NATS's
2-minute default a cut link goes unnoticed and TCP later delivers a stale backlog.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshkit.errors import HarnessError
from meshkit.harness.netns import exec_prefix
from meshkit.harness.process import ManagedProcess, log_match
from meshkit.render.nats_config import nats_server_config

HOST = "127.0.0.1"
_CLIENT_RE = r"Listening for client connections on [^\s]+:(\d+)"
_HTTP_RE = r"Starting http monitor on [^\s]+:(\d+)"
_LEAF_RE = r"Listening for leafnode connections on [^\s]+:(\d+)"
_READY_RE = re.compile(r"Server is ready")


@dataclass(frozen=True)
class NatsServer:
    """A running nats-server: ports read from its log; `url` for clients, `leaf_url` for leaf remotes."""

    name: str
    host: str
    port: int
    http_port: int
    leaf_port: int
    jetstream: bool
    domain: str | None
    leaf_remote: str | None
    config_path: Path
    store_dir: Path | None
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def leaf_url(self) -> str:
        """What another server puts in `leafnodes.remotes` to connect to this one."""
        return f"nats-leaf://{self.host}:{self.leaf_port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def monitor(self, endpoint: str) -> dict[str, Any]:
        """The JSON of a monitoring endpoint: `varz`, `leafz`, `jsz`, `connz`, ..."""
        return _get_json(f"{self.monitor_url}/{endpoint.lstrip('/')}")

    def leafnode_count(self) -> int:
        return int(self.monitor("leafz").get("leafnodes", 0))

    def wait_for_leafnodes(self, count: int = 1, timeout: float = 10.0) -> None:
        """Return once `/leafz` lists at least `count` leafnode connections, else raise HarnessError."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.leafnode_count() >= count:
                    return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if self.process.returncode is not None:
                raise HarnessError(f"{self.name} exited while waiting for leafnodes\n{self.process.tail()}")
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"{self.name}: fewer than {count} leafnode(s) after {timeout:.0f} s\n"
                    + self.process.tail()
                )
            time.sleep(0.02)


def nats_server_binary() -> str:
    """Path of `nats-server`, or HarnessError naming the package to install."""
    path = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/local/sbin")
    if path is None:
        raise HarnessError("nats-server not found: install the Debian package `nats-server`")
    return path


@contextmanager
def nats_server(
    workdir: Path,
    *,
    jetstream: bool = True,
    domain: str | None = "origin",
    leaf_remote: str | None = None,
    name: str = "nats",
    ping_interval: str = "1s",
    ping_max: int = 3,
    start_timeout: float = 15.0,
    host: str = HOST,
    netns: str | None = None,
) -> Iterator[NatsServer]:
    """Run nats-server with a generated config in `workdir`; stop it on exit, also on exceptions.

    `domain` applies only with `jetstream`. `name` is the `server_name` (keep it stable across restarts
    of a JetStream server), the log file name and the prefix of its files in `workdir`. `host` is the
    address every listener binds (and the URLs name); `netns` runs the server inside that network
    namespace (`meshkit.harness.netns`), where `host` must be one of its addresses.
    """
    binary = nats_server_binary()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    store_dir = workdir / f"{name}-jetstream" if jetstream else None
    config_path = workdir / f"{name}.conf"
    config_path.write_text(
        nats_server_config(
            name=name,
            store_dir=store_dir,
            domain=domain if jetstream else None,
            leaf_remote=leaf_remote,
            ping_interval=ping_interval,
            ping_max=ping_max,
            host=host,
        )
    )

    def ready(proc: ManagedProcess) -> bool:
        text = proc.log_text()
        if _READY_RE.search(text) is None:
            return False
        if leaf_remote is None:
            return True
        match = re.search(_HTTP_RE, text)
        if match is None:
            return False
        try:
            leafz = _get_json(f"http://{host}:{match.group(1)}/leafz")
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return int(leafz.get("leafnodes", 0)) >= 1

    prefix = [] if netns is None else exec_prefix(netns)
    proc = ManagedProcess(
        name,
        [*prefix, binary, "-c", str(config_path)],
        log_dir=workdir,
        ready=ready,
        cwd=workdir,
        start_timeout=start_timeout,
        stop_timeout=10.0,
    )
    proc.start()
    try:
        server = NatsServer(
            name=name,
            host=host,
            port=int(log_match(proc, _CLIENT_RE).group(1)),
            http_port=int(log_match(proc, _HTTP_RE).group(1)),
            leaf_port=int(log_match(proc, _LEAF_RE).group(1)),
            jetstream=jetstream,
            domain=domain if jetstream else None,
            leaf_remote=leaf_remote,
            config_path=config_path,
            store_dir=store_dir,
            process=proc,
        )
        yield server
    finally:
        proc.stop()


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=2.0) as resp:  # noqa: S310 - loopback URL we built
        data = json.loads(resp.read())
    if not isinstance(data, dict):
        raise ValueError(f"{url}: expected a JSON object")
    return data
