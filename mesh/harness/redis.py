"""A real redis-server (Debian `redis-server` 7.0) without persistence, for tests and the local stack.

Redis cannot bind port 0 and report the port back, so `redis_server()` picks one with `free_port()` and,
when another process grabs it first (`Address already in use`), tries a new one, up to 3 attempts.
Readiness is the server's own word twice: its "Ready to accept connections" log line and a `+PONG`.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from meshkit.errors import HarnessError
from meshkit.harness.process import ManagedProcess, Probe, free_port, log_matches, start_on_free_ports

HOST = "127.0.0.1"
BIND_ATTEMPTS = 3
_IN_USE = "Address already in use"


@dataclass
class RedisServer:
    """A running redis-server on 127.0.0.1 (`--save '' --appendonly no`); `url` is for redis-py.

    A test may `kill()` it and `restart()` it on the same port (a Redis outage and its end); the
    context manager that made it stops whichever process is current."""

    host: str
    port: int
    process: ManagedProcess
    restarts: int = 0

    def kill(self) -> None:
        """SIGKILL, as a crash: clients see their connections reset."""
        self.process.kill()

    def restart(self) -> None:
        """A new redis-server with the same command line (so the same port), ready when this returns."""
        self.process.stop()  # idempotent: a killed one is reaped
        self.restarts += 1
        proc = ManagedProcess(
            f"{self.process.name}-restarted-{self.restarts}",
            self.process.argv,
            log_dir=self.process.log_path.parent,
            ready=_ready(self.port),
            cwd=self.process.log_path.parent,
            start_timeout=10.0,
            stop_timeout=10.0,
        )
        proc.start()
        self.process = proc

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def ping(self) -> bool:
        return redis_ping(self.host, self.port)


def redis_server_binary() -> str:
    """Path of `redis-server`, or HarnessError naming the package to install."""
    path = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/usr/local/sbin")
    if path is None:
        raise HarnessError("redis-server not found: install the Debian package `redis-server`")
    return path


def redis_ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a RESP `PING` on a fresh connection gets `+PONG`."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(64)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return False
    return reply == b"+PONG\r\n"


@contextmanager
def redis_server(workdir: Path, *, name: str = "redis", start_timeout: float = 10.0) -> Iterator[RedisServer]:
    """Run redis-server on a free loopback port with no persistence; stop it on exit, also on exceptions."""
    binary = redis_server_binary()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    def make() -> tuple[ManagedProcess, int]:
        port = free_port(HOST)
        proc = ManagedProcess(
            name,
            [
                binary,
                "--bind",
                HOST,
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(workdir),
                "--logfile",
                "",
            ],
            log_dir=workdir,
            ready=_ready(port),
            cwd=workdir,
            start_timeout=start_timeout,
            stop_timeout=10.0,
        )
        return proc, port

    proc, port = start_on_free_ports(make, lambda log: _IN_USE in log, BIND_ATTEMPTS)
    server = RedisServer(host=HOST, port=port, process=proc)
    try:
        yield server
    finally:
        server.process.stop()


def _ready(port: int) -> Probe:
    logged = log_matches(r"Ready to accept connections")
    return lambda proc: logged(proc) and redis_ping(HOST, port)
