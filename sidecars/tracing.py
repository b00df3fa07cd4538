"""Optional OpenTelemetry traces for the sidecars: OTLP/HTTP when configured, nothing at all otherwise.

`tracing(endpoint)` answers a `Tracing`:
- no endpoint given and neither `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` nor `OTEL_EXPORTER_OTLP_ENDPOINT`
  set: `NO_TRACING`, whose spans are one shared do-nothing object. opentelemetry is not imported (zero
  cost, and the `otel` extra is not needed);
- `--otel-endpoint URL` (the collector's base URL, as `OTEL_EXPORTER_OTLP_ENDPOINT` is: `/v1/traces` is
  appended unless the URL already ends with it), else the standard variables as the exporter reads
  them: an OTLP/HTTP protobuf exporter (`opentelemetry-exporter-otlp-proto-http`, the `otel` extra)
  behind a `BatchSpanProcessor` (its queue is bounded, 2048 spans; a full queue drops spans, never
  blocks a request), an export timeout of 5 s, `service.name` from `OTEL_SERVICE_NAME` or the
  daemon's name. The provider is the daemon's own, not the global one.

`span(name, kind=, headers=)` is a context manager over a span that is current inside it (children
nest through contextvars, across awaits); `headers` (the incoming request's) continue a W3C
`traceparent` the caller sent. `inject(headers)` adds `traceparent` for an outgoing call, so the
provider's own spans join the trace. `close()` flushes what is queued (bounded by the export timeout).
An endpoint without the extra installed is refused with one line naming `meshkit[otel]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any, Protocol

EXPORT_TIMEOUT = 5.0  # seconds one OTLP export may take
TRACES_PATH = "/v1/traces"
AttributeValue = str | int | float | bool


class Span(Protocol):
    def set_attribute(self, key: str, value: AttributeValue) -> Any: ...


class Tracing(Protocol):
    def span(
        self, name: str, *, kind: str = "internal", headers: Mapping[str, str] | None = None
    ) -> contextlib.AbstractContextManager[Span]: ...

    def inject(self, headers: MutableMapping[str, str]) -> None: ...

    async def close(self) -> None: ...


class _NullSpan:
    def set_attribute(self, key: str, value: AttributeValue) -> None:
        return None


class _NoTracing:
    """Tracing off: one shared span that records nothing; no opentelemetry import."""

    _span = _NullSpan()

    @contextlib.contextmanager
    def span(
        self, name: str, *, kind: str = "internal", headers: Mapping[str, str] | None = None
    ) -> Iterator[Span]:
        yield self._span

    def inject(self, headers: MutableMapping[str, str]) -> None:
        return None

    async def close(self) -> None:
        return None


NO_TRACING: Tracing = _NoTracing()


def otel_configured(endpoint: str) -> bool:
    env = os.environ
    return bool(
        endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def otel_missing() -> str | None:
    """One line naming the extra when the OTLP exporter cannot be imported, else None."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return "OpenTelemetry traces need the otel extra: pip install 'meshkit[otel]'"
    return None


def tracing(endpoint: str, service: str) -> Tracing:
    """`NO_TRACING` unless an endpoint is configured (see the module docstring)."""
    if not otel_configured(endpoint):
        return NO_TRACING
    return _OtelTracing(endpoint, service)


class _OtelTracing:
    def __init__(self, endpoint: str, service: str) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        if endpoint:
            url = endpoint.rstrip("/")
            exporter = OTLPSpanExporter(
                endpoint=url if url.endswith(TRACES_PATH) else url + TRACES_PATH, timeout=EXPORT_TIMEOUT
            )
        else:
            exporter = OTLPSpanExporter(timeout=EXPORT_TIMEOUT)
        name = os.environ.get("OTEL_SERVICE_NAME") or service
        self._provider = TracerProvider(resource=Resource.create({"service.name": name}))
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("meshkit.sidecars")
        self._propagator = TraceContextTextMapPropagator()
        self._kinds = {
            "internal": SpanKind.INTERNAL,
            "server": SpanKind.SERVER,
            "client": SpanKind.CLIENT,
        }

    @contextlib.contextmanager
    def span(
        self, name: str, *, kind: str = "internal", headers: Mapping[str, str] | None = None
    ) -> Iterator[Span]:
        carrier = {k.lower(): v for k, v in headers.items()} if headers is not None else None
        context = self._propagator.extract(carrier) if carrier is not None else None
        with self._tracer.start_as_current_span(name, context=context, kind=self._kinds[kind]) as span:
            yield span

    def inject(self, headers: MutableMapping[str, str]) -> None:
        self._propagator.inject(headers)

    async def close(self) -> None:
        await asyncio.to_thread(self._provider.shutdown)
