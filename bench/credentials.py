"""The benchmark's credentials, minted fresh for each run into its workdir (never reused, never secret).

- an API key `mk_bench_...`, stored as its SHA-256 digest in `keys.yaml` (`--api-keys-file`);
- an HS256 secret of 64 ASCII characters in `jwt-secret` (`--jwt-secret-file`) and one token signed
  with it;
- a P-256 key pair: the public half as a one-key JWKS with a `kid` in `jwks.json` (`--jwks`), one
  ES256 token signed with the private half;
- `routes.yaml` (`--routes-file`): POST /v1/embeddings needs the scope `embeddings`, which the key and
  both tokens carry, so every measured request also passes a scope rule.

Each token is the same on every request, so after the first one meshkit answers from its verified-token
cache: the rows measure a cached JWT. Tokens expire one hour after minting.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

SUBJECT = "bench"
SCOPE = "embeddings"
PATH = "/v1/embeddings"
KID = "bench-es256"
TOKEN_LIFETIME = 3600


@dataclass(frozen=True)
class Credentials:
    api_key: str
    hs256_token: str
    es256_token: str
    keys_file: Path
    secret_file: Path
    jwks_file: Path
    routes_file: Path


def _claims() -> dict[str, Any]:
    now = int(time.time())
    return {"sub": SUBJECT, "scope": SCOPE, "iat": now, "exp": now + TOKEN_LIFETIME}


def mint(workdir: Path) -> Credentials:
    """Write the key file, the secret, the JWKS and the routes file under `workdir`; the credentials."""
    api_key = "mk_bench_" + secrets.token_hex(16)
    keys_file = workdir / "keys.yaml"
    digest = hashlib.sha256(api_key.encode()).hexdigest()
    keys_file.write_text(yaml.safe_dump([{"sha256": digest, "subject": SUBJECT, "scopes": [SCOPE]}]))

    secret = secrets.token_hex(32)
    secret_file = workdir / "jwt-secret"
    secret_file.write_text(secret + "\n")
    hs256 = jwt.encode(_claims(), secret.encode(), algorithm="HS256")

    private = ec.generate_private_key(ec.SECP256R1())
    public_jwk: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(private.public_key()))
    public_jwk.update(kid=KID, use="sig", alg="ES256")
    jwks_file = workdir / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [public_jwk]}))
    es256 = jwt.encode(_claims(), private, algorithm="ES256", headers={"kid": KID})

    routes_file = workdir / "routes.yaml"
    routes_file.write_text(yaml.safe_dump({"scopes": [{"path": PATH, "methods": ["POST"], "scope": SCOPE}]}))
    return Credentials(api_key, hs256, es256, keys_file, secret_file, jwks_file, routes_file)


def tampered(token: str) -> str:
    """`token` with one signature character changed: it must be refused."""
    head, _, signature = token.rpartition(".")
    swap = "A" if signature[0] != "A" else "B"
    return f"{head}.{swap}{signature[1:]}"
