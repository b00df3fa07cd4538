"""auth with JWTs through a real Envoy on all three paths: HS256 from a secret file, ES256 from a JWKS
served over HTTP by this test (with a key rotation), and every way a token can be wrong."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshkit.harness.daemons import Echo, Extproc, extproc
from meshkit.harness.envoy import Envoy

from .conftest import Response, front, request

pytestmark = pytest.mark.integration

SECRET = b"s3cret-for-tests-0123456789abcdef-0123456789abcdef-0123456789abc"
ISSUER = "https://project.supabase.co/auth/v1"
AUDIENCE = "authenticated"
EC_KEY = ec.generate_private_key(ec.SECP256R1())
NEW_EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk_of(key: Any, kid: str, alg: str) -> dict[str, Any]:
    public = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
    return {**public, "kid": kid, "alg": alg, "use": "sig"}


class Jwks:
    """A JWKS endpoint on 127.0.0.1 that counts its fetches; `keys` can change (a rotation)."""

    def __init__(self) -> None:
        self.keys = [jwk_of(EC_KEY, "ec-1", "ES256"), jwk_of(RSA_KEY, "rsa-1", "RS256")]
        self.fetches = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.fetches += 1
                body = json.dumps({"keys": owner.keys}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/auth/v1/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def jwks() -> Iterator[Jwks]:
    served = Jwks()
    yield served
    served.close()


@pytest.fixture(scope="module")
def meshkit_server(workdir: Path, jwks: Jwks) -> Iterator[Extproc]:
    secret = workdir / "jwt-secret"
    secret.write_bytes(SECRET)
    args = [
        "--filters", "auth", "--jwt-secret-file", str(secret), "--jwks", jwks.url,
        "--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE,
    ]  # fmt: skip
    with extproc(workdir, args) as server:
        yield server


@pytest.fixture(scope="module", params=["ext_proc", "ext_authz", "ext_authz_http"])
def ingress(
    request: pytest.FixtureRequest, workdir: Path, upstream: Echo, meshkit_server: Extproc
) -> Iterator[Envoy]:
    with front(workdir, upstream, meshkit_server, request.param, filters=("auth",)) as proxy:
        yield proxy


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {
        "sub": "user-1",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": now + 600,
        "iat": now,
        "role": "authenticated",
        "scope": "llm read",
        **extra,
    }


def hs(payload: dict[str, Any] | None = None, alg: str = "HS256") -> str:
    return jwt.encode(payload or claims(), SECRET, algorithm=alg)


def es(payload: dict[str, Any] | None = None, key: Any = EC_KEY, kid: str = "ec-1") -> str:
    return jwt.encode(payload or claims(), key, algorithm="ES256", headers={"kid": kid})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def call(proxy: Envoy, token: str) -> Response:
    return request(
        proxy.url(path="/v1/chat/completions"), body=b"{}", headers={"authorization": f"Bearer {token}"}
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: hs(),
        lambda: hs(alg="HS512"),
        lambda: es(),
        lambda: jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "rsa-1"}),
    ],
    ids=["HS256", "HS512", "ES256", "RS256"],
)
def test_valid_tokens_reach_upstream_as_the_subject(ingress: Envoy, make: Any) -> None:
    token = make()
    for _ in range(2):  # the second one is answered from the verified-token cache
        resp = call(ingress, token)
        assert resp.status == 200, resp.body[:300]
        got = resp.upstream_headers
        assert got["x-auth-subject"] == "user-1"
        assert got["x-auth-method"] == "jwt"
        assert set(got["x-auth-scopes"].split()) >= {"llm", "read", "role:authenticated"}
        assert "authorization" not in got


def _none_token() -> str:
    return f"{b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{b64(json.dumps(claims()).encode())}."


def _confused() -> str:
    # HS256 signed with the RSA public key's PEM as the secret: what a naive verifier would accept.
    pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    payload = b64(json.dumps(claims()).encode())
    signature = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


def _tampered() -> str:
    header, _, signature = hs().split(".")
    forged = b64(json.dumps(claims(sub="admin")).encode())
    return f"{header}.{forged}.{signature}"


BAD: dict[str, Callable[[], str]] = {
    "expired": lambda: hs(claims(exp=int(time.time()) - 3600)),
    "not-yet-valid": lambda: hs(claims(nbf=int(time.time()) + 3600)),
    "tampered": _tampered,
    "alg-none": _none_token,
    "confused-alg": _confused,
    "wrong-audience": lambda: hs(claims(aud="someone-else")),
    "wrong-issuer": lambda: hs(claims(iss="https://evil.example")),
    "unknown-kid": lambda: es(key=ec.generate_private_key(ec.SECP256R1()), kid="nobody"),
    "wrong-secret": lambda: jwt.encode(claims(), b"another-secret-0123456789abcdef-0123", algorithm="HS256"),
    "malformed": lambda: "eyJhbGciOiJIUzI1NiJ9.not-json.sig",
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_tokens_get_401(ingress: Envoy, name: str) -> None:
    resp = call(ingress, BAD[name]())
    assert resp.status == 401, (name, resp.status, resp.body[:300])
    assert resp.json()["error"]["type"] == "unauthorized"
    assert resp.headers["www-authenticate"].startswith('Bearer realm="meshkit", error="invalid_token"')


def test_key_rotation_at_the_jwks_url(ingress: Envoy, jwks: Jwks) -> None:
    kid = f"ec-rotated-{ingress.listeners['ingress'][1]}"  # a fresh kid per path
    token = es(key=NEW_EC_KEY, kid=kid)
    jwks.keys = [*jwks.keys, jwk_of(NEW_EC_KEY, kid, "ES256")]
    deadline = time.monotonic() + 15  # an unknown kid refetches at most once per 10 s
    while (resp := call(ingress, token)).status != 200:
        assert resp.status == 401
        assert time.monotonic() < deadline, "the rotated key was never fetched"
        time.sleep(0.2)
    assert resp.upstream_headers["x-auth-subject"] == "user-1"


def test_unknown_kid_flood_does_not_hammer_the_jwks_url(ingress: Envoy, jwks: Jwks) -> None:
    before = jwks.fetches
    for i in range(30):
        assert call(ingress, es(key=EC_KEY, kid=f"flood-{i}")).status == 401
    assert jwks.fetches - before <= 1
