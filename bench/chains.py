"""The meshkit filter chains the benchmark runs, each on the three paths (ext_proc, ext_authz gRPC,
ext_authz HTTP), and what a request through each carries.

    body-hash   --filters body-hash                                     (rows meshkit-extproc, ...)
    key         --filters auth,body-hash,model-router, API key          (rows key-extproc, ...)
    hs256       the same, `Authorization: Bearer <HS256 JWT>` (cached)  (rows hs256-extproc, ...)
    es256       the same, `Authorization: Bearer <ES256 JWT>` (cached)  (rows es256-extproc, ...)
    key-redis   key + the rate limit in Redis, a limit that never trips  (rows key-redis-extproc, ...)

Until `model-router` is registered in FILTERS the auth chains run without it (the report says so).
"""

from __future__ import annotations

from dataclasses import dataclass

from credentials import Credentials

from meshkit.extproc.filters import FILTERS
from meshkit.render import Api

# The three paths, by the suffix of their row labels.
PATHS: dict[str, Api] = {"extproc": Api.EXT_PROC, "extauthz": Api.EXT_AUTHZ, "authzhttp": Api.EXT_AUTHZ_HTTP}

# A limit (requests per minute) no benchmark reaches (about 167k req/s): the rows measure the Redis
# round trip. Not 100,000,000: the limiter refuses more than 60,000,000 per minute (gcra.MAX_PER_MINUTE).
NEVER_TRIPS = 10_000_000


def auth_filters() -> tuple[str, ...]:
    wanted = ("auth", "body-hash", "model-router")
    return tuple(name for name in wanted if name in FILTERS)


@dataclass(frozen=True)
class Chain:
    name: str
    filters: tuple[str, ...]
    credential: str  # "none" | "api-key" | "hs256" | "es256"
    redis: bool = False  # the rate limit in Redis (`--redis URL --rate-limit NEVER_TRIPS`)

    @property
    def authenticates(self) -> bool:
        return self.credential != "none"

    def server_args(self, creds: Credentials, redis_url: str | None) -> list[str]:
        """`meshkit extproc` arguments for this chain (besides the listeners)."""
        args = ["--filters", ",".join(self.filters)]
        if not self.authenticates:
            return args
        args += ["--routes-file", str(creds.routes_file)]
        if self.credential == "api-key":
            args += ["--api-keys-file", str(creds.keys_file)]
        elif self.credential == "hs256":
            args += ["--jwt-secret-file", str(creds.secret_file)]
        else:
            args += ["--jwks", str(creds.jwks_file)]
        if self.redis:
            if redis_url is None:
                raise ValueError(f"chain {self.name} needs a Redis URL")
            args += ["--redis", redis_url, "--rate-limit", str(NEVER_TRIPS)]
        return args

    def headers(self, creds: Credentials) -> dict[str, str]:
        """The credential header every request of this chain carries."""
        if self.credential == "api-key":
            return {"x-api-key": creds.api_key}
        if self.credential == "hs256":
            return {"authorization": f"Bearer {creds.hs256_token}"}
        if self.credential == "es256":
            return {"authorization": f"Bearer {creds.es256_token}"}
        return {}


def row_label(chain: str, path: str) -> str:
    """`key-extproc`, ...; the body-hash rows keep their old names (`meshkit-extproc`, ...)."""
    return f"{'meshkit' if chain == 'body-hash' else chain}-{path}"


def meshkit_chains() -> dict[str, Chain]:
    full = auth_filters()
    return {
        c.name: c
        for c in (
            Chain("body-hash", ("body-hash",), "none"),
            Chain("key", full, "api-key"),
            Chain("hs256", full, "hs256"),
            Chain("es256", full, "es256"),
            Chain("key-redis", full, "api-key", redis=True),
        )
    }
