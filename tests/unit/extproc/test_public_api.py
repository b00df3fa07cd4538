"""The filter author's surface is exactly what `meshkit.extproc.__all__` lists (httpx's check)."""

from __future__ import annotations

import types

import meshkit.extproc


def test_all_lists_exactly_the_public_names() -> None:
    public = {
        name
        for name, value in vars(meshkit.extproc).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType) and name != "annotations"
    }
    assert set(meshkit.extproc.__all__) == public  # lowercase names too (`option`)
    assert len(meshkit.extproc.__all__) == len(public)  # no name listed twice


def test_everything_the_readme_example_imports_is_public() -> None:
    for name in ("ClientError", "DependencyError", "Exchange", "Filter", "Reply", "option"):
        assert name in meshkit.extproc.__all__
