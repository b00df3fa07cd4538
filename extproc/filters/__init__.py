"""The filters meshkit ships, by name: `--filters` picks from these, in the order given."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from meshkit.extproc.filter import hooks_of
from meshkit.extproc.filters.body_hash import BodyHashFilter

FILTERS: dict[str, type[Any]] = {cls.name: cls for cls in (BodyHashFilter,)}


def build(names: Sequence[str], options: Mapping[type[Any], Any]) -> list[Any]:
    """Instantiate the named filters in order, each with its options instance from `options`."""
    out = []
    for name in names:
        cls = FILTERS[name]
        out.append(cls(options.get(cls.Options) or cls.Options()))
    return out


def option_sections(names: Sequence[str] | None = None) -> list[type[Any]]:
    """The options dataclasses of the named filters (all filters when None), for flags and YAML."""
    return [FILTERS[n].Options for n in (names if names is not None else FILTERS)]


def option_groups() -> dict[type[Any], str]:
    """Each filter's options may also be grouped under its name in a YAML `--config` section."""
    return {cls.Options: name for name, cls in FILTERS.items()}


def phases_of(names: Sequence[str]) -> frozenset[str]:
    """The phases (`Phase` values) the named filters have hooks for: what Envoy must send us."""
    return frozenset(p.value for name in names for p in hooks_of(FILTERS[name]))


def headers_read_by(names: Sequence[str]) -> frozenset[str]:
    """Request headers the named filters read (`reads_headers`): what ext_authz over HTTP must forward."""
    return frozenset(h for name in names for h in getattr(FILTERS[name], "reads_headers", ()))


def headers_set_by(names: Sequence[str]) -> frozenset[str]:
    """Request headers the named filters set (`sets_headers`): what Envoy may copy from an HTTP 200."""
    return frozenset(h for name in names for h in getattr(FILTERS[name], "sets_headers", ()))
