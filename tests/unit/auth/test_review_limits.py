"""Review: rate-limit subjects. Found: a JWT whose `sub` equals an API key's subject shared that key's
bucket, so a token minted with `sub: billing-service` spent the service's budget (and one bucket ran
under two different limits). JWT and API-key subjects are now counted apart; keys of one subject still
share their limit. And a JWT `sub` with leading or trailing white space is refused: the upstream reads
the header trimmed (another subject than the one meshkit limited and logged)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from meshkit.extproc.auth.identity import AuthFailure
from meshkit.extproc.auth.jwt_verifier import JwtVerifier
from meshkit.extproc.chain import Chain
from meshkit.extproc.filter import Exchange, Phase, Reply
from meshkit.extproc.filters.auth import AuthFilter, AuthOptions

SECRET = b"0123456789abcdef" * 5
KEY_A = "mk_first_0123456789abcdef"
KEY_B = "mk_second_0123456789abcdef"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def token(sub: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "exp": now + 600, "iat": now}, SECRET, algorithm="HS256")


async def run(f: AuthFilter, **headers: str) -> Reply | None:
    ex = Exchange({":method": "POST", ":path": "/v1/chat", **headers})
    return await Chain([f]).run(Phase.REQUEST_HEADERS, ex)


async def test_a_jwt_sub_does_not_spend_an_api_key_subjects_limit(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            [
                {"sha256": sha(KEY_A), "subject": "billing-service", "rate_limit": 3},
                {"sha256": sha(KEY_B), "subject": "billing-service", "rate_limit": 3},
            ]
        )
    )
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    f = AuthFilter(AuthOptions(api_keys_file=str(keys), jwt_secret_file=str(secret), rate_limit=3))
    await f.start()
    try:
        forged = token("billing-service")  # e.g. minted by anything holding the HS secret
        for _ in range(3):
            assert await run(f, authorization=f"Bearer {forged}") is None
        refused = await run(f, authorization=f"Bearer {forged}")
        assert refused is not None and refused.status == 429
        # The service's own budget is whole: 3 across its two keys (they share it), then 429.
        assert await run(f, **{"x-api-key": KEY_A}) is None
        assert await run(f, **{"x-api-key": KEY_B}) is None
        assert await run(f, **{"x-api-key": KEY_A}) is None
        over = await run(f, **{"x-api-key": KEY_B})
        assert over is not None and over.status == 429
    finally:
        await f.close()


@pytest.mark.parametrize("sub", [" admin", "admin ", "\u00a0admin", "admin\u2003"])
async def test_a_sub_with_outer_white_space_is_refused(sub: str) -> None:
    verifier = JwtVerifier(secret=SECRET, jwks=None, issuer=None, audience=None)
    with pytest.raises(AuthFailure) as info:
        await verifier.verify(token(sub))
    assert info.value.reason == "no_subject"


@pytest.mark.parametrize("sub", ["admin", "a b", "user@example.com", "ünï"])
async def test_ordinary_subs_still_pass(sub: str) -> None:
    verifier = JwtVerifier(secret=SECRET, jwks=None, issuer=None, audience=None)
    identity: Any = await verifier.verify(token(sub))
    assert identity.subject == sub


@pytest.mark.parametrize("subject", [" svc", "svc ", "\u00a0svc"])
def test_a_key_subject_with_outer_white_space_is_refused(subject: str) -> None:
    from meshkit.extproc.auth.api_keys import parse_key_table

    with pytest.raises(ValueError, match="no space at either end"):
        parse_key_table(yaml.safe_dump([{"sha256": sha(KEY_A), "subject": subject}]), "keys.yaml")
