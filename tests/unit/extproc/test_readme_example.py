"""The filter example in the README runs as printed."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from meshkit.extproc import Exchange, Phase
from meshkit.extproc.chain import Chain

README = Path(__file__).resolve().parents[3] / "README.md"


def example(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    text = README.read_text()
    section = text[text.index("### Writing a filter") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    module = types.ModuleType("readme_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look their module up
    exec(compile(code.group(1), "README.md", "exec"), module.__dict__)
    return module.__dict__


async def test_readme_filter_example(monkeypatch: pytest.MonkeyPatch) -> None:
    ns = example(monkeypatch)
    chain = Chain([ns["RequireModelFilter"](ns["RequireModelOptions"]())])
    outcomes = []
    for headers in ({}, {"x-model": "gpt-x"}, {"x-model": "text-embedding-3-small"}):
        ex = Exchange(headers)
        ex.body = b"{}"
        reply = await chain.run(Phase.REQUEST_BODY, ex)
        outcomes.append((reply.status if reply else None, ex.take_mutations()[0]))
    assert outcomes == [(400, {}), (403, {}), (None, {"x-model-checked": "1"})]
