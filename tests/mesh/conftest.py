"""Shared by the rendered-config tests: Envoy's own validation, and walking a rendered document."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from meshkit.harness.envoy import envoy_binary


def validate(config: str, tmp_path: Path, name: str = "envoy.yaml") -> None:
    """`envoy --mode validate` accepts `config` (it rejects unknown fields and bad enums; ~0.1 s)."""
    path = tmp_path / name
    path.write_text(config)
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def hcm(doc: dict[str, Any]) -> dict[str, Any]:
    """The ingress listener's HTTP connection manager config."""
    config: dict[str, Any] = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    return config


def http_filter_names(doc: dict[str, Any]) -> list[str]:
    return [f["name"] for f in hcm(doc)["http_filters"]]


def meshkit_filter(doc: dict[str, Any]) -> dict[str, Any]:
    """The typed_config of the filter that calls meshkit (ext_proc or ext_authz)."""
    (found,) = [
        f["typed_config"]
        for f in hcm(doc)["http_filters"]
        if f["name"] in ("envoy.filters.http.ext_proc", "envoy.filters.http.ext_authz")
    ]
    config: dict[str, Any] = found
    return config


def routes_after_refusals(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The routes to upstreams: every route but Envoy's own answers (the client PURGE refusal first)."""
    found: list[dict[str, Any]] = hcm(doc)["route_config"]["virtual_hosts"][0]["routes"]
    return [r for r in found if "direct_response" not in r]


def route_entry(doc: dict[str, Any]) -> dict[str, Any]:
    (entry,) = routes_after_refusals(doc)
    return entry


def cluster(doc: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == name]
    result: dict[str, Any] = found
    return result


def strings_in(node: Any) -> list[str]:
    """Every string in the document, keys included."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (k, *strings_in(v))]
    if isinstance(node, list):
        return [s for v in node for s in strings_in(v)]
    return [node] if isinstance(node, str) else []


def comment_above(text: str, line: str) -> str:
    """The comment lines right above the first `line` (stripped) of a printed config, joined."""
    lines = text.splitlines()
    at = next(i for i, got in enumerate(lines) if got.strip() == line)
    block: list[str] = []
    for got in reversed(lines[:at]):
        if not got.lstrip().startswith("#"):
            break
        block.insert(0, got.strip().removeprefix("#").strip())
    return " ".join(block)
