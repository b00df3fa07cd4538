"""Review of the JWKS fetch against a hostile or misconfigured server. Found: redirects were followed to
any host (a key set from somewhere else than the URL configured), and a redirect loop's error quoted the
whole URL, query included (`?apikey=...`), in the start-up error and the outage log line."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from meshkit.errors import DependencyError
from meshkit.extproc.auth.jwks import JwksSource

SECRET = "s3cr3t-query-value"
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def _jwks() -> dict[str, Any]:
    from jwt.algorithms import ECAlgorithm

    jwk = json.loads(ECAlgorithm.to_jwk(EC_KEY.public_key()))
    jwk["kid"] = "k1"
    return {"keys": [jwk]}


class Hostile:
    """Serves /keys (a good JWKS), /loop (redirects to itself), /away (redirects to another host's
    /keys: 127.0.0.2, the same server under another address) and /bad (a 500)."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(f"{request.host} {request.path_qs}")
        if request.path == "/loop":
            return web.Response(status=302, headers={"Location": str(request.rel_url)})
        if request.path == "/away":
            return web.Response(status=307, headers={"Location": f"http://127.0.0.2:{self.port}/keys?x=1"})
        if request.path == "/keys":
            return web.json_response(_jwks())
        return web.Response(status=500)

    def url(self, path: str) -> str:
        return f"http://user:pw@127.0.0.1:{self.port}{path}?apikey={SECRET}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "0.0.0.0", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]


@pytest.fixture
async def hostile() -> AsyncIterator[Hostile]:
    server = Hostile()
    await server.start()
    yield server
    assert server._runner is not None
    await server._runner.cleanup()


async def start_error(location: str) -> str:
    source = JwksSource(location, fetch_timeout=2.0)
    try:
        with pytest.raises(DependencyError) as info:
            await source.start()
    finally:
        await source.close()
    return str(info.value)


async def test_a_redirect_loop_error_does_not_quote_the_query(hostile: Hostile) -> None:
    message = await start_error(hostile.url("/loop"))
    assert SECRET not in message and "pw" not in message
    assert "302" in message and "not followed" in message
    assert len(hostile.hits) == 1  # not followed at all


async def test_a_redirect_to_another_host_is_not_followed(hostile: Hostile) -> None:
    message = await start_error(hostile.url("/away"))
    assert hostile.hits == [f"127.0.0.1:{hostile.port} /away?apikey={SECRET}"]  # 127.0.0.2 never asked
    assert f"http://127.0.0.2:{hostile.port}/keys" in message  # where it pointed, without its query
    assert "x=1" not in message and SECRET not in message


async def test_errors_never_quote_the_url_query(hostile: Hostile, caplog: pytest.LogCaptureFixture) -> None:
    assert "HTTP 500" in await start_error(hostile.url("/bad"))
    closed = f"http://127.0.0.1:1/keys?apikey={SECRET}"
    message = await start_error(closed)
    assert SECRET not in message and "cannot connect to 127.0.0.1:1" in message
    source = JwksSource(hostile.url("/keys"), refresh_interval=0.05)
    await source.start()
    try:
        assert source.key("k1") is not None
        caplog.set_level(logging.INFO)
        source.location = hostile.url("/loop")  # the same URL now loops: the refresh logs the outage
        await source._reload()
        await source._reload()
        assert source.healthy is False and source.key("k1") is not None
    finally:
        await source.close()
    assert SECRET not in caplog.text
