"""Per-stream JWT auth for the SSE adapter, on the auth filter's own verifier, with an end time.

    auth = StreamAuth.from_options(options)          # None when no key source is configured (auth off)
    await auth.start()                               # loads the JWKS when one is configured
    token = auth.token_from(request.headers, request.query)   # Bearer header or ?access_token=
    grant = await auth.authorize(token, conversation_id)      # a StreamGrant, or raises ClientError
    ... stream; after auth.reauth_in(grant) seconds: `event: reauth`, then close ...
    await auth.close()

Verification is `meshkit.extproc.auth.jwt_verifier.JwtVerifier`, built from the same options the auth
filter takes (`--jwt-secret-file`, `--jwks`, `--jwt-issuer`, `--jwt-audience`, `--jwt-leeway`), with
every rule it has: algorithm allow-list, no `alg: none`, keys only from the configuration, `exp`
required, issuer and audience. Nothing here verifies a signature itself.

What a grant needs on top of a valid token:

- `conv`: the conversation the token is for, a string (or a list of at most `MAX_CONVERSATIONS`
  strings). A token whose `conv` names other conversations is refused with 403 `forbidden`; a `conv`
  that is neither is refused with 401 (the token is not one this adapter can read).
- A token without `conv` opens any conversation only if it holds the scope `--stream-any-scope`
  (default `stream:any`; scopes come from `scope`/`scp`, or `role:<role>`, as the verifier reads
  them). Otherwise 403. Chosen so that an ordinary API token of the gateway (a `sub`, no `conv`)
  cannot read every conversation by id: conversation ids are not secrets. An empty
  `--stream-any-scope` refuses every token without `conv`.

Refusals are `meshkit.errors.ClientError` with the status and the project's JSON error body: 401
`unauthorized` (missing, malformed, bad signature, expired, ... with `WWW-Authenticate: Bearer` as
RFC 6750 says: no error code when the credential is missing), 403 `forbidden` (valid, but not for
this conversation), 400 for an invalid conversation id. Messages never quote the token or its claims.

Where the token comes from (`token_from`): `Authorization: Bearer <token>`, or the query parameter
`access_token` (RFC 6750 §2.3), because a browser's `EventSource` cannot send headers. Both at once
is refused (401 `invalid_request`) unless they are the same token. The query form is on by default
(`--stream-query-token`): a URL lands in access logs, proxy logs, browser history and `Referer`
headers, so a token there leaks more easily than in a header. Mitigations: keep such tokens
short-lived (the stream ends at `exp` anyway, see below), and log paths through `loggable_url()`,
which replaces the value of `access_token` (and `token`, `jwt`) with `***`; the adapter must use it
for every log line and event that holds the request URL. Turn the query form off where every client
can send headers (`--no-stream-query-token`).

When the stream ends: a token that verified may stream until `exp + leeway` (`StreamGrant.ends_at`):
the verifier accepts a token until `exp <= now - leeway`, so that is the moment it would refuse the
same token. Ending at `exp` itself could end a stream the moment it opened (a token accepted inside the
leeway) and the browser would reconnect with the same token in a loop; ending later would let an
expired token keep streaming (Mercure #472). `reauth_in(grant)` is the seconds left, on the
verifier's clock; the adapter schedules `event: reauth` and the close for then, and a reconnect with
the same token is refused as expired.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from meshkit.edge.token_contract import CONVERSATION_ID, is_conversation_id
from meshkit.errors import ClientError, ConfigError
from meshkit.extproc.auth.identity import AuthFailure, Identity
from meshkit.extproc.auth.jwks import JwksSource
from meshkit.extproc.auth.jwt_verifier import JwtVerifier, read_secret_file
from meshkit.options import option, parse_seconds

__all__ = [
    "DEFAULT_ANY_SCOPE",
    "MAX_CONVERSATIONS",
    "QUERY_PARAMETER",
    "StreamAuth",
    "StreamAuthOptions",
    "StreamGrant",
    "loggable_url",
]

DEFAULT_ANY_SCOPE = "stream:any"
MAX_CONVERSATIONS = 100
QUERY_PARAMETER = "access_token"
# flags that only mean something with auth on -> their field
_AUTH_ONLY = {
    "--jwt-issuer": "jwt_issuer",
    "--jwt-audience": "jwt_audience",
    "--jwt-leeway": "jwt_leeway",
    "--stream-any-scope": "stream_any_scope",
    "--no-stream-query-token": "stream_query_token",
}
_SECRET_PARAMETERS = frozenset({"access_token", "token", "jwt", "id_token", "refresh_token"})


@dataclass(frozen=True)
class StreamAuthOptions:
    """The JWT options under the same names as the auth filter's (one vocabulary for both)."""

    jwt_secret_file: str = option(
        "", "file holding the HS256/384/512 JWT secret; empty: HS tokens off", metavar="FILE"
    )
    jwks: str = option("", "JWKS file or http(s) URL for RS/ES/EdDSA JWTs; empty: off", metavar="FILE|URL")
    jwt_issuer: str = option("", "required `iss` of JWTs; empty: not checked", metavar="ISS")
    jwt_audience: str = option("", "required `aud` of JWTs; empty: not checked", metavar="AUD")
    jwt_leeway: float = option(
        30.0, "clock skew allowed on exp/nbf/iat (a stream ends at exp + leeway)", parse=parse_seconds
    )
    stream_any_scope: str = option(
        DEFAULT_ANY_SCOPE, "scope a token without a `conv` claim needs to open any conversation; empty: none"
    )
    stream_query_token: bool = option(
        True, "accept the token as ?access_token= (EventSource cannot send headers; URLs get logged)"
    )


