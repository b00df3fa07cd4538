"""A real nginx + nchan (Debian `nginx-light libnginx-mod-nchan`): the SSE fan-out meshkit is compared to.

`nchan_server(workdir)` writes `<workdir>/<name>/nginx.conf` and runs `nginx -p <that dir> -c nginx.conf
-e stderr -g 'daemon off;'` on a free loopback port (the error log is the process log `<name>.log` in
the same directory, so a failed start shows its tail), with:

- `POST /pub/<channel>` (`nchan_publisher`): the body is one message (a token JSON); nchan answers
  201/202 with the channel's info;
- `GET /sub/<channel>` (`nchan_subscriber eventsource websocket`): an EventSource stream (`id:` is
  nchan's own message id `<time>:<n>`, NOT our sequence: a reader takes the sequence from the JSON data),
  or a WebSocket whose frames are the message bodies;
- `GET /healthz` (a plain 200, the readiness probe besides the port accepting).

One worker process (`worker_processes 1`, as in the field notes' measurement) with `worker_connections`
19,000 and `worker_rlimit_nofile` at this machine's hard limit (20,000; a container without
CAP_SYS_RESOURCE refuses more, even to root): room for 10,000+ streams. Everything nginx writes (pid file,
error log, temp dirs) stays inside `workdir`; the access log is off (it would cost the target CPU per
request). Started as root, the master keeps `user root`: the workers must reach the temp dirs of a
pytest `tmp_path` (0700). Stopped by the master's PID (SIGTERM to its group, then SIGKILL), like every
harness process. `NchanServer.pids()` gives the master and its workers, for CPU/RSS sampling.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from meshkit.errors import HarnessError
from meshkit.harness.process import (
    ManagedProcess,
    Probe,
    free_port,
    http_ok,
    start_on_free_ports,
    tcp_accepts,
)

HOST = "127.0.0.1"
BIND_ATTEMPTS = 3
WORKER_CONNECTIONS = 19_000  # under the 20,000 open-file hard limit here (even root cannot raise it)
_BIND_FAILED = re.compile(r"bind\(\) to .* failed \(98: Address already in use\)")
_MODULE_CANDIDATES = (
    Path("/usr/lib/nginx/modules/ngx_nchan_module.so"),
    Path("/usr/share/nginx/modules/ngx_nchan_module.so"),
)


@dataclass(frozen=True)
class NchanServer:
    """A running nginx + nchan: publish at `pub_url(channel)`, subscribe at `sub_url(channel)`."""

    host: str
    port: int
    workdir: Path
    config_path: Path
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def pub_url(self, channel: str) -> str:
        return f"{self.url}/pub/{channel}"

    def sub_url(self, channel: str) -> str:
        return f"{self.url}/sub/{channel}"

    @property
    def pid(self) -> int:
        """The master's PID."""
        return self.process.pid

    def pids(self) -> list[int]:
        """The master and its worker processes (children read from /proc), master first."""
        return [self.pid, *children_of(self.pid)]


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (one pass over /proc; processes that vanish meanwhile are skipped)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(entry))
    return sorted(out)


def nginx_binary() -> str:
    """Path of `nginx`, or HarnessError naming the packages to install."""
    path = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if path is None:
        raise HarnessError("nginx not found: install the Debian packages `nginx-light libnginx-mod-nchan`")
    return path


def nchan_module() -> Path:
    """Path of `ngx_nchan_module.so`, or HarnessError naming the package to install."""
    for path in _MODULE_CANDIDATES:
        if path.exists():
            return path
    raise HarnessError("ngx_nchan_module.so not found: install the Debian package `libnginx-mod-nchan`")


def nginx_config(
    *, port: int, module: Path, workdir: Path, worker_connections: int = WORKER_CONNECTIONS
) -> str:
    """The nginx.conf `nchan_server` runs (see the module docstring)."""
    user = "user root;\n" if os.geteuid() == 0 else ""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = worker_connections + 256 if nofile == resource.RLIM_INFINITY else nofile
    tmp = workdir / "tmp"
    return f"""\
load_module {module};
{user}worker_processes 1;
worker_rlimit_nofile {nofile};
pid {workdir / "nginx.pid"};
error_log stderr warn;

events {{
    worker_connections {worker_connections};
    multi_accept on;
}}

http {{
    access_log off;
    client_body_temp_path {tmp / "body"};
    proxy_temp_path {tmp / "proxy"};
    fastcgi_temp_path {tmp / "fastcgi"};
    uwsgi_temp_path {tmp / "uwsgi"};
    scgi_temp_path {tmp / "scgi"};
    client_body_buffer_size 64k;
    client_max_body_size 1m;
    keepalive_requests 1000000;
    keepalive_timeout 75s;

    server {{
        listen {HOST}:{port} backlog=4096;

        location = /healthz {{
            return 200 "ok\\n";
        }}
        location ~ "^/pub/([A-Za-z0-9_-]{{1,128}})$" {{
            nchan_publisher http;
            nchan_channel_id $1;
            nchan_message_buffer_length 1000;
            nchan_message_timeout 10m;
        }}
        location ~ "^/sub/([A-Za-z0-9_-]{{1,128}})$" {{
            nchan_subscriber eventsource websocket;
            nchan_channel_id $1;
            nchan_subscriber_first_message oldest;
        }}
    }}
}}
"""


@contextmanager
def nchan_server(
    workdir: Path,
    *,
    name: str = "nchan",
    worker_connections: int = WORKER_CONNECTIONS,
    start_timeout: float = 15.0,
) -> Iterator[NchanServer]:
    """Run nginx + nchan from a config written into `workdir`; stop it on exit, also on exceptions."""
    binary = nginx_binary()
    module = nchan_module()
    workdir = Path(workdir).resolve() / name
    for sub in ("tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    config_path = workdir / "nginx.conf"

    def make() -> tuple[ManagedProcess, int]:
        port = free_port(HOST)
        config_path.write_text(
            nginx_config(port=port, module=module, workdir=workdir, worker_connections=worker_connections)
        )
        proc = ManagedProcess(
            name,
            [
                binary,
                "-p",
                str(workdir),
                "-c",
                str(config_path),
                "-e",
                "stderr",
                "-g",
                "daemon off;",
            ],
            log_dir=workdir,
            ready=_ready(port),
            cwd=workdir,
            start_timeout=start_timeout,
            stop_timeout=10.0,
        )
        return proc, port

    proc, port = start_on_free_ports(make, lambda log: bool(_BIND_FAILED.search(log)), BIND_ATTEMPTS)
    try:
        yield NchanServer(host=HOST, port=port, workdir=workdir, config_path=config_path, process=proc)
    finally:
        proc.stop()


def _ready(port: int) -> Probe:
    accepts = tcp_accepts(HOST, port)
    healthy = http_ok(f"http://{HOST}:{port}/healthz")
    return lambda proc: accepts(proc) and healthy(proc)
