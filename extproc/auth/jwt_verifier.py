"""JWT verification for the auth filter: HS256/384/512 with a shared secret, RS/PS/ES/EdDSA with JWKS keys.

The header is checked here before PyJWT sees the token, so the rules do not depend on PyJWT's defaults:

- `alg: none` is refused in every spelling (`none`, `None`, `NONE`, ...): `alg_none`.
- A `crit` header is refused (no extension is understood: RFC 7515 §4.1.11 says reject): `crit_header`;
  so is `b64` (RFC 7797 unencoded payloads): `malformed`. `jku`/`x5u`/`jwk` are ignored: keys come only
  from the configuration, never from the token.
- HS256/384/512 verify only with the shared secret, and only for a secret at least as long as the
  hash (RFC 7518 §3.2: 32 bytes for HS256, 48 for HS384, 64 for HS512; a shorter secret is a
  `ConfigError`, an HS alg the secret is too short for is `alg_not_allowed`). An HS token whose `kid`
  names a JWKS key is refused (`alg_not_allowed`): that is the algorithm-confusion attack, an HMAC
  made with a public key as the secret. The JWKS never supplies HMAC secrets (see `jwks.py`).
- RS/PS/ES/EdDSA verify only with a JWKS key, picked by `kid`, and the token's alg must fit the key
  (its type and curve, and the JWK's own `alg` if it has one): else `alg_not_allowed`. An unknown
  `kid` makes one `jwks.refetch()` (rate-limited there) and one more lookup: else `unknown_kid`.
- PyJWT then checks the signature with exactly that one alg (`bad_signature`); its claim checks are
  off, the claims are checked here against the injected clock:
  - `exp` is required (`no_expiry`): a gateway does not accept eternal tokens. A token is `expired`
    once `exp <= now - leeway`.
  - `nbf` and `iat`, when present, must not be later than `now + leeway` (`not_yet_valid`).
  - `iss` must equal the configured issuer (`wrong_issuer`); `aud` (a string or a list of strings)
    must contain the configured audience (`wrong_audience`). Neither is checked when not configured
    (a token's `aud` is then not refused either).
  - `sub` is required: a non-empty string of at most 256 characters without control characters
    nor white space at either end (it becomes the `x-auth-subject` header, which HTTP trims: `" admin"`
    would reach the upstream as `admin`): else `no_subject`.
  Numbers must be finite JSON numbers (not booleans, not `Infinity`): else `malformed`.
- Tokens over `MAX_TOKEN_LENGTH` (8 KiB) are refused unread: `too_long`.

The Identity: `subject` = `sub`, `method` = `jwt`, `expires_at` = `exp`, `claims` = the verified claims;
`scopes` from `scope` (a space-separated string) and `scp` (a list of strings or a space-separated
string), plus `role:<role>` for a `role` claim (Supabase puts `authenticated`, `anon` or
`service_role` there), so a scope rule can require `role:service_role`. A scope that is not 1-256
printable ASCII characters without spaces is dropped (scopes travel in the `x-auth-scopes` header).

Supabase works as issued: HS256 with the project's JWT secret, or ES256/RS256 from
`https://<project>.supabase.co/auth/v1/.well-known/jwks.json`; configure `--jwt-audience authenticated`
and `--jwt-issuer https://<project>.supabase.co/auth/v1` to check those too.

`verify_cached()` is the fast path: a token that verified before, until its `exp` (no leeway),
from a bounded cache (the oldest entry goes when it is full; failures are never cached). The cache
is emptied whenever the JWKS key set changes, so a key removed from the JWKS stops working at once.
Every `AuthFailure.message` is safe for the client: it never quotes the token or its claims.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
from jwt.algorithms import HMACAlgorithm

from meshkit.errors import ConfigError
from meshkit.extproc.auth.identity import AuthFailure, Identity
from meshkit.extproc.auth.jwks import JwksSource

MAX_TOKEN_LENGTH = 8192
MAX_SUBJECT_LENGTH = 256
HS_MIN_SECRET = {"HS256": 32, "HS384": 48, "HS512": 64}
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)

_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_JSON = json.JSONDecoder()
_SCOPE = re.compile(r"[\x21-\x7e]{1,256}")
_SUBJECT_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
# Claims are checked here, against the injected clock; PyJWT checks the signature only.
_SIGNATURE_ONLY: Any = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
    "require": [],
}


def looks_like_jwt(token: str) -> bool:
    """True if `token` has a JWT's shape: three base64url segments (the last may be empty), the first
    a JSON object. Cheap (a regex and one small decode): the auth filter tells JWTs from API keys
    with it. A token over `MAX_TOKEN_LENGTH` with that shape is not decoded but answers True, so that
    `verify()` refuses it as `too_long`."""
    if token.count(".") != 2 or not _SHAPE.fullmatch(token):
        return False
    if len(token) > MAX_TOKEN_LENGTH:
        return True
    return _header(token[: token.index(".")]) is not None


def _header(segment: str) -> dict[str, Any] | None:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        decoded = _JSON.decode(raw.decode())  # str input: faster than json.loads(bytes)
    except (binascii.Error, ValueError, RecursionError):
        return None
    return decoded if isinstance(decoded, dict) else None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


class JwtVerifier:
    """Verifies bearer JWTs into an `Identity` (see the module docstring for every rule).

    `secret`: the shared HS secret (None: HS tokens are refused); `jwks`: the source of asymmetric
    keys (None: RS/PS/ES/EdDSA tokens are refused); at least one is needed. `issuer`/`audience`: the
    required `iss`/`aud` (None: not checked). `leeway`: seconds of clock skew allowed on exp/nbf/iat.
    `cache_size`: verified tokens kept for `verify_cached()` (0: no cache). `clock`: epoch seconds.
    """

    looks_like_jwt = staticmethod(looks_like_jwt)

    def __init__(
        self,
        *,
        secret: bytes | None,
        jwks: JwksSource | None,
        issuer: str | None,
        audience: str | None,
        leeway: float = 30.0,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        problems = []
        if secret is None and jwks is None:
            problems.append("jwt: neither a shared secret nor a JWKS: no JWT could verify")
        if secret is not None:
            if len(secret) < HS_MIN_SECRET["HS256"]:
                problems.append(
                    f"jwt: the shared secret is {len(secret)} bytes; HS256 needs at least 32 (RFC 7518 §3.2)"
                )
            else:
                try:
                    HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)
                except jwt.InvalidKeyError:
                    problems.append("jwt: the shared secret looks like a PEM/SSH key, not an HMAC secret")
        if not (leeway >= 0 and math.isfinite(leeway)):
            problems.append(f"jwt: leeway must be >= 0 seconds (got {leeway!r})")
        if cache_size < 0:
            problems.append(f"jwt: cache_size must be >= 0 (got {cache_size!r})")
        if problems:
            raise ConfigError(problems)
        self._secret = secret
        self._jwks = jwks
        self.issuer = issuer or None
        self.audience = audience or None
        self.leeway = float(leeway)
        self.cache_size = cache_size
        self._clock = clock
        self.hs_algorithms = frozenset(
            alg for alg, size in HS_MIN_SECRET.items() if secret is not None and len(secret) >= size
        )
        self._cache: dict[str, tuple[float, Identity]] = {}  # token -> (exp, identity), oldest first
        self._generation = jwks.generation if jwks is not None else 0

    # -- the fast path

    def verify_cached(self, token: str) -> Identity | None:
        """The Identity of a token that `verify()` accepted before and whose `exp` has not passed;
        None otherwise (then call `verify()`)."""
        hit = self._cache.get(token)
        if hit is None:
            return None
        if self._jwks is not None and self._jwks.generation != self._generation:
            self._cache.clear()  # the key set changed: a removed key must not live on in the cache
            self._generation = self._jwks.generation
            return None
        if self._clock() >= hit[0]:
            self._cache.pop(token, None)
            return None
        return hit[1]

    def _remember(self, token: str, exp: float, identity: Identity) -> None:
        if self.cache_size == 0 or exp <= self._clock():
            return
        if self._jwks is not None and self._jwks.generation != self._generation:
            self._cache.clear()
            self._generation = self._jwks.generation
        while len(self._cache) >= self.cache_size:
            del self._cache[next(iter(self._cache))]
        self._cache[token] = (exp, identity)

    def cache_len(self) -> int:
        return len(self._cache)

    # -- full verification

    async def verify(self, token: str) -> Identity:
        """The Identity of a valid token; `AuthFailure(reason, message)` otherwise."""
        cached = self.verify_cached(token)
        if cached is not None:
            return cached
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthFailure("too_long", f"the token is longer than {MAX_TOKEN_LENGTH} characters")
        if token.count(".") != 2 or not _SHAPE.fullmatch(token):
            raise AuthFailure("malformed", "the token is not a JWT (three base64url segments)")
        header = _header(token[: token.index(".")])
        if header is None:
            raise AuthFailure("malformed", "the token's header is not a base64url JSON object")
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise AuthFailure("malformed", "the token's header has no alg")
        if alg.lower() == "none":
            raise AuthFailure("alg_none", "unsigned tokens (alg none) are not accepted")
        if "crit" in header:
            raise AuthFailure("crit_header", "the token's header has crit extensions, none are supported")
        if "b64" in header:
            raise AuthFailure("malformed", "unencoded payloads (b64) are not accepted")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or not 0 < len(kid) <= 256):
            raise AuthFailure("malformed", "the token's kid is not a string of 1-256 characters")

        key: Any
        if alg in HS_MIN_SECRET:
            if self._secret is None:
                raise AuthFailure("alg_not_allowed", f"{alg} tokens are not accepted here")
            if self._jwks is not None and kid is not None and self._jwks.entry(kid) is not None:
                # The kid names a public key: an HMAC over it is the algorithm-confusion attack.
                raise AuthFailure("alg_not_allowed", f"{alg} does not fit the key the token names")
            if alg not in self.hs_algorithms:
                raise AuthFailure("alg_not_allowed", f"{alg} tokens are not accepted here")
            key = self._secret
        elif alg in ASYMMETRIC_ALGORITHMS:
            if self._jwks is None:
                raise AuthFailure("alg_not_allowed", f"{alg} tokens are not accepted here")
            entry = self._jwks.entry(kid)
            if entry is None:
                await self._jwks.refetch()
                entry = self._jwks.entry(kid)
            if entry is None:
                raise AuthFailure(
                    "unknown_kid",
                    "the token names no key (kid)" if kid is None else "the token's key (kid) is unknown",
                )
            if alg not in entry.algorithms:
                raise AuthFailure("alg_not_allowed", f"{alg} does not fit the key the token names")
            key = entry.jwk.key
        else:
            raise AuthFailure("alg_not_allowed", "the token's alg is not supported")

        try:
            claims: dict[str, Any] = jwt.decode(token, key, algorithms=[alg], options=_SIGNATURE_ONLY)
        except jwt.InvalidSignatureError:
            raise AuthFailure("bad_signature", "the token's signature does not verify") from None
        except jwt.InvalidAlgorithmError:
            raise AuthFailure("alg_not_allowed", "the token's alg is not accepted") from None
        except jwt.PyJWTError:
            raise AuthFailure("malformed", "the token cannot be decoded") from None
        identity = self._identity(claims)
        assert identity.expires_at is not None
        self._remember(token, identity.expires_at, identity)
        return identity

    def _identity(self, claims: dict[str, Any]) -> Identity:
        now = self._clock()
        if "exp" not in claims:
            raise AuthFailure("no_expiry", "the token has no exp claim; tokens must expire")
        exp = _number(claims["exp"])
        if exp is None:
            raise AuthFailure("malformed", "the token's exp claim is not a number")
        if exp <= now - self.leeway:
            raise AuthFailure("expired", "the token has expired")
        for name in ("nbf", "iat"):
            if name in claims:
                value = _number(claims[name])
                if value is None:
                    raise AuthFailure("malformed", f"the token's {name} claim is not a number")
                if value > now + self.leeway:
                    raise AuthFailure("not_yet_valid", f"the token is not valid yet ({name})")
        if self.issuer is not None and claims.get("iss") != self.issuer:
            raise AuthFailure("wrong_issuer", "the token was not issued by the expected issuer")
        if self.audience is not None:
            aud = claims.get("aud")
            audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if self.audience not in audiences:
                raise AuthFailure("wrong_audience", "the token is not meant for this audience")
        sub = claims.get("sub")
        if (
            not isinstance(sub, str)
            or not 0 < len(sub) <= MAX_SUBJECT_LENGTH
            or _SUBJECT_UNSAFE.search(sub)
            or sub != sub.strip()  # the upstream reads x-auth-subject trimmed: another subject
            or not sub
        ):
            raise AuthFailure(
                "no_subject", f"the token needs a sub claim: a string of 1-{MAX_SUBJECT_LENGTH} characters"
            )
        return Identity(
            subject=sub,
            method="jwt",
            scopes=_scopes(claims),
            expires_at=exp,
            claims=claims,
        )


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    found: list[str] = []
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            found.extend(value.split())
        elif isinstance(value, list):
            found.extend(item for item in value if isinstance(item, str))
    role = claims.get("role")
    if isinstance(role, str) and role:
        found.append("role:" + role)
    return frozenset(scope for scope in found if _SCOPE.fullmatch(scope))


MIN_SECRET_BYTES = 32


def read_secret_file(path: str) -> bytes:
    """An HS256 secret from `--jwt-secret-file` (stripped); ConfigError when unreadable or short."""
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError([f"--jwt-secret-file: cannot read {path}: {exc.strerror or exc}"]) from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            [
                f"--jwt-secret-file: {path} holds {len(secret)} bytes; an HS256 secret needs "
                f"{MIN_SECRET_BYTES} or more"
            ]
        )
    return secret
