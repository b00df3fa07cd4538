"""StreamAuth: real keys (HS256 from a secret file, ES256 from a JWKS file, via PyJWT), the conv claim,
the any-conversation scope, expiry and the reauth time, clock skew, alg none, audience, token sources,
and URLs fit for logs."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from meshkit.edge.stream_auth import StreamAuth, StreamAuthOptions, StreamGrant, loggable_url
from meshkit.errors import ClientError, ConfigError
from meshkit.options import resolve

NOW = 1_700_000_000.0
SECRET = b"k" * 48
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_EC_KEY = ec.generate_private_key(ec.SECP256R1())


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def hs256(**over: Any) -> str:
    return jwt.encode(claims(**over), SECRET, algorithm="HS256")


def es256(key: Any = EC_KEY, kid: str = "ec-1", **over: Any) -> str:
    return jwt.encode(claims(**over), key, algorithm="ES256", headers={"kid": kid})


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "user-1", "exp": NOW + 600, "iat": NOW - 5, "aud": "chat", "conv": "c1"}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    jwks = tmp_path / "jwks.json"
    jwk = {**ECAlgorithm.to_jwk(EC_KEY.public_key(), as_dict=True), "kid": "ec-1", "use": "sig"}
    jwks.write_text(json.dumps({"keys": [jwk]}))
    return secret, jwks


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def make_auth(keys: tuple[Path, Path], clock: Clock, **flags: Any) -> StreamAuth:
    secret, jwks = keys
    options = resolve(
        [StreamAuthOptions],
        command="sse",
        flags={"jwt_secret_file": str(secret), "jwks": str(jwks), "jwt_audience": "chat", **flags},
        env={},
    )
    auth = StreamAuth.from_options(options, clock=clock)
    assert auth is not None
    await auth.start()
    return auth


@pytest.fixture
async def auth(keys: tuple[Path, Path], clock: Clock) -> Any:
    a = await make_auth(keys, clock)
    yield a
    await a.close()


async def refused(auth: StreamAuth, token: str | None, conversation: str = "c1") -> ClientError:
    with pytest.raises(ClientError) as info:
        await auth.authorize(token, conversation)
    error = info.value
    body = json.loads(error.body())
    assert body["error"]["type"] == error.type
    if token:
        assert token not in error.message and token not in json.dumps(error.headers)
    return error


def test_off_without_a_key_source() -> None:
    assert StreamAuth.from_options({StreamAuthOptions: StreamAuthOptions()}) is None


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        (StreamAuthOptions(jwt_issuer="https://issuer.example"), "--jwt-issuer"),
        (StreamAuthOptions(jwt_audience="meshkit"), "--jwt-audience"),
        (StreamAuthOptions(jwt_leeway=5.0), "--jwt-leeway"),
        (StreamAuthOptions(stream_any_scope="admin"), "--stream-any-scope"),
        (StreamAuthOptions(stream_query_token=False), "--no-stream-query-token"),
    ],
)
def test_auth_options_without_a_key_source_are_a_config_error_not_auth_off(
    options: StreamAuthOptions, flag: str
) -> None:
    """An operator who set how tokens are checked but forgot the key would otherwise run with every
    conversation open to anyone, with one log line saying so."""
    with pytest.raises(ConfigError, match=rf"{flag} given without --jwt-secret-file or --jwks"):
        StreamAuth.from_options({StreamAuthOptions: options})


def test_a_short_secret_is_a_config_error(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"x" * 10)
    with pytest.raises(ConfigError, match="32"):
        StreamAuth.from_options({StreamAuthOptions: StreamAuthOptions(jwt_secret_file=str(short))})


@pytest.mark.parametrize("make", [hs256, es256], ids=["HS256", "ES256"])
async def test_a_token_for_the_conversation_is_granted_until_exp_plus_leeway(
    auth: StreamAuth, make: Any
) -> None:
    grant = await auth.authorize(make(), "c1")
    assert grant == StreamGrant("user-1", "c1", NOW + 600, NOW + 630, frozenset())
    assert auth.reauth_in(grant) == pytest.approx(630)


async def test_conv_names_another_conversation_403(auth: StreamAuth) -> None:
    error = await refused(auth, es256(conv="c2"), "c1")
    assert (error.status, error.type) == (403, "forbidden")
    assert "insufficient_scope" in dict(error.headers)["WWW-Authenticate"]


async def test_conv_as_a_list(auth: StreamAuth) -> None:
    token = hs256(conv=["a", "c1"])
    assert (await auth.authorize(token, "c1")).conversation_id == "c1"
    assert (await refused(auth, token, "b")).status == 403


@pytest.mark.parametrize("conv", [7, {"id": "c1"}, [], ["c1", 2], ["x"] * 101])
async def test_a_conv_claim_of_the_wrong_shape_401(auth: StreamAuth, conv: Any) -> None:
    assert (await refused(auth, hs256(conv=conv))).status == 401


async def test_no_conv_needs_the_any_scope(auth: StreamAuth) -> None:
    error = await refused(auth, hs256(conv=None))
    assert error.status == 403 and "stream:any" in error.message
    assert (await refused(auth, hs256(conv=None, scope="read write"))).status == 403
    grant = await auth.authorize(hs256(conv=None, scope="read stream:any"), "anything-at-all")
    assert grant.conversation_id == "anything-at-all"


async def test_no_conv_and_no_any_scope_configured_refuses_every_such_token(
    keys: tuple[Path, Path], clock: Clock
) -> None:
    auth = await make_auth(keys, clock, stream_any_scope="")
    try:
        assert (await refused(auth, hs256(conv=None, scope="stream:any"))).status == 403
        assert (await auth.authorize(hs256(), "c1")).subject == "user-1"
    finally:
        await auth.close()


async def test_missing_token_401_with_a_bare_challenge(auth: StreamAuth) -> None:
    for token in (None, ""):
        error = await refused(auth, token)
        assert error.status == 401
        assert dict(error.headers)["WWW-Authenticate"] == 'Bearer realm="meshkit"'


async def test_alg_none_is_refused_in_every_spelling(auth: StreamAuth) -> None:
    payload = b64(json.dumps(claims()).encode())
    for alg in ("none", "None", "NONE"):
        token = f"{b64(json.dumps({'alg': alg, 'typ': 'JWT'}).encode())}.{payload}."
        error = await refused(auth, token)
        assert error.status == 401 and "unsigned" in error.message


async def test_wrong_audience_bad_signature_unknown_kid_garbage(auth: StreamAuth) -> None:
    assert "audience" in (await refused(auth, es256(aud="other"))).message
    assert "audience" in (await refused(auth, hs256(aud=None))).message
    assert (await refused(auth, es256(key=OTHER_EC_KEY))).status == 401
    assert (await refused(auth, es256(kid="nope"))).status == 401
    assert (await refused(auth, jwt.encode(claims(), b"q" * 48, algorithm="HS256"))).status == 401
    assert (await refused(auth, "not-a-jwt")).status == 401


async def test_expired_token_401(auth: StreamAuth) -> None:
    error = await refused(auth, hs256(exp=NOW - 31))
    assert error.status == 401 and "expired" in error.message
    assert 'error="invalid_token"' in dict(error.headers)["WWW-Authenticate"]


async def test_clock_skew_within_leeway_is_accepted_and_streams_until_the_leeway_ends(
    auth: StreamAuth, clock: Clock
) -> None:
    # exp 20 s ago, leeway 30 s: accepted, and the stream ends 10 s from now, not at once
    grant = await auth.authorize(hs256(exp=NOW - 20), "c1")
    assert auth.reauth_in(grant) == pytest.approx(10)
    # issued 20 s "in the future" by a fast clock: within the leeway
    assert (await auth.authorize(hs256(iat=NOW + 20, nbf=NOW + 20), "c1")).subject == "user-1"
    assert "not valid yet" in (await refused(auth, hs256(nbf=NOW + 31))).message


async def test_reauth_time_runs_down_and_then_the_token_is_refused(auth: StreamAuth, clock: Clock) -> None:
    token = es256(exp=NOW + 5)
    grant = await auth.authorize(token, "c1")
    assert auth.reauth_in(grant) == pytest.approx(35)
    clock.now = NOW + 34
    assert auth.still_valid(grant) and auth.reauth_in(grant) == pytest.approx(1)
    clock.now = NOW + 35
    assert not auth.still_valid(grant) and auth.reauth_in(grant) == 0
    # the same token, at the moment its stream ended, cannot open a new one (no reconnect loop)
    assert "expired" in (await refused(auth, token)).message


async def test_no_exp_is_refused(auth: StreamAuth) -> None:
    assert "exp" in (await refused(auth, hs256(exp=None))).message


async def test_an_invalid_conversation_id_is_400_before_any_verification(auth: StreamAuth) -> None:
    for cid in ("a.>", "*", "", "x" * 129, "a b"):
        error = await refused(auth, hs256(), cid)
        assert error.status == 400


def test_token_from_header_or_query(auth: StreamAuth) -> None:
    assert auth.token_from({"Authorization": "Bearer abc"}, {}) == "abc"
    assert auth.token_from({"authorization": "bearer  abc "}, {}) == "abc"
    assert auth.token_from({}, {"access_token": "abc"}) == "abc"
    assert auth.token_from({"Authorization": "Bearer abc"}, {"access_token": "abc"}) == "abc"
    assert auth.token_from({}, {}) is None
    for headers, query in (
        ({"Authorization": "Basic dXNlcjpwYXNz"}, {}),
        ({"Authorization": "Bearer"}, {}),
        ({"Authorization": "Bearer abc"}, {"access_token": "xyz"}),
        ({}, {"access_token": ""}),
    ):
        with pytest.raises(ClientError) as info:
            auth.token_from(headers, query)
        assert info.value.status == 401 and "invalid_request" in dict(info.value.headers)["WWW-Authenticate"]


async def test_query_token_can_be_turned_off(keys: tuple[Path, Path], clock: Clock) -> None:
    auth = await make_auth(keys, clock, stream_query_token="false")
    try:
        assert auth.token_from({}, {"access_token": hs256()}) is None
        assert "?access_token" not in (await refused(auth, None)).message
    finally:
        await auth.close()


def test_loggable_url_masks_token_parameters() -> None:
    token = hs256()
    url = f"/stream/c1?last_event_id=4&access_token={token}&format=openai"
    shown = loggable_url(url)
    assert token not in shown
    assert shown == "/stream/c1?last_event_id=4&access_token=***&format=openai"
    assert loggable_url("http://h:1/stream/c1?TOKEN=x") == "http://h:1/stream/c1?TOKEN=***"
    assert loggable_url("/stream/c1") == "/stream/c1"
