"""Shared test set-up: a clean MESHKIT_* environment per test; nothing left running after the run."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from meshkit.harness import process


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("MESHKIT_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session", autouse=True)
def stop_leftovers() -> Iterator[None]:
    yield
    left = process.running()
    process.stop_all()
    assert not left, f"processes still running at the end of the session: {left}"
