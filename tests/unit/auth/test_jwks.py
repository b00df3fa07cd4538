"""JwksSource: what it accepts from a JWKS, a file and a real HTTP URL, refresh, refetch limits."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from prometheus_client import CollectorRegistry

from meshkit.errors import ConfigError, DependencyError
from meshkit.extproc.auth import jwks as jwks_module
from meshkit.extproc.auth.jwks import MAX_DOCUMENT_BYTES, JwksSource

EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC384_KEY = ec.generate_private_key(ec.SECP384R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def public_jwk(private: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    public = private.public_key()
    if isinstance(private, rsa.RSAPrivateKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(private, ec.EllipticCurvePrivateKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    jwk.update(extra)
    return dict(jwk)


def write(path: Path, doc: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    os.replace(tmp, path)


class JwksServer:
    """A real HTTP server on 127.0.0.1 serving `doc` (or `status`), counting requests."""

    def __init__(self) -> None:
        self.doc: Any = {"keys": [public_jwk(EC_KEY, "ec-1")]}
        self.status = 200
        self.requests = 0
        self.delay = 0.0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status != 200:
            return web.Response(status=self.status, text="down")
        body = self.doc if isinstance(self.doc, str) else json.dumps(self.doc)
        return web.Response(text=body, content_type="application/json")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/jwks.json", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/jwks.json"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[JwksServer]:
    s = JwksServer()
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def sources() -> AsyncIterator[Callable[..., JwksSource]]:
    made: list[JwksSource] = []

    def make(location: str, **kw: Any) -> JwksSource:
        source = JwksSource(location, **kw)
        made.append(source)
        return source

    yield make
    for source in made:
        await source.close()


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def sample(source: JwksSource, name: str, **labels: str) -> float:
    registry = CollectorRegistry()
    for collector in source.collectors():
        registry.register(collector)
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_file_keys_by_kid_and_what_is_skipped(
    tmp_path: Path, sources: Callable[..., JwksSource], caplog: pytest.LogCaptureFixture
) -> None:
    small_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = tmp_path / "jwks.json"
    write(
        path,
        {
            "keys": [
                public_jwk(EC_KEY, "ec-1", use="sig"),
                public_jwk(RSA_KEY, "rsa-1"),
                public_jwk(ED_KEY, "ed-1"),
                public_jwk(EC384_KEY, "ec384"),
                public_jwk(RSA_KEY, "rsa-pinned", alg="RS256"),
                {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"},
                public_jwk(EC_KEY, "enc", use="enc"),
                public_jwk(EC_KEY, "ops", key_ops=["encrypt"]),
                public_jwk(RSA_KEY, "wrong-alg", alg="ES256"),
                public_jwk(small_rsa, "small"),
                {**public_jwk(EC_KEY, "private"), "d": "AAAA"},
                {"kty": "EC", "kid": "k1", "crv": "secp256k1", "x": "AA", "y": "AA"},
                {"kty": "XYZ", "kid": "odd"},
                {"kty": "EC", "kid": "broken", "crv": "P-256", "x": "AA", "y": "AA"},
                public_jwk(EC_KEY, None),  # no kid, in a set of several
                "not an object",
            ]
        },
    )
    source = sources(str(path))
    with caplog.at_level(logging.WARNING, "meshkit.extproc.auth.jwks"):
        await source.start()
    usable = {"ec-1", "rsa-1", "ed-1", "ec384", "rsa-pinned"}
    assert len(source) == len(usable)
    for kid in usable:
        assert source.key(kid) is not None, kid
    for kid in ("hmac", "enc", "ops", "wrong-alg", "small", "private", "k1", "odd", "broken"):
        assert source.key(kid) is None, kid
    assert source.key(None) is None  # several keys: a token must name one
    assert source.key("nope") is None
    ec_entry, rsa_entry = source.entry("ec-1"), source.entry("rsa-1")
    ed_entry, pinned, ec384 = source.entry("ed-1"), source.entry("rsa-pinned"), source.entry("ec384")
    assert ec_entry is not None and ec_entry.algorithms == {"ES256"}
    assert rsa_entry is not None and rsa_entry.algorithms == {
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
    }
    assert ed_entry is not None and ed_entry.algorithms == {"EdDSA"}
    assert ec384 is not None and ec384.algorithms == {"ES384"}
    assert pinned is not None and pinned.algorithms == {"RS256"}
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert any("'hmac'" in m and "symmetric" in m for m in skipped)
    assert len(skipped) == 11  # one line per skipped entry
    # Skips are logged once, not on every reload.
    caplog.clear()
    with caplog.at_level(logging.WARNING, "meshkit.extproc.auth.jwks"):
        await source.refetch()
    assert not [r for r in caplog.records if "skipped" in r.getMessage()]
    assert sample(source, "meshkit_auth_jwks_keys") == len(usable)


async def test_single_key_without_kid_answers_a_token_without_kid(
    tmp_path: Path, sources: Callable[..., JwksSource]
) -> None:
    path = tmp_path / "one.json"
    write(path, {"keys": [public_jwk(ED_KEY, None)]})
    source = sources(str(path))
    await source.start()
    assert source.key(None) is not None
    assert source.key("any") is None
    # One key with a kid: a token naming no kid gets that one candidate too.
    write(path, {"keys": [public_jwk(ED_KEY, "ed-1")]})
    assert await source.refetch()
    assert source.key(None) is source.key("ed-1") is not None


@pytest.mark.parametrize(
    "content",
    [
        None,  # missing file
        "not json",
        '{"keys": "nope"}',
        '[{"kty": "EC"}]',
        json.dumps({"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]}),  # nothing usable
        json.dumps({"keys": [public_jwk(EC_KEY, f"k{i}") for i in range(101)]}),  # too many
        " " * (MAX_DOCUMENT_BYTES + 1),
    ],
)
async def test_bad_file_at_start_is_config_error(
    tmp_path: Path, sources: Callable[..., JwksSource], content: str | None
) -> None:
    path = tmp_path / "jwks.json"
    if content is not None:
        path.write_text(content)
    source = sources(str(path))
    with pytest.raises(ConfigError) as info:
        await source.start()
    assert str(path) in str(info.value)


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        JwksSource("ftp://example.com/jwks.json")
    with pytest.raises(ConfigError):
        JwksSource("x.json", min_refetch_interval=0)
    with pytest.raises(ConfigError):
        JwksSource("")


async def test_url_keys(server: JwksServer, sources: Callable[..., JwksSource]) -> None:
    server.doc = {"keys": [public_jwk(EC_KEY, "ec-1"), public_jwk(RSA_KEY, "rsa-1")]}
    source = sources(server.url)
    await source.start()
    assert source.key("ec-1") is not None and source.key("rsa-1") is not None
    assert server.requests == 1
    assert sample(source, "meshkit_auth_jwks_fetches_total", result="ok") == 1
    assert source.healthy


async def test_url_down_at_start_is_dependency_error(sources: Callable[..., JwksSource]) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = sources(f"http://user:pw@127.0.0.1:{port}/jwks.json?token=abc", fetch_timeout=2)
    with pytest.raises(DependencyError) as info:
        await source.start()
    assert info.value.dependency == "jwks"
    assert "pw" not in info.value.message and "token=abc" not in info.value.message


@pytest.mark.parametrize("fault", ["status", "not-json", "too-big", "slow"])
async def test_bad_url_at_start_is_dependency_error(
    server: JwksServer, sources: Callable[..., JwksSource], fault: str
) -> None:
    if fault == "status":
        server.status = 503
    elif fault == "not-json":
        server.doc = "<html>"
    elif fault == "too-big":
        server.doc = json.dumps({"keys": [public_jwk(EC_KEY, "ec-1")], "pad": "x" * MAX_DOCUMENT_BYTES})
    else:
        server.delay = 1.0
    source = sources(server.url, fetch_timeout=0.2)
    with pytest.raises(DependencyError):
        await source.start()


async def test_refresh_failure_keeps_last_good_set(
    server: JwksServer,
    sources: Callable[..., JwksSource],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(jwks_module, "RETRY_AFTER_FAILURE", 0.05)
    source = sources(server.url, refresh_interval=0.05)
    await source.start()
    server.status = 500
    with caplog.at_level(logging.WARNING, "meshkit.extproc.auth.jwks"):
        await eventually(lambda: server.requests >= 5)
    assert not source.healthy
    assert source.key("ec-1") is not None  # the last good set stays
    assert sample(source, "meshkit_auth_jwks_fetches_total", result="error") >= 3
    outage_lines = [r for r in caplog.records if "cannot be loaded" in r.getMessage()]
    assert len(outage_lines) == 1  # once per outage, not per failed fetch
    # Back up, with a rotated key: picked up by the background refresh.
    server.doc = {"keys": [public_jwk(RSA_KEY, "rsa-2")]}
    server.status = 200
    await eventually(lambda: source.key("rsa-2") is not None)
    assert source.healthy
    assert source.key("ec-1") is None


async def test_file_reload_on_change(tmp_path: Path, sources: Callable[..., JwksSource]) -> None:
    path = tmp_path / "jwks.json"
    write(path, {"keys": [public_jwk(EC_KEY, "ec-1")]})
    source = sources(str(path), refresh_interval=0.05)
    await source.start()
    generation = source.generation
    write(path, {"keys": [public_jwk(EC_KEY, "ec-1"), public_jwk(ED_KEY, "ed-2")]})
    await eventually(lambda: source.key("ed-2") is not None)
    assert source.generation == generation + 1
    # A broken version keeps the last good set; the next good one is picked up.
    write(path, "{broken")
    await eventually(lambda: not source.healthy)
    assert source.key("ed-2") is not None
    write(path, {"keys": [public_jwk(RSA_KEY, "rsa-3")]})
    await eventually(lambda: source.key("rsa-3") is not None)
    assert source.key("ed-2") is None and source.healthy


async def test_file_unchanged_is_not_reread(
    tmp_path: Path, sources: Callable[..., JwksSource], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "jwks.json"
    write(path, {"keys": [public_jwk(EC_KEY, "ec-1")]})
    source = sources(str(path), refresh_interval=0.02)
    await source.start()
    await asyncio.sleep(0.2)
    assert sample(source, "meshkit_auth_jwks_fetches_total", result="ok") == 1


async def test_refetch_is_rate_limited_and_shared(
    server: JwksServer, sources: Callable[..., JwksSource]
) -> None:
    source = sources(server.url, min_refetch_interval=60)
    await source.start()
    assert server.requests == 1
    server.delay = 0.1
    server.doc = {"keys": [public_jwk(EC_KEY, "ec-1"), public_jwk(ED_KEY, "ed-2")]}
    results = await asyncio.gather(*(source.refetch() for _ in range(20)))
    assert server.requests == 2  # one fetch, shared by all 20
    assert results == [True] * 20
    assert source.key("ed-2") is not None
    server.doc = {"keys": [public_jwk(RSA_KEY, "rsa-9")]}
    for _ in range(20):
        assert not await source.refetch()  # within min_refetch_interval: no fetch
    assert server.requests == 2
    assert source.key("rsa-9") is None
    assert sample(source, "meshkit_auth_jwks_refetches_total", outcome="fetched") == 1
    assert sample(source, "meshkit_auth_jwks_refetches_total", outcome="shared") == 19
    assert sample(source, "meshkit_auth_jwks_refetches_total", outcome="limited") == 20


async def test_refetch_again_after_the_interval(
    server: JwksServer, sources: Callable[..., JwksSource]
) -> None:
    source = sources(server.url, min_refetch_interval=0.2)
    await source.start()
    assert not await source.refetch()  # unchanged
    assert server.requests == 2
    server.doc = {"keys": [public_jwk(ED_KEY, "ed-2")]}
    assert not await source.refetch()
    assert server.requests == 2
    await asyncio.sleep(0.25)
    assert await source.refetch()
    assert server.requests == 3
    assert source.key("ed-2") is not None


async def test_failed_refetch_keeps_keys(server: JwksServer, sources: Callable[..., JwksSource]) -> None:
    source = sources(server.url)
    await source.start()
    server.status = 502
    assert not await source.refetch()
    assert source.key("ec-1") is not None
    assert not source.healthy


async def test_close_stops_refresh(server: JwksServer) -> None:
    source = JwksSource(server.url, refresh_interval=0.02)
    await source.start()
    await source.close()
    seen = server.requests
    await asyncio.sleep(0.1)
    assert server.requests == seen
    await source.close()  # twice is fine


def test_collectors_register_on_a_registry() -> None:
    source = JwksSource("x.json")
    registry = CollectorRegistry()
    for collector in source.collectors():
        registry.register(collector)
    names = {m.name for m in registry.collect()}
    assert {"meshkit_auth_jwks_fetches", "meshkit_auth_jwks_keys", "meshkit_auth_jwks_refetches"} <= names
    # A second source (a second chain in one process) registers on its own registry without clashing.
    other = CollectorRegistry()
    for collector in JwksSource("y.json").collectors():
        other.register(collector)
