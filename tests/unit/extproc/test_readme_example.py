"""The filter example in the README runs as printed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshkit.extproc import Exchange, Phase
from meshkit.extproc.chain import Chain


async def test_readme_filter_example(readme_example: Callable[[str], dict[str, Any]]) -> None:
    ns = readme_example("### Writing a filter")
    chain = Chain([ns["RequireModelFilter"](ns["RequireModelOptions"]())])
    outcomes = []
    for headers in ({}, {"x-model": "gpt-x"}, {"x-model": "text-embedding-3-small"}):
        ex = Exchange(headers)
        ex.body = b"{}"
        reply = await chain.run(Phase.REQUEST_BODY, ex)
        outcomes.append((reply.status if reply else None, ex.take_mutations()[0]))
    assert outcomes == [(400, {}), (403, {}), (None, {"x-model-checked": "1"})]
