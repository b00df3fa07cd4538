"""The public keys that sign JWTs, from a JWKS document (RFC 7517) in a file or at an http(s) URL.

`JwksSource` loads the set at `start()`, keeps it fresh in the background and answers `key(kid)` with
a dict lookup. What it accepts from a JWKS, and why:

- Only signing keys: an entry whose `use` is not `sig` (or whose `key_ops` lacks `verify`) is skipped.
- Only asymmetric public keys: RSA (≥ 2048 bits: RS256/384/512, PS256/384/512), EC (P-256 → ES256,
  P-384 → ES384, P-521 → ES512) and OKP (Ed25519/Ed448 → EdDSA). A symmetric `kty: oct` entry is
  always refused: HS keys come only from the shared secret file, so a token can never pick a JWKS
  entry as an HMAC secret (algorithm confusion). An entry with private parts (`d`, ...) is refused
  too: a JWKS that publishes a private key is a leak, not a key set.
- A JWK's own `alg`, when it has one, narrows what a token may use with it to exactly that alg.
- `kid`: every key is found by its `kid`. A key without one is usable only when the set holds exactly
  one key and the token names no `kid` (`key(None)`); in a set of several keys it is skipped.
  `key(None)` also answers the only key of a one-key set that has a `kid` (one candidate key, the
  signature still decides).
- Bounded: a document above `MAX_DOCUMENT_BYTES` or with more than `MAX_KEYS` entries is refused
  whole; a document with no usable key is refused (it could verify nothing: most likely the wrong
  URL). Every fetch has a timeout, and follows no redirect: the keys come from the URL configured,
  not from another host it points to. No log line or error quotes the URL's user part or query.

Each skipped entry is logged once (per kid and reason, not on every refresh). A failed refresh keeps
the last good set, logs once per outage (and once when it ends) and is counted.

`refetch()` is what a verifier calls for a token whose `kid` is unknown (a key rotation): it fetches
now, but at most once per `min_refetch_interval` (the first one after start at once), so clients
sending made-up `kid`s cannot make meshkit hammer the JWKS endpoint; concurrent callers share the one
fetch. Background refreshes do not count against that limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable
from typing import Any, NamedTuple
from urllib.parse import urljoin, urlsplit, urlunsplit

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import Counter, Gauge

from meshkit.errors import ConfigError, DependencyError
from meshkit.logs import Throttle

log = logging.getLogger("meshkit.extproc.auth.jwks")

MAX_DOCUMENT_BYTES = 1 << 20
MAX_KEYS = 100
MIN_RSA_BITS = 2048
FILE_CHECK_INTERVAL = 2.0  # a JWKS file is stat()ed this often (at most) for a change
RETRY_AFTER_FAILURE = 30.0  # a failed background fetch is retried this soon (or at refresh_interval)

RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
OKP_CURVES = frozenset({"Ed25519", "Ed448"})
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")


class JwksKey(NamedTuple):
    """A usable JWKS entry: the key, and the token `alg` values it may verify."""

    jwk: jwt.PyJWK
    algorithms: frozenset[str]


class _LoadError(Exception):
    """A JWKS that could not be read, fetched or parsed; the message is safe to log."""


class _Skip(Exception):
    """One JWKS entry that is not a usable signing key; the message says why."""


class JwksSource:
    """A JWKS from `location` (a file path or an `http(s)://` URL), kept fresh in the background.

    `start()` loads it (a file that cannot be read or parsed: `ConfigError`; a URL that cannot be
    fetched or parsed: `DependencyError("jwks", ...)`) and starts the refresh task: a URL is fetched
    every `refresh_interval` s, a file is reloaded when its mtime, size or inode changes (checked every
    `min(2, refresh_interval)` s). `close()` stops it.
    """

    def __init__(
        self,
        location: str,
        *,
        refresh_interval: float = 300.0,
        min_refetch_interval: float = 10.0,
        fetch_timeout: float = 5.0,
    ) -> None:
        problems = []
        if not location:
            problems.append("jwks: the location is empty (a file path or an http(s):// URL)")
        for name, value in (
            ("refresh_interval", refresh_interval),
            ("min_refetch_interval", min_refetch_interval),
            ("fetch_timeout", fetch_timeout),
        ):
            if not value > 0:
                problems.append(f"jwks: {name} must be > 0 (got {value!r})")
        scheme = urlsplit(location).scheme.lower() if "://" in location else ""
        if scheme and scheme not in ("http", "https"):
            problems.append(f"jwks: a URL must be http:// or https:// (got {scheme}://)")
        if problems:
            raise ConfigError(problems)
        self.location = location
        self.is_url = bool(scheme)
        self.refresh_interval = refresh_interval
        self.min_refetch_interval = min_refetch_interval
        self.fetch_timeout = fetch_timeout
        self._display = _display(location) if self.is_url else location
        self._keys: dict[str | None, JwksKey] = {}
        self._fingerprint: frozenset[str] = frozenset()
        self.generation = 0  # +1 on every change of the key set (a verifier drops its cache)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: asyncio.Task[bool] | None = None
        self._last_refetch = -float("inf")  # monotonic time of the last on-demand fetch
        self._file_signature: tuple[int, int, int, int] | None = None
        self._failures = 0  # consecutive failed loads (an outage while > 0)
        self._throttle = Throttle(log)
        self._skips_logged: set[tuple[str | None, str]] = set()
        self._fetches = Counter(
            "meshkit_auth_jwks_fetches",
            "JWKS loads (start, background refresh, refetch for an unknown kid) by result",
            ["result"],
            registry=None,
        )
        self._refetches = Counter(
            "meshkit_auth_jwks_refetches",
            "On-demand JWKS refetches (an unknown kid): fetched, shared (joined one in flight), "
            "limited (within min_refetch_interval of the last)",
            ["outcome"],
            registry=None,
        )
        self._key_count = Gauge("meshkit_auth_jwks_keys", "Usable keys in the JWKS", registry=None)
        self._last_success = Gauge(
            "meshkit_auth_jwks_last_success_timestamp_seconds",
            "When the JWKS was last loaded successfully (epoch seconds)",
            registry=None,
        )
        for result in ("ok", "error"):
            self._fetches.labels(result)
        for outcome in ("fetched", "shared", "limited"):
            self._refetches.labels(outcome)

    # -- lifecycle

    async def start(self) -> None:
        if self.is_url:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.fetch_timeout),
                headers={"Accept": "application/json, application/jwk-set+json"},
            )
        try:
            await self._load()
        except _LoadError as e:
            await self._close_session()
            if self.is_url:
                raise DependencyError("jwks", f"cannot load the JWKS from {self._display}: {e}") from None
            raise ConfigError([f"jwks: cannot load {self.location}: {e}"]) from None
        self._task = asyncio.create_task(self._refresh_loop(), name="jwks-refresh")

    async def close(self) -> None:
        for task in (self._task, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._inflight = None
        await self._close_session()

    async def _close_session(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def collectors(self) -> Iterable[Any]:
        return (self._fetches, self._refetches, self._key_count, self._last_success)

    # -- lookups

    def key(self, kid: str | None) -> jwt.PyJWK | None:
        """The key a token's `kid` names (None: the token has no `kid`); None when there is none."""
        entry = self.entry(kid)
        return None if entry is None else entry.jwk

    def entry(self, kid: str | None) -> JwksKey | None:
        """`key(kid)` with the `alg` values that key may verify."""
        return self._keys.get(kid)

    def __len__(self) -> int:
        return len(self._fingerprint)

    @property
    def healthy(self) -> bool:
        """False while the last load failed (the last good set is still in use)."""
        return self._failures == 0

    async def refetch(self) -> bool:
        """Load the JWKS again now, unless the last on-demand refetch was less than
        `min_refetch_interval` s ago; callers arriving during a fetch share it. True if the key set
        changed. A failed fetch keeps the current set (False)."""
        if self._inflight is not None:
            self._refetches.labels("shared").inc()
            return await asyncio.shield(self._inflight)
        now = time.monotonic()
        if now - self._last_refetch < self.min_refetch_interval:
            self._refetches.labels("limited").inc()
            return False
        self._last_refetch = now
        self._refetches.labels("fetched").inc()
        task = self._inflight = asyncio.create_task(self._reload(), name="jwks-refetch")
        task.add_done_callback(self._refetch_done)
        return await asyncio.shield(task)

    def _refetch_done(self, task: asyncio.Task[bool]) -> None:
        if self._inflight is task:
            self._inflight = None

    # -- loading

    async def _refresh_loop(self) -> None:
        if not self.is_url:
            interval = min(FILE_CHECK_INTERVAL, self.refresh_interval)
            while True:
                await asyncio.sleep(interval)
                try:
                    signature = _stat_signature(self.location)
                except OSError:
                    signature = None
                if signature != self._file_signature:
                    await self._reload()
        while True:
            delay = (
                self.refresh_interval
                if self._failures == 0
                else min(self.refresh_interval, RETRY_AFTER_FAILURE)
            )
            await asyncio.sleep(delay)
            await self._reload()

    async def _reload(self) -> bool:
        """One load outside start(): a failure keeps the last good set. True if the set changed."""
        try:
            changed = await self._load()
        except _LoadError as e:
            if self._failures == 1:
                self._throttle.warning(
                    "jwks-outage",
                    "JWKS %s cannot be loaded, keeping the last good key set (%d keys): %s",
                    self._display,
                    len(self),
                    e,
                )
            return False
        return changed

    async def _load(self) -> bool:
        try:
            if self.is_url:
                document = await self._fetch()
            else:
                document = await asyncio.to_thread(self._read_file)
            keys, fingerprint = self._parse(document)
        except _LoadError:
            self._failures += 1
            self._fetches.labels("error").inc()
            raise
        if self._failures:
            log.info("JWKS %s loaded again after %d failed attempts", self._display, self._failures)
        self._failures = 0
        self._fetches.labels("ok").inc()
        self._last_success.set(time.time())
        changed = fingerprint != self._fingerprint
        if changed:
            self._keys, self._fingerprint = keys, fingerprint
            self.generation += 1
            self._key_count.set(len(fingerprint))
            log.info("JWKS %s: %d keys (%s)", self._display, len(fingerprint), _kids(keys))
        return changed

    def _read_file(self) -> bytes:
        try:
            signature = _stat_signature(self.location)
            self._file_signature = signature  # this version is tried once, broken or not
            if signature[1] > MAX_DOCUMENT_BYTES:
                raise _LoadError(f"the file is larger than {MAX_DOCUMENT_BYTES} bytes")
            with open(self.location, "rb") as f:
                data = f.read(MAX_DOCUMENT_BYTES + 1)
        except OSError as e:
            raise _LoadError(e.strerror or type(e).__name__) from None
        if len(data) > MAX_DOCUMENT_BYTES:
            raise _LoadError(f"the file is larger than {MAX_DOCUMENT_BYTES} bytes")
        return data

    async def _fetch(self) -> bytes:
        if self._session is None:
            raise _LoadError("the source is not started (or closed)")
        try:
            # No redirects: a key set comes from the URL configured, not from wherever it points.
            async with self._session.get(self.location, allow_redirects=False) as response:
                if 300 <= response.status < 400:
                    raise _LoadError(_redirect(response.status, self.location, response.headers))
                if response.status != 200:
                    raise _LoadError(f"HTTP {response.status}")
                if (response.content_length or 0) > MAX_DOCUMENT_BYTES:
                    raise _LoadError(f"the document is larger than {MAX_DOCUMENT_BYTES} bytes")
                body = bytearray()
                async for chunk in response.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise _LoadError(f"the document is larger than {MAX_DOCUMENT_BYTES} bytes")
                return bytes(body)
        except TimeoutError:
            raise _LoadError(f"no answer within {self.fetch_timeout} s") from None
        except aiohttp.ClientError as e:
            raise _LoadError(_client_error(e)) from None

    def _parse(self, document: bytes) -> tuple[dict[str | None, JwksKey], frozenset[str]]:
        try:
            doc = json.loads(document)
        except (ValueError, RecursionError):
            raise _LoadError("not a JSON document") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise _LoadError('not a JWKS (a JSON object with a "keys" list)')
        entries = doc["keys"]
        if len(entries) > MAX_KEYS:
            raise _LoadError(f"{len(entries)} keys, more than the {MAX_KEYS} allowed")
        usable: list[tuple[dict[str, Any], JwksKey]] = []
        for entry in entries:
            kid = entry.get("kid") if isinstance(entry, dict) else None
            try:
                usable.append((entry, _signing_key(entry)))
            except _Skip as e:
                self._log_skip(kid if isinstance(kid, str) else None, str(e))
        keys: dict[str | None, JwksKey] = {}
        accepted: list[dict[str, Any]] = []
        for entry, key in usable:
            kid = entry.get("kid")
            if kid is None and len(usable) > 1:
                self._log_skip(None, "it has no kid, in a set of several keys")
                continue
            if kid in keys:
                self._log_skip(kid, "its kid is used twice (the first entry is used)")
                continue
            keys[kid] = key
            accepted.append(entry)
        if not keys:
            raise _LoadError(f"no usable signing key among its {len(entries)} entries")
        if len(keys) == 1 and None not in keys:
            keys[None] = next(iter(keys.values()))
        fingerprint = frozenset(json.dumps(e, sort_keys=True) for e in accepted)
        return keys, fingerprint

    def _log_skip(self, kid: str | None, why: str) -> None:
        if (kid, why) in self._skips_logged:
            return
        if len(self._skips_logged) > 256:
            self._skips_logged.clear()
        self._skips_logged.add((kid, why))
        log.warning("JWKS %s: entry kid=%r skipped: %s", self._display, kid, why)


