"""A real varnishd (Debian `varnish` 7.1) for tests and the local stack.

`varnish_server()` runs `varnishd -F -n <workdir>/<name> -a 127.0.0.1:P -T 127.0.0.1:P2 -f <vcl>
-s malloc,64m` as root; varnishd drops privileges by itself and reads the `-f` file AFTER that, so the
VCL is written to a world-readable temporary directory (a pytest `tmp_path` sits under a 0700 directory),
removed on exit.
`backends={"name": (host, port)}` are declared right after the VCL's `vcl 4.x;` line (by
`meshkit.render.varnish_vcl`), so a VCL can name backends whose ports are only known at run time. Backend
hosts are resolved when the VCL compiles: use addresses, not names this machine cannot resolve.

The `-a` socket is opened by the manager before the cache child runs, so readiness is both: the port
accepts AND varnishd logged that its child started. Ports come from `free_port()`; when one is taken
before varnishd binds it, a new pair is tried, up to 3 attempts.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from meshkit.errors import HarnessError
from meshkit.harness.process import (
    ManagedProcess,
    Probe,
    free_port,
    log_matches,
    start_on_free_ports,
    tcp_accepts,
)
from meshkit.render.varnish_vcl import vcl_with_backends

HOST = "127.0.0.1"
BIND_ATTEMPTS = 3
_BIND_FAILED = re.compile(r"Could not get socket .*Address already in use|-T .* could not be listened on")
_CHILD_STARTED = r"Child \(\d+\) said Child starts"


@dataclass(frozen=True)
class VarnishServer:
    """A running varnishd: HTTP at `url`, its CLI on `admin_port`, `-n` instance directory `instance_dir`."""

    host: str
    port: int
    admin_port: int
    instance_dir: Path
    vcl_path: Path
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def adm(self, *args: str, timeout: float = 10.0) -> str:
        """Run `varnishadm -n <instance_dir> ARGS...` (`ban ...`, `vcl.list`); its stdout, or HarnessError."""
        binary = shutil.which("varnishadm") or shutil.which("varnishadm", path="/usr/sbin:/usr/local/sbin")
        if binary is None:
            raise HarnessError("varnishadm not found: install the Debian package `varnish`")
        result = subprocess.run(
            [binary, "-n", str(self.instance_dir), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise HarnessError(
                f"varnishadm {' '.join(args)}: status {result.returncode}: {result.stdout}{result.stderr}"
            )
        return result.stdout


def varnishd_binary() -> str:
    """Path of `varnishd`, or HarnessError naming the package to install."""
    path = shutil.which("varnishd") or shutil.which("varnishd", path="/usr/sbin:/usr/local/sbin")
    if path is None:
        raise HarnessError("varnishd not found: install the Debian package `varnish`")
    return path


@contextmanager
def varnish_server(
    workdir: Path,
    vcl_text: str,
    *,
    backends: Mapping[str, tuple[str, int]] | None = None,
    params: Mapping[str, str] | None = None,
    storage: str = "malloc,64m",
    name: str = "varnish",
    start_timeout: float = 20.0,
) -> Iterator[VarnishServer]:
    """Run varnishd with `vcl_text` (plus `backends`, `-p` `params`); stop it on exit, also on exceptions."""
    binary = varnishd_binary()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    instance_dir = workdir / name
    try:
        vcl = vcl_with_backends(vcl_text, backends)
    except ValueError as exc:
        raise HarnessError(f"VCL for {name}: {exc}") from None
    # Readable by the unprivileged varnish users, wherever `workdir` lives.
    vcl_dir = Path(tempfile.mkdtemp(prefix="meshkit-vcl-"))
    try:
        vcl_dir.chmod(0o755)
        vcl_path = vcl_dir / f"{name}.vcl"
        vcl_path.write_text(vcl)
        vcl_path.chmod(0o644)
        (workdir / f"{name}.vcl").write_text(vcl)  # a copy to read next to the log
        extra: list[str] = []
        for key, value in (params or {}).items():
            extra += ["-p", f"{key}={value}"]

        def make() -> tuple[ManagedProcess, tuple[int, int]]:
            port, admin_port = free_port(HOST), free_port(HOST)
            proc = ManagedProcess(
                name,
                [
                    binary,
                    "-F",
                    "-n",
                    str(instance_dir),
                    "-a",
                    f"{HOST}:{port}",
                    "-T",
                    f"{HOST}:{admin_port}",
                    "-f",
                    str(vcl_path),
                    "-s",
                    storage,
                    *extra,
                ],
                log_dir=workdir,
                ready=_ready(port),
                cwd=workdir,
                start_timeout=start_timeout,
                stop_timeout=10.0,
            )
            return proc, (port, admin_port)

        proc, (port, admin_port) = start_on_free_ports(
            make, lambda log: bool(_BIND_FAILED.search(log)), BIND_ATTEMPTS
        )
        try:
            yield VarnishServer(
                host=HOST,
                port=port,
                admin_port=admin_port,
                instance_dir=instance_dir,
                vcl_path=vcl_path,
                process=proc,
            )
        finally:
            proc.stop()
    finally:
        shutil.rmtree(vcl_dir, ignore_errors=True)


def _ready(port: int) -> Probe:
    started = log_matches(_CHILD_STARTED)
    accepts = tcp_accepts(HOST, port)
    return lambda proc: started(proc) and accepts(proc)
