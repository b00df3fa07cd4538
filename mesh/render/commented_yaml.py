"""YAML text with comments, from plain Python values: what `meshkit render` prints for a person to read.

A config is built as plain dicts, lists and scalars; a value wrapped in `Why(value, "reason")` gets the
reason as `# ...` lines above its key (or above its `- ` list item). `to_yaml()` writes the text;
`plain()` drops the reasons, giving the document Envoy (and `yaml.safe_load` of the text) sees.

PyYAML cannot write comments, so this is a small writer of its own: block style for mappings and lists
that hold reasons or do not fit on one line, flow style (`{a: 1, b: [x]}`) for the rest. Strings are
written plain only when they match a conservative pattern that no YAML 1.1 or 1.2 resolver reads as
anything but a string; every other string is JSON-quoted, which is a valid YAML double-quoted scalar.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Why", "plain", "to_yaml"]

WIDTH = 110

# Letters first (so never a number, a date or an indicator), then a restricted set. `:`, `#`, `,` and
# brackets would mean something in flow or block context, so they are not in it.
_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")
# Envoy durations (`30s`, `0.5s`) and IPv4 addresses: no resolver reads them as numbers.
_DURATION = re.compile(r"[0-9]+(\.[0-9]+)?s")
_IPV4 = re.compile(r"[0-9]{1,3}(\.[0-9]{1,3}){3}")
# Words some resolver (YAML 1.1's booleans, null) would not read as strings.
_RESERVED = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null", "nan", "inf"})


@dataclass(frozen=True)
class Why:
    """`value`, with the reason it is what it is (printed as a comment above it)."""

    value: Any
    reason: str


def plain(node: Any) -> Any:
    """`node` without its reasons: plain dicts, lists and scalars."""
    if isinstance(node, Why):
        return plain(node.value)
    if isinstance(node, Mapping):
        return {k: plain(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [plain(v) for v in node]
    return node


def to_yaml(node: Mapping[str, Any], header: str = "") -> str:
    """The YAML text of the mapping `node`, with `header` as comment lines at the top."""
    lines = [*_comment(header, 0)]
    _mapping(node, 0, lines)
    return "\n".join(lines) + "\n"


def scalar(value: Any) -> str:
    """One scalar as YAML: bools and numbers as such, strings plain when that is unambiguous."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, str):
        if _is_plain(value):
            return value
        return json.dumps(value, ensure_ascii=False)
    raise TypeError(f"not a YAML scalar: {value!r}")


def _float(value: float) -> str:
    """A float both YAML 1.1 and 1.2 read back: a dot in the mantissa, a signed exponent (`1.0e-07`)."""
    if not math.isfinite(value):
        raise TypeError(f"not a finite float: {value!r}")
    text = repr(value)
    mantissa, e, exponent = text.partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return mantissa + (e + exponent if e else "")


def _is_plain(text: str) -> bool:
    if text.lower() in _RESERVED:
        return False
    return bool(_PLAIN.fullmatch(text) or _DURATION.fullmatch(text) or _IPV4.fullmatch(text))


def _comment(text: str, indent: int) -> list[str]:
    """`text` as `# ` lines at `indent`, wrapped to the width (its own line breaks kept; a line that
    starts with two spaces is not wrapped)."""
    pad = " " * indent
    width = max(40, WIDTH - indent - 2)
    lines = []
    for paragraph in text.splitlines():
        if paragraph.startswith("  "):  # indented: a command line to copy, kept whole
            lines.append(f"{pad}# {paragraph}")
            continue
        wrapped = textwrap.wrap(paragraph, width, break_long_words=False, break_on_hyphens=False)
        lines += [f"{pad}# {line}" for line in wrapped] or [f"{pad}#"]
    return lines


def _has_reasons(node: Any) -> bool:
    if isinstance(node, Why):
        return True
    if isinstance(node, Mapping):
        return any(_has_reasons(v) for v in node.values())
    if isinstance(node, list | tuple):
        return any(_has_reasons(v) for v in node)
    return False


def flow(node: Any) -> str:
    """`node` on one line: `{key: value, ...}`, `[a, b]` or a scalar."""
    if isinstance(node, Mapping):
        return "{" + ", ".join(f"{scalar(k)}: {flow(v)}" for k, v in node.items()) + "}"
    if isinstance(node, list | tuple):
        return "[" + ", ".join(flow(v) for v in node) + "]"
    return scalar(node)


def _fits(prefix: str, node: Any) -> str | None:
    """`prefix` + the flow form of `node` when it carries no reasons and fits the width, else None."""
    if _has_reasons(node):
        return None
    line = prefix + flow(node)
    return line if len(line) <= WIDTH else None


def _is_collection(node: Any) -> bool:
    return isinstance(node, Mapping | list | tuple)


def _mapping(node: Mapping[str, Any], indent: int, lines: list[str]) -> None:
    for key, raw in node.items():
        value = raw
        if isinstance(value, Why):
            lines += _comment(value.reason, indent)
            value = value.value
        _entry(f"{' ' * indent}{scalar(key)}:", value, indent, lines)


def _entry(prefix: str, value: Any, indent: int, lines: list[str]) -> None:
    """`key:` and its value: inline when it is a scalar or fits, else as a nested block."""
    if not _is_collection(value) or not value:
        lines.append(f"{prefix} {flow(value)}")
        return
    inline = _fits(prefix + " ", value)
    if inline is not None:
        lines.append(inline)
        return
    lines.append(prefix)
    if isinstance(value, Mapping):
        _mapping(value, indent + 2, lines)
    else:
        _sequence(value, indent, lines)  # block lists sit at their key's indent, like Envoy's docs


def _sequence(items: Sequence[Any], indent: int, lines: list[str]) -> None:
    pad = " " * indent
    for raw in items:
        item = raw
        if isinstance(item, Why):
            lines += _comment(item.reason, indent)
            item = item.value
        if not _is_collection(item) or not item:
            lines.append(f"{pad}- {flow(item)}")
            continue
        inline = _fits(f"{pad}- ", item)
        if inline is not None:
            lines.append(inline)
        elif isinstance(item, Mapping):
            _item_mapping(item, indent, lines)
        else:
            lines.append(f"{pad}-")
            _sequence(item, indent + 2, lines)


def _item_mapping(item: Mapping[str, Any], indent: int, lines: list[str]) -> None:
    """A mapping as a list item: its first key on the `- ` line, the others under it."""
    first = True
    for key, raw in item.items():
        value = raw
        if isinstance(value, Why):
            # Above the `- ` line for the first key (a comment cannot sit between `-` and the key).
            lines += _comment(value.reason, indent if first else indent + 2)
            value = value.value
        prefix = f"{' ' * indent}- {scalar(key)}:" if first else f"{' ' * (indent + 2)}{scalar(key)}:"
        _entry(prefix, value, indent + 2, lines)
        first = False
