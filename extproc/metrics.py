"""Prometheus metrics of the ext_proc/ext_authz server.

    meshkit_extproc_requests_total{api, outcome}                  one per HTTP request: continue | reply
    meshkit_extproc_filter_decisions_total{filter, decision, status}   per filter: continue | reply
    meshkit_extproc_phase_seconds{api, phase}                     histogram: our time per request phase
    meshkit_extproc_errors_total{kind}                            protocol faults, filter exceptions
    meshkit_extproc_filter_timeouts_total{filter}                 hooks cancelled at --filter-timeout
    meshkit_extproc_dependency_errors_total{dependency}           DependencyError: 503 (or let through)
    meshkit_extproc_streams_in_flight                             open ext_proc streams / Check calls
    meshkit_extproc_http_connections                              open connections on --http-listen

The request path only adds to plain ints (a few hundred nanoseconds per request, no locks: every
update happens on the server's event loop); `collect()` turns them into metric families when
Prometheus scrapes. prometheus_client's own Counter/Histogram cost about 10 µs per request here, as
much as the rest of our Python code together.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

# Our server answers a phase in tens of microseconds; Envoy's message_timeout is about 0.2-1 s.
BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.1, 0.25, 1.0)


class Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last slot is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*map(str, BUCKETS), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out


class Metrics:
    def __init__(self, filter_names: Sequence[str], registry: CollectorRegistry | None = None) -> None:
        self.requests: dict[tuple[str, str], int] = {}
        self.decisions: dict[tuple[str, str, str], int] = {(name, "continue", ""): 0 for name in filter_names}
        self.phases: dict[tuple[str, str], Histogram] = {}
        self.errors: dict[str, int] = {}
        self.timeouts: dict[str, int] = dict.fromkeys(filter_names, 0)
        self.dependency_errors: dict[str, int] = {}
        self.in_flight = 0
        self.http_connections = 0
        self.registry = registry or CollectorRegistry()
        self.registry.register(self)

    # -- the request path ----------------------------------------------------------------------------
    def request(self, api: str, outcome: str) -> None:
        key = (api, outcome)
        self.requests[key] = self.requests.get(key, 0) + 1

    def passed(self, filter_name: str) -> None:
        key = (filter_name, "continue", "")
        self.decisions[key] = self.decisions.get(key, 0) + 1

    def replied(self, source: str, status: int) -> None:
        key = (source, "reply", str(status))
        self.decisions[key] = self.decisions.get(key, 0) + 1

    def phase(self, api: str, phase: str) -> Histogram:
        """The histogram for one (api, phase); callers keep it and call `observe(seconds)`."""
        key = (api, phase)
        hist = self.phases.get(key)
        if hist is None:
            hist = self.phases[key] = Histogram()
        return hist

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def timeout(self, filter_name: str) -> None:
        self.timeouts[filter_name] = self.timeouts.get(filter_name, 0) + 1

    def dependency_error(self, dependency: str) -> None:
        self.dependency_errors[dependency] = self.dependency_errors.get(dependency, 0) + 1

    # -- the scrape ----------------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "meshkit_extproc_requests", "HTTP requests processed", labels=["api", "outcome"]
        )
        for labels, value in sorted(self.requests.items()):
            requests.add_metric(labels, value)
        decisions = CounterMetricFamily(
            "meshkit_extproc_filter_decisions",
            "Decisions per filter",
            labels=["filter", "decision", "status"],
        )
        for decision, count in sorted(self.decisions.items()):
            decisions.add_metric(decision, count)
        phases = HistogramMetricFamily(
            "meshkit_extproc_phase_seconds", "Server time per request phase", labels=["api", "phase"]
        )
        for labels, hist in sorted(self.phases.items()):
            phases.add_metric(list(labels), hist.cumulative(), hist.sum)
        errors = CounterMetricFamily(
            "meshkit_extproc_errors", "Protocol faults and filter failures", labels=["kind"]
        )
        for kind, count in sorted(self.errors.items()):
            errors.add_metric([kind], count)
        timeouts = CounterMetricFamily(
            "meshkit_extproc_filter_timeouts", "Hooks cancelled at --filter-timeout", labels=["filter"]
        )
        for name, count in sorted(self.timeouts.items()):
            timeouts.add_metric([name], count)
        dependencies = CounterMetricFamily(
            "meshkit_extproc_dependency_errors",
            "Requests a filter could not decide because a server it needs was down",
            labels=["dependency"],
        )
        for dependency, count in sorted(self.dependency_errors.items()):
            dependencies.add_metric([dependency], count)
        yield from (requests, decisions, phases, errors, timeouts, dependencies)
        yield GaugeMetricFamily(
            "meshkit_extproc_streams_in_flight", "Open ext_proc streams and Check calls", value=self.in_flight
        )
        yield GaugeMetricFamily(
            "meshkit_extproc_http_connections",
            "Open connections on the ext_authz HTTP port (--http-listen)",
            value=self.http_connections,
        )
