"""Prometheus metrics of the ext_proc/ext_authz server.

    meshkit_extproc_requests_total{api, outcome}          one per HTTP request: continue | reply | error
    meshkit_extproc_filter_decisions_total{filter, decision, status}   per filter: continue | reply
    meshkit_extproc_phase_seconds{api, phase}             time our server spent on one phase
    meshkit_extproc_errors_total{kind}                    protocol faults, filter exceptions
    meshkit_extproc_streams_in_flight                     open ext_proc streams / Check calls

Label children are resolved once and cached, so the request path does no label lookups.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Our server answers a phase in tens of microseconds; Envoy's message_timeout is about 0.2-1 s.
_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self, filter_names: Sequence[str], registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._requests = Counter(
            "meshkit_extproc_requests_total", "HTTP requests processed", ["api", "outcome"], registry=r
        )
        self._decisions = Counter(
            "meshkit_extproc_filter_decisions_total",
            "Decisions per filter",
            ["filter", "decision", "status"],
            registry=r,
        )
        self._phase = Histogram(
            "meshkit_extproc_phase_seconds",
            "Server time per request phase",
            ["api", "phase"],
            buckets=_BUCKETS,
            registry=r,
        )
        self._errors = Counter(
            "meshkit_extproc_errors_total", "Protocol faults and filter failures", ["kind"], registry=r
        )
        self.in_flight = Gauge(
            "meshkit_extproc_streams_in_flight", "Open ext_proc streams and Check calls", registry=r
        )
        self._cache: dict[tuple[str, ...], object] = {}
        for name in filter_names:  # so every filter shows up at 0 before its first request
            self._decisions.labels(name, "continue", "")

    def request(self, api: str, outcome: str) -> None:
        key = ("req", api, outcome)
        child = self._cache.get(key)
        if child is None:
            child = self._cache[key] = self._requests.labels(api, outcome)
        child.inc()  # type: ignore[attr-defined]

    def replied(self, source: str, status: int) -> None:
        self._decisions.labels(source, "reply", str(status)).inc()

    def passed(self, filter_name: str) -> None:
        key = ("pass", filter_name)
        child = self._cache.get(key)
        if child is None:
            child = self._cache[key] = self._decisions.labels(filter_name, "continue", "")
        child.inc()  # type: ignore[attr-defined]

    def phase_seconds(self, api: str, phase: str) -> Histogram:
        key = ("phase", api, phase)
        child = self._cache.get(key)
        if child is None:
            child = self._cache[key] = self._phase.labels(api, phase)
        return child  # type: ignore[return-value]

    def error(self, kind: str) -> None:
        self._errors.labels(kind).inc()
