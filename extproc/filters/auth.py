"""auth: who is calling (JWT or API key), may they call this route (scopes), how often (rate limits).

Decided on the request headers alone (over ext_proc a refused request's body never reaches meshkit):

1. Every `x-auth-*` header the client sent is removed: a client never chooses its identity.
2. The credential: `x-api-key: <key>`, or `Authorization: Bearer <token>` — an API key when it starts
   with `--api-key-prefix` (default `mk_`), else a JWT. None, or both kinds at once: 401.
3. JWT (`--jwt-secret-file` for HS256/384/512, `--jwks FILE|URL` for RS/ES/EdDSA; `--jwt-issuer`,
   `--jwt-audience`): see `meshkit.extproc.auth.jwt_verifier`. API key (`--api-keys-file`,
   `--api-keys-redis`): see `meshkit.extproc.auth.api_keys`. A bad one: 401 JSON
   `{"error": {"type": "unauthorized", ...}}` with `WWW-Authenticate: Bearer ...` (RFC 6750).
4. Scope rules from `--routes-file`: a missing scope is 403 `forbidden` (every reading of the method
   and path an upstream may give counts: see `Routes.required_scopes`).
5. Rate limit per subject (`--rate-limit` requests per minute, or the key's own `rate_limit`; JWT
   subjects and API-key subjects are counted apart, see `_limit_subject`), in Redis
   (`--redis`) so replicas share it: over it, 429 with `Retry-After` and `x-ratelimit-*`; admitted
   answers carry `x-ratelimit-limit/remaining/reset` too. `--rate-limit-on-redis-down` chooses what
   happens without Redis: `local` (each replica its share), `open`, `closed` (503).
6. Success: `x-auth-subject`, `x-auth-method` (`jwt`/`api-key`), `x-auth-scopes` (space-separated) go
   upstream; the credential does not, unless `--forward-credentials`.
7. Events (`--nats`): `<prefix>.auth.success` / `.failure`, fire-and-forget; see `auth.events`.

Anything not configured is off; with no credential source at all the filter refuses to start. It
fails closed: the rendered Envoy refuses requests when meshkit is down.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from meshkit.errors import ConfigError
from meshkit.extproc.auth.api_keys import MAX_KEY_LENGTH, ApiKeyFile, RedisApiKeys, digest_of
from meshkit.extproc.auth.gcra import MAX_PER_MINUTE
from meshkit.extproc.auth.identity import AuthFailure, Identity
from meshkit.extproc.filter import Exchange, Filter, Reply
from meshkit.extproc.routes_file import Routes, RoutesOptions, load_routes
from meshkit.options import option, parse_non_negative_int, parse_seconds

__all__ = ["AuthFilter", "AuthOptions"]

log = logging.getLogger("meshkit.extproc.auth")

SUBJECT, METHOD, SCOPES = "x-auth-subject", "x-auth-method", "x-auth-scopes"
AUTH_PREFIX = "x-auth-"
RATE_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces
DOWN_MODES = ("local", "open", "closed")


def _per_minute(value: Any) -> int:
    number = parse_non_negative_int(value)
    if number > MAX_PER_MINUTE:
        raise ValueError(f"at most {MAX_PER_MINUTE:,} requests per minute (one a microsecond)")
    return number


def _event_prefix(value: Any) -> str:
    from meshkit.extproc.auth.events import validate_prefix  # nats-py only when auth is configured

    return validate_prefix(str(value))


@dataclass(frozen=True)
class AuthOptions:
    jwt_secret_file: str = option(
        "", "file holding the HS256/384/512 JWT secret; empty: HS tokens off", metavar="FILE"
    )
    jwks: str = option("", "JWKS file or http(s) URL for RS/ES/EdDSA JWTs; empty: off", metavar="FILE|URL")
    jwt_issuer: str = option("", "required `iss` of JWTs; empty: not checked", metavar="ISS")
    jwt_audience: str = option(
        "", "required `aud` of JWTs (e.g. authenticated); empty: not checked", metavar="AUD"
    )
    jwt_leeway: float = option(
        30.0, "clock skew allowed on exp/nbf/iat", parse=parse_seconds, metavar="SECONDS"
    )
    api_keys_file: str = option(
        "", "YAML list of API keys as SHA-256 digests, reloaded on change; empty: off", metavar="FILE"
    )
    api_keys_redis: bool = option(False, "also look API keys up in Redis (--redis), cached for 5 s")
    api_key_prefix: str = option("mk_", "a Bearer token with this prefix is an API key, not a JWT")
    forward_credentials: bool = option(False, "pass Authorization / x-api-key on to the upstream")
    redis: str = option(
        "",
        "Redis URL for rate limits and API keys (redis://host:port/0); empty: off",
        metavar="URL",
        secret=True,
    )
    rate_limit: int = option(
        0,
        "requests per minute per subject (an API key's rate_limit wins); 0: none",
        parse=_per_minute,
        metavar="N",
    )
    rate_limit_on_redis_down: str = option(
        "local", "without Redis: local (each replica its share), open, closed (503)", choices=DOWN_MODES
    )
    rate_limit_replicas: int = option(
        1,
        "replicas sharing the limit: the share each enforces while Redis is down",
        parse=parse_non_negative_int,
        metavar="N",
    )
    nats: str = option(
        "", "NATS URL for auth events and the heartbeat; empty: off", metavar="URL", secret=True
    )
    event_prefix: str = option(
        "meshkit", "subject prefix of the events (<prefix>.auth.success, ...)", parse=_event_prefix
    )

    def __post_init__(self) -> None:
        if self.api_keys_redis and not self.redis:
            raise ValueError("--api-keys-redis needs --redis")
        if self.rate_limit_replicas < 1:
            raise ValueError("--rate-limit-replicas must be 1 or more")


def _masked(url: str) -> str:
    """`url` (or a comma-separated list of them, as --nats takes) without its credentials, for the
    start-up line: the user part too (a NATS token is `nats://TOKEN@host`) and the query (redis-py
    reads `?password=`)."""
    return ",".join(_masked_one(u.strip()) for u in url.split(","))


def _masked_one(url: str) -> str:
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<url not shown>"
    if "@" not in parts.netloc and not parts.query:
        return url
    host = f"[{host}]" if ":" in host else host
    netloc = ("***@" if "@" in parts.netloc else "") + host + (f":{port}" if port else "")
    return urlunsplit(parts._replace(netloc=netloc, query="***" if parts.query else ""))


def _challenge(error: str | None = None, description: str = "", scope: str = "") -> str:
    value = 'Bearer realm="meshkit"'
    if error:
        value += f', error="{error}"'
    if description:
        value += f', error_description="{description}"'
    if scope:
        value += f', scope="{scope}"'
    return value


def _unauthorized(message: str, error: str | None = "invalid_token") -> Reply:
    # RFC 6750 3.1: a request without credentials gets the bare challenge, no error code.
    safe = message.replace('"', "'") if error else ""
    return Reply.error(401, "unauthorized", message, headers=(("www-authenticate", _challenge(error, safe)),))


_MISSING = _unauthorized("missing credentials: send Authorization: Bearer <token> or x-api-key", None)
_TWO = _unauthorized("send one credential: Authorization or x-api-key, not both", "invalid_request")
_NOT_A_KEY = _unauthorized("the API key is not valid", "invalid_token")
_NOT_BEARER = _unauthorized("Authorization must be `Bearer <token>`", "invalid_request")


class AuthFilter(Filter):
    name: ClassVar[str] = "auth"
    Options: ClassVar[type[AuthOptions]] = AuthOptions
    extra_sections: ClassVar[tuple[type[Any], ...]] = (RoutesOptions,)
    reads_headers: ClassVar[frozenset[str]] = frozenset({"authorization", "x-api-key", "x-forwarded-for"})
    reads_header_prefixes: ClassVar[frozenset[str]] = frozenset({AUTH_PREFIX})
    sets_headers: ClassVar[frozenset[str]] = frozenset({SUBJECT, METHOD, SCOPES})
    answer_headers: ClassVar[frozenset[str]] = frozenset(RATE_HEADERS)
    fail_open: ClassVar[bool] = False  # it guards access: meshkit down means refused

    def __init__(self, options: AuthOptions, routes: Routes | None = None) -> None:
        super().__init__(options)
        self.options: AuthOptions = options
        self.routes = routes or Routes()
        self._prefix = options.api_key_prefix
        self._forward = options.forward_credentials
        self._default_limit = options.rate_limit
        self._key_file = ApiKeyFile(options.api_keys_file) if options.api_keys_file else None
        self._redis: Any = None
        self._redis_keys: RedisApiKeys | None = None
        self._jwt: Any = None  # JwtVerifier
        self._jwks: Any = None  # JwksSource
        self._limiter: Any = None  # RateLimiter
        self._events: Any = None  # EventPublisher
        self._collectors: list[Any] = [_DecisionsCollector(self)]
        # (credential method or "none", reason) -> requests: why requests were refused, and how many passed
        self.decisions: dict[tuple[str, str], int] = {}
        if not (options.jwt_secret_file or options.jwks or options.api_keys_file or options.api_keys_redis):
            raise ConfigError(
                [
                    "auth: no credential source: give --jwt-secret-file, --jwks, --api-keys-file "
                    "or --api-keys-redis"
                ]
            )
        if self._key_file is not None:
            self._collectors.extend(self._key_file.collectors())
        self._build_parts()

    @classmethod
    def from_options(cls, options: Any) -> AuthFilter:
        own = options.get(AuthOptions) or AuthOptions()
        routes = options.get(RoutesOptions) or RoutesOptions()
        return cls(own, load_routes(routes.routes_file))

    def _build_parts(self) -> None:
        o = self.options
        if o.jwt_secret_file or o.jwks:
            from meshkit.extproc.auth.jwks import JwksSource
            from meshkit.extproc.auth.jwt_verifier import JwtVerifier, read_secret_file

            secret = read_secret_file(o.jwt_secret_file) if o.jwt_secret_file else None
            self._jwks = JwksSource(o.jwks) if o.jwks else None
            self._jwt = JwtVerifier(
                secret=secret,
                jwks=self._jwks,
                issuer=o.jwt_issuer or None,
                audience=o.jwt_audience or None,
                leeway=o.jwt_leeway,
            )
            if self._jwks is not None:
                self._collectors.extend(self._jwks.collectors())
        if o.redis and o.api_keys_redis:
            import redis.asyncio as aioredis

            self._redis = aioredis.Redis.from_url(o.redis, socket_timeout=0.2, socket_connect_timeout=0.2)
            self._redis_keys = RedisApiKeys(self._redis)
            self._collectors.extend(self._redis_keys.collectors())
        if o.rate_limit or o.api_keys_file or o.api_keys_redis:
            from meshkit.extproc.auth.rate_limit import RateLimiter

            self._limiter = RateLimiter(
                o.redis or None, on_redis_down=o.rate_limit_on_redis_down, replicas=o.rate_limit_replicas
            )
            self._collectors.extend(self._limiter.collectors())
        if o.nats:
            from meshkit.extproc.auth.events import EventPublisher

            self._events = EventPublisher(o.nats, prefix=o.event_prefix)
            self._collectors.extend(self._events.collectors())

    def collectors(self) -> Iterable[Any]:
        return tuple(self._collectors)

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._key_file is not None:
            await self._key_file.start()
        if self._jwks is not None:
            await self._jwks.start()
        if self._limiter is not None:
            await self._limiter.start()
        if self._events is not None:
            await self._events.start()
        log.info("auth: %s", self.summary())

    async def close(self) -> None:
        for part in (self._events, self._limiter, self._jwks, self._key_file):
            if part is not None:
                await part.close()
        if self._redis is not None:
            await self._redis.aclose()

    def summary(self) -> str:
        """What is on, for the start-up log (never a secret)."""
        o = self.options
        on = []
        if o.jwt_secret_file:
            on.append(f"jwt HS256/384/512 (secret from {o.jwt_secret_file})")
        if o.jwks:
            on.append(f"jwt from JWKS {_masked(o.jwks)}")
        if o.jwt_issuer or o.jwt_audience:
            on.append(f"iss={o.jwt_issuer or '-'} aud={o.jwt_audience or '-'}")
        if self._key_file is not None:
            on.append(f"api keys {o.api_keys_file} ({len(self._key_file)} keys, prefix {o.api_key_prefix})")
        if o.api_keys_redis:
            on.append(f"api keys in redis {_masked(o.redis)}")
        if self.routes.scopes:
            on.append(f"{len(self.routes.scopes)} scope rules")
        if self._limiter is not None:
            where = f"redis {_masked(o.redis)}" if o.redis else "memory (no --redis)"
            on.append(
                f"rate limit {o.rate_limit or 'per key'}/min in {where}, on redis down: "
                f"{o.rate_limit_on_redis_down} (replicas {o.rate_limit_replicas})"
            )
        if self._events is not None:
            on.append(f"events on {_masked(o.nats)} as {o.event_prefix}.auth.*")
        on.append("credentials forwarded" if self._forward else "credentials removed before the upstream")
        return "; ".join(on)

    # -- the request ---------------------------------------------------------------------------------
    async def on_request_headers(self, exchange: Exchange) -> Reply | None:
        headers = exchange.headers
        for name in headers:
            if name.startswith(AUTH_PREFIX):
                exchange.remove_header(name)
        try:
            identity = await self._identify(headers.get("authorization"), headers.get("x-api-key"))
        except _Refused as refused:
            self._event(exchange, "auth.failure", None, refused.reason)
            return refused.reply
        needed = self.routes.required_scopes(headers.get(":method", ""), headers.get(":path", ""))
        missing = [scope for scope in needed if scope not in identity.scopes]
        if missing:
            self._event(exchange, "auth.failure", identity, "missing_scope")
            return Reply.error(
                403,
                "forbidden",
                f"this route needs the scope{'s' if len(missing) > 1 else ''} "
                + ", ".join(repr(scope) for scope in missing),
                headers=(("www-authenticate", _challenge("insufficient_scope", scope=" ".join(missing))),),
            )
        limit = identity.rate_limit or self._default_limit
        if limit and self._limiter is not None:
            decision = await self._limiter.check(_limit_subject(identity), limit)
            rate = _rate_headers(decision)
            if not decision.allowed:
                self._event(exchange, "auth.failure", identity, "rate_limited")
                retry = str(max(1, math.ceil(decision.retry_after)))
                return Reply.error(
                    429,
                    "rate_limit_exceeded",
                    f"rate limit of {decision.limit} requests per minute exceeded; retry in {retry} s",
                    headers=(("retry-after", retry), *rate),
                )
            for name, value in rate:
                exchange.set_answer_header(name, value)
        exchange.set_header(SUBJECT, identity.subject)
        exchange.set_header(METHOD, identity.method)
        exchange.set_header(SCOPES, " ".join(sorted(identity.scopes)))
        if not self._forward:
            exchange.remove_header("authorization")
            exchange.remove_header("x-api-key")
        self._event(exchange, "auth.success", identity, "ok")
        return None

    async def _identify(self, authorization: str | None, api_key: str | None) -> Identity:
        token: str | None = None
        if authorization is not None:
            scheme, _, token = authorization.strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise _Refused("malformed", _NOT_BEARER)
        if api_key is not None and token is not None:
            raise _Refused("two_credentials", _TWO)
        if api_key is None and token is not None and self._prefix and token.startswith(self._prefix):
            api_key = token
        if api_key is not None:
            return await self._api_key(api_key.strip())
        if token is None:
            raise _Refused("missing", _MISSING)
        return await self._jwt_identity(token)

    async def _api_key(self, key: str) -> Identity:
        if not key or len(key) > MAX_KEY_LENGTH or not _KEY_CHARS.fullmatch(key):
            raise _Refused("malformed", _NOT_A_KEY)
        digest = digest_of(key)
        found = self._key_file.lookup_digest(digest) if self._key_file is not None else None
        if found is None and self._redis_keys is not None:
            found = await self._redis_keys.lookup_digest(digest)
        if found is None:
            raise _Refused("unknown_key", _NOT_A_KEY)
        try:
            return found.identity(time.time())
        except AuthFailure as exc:
            raise _Refused(exc.reason, _unauthorized(exc.message)) from None

    async def _jwt_identity(self, token: str) -> Identity:
        verifier = self._jwt
        if verifier is None:
            raise _Refused("jwt_off", _unauthorized("JWTs are not accepted here; use an API key"))
        cached: Identity | None = verifier.verify_cached(token)
        if cached is not None:
            return cached
        try:
            identity: Identity = await verifier.verify(token)
        except AuthFailure as exc:
            raise _Refused(exc.reason, _unauthorized(exc.message)) from None
        return identity

    def _event(self, exchange: Exchange, kind: str, identity: Identity | None, reason: str) -> None:
        key = (identity.method if identity else "none", reason)
        self.decisions[key] = self.decisions.get(key, 0) + 1  # a dict: prometheus' Counter costs ~10 µs
        if self._events is None:
            return
        headers = exchange.headers
        forwarded = headers.get("x-forwarded-for", "")
        self._events.emit(
            kind,
            {
                "ts": time.time(),
                "subject": identity.subject if identity else None,
                "method": identity.method if identity else None,
                "reason": reason,
                "path": headers.get(":path", "").split("?", 1)[0][:512],  # a query may hold secrets
                "client_ip": forwarded.rsplit(",", 1)[-1].strip()[:64] or None,
                "request_id": exchange.request_id,
            },
        )


def _limit_subject(identity: Identity) -> str:
    """The rate limiter's subject: the identity's subject within its method's namespace. A JWT's `sub`
    is the issuer's to choose, an API key's subject the key file's (or Redis'): a token minted with
    `sub: billing-service` must not spend the budget of the service whose keys carry that subject
    (nor the other way round), and one bucket under two different limits (a key's rate_limit, the
    default for JWTs) would follow neither. Several keys of one subject still share their limit."""
    return f"{identity.method}:{identity.subject}"


def _rate_headers(decision: Any) -> tuple[tuple[str, str], ...]:
    return (
        ("x-ratelimit-limit", str(decision.limit)),
        ("x-ratelimit-remaining", str(max(0, decision.remaining))),
        ("x-ratelimit-reset", str(max(0, math.ceil(decision.reset_after)))),
    )


class _Refused(Exception):
    def __init__(self, reason: str, reply: Reply) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


class _DecisionsCollector(Collector):
    """`meshkit_auth_decisions_total{method,reason}`: every request the filter decided, by credential
    method (`jwt`, `api-key`, `none` when none was valid) and reason (`ok`, `unknown_key`, `expired`,
    `missing_scope`, `rate_limited`, ...): the same reasons as the events, without NATS."""

    def __init__(self, auth: AuthFilter) -> None:
        self._auth = auth

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "meshkit_auth_decisions", "Requests decided by the auth filter", labels=["method", "reason"]
        )
        for (method, reason), count in sorted(self._auth.decisions.items()):
            family.add_metric([method, reason], count)
        yield family
