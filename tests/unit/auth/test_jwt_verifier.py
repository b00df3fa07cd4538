"""JwtVerifier: every refusal reason, HS and JWKS keys (a file and a real HTTP URL), rotation, the cache."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from meshkit.errors import ConfigError
from meshkit.extproc.auth.identity import AuthFailure, Identity
from meshkit.extproc.auth.jwks import JwksSource
from meshkit.extproc.auth.jwt_verifier import MAX_TOKEN_LENGTH, JwtVerifier, looks_like_jwt

NOW = 1_700_000_000.0
SECRET = b"s" * 64
EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC2_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED_KEY = ed25519.Ed25519PrivateKey.generate()
RSA_PEM = RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def public_jwk(private: Any, kid: str, **extra: Any) -> dict[str, Any]:
    public = private.public_key()
    if isinstance(private, rsa.RSAPrivateKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(private, ec.EllipticCurvePrivateKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    return {**jwk, "kid": kid, **extra}


JWKS_DOC = {
    "keys": [
        public_jwk(EC_KEY, "ec-1"),
        public_jwk(RSA_KEY, "rsa-1"),
        public_jwk(ED_KEY, "ed-1"),
        public_jwk(RSA_KEY, "rsa-pinned", alg="RS256"),
        {"kty": "oct", "kid": "hmac", "k": base64.urlsafe_b64encode(SECRET).rstrip(b"=").decode()},
    ]
}


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "user-1", "exp": NOW + 3600, "iat": NOW - 10}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_built(
    header: dict[str, Any], payload: Any, key: bytes | None = SECRET, digest: Any = hashlib.sha256
) -> str:
    """A token built by hand (PyJWT refuses to make the bad ones): HMAC-signed with `key`, or unsigned."""
    body = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(body)}"
    signature = b"" if key is None else hmac.new(key, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64(signature)}"


def es256(kid: str | None = "ec-1", key: Any = EC_KEY, **over: Any) -> str:
    return jwt.encode(claims(**over), key, algorithm="ES256", headers={"kid": kid} if kid else None)


def hs256(**over: Any) -> str:
    return jwt.encode(claims(**over), SECRET, algorithm="HS256")


class JwksServer:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.requests = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        return web.json_response(self.doc)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/auth/v1/.well-known/jwks.json", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/auth/v1/.well-known/jwks.json"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[JwksServer]:
    s = JwksServer(JWKS_DOC)
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
def jwks_file(tmp_path: Path) -> str:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(JWKS_DOC))
    return str(path)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


Make = Callable[..., JwtVerifier]


@pytest.fixture
async def make(clock: Clock) -> AsyncIterator[Callable[..., Any]]:
    sources: list[JwksSource] = []

    async def build(
        *,
        secret: bytes | None = None,
        jwks: str | None = None,
        jwks_options: dict[str, Any] | None = None,
        **kw: Any,
    ) -> JwtVerifier:
        source = None
        if jwks is not None:
            source = JwksSource(jwks, **(jwks_options or {}))
            sources.append(source)
            await source.start()
        kw.setdefault("issuer", None)
        kw.setdefault("audience", None)
        return JwtVerifier(secret=secret, jwks=source, clock=clock, **kw)

    yield build
    for source in sources:
        await source.close()


async def refused(verifier: JwtVerifier, token: str, reason: str) -> AuthFailure:
    with pytest.raises(AuthFailure) as info:
        await verifier.verify(token)
    assert info.value.reason == reason, info.value.message
    if len(token) > 8:  # the message never quotes the token
        assert token not in info.value.message and token[:20] not in info.value.message
    assert verifier.verify_cached(token) is None  # failures are never cached
    return info.value


# -- valid tokens


@pytest.mark.parametrize(("alg", "digest"), [("HS256", 32), ("HS384", 48), ("HS512", 64)])
async def test_valid_hs(make: Callable[..., Any], alg: str, digest: int) -> None:
    verifier = await make(secret=SECRET)
    token = jwt.encode(claims(scope="read write"), SECRET, algorithm=alg)
    identity = await verifier.verify(token)
    assert identity == Identity(
        subject="user-1",
        method="jwt",
        scopes=frozenset({"read", "write"}),
        expires_at=NOW + 3600,
        claims=claims(scope="read write"),
    )


async def test_hs_needs_a_secret_as_long_as_the_hash(make: Callable[..., Any]) -> None:
    secret = b"k" * 32
    verifier = await make(secret=secret)
    assert verifier.hs_algorithms == {"HS256"}
    assert (await verifier.verify(jwt.encode(claims(), secret, algorithm="HS256"))).subject == "user-1"
    token = hand_built({"alg": "HS512", "typ": "JWT"}, claims(), key=secret, digest=hashlib.sha512)
    await refused(verifier, token, "alg_not_allowed")


@pytest.mark.parametrize(
    "secret", [b"short", RSA_PEM, b"ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 user@host padding padding"]
)
def test_bad_secrets_are_config_errors(secret: bytes) -> None:
    with pytest.raises(ConfigError):
        JwtVerifier(secret=secret, jwks=None, issuer=None, audience=None)


def test_no_key_source_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        JwtVerifier(secret=None, jwks=None, issuer=None, audience=None)


def sign(alg: str, kid: str) -> str:
    key: Any = {"ES256": EC_KEY, "RS256": RSA_KEY, "RS384": RSA_KEY, "PS256": RSA_KEY, "EdDSA": ED_KEY}[alg]
    return jwt.encode(claims(), key, algorithm=alg, headers={"kid": kid})


@pytest.mark.parametrize("where", ["file", "url"])
@pytest.mark.parametrize(
    ("alg", "kid"),
    [("ES256", "ec-1"), ("RS256", "rsa-1"), ("RS384", "rsa-1"), ("PS256", "rsa-1"), ("EdDSA", "ed-1")],
)
async def test_valid_jwks(
    make: Callable[..., Any], server: JwksServer, jwks_file: str, where: str, alg: str, kid: str
) -> None:
    verifier = await make(jwks=server.url if where == "url" else jwks_file)
    identity = await verifier.verify(sign(alg, kid))
    assert identity.subject == "user-1" and identity.method == "jwt"
    assert server.requests == (1 if where == "url" else 0)  # no refetch for a known kid


async def test_jwks_without_secret_refuses_hs(make: Callable[..., Any], jwks_file: str) -> None:
    verifier = await make(jwks=jwks_file)
    await refused(verifier, hs256(), "alg_not_allowed")


async def test_secret_without_jwks_refuses_asymmetric(make: Callable[..., Any]) -> None:
    verifier = await make(secret=SECRET)
    await refused(verifier, es256(), "alg_not_allowed")


# -- rotation and unknown kids at a real URL


async def test_rotation_unknown_kid_refetches_once(make: Callable[..., Any], server: JwksServer) -> None:
    verifier = await make(jwks=server.url, jwks_options={"min_refetch_interval": 60})
    assert server.requests == 1
    server.doc = {"keys": [*JWKS_DOC["keys"], public_jwk(EC2_KEY, "ec-2")]}
    identity = await verifier.verify(es256("ec-2", EC2_KEY))
    assert identity.subject == "user-1"
    assert server.requests == 2
    # Known now: no more fetches.
    await verifier.verify(es256("ec-2", EC2_KEY, sub="user-2"))
    assert server.requests == 2


async def test_flood_of_unknown_kids_fetches_at_most_once_per_interval(
    make: Callable[..., Any], server: JwksServer
) -> None:
    verifier = await make(jwks=server.url, jwks_options={"min_refetch_interval": 0.5})
    tokens = [es256(f"made-up-{uuid.uuid4()}") for _ in range(40)]
    results = await asyncio.gather(*(verifier.verify(t) for t in tokens), return_exceptions=True)
    assert all(isinstance(r, AuthFailure) and r.reason == "unknown_kid" for r in results)
    for token in tokens:
        await refused(verifier, token, "unknown_kid")
    assert server.requests == 2  # start + one refetch for 80 unknown-kid tokens
    await asyncio.sleep(0.55)
    for token in tokens[:10]:
        await refused(verifier, token, "unknown_kid")
    assert server.requests == 3


async def test_unknown_kid_without_rotation(make: Callable[..., Any], jwks_file: str) -> None:
    verifier = await make(jwks=jwks_file)
    await refused(verifier, es256("nobody"), "unknown_kid")
    await refused(verifier, es256("ec-2", EC2_KEY), "unknown_kid")
    # No kid and several keys in the set: no key to pick.
    await refused(verifier, es256(None), "unknown_kid")


async def test_token_without_kid_and_a_one_key_set(make: Callable[..., Any], tmp_path: Path) -> None:
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"keys": [public_jwk(EC_KEY, "only")]}))
    verifier = await make(jwks=str(path))
    assert (await verifier.verify(es256(None))).subject == "user-1"


# -- time


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"exp": NOW - 31}, "expired"),
        ({"exp": NOW - 30}, "expired"),  # exactly at the leeway: gone
        ({"nbf": NOW + 31}, "not_yet_valid"),
        ({"iat": NOW + 31}, "not_yet_valid"),
        ({"exp": None}, "no_expiry"),
        ({"exp": "tomorrow"}, "malformed"),
        ({"exp": True}, "malformed"),
        ({"nbf": "now"}, "malformed"),
    ],
)
async def test_time_refusals(make: Callable[..., Any], over: dict[str, Any], reason: str) -> None:
    verifier = await make(secret=SECRET)
    await refused(verifier, hs256(**over), reason)


@pytest.mark.parametrize("over", [{"exp": NOW - 29}, {"nbf": NOW + 30}, {"iat": NOW + 30}, {"nbf": NOW}])
async def test_within_leeway_passes(make: Callable[..., Any], over: dict[str, Any]) -> None:
    verifier = await make(secret=SECRET)
    assert (await verifier.verify(hs256(**over))).subject == "user-1"


async def test_leeway_is_configurable(make: Callable[..., Any]) -> None:
    verifier = await make(secret=SECRET, leeway=0)
    await refused(verifier, hs256(exp=NOW), "expired")
    await refused(verifier, hs256(nbf=NOW + 1), "not_yet_valid")
    assert (await verifier.verify(hs256(exp=NOW + 1, nbf=NOW))).subject == "user-1"


async def test_eternal_exp_refused(make: Callable[..., Any]) -> None:
    verifier = await make(secret=SECRET)
    token = hand_built({"alg": "HS256"}, '{"sub": "u", "exp": Infinity}')
    await refused(verifier, token, "malformed")
    await refused(verifier, hand_built({"alg": "HS256"}, '{"sub": "u", "exp": 1e999}'), "malformed")


# -- tampering and algorithm attacks


async def test_tampered_payload_and_signature(make: Callable[..., Any], jwks_file: str) -> None:
    verifier = await make(secret=SECRET, jwks=jwks_file)
    for token in (hs256(), es256()):
        header, payload, signature = token.split(".")
        forged = b64(json.dumps(claims(sub="admin")).encode())
        await refused(verifier, f"{header}.{forged}.{signature}", "bad_signature")
        flipped = signature[:-6] + ("AAAAAA" if signature[-6:] != "AAAAAA" else "BBBBBB")
        await refused(verifier, f"{header}.{payload}.{flipped}", "bad_signature")
        await refused(verifier, f"{header}.{payload}.", "bad_signature")
    # Signed with another secret / another EC key under a known kid.
    await refused(verifier, jwt.encode(claims(), b"o" * 64, algorithm="HS256"), "bad_signature")
    await refused(verifier, es256("ec-1", EC2_KEY), "bad_signature")


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signed", [False, True])
async def test_alg_none_refused(make: Callable[..., Any], jwks_file: str, alg: str, signed: bool) -> None:
    verifier = await make(secret=SECRET, jwks=jwks_file)
    token = hand_built({"alg": alg, "typ": "JWT"}, claims(), key=SECRET if signed else None)
    assert looks_like_jwt(token)
    await refused(verifier, token, "alg_none")


async def test_confusion_hmac_with_the_rsa_public_key_jwks_only(
    make: Callable[..., Any], jwks_file: str
) -> None:
    verifier = await make(jwks=jwks_file)
    for kid in ("rsa-1", None):
        header = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
        await refused(verifier, hand_built(header, claims(), key=RSA_PEM), "alg_not_allowed")
    # The oct entry in the JWKS is never an HMAC key.
    await refused(verifier, hand_built({"alg": "HS256", "kid": "hmac"}, claims()), "alg_not_allowed")


async def test_confusion_hmac_with_the_rsa_public_key_and_a_secret(
    make: Callable[..., Any], jwks_file: str
) -> None:
    verifier = await make(secret=SECRET, jwks=jwks_file)
    # Naming the RSA key: refused before any HMAC is computed.
    await refused(
        verifier, hand_built({"alg": "HS256", "kid": "rsa-1"}, claims(), key=RSA_PEM), "alg_not_allowed"
    )
    # Naming no key: checked with the shared secret, which it was not made with.
    await refused(verifier, hand_built({"alg": "HS256"}, claims(), key=RSA_PEM), "bad_signature")
    # The same token shape with the real secret passes: the refusals above are about the key.
    assert (await verifier.verify(hand_built({"alg": "HS256"}, claims()))).subject == "user-1"


@pytest.mark.parametrize(
    ("alg", "kid"),
    [
        ("RS256", "ec-1"),  # an RSA alg for an EC key
        ("ES256", "rsa-1"),
        ("EdDSA", "ec-1"),
        ("ES384", "ec-1"),  # the wrong curve's alg
        ("PS256", "rsa-pinned"),  # the JWK pins RS256
        ("ES256K", "ec-1"),  # not supported at all
        ("HS1", "ec-1"),
    ],
)
async def test_alg_must_fit_the_key(make: Callable[..., Any], jwks_file: str, alg: str, kid: str) -> None:
    verifier = await make(secret=SECRET, jwks=jwks_file)
    token = hand_built({"alg": alg, "kid": kid}, claims())
    await refused(verifier, token, "alg_not_allowed")


async def test_crit_and_b64_headers_refused(make: Callable[..., Any]) -> None:
    verifier = await make(secret=SECRET)
    await refused(verifier, hand_built({"alg": "HS256", "crit": ["exp"], "exp": 1}, claims()), "crit_header")
    await refused(verifier, hand_built({"alg": "HS256", "b64": False}, claims()), "malformed")


# -- claims


async def test_issuer_and_audience(make: Callable[..., Any]) -> None:
    verifier = await make(secret=SECRET, issuer="https://issuer.example", audience="api")
    good = {"iss": "https://issuer.example", "aud": "api"}
    assert (await verifier.verify(hs256(**good))).subject == "user-1"
    assert (await verifier.verify(hs256(**{**good, "aud": ["other", "api"]}))).subject == "user-1"
    await refused(verifier, hs256(**{**good, "aud": "other"}), "wrong_audience")
    await refused(verifier, hs256(**{**good, "aud": ["other", "more"]}), "wrong_audience")
    await refused(verifier, hs256(**{**good, "aud": None}), "wrong_audience")
    await refused(verifier, hs256(**{**good, "aud": {"api": 1}}), "wrong_audience")
    await refused(verifier, hs256(**{**good, "iss": "https://evil.example"}), "wrong_issuer")
    await refused(verifier, hs256(**{**good, "iss": None}), "wrong_issuer")


async def test_unconfigured_issuer_and_audience_are_not_checked(make: Callable[..., Any]) -> None:
    verifier = await make(secret=SECRET)
    assert (await verifier.verify(hs256(iss="anyone", aud="anything"))).subject == "user-1"


@pytest.mark.parametrize("sub", [None, "", 42, "x" * 257, "a\nb", "  "])
async def test_subject_required(make: Callable[..., Any], sub: Any) -> None:
    verifier = await make(secret=SECRET)
    await refused(verifier, hs256(sub=sub), "no_subject")


async def test_subject_limit(make: Callable[..., Any]) -> None:
    verifier = await make(secret=SECRET)
    assert (await verifier.verify(hs256(sub="x" * 256))).subject == "x" * 256


async def test_scopes(make: Callable[..., Any]) -> None:
    verifier = await make(secret=SECRET)
    identity = await verifier.verify(hs256(scope="a b  c", scp=["d", 5, "e f", "g\x00"], role="admin"))
    assert identity.scopes == {"a", "b", "c", "d", "role:admin"}
    assert (await verifier.verify(hs256(scp="x y"))).scopes == {"x", "y"}
    assert (await verifier.verify(hs256())).scopes == frozenset()


async def test_supabase_tokens(make: Callable[..., Any], server: JwksServer) -> None:
    issuer = "https://project.supabase.co/auth/v1"
    verifier = await make(secret=SECRET, jwks=server.url, issuer=issuer, audience="authenticated")
    supabase = {
        "iss": issuer,
        "aud": "authenticated",
        "role": "authenticated",
        "email": "a@example.com",
        "session_id": "s-1",
        "is_anonymous": False,
        "sub": "8e1f0c3a-3c7e-4f2a-9d61-1d2c3b4a5f60",
    }
    legacy = jwt.encode(claims(**supabase), SECRET, algorithm="HS256", headers={"typ": "JWT"})
    current = jwt.encode(claims(**supabase), EC_KEY, algorithm="ES256", headers={"kid": "ec-1", "typ": "JWT"})
    for token in (legacy, current):
        identity = await verifier.verify(token)
        assert identity.subject == supabase["sub"]
        assert identity.scopes == {"role:authenticated"}
        assert identity.claims is not None and identity.claims["email"] == "a@example.com"


# -- malformed


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "!!!.eyJ9.sig",
        f"{b64(b'not json')}.{b64(b'{}')}.sig",
        f"{b64(b'[1, 2]')}.{b64(b'{}')}.sig",
        f"{b64(json.dumps({'typ': 'JWT'}).encode())}.{b64(b'{}')}.sig",  # no alg
        f"{b64(json.dumps({'alg': 7}).encode())}.{b64(b'{}')}.sig",
        "a.b.c",  # one base64 character: not decodable
        b64(json.dumps({"alg": "HS256"}).encode() + b" extra") + ".e30.sig",
        f"{b64(bytes([0x7B, 0xFF, 0x7D]))}.e30.sig",  # not UTF-8
        f"{b64(b'[' * 3000)}.e30.sig",  # deep nesting
    ],
)
async def test_malformed(make: Callable[..., Any], token: str) -> None:
    verifier = await make(secret=SECRET)
    await refused(verifier, token, "malformed")


async def test_malformed_payloads_and_kids(make: Callable[..., Any]) -> None:
    verifier = await make(secret=SECRET)
    await refused(verifier, hand_built({"alg": "HS256"}, "not json"), "malformed")
    await refused(verifier, hand_built({"alg": "HS256"}, "[1]"), "malformed")
    await refused(verifier, hand_built({"alg": "HS256", "kid": 5}, claims()), "malformed")
    await refused(verifier, hand_built({"alg": "HS256", "kid": "k" * 300}, claims()), "malformed")


async def test_huge_token(make: Callable[..., Any]) -> None:
    verifier = await make(secret=SECRET)
    token = hs256(pad="x" * MAX_TOKEN_LENGTH)
    assert looks_like_jwt(token)
    await refused(verifier, token, "too_long")
    await refused(verifier, "x" * (MAX_TOKEN_LENGTH + 1), "too_long")


def test_looks_like_jwt() -> None:
    assert looks_like_jwt(hs256())
    assert looks_like_jwt(es256())
    assert JwtVerifier.looks_like_jwt(hs256())
    for token in ("mk_live_abcdef", "a.b", "abc.def.ghi", "x.y.z.w", "", "a b.c.d", f"{b64(b'[]')}.e30.x"):
        assert not looks_like_jwt(token), token


# -- the cache


async def test_cached_path(make: Callable[..., Any], clock: Clock) -> None:
    verifier = await make(secret=SECRET)
    token = hs256(exp=NOW + 100)
    assert verifier.verify_cached(token) is None
    identity = await verifier.verify(token)
    assert verifier.verify_cached(token) is identity
    assert await verifier.verify(token) is identity
    clock.now = NOW + 99.9
    assert verifier.verify_cached(token) is identity
    clock.now = NOW + 100  # at exp: gone from the cache (no leeway there) ...
    assert verifier.verify_cached(token) is None
    assert verifier.cache_len() == 0
    # ... though a full verify still accepts it within the leeway.
    assert (await verifier.verify(token)).subject == "user-1"
    clock.now = NOW + 131
    await refused(verifier, token, "expired")


async def test_token_inside_leeway_only_is_not_cached(make: Callable[..., Any]) -> None:
    verifier = await make(secret=SECRET)
    token = hs256(exp=NOW - 5)
    await verifier.verify(token)
    assert verifier.verify_cached(token) is None


async def test_cache_is_bounded(make: Callable[..., Any]) -> None:
    verifier = await make(secret=SECRET, cache_size=3)
    tokens = [hs256(sub=f"user-{i}") for i in range(5)]
    for token in tokens:
        await verifier.verify(token)
    assert verifier.cache_len() == 3
    assert verifier.verify_cached(tokens[0]) is None and verifier.verify_cached(tokens[1]) is None
    assert all(verifier.verify_cached(t) is not None for t in tokens[2:])
    off = await make(secret=SECRET, cache_size=0)
    await off.verify(tokens[0])
    assert off.verify_cached(tokens[0]) is None


async def test_key_set_change_empties_the_cache(make: Callable[..., Any], tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [public_jwk(EC_KEY, "ec-1"), public_jwk(EC2_KEY, "ec-2")]}))
    verifier = await make(jwks=str(path), jwks_options={"min_refetch_interval": 0.01})
    token = es256("ec-1")
    await verifier.verify(token)
    assert verifier.verify_cached(token) is not None
    # ec-1 is withdrawn (compromised): a cached token signed with it must stop working.
    path.write_text(json.dumps({"keys": [public_jwk(EC2_KEY, "ec-2")]}))
    await asyncio.sleep(0.02)
    await refused(verifier, es256("ec-3", EC2_KEY), "unknown_kid")  # a refetch picks up the new set
    assert verifier.verify_cached(token) is None
    await refused(verifier, token, "unknown_kid")
