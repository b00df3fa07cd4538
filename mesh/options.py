"""Options: declared once as dataclass fields, read from flags > `MESHKIT_*` env > YAML > defaults.

Each component (and each filter) declares a frozen dataclass whose fields use `option(...)`. From that
one declaration come the command-line flags (`max_body_bytes` -> `--max-body-bytes`), the environment
variables (`MESHKIT_EXTPROC_MAX_BODY_BYTES`), the YAML keys (`extproc: {max_body_bytes: ...}`) and the
`--help` text. Every problem is collected and raised together as one `ConfigError`, naming the key,
the bad value and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from meshkit.errors import ConfigError

T = TypeVar("T")
Parser = Callable[[Any], Any]

_UNSET: Any = object()


def option(
    default: Any,
    help: str,
    *,
    choices: Sequence[str] | None = None,
    parse: Parser | None = None,
    metavar: str | None = None,
    secret: bool = False,
    repeat: bool = False,
) -> Any:
    """A dataclass field that is also a flag, an env variable and a YAML key.

    `repeat`: the flag may be given several times (`--redact a --redact b`), and the parser gets the
    list of values (the env variable and YAML give what they hold, as for any option)."""
    meta = {
        "help": help,
        "choices": tuple(choices) if choices else None,
        "parse": parse,
        "metavar": metavar,
        "secret": secret,
        "repeat": repeat,
    }
    return dataclasses.field(default=default, metadata=meta)


# -- value parsers ---------------------------------------------------------------------------------
_SIZE = re.compile(r"^\s*(\d+)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1 << 20,
    "mb": 10**6,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 10**9,
    "gib": 1 << 30,
}


MAX_SIZE = 1 << 30


def parse_size(value: Any) -> int:
    """`8388608`, `8MiB`, `512k` -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ValueError("expected a size in bytes such as 8388608, 8MiB or 512KiB")
        size = int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower() or None]
    if size <= 0:
        raise ValueError("must be a positive size")
    if size > MAX_SIZE:
        raise ValueError(f"must be at most {MAX_SIZE} bytes (1 GiB: Envoy's and gRPC's limits are 32-bit)")
    return size


def parse_host_port(value: Any) -> str:
    """`HOST:PORT` with a numeric port 0-65535 (0: any free port). IPv6 hosts in brackets."""
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT, for example 127.0.0.1:50051")
    return text


def parse_seconds(value: Any) -> float:
    try:
        seconds = float(str(value).removesuffix("s"))
    except ValueError:
        raise ValueError("expected seconds, for example 5 or 0.5") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("expected a finite number of seconds, 0 or more")
    return seconds


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("expected true or false")


def _parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError("expected an integer") from None


def parse_non_negative_int(value: Any) -> int:
    """A whole number, 0 or more (`8`, `"8"`; not `true`, `-1`, `1.5`)."""
    if isinstance(value, bool):
        raise ValueError("expected a whole number, 0 or more")
    try:
        number = int(str(value))
    except ValueError:
        raise ValueError("expected a whole number, 0 or more") from None
    if number < 0:
        raise ValueError("expected a whole number, 0 or more")
    return number


