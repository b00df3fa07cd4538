"""`--routes-file`: scope rule matching (whole segments, trailing slash, methods, most specific first,
query ignored), every validation problem reported at once, and the models section (aliases, allow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from meshkit.errors import ConfigError
from meshkit.extproc.routes_file import ModelRules, Routes, ScopeRule, load_routes


def routes_from(tmp_path: Path, doc: Any) -> Routes:
    path = tmp_path / "routes.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return load_routes(str(path))


def problems_of(tmp_path: Path, doc: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        routes_from(tmp_path, doc)
    return list(info.value.problems)


RULES = {
    "scopes": [
        {"path": "/v1/", "scope": "llm"},
        {"path": "/v1/embeddings", "methods": ["post"], "scope": "embeddings"},
        {"path": "/v1/embeddings", "scope": "embeddings-read"},
        {"path": "/v1/embeddings/batch", "scope": "batch"},
        {"path": "/admin", "methods": ["GET", "DELETE"], "scope": "admin"},
    ]
}


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("POST", "/v1/embeddings", "embeddings"),  # method-specific wins at the same prefix
        ("GET", "/v1/embeddings", "embeddings-read"),
        ("POST", "/v1/embeddings/x", "embeddings"),  # a whole segment below the prefix
        ("POST", "/v1/embeddingsx", "llm"),  # not a segment boundary: the /v1/ rule
        ("POST", "/v1/embeddings?model=a", "embeddings"),  # the query string is not the path
        ("POST", "/v1/embeddingsx?x=/v1/embeddings", "llm"),
        ("POST", "/v1/embeddings/batch", "batch"),  # the longest prefix first
        ("POST", "/v1/embeddings/batch/7", "batch"),
        ("POST", "/v1/embeddings/batchy", "embeddings"),
        ("GET", "/v1/chat/completions", "llm"),  # a trailing slash: everything under it
        ("GET", "/v1/", "llm"),
        ("GET", "/v1", None),  # not under /v1/
        ("GET", "/v10/x", None),
        ("GET", "/admin", "admin"),
        ("DELETE", "/admin/users/1", "admin"),
        ("POST", "/admin", None),  # the only /admin rule names other methods
        ("GET", "/administrator", None),
        ("GET", "/", None),
        ("GET", "", None),
    ],
)
def test_scope_rule_matching(tmp_path: Path, method: str, path: str, scope: str | None) -> None:
    assert routes_from(tmp_path, RULES).required_scope(method, path) == scope


def test_rules_are_ordered_most_specific_first(tmp_path: Path) -> None:
    rules = routes_from(tmp_path, RULES).scopes
    assert [(r.prefix, bool(r.methods)) for r in rules] == [
        ("/v1/embeddings/batch", False),
        ("/v1/embeddings", True),
        ("/v1/embeddings", False),
        ("/admin", True),
        ("/v1/", False),
    ]
    assert rules[1] == ScopeRule("/v1/embeddings", "embeddings", frozenset({"POST"}))  # upper-cased


def test_a_root_rule_covers_every_path() -> None:
    routes = Routes(scopes=(ScopeRule("/", "any"),))
    assert routes.required_scope("GET", "/x/y") == "any"
    assert routes.required_scope("GET", "/") == "any"


@pytest.mark.parametrize("text", ["", "# only a comment\n", "scopes:\nmodels:\n"])
def test_empty_files_and_no_file(tmp_path: Path, text: str) -> None:
    assert routes_from(tmp_path, text) == Routes()
    assert load_routes("") == Routes()


def test_models_section(tmp_path: Path) -> None:
    doc = {"models": {"aliases": {"fast": "gpt-4o-mini"}, "allow": ["gpt-4o-mini", "gpt-4o"]}}
    assert routes_from(tmp_path, doc).models == ModelRules(
        aliases={"fast": "gpt-4o-mini"}, allow=frozenset({"gpt-4o-mini", "gpt-4o"})
    )
    assert routes_from(tmp_path, {"models": {"aliases": {"a": "org/model:v1.2"}}}).models.allow is None


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    doc = {
        "scope": [],
        "scopes": [
            "not-a-mapping",
            {"path": "v1/no-slash", "scope": "a"},
            {"path": 3, "scope": "a"},
            {"path": "/a", "scope": "two words"},
            {"path": "/a", "scope": ""},
            {"path": "/a", "scope": None},
            {"path": "/a", "scope": "a", "methods": "POST"},
            {"path": "/a", "scope": "a", "methods": ["PO ST"]},
            {"path": "/a", "scope": "a", "methods": [1]},
            {"path": "/a", "scope": "a", "method": ["POST"]},
        ],
        "models": {
            "alias": {},
            "aliases": {"fast": "bad name!", "sp ace": "gpt-4o", "ok": "gpt-4o"},
            "allow": ["gpt-4o-mini"],
        },
    }
    problems = problems_of(tmp_path, doc)
    expected = [
        "unknown key 'scope' (allowed: scopes, models)",
        "scopes[0]: expected a mapping with path and scope",
        "scopes[1]: path must be a path prefix starting with /",
        "scopes[2]: path must be a path prefix starting with /",
        "scopes[3]: scope must be one scope token",
        "scopes[4]: scope must be one scope token",
        "scopes[5]: scope must be one scope token",
        "scopes[6]: methods must be a list of HTTP methods",
        "scopes[7]: methods must be a list of HTTP methods",
        "scopes[8]: methods must be a list of HTTP methods",
        "scopes[9]: unknown key(s) method",
        "models: unknown key(s) alias",
        "models.aliases: 'fast' -> 'bad name!': names must match",
        "models.aliases: 'sp ace' -> 'gpt-4o': names must match",
        "models.aliases point at models not in allow: gpt-4o",
    ]
    assert len(problems) == len(expected), problems
    for problem, needle in zip(problems, expected, strict=True):
        assert problem.startswith(f"routes file {tmp_path / 'routes.yaml'}: "), problem
        assert needle in problem, (needle, problem)


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ("- a\n- b\n", "expected a mapping with `scopes` and/or `models`"),
        ({"scopes": {"path": "/a", "scope": "a"}}, "scopes: expected a list"),
        ({"models": ["a"]}, "models: expected a mapping"),
        ({"models": {"aliases": ["a"]}}, "models.aliases: expected a mapping"),
        ({"models": {"allow": "gpt-4o"}}, "models.allow: expected a list of model names"),
        ({"models": {"allow": ["ok", "not ok"]}}, "models.allow: expected a list of model names"),
        ({"models": {"allow": ["x" * 129]}}, "models.allow: expected a list of model names"),
        ({"models": {"aliases": {"a": 1}}}, "names must match"),
        ("scopes: [unclosed\n", "not valid YAML"),
    ],
)
def test_validation_errors(tmp_path: Path, doc: Any, needle: str) -> None:
    problems = problems_of(tmp_path, doc)
    assert any(needle in p for p in problems), problems


def test_an_alias_must_point_inside_the_allow_list(tmp_path: Path) -> None:
    doc = {"models": {"aliases": {"fast": "gpt-4o-mini", "big": "gpt-4o"}, "allow": ["gpt-4o"]}}
    assert problems_of(tmp_path, doc) == [
        f"routes file {tmp_path / 'routes.yaml'}: models.aliases point at models not in allow: gpt-4o-mini"
    ]


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it: No such file"):
        load_routes(str(tmp_path / "absent.yaml"))


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_bytes(b"scopes:\n  - {path: /v1/, scope: \xff}\n")
    with pytest.raises(ConfigError, match=r"routes file .*: not UTF-8"):
        load_routes(str(path))


def test_the_same_rule_twice_is_refused(tmp_path: Path) -> None:
    """Two rules for one prefix and method with different scopes: which one would hold was the order
    of the file, silently (a reader may well expect both scopes to be required)."""
    doc = {
        "scopes": [
            {"path": "/v1/embeddings", "methods": ["POST"], "scope": "a"},
            {"path": "/v1/embeddings", "methods": ["GET", "post"], "scope": "b"},
            {"path": "/v1/", "scope": "c"},
            {"path": "/v1/", "scope": "d"},
        ]
    }
    problems = problems_of(tmp_path, doc)
    assert len(problems) == 2, problems
    assert "scopes[1]: POST /v1/embeddings is already covered by scopes[0]" in problems[0]
    assert "scopes[3]: /v1/ is already covered by scopes[2]" in problems[1]


def test_the_same_prefix_for_different_methods_is_fine(tmp_path: Path) -> None:
    doc = {
        "scopes": [
            {"path": "/v1/x", "methods": ["POST"], "scope": "w"},
            {"path": "/v1/x", "methods": ["GET"], "scope": "r"},
            {"path": "/v1/x", "scope": "other"},
        ]
    }
    routes = routes_from(tmp_path, doc)
    assert [routes.required_scope(m, "/v1/x") for m in ("POST", "GET", "PUT")] == ["w", "r", "other"]


def test_a_get_rule_holds_for_head_too() -> None:
    """Most frameworks serve HEAD with the GET handler: HEAD must not dodge a GET-only rule."""
    from meshkit.extproc.routes_file import Routes, ScopeRule

    routes = Routes(scopes=(ScopeRule("/v1/files", "files", frozenset({"GET"})), ScopeRule("/v1/", "llm")))
    assert set(routes.required_scopes("HEAD", "/v1/files/1")) == {"files", "llm"}
    assert routes.required_scopes("GET", "/v1/files/1") == ("files",)
    assert routes.required_scopes("POST", "/v1/files/1") == ("llm",)
