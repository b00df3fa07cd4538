"""The browser harness with a real headless Chromium: an EventSource on a tiny aiohttp SSE server that
closes the stream mid-way; the browser reconnects by itself with `Last-Event-ID` (the server sees the
header) and the page ends with every event once, in order. Also: a missing browser is a clear
HarnessError, and the browser is closed after the context manager, also after an error in the test.

This is the pattern the SSE adapter's browser test follows: the `page` fixture below, a page that
collects events into `window.events`, and `page.wait_for_function` with a deadline."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from playwright.async_api import Page

from meshkit.errors import HarnessError
from meshkit.harness.browser import browser_page, chromium_binary

pytestmark = pytest.mark.integration

EVENTS = 8
CUT_AFTER = 3  # the first connection ends after this many events

PAGE = """<!doctype html>
<meta charset="utf-8">
<script>
window.events = [];
window.opens = 0;
window.finished = false;
const source = new EventSource("/events");
source.onopen = () => { window.opens += 1; };
source.addEventListener("token", (e) => {
  window.events.push({id: e.lastEventId, data: JSON.parse(e.data)});
});
source.addEventListener("done", () => { source.close(); window.finished = true; });
</script>
"""


@dataclass
class SseServer:
    url: str = ""
    last_event_ids: list[str | None] = field(default_factory=list)


def frame(event: str, event_id: int, data: object) -> bytes:
    return f"id: {event_id}\nevent: {event}\ndata: {json.dumps(data)}\n\n".encode()


@pytest.fixture
async def sse_server() -> AsyncIterator[SseServer]:
    state = SseServer()

    async def index(_: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def events(request: web.Request) -> web.StreamResponse:
        last = request.headers.get("Last-Event-ID")
        state.last_event_ids.append(last)
        start = int(last) + 1 if last is not None and last.isdigit() else 1
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        await response.write(b"retry: 50\n\n")
        for n in range(start, EVENTS + 1):
            await response.write(frame("token", n, {"sequence": n, "token": f"t{n}"}))
            if last is None and n == CUT_AFTER:
                return response  # the first connection ends mid-stream: the browser must reconnect
        await response.write(frame("done", EVENTS + 1, {"done": True}))
        return response

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/events", events)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.url = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    try:
        chromium_binary()
    except HarnessError as exc:
        pytest.skip(str(exc))
    async with browser_page(page_timeout=10.0) as p:
        yield p


async def test_eventsource_reconnects_with_last_event_id_and_gets_every_event_once(
    page: Page, sse_server: SseServer
) -> None:
    await page.goto(sse_server.url + "/")
    await page.wait_for_function("window.finished === true")
    events = await page.evaluate("window.events")
    assert [e["id"] for e in events] == [str(n) for n in range(1, EVENTS + 1)]
    assert [e["data"]["token"] for e in events] == [f"t{n}" for n in range(1, EVENTS + 1)]
    assert sse_server.last_event_ids == [None, str(CUT_AFTER)]
    assert await page.evaluate("window.opens") == 2


def test_a_missing_browser_is_a_harness_error_naming_the_package() -> None:
    with pytest.raises(HarnessError, match="Debian package `chromium`"):
        chromium_binary("/nonexistent/chromium")


async def test_a_missing_browser_fails_before_anything_starts() -> None:
    with pytest.raises(HarnessError, match="chromium"):
        async with browser_page(executable="/nonexistent/chromium"):
            pytest.fail("no page without a browser")


async def test_the_browser_is_closed_after_the_block_also_after_an_error() -> None:
    try:
        chromium_binary()
    except HarnessError as exc:
        pytest.skip(str(exc))
    seen: list[Page] = []

    async def fail_inside() -> None:
        async with browser_page(page_timeout=5.0) as p:
            seen.append(p)
            assert await p.evaluate("1 + 1") == 2
            raise RuntimeError("the test failed")

    with pytest.raises(RuntimeError, match="the test failed"):
        await fail_inside()
    page = seen[0]
    assert page.is_closed()
    browser = page.context.browser
    assert browser is not None and not browser.is_connected()
    await asyncio.sleep(0)
