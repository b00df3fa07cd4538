"""Purge targets: the `--targets` forms, dns: resolution with an injected resolver (re-resolution, a
failure keeps the last set, IPv6 in brackets), which EndpointSlice endpoints count, the union of
sources, and the departed targets' clock."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

from meshkit.harness.fake_kube import endpoint
from meshkit.sidecars.kube_endpoints import is_target, slice_targets
from meshkit.sidecars.purge_log import Departures
from meshkit.sidecars.purge_targets import (
    DnsSource,
    SourceHooks,
    StaticSource,
    TargetSet,
    TargetSpec,
    parse_target_spec,
    parse_target_specs,
    render,
)


def test_the_three_forms() -> None:
    assert parse_target_specs("10.0.0.7:6081, 10.0.0.8:6081,,10.0.0.7:6081") == (
        "10.0.0.7:6081",
        "10.0.0.8:6081",
    )
    assert parse_target_specs("") == ()
    assert parse_target_specs(["[::1]:6081", "dns:varnish.cache.svc.cluster.local:6081"]) == (
        "[::1]:6081",
        "dns:varnish.cache.svc.cluster.local:6081",
    )
    dns = parse_target_spec("dns:varnish-headless:6081")
    assert (dns.kind, dns.host, dns.port) == ("dns", "varnish-headless", 6081)
    named = parse_target_spec("k8s:cache/varnish:http")
    assert (named.kind, named.namespace, named.service, named.port) == ("k8s", "cache", "varnish", "http")
    numbered = parse_target_spec("k8s:varnish:6081")
    assert (numbered.namespace, numbered.service, numbered.port) == ("", "varnish", 6081)


@pytest.mark.parametrize(
    ("item", "says"),
    [
        ("host", "expected HOST:PORT"),
        ("h:0", "1 to 65535"),
        ("h:99999", "expected HOST:PORT"),
        ("http://h:80", "expected HOST:PORT"),
        ("dns:varnish", "dns:NAME:PORT"),
        ("dns:bad_name:6081", "dns:NAME:PORT"),
        ("dns:varnish:0", "1 to 65535"),
        ("dns:varnish:http", "1 to 65535"),
        ("k8s:cache/varnish", "k8s:NAMESPACE/SERVICE:PORT"),
        ("k8s:Cache/varnish:80", "k8s:NAMESPACE/SERVICE:PORT"),
        ("k8s:cache/var_nish:80", "k8s:NAMESPACE/SERVICE:PORT"),
        ("k8s:a/b/c:80", "k8s:NAMESPACE/SERVICE:PORT"),
        ("k8s:cache/varnish:Not_A_Port", "port name"),
        ("k8s:cache/varnish:70000", "1 to 65535"),
    ],
)
def test_a_bad_item_says_what_was_expected(item: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as caught:
        parse_target_specs(f"10.0.0.1:80,{item}")
    assert str(caught.value).startswith(item)


def test_render() -> None:
    assert render("10.0.0.7", 6081) == "10.0.0.7:6081"
    assert render("fd00::7", 6081) == "[fd00::7]:6081"
    assert render("fe80::1%eth0", 80) == "[fe80::1%eth0]:80"


class Resolver:
    """An injected `getaddrinfo`: answers (or failures) queued by the test, calls counted."""

    def __init__(self) -> None:
        self.answers: list[list[tuple[Any, ...]] | BaseException | float] = []
        self.calls = 0

    async def __call__(self, host: str, port: int) -> list[tuple[Any, ...]]:
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, float):
            await asyncio.sleep(answer)
            return []
        if isinstance(answer, BaseException):
            raise answer
        return answer


def v4(address: str, port: int = 6081) -> tuple[Any, ...]:
    return (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))


def v6(address: str, port: int = 6081) -> tuple[Any, ...]:
    return (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0))


class Recorded:
    def __init__(self) -> None:
        self.changes = 0
        self.errors: list[str] = []

    def hooks(self) -> SourceHooks:
        def changed() -> None:
            self.changes += 1

        return SourceHooks(changed, lambda spec, kind: self.errors.append(kind), lambda spec, reason: None)


async def test_dns_every_record_and_a_failure_keeps_the_last_set() -> None:
    resolver, seen = Resolver(), Recorded()
    spec = parse_target_spec("dns:varnish:6081")
    source = DnsSource(spec, seen.hooks(), interval=10, timeout=0.2, resolver=resolver)
    resolver.answers = [[v4("10.0.0.8"), v4("10.0.0.7"), v6("fd00::7"), v4("10.0.0.7")]]
    await source.resolve_once()
    assert source.current() == ("10.0.0.7:6081", "10.0.0.8:6081", "[fd00::7]:6081")
    assert seen.changes == 1
    failures: list[list[tuple[Any, ...]] | BaseException | float] = [
        socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
        [],
        1.0,
    ]
    for failure in failures:
        resolver.answers = [failure]
        await source.resolve_once()
        assert source.current() == ("10.0.0.7:6081", "10.0.0.8:6081", "[fd00::7]:6081")
    assert seen.errors == ["resolve", "resolve", "timeout"]
    assert "no answer within 0.2 s" in source.status()["last_error"]
    resolver.answers = [[v4("10.0.0.9")]]
    await source.resolve_once()
    assert source.current() == ("10.0.0.9:6081",) and seen.changes == 2
    assert source.status()["last_error"] is None
    await source.resolve_once()  # the same answer: no change reported
    assert seen.changes == 2


async def test_dns_is_re_resolved_every_interval() -> None:
    resolver, sets = Resolver(), []
    last = asyncio.Event()

    def changed() -> None:
        sets.append(source.current())
        if source.current() == ("10.0.0.2:6081",):
            last.set()

    hooks = SourceHooks(changed, lambda spec, kind: None, lambda spec, reason: None)
    source = DnsSource(
        parse_target_spec("dns:varnish:6081"), hooks, interval=0.05, timeout=1, resolver=resolver
    )
    resolver.answers = [[v4("10.0.0.1")], [v4("10.0.0.1"), v4("10.0.0.2")], [v4("10.0.0.2")]]
    await source.start()
    try:
        async with asyncio.timeout(2):
            await last.wait()
    finally:
        await source.stop()
    assert sets == [("10.0.0.1:6081",), ("10.0.0.1:6081", "10.0.0.2:6081"), ("10.0.0.2:6081",)]
    assert resolver.calls >= 3


async def test_dns_with_the_loops_own_resolver() -> None:
    source = DnsSource(parse_target_spec("dns:localhost:6081"), Recorded().hooks(), interval=10, timeout=2)
    await source.resolve_once()
    assert "127.0.0.1:6081" in source.current()


def test_which_endpoints_are_targets() -> None:
    assert is_target(endpoint("10.0.0.1"))
    assert is_target({"addresses": ["10.0.0.1"]})  # no conditions: ready, as the API says
    assert is_target(endpoint("10.0.0.1", ready=None))
    assert not is_target(endpoint("10.0.0.1", ready=False))  # starting, failing its probe
    assert is_target(endpoint("10.0.0.1", ready=False, serving=True, terminating=True))  # still holds a cache
    assert not is_target(endpoint("10.0.0.1", ready=False, serving=False, terminating=True))
    ports = [{"name": "http", "port": 6081, "protocol": "TCP"}, {"name": "admin", "port": 6082}]
    obj = {
        "addressType": "IPv4",
        "endpoints": [endpoint("10.0.0.1"), endpoint("10.0.0.2", ready=False), endpoint("10.0.0.3")],
        "ports": ports,
    }
    assert slice_targets(obj, "http") == ("10.0.0.1:6081", "10.0.0.3:6081")
    assert slice_targets(obj, 9000) == ("10.0.0.1:9000", "10.0.0.3:9000")
    assert slice_targets(obj, "metrics") == ()
    assert slice_targets({**obj, "addressType": "IPv6", "endpoints": [endpoint("fd00::1")]}, "http") == (
        "[fd00::1]:6081",
    )
    assert slice_targets({**obj, "addressType": "FQDN"}, "http") == ()
    assert slice_targets({"addressType": "IPv4", "endpoints": None, "ports": None}, 80) == ()


class Fixed:
    def __init__(self, text: str, targets: tuple[str, ...]) -> None:
        self.spec = TargetSpec("dns", text)
        self.targets = targets

    def current(self) -> tuple[str, ...]:
        return self.targets

    def status(self) -> dict[str, Any]:
        return {"last_error": None}

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


def test_the_set_is_the_union_and_says_who_named_what() -> None:
    targets = TargetSet()
    seen: list[tuple[str, ...]] = []
    targets.on_change(seen.append)
    targets.add(StaticSource(parse_target_spec("10.0.0.1:80")))
    dns = Fixed("dns:a:80", ("10.0.0.2:80", "10.0.0.1:80"))
    targets.add(dns)
    assert targets.current() == ("10.0.0.1:80", "10.0.0.2:80")
    doc = targets.describe()
    assert doc["targets"] == [
        {"target": "10.0.0.1:80", "sources": ["10.0.0.1:80", "dns:a:80"]},
        {"target": "10.0.0.2:80", "sources": ["dns:a:80"]},
    ]
    assert [s["source"] for s in doc["sources"]] == ["10.0.0.1:80", "dns:a:80"]
    dns.targets = ("10.0.0.1:80",)
    targets.changed()
    targets.changed()  # nothing new: no second callback
    assert targets.current() == ("10.0.0.1:80",) and seen == [("10.0.0.1:80",)]


def test_departures_keep_then_expire() -> None:
    departures = Departures(keep=0.2)
    departures.update(["a:1", "b:1"])
    departures.update(["a:1"])
    assert departures.away() == ["b:1"] and not departures.expired("b:1")
    departures.update(["a:1", "b:1"])  # came back in time
    assert departures.away() == []
    departures.update(["a:1"])
    departures.seen_away("c:1")  # pending entries of one never seen in the set
    time.sleep(0.25)
    assert departures.away() == [] and departures.expired("b:1") and departures.expired("c:1")
    assert not departures.expired("a:1")


def test_departures_are_forgotten_once_nothing_is_pending_whatever_the_churn() -> None:
    forgotten: list[str] = []
    departures = Departures(keep=0.1, forgotten=forgotten.append)
    for i in range(100):
        departures.update([f"t{i}:1"])  # each pod replaced by the next
    time.sleep(0.15)
    departures.prune(["t5:1"])  # t5 still has purges pending: kept until they expire
    assert departures.away() == [] and departures.expired("t5:1") and forgotten == []
    time.sleep(0.15)
    departures.prune(["t5:1"])
    assert len(forgotten) == 98 and "t5:1" not in forgotten and departures.remembered() == 1
    departures.forget("t5:1")  # its entries expired and were dropped
    time.sleep(0.15)
    departures.prune([])
    assert forgotten[-1] == "t5:1" and departures.remembered() == 0