def _signing_key(entry: Any) -> JwksKey:
    """The key of one JWKS entry, or _Skip saying why it is not a usable signing key."""
    if not isinstance(entry, dict):
        raise _Skip("not a JSON object")
    kid, kty, use, alg = entry.get("kid"), entry.get("kty"), entry.get("use"), entry.get("alg")
    if kid is not None and (not isinstance(kid, str) or not kid):
        raise _Skip("its kid is not a non-empty string")
    if use is not None and use != "sig":
        raise _Skip(f"not a signing key (use={use!r})")
    ops = entry.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise _Skip("its key_ops do not include verify")
    if kty == "oct":
        raise _Skip("a symmetric (oct) key: HS keys come only from the shared secret")
    if any(member in entry for member in _PRIVATE_MEMBERS):
        raise _Skip("it holds private key material")
    if kty == "RSA":
        allowed = RSA_ALGORITHMS
    elif kty == "EC":
        curve = entry.get("crv")
        if curve not in EC_ALGORITHMS:
            raise _Skip(f"unsupported EC curve {curve!r}")
        allowed = frozenset({EC_ALGORITHMS[curve]})
    elif kty == "OKP":
        if entry.get("crv") not in OKP_CURVES:
            raise _Skip(f"unsupported OKP curve {entry.get('crv')!r}")
        allowed = frozenset({"EdDSA"})
    else:
        raise _Skip(f"unsupported key type {kty!r}")
    if alg is not None:
        if alg not in allowed:
            raise _Skip(f"alg {alg!r} does not fit a {kty} key")
        allowed = frozenset({alg})
    try:
        jwk = jwt.PyJWK(entry, algorithm=alg or ("RS256" if kty == "RSA" else next(iter(allowed))))
    except (jwt.PyJWTError, ValueError, TypeError) as e:
        raise _Skip(f"not a valid {kty} key ({type(e).__name__})") from None
    if isinstance(jwk.key, rsa.RSAPublicKey) and jwk.key.key_size < MIN_RSA_BITS:
        raise _Skip(f"an RSA key of {jwk.key.key_size} bits (at least {MIN_RSA_BITS})")
    return JwksKey(jwk, allowed)


def _stat_signature(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)


def _display(url: str) -> str:
    """The URL for a log line: no user:password, no query (either may carry a credential)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _redirect(status: int, location: str, headers: Any) -> str:
    target = headers.get("Location", "")
    try:
        shown = _display(urljoin(location, target)) if target else "nowhere"
    except ValueError:
        shown = "an invalid URL"
    return f"HTTP {status}, a redirect to {shown}: not followed (configure the URL of the key set itself)"


def _client_error(e: aiohttp.ClientError) -> str:
    """What went wrong, without the URL: aiohttp's messages quote it whole, and its query or user part
    may hold a credential (a redirect loop's TooManyRedirects did)."""
    if isinstance(e, aiohttp.ClientConnectorError):
        reason = e.os_error.strerror or type(e.os_error).__name__
        return f"{type(e).__name__}: cannot connect to {e.host}:{e.port} ({reason})"
    if isinstance(e, aiohttp.ClientResponseError):
        return f"{type(e).__name__}: HTTP {e.status}"
    return type(e).__name__


def _kids(keys: dict[str | None, JwksKey]) -> str:
    return (
        ", ".join(sorted(f"{k}:{'/'.join(sorted(v.algorithms))}" for k, v in keys.items() if k is not None))
        or "no kid"
    )
