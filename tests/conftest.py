"""Shared test set-up: a clean MESHKIT_* environment per test; nothing left running after the run."""

from __future__ import annotations

import os
import signal
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
    # A CI runner that cancels a job sends SIGTERM: unwind like Ctrl-C so fixtures stop their servers.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    yield
    signal.signal(signal.SIGTERM, previous)
    left = process.running()
    process.stop_all()
    assert not left, f"processes still running at the end of the session: {left}"
