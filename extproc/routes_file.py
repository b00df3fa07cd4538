"""`--routes-file`: one YAML file for what the request path decides by route and by model.

    scopes:                      # auth: a path prefix (and optionally methods) needs a scope
      - path: /v1/embeddings
        methods: [POST]          # optional; absent: every method
        scope: embeddings
      - path: /v1/
        scope: llm
    models:                      # model-router
      aliases: {fast: gpt-4o-mini}   # optional: the body's `model` is rewritten (ext_proc only)
      allow: [gpt-4o-mini, gpt-4o]   # optional: any other model -> 404 model_not_found

Scope rules: the longest matching prefix wins; at the same prefix a rule naming the method wins over
one without methods (the same prefix and method in two rules is refused: the file's order would
decide). A prefix matches whole path segments (`/v1/embeddings` matches `/v1/embeddings`
and `/v1/embeddings/x`, not `/v1/embeddingsx`); a prefix ending in `/` matches everything under it.
The query string is not part of the path. A path no rule matches needs no scope (a valid credential
is enough). The rendered Envoy normalises paths (`normalize_path`, `merge_slashes`) before meshkit
sees them, so `/v1/../admin` cannot dodge a rule.

Upstreams do not all read a request the same way, so `required_scopes()` asks for the scope of every
reading one might give it, not only the literal one: the method upper-cased (Envoy passes an HTTP/2
`:method: post` on as it is, and Werkzeug/Flask serve it as POST), the path with `;parameters` removed
from every segment (Tomcat and Spring serve `/v1/embeddings;x` as `/v1/embeddings`), and the path and
the prefixes compared without case (ASP.NET Core routes `/V1/EMBEDDINGS` to `/v1/embeddings`). A
request needs every scope those readings name: never less than the literal reading alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from meshkit.errors import ConfigError
from meshkit.options import option

__all__ = ["MODEL_NAME", "ModelRules", "Routes", "RoutesOptions", "ScopeRule", "load_routes"]

# What a model name may be (it goes into the x-model header and Envoy's route matching).
MODEL_NAME = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
_SCOPE = re.compile(r"[!#-\[\]-~]+")  # a scope token (RFC 6749 3.3): printable, no space, quote or \
_METHOD = re.compile(r"[A-Z]+")


@dataclass(frozen=True)
class RoutesOptions:
    routes_file: str = option(
        "",
        "YAML file with scope rules (auth) and model aliases / allow-list (model-router); empty: none",
        metavar="FILE",
    )


@dataclass(frozen=True, slots=True)
class ScopeRule:
    prefix: str
    scope: str
    methods: frozenset[str] = frozenset()  # empty: every method

    def matches(self, method: str, path: str) -> bool:
        if self.methods and method not in self.methods:
            return False
        if path == self.prefix or self.prefix.endswith("/"):
            return path.startswith(self.prefix)
        return path.startswith(self.prefix) and path[len(self.prefix)] == "/"


@dataclass(frozen=True)
class ModelRules:
    aliases: dict[str, str] = field(default_factory=dict)
    allow: frozenset[str] | None = None  # None: every (valid) model name


@dataclass(frozen=True)
class Routes:
    scopes: tuple[ScopeRule, ...] = ()  # most specific first
    models: ModelRules = field(default_factory=ModelRules)

    def required_scope(self, method: str, path: str) -> str | None:
        """The scope the literal reading of a request needs (the method and path exactly as sent), or
        None when no rule covers it. What the auth filter enforces is `required_scopes()`."""
        return _first(self.scopes, method, path.split("?", 1)[0])

    def required_scopes(self, method: str, path: str) -> tuple[str, ...]:
        """Every scope a request needs: the scope of each reading an upstream may give it (the method
        as sent and upper-cased, and HEAD also as GET; the path as sent and without `;parameters`;
        prefixes compared with and without case), in that order, without repeats. Empty when no rule
        covers any reading."""
        if not self.scopes:
            return ()
        path = path.split("?", 1)[0]
        methods = (method,) if method.isupper() or not method else (method, method.upper())
        if method.upper() == "HEAD":  # frameworks answer HEAD with the GET handler: a GET rule holds too
            methods = (*methods, "GET")
        paths = (path, _PARAMS.sub("", path)) if ";" in path else (path,)
        folded = self._folded if self._prefixes_have_case or path != path.lower() else ()
        found: list[str] = []
        for m in methods:
            for p in paths:
                for rules, candidate in ((self.scopes, p), (folded, p.lower())):
                    scope = _first(rules, m, candidate) if rules else None
                    if scope is not None and scope not in found:
                        found.append(scope)
        return tuple(found)

    @cached_property
    def _prefixes_have_case(self) -> bool:
        return any(r.prefix != r.prefix.lower() for r in self.scopes)

    @cached_property
    def _folded(self) -> tuple[ScopeRule, ...]:
        """The rules with lower-cased prefixes, most specific first (for the case-blind reading)."""
        return _ordered(ScopeRule(r.prefix.lower(), r.scope, r.methods) for r in self.scopes)


_PARAMS = re.compile(r";[^/]*")  # a path segment's `;parameters` (RFC 3986 3.3), as Tomcat strips them


def _first(rules: tuple[ScopeRule, ...], method: str, path: str) -> str | None:
    for rule in rules:
        if rule.matches(method, path):
            return rule.scope
    return None


def _ordered(rules: Iterable[ScopeRule]) -> tuple[ScopeRule, ...]:
    """Most specific first: the longest prefix, then method-specific before method-less."""
    return tuple(sorted(rules, key=lambda r: (-len(r.prefix), not r.methods)))


def load_routes(path: str) -> Routes:
    """The routes file at `path` (empty: no rules); every problem in it is one ConfigError."""
    if not path:
        return Routes()
    where = f"routes file {path}"
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"{where}: cannot read it: {exc.strerror or exc}"]) from None
    except UnicodeError:
        raise ConfigError([f"{where}: not UTF-8 text"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{where}: not valid YAML: {exc}"]) from None
    if doc is None:
        return Routes()
    problems: list[str] = []
    if not isinstance(doc, dict):
        raise ConfigError([f"{where}: expected a mapping with `scopes` and/or `models`"])
    for key in doc:
        if key not in ("scopes", "models"):
            problems.append(f"{where}: unknown key {key!r} (allowed: scopes, models)")
    scopes = _scope_rules(doc.get("scopes") or [], where, problems)
    models = _model_rules(doc.get("models") or {}, where, problems)
    if problems:
        raise ConfigError(problems)
    return Routes(scopes=scopes, models=models)


def _scope_rules(raw: Any, where: str, problems: list[str]) -> tuple[ScopeRule, ...]:
    if not isinstance(raw, list):
        problems.append(f"{where}: scopes: expected a list of {{path, scope, methods}}")
        return ()
    rules: list[ScopeRule] = []
    first: dict[tuple[str, str], int] = {}  # (prefix, method or "") -> the rule that names it first
    for i, item in enumerate(raw):
        at = f"{where}: scopes[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{at}: expected a mapping with path and scope")
            continue
        unknown = set(item) - {"path", "scope", "methods"}
        if unknown:
            problems.append(f"{at}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
        prefix, scope, methods = item.get("path"), item.get("scope"), item.get("methods") or []
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            problems.append(f"{at}: path must be a path prefix starting with /")
            continue
        if not isinstance(scope, str) or not _SCOPE.fullmatch(scope):
            problems.append(f"{at}: scope must be one scope token (no spaces)")
            continue
        if not isinstance(methods, list) or not all(
            isinstance(m, str) and _METHOD.fullmatch(m.upper()) for m in methods
        ):
            problems.append(f"{at}: methods must be a list of HTTP methods")
            continue
        rule = ScopeRule(prefix, scope, frozenset(m.upper() for m in methods))
        # The same prefix and method twice would leave the file's order to decide, silently.
        taken = [(m, first[(prefix, m)]) for m in sorted(rule.methods or {""}) if (prefix, m) in first]
        if taken:
            method, j = taken[0]
            problems.append(
                f"{at}: {f'{method} ' if method else ''}{prefix} is already covered by scopes[{j}]"
            )
            continue
        first.update(((prefix, m), i) for m in rule.methods or {""})
        rules.append(rule)
    return _ordered(rules)


def _model_rules(raw: Any, where: str, problems: list[str]) -> ModelRules:
    if not isinstance(raw, dict):
        problems.append(f"{where}: models: expected a mapping with aliases and/or allow")
        return ModelRules()
    unknown = set(raw) - {"aliases", "allow"}
    if unknown:
        problems.append(f"{where}: models: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    aliases_raw = raw.get("aliases") or {}
    aliases: dict[str, str] = {}
    if not isinstance(aliases_raw, dict):
        problems.append(f"{where}: models.aliases: expected a mapping alias -> model")
    else:
        for alias, target in aliases_raw.items():
            if not (isinstance(alias, str) and MODEL_NAME.fullmatch(alias)) or not (
                isinstance(target, str) and MODEL_NAME.fullmatch(target)
            ):
                problems.append(
                    f"{where}: models.aliases: {alias!r} -> {target!r}: names must match {MODEL_NAME.pattern}"
                )
                continue
            aliases[alias] = target
    allow_raw = raw.get("allow")
    allow: frozenset[str] | None = None
    if allow_raw is not None:
        if not isinstance(allow_raw, list) or not all(
            isinstance(m, str) and MODEL_NAME.fullmatch(m) for m in allow_raw
        ):
            problems.append(f"{where}: models.allow: expected a list of model names ({MODEL_NAME.pattern})")
        else:
            allow = frozenset(allow_raw)
            missing = sorted(t for t in aliases.values() if t not in allow)
            if missing:
                problems.append(f"{where}: models.aliases point at models not in allow: {', '.join(missing)}")
    return ModelRules(aliases=aliases, allow=allow)
