"""meshkit's own daemons as real child processes (`python -m meshkit ...`), ports read from their logs.

Tests use them the way a user runs them: a real process that can be SIGTERMed or SIGKILLed mid-run.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from meshkit.harness.process import ManagedProcess, log_match, log_matches

_ADDR = r"(\d+\.\d+\.\d+\.\d+):(\d+)"
# The ready line, in text (`ready grpc=... admin=...`) or JSON (`"msg": "ready", "grpc": ...`) logs.
_READY = r'(?:\bready |"msg": "ready")'


@dataclass(frozen=True)
class Extproc:
    """A running `meshkit extproc`: the gRPC and admin ports it bound."""

    process: ManagedProcess
    grpc_port: int
    admin_port: int
    http_port: int

    def port_for(self, api: str) -> int:
        """The port Envoy's filter calls for `api` (ext_authz_http: the HTTP port; else gRPC)."""
        return self.http_port if api == "ext_authz_http" else self.grpc_port

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


@dataclass(frozen=True)
class Echo:
    process: ManagedProcess
    port: int


def meshkit_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshkit", *args]


@contextmanager
def extproc(workdir: Path, args: Sequence[str] = (), *, name: str = "meshkit-extproc") -> Iterator[Extproc]:
    """`meshkit extproc` on free loopback ports (gRPC, ext_authz HTTP, admin) with extra `args`."""
    ports = ("--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0")
    argv = meshkit_argv("extproc", *ports, *args)
    proc = ManagedProcess(name, argv, log_dir=workdir, ready=log_matches(_READY))
    with proc:
        grpc = log_match(proc, rf'{_READY}.*?\bgrpc"?[=:] ?"?{_ADDR}')
        admin = log_match(proc, rf'{_READY}.*?\badmin"?[=:] ?"?{_ADDR}')
        http = log_match(proc, rf'{_READY}.*?\bhttp"?[=:] ?"?{_ADDR}')
        yield Extproc(proc, int(grpc.group(2)), int(admin.group(2)), int(http.group(2)))


@contextmanager
def echo(workdir: Path, *, name: str = "echo") -> Iterator[Echo]:
    """`meshkit echo --listen 127.0.0.1:0`: an upstream that answers with what it received."""
    proc = ManagedProcess(
        name,
        meshkit_argv("echo", "--listen", "127.0.0.1:0", "--name", name),
        log_dir=workdir,
        ready=log_matches(r"^ready: http="),
    )
    with proc:
        yield Echo(proc, int(log_match(proc, rf"^ready: http={_ADDR}").group(2)))
