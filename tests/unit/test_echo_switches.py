"""`meshkit echo`'s test switches: a status, extra response headers, an SSE stream (request headers)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from meshkit.echo import echo_app


@pytest.fixture
async def client() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with TestClient(TestServer(echo_app("t"))) as c:
        yield c


async def test_plain_answer_has_a_new_answer_id_each_time(
    client: TestClient[web.Request, web.Application],
) -> None:
    first = await (await client.post("/x", data=b"abc")).json()
    second = await (await client.post("/x", data=b"abc")).json()
    assert first["body_sha256"] == second["body_sha256"] and first["answer"] != second["answer"]


async def test_status_and_headers(client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.post(
        "/x",
        data=b"abc",
        headers=[
            ("x-echo-status", "429"),
            ("x-echo-header", "Cache-Control: private"),
            ("x-echo-header", "A: b:c"),
        ],
    )
    assert resp.status == 429
    assert resp.headers["cache-control"] == "private" and resp.headers["a"] == "b:c"
    assert (await resp.json())["upstream"] == "t"


async def test_sse_stream(client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.post("/v1/chat/completions", data=b"{}", headers={"x-echo-sse": "3"})
    assert resp.status == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = [e.removeprefix("data: ") for e in (await resp.text()).split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert [json.loads(e)["index"] for e in events[:-1]] == [0, 1, 2]


@pytest.mark.parametrize(
    "headers",
    [{"x-echo-status": "99"}, {"x-echo-status": "x"}, {"x-echo-sse": "5000"}, {"x-echo-header": "nocolon"}],
)
async def test_bad_switches_are_400(
    client: TestClient[web.Request, web.Application], headers: dict[str, str]
) -> None:
    resp = await client.post("/x", data=b"", headers=headers)
    assert resp.status == 400
