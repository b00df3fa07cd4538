"""The filters meshkit ships, by name: `--filters` picks from these, in the order given."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from meshkit.extproc.filters.auth import AuthFilter
from meshkit.extproc.filters.body_hash import BodyHashFilter
from meshkit.extproc.filters.model_router import ModelRouterFilter

FILTERS: dict[str, type[Any]] = {cls.name: cls for cls in (AuthFilter, BodyHashFilter, ModelRouterFilter)}


def build(names: Sequence[str], options: Mapping[type[Any], Any]) -> list[Any]:
    """Instantiate the named filters in order, each with its options instance from `options`."""
    out = []
    for name in names:
        cls = FILTERS[name]
        make = getattr(cls, "from_options", None)
        out.append(make(options) if make else cls(options.get(cls.Options) or cls.Options()))
    return out


def option_sections(names: Sequence[str] | None = None) -> list[type[Any]]:
    """The options dataclasses of the named filters (all filters when None), for flags and YAML."""
    sections: list[type[Any]] = []
    for name in names if names is not None else FILTERS:
        for section in (FILTERS[name].Options, *getattr(FILTERS[name], "extra_sections", ())):
            if section not in sections:
                sections.append(section)
    return sections


def option_groups() -> dict[type[Any], str]:
    """Each filter's options may also be grouped under its name in a YAML `--config` section."""
    return {cls.Options: name for name, cls in FILTERS.items()}
