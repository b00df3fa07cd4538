"""What a filter chain needs from Envoy, read off its filter classes (never restated in a config).

Each `Filter` class declares, as class attributes, what the Envoy in front of it must do (see
`meshkit.extproc.filter.Filter`): the headers it reads and sets, whether a request may pass unprocessed
when meshkit fails (`fail_open`), whether it re-routes (`reroutes`) and which header the upstream is
consistent-hashed on (`hash_header`); its hooks say which phases Envoy must send. `needs_of()` gathers
that for a chain, in chain order, with the names of the filters behind each need, so the rendered config
can say why it is what it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from meshkit.errors import ConfigError
from meshkit.extproc.filter import Phase, hooks_of
from meshkit.extproc.filters import FILTERS

__all__ = ["ChainNeeds", "FilterRef", "filter_classes", "needs_of"]

# A filter by its `--filters` name, or the class itself (a filter of your own, a test's fake).
FilterRef = str | type[Any]


def filter_classes(filters: Sequence[FilterRef]) -> list[type[Any]]:
    """The classes of `filters`; unknown names are one ConfigError naming every one of them."""
    unknown = [f for f in filters if isinstance(f, str) and f not in FILTERS]
    if unknown:
        raise ConfigError(
            [f"filters: unknown filter {n!r}; available: {', '.join(FILTERS)}" for n in unknown]
        )
    return [FILTERS[f] if isinstance(f, str) else f for f in filters]


def _name(kind: type[Any]) -> str:
    return str(getattr(kind, "name", kind.__name__))


@dataclass(frozen=True)
class ChainNeeds:
    """The chain's filter names in order, and what each Envoy-side need comes from."""

    names: tuple[str, ...]
    phases: frozenset[Phase]
    reads_headers: frozenset[str]
    sets_headers: dict[str, tuple[str, ...]]  # header -> the filters that set it
    hash_headers: dict[str, tuple[str, ...]]  # header -> the filters hashing on it, in chain order
    fail_closed: tuple[str, ...]  # filters that do not declare fail_open = True
    reroutes: tuple[str, ...]  # filters that declare reroutes = True
    response_phase: tuple[str, ...]  # filters with a response-phase hook (ext_proc only)
    read_prefixes: frozenset[str] = frozenset()  # header-name prefixes filters read (x-auth-)
    answer_headers: dict[str, tuple[str, ...]] = field(default_factory=dict)  # header -> filters adding it

    @property
    def fail_open(self) -> bool:
        """A request may pass unprocessed when meshkit fails only if every filter says so."""
        return not self.fail_closed

    @property
    def phase_values(self) -> frozenset[str]:
        return frozenset(p.value for p in self.phases)


def needs_of(filters: Sequence[FilterRef]) -> ChainNeeds:
    """Read the Envoy-side needs off the chain's classes (hooks checked by `hooks_of`)."""
    classes = filter_classes(filters)
    phases: set[Phase] = set()
    reads: set[str] = set()
    sets: dict[str, list[str]] = {}
    hashes: dict[str, list[str]] = {}
    fail_closed, reroutes, response_phase = [], [], []
    prefixes: set[str] = set()
    answer: dict[str, list[str]] = {}
    for kind in classes:
        name = _name(kind)
        hooked = set(hooks_of(kind))
        phases |= hooked
        reads |= {h.lower() for h in getattr(kind, "reads_headers", ())}
        for header in sorted(h.lower() for h in getattr(kind, "sets_headers", ())):
            sets.setdefault(header, []).append(name)
        hash_header = getattr(kind, "hash_header", None)
        if hash_header:
            hashes.setdefault(hash_header.lower(), []).append(name)
        if getattr(kind, "fail_open", False) is not True:
            fail_closed.append(name)
        if getattr(kind, "reroutes", False) is True:
            reroutes.append(name)
        if any(p.is_response for p in hooked):
            response_phase.append(name)
        prefixes |= {h.lower() for h in getattr(kind, "reads_header_prefixes", ())}
        for header in sorted(h.lower() for h in getattr(kind, "answer_headers", ())):
            answer.setdefault(header, []).append(name)
    return ChainNeeds(
        names=tuple(_name(k) for k in classes),
        phases=frozenset(phases),
        reads_headers=frozenset(reads),
        sets_headers={h: tuple(v) for h, v in sorted(sets.items())},
        hash_headers={h: tuple(v) for h, v in hashes.items()},
        fail_closed=tuple(fail_closed),
        reroutes=tuple(reroutes),
        response_phase=tuple(response_phase),
        read_prefixes=frozenset(prefixes),
        answer_headers={h: tuple(v) for h, v in sorted(answer.items())},
    )
