"""Shared test set-up: a clean MESHKIT_* environment per test; nothing left running after the run."""

from __future__ import annotations

import os
import re
import signal
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def readme_example(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], dict[str, Any]]:
    """Runs the first ```python block after a README heading as a module; returns its namespace, so a
    test can check that the example works as printed."""

    def run(heading: str) -> dict[str, Any]:
        text = README.read_text()
        code = re.search(r"```python\n(.*?)```", text[text.index(heading) :], re.S)
        assert code is not None, f"no python block after {heading!r}"
        module = types.ModuleType("readme_" + re.sub(r"\W+", "_", heading).strip("_").lower())
        monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look their module up
        exec(compile(code.group(1), "README.md", "exec"), module.__dict__)
        return module.__dict__

    return run