def parse_str_tuple(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    return tuple(str(item).strip() for item in items if str(item).strip())


def _parser_for(f: dataclasses.Field[Any], hint: Any) -> Parser:
    custom = f.metadata.get("parse")
    if custom is not None:
        return typing.cast(Parser, custom)
    origin = typing.get_origin(hint)
    if hint is bool:
        return _parse_bool
    if hint is int:
        return _parse_int
    if hint is float:
        return parse_seconds
    if origin is tuple:
        return parse_str_tuple
    if origin in (types.UnionType, typing.Union):  # `str | None`
        return lambda v: None if v in (None, "") else str(v)
    return lambda v: str(v)


# -- reading ---------------------------------------------------------------------------------------
def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def env_name(command: str, field_name: str) -> str:
    return f"MESHKIT_{command.upper().replace('-', '_')}_{field_name.upper()}"


def fields_of(sections: Sequence[type[Any]]) -> list[tuple[type[Any], dataclasses.Field[Any], Any]]:
    out: list[tuple[type[Any], dataclasses.Field[Any], Any]] = []
    for section in sections:
        hints = typing.get_type_hints(section)
        out.extend((section, f, hints[f.name]) for f in dataclasses.fields(section))
    return out


# Names the CLI itself uses (`--config`, `--help`, `--version`, the subcommand's dest): an option with
# one of them would be a conflicting argparse flag (a traceback) or overwrite the command name.
RESERVED = frozenset({"config", "help", "version", "command"})


def clashes(sections: Sequence[type[Any]]) -> list[str]:
    """Option names declared by more than one section (flags are flat: `--jwt-secret-file`, not
    `--auth-jwt-secret-file`), or taken by the CLI itself: a unit test over every daemon's sections
    keeps this empty."""
    seen: dict[str, type[Any]] = {}
    out = []
    for section, f, _ in fields_of(sections):
        if f.name in RESERVED:
            out.append(f"option {f.name!r} of {section.__name__} is reserved by the CLI (--{f.name})")
        if f.name in seen:
            out.append(f"option {f.name!r} declared by both {seen[f.name].__name__} and {section.__name__}")
        seen.setdefault(f.name, section)
    return out


class _Repeated(argparse.Action):
    """Collects every value of a repeatable flag into a list (the flag's default stays "not given")."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest, _UNSET)
        setattr(namespace, self.dest, [*([] if current is _UNSET else current), values])


def add_flags(parser: argparse.ArgumentParser, sections: Sequence[type[Any]]) -> None:
    """One flag per field; flags default to "not given" so env and YAML can fill in."""
    if problems := clashes(sections):
        raise RuntimeError("; ".join(problems))  # a programming error, caught by tests/unit/test_cli.py
    for _, f, hint in fields_of(sections):
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = ",".join(default) if isinstance(default, tuple) else default
        help_text = f"{f.metadata.get('help', '')} (default: {shown})"
        if hint is bool:
            parser.add_argument(
                flag_name(f.name),
                dest=f.name,
                default=_UNSET,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
        else:
            # choices are checked in resolve(), so every bad value is reported together
            choices = f.metadata.get("choices")
            metavar = (
                "{" + ",".join(choices) + "}" if choices else f.metadata.get("metavar") or f.name.upper()
            )
            if f.metadata.get("repeat"):
                parser.add_argument(
                    flag_name(f.name),
                    dest=f.name,
                    default=_UNSET,
                    action=_Repeated,
                    help=f"{help_text}; repeat the flag for several",
                    metavar=metavar,
                )
                continue
            parser.add_argument(
                flag_name(f.name), dest=f.name, default=_UNSET, help=help_text, metavar=metavar
            )


def load_yaml_section(path: Path | None, command: str) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError([f"--config {path}: cannot read: {exc.strerror}"]) from None
    except UnicodeError:
        raise ConfigError([f"--config {path}: not UTF-8 text"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"--config {path}: not valid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"--config {path}: expected a mapping with a {command!r} section"])
    section = data.get(command, {})
    if not isinstance(section, dict):
        raise ConfigError([f"--config {path}: {command!r} must be a mapping of option: value"])
    return section


def _grouped(
    config: dict[str, Any], groups: Mapping[type[Any], str], command: str, problems: list[str]
) -> dict[type[Any], dict[str, Any]]:
    """Take the `group: {option: value}` mappings out of `config`: options a section may nest under its
    group's name (a filter's name) in YAML. Unknown keys inside a group are reported."""
    out: dict[type[Any], dict[str, Any]] = {}
    for section, group in groups.items():
        given: dict[str, str] = {}  # option -> the group key it came under (`body-hash` or `body_hash`)
        for key in dict.fromkeys((group, group.replace("-", "_"))):
            if key not in config:
                continue
            nested = config.pop(key)
            if not isinstance(nested, dict):
                problems.append(f"{command}.{key} in --config: must be a mapping of option: value")
                continue
            names = {f.name for f in dataclasses.fields(section)}
            for name, value in nested.items():
                if name not in names:
                    problems.append(
                        f"{command}.{key}.{name} in --config: unknown option of {group} "
                        f"(known: {', '.join(sorted(names)) or 'none'})"
                    )
                    continue
                first = f"{given[name]}.{name}" if name in given else name if name in config else None
                if first is not None:
                    problems.append(f"{command}.{first} and {command}.{key}.{name} in --config: given twice")
                    continue
                given[name] = key
                out.setdefault(section, {})[name] = value
    return out


def resolve(
    sections: Sequence[type[Any]],
    *,
    command: str,
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config: Mapping[str, Any] | None = None,
    groups: Mapping[type[Any], str] | None = None,
) -> dict[type[Any], Any]:
    """Build one instance per section from flags > env > YAML > defaults; raise every problem at once.

    In YAML an option is a key of the command's section, or of a mapping named after its section's
    group (`extproc: {body-hash: {canonical_json: true}}`)."""
    flags = flags or {}
    env = os.environ if env is None else env
    config = dict(config or {})
    problems: list[str] = []
    grouped = _grouped(config, {s: g for s, g in (groups or {}).items() if s in sections}, command, problems)
    values: dict[type[Any], dict[str, Any]] = {s: {} for s in sections}
    known = set()
    for section, f, hint in fields_of(sections):
        known.add(f.name)
        raw, where = _UNSET, ""
        nested = grouped.get(section, {})
        if flags.get(f.name, _UNSET) is not _UNSET:
            raw, where = flags[f.name], flag_name(f.name)
        elif env_name(command, f.name) in env:
            raw, where = env[env_name(command, f.name)], env_name(command, f.name)
        elif f.name in nested:
            raw, where = nested[f.name], f"{command}.{(groups or {})[section]}.{f.name} in --config"
        elif f.name in config:
            raw, where = config[f.name], f"{command}.{f.name} in --config"
        if raw is _UNSET:
            continue
        try:
            value = _parser_for(f, hint)(raw)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ValueError(f"allowed: {', '.join(choices)}")
        except ValueError as exc:
            shown = "***" if f.metadata.get("secret") else repr(raw)
            problems.append(f"{where}: {shown} is not valid: {exc}")
            continue
        values[section][f.name] = value
    for key in sorted(map(str, config)):
        if key in known:
            continue
        problems.append(f"{command}.{key} in --config: unknown option (known: {', '.join(sorted(known))})")
    prefix = env_name(command, "")
    names = {env_name(command, n) for n in known}
    problems.extend(
        f"{key}: unknown environment option"
        for key in sorted(env)
        if key.startswith(prefix) and key not in names
    )
    instances: dict[type[Any], Any] = {}
    for section in sections:
        try:
            instances[section] = section(**values[section])
        except ValueError as exc:  # cross-field checks in __post_init__
            problems.append(str(exc))
    if problems:
        raise ConfigError(problems)
    return instances


def describe(instance: Any) -> dict[str, Any]:
    """The options as a dict for the start-up log line; secrets masked."""
    out = {}
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        out[f.name] = "***" if f.metadata.get("secret") and value else value
    return out
