"""meshkit's own daemons as real child processes (`python -m meshkit COMMAND ...`).

One launcher, `daemon()`, for any of them: it passes port 0 for every listener it is told about, waits
for the one ready line every daemon prints (`meshkit.daemon.parse_ready`) and yields the bound
addresses by name. Tests use them the way a user runs them: a real process that can be SIGTERMed or
SIGKILLed mid-run. `extproc()`, `echo()`, `dev_upstream()`, `purge_broadcaster()` and
`embedding_cache()` are that launcher with each daemon's listeners.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshkit.daemon import parse_ready
from meshkit.errors import HarnessError
from meshkit.extproc.apis import Api
from meshkit.harness.process import ManagedProcess
from meshkit.harness.s3 import S3Server


@dataclass(frozen=True)
class RunningDaemon:
    """A running meshkit daemon: its process and the addresses of its ready line, by name."""

    process: ManagedProcess
    command: str
    addresses: dict[str, str]

    def port_of(self, name: str) -> int:
        return int(self.addresses[name].rpartition(":")[2])

    @property
    def admin_port(self) -> int:
        return self.port_of("admin")

    @property
    def admin_url(self) -> str:
        return f"http://{self.addresses['admin']}"


@dataclass(frozen=True)
class Extproc(RunningDaemon):
    """A running `meshkit extproc`: gRPC, ext_authz HTTP and admin ports."""

    @property
    def grpc_port(self) -> int:
        return self.port_of("grpc")

    @property
    def http_port(self) -> int:
        return self.port_of("http")

    def port_for(self, api: str) -> int:
        """The port Envoy's filter calls for `api` (ext_authz_http: the HTTP port; else gRPC)."""
        return self.http_port if api == Api.EXT_AUTHZ_HTTP else self.grpc_port


@dataclass(frozen=True)
class HttpDaemon(RunningDaemon):
    """A daemon that answers HTTP on its `http` listener."""

    @property
    def port(self) -> int:
        """The HTTP port it answers on."""
        return self.port_of("http")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class OpenAICompatible(HttpDaemon):
    """A daemon that serves OpenAI's API under `/v1`."""

    @property
    def base_url(self) -> str:
        """What `openai.OpenAI(base_url=...)` takes."""
        return f"{self.url}/v1"


@dataclass(frozen=True)
class Echo(HttpDaemon):
    """A running `meshkit echo`: answers with what it received."""


@dataclass(frozen=True)
class DevUpstream(OpenAICompatible):
    """A running `meshkit dev-upstream`: the OpenAI-compatible stand-in provider."""

    def _call(self, path: str, doc: dict[str, Any] | None = None) -> dict[str, Any]:
        body = None if doc is None else json.dumps(doc).encode()
        method = "GET" if body is None else "POST"
        req = urllib.request.Request(f"{self.url}{path}", data=body, method=method)  # noqa: S310 - loopback
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback URL we built
            answer: dict[str, Any] = json.loads(resp.read())
        return answer

    def stats(self) -> dict[str, Any]:
        """`GET /stats`: calls per endpoint, embedding items, ..."""
        return self._call("/stats")

    def reset_stats(self) -> dict[str, Any]:
        return self._call("/stats/reset", {})

    def control(self, **switches: Any) -> dict[str, Any]:
        """`POST /control` with `switches` (`fail={"status": 429, "count": 2}`, `delay_ms=200`, ...)."""
        return self._call("/control", switches)


def meshkit_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshkit", *args]


def _ready(proc: ManagedProcess) -> bool:
    return parse_ready(proc.log_text()) is not None


