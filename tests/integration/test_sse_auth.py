# ruff: noqa: F811 (fixtures imported from test_sse_support, used as arguments)
"""Stream auth through the real adapter (a process, NATS origin + leaf) with real HS256 (secret file) and
ES256 (JWKS file) tokens: 401/403 JSON before anything is subscribed, the token in the header or in
`?access_token=`, the stream ending with `event: reauth` at expiry (and no token after it), a resume
with a fresh token, the WebSocket's reauth frame and 1008 close, and no query token in the log."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import websockets
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from nats.js import JetStreamContext

from meshkit.harness.edge_daemons import SseAdapter, sse_adapter
from meshkit.harness.nats import NatsServer

from .conftest import request
from .test_sse_support import (  # noqa: F401 (fixtures)
    BASE_ARGS,
    SseReader,
    js,
    leaf,
    metric,
    new_cid,
    open_stream,
    origin,
    publish,
    session,
    settled,
    stream_created,
    until,
    workdir,
)

pytestmark = pytest.mark.integration

SECRET = b"s" * 48
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ISSUED: list[str] = []  # every token handed out in a query string: none may reach the log


def hs256(conv: Any = None, ttl: float = 300.0, **extra: Any) -> str:
    token = jwt.encode(claims(conv, ttl, **extra), SECRET, algorithm="HS256")
    ISSUED.append(token)
    return token


def es256(conv: Any = None, ttl: float = 300.0, **extra: Any) -> str:
    token = jwt.encode(claims(conv, ttl, **extra), EC_KEY, algorithm="ES256", headers={"kid": "ec-1"})
    ISSUED.append(token)
    return token


def claims(conv: Any, ttl: float, **extra: Any) -> dict[str, Any]:
    now = time.time()
    doc: dict[str, Any] = {"sub": "user-1", "aud": "chat", "iat": int(now) - 1, "exp": now + ttl, **extra}
    if conv is not None:
        doc["conv"] = conv
    return doc


@pytest.fixture(scope="module")
def adapter(workdir: Path, leaf: NatsServer, stream_created: None) -> Iterator[SseAdapter]:
    secret = workdir / "jwt-secret"
    secret.write_bytes(SECRET)
    jwks = workdir / "jwks.json"
    jwk = {**ECAlgorithm.to_jwk(EC_KEY.public_key(), as_dict=True), "kid": "ec-1", "use": "sig"}
    jwks.write_text(json.dumps({"keys": [jwk]}))
    args = [
        *BASE_ARGS,
        "--jwt-secret-file",
        str(secret),
        "--jwks",
        str(jwks),
        "--jwt-audience",
        "chat",
        "--jwt-leeway",
        "0",
        "--log-level",
        "debug",
    ]
    with sse_adapter(workdir, leaf.url, args, name="sse-auth") as running:
        yield running
    log = running.process.log_text()
    assert "access_token=***" in log  # stream URLs were logged, masked
    leaked = [t for t in ISSUED if t in log or t.split(".")[2] in log]
    assert not leaked, "a query token reached the adapter's log"


def test_no_token_is_401_json_with_a_challenge_and_subscribes_nothing(adapter: SseAdapter) -> None:
    settled(adapter)
    resp = request(adapter.stream_url("c1"), "GET")
    assert resp.status == 401
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.headers["www-authenticate"] == 'Bearer realm="meshkit"'
    assert resp.json()["error"]["type"] == "unauthorized"
    bad = request(adapter.stream_url("c1", access_token="not-a-jwt"), "GET")
    assert bad.status == 401 and 'error="invalid_token"' in bad.headers["www-authenticate"]
    assert metric(adapter, "meshkit_sse_conversations_subscribed") == 0


def test_a_token_for_another_conversation_is_403(adapter: SseAdapter) -> None:
    for token in (hs256("other"), es256(["x", "y"]), hs256(None)):  # no conv and no scope: 403 too
        resp = request(adapter.stream_url("c1", access_token=token), "GET")
        assert resp.status == 403, resp.body
        assert resp.json()["error"]["type"] == "forbidden"
        assert 'error="insufficient_scope"' in resp.headers["www-authenticate"]
    # a bad id is still a 400, told before the token is looked at
    assert request(adapter.stream_url("a.b"), "GET").status == 400


async def test_hs256_in_the_query_and_es256_in_the_header_stream(
    adapter: SseAdapter, js: JetStreamContext, session: aiohttp.ClientSession
) -> None:
    c = new_cid()
    by_query = await open_stream(session, adapter.stream_url(c, access_token=hs256(c)))
    by_header = await open_stream(
        session, adapter.stream_url(c), headers={"Authorization": f"Bearer {es256([c, 'other'])}"}
    )
    by_scope = await open_stream(session, adapter.stream_url(c, access_token=hs256(None, scope="stream:any")))
    try:
        await publish(js, c, range(1, 4), done_at=3)
        for reader in (by_query, by_header, by_scope):
            await reader.until_end()
            assert reader.sequences == [1, 2, 3]
    finally:
        for reader in (by_query, by_header, by_scope):
            await reader.close()


async def test_expiry_mid_stream_ends_with_reauth_and_no_token_after_it(
    adapter: SseAdapter, js: JetStreamContext, session: aiohttp.ClientSession
) -> None:
    c = new_cid()
    token = hs256(c, ttl=2.0)
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    reader = await open_stream(session, adapter.stream_url(c, access_token=token))
    received: list[tuple[str, float]] = []
    seq = 0

    async def keep_publishing() -> None:  # a token every 50 ms, across the expiry
        nonlocal seq
        while True:
            seq += 1
            await publish(js, c, [seq])
            await asyncio.sleep(0.05)

    def more_than(n: int) -> Callable[[SseReader], bool]:
        return lambda r: len(r.events) > n or r.ended.is_set()

    publisher = asyncio.ensure_future(keep_publishing())
    try:
        seen = 0
        async with asyncio.timeout(6):
            while not reader.ended.is_set():
                await reader.wait_for(more_than(seen), within=6)
                received += [(e.event, time.time()) for e in reader.events[seen:]]
                seen = len(reader.events)
        await asyncio.sleep(0.3)  # tokens keep coming after the end
    finally:
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)
        await reader.close()
    events = [e.event for e in reader.events]
    assert events[-1] == "reauth" and set(events[:-1]) == {"token"}, events
    got = reader.sequences
    assert got == list(range(1, len(got) + 1)) and len(got) >= 20, got
    reauth_at = received[-1][1]
    assert exp - 0.1 <= reauth_at <= exp + 0.6, reauth_at - exp
    assert all(at <= exp + 0.1 for event, at in received if event == "token")
    assert json.loads(reader.events[-1].data) == {"reason": "token_expired", "last_event_id": got[-1]}
    assert seq > got[-1] + 3  # tokens were published after the end: none of them was sent
    # the same token again: expired, 401; a fresh one resumes after the last id, gap-free
    assert request(adapter.stream_url(c, access_token=token), "GET").status == 401
    fresh = await open_stream(session, adapter.stream_url(c, access_token=hs256(c), last_event_id=got[-1]))
    try:
        await publish(js, c, [seq + 1], done_at=seq + 1)
        await fresh.until_end()
    finally:
        await fresh.close()
    assert fresh.sequences == list(range(got[-1] + 1, seq + 2))
    assert metric(adapter, "meshkit_sse_reauths_total") >= 1


async def test_websocket_auth_and_reauth_frame_then_policy_close(
    adapter: SseAdapter, js: JetStreamContext
) -> None:
    c = new_cid()
    url = f"ws://127.0.0.1:{adapter.port}/ws/{c}"
    with pytest.raises(websockets.InvalidStatus) as caught:
        async with websockets.connect(url):
            pass
    assert caught.value.response.status_code == 401
    with pytest.raises(websockets.InvalidStatus) as caught:
        async with websockets.connect(f"{url}?access_token={es256('other')}"):
            pass
    assert caught.value.response.status_code == 403
    token = es256(c, ttl=1.5)
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        await publish(js, c, [1, 2])
        frames = []
        async with asyncio.timeout(5):
            try:
                async for text in ws:
                    frames.append(json.loads(text))
            except websockets.ConnectionClosed:
                pass
        assert ws.close_code == 1008
    assert [f["event"] for f in frames] == ["token", "token", "reauth"]
    assert frames[-1]["data"] == {"reason": "token_expired", "last_event_id": 2}
