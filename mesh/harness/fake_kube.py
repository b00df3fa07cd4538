"""A fake of the Kubernetes API's `discovery.k8s.io/v1` EndpointSlices, for tests: no kube-apiserver runs
on this machine (Debian and PyPI have none), so code that lists and watches EndpointSlices is tested
against this, which speaks the same JSON on the same paths.

    with FakeKube(token="t") as kube:                 # an aiohttp server in its own thread, on loopback
                                                      # (tls=(cert, key): HTTPS, as the real one)
        kube.put_slice("cache", "varnish-abc", "varnish", [endpoint("127.0.0.1")], ports=[("http", 6081)])
        ... --kube-api kube.url --kube-token-file F ...
        kube.put_slice(..., [endpoint("127.0.0.1", ready=False)])   # MODIFIED, to every watcher
        kube.delete_slice("cache", "varnish-abc")                    # DELETED
        kube.compact()            # every resourceVersion so far is too old: a watch from one gets 410
        kube.expire_watches = True  # every watch from a resourceVersion gets 410, the list's own too
        kube.restart()            # down (every open watch cut), then up again on the same port

What it serves, as the real API server does:
- `GET /apis/discovery.k8s.io/v1/namespaces/NS/endpointslices[?labelSelector=...]`: `kind:
  EndpointSliceList`, `metadata.resourceVersion` (the store's, a counter), `items` (each with its own
  `metadata.resourceVersion`; list items carry no kind/apiVersion). `labelSelector` takes `k=v`, `k==v`,
  `k!=v` and `k` joined by commas (anything else: 400 Status).
- `...&watch=1&resourceVersion=RV[&timeoutSeconds=N][&allowWatchBookmarks=true]`: HTTP 200, chunked,
  one JSON event per line: `{"type": "ADDED|MODIFIED|DELETED", "object": <EndpointSlice with kind and
  apiVersion>}`, `BOOKMARK` (an object with only kind, apiVersion and `metadata.resourceVersion`),
  first every change after RV, then live ones; after `timeoutSeconds` (default 1800) a BOOKMARK when
  asked for (and `bookmarks` is on: a bookmark moves the client past a `compact()`), and the end of
  the body. An RV older than the last `compact()`: an `ERROR` event with a
  `Status` of code 410, reason `Expired` (the real server's answer to a watch), or with
  `gone_as_http=True` an HTTP 410 Status (what a list with an expired continue token gets). RV empty
  or "0": ADDED events for every current object first.
- `Authorization: Bearer <token>` on every request, else 401 Status (`Unauthorized`).
- Each watcher's queue is bounded (1000 events); one that overflows is ended, as a slow watcher is.

`requests` records (method, path, query) of every request, for tests that count lists and watches.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import ssl
import threading
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from aiohttp import web

from meshkit.errors import HarnessError

T = TypeVar("T")
API_PREFIX = "/apis/discovery.k8s.io/v1/namespaces/"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
WATCH_QUEUE = 1000
_END: dict[str, Any] = {}  # the sentinel that ends a watch stream


def endpoint(
    address: str,
    *,
    ready: bool | None = True,
    serving: bool | None = None,
    terminating: bool | None = None,
    pod: str | None = None,
    namespace: str = "default",
) -> dict[str, Any]:
    """One `endpoints[]` entry; `serving` defaults to `ready`, `terminating` to false (None: absent)."""
    conditions: dict[str, Any] = {}
    if ready is not None:
        conditions["ready"] = ready
    conditions["serving"] = ready if serving is None else serving
    conditions["terminating"] = False if terminating is None else terminating
    name = pod or f"varnish-{uuid.uuid4().hex[:5]}"
    return {
        "addresses": [address],
        "conditions": {k: v for k, v in conditions.items() if v is not None},
        "targetRef": {"kind": "Pod", "namespace": namespace, "name": name, "uid": str(uuid.uuid4())},
        "nodeName": "node-1",
    }


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _status_response(code: int, reason: str, message: str) -> web.Response:
    return web.json_response(_status(code, reason, message), status=code)


@dataclass(frozen=True)
class Requirement:
    """One label requirement: `key=value` (op "="), `key!=value` ("!="), `key` (exists)."""

    key: str
    op: str
    value: str = ""

    def __call__(self, labels: dict[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        return (labels.get(self.key) == self.value) == (self.op == "=")


def parse_selector(text: str) -> list[Requirement]:
    """`k=v,k2!=v2,k3`: one requirement each; ValueError for anything else."""
    found: list[Requirement] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        op = "!=" if "!=" in part else "=" if "=" in part else "exists"
        if op == "exists":
            if not part.replace("/", "").replace(".", "").replace("-", "").replace("_", "").isalnum():
                raise ValueError(part)
            found.append(Requirement(part, op))
            continue
        key, value = (x.strip() for x in part.replace("==", "=", 1).split(op, 1))
        if not key or "=" in value:
            raise ValueError(part)
        found.append(Requirement(key, op, value))
    return found


@dataclass
class _Watcher:
    namespace: str
    selector: list[Requirement]
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=lambda: asyncio.Queue(WATCH_QUEUE))

    def wants(self, obj: dict[str, Any]) -> bool:
        meta = obj["metadata"]
        labels = meta.get("labels") or {}
        return bool(meta["namespace"] == self.namespace and all(r(labels) for r in self.selector))


class FakeKube:
    """The fake API server (see the module docstring). Every method is safe to call from the test's
    thread; the server runs on its own event loop in a daemon thread."""

    def __init__(
        self,
        token: str = "fake-kube-token",  # noqa: S107
        *,
        host: str = "127.0.0.1",
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.token = token
        self.host = host
        self._tls = tls  # (certificate chain, key): HTTPS, as the real API server speaks
        self.port = 0
        self.gone_as_http = False
        self.bookmarks = True  # False: none sent, even when asked (servers may send none)
        self.cut_watches = False  # True: every watch ends at once, empty (a proxy that cuts them)
        self.expire_watches = (
            False  # True: every watch from a resourceVersion is 410 (lists from a stale cache)
        )
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._version = itertools.count(1000)
        self._rv = next(self._version)
        self._oldest = 0  # resourceVersions below this are "too old"
        self._objects: dict[tuple[str, str], dict[str, Any]] = {}
        self._history: list[tuple[int, str, dict[str, Any]]] = []
        self._watchers: list[_Watcher] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # -- running ----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://{self.host}:{self.port}"

    def __enter__(self) -> FakeKube:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        if self._loop is None:
            raise HarnessError("fake kube: not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> None:
        """Start the loop thread (once) and the server (on the same port after `stop()`)."""
        if self._loop is None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._thread = threading.Thread(target=loop.run_forever, name="fake-kube", daemon=True)
            self._thread.start()
        self._call(self._serve())

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            await runner.cleanup()
            raise HarnessError(f"fake kube: cannot bind {self.host}:{self.port}: {exc}") from None
        self.port = sock.getsockname()[1]
        context = None
        if self._tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(self._tls[0]), str(self._tls[1]))
        await web.SockSite(runner, sock, ssl_context=context).start()
        self._runner = runner

    def stop(self) -> None:
        """Stop serving: every open watch ends (its connection closed), new connections are refused."""
        self._call(self._unserve())

    async def _unserve(self) -> None:
        for watcher in list(self._watchers):
            self._offer(watcher, _END)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        if self._loop is None:
            return
        try:
            self.stop()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(10)
            self._loop.close()
            self._loop = None

    # -- the store ----------------------------------------------------------------------------------
    def put_slice(
        self,
        namespace: str,
        name: str,
        service: str,
        endpoints: Sequence[dict[str, Any]],
        *,
        ports: Sequence[tuple[str | None, int]] = (("http", 80),),
        address_type: str = "IPv4",
    ) -> int:
        """Create (ADDED) or replace (MODIFIED) an EndpointSlice of `service`; its resourceVersion."""
        return self._call(self._put(namespace, name, service, list(endpoints), list(ports), address_type))

    async def _put(
        self,
        namespace: str,
        name: str,
        service: str,
        endpoints: list[dict[str, Any]],
        ports: list[tuple[str | None, int]],
        address_type: str,
    ) -> int:
        old = self._objects.get((namespace, name))
        rv = next(self._version)
        meta = {
            "name": name,
            "generateName": f"{service}-",
            "namespace": namespace,
            "uid": old["metadata"]["uid"] if old else str(uuid.uuid4()),
            "resourceVersion": str(rv),
            "generation": (old["metadata"]["generation"] + 1) if old else 1,
            "creationTimestamp": "2026-12-01T00:00:00Z",
            "labels": {
                SERVICE_NAME_LABEL: service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": service,
                    "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{namespace}/{service}")),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        }
        obj = {
            "metadata": meta,
            "addressType": address_type,
            "endpoints": endpoints,
            "ports": [
                {**({"name": port_name} if port_name is not None else {}), "protocol": "TCP", "port": number}
                for port_name, number in ports
            ],
        }
        self._objects[(namespace, name)] = obj
        self._record(rv, "MODIFIED" if old else "ADDED", obj)
        return rv

    def delete_slice(self, namespace: str, name: str) -> int:
        return self._call(self._delete(namespace, name))

    async def _delete(self, namespace: str, name: str) -> int:
        obj = self._objects.pop((namespace, name), None)
        if obj is None:
            raise HarnessError(f"fake kube: no endpointslice {namespace}/{name}")
        rv = next(self._version)
        gone = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(rv)}}
        self._record(rv, "DELETED", gone)
        return rv

    def _record(self, rv: int, kind: str, obj: dict[str, Any]) -> None:
        self._rv = rv
        self._history.append((rv, kind, obj))
        for watcher in list(self._watchers):
            if watcher.wants(obj):
                self._offer(watcher, {"type": kind, "object": _typed(obj)})

    def _offer(self, watcher: _Watcher, event: dict[str, Any]) -> None:
        try:
            watcher.queue.put_nowait(event)
        except asyncio.QueueFull:  # a watcher too slow to keep up is ended, as the real server does
            self._watchers.remove(watcher)
            watcher.queue.get_nowait()
            watcher.queue.put_nowait(_END)

    def compact(self) -> None:
        """Every resourceVersion so far becomes too old: a watch from one of them gets 410."""
        self._call(self._compact())

    async def _compact(self) -> None:
        self._rv = next(self._version)  # the store moves on (other objects changed)
        self._oldest = self._rv
        self._history.clear()

    def bookmark(self) -> None:
        """A BOOKMARK to every watcher that asked for them (at the store's current version)."""
        self._call(self._bookmark())

    async def _bookmark(self) -> None:
        for watcher in list(self._watchers):
            self._offer(watcher, _bookmark_event(self._rv))

    @property
    def watchers(self) -> int:
        return self._call(self._count())

    async def _count(self) -> int:
        return len(self._watchers)

    # -- HTTP -----------------------------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path, dict(request.query)))
        if request.headers.get("Authorization", "") != f"Bearer {self.token}":
            return _status_response(401, "Unauthorized", "Unauthorized")
        path = request.path
        if request.method != "GET":
            return _status_response(405, "MethodNotAllowed", f"the server does not allow {request.method}")
        if not path.startswith(API_PREFIX) or not path.endswith("/endpointslices"):
            return _status_response(404, "NotFound", "the server could not find the requested resource")
        namespace = path[len(API_PREFIX) : -len("/endpointslices")]
        if not namespace or "/" in namespace:
            return _status_response(404, "NotFound", "the server could not find the requested resource")
        try:
            selector = parse_selector(request.query.get("labelSelector", ""))
        except ValueError as exc:
            return _status_response(400, "BadRequest", f"unable to parse requirement: {exc}")
        if request.query.get("watch") in ("1", "true"):
            return await self._watch(request, _Watcher(namespace, selector))
        return self._list(_Watcher(namespace, selector))

    def _list(self, match: _Watcher) -> web.Response:
        items = [obj for (_, _), obj in sorted(self._objects.items()) if match.wants(obj)]
        return web.json_response(
            {
                "kind": "EndpointSliceList",
                "apiVersion": "discovery.k8s.io/v1",
                "metadata": {"resourceVersion": str(self._rv)},
                "items": items,
            }
        )

    async def _watch(self, request: web.Request, watcher: _Watcher) -> web.StreamResponse:
        text = request.query.get("resourceVersion", "")
        try:
            since = int(text) if text else 0
            timeout = float(request.query.get("timeoutSeconds", "1800"))
        except ValueError:
            return _status_response(400, "BadRequest", "resourceVersion and timeoutSeconds must be numbers")
        bookmarks = self.bookmarks and request.query.get("allowWatchBookmarks") == "true"
        too_old = since != 0 and (since < self._oldest or self.expire_watches)
        if too_old and self.gone_as_http:
            return _status_response(410, "Expired", f"too old resource version: {since} ({self._oldest})")
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if self.cut_watches:
            await resp.write_eof()
            return resp
        if too_old:
            status = _status(410, "Expired", f"too old resource version: {since} ({self._oldest})")
            await _send(resp, {"type": "ERROR", "object": status})
            return resp
        # what happened after `since` (or everything there is, from 0), then live: registered in the same
        # loop turn as the snapshot, so no event falls between them
        if since == 0:
            backlog = [
                {"type": "ADDED", "object": _typed(obj)}
                for obj in self._objects.values()
                if watcher.wants(obj)
            ]
        else:
            backlog = [
                {"type": kind, "object": _typed(obj)}
                for rv, kind, obj in self._history
                if rv > since and watcher.wants(obj)
            ]
        self._watchers.append(watcher)
        try:
            for event in backlog:
                await _send(resp, event)
            try:
                async with asyncio.timeout(timeout):
                    while (event := await watcher.queue.get()) is not _END:
                        if event["type"] != "BOOKMARK" or bookmarks:
                            await _send(resp, event)
            except TimeoutError:  # timeoutSeconds: a last bookmark, then the end of the body
                if bookmarks:
                    await _send(resp, _bookmark_event(self._rv))
            await resp.write_eof()
        except ConnectionResetError:  # the client went away
            pass
        finally:
            if watcher in self._watchers:
                self._watchers.remove(watcher)
        return resp


def _typed(obj: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1", **obj}


def _bookmark_event(rv: int) -> dict[str, Any]:
    return {
        "type": "BOOKMARK",
        "object": {
            "kind": "EndpointSlice",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"resourceVersion": str(rv)},
        },
    }


async def _send(resp: web.StreamResponse, event: dict[str, Any]) -> None:
    await resp.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")