@contextmanager
def daemon(
    command: str,
    workdir: Path,
    args: Sequence[str] = (),
    *,
    listeners: Sequence[str] = ("--listen",),
    name: str | None = None,
    start_timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
) -> Iterator[RunningDaemon]:
    """`meshkit COMMAND` with every flag in `listeners` (and `--admin-listen`) on 127.0.0.1:0, plus
    `args` (and `env` over this process's environment); stopped (TERM, then KILL) on exit, whatever
    happened."""
    ports = [arg for flag in (*listeners, "--admin-listen") for arg in (flag, "127.0.0.1:0")]
    proc = ManagedProcess(
        name or f"meshkit-{command}",
        meshkit_argv(command, *ports, *args),
        log_dir=workdir,
        ready=_ready,
        start_timeout=start_timeout,
        env=env,
    )
    with proc:
        found = parse_ready(proc.log_text())
        if found is None:  # ready() said yes, so the line is there
            raise HarnessError(f"{proc.name}: no ready line\n{proc.tail()}")
        yield RunningDaemon(proc, command, found[1])


@contextmanager
def extproc(workdir: Path, args: Sequence[str] = (), *, name: str = "meshkit-extproc") -> Iterator[Extproc]:
    """`meshkit extproc` on free loopback ports (gRPC, ext_authz HTTP, admin) with extra `args`."""
    with daemon("extproc", workdir, args, listeners=("--listen", "--http-listen"), name=name) as running:
        yield Extproc(running.process, running.command, running.addresses)


@contextmanager
def echo(workdir: Path, args: Sequence[str] = (), *, name: str = "echo") -> Iterator[Echo]:
    """`meshkit echo`: an upstream that answers with what it received (`--name` is `name`)."""
    with daemon("echo", workdir, ["--name", name, *args], name=name) as running:
        yield Echo(running.process, running.command, running.addresses)


@contextmanager
def dev_upstream(
    workdir: Path, args: Sequence[str] = (), *, name: str = "dev-upstream"
) -> Iterator[DevUpstream]:
    """`meshkit dev-upstream` (the OpenAI-compatible stand-in provider) on free loopback ports."""
    with daemon("dev-upstream", workdir, args, name=name) as running:
        yield DevUpstream(running.process, running.command, running.addresses)


@dataclass(frozen=True)
class PurgeBroadcaster(HttpDaemon):
    """A running `meshkit purge-broadcaster`: PURGE in on `url`, fanned out to its `--targets`."""


@contextmanager
def purge_broadcaster(
    workdir: Path, targets: Sequence[str], args: Sequence[str] = (), *, name: str = "purge-broadcaster"
) -> Iterator[PurgeBroadcaster]:
    """`meshkit purge-broadcaster --targets TARGET,...` (HOST:PORT, dns:NAME:PORT, k8s:NS/SVC:PORT) on free
    loopback ports with extra `args` (`--kube-api` and `--kube-token-file` for a `FakeKube`)."""
    with daemon("purge-broadcaster", workdir, ["--targets", ",".join(targets), *args], name=name) as running:
        yield PurgeBroadcaster(running.process, running.command, running.addresses)


@dataclass(frozen=True)
class EmbeddingCache(OpenAICompatible):
    """A running `meshkit embedding-cache`: OpenAI's `/v1/embeddings`, each item cached."""


@contextmanager
def embedding_cache(
    workdir: Path,
    upstream: str,
    store: str,
    args: Sequence[str] = (),
    *,
    name: str = "embedding-cache",
    s3: S3Server | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[EmbeddingCache]:
    """`meshkit embedding-cache --upstream URL --store URL` on free loopback ports with extra `args`.
    With `s3`: `--s3-endpoint` and its credentials and region in the environment (no shared AWS files,
    no instance metadata lookups), then `env` over them (a wrong secret, say)."""
    argv = ["--upstream", upstream, "--store", store, *args]
    environment: dict[str, str] = {}
    if s3 is not None:
        argv += ["--s3-endpoint", s3.endpoint_url]
        environment.update(s3_environment(s3))
    environment.update(env or {})
    with daemon("embedding-cache", workdir, argv, name=name, env=environment or None) as running:
        yield EmbeddingCache(running.process, running.command, running.addresses)


def s3_environment(s3: S3Server) -> dict[str, str]:
    """The AWS variables that point boto3's default chain at `s3`'s credentials and region only."""
    return {
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "AWS_REGION": s3.region,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