@dataclass(frozen=True, slots=True)
class StreamGrant:
    """A stream the token may open: whose (`subject`), which `conversation_id`, until when.

    `expires_at` is the token's `exp`; `ends_at` (`exp + leeway`) is when the adapter must end the
    stream with `event: reauth`."""

    subject: str
    conversation_id: str
    expires_at: float
    ends_at: float
    scopes: frozenset[str] = frozenset()


def _unauthorized(message: str, error: str | None = "invalid_token") -> ClientError:
    challenge = 'Bearer realm="meshkit"'
    if error:
        safe = message.replace('"', "'")
        challenge += f', error="{error}", error_description="{safe}"'
    return ClientError(401, "unauthorized", message, code=error, headers=(("WWW-Authenticate", challenge),))


def _forbidden(message: str) -> ClientError:
    challenge = 'Bearer realm="meshkit", error="insufficient_scope"'
    return ClientError(
        403, "forbidden", message, code="insufficient_scope", headers=(("WWW-Authenticate", challenge),)
    )


class StreamAuth:
    """Decides whether a token may open a conversation's stream, and until when (module docstring)."""

    def __init__(
        self,
        verifier: JwtVerifier,
        *,
        any_scope: str = DEFAULT_ANY_SCOPE,
        query_token: bool = True,
        jwks: JwksSource | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.verifier = verifier
        self.any_scope = any_scope or None
        self.query_token = query_token
        self._jwks = jwks
        self._clock = clock

    @classmethod
    def from_options(
        cls, options: Mapping[type[Any], Any], *, clock: Callable[[], float] = time.time
    ) -> StreamAuth | None:
        """Built like the auth filter builds its verifier; None when neither a secret nor a JWKS is
        configured (auth off), unless another auth flag was given: then a ConfigError (exit 2)."""
        o: StreamAuthOptions = options.get(StreamAuthOptions) or StreamAuthOptions()
        if not (o.jwt_secret_file or o.jwks):
            # an operator who set how tokens are checked meant auth on: never run open by mistake
            defaults = StreamAuthOptions()
            meant = [flag for flag, name in _AUTH_ONLY.items() if getattr(o, name) != getattr(defaults, name)]
            if meant:
                raise ConfigError(
                    [
                        f"{', '.join(meant)} given without --jwt-secret-file or --jwks: stream auth would "
                        "be off (every conversation open to anyone); give a key source or drop them"
                    ]
                )
            return None
        secret = read_secret_file(o.jwt_secret_file) if o.jwt_secret_file else None
        jwks = JwksSource(o.jwks) if o.jwks else None
        verifier = JwtVerifier(
            secret=secret,
            jwks=jwks,
            issuer=o.jwt_issuer or None,
            audience=o.jwt_audience or None,
            leeway=o.jwt_leeway,
            clock=clock,
        )
        if o.stream_any_scope and (len(o.stream_any_scope) > 256 or " " in o.stream_any_scope):
            raise ConfigError([f"--stream-any-scope {o.stream_any_scope!r}: one scope, no spaces"])
        return cls(
            verifier, any_scope=o.stream_any_scope, query_token=o.stream_query_token, jwks=jwks, clock=clock
        )

    async def start(self) -> None:
        if self._jwks is not None:
            await self._jwks.start()

    async def close(self) -> None:
        if self._jwks is not None:
            await self._jwks.close()

    def collectors(self) -> tuple[Any, ...]:
        return tuple(self._jwks.collectors()) if self._jwks is not None else ()

    # -- the request path

    def token_from(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        """The bearer token of a request: `Authorization: Bearer`, or `?access_token=` when allowed.
        None when there is none; ClientError 401 for a malformed header or two different tokens."""
        header = headers.get("Authorization") or headers.get("authorization")
        from_header: str | None = None
        if header is not None:
            scheme, _, value = header.strip().partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise _unauthorized("Authorization must be `Bearer <token>`", "invalid_request")
            from_header = value.strip()
        from_query = query.get(QUERY_PARAMETER) if self.query_token else None
        if from_query is not None and not from_query:
            raise _unauthorized(f"?{QUERY_PARAMETER}= is empty", "invalid_request")
        if from_header is not None and from_query is not None and from_header != from_query:
            raise _unauthorized(
                f"send one token: Authorization or ?{QUERY_PARAMETER}=, not two different ones",
                "invalid_request",
            )
        return from_header or from_query

    async def authorize(self, token: str | None, conversation_id: str) -> StreamGrant:
        """A grant for `conversation_id`, or ClientError (400, 401 or 403: see the module docstring)."""
        if not is_conversation_id(conversation_id):
            raise ClientError(
                400, "invalid_request_error", f"the conversation id must match {CONVERSATION_ID.pattern}"
            )
        if not token:
            how = "Authorization: Bearer <token>" + (
                f" or ?{QUERY_PARAMETER}=<token>" if self.query_token else ""
            )
            raise _unauthorized(f"missing credentials: send {how}", None)
        try:
            identity = await self.verifier.verify(token)
        except AuthFailure as failure:
            raise _unauthorized(failure.message) from None
        self._check_conversation(identity, conversation_id)
        exp = identity.expires_at
        assert exp is not None  # the verifier requires exp
        return StreamGrant(
            subject=identity.subject,
            conversation_id=conversation_id,
            expires_at=exp,
            ends_at=exp + self.verifier.leeway,
            scopes=identity.scopes,
        )

    def _check_conversation(self, identity: Identity, conversation_id: str) -> None:
        claims = identity.claims or {}
        if "conv" not in claims:
            if self.any_scope is not None and self.any_scope in identity.scopes:
                return
            need = f" or the scope {self.any_scope}" if self.any_scope else ""
            raise _forbidden(f"the token names no conversation (a conv claim{need} is needed)")
        conv = claims["conv"]
        if isinstance(conv, str):
            allowed = [conv]
        elif (
            isinstance(conv, list)
            and 0 < len(conv) <= MAX_CONVERSATIONS
            and all(isinstance(c, str) for c in conv)
        ):
            allowed = [str(c) for c in conv]
        else:
            raise _unauthorized(
                f"the token's conv claim is not a conversation id or a list of at most {MAX_CONVERSATIONS}"
            )
        if conversation_id not in allowed:
            raise _forbidden("the token is for another conversation")

    def reauth_in(self, grant: StreamGrant) -> float:
        """Seconds until the stream must end with `event: reauth` (0 when that moment has passed)."""
        left = grant.ends_at - self._clock()
        return left if left > 0 and math.isfinite(left) else 0.0

    def still_valid(self, grant: StreamGrant) -> bool:
        return self.reauth_in(grant) > 0


def loggable_url(url: str) -> str:
    """`url` (a full URL or a path with a query) with the values of token-carrying query parameters
    (`access_token`, `token`, `jwt`, ...) replaced by `***`: for log lines and events."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<url not shown>"
    if not parts.query:
        return url
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    masked = [(k, "***" if k.lower() in _SECRET_PARAMETERS else v) for k, v in pairs]
    return urlunsplit(parts._replace(query=urlencode(masked, safe="*")))
