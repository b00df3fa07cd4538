"""The auth filter without servers: credentials (API key in x-api-key or Bearer, JWT), refusals and their
challenges, identity headers, scopes, the local rate limit, events, the start-up summary, and the
options from flags, environment and YAML (and the CLI's one-line error without a credential source)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from meshkit.errors import ConfigError
from meshkit.extproc.chain import Chain
from meshkit.extproc.daemon import DAEMON
from meshkit.extproc.filter import Exchange, Phase, Reply
from meshkit.extproc.filters.auth import AuthFilter, AuthOptions
from meshkit.extproc.routes_file import Routes, RoutesOptions, ScopeRule
from meshkit.options import load_yaml_section, resolve

KEY = "mk_unit_0123456789abcdef"
LIMITED = "mk_limited_0123456789abcdef"
EXPIRED = "mk_expired_0123456789abcdef"
REVOKED = "mk_revoked_0123456789abcdef"
CUSTOM = "sk-custom-0123456789abcdef"
SECRET = b"0123456789abcdef" * 5  # 80 bytes: HS256/384/512
MESHKIT = Path(sys.executable).with_name("meshkit")


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


KEYS = [
    {"sha256": sha(KEY), "subject": "svc-unit", "scopes": ["llm", "embeddings"]},
    {"sha256": sha(LIMITED), "subject": "svc-limited", "scopes": ["llm"], "rate_limit": 2},
    {"sha256": sha(EXPIRED), "subject": "svc-expired", "expires_at": "2020-01-01T00:00:00Z"},
    {"sha256": sha(REVOKED), "subject": "svc-revoked", "revoked": True},
    {"sha256": sha(CUSTOM), "subject": "svc-custom"},
]
ROUTES = Routes(scopes=(ScopeRule("/v1/admin", "admin"), ScopeRule("/v1/", "llm")))


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump(KEYS))
    return path


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "jwt-secret"
    path.write_bytes(SECRET + b"\n")
    return path


Make = Callable[..., Awaitable[AuthFilter]]


@pytest.fixture
async def make(keys_file: Path) -> AsyncIterator[Make]:
    started: list[AuthFilter] = []

    async def build(routes: Routes | None = ROUTES, **options: Any) -> AuthFilter:
        options.setdefault("api_keys_file", str(keys_file))
        f = AuthFilter(AuthOptions(**options), routes)
        await f.start()
        started.append(f)
        return f

    yield build
    for f in started:
        await f.close()


def request(path: str = "/v1/chat/completions", method: str = "POST", **headers: str) -> Exchange:
    return Exchange({":method": method, ":path": path, "x-request-id": "req-1", **headers})


async def run(f: AuthFilter, exchange: Exchange) -> Reply | None:
    return await Chain([f]).run(Phase.REQUEST_HEADERS, exchange)


def error_of(reply: Reply | None) -> dict[str, Any]:
    assert reply is not None
    assert dict(reply.headers)["content-type"] == "application/json"
    error: dict[str, Any] = json.loads(reply.body)["error"]
    return error


def challenge(reply: Reply | None) -> str:
    assert reply is not None
    return dict(reply.headers)["www-authenticate"]


def token(**claims: Any) -> str:
    now = int(time.time())
    body = {"sub": "user-1", "exp": now + 600, "iat": now, **claims}
    return jwt.encode(body, SECRET, algorithm="HS256")


# -- credentials -------------------------------------------------------------------------------------
async def test_api_key_in_x_api_key_sets_identity_and_drops_client_auth_headers(make: Make) -> None:
    f = await make()
    ex = request(
        **{"x-api-key": KEY, "x-auth-subject": "admin", "x-auth-anything-else": "x", "x-authority": "kept"}
    )
    assert await run(f, ex) is None
    sets, removes, _ = ex.take_mutations()
    assert sets == {
        "x-auth-subject": "svc-unit",
        "x-auth-method": "api-key",
        "x-auth-scopes": "embeddings llm",
    }
    assert {"x-auth-anything-else", "x-api-key"} <= removes
    assert "x-auth-subject" not in removes  # set, not removed: the client's value is overwritten
    assert "x-authority" not in removes  # not the x-auth- prefix


async def test_client_auth_headers_removed_even_when_refused_nothing_applies(make: Make) -> None:
    f = await make()
    ex = request(**{"x-auth-subject": "admin"})
    reply = await run(f, ex)
    assert reply is not None and reply.status == 401
    assert ex.take_mutations() == ({}, set(), False)  # a refusal drops every change


async def test_client_auth_header_removed_when_identity_does_not_set_it(make: Make) -> None:
    f = await make()
    ex = Exchange({":method": "GET", ":path": "/other", "x-api-key": KEY, "x-auth-role": "root"})
    assert await f.on_request_headers(ex) is None
    _, removes, _ = ex.take_mutations()
    assert "x-auth-role" in removes


async def test_api_key_as_bearer_with_the_prefix(make: Make) -> None:
    f = await make()
    ex = request(authorization=f"Bearer {KEY}")
    assert await run(f, ex) is None
    sets, removes, _ = ex.take_mutations()
    assert sets["x-auth-subject"] == "svc-unit"
    assert sets["x-auth-method"] == "api-key"
    assert "authorization" in removes


async def test_bearer_scheme_is_case_insensitive(make: Make) -> None:
    f = await make()
    assert await run(f, request(authorization=f"bearer   {KEY}  ")) is None


async def test_a_custom_api_key_prefix(make: Make) -> None:
    f = await make(api_key_prefix="sk-", routes=None)
    ex = request(authorization=f"Bearer {CUSTOM}")
    assert await run(f, ex) is None
    assert ex.take_mutations()[0]["x-auth-subject"] == "svc-custom"
    # an mk_ key is no longer a key in Bearer: a JWT, and JWTs are off here
    reply = await run(f, request(authorization=f"Bearer {KEY}"))
    assert reply is not None and reply.status == 401
    assert "JWTs are not accepted" in error_of(reply)["message"]
    # x-api-key takes any key, whatever its prefix
    assert await run(f, request(**{"x-api-key": KEY})) is None


@pytest.mark.parametrize("authorization", ["Bearer", "Bearer   ", "Basic dXNlcjpwYXNz", "Token mk_x", "mk_x"])
async def test_malformed_authorization_is_invalid_request(make: Make, authorization: str) -> None:
    reply = await run(await make(), request(authorization=authorization))
    assert reply is not None and reply.status == 401
    assert error_of(reply)["type"] == "unauthorized"
    assert challenge(reply).startswith('Bearer realm="meshkit", error="invalid_request"')


async def test_both_credentials_is_401(make: Make) -> None:
    reply = await run(await make(), request(authorization=f"Bearer {KEY}", **{"x-api-key": KEY}))
    assert reply is not None and reply.status == 401
    assert 'error="invalid_request"' in challenge(reply)
    assert "not both" in error_of(reply)["message"]


async def test_missing_credentials_get_the_bare_challenge(make: Make) -> None:
    reply = await run(await make(), request())
    assert reply is not None and reply.status == 401
    assert challenge(reply) == 'Bearer realm="meshkit"'
    assert error_of(reply)["type"] == "unauthorized"


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("mk_unknown_0123456789", "not valid"),
        (EXPIRED, "expired"),
        (REVOKED, "revoked"),
        ("mk_" + "x" * 300, "not valid"),
        ("mk_ü", "not valid"),
        ("", "not valid"),
    ],
)
async def test_bad_api_keys_are_invalid_token(make: Make, key: str, reason: str) -> None:
    reply = await run(await make(), request(**{"x-api-key": key}))
    assert reply is not None and reply.status == 401
    assert 'error="invalid_token"' in challenge(reply)
    message = error_of(reply)["message"]
    assert reason in message
    if key:
        assert key not in reply.body.decode() and key not in challenge(reply)


async def test_credentials_forwarded_when_asked(make: Make) -> None:
    f = await make(forward_credentials=True)
    ex = request(authorization=f"Bearer {KEY}", **{"x-auth-method": "jwt"})
    assert await run(f, ex) is None
    sets, removes, _ = ex.take_mutations()
    assert "authorization" not in removes and "x-api-key" not in removes
    assert sets["x-auth-method"] == "api-key"


# -- scopes ------------------------------------------------------------------------------------------
async def test_missing_scope_is_403_with_insufficient_scope(make: Make) -> None:
    f = await make()
    reply = await run(f, request("/v1/admin/users?x=1", "GET", **{"x-api-key": KEY}))
    assert reply is not None and reply.status == 403
    assert error_of(reply)["type"] == "forbidden"
    assert challenge(reply) == 'Bearer realm="meshkit", error="insufficient_scope", scope="admin"'
    assert await run(f, request("/v1/embeddings", **{"x-api-key": KEY})) is None  # has llm
    reply = await run(f, request("/v1/embeddings", **{"x-api-key": CUSTOM}))  # no scopes at all
    assert reply is not None and reply.status == 403
    assert await run(f, request("/health", "GET", **{"x-api-key": CUSTOM})) is None  # no rule


# -- JWT -----------------------------------------------------------------------------------------------
async def test_jwt_with_an_hs256_secret_file(make: Make, secret_file: Path) -> None:
    f = await make(jwt_secret_file=str(secret_file), jwt_audience="authenticated", api_keys_file="")
    good = token(aud="authenticated", scope="llm extra", role="service_role")
    ex = request(authorization=f"Bearer {good}", **{"x-auth-scopes": "admin"})
    assert await run(f, ex) is None
    sets, removes, _ = ex.take_mutations()
    assert sets == {
        "x-auth-subject": "user-1",
        "x-auth-method": "jwt",
        "x-auth-scopes": "extra llm role:service_role",
    }
    assert "authorization" in removes
    again = request(authorization=f"Bearer {good}")  # the cached path gives the same identity
    assert await run(f, again) is None
    assert again.take_mutations()[0]["x-auth-subject"] == "user-1"

    for bad, reason in [
        (token(aud="other"), "aud"),
        (token(aud="authenticated", exp=int(time.time()) - 3600), "expired"),
        (jwt.encode({"sub": "x", "exp": int(time.time()) + 60}, b"w" * 64, algorithm="HS256"), "signature"),
        ("not.a.jwt", ""),
    ]:
        reply = await run(f, request(authorization=f"Bearer {bad}"))
        assert reply is not None and reply.status == 401, bad
        assert 'error="invalid_token"' in challenge(reply)
        assert reason in error_of(reply)["message"].lower() + challenge(reply).lower(), (bad, reply)
        assert bad not in reply.body.decode()


async def test_jwt_scope_rule(make: Make, secret_file: Path) -> None:
    f = await make(jwt_secret_file=str(secret_file), api_keys_file="")
    reply = await run(f, request("/v1/admin", authorization=f"Bearer {token(scope='llm')}"))
    assert reply is not None and reply.status == 403
    assert await run(f, request("/v1/admin", authorization=f"Bearer {token(scope='admin')}")) is None


async def test_api_key_when_only_jwts_are_configured(make: Make, secret_file: Path) -> None:
    f = await make(jwt_secret_file=str(secret_file), api_keys_file="")
    reply = await run(f, request(**{"x-api-key": KEY}))
    assert reply is not None and reply.status == 401


def test_a_short_jwt_secret_is_a_config_error(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"x" * 31)
    with pytest.raises(ConfigError, match="32 or more"):
        AuthFilter(AuthOptions(jwt_secret_file=str(short)))
    with pytest.raises(ConfigError, match="cannot read"):
        AuthFilter(AuthOptions(jwt_secret_file=str(tmp_path / "absent")))


# -- configuration -------------------------------------------------------------------------------------
def test_no_credential_source_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no credential source"):
        AuthFilter(AuthOptions())
    with pytest.raises(ConfigError, match="no credential source"):
        AuthFilter(AuthOptions(rate_limit=10, redis="redis://127.0.0.1:1/0"))


def test_api_keys_redis_needs_redis() -> None:
    with pytest.raises(ValueError, match="--api-keys-redis needs --redis"):
        AuthOptions(api_keys_redis=True)


def test_summary_never_holds_a_secret(secret_file: Path, keys_file: Path) -> None:
    f = AuthFilter(
        AuthOptions(
            jwt_secret_file=str(secret_file),
            api_keys_file=str(keys_file),
            api_keys_redis=True,
            redis="redis://meshkit:hunter2pw@127.0.0.1:6379/0",
            nats="nats://natsuser:natspw99@127.0.0.1:4222",
            rate_limit=60,
        ),
        ROUTES,
    )
    text = f.summary()
    for secret in ("hunter2pw", "natspw99", SECRET.decode()[:16]):
        assert secret not in text
    assert str(secret_file) in text and "127.0.0.1:6379" in text and "2 scope rules" in text
    assert "events on" in text and "127.0.0.1:4222" in text
    local = AuthFilter(AuthOptions(api_keys_file=str(keys_file))).summary()
    assert "rate limit per key/min in memory (no --redis)" in local


@pytest.mark.parametrize(
    ("field", "url", "secret"),
    [
        ("nats", "nats://s3cr3t-token@127.0.0.1:4222", "s3cr3t-token"),  # a NATS token is the user part
        ("nats", "nats://u:natspw1@a:4222,nats://u:natspw1@b:4222", "natspw1"),  # a server list
        ("redis", "redis://127.0.0.1:6379/0?password=qpw77", "qpw77"),  # redis-py reads it there too
        ("redis", "rediss://:pw88@[::1]:6380/1", "pw88"),
        ("redis", "redis://:pw55@h:notaport/0", "pw55"),  # unparseable: not shown at all
        ("jwks", "https://user:jwkspw@idp.example/jwks.json", "jwkspw"),
    ],
)
def test_summary_masks_every_form_of_url_credential(
    keys_file: Path, field: str, url: str, secret: str
) -> None:
    options: dict[str, Any] = {"api_keys_file": str(keys_file), field: url}
    if field == "redis":
        options["rate_limit"] = 10
    f = AuthFilter(AuthOptions(**options))
    text = f.summary()
    assert secret not in text, text
    assert "***" in text or "<url not shown>" in text


# -- rate limits ---------------------------------------------------------------------------------------
async def test_rate_limit_local_only(make: Make) -> None:
    f = await make()  # api keys without --redis: the limiter is local (RateLimiter(None))
    assert f._limiter is not None and f._limiter.redis_url is None
    answers = []
    for _ in range(2):
        ex = request(**{"x-api-key": LIMITED})
        assert await run(f, ex) is None
        answers.append(dict(ex.answer_headers))
    assert [a["x-ratelimit-remaining"] for a in answers] == ["1", "0"]
    assert all(a["x-ratelimit-limit"] == "2" for a in answers)
    assert int(answers[0]["x-ratelimit-reset"]) >= 1
    ex = request(**{"x-api-key": LIMITED})
    reply = await run(f, ex)
    assert reply is not None and reply.status == 429
    assert error_of(reply)["type"] == "rate_limit_exceeded"
    headers = dict(reply.headers)
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-limit"] == "2"
    assert headers["x-ratelimit-remaining"] == "0"
    assert int(headers["x-ratelimit-reset"]) >= 1
    assert dict(ex.answer_headers) == {}  # a reply carries its own headers
    # another subject is not limited by this one; a key without rate_limit and no --rate-limit: none
    ex = request(**{"x-api-key": KEY})
    assert await run(f, ex) is None
    assert dict(ex.answer_headers) == {}


async def test_the_default_rate_limit_applies_without_a_key_limit(make: Make) -> None:
    f = await make(rate_limit=1)
    ok = request(**{"x-api-key": KEY})
    assert await run(f, ok) is None
    assert ok.answer_headers["x-ratelimit-limit"] == "1"
    reply = await run(f, request(**{"x-api-key": KEY}))
    assert reply is not None and reply.status == 429
    # the key's own rate_limit wins over --rate-limit
    assert await run(f, request(**{"x-api-key": LIMITED})) is None
    assert await run(f, request(**{"x-api-key": LIMITED})) is None


# -- events --------------------------------------------------------------------------------------------
class FakeEvents:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, kind: str, event: dict[str, Any]) -> None:
        self.events.append((kind, dict(event)))

    async def close(self) -> None:
        pass


async def test_events_success_and_failures(make: Make) -> None:
    f = await make()
    events = FakeEvents()
    f._events = events
    before = time.time()
    xff = {"x-forwarded-for": "203.0.113.9, 10.0.0.1, 192.0.2.7"}
    assert await run(f, request("/v1/chat?q=1", **{"x-api-key": KEY}, **xff)) is None
    await run(f, request("/v1/x", **{"x-api-key": "mk_nope_0123"}))
    await run(f, request("/v1/admin", **{"x-api-key": KEY}))
    await run(f, request("/v1/x", **{"x-api-key": EXPIRED}))
    await run(f, request("/v1/x"))
    for _ in range(3):
        await run(f, request("/v1/x", **{"x-api-key": LIMITED}))
    kinds = [(k, e["reason"]) for k, e in events.events]
    assert kinds == [
        ("auth.success", "ok"),
        ("auth.failure", "unknown_key"),
        ("auth.failure", "missing_scope"),
        ("auth.failure", "expired"),
        ("auth.failure", "missing"),
        ("auth.success", "ok"),
        ("auth.success", "ok"),
        ("auth.failure", "rate_limited"),
    ]
    first = events.events[0][1]
    assert set(first) == {"ts", "subject", "method", "reason", "path", "client_ip", "request_id"}
    assert before <= first["ts"] <= time.time()
    assert first["subject"] == "svc-unit" and first["method"] == "api-key"
    assert first["path"] == "/v1/chat"  # without the query: it may hold secrets
    assert first["client_ip"] == "192.0.2.7"  # the last entry: the one Envoy saw
    assert first["request_id"] == "req-1"
    unknown = events.events[1][1]
    assert unknown["subject"] is None and unknown["method"] is None and unknown["client_ip"] is None
    assert events.events[2][1]["subject"] == "svc-unit"  # refused for its scope, yet identified
    assert events.events[7][1]["subject"] == "svc-limited"


# -- options from flags, environment and YAML ------------------------------------------------------------
def resolved(**kwargs: Any) -> dict[type[Any], Any]:
    return resolve(DAEMON.all_sections(), command="extproc", groups=DAEMON.groups(), **kwargs)


async def test_options_from_flags_env_and_yaml(tmp_path: Path, keys_file: Path, secret_file: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"scopes": [{"path": "/v1/", "scope": "llm"}]}))
    by_flag = resolved(
        flags={"api_keys_file": str(keys_file), "forward_credentials": True, "routes_file": str(routes)},
        env={},
    )
    assert by_flag[AuthOptions] == AuthOptions(api_keys_file=str(keys_file), forward_credentials=True)
    assert by_flag[RoutesOptions].routes_file == str(routes)
    f = AuthFilter.from_options(by_flag)
    assert f.routes.required_scope("GET", "/v1/x") == "llm"

    env = {
        "MESHKIT_EXTPROC_API_KEYS_FILE": str(keys_file),
        "MESHKIT_EXTPROC_JWT_SECRET_FILE": str(secret_file),
        "MESHKIT_EXTPROC_RATE_LIMIT": "30",
        "MESHKIT_EXTPROC_API_KEY_PREFIX": "sk-",
    }
    by_env = resolved(env=env)[AuthOptions]
    assert (by_env.api_keys_file, by_env.jwt_secret_file, by_env.rate_limit, by_env.api_key_prefix) == (
        str(keys_file),
        str(secret_file),
        30,
        "sk-",
    )

    config = tmp_path / "meshkit.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "extproc": {
                    "filters": "auth",
                    "auth": {"api_keys_file": str(keys_file), "rate_limit": 5},
                    "routes_file": str(routes),
                }
            }
        )
    )
    grouped = resolved(env={}, config=load_yaml_section(config, "extproc"))
    assert grouped[AuthOptions] == AuthOptions(api_keys_file=str(keys_file), rate_limit=5)
    assert grouped[RoutesOptions].routes_file == str(routes)
    flat = resolved(env={}, config={"api_keys_file": str(keys_file), "jwt_audience": "authenticated"})
    assert flat[AuthOptions] == AuthOptions(api_keys_file=str(keys_file), jwt_audience="authenticated")
    # flags > env > YAML
    both = resolved(
        flags={"rate_limit": "7"},
        env={"MESHKIT_EXTPROC_RATE_LIMIT": "8", "MESHKIT_EXTPROC_API_KEYS_FILE": "from-env"},
        config={"auth": {"api_keys_file": "from-yaml", "rate_limit": 9}},
    )[AuthOptions]
    assert (both.rate_limit, both.api_keys_file) == (7, "from-env")


def test_option_problems(keys_file: Path) -> None:
    with pytest.raises(ConfigError) as info:
        resolved(
            env={"MESHKIT_EXTPROC_RATE_LIMIT": "-1"},
            config={"auth": {"api_keys_redis": True, "colour": "red"}, "rate_limit_on_redis_down": "maybe"},
        )
    text = str(info.value)
    assert "MESHKIT_EXTPROC_RATE_LIMIT" in text
    assert "extproc.auth.colour in --config: unknown option of auth" in text
    assert "rate_limit_on_redis_down" in text and "allowed: local, open, closed" in text
    with pytest.raises(ConfigError, match="--api-keys-redis needs --redis"):
        resolved(env={}, config={"auth": {"api_keys_redis": True}})
    with pytest.raises(ConfigError) as info:
        resolved(env={}, flags={"redis": "redis://:pw-in-flag@h:1"}, config={"rate_limit": "lots"})
    assert "pw-in-flag" not in str(info.value)
    for prefix in ("a.>", "a.*", "a..b", "a b", ""):  # NATS wildcards and separators: a config error
        with pytest.raises(ConfigError, match="--event-prefix"):
            resolved(env={}, flags={"event_prefix": prefix})


def test_cli_without_a_credential_source_is_one_error_line() -> None:
    command = [str(MESHKIT), "extproc", "--filters", "auth", "--listen", "127.0.0.1:0"]
    command += ["--admin-listen", "127.0.0.1:0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout
    problems = [line for line in done.stderr.splitlines() if "no credential source" in line]
    assert len(problems) == 1, done.stderr
    assert "--jwt-secret-file" in problems[0] and "--api-keys-file" in problems[0]
