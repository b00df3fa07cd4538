"""Where the purge broadcaster's targets come from: one interface, the current set of `HOST:PORT`
targets, updated over time, whatever the source.

`--targets` is a comma-separated mix of (`parse_target_specs` validates each at start: exit 2, one line
naming the item):
- `HOST:PORT`: static (`StaticSource`);
- `dns:NAME:PORT`: every A and AAAA record of NAME (a headless Service), through the event loop's
  resolver (`loop.getaddrinfo`, injectable for tests) with a deadline (`--resolve-timeout`), again every
  `--resolve-interval` seconds (`DnsSource`). A failed resolution (no such name, timeout) keeps the last
  good set, and is counted and logged (a name that resolves to nothing is a failure too: an empty
  headless Service during a rollout is more likely a DNS hiccup than a cache tier with no pods). IPv6
  addresses are rendered `[addr]:port`;
- `k8s:NAMESPACE/SERVICE:PORT` or `k8s:SERVICE:PORT` (the pod's own namespace): the ready endpoints
  of the Service's EndpointSlices (`KubeSource`, `meshkit.sidecars.kube_endpoints`); PORT is a number or
  the name of one of the slices' `ports`.

`TargetSet` holds the sources: `current()` is the ordered union (static first, as given; a target two
sources name is one target), `describe()` what `/targets` shows, and `on_change` callbacks run whenever
the union changes (readiness, the replayer).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from meshkit.options import parse_host_port
from meshkit.sidecars.kube_endpoints import EndpointSliceWatch, KubeConfig, own_namespace

log = logging.getLogger("meshkit.purge_targets")

# RFC 1123 labels (a Service name, a DNS name) and Kubernetes names
_DNS_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
_KUBE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_PORT_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")  # an IANA_SVC_NAME, at most 15

Resolver = Callable[[str, int], Awaitable[list[tuple[Any, ...]]]]  # loop.getaddrinfo's shape


@dataclass(frozen=True)
class TargetSpec:
    """One item of `--targets`: `text` as given (the source's name in /targets and the metrics)."""

    kind: str  # "static" | "dns" | "k8s"
    text: str
    host: str = ""  # static: the host; dns: the name
    port: int | str = 0  # k8s: a number or a port name
    namespace: str = ""  # k8s: empty means the pod's own
    service: str = ""


def _port_number(text: str, item: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{item}: the port must be a number from 1 to 65535")
    return int(text)


def parse_target_spec(item: str) -> TargetSpec:
    """One `--targets` item, or ValueError saying what the form should be."""
    if item.startswith("dns:"):
        name, sep, port = item[4:].rpartition(":")
        if not sep or not _DNS_NAME.match(name):
            raise ValueError(f"{item}: expected dns:NAME:PORT with a DNS name (a headless Service)")
        return TargetSpec("dns", item, host=name, port=_port_number(port, item))
    if item.startswith("k8s:"):
        where, sep, port = item[4:].rpartition(":")
        namespace, slash, service = where.rpartition("/")
        if not sep or (slash and not _KUBE_NAME.match(namespace)) or not _KUBE_NAME.match(service):
            raise ValueError(f"{item}: expected k8s:NAMESPACE/SERVICE:PORT (lowercase Kubernetes names)")
        if port.isdigit():
            return TargetSpec(
                "k8s", item, port=_port_number(port, item), namespace=namespace, service=service
            )
        if not _PORT_NAME.match(port):
            raise ValueError(
                f"{item}: PORT must be a number or a port name of the EndpointSlice (such as http)"
            )
        return TargetSpec("k8s", item, port=port, namespace=namespace, service=service)
    if ":" in item and item.split(":", 1)[0] in ("http", "https", "dns", "k8s", "tcp"):
        raise ValueError(f"{item}: expected HOST:PORT, dns:NAME:PORT or k8s:NAMESPACE/SERVICE:PORT")
    try:
        parse_host_port(item)
    except ValueError:
        raise ValueError(f"{item}: expected HOST:PORT, dns:NAME:PORT or k8s:NAMESPACE/SERVICE:PORT") from None
    host, _, port = item.rpartition(":")
    return TargetSpec("static", item, host=host, port=_port_number(port, item))


def parse_target_specs(value: Any) -> tuple[str, ...]:
    """`--targets` (a comma-separated string, or a list from YAML): each item validated, duplicates
    dropped; empty: no targets (every purge answers 503)."""
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    specs: list[str] = []
    for item in (str(i).strip() for i in items):
        if item and item not in specs:
            parse_target_spec(item)
            specs.append(item)
    return tuple(specs)


def render(address: str, port: int) -> str:
    """`HOST:PORT`, an IPv6 address in brackets."""
    try:
        ipv6 = ipaddress.ip_address(address.split("%", 1)[0]).version == 6
    except ValueError:
        ipv6 = False
    return f"[{address}]:{port}" if ipv6 else f"{address}:{port}"


# -- the sources ------------------------------------------------------------------------------------
class TargetSource(Protocol):
    spec: TargetSpec

    def current(self) -> tuple[str, ...]: ...

    def status(self) -> dict[str, Any]:
        """For /targets: whatever says how this source is doing (last error, last update)."""
        ...

    async def start(self) -> None:
        """Begin (a first resolution or list may still be under way when it returns)."""
        ...

    async def stop(self) -> None: ...


class StaticSource:
    def __init__(self, spec: TargetSpec) -> None:
        self.spec = spec

    def current(self) -> tuple[str, ...]:
        return (self.spec.text,)

    def status(self) -> dict[str, Any]:
        return {}

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


@dataclass
class SourceHooks:
    """What a dynamic source reports to: the set changed, an error (by kind), a watch restart."""

    changed: Callable[[], None]
    error: Callable[[TargetSpec, str], None]
    restart: Callable[[TargetSpec, str], None]


class _Looping:
    """A source whose updates come from one background task."""

    spec: TargetSpec
    _task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"targets {self.spec.text}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class DnsSource(_Looping):
    def __init__(
        self,
        spec: TargetSpec,
        hooks: SourceHooks,
        *,
        interval: float,
        timeout: float,
        resolver: Resolver | None = None,
    ) -> None:
        self.spec, self._hooks = spec, hooks
        self._interval, self._timeout = interval, timeout
        self._resolver = resolver
        self._targets: tuple[str, ...] = ()
        self._updated = 0.0
        self._error = ""
        self.resolutions = 0

    def current(self) -> tuple[str, ...]:
        return self._targets

    def status(self) -> dict[str, Any]:
        return {
            "resolved_at": round(self._updated, 3) if self._updated else None,
            "last_error": self._error or None,
        }

    async def _lookup(self) -> list[tuple[Any, ...]]:
        if self._resolver is not None:
            return await self._resolver(self.spec.host, int(self.spec.port))
        return await asyncio.get_running_loop().getaddrinfo(
            self.spec.host, int(self.spec.port), type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )

    async def resolve_once(self) -> None:
        """One resolution: the set replaced on success, kept (and the error counted) on failure."""
        try:
            async with asyncio.timeout(self._timeout):
                infos = await self._lookup()
            found: list[str] = []
            for family, *_, sockaddr in infos:
                if family in (socket.AF_INET, socket.AF_INET6):
                    target = render(str(sockaddr[0]), int(self.spec.port))
                    if target not in found:
                        found.append(target)
            if not found:
                raise OSError(f"{self.spec.host} has no A or AAAA record")
        except (OSError, TimeoutError) as exc:
            kind = "timeout" if isinstance(exc, TimeoutError) else "resolve"
            why = f"no answer within {self._timeout:g} s" if kind == "timeout" else str(exc)
            self._error = f"{kind}: {why}"[:300]
            self._hooks.error(self.spec, kind)
            log.warning(
                "%s: resolution failed (%s); keeping %d targets", self.spec.text, why, len(self._targets)
            )
            return
        self.resolutions += 1
        self._updated, self._error = time.time(), ""
        ordered = tuple(sorted(found))
        if ordered != self._targets:
            log.info("%s: targets %s", self.spec.text, ", ".join(ordered))
            self._targets = ordered
            self._hooks.changed()

    async def _loop(self) -> None:
        while True:
            await self.resolve_once()
            await asyncio.sleep(self._interval)


class KubeSource(_Looping):
    def __init__(
        self,
        spec: TargetSpec,
        hooks: SourceHooks,
        config: KubeConfig,
        session: Callable[[], aiohttp.ClientSession],
        *,
        watch_timeout: int,
    ) -> None:
        self.spec, self._hooks = spec, hooks
        self._targets: tuple[str, ...] = ()
        self.watch = EndpointSliceWatch(
            config,
            session,
            spec.namespace or own_namespace(),
            spec.service,
            spec.port,
            changed=self._changed,
            error=lambda kind: hooks.error(spec, kind),
            restart=lambda reason: hooks.restart(spec, reason),
            watch_timeout=watch_timeout,
        )

    def _changed(self, targets: tuple[str, ...]) -> None:
        log.info("%s: targets %s", self.spec.text, ", ".join(targets) or "(none)")
        self._targets = targets
        self._hooks.changed()

    def current(self) -> tuple[str, ...]:
        return self._targets

    def status(self) -> dict[str, Any]:
        state = self.watch.state
        return {
            "connected": state.connected,
            "resource_version": state.resource_version or None,
            "slices": len(state.slices),
            "last_error": state.last_error or None,
        }

    async def _loop(self) -> None:
        await self.watch.run()


# -- the set ------------------------------------------------------------------------------------------
class TargetSet:
    """Every source of `--targets`; the union of their targets."""

    def __init__(self) -> None:
        self.sources: list[TargetSource] = []
        self._on_change: list[Callable[[tuple[str, ...]], None]] = []
        self._current: tuple[str, ...] = ()

    @classmethod
    def of_static(cls, targets: Sequence[str]) -> TargetSet:
        found = cls()
        for text in targets:
            found.add(StaticSource(parse_target_spec(text)))
        return found

    def add(self, source: TargetSource) -> None:
        self.sources.append(source)
        self._recompute()

    def on_change(self, callback: Callable[[tuple[str, ...]], None]) -> None:
        self._on_change.append(callback)

    def current(self) -> tuple[str, ...]:
        return self._current

    def changed(self) -> None:
        """A source's set changed: recompute the union, tell whoever listens if it changed."""
        if self._recompute():
            for callback in self._on_change:
                callback(self._current)

    def _recompute(self) -> bool:
        union: list[str] = []
        for source in self.sources:
            union += [t for t in source.current() if t not in union]
        if tuple(union) == self._current:
            return False
        self._current = tuple(union)
        return True

    def describe(self) -> dict[str, Any]:
        """`GET /targets`: every target with the sources naming it, and every source's own view."""
        by_target: dict[str, list[str]] = {t: [] for t in self._current}
        for source in self.sources:
            for t in source.current():
                by_target.setdefault(t, []).append(source.spec.text)
        return {
            "targets": [{"target": t, "sources": s} for t, s in by_target.items()],
            "sources": [
                {
                    "source": source.spec.text,
                    "kind": source.spec.kind,
                    "targets": list(source.current()),
                    **source.status(),
                }
                for source in self.sources
            ],
        }

    async def start(self) -> None:
        for source in self.sources:
            await source.start()

    async def stop(self) -> None:
        await asyncio.gather(*(source.stop() for source in self.sources), return_exceptions=True)
