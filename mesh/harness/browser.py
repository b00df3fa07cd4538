"""A real headless browser for tests: Debian's Chromium driven by playwright, never a browser download.

    async with browser_page() as page:          # a playwright `Page`, closed on exit, also on errors
        await page.goto(url)
        await page.wait_for_function("window.finished === true")

As a pytest fixture:

    @pytest.fixture
    async def page() -> AsyncIterator[Page]:
        async with browser_page() as p:
            yield p

Decisions:

- The browser is `/usr/bin/chromium` from the Debian package `chromium` (another binary: the
  `executable` argument), passed to playwright as `executable_path`. playwright's own browser builds
  are never downloaded nor looked for: a missing binary is a `HarnessError` naming the package to
  install; playwright itself missing is a `HarnessError` naming the `dev` extra.
- Headless. As root (a CI container), Chromium's sandbox cannot start, so `--no-sandbox` is added
  then, and only then. `--disable-dev-shm-usage` keeps a small `/dev/shm` from crashing tabs.
- Every wait is bounded: the launch (`launch_timeout`), every playwright call on the page
  (`page_timeout`, as playwright's default timeout for actions, navigation and `wait_for_*`), and the
  close (`CLOSE_TIMEOUT` per step). One browser per context manager: a fresh profile, nothing shared
  between tests.
- The page's console messages and uncaught errors go to the `meshkit.harness.browser` logger at
  INFO/WARNING, so pytest shows them with a failing test.
- Always closed: page, context, browser and the playwright driver, in that order, in a `finally`.
  Stopping the driver ends the browser process it launched even when a polite close timed out.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from meshkit.errors import HarnessError

if TYPE_CHECKING:
    from playwright.async_api import Page

__all__ = ["CHROMIUM", "browser_page", "chromium_args", "chromium_binary"]

log = logging.getLogger("meshkit.harness.browser")

CHROMIUM = "/usr/bin/chromium"
CLOSE_TIMEOUT = 5.0


def chromium_binary(executable: str | None = None) -> str:
    """Path of the Chromium to drive (`executable`, else `/usr/bin/chromium`), or HarnessError naming
    the Debian package to install."""
    path = executable or CHROMIUM
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise HarnessError(
            f"no Chromium at {path}: install the Debian package `chromium` (apt-get install -y chromium); "
            "playwright's own browser downloads are not used"
        )
    return path


def chromium_args(extra: Sequence[str] = ()) -> list[str]:
    """The command-line flags: `--no-sandbox` only when running as root, plus `extra`."""
    args = ["--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check"]
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium's sandbox refuses to run as root
    return [*args, *extra]


async def _bounded(what: str, awaitable: Any) -> None:
    try:
        await asyncio.wait_for(awaitable, CLOSE_TIMEOUT)
    except TimeoutError:
        log.warning("browser harness: %s did not finish within %.0f s", what, CLOSE_TIMEOUT)
    except Exception as exc:  # a browser that already died: closing it again must not hide the real error
        log.debug("browser harness: %s: %s", what, exc)


@asynccontextmanager
async def browser_page(
    *,
    executable: str | None = None,
    page_timeout: float = 10.0,
    launch_timeout: float = 30.0,
    args: Sequence[str] = (),
) -> AsyncIterator[Page]:
    """A fresh headless Chromium with one page; everything closed on exit (module docstring).

    `page_timeout` (seconds) is the page's default for every playwright action, navigation and wait."""
    binary = chromium_binary(executable)
    try:
        from playwright.async_api import Error as PlaywrightError
        from playwright.async_api import async_playwright
    except ImportError:
        raise HarnessError("playwright is not installed: pip install 'meshkit[dev]'") from None

    manager = async_playwright()
    try:
        driver = await asyncio.wait_for(manager.start(), launch_timeout)
    except TimeoutError:
        raise HarnessError(f"the playwright driver did not start within {launch_timeout:.0f} s") from None
    browser = context = page = None
    try:
        try:
            browser = await driver.chromium.launch(
                executable_path=binary,
                headless=True,
                args=chromium_args(args),
                timeout=launch_timeout * 1000,
                handle_sigint=False,
                handle_sigterm=False,
                handle_sighup=False,
            )
        except PlaywrightError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise HarnessError(f"Chromium {binary} did not start: {first}") from None
        context = await browser.new_context()
        context.set_default_timeout(page_timeout * 1000)
        context.set_default_navigation_timeout(page_timeout * 1000)
        page = await context.new_page()
        page.on("console", lambda m: log.info("browser console %s: %s", m.type, m.text))
        page.on("pageerror", lambda e: log.warning("browser page error: %s", e))
        yield page
    finally:
        if page is not None:
            await _bounded("closing the page", page.close())
        if context is not None:
            await _bounded("closing the context", context.close())
        if browser is not None:
            await _bounded("closing the browser", browser.close())
        await _bounded("stopping the playwright driver", manager.__aexit__(None, None, None))
