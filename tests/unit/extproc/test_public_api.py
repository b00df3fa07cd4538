"""The filter author's surface is exactly what `meshkit.extproc.__all__` lists (httpx's check)."""

from __future__ import annotations

import meshkit.extproc


def test_all_lists_exactly_the_public_names() -> None:
    public = {name for name in vars(meshkit.extproc) if not name.startswith("_") and name[0].isupper()}
    assert set(meshkit.extproc.__all__) == public
    assert len(meshkit.extproc.__all__) == len(public)  # no name listed twice
