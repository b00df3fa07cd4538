"""The Kubernetes side of `k8s:` purge targets: in-cluster config, and a list/watch of one Service's
`discovery.k8s.io/v1` EndpointSlices turned into `HOST:PORT` targets.

Config (`KubeConfig`): the standard in-cluster way, `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`,
the service account's token and CA under `/var/run/secrets/kubernetes.io/serviceaccount/` (its
`namespace` file names the pod's own namespace); `--kube-api URL` (+ `--kube-token-file`,
`--kube-ca-file`) points elsewhere, plain HTTP on loopback included (the tests' fake API). The token is
re-read whenever its file changes (projected tokens rotate; kubelet swaps the file): one `stat` per
request.

The loop (`EndpointSliceWatch.run`), as client-go's reflector does it:
    GET .../namespaces/NS/endpointslices?labelSelector=kubernetes.io/service-name=SVC    (the list)
    GET ...&watch=1&resourceVersion=<list's>&allowWatchBookmarks=true&timeoutSeconds=W    (the watch)
- the watch is newline-delimited JSON events, ADDED/MODIFIED/DELETED (a whole EndpointSlice),
  BOOKMARK (only a newer resourceVersion), ERROR (a `Status`); the server ends it after W seconds, and
  it is reopened from the last resourceVersion seen (after a backoff when it ended at once: a proxy
  that cuts watches must not make a request loop);
- 410 Gone (an expired resourceVersion: an HTTP 410 or an ERROR event with `code: 410`) -> a new list,
  at once after a watch that ran a while, after a backoff (0.2 s doubling to 10 s) when the 410 came
  within a second of the list (a server whose lists are older than its watches' window, or a list that
  is itself 410, would otherwise be listed in a loop);
- anything else (connection refused or dropped, 401/403, 5xx, a read silent for W + 15 s, bad JSON) ->
  counted, logged, and tried again after a backoff (0.2 s doubling to 10 s); the last good set is kept
  meanwhile. Every request has a connect deadline, the list a total one, the watch a per-read one.

Which endpoints are targets (`slice_targets`): every address of an endpoint whose `conditions.ready`
is not false (absent counts as ready, as the API says), PLUS an endpoint that is terminating but still
`serving`: a terminating Varnish pod still holds its cache and still answers requests already routed to
it (and Envoy keeps it until its connections drain), so it must still be purged; once it stops serving
or leaves the slice it leaves the set. An endpoint that is not ready and not terminating (starting up,
failing its probe) is not a target. The port is the number given, or the port of that name in the
slice's `ports` (a slice without it contributes nothing, logged once). `addressType` IPv4 and IPv6
(rendered `[addr]:port`); FQDN slices are skipped. Events are bounded: a line over 4 MiB ends the watch.

RBAC: `get`, `list`, `watch` on `endpointslices` in API group `discovery.k8s.io` in the namespaces named.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from meshkit.errors import ConfigError

log = logging.getLogger("meshkit.kube_endpoints")

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MAX_EVENT_BYTES = 4 << 20
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 10.0
READ_GRACE = 15.0  # seconds a watch read may wait beyond the server's timeoutSeconds


class KubeError(Exception):
    """A list or watch that did not give a usable answer; `kind` labels the metric."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


class Gone(KubeError):
    """410: the resourceVersion is too old; the only cure is a new list."""

    def __init__(self, message: str) -> None:
        super().__init__("gone", message)


