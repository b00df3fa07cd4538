"""Tracing is optional: nothing is imported without an endpoint (spans, their nesting and the caller's
traceparent are checked against a real OTLP receiver in tests/integration/test_embedding_cache_s3.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from meshkit.sidecars.tracing import otel_configured


def test_without_an_endpoint_opentelemetry_is_not_imported() -> None:
    code = (
        "import sys\n"
        "from meshkit.sidecars import embedding_cache\n"
        "from meshkit.sidecars.tracing import tracing, NO_TRACING\n"
        "t = tracing('', 'x')\n"
        "assert t is NO_TRACING\n"
        "with t.span('a', kind='server', headers={}) as span:\n"
        "    span.set_attribute('k', 1)\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True, env=env
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_an_endpoint_or_the_standard_variables_turn_it_on(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert not otel_configured("")
    assert otel_configured("http://collector:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert otel_configured("")