class TokenFile:
    """A bearer token read from a file, read again whenever the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._token = ""

    def read(self) -> str:
        """The current token (raises OSError when the file cannot be read, ValueError when empty)."""
        st = os.stat(self.path)
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen != self._seen:
            token = self.path.read_text().strip()
            if not token:
                raise ValueError(f"{self.path}: the token file is empty")
            if self._seen is not None:
                log.info("kubernetes token %s changed: re-read", self.path)
            self._token, self._seen = token, seen
        return self._token


@dataclass(frozen=True)
class KubeConfig:
    api: URL
    token: TokenFile
    ssl: ssl.SSLContext | None  # None: plain HTTP (a fake API on loopback)

    @classmethod
    def resolve(cls, api: str, token_file: str, ca_file: str) -> KubeConfig:
        """From `--kube-api` (empty: in-cluster, from the environment), the token and CA files (empty:
        the service account's). Raises ConfigError naming what is missing."""
        if not api:
            host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
            if not host or not port:
                raise ConfigError(
                    [
                        "k8s: targets need the in-cluster API (KUBERNETES_SERVICE_HOST and "
                        "KUBERNETES_SERVICE_PORT are not set) or --kube-api URL"
                    ]
                )
            api = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        url = URL(api)
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError([f"--kube-api {api}: expected an http:// or https:// URL"])
        token = TokenFile(Path(token_file or SERVICE_ACCOUNT / "token"))
        try:
            token.read()
        except (OSError, ValueError) as exc:
            raise ConfigError(
                [f"--kube-token-file {token.path}: {getattr(exc, 'strerror', None) or exc}"]
            ) from None
        context = None
        if url.scheme == "https":
            ca = Path(ca_file or SERVICE_ACCOUNT / "ca.crt")
            try:
                context = ssl.create_default_context(cafile=str(ca))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError([f"--kube-ca-file {ca}: {exc}"]) from None
        return cls(url.with_path("").with_query(None), token, context)


def own_namespace() -> str:
    """The pod's namespace (the service account's `namespace` file), or ConfigError."""
    path = SERVICE_ACCOUNT / "namespace"
    try:
        return path.read_text().strip()
    except OSError:
        raise ConfigError([f"k8s:SERVICE:PORT without a namespace needs {path} (in a pod)"]) from None


def _render(address: str, port: int, ipv6: bool) -> str:
    return f"[{address}]:{port}" if ipv6 else f"{address}:{port}"


def is_target(endpoint: dict[str, Any]) -> bool:
    """Ready (absent counts as ready), or terminating while still serving (it still holds a cache)."""
    conditions = endpoint.get("conditions") or {}
    if conditions.get("ready") is not False:
        return True
    return conditions.get("terminating") is True and conditions.get("serving") is True


def slice_port(obj: dict[str, Any], port: int | str) -> int | None:
    """The port number for `port` (a number as is; a name looked up in the slice's `ports`)."""
    if isinstance(port, int):
        return port
    for entry in obj.get("ports") or []:
        if entry.get("name") == port and isinstance(entry.get("port"), int):
            return int(entry["port"])
    return None


def slice_targets(obj: dict[str, Any], port: int | str) -> tuple[str, ...]:
    """The `HOST:PORT` targets one EndpointSlice gives (see the module docstring)."""
    kind = obj.get("addressType")
    if kind not in ("IPv4", "IPv6"):
        return ()
    number = slice_port(obj, port)
    if number is None:
        return ()
    found: list[str] = []
    for endpoint in obj.get("endpoints") or []:
        if not isinstance(endpoint, dict) or not is_target(endpoint):
            continue
        for address in endpoint.get("addresses") or []:
            target = _render(str(address), number, kind == "IPv6")
            if target not in found:
                found.append(target)
    return tuple(found)


@dataclass
class WatchState:
    """What `/targets` shows of one watch."""

    connected: bool = False
    resource_version: str = ""
    last_error: str = ""
    lists: int = 0
    slices: dict[str, tuple[str, ...]] = field(default_factory=dict)


class EndpointSliceWatch:
    """Lists and watches the EndpointSlices of `namespace/service`; calls `changed(targets)` whenever
    the union of their targets changes. `error(kind)` and `restart(reason)` feed the metrics."""

    def __init__(
        self,
        config: KubeConfig,
        session: Callable[[], aiohttp.ClientSession],
        namespace: str,
        service: str,
        port: int | str,
        *,
        changed: Callable[[tuple[str, ...]], None],
        error: Callable[[str], None] = lambda kind: None,
        restart: Callable[[str], None] = lambda reason: None,
        watch_timeout: int = 300,
        request_timeout: float = 10.0,
    ) -> None:
        self._config, self._session = config, session
        self.namespace, self.service, self.port = namespace, service, port
        self._changed, self._error, self._restart = changed, error, restart
        self._watch_timeout, self._request_timeout = watch_timeout, request_timeout
        self.state = WatchState()
        self._targets: tuple[str, ...] = ()
        self._warned_port: set[str] = set()

    @property
    def where(self) -> str:
        return f"{self.namespace}/{self.service}"

    def _url(self, **query: str) -> URL:
        path = f"/apis/discovery.k8s.io/v1/namespaces/{self.namespace}/endpointslices"
        return self._config.api.with_path(path).with_query(
            {"labelSelector": f"{SERVICE_NAME_LABEL}={self.service}", **query}
        )

    def _headers(self) -> dict[str, str]:
        try:
            token = self._config.token.read()
        except (OSError, ValueError) as exc:
            raise KubeError("token", f"token {self._config.token.path}: {exc}") from None
        return {"Authorization": f"Bearer {token}", "Accept": "application/json"}

    # -- the loop -------------------------------------------------------------------------------
    async def run(self) -> None:
        backoff = gone_backoff = BACKOFF_FIRST
        while True:
            listing = time.monotonic()
            try:
                version = await self.list()
                backoff = quick = BACKOFF_FIRST
                while True:
                    began = time.monotonic()
                    version = await self.watch(version)
                    self._restart("timeout")  # the server ended it after timeoutSeconds: go on from there
                    if time.monotonic() - began < min(
                        1.0, self._watch_timeout / 2
                    ):  # ended at once: a proxy?
                        await asyncio.sleep(quick)
                        quick = min(quick * 2, BACKOFF_MAX)
                    else:
                        quick = BACKOFF_FIRST
            except Gone as exc:
                self._restart("gone")
                if time.monotonic() - listing < 1.0:  # the list's own version was too old already
                    log.info("endpointslices %s: %s: listing again in %.1f s", self.where, exc, gone_backoff)
                    await asyncio.sleep(gone_backoff)
                    gone_backoff = min(gone_backoff * 2, BACKOFF_MAX)
                else:
                    log.info("endpointslices %s: %s: listing again", self.where, exc)
                    gone_backoff = BACKOFF_FIRST
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                kind = exc.kind if isinstance(exc, KubeError) else _error_kind(exc)
                self._error(kind)
                self.state.connected, self.state.last_error = False, f"{kind}: {exc}"[:300]
                log.warning(
                    "endpointslices %s: %s (%s); keeping %d targets, retrying in %.1f s",
                    self.where,
                    exc,
                    kind,
                    len(self._targets),
                    backoff,
                )
                self._restart("error")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    async def list(self) -> str:
        """List the slices (replacing what was known); the list's resourceVersion."""
        timeout = aiohttp.ClientTimeout(total=self._request_timeout)
        async with self._session().get(
            self._url(), headers=self._headers(), timeout=timeout, ssl=self._ssl()
        ) as resp:
            if resp.status != 200:
                raise _status_error(resp.status, await resp.read())
            doc = await resp.json(content_type=None)
        if not isinstance(doc, dict) or doc.get("kind") != "EndpointSliceList":
            raise KubeError("bad_answer", "the list is not an EndpointSliceList")
        items = doc.get("items") or []
        self.state.slices = {}
        for obj in items:
            self._apply("ADDED", obj)
        self.state.lists += 1
        self.state.connected, self.state.last_error = True, ""
        version = str((doc.get("metadata") or {}).get("resourceVersion", ""))
        self.state.resource_version = version
        self._publish()
        return version

    async def watch(self, version: str) -> str:
        """One watch from `version` until the server ends it; the last resourceVersion seen."""
        query = {
            "watch": "1",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self._watch_timeout),
        }
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self._request_timeout, sock_read=self._watch_timeout + READ_GRACE
        )
        async with self._session().get(
            self._url(**query), headers=self._headers(), timeout=timeout, ssl=self._ssl()
        ) as resp:
            if resp.status != 200:
                raise _status_error(resp.status, await resp.read())
            self.state.connected, self.state.last_error = True, ""
            async for event in _lines(resp.content):
                version = self._event(event) or version
                self.state.resource_version = version
        return version

    def _ssl(self) -> ssl.SSLContext | bool:
        return self._config.ssl if self._config.ssl is not None else True

    # -- events -----------------------------------------------------------------------------------
    def _event(self, line: bytes) -> str | None:
        try:
            event = json.loads(line)
            kind, obj = event["type"], event["object"]
            if not isinstance(obj, dict):
                raise TypeError("object is not a JSON object")
        except (ValueError, KeyError, TypeError) as exc:
            raise KubeError("bad_answer", f"a watch event that is not one: {exc}") from None
        if kind == "ERROR":
            code, message = obj.get("code"), obj.get("message", "")
            if code == 410:
                raise Gone(f"watch: {message or 'resourceVersion expired'}")
            raise KubeError("watch_error", f"watch ERROR {code}: {message}"[:300])
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self._apply(kind, obj)
            self._publish()
        elif kind != "BOOKMARK":
            raise KubeError("bad_answer", f"unknown watch event type {kind!r}")
        return str(version) if version else None

    def _apply(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        name = str(meta.get("name", ""))
        if kind == "DELETED":
            self.state.slices.pop(name, None)
            return
        if (
            isinstance(self.port, str)
            and slice_port(obj, self.port) is None
            and name not in self._warned_port
        ):
            self._warned_port.add(name)
            log.warning(
                "endpointslice %s/%s has no port named %r: no targets from it",
                self.namespace,
                name,
                self.port,
            )
        self.state.slices[name] = slice_targets(obj, self.port)

    def _publish(self) -> None:
        union: list[str] = []
        for name in sorted(self.state.slices):
            union += [t for t in self.state.slices[name] if t not in union]
        targets = tuple(union)
        if targets != self._targets:
            self._targets = targets
            self._changed(targets)


async def _lines(stream: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """Newline-delimited events from a chunked watch body, each at most MAX_EVENT_BYTES."""
    buffer = b""
    async for chunk in stream.iter_any():
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line, buffer = buffer[:end].strip(), buffer[end + 1 :]
            if line:
                yield line
        if len(buffer) > MAX_EVENT_BYTES:
            raise KubeError("bad_answer", f"a watch event over {MAX_EVENT_BYTES} bytes")
    if buffer.strip():
        yield buffer.strip()


def _status_error(status: int, body: bytes) -> KubeError:
    try:
        message = str(json.loads(body).get("message", ""))
    except (ValueError, AttributeError):
        message = body[:200].decode("utf-8", "replace")
    text = f"HTTP {status}: {message}" if message else f"HTTP {status}"
    if status == 410:
        return Gone(text)
    kind = {401: "unauthorized", 403: "forbidden", 404: "not_found"}.get(status, "http_error")
    return KubeError(kind, text)


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientError | OSError):
        return "connection"
    return "unexpected"
