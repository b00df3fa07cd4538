"""API keys, stored only as SHA-256 digests: a YAML file reloaded on change, and/or Redis.

The key file (`--api-keys-file`) is a list, one entry per key (several per subject make rotation a
matter of adding the new key, moving callers, then deleting the old one):

    - sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08   # sha256(key), hex
      subject: billing-service
      scopes: [embeddings, llm]
      expires_at: 2027-06-30T00:00:00Z     # optional, RFC 3339; after it the key is refused
      rate_limit: 600                      # optional, requests per minute (else --rate-limit)
      revoked: true                        # optional; a revoked key is refused (or delete the entry)

`printf %s "$KEY" | sha256sum` gives the digest. The file is checked every 0.5 s (size, mtime, inode:
an atomic `mv` counts) and a change applies within about a second, without dropping a request: the new
table replaces the old one in one assignment. A file that does not parse keeps the last good table and
says why, once per distinct problem; `meshkit_auth_api_keys_reloads_total{result}` counts.

In Redis (`--api-keys-redis`), each key is a hash at `<prefix>apikey:<sha256 hex>` with the same fields
(`subject`, `scopes` space-separated, `expires_at` RFC 3339, `rate_limit`, `revoked` 1/0):

    HSET meshkit:apikey:9f86d0... subject billing-service scopes "embeddings llm" rate_limit 600

Answers (found or not) are cached for `cache_ttl` seconds (default 5: a revoked key stops working
within that), bounded in size. The file is asked first.

Lookup: the presented key is hashed and the digest looked up; the stored digest is then compared with
`hmac.compare_digest`. Timing can only reveal something about a digest, never about a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import Counter, Gauge

from meshkit.errors import ConfigError, DependencyError
from meshkit.extproc.auth.gcra import MAX_PER_MINUTE
from meshkit.extproc.auth.identity import AuthFailure, Identity

__all__ = ["ApiKey", "ApiKeyFile", "RedisApiKeys", "digest_of", "parse_key_table"]

log = logging.getLogger("meshkit.extproc.auth.api_keys")

_HEX64 = re.compile(r"[0-9a-f]{64}")
_SCOPE = re.compile(r"[!#-\[\]-~]+")
MAX_KEY_LENGTH = 256
POLL_INTERVAL = 0.5
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: 10x faster


@dataclass(frozen=True, slots=True)
class ApiKey:
    sha256: str
    subject: str
    scopes: frozenset[str]
    expires_at: float | None = None
    rate_limit: int | None = None
    revoked: bool = False

    def identity(self, now: float) -> Identity:
        """The caller this key names, or AuthFailure when it is revoked or expired."""
        if self.revoked:
            raise AuthFailure("revoked", "the API key has been revoked")
        if self.expires_at is not None and now >= self.expires_at:
            raise AuthFailure("expired", "the API key has expired")
        return Identity(self.subject, "api-key", self.scopes, self.expires_at, self.rate_limit)


def digest_of(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def _timestamp(value: Any) -> float:
    if isinstance(value, dt.datetime):  # PyYAML reads unquoted RFC 3339 as a datetime
        when = value
    elif isinstance(value, str):
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    elif isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    else:
        raise ValueError("expected an RFC 3339 time such as 2027-06-30T00:00:00Z")
    if when.tzinfo is None:
        raise ValueError("needs a time zone (e.g. a trailing Z)")
    return when.timestamp()


def _entry(raw: Any, at: str) -> ApiKey:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{at}: expected a mapping with sha256 and subject")
    unknown = set(raw) - {"sha256", "subject", "scopes", "expires_at", "rate_limit", "revoked", "comment"}
    if unknown:
        raise ValueError(f"{at}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    digest = str(raw.get("sha256", "")).lower()
    if not _HEX64.fullmatch(digest):
        raise ValueError(f"{at}: sha256 must be 64 hex digits (the key's SHA-256, never the key)")
    subject = raw.get("subject")
    if (
        not isinstance(subject, str)
        or not subject
        or len(subject) > 256
        or not subject.isprintable()
        or subject != subject.strip()  # x-auth-subject reaches the upstream trimmed
    ):
        raise ValueError(
            f"{at}: subject must be a printable string of 1-256 characters, no space at either end"
        )
    scopes_raw = raw.get("scopes") or []
    if isinstance(scopes_raw, str):
        scopes_raw = scopes_raw.split()
    if not isinstance(scopes_raw, list) or not all(
        isinstance(s, str) and _SCOPE.fullmatch(s) for s in scopes_raw
    ):
        raise ValueError(f"{at}: scopes must be a list of scope tokens (no spaces)")
    expires_at = None
    if raw.get("expires_at") is not None:
        try:
            expires_at = _timestamp(raw["expires_at"])
        except ValueError as exc:
            raise ValueError(f"{at}: expires_at: {exc}") from None
    rate_limit = raw.get("rate_limit")
    if rate_limit is not None and (
        isinstance(rate_limit, bool)
        or not isinstance(rate_limit, int)
        or not 1 <= rate_limit <= MAX_PER_MINUTE
    ):
        raise ValueError(
            f"{at}: rate_limit must be a whole number of requests per minute, 1 to {MAX_PER_MINUTE:,}"
        )
    revoked = raw.get("revoked", False)
    if not isinstance(revoked, bool):
        raise ValueError(f"{at}: revoked must be true or false")
    return ApiKey(digest, subject, frozenset(scopes_raw), expires_at, rate_limit, revoked)


def parse_key_table(text: str, where: str) -> dict[str, ApiKey]:
    """The key file's table, digest -> ApiKey; a ValueError names the first problem."""
    try:
        doc = yaml.load(text, Loader=_Loader)  # noqa: S506 - a safe loader (CSafeLoader or SafeLoader)
    except yaml.YAMLError as exc:
        raise ValueError(f"{where}: not valid YAML: {exc}") from None
    if doc is None:
        return {}
    if isinstance(doc, Mapping) and "keys" in doc:
        doc = doc["keys"] or []
    if not isinstance(doc, list):
        raise ValueError(f"{where}: expected a list of keys ({{sha256, subject, scopes, ...}})")
    table: dict[str, ApiKey] = {}
    for i, raw in enumerate(doc):
        key = _entry(raw, f"{where}: entry {i}")
        if key.sha256 in table:
            raise ValueError(f"{where}: entry {i}: the same sha256 appears twice")
        table[key.sha256] = key
    return table


def _lookup(table: Mapping[str, ApiKey], digest: str) -> ApiKey | None:
    found = table.get(digest)
    if found is not None and hmac.compare_digest(found.sha256, digest):
        return found
    return None


_RELOADS = "meshkit_auth_api_keys_reloads_total"


class ApiKeyFile:
    """The key table from `path`, re-read when the file changes (`start()` loads it: a broken file at
    start is a ConfigError, later it keeps the last good table)."""

    def __init__(self, path: str, *, poll_interval: float = POLL_INTERVAL) -> None:
        self.path = Path(path)
        self.poll_interval = poll_interval
        self._table: dict[str, ApiKey] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_problem = ""
        self._reloads = Counter(_RELOADS, "API key file loads", ["result"], registry=None)
        self._keys = Gauge("meshkit_auth_api_keys", "API keys in the key file's current table", registry=None)

    def collectors(self) -> Iterable[Any]:
        return (self._reloads, self._keys)

    def __len__(self) -> int:
        return len(self._table)

    def lookup(self, key: str) -> ApiKey | None:
        return _lookup(self._table, digest_of(key))

    def lookup_digest(self, digest: str) -> ApiKey | None:
        return _lookup(self._table, digest)

    async def start(self) -> None:
        try:
            await self._load()
        except (OSError, ValueError) as exc:
            raise ConfigError([f"--api-keys-file: {_problem(exc)}"]) from None
        self._task = asyncio.create_task(self._watch(), name="api-keys-file watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    async def _load(self) -> None:
        stamp = self._stat()
        try:
            text = await asyncio.to_thread(self.path.read_text, encoding="utf-8")
            table = await asyncio.to_thread(parse_key_table, text, str(self.path))
        except (OSError, ValueError):
            # Retry once the file changes again, judged by the stamp taken before this read: a
            # writer that finished after the read (a half-written file) is a change, and is read.
            self._stamp = stamp
            raise
        self._table, self._stamp = table, stamp  # one assignment: a request sees the old or the new
        self._reloads.labels("ok").inc()
        self._keys.set(len(table))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                if self._stat() == self._stamp:
                    continue
                await self._load()
                if self._last_problem:
                    log.info("API key file %s is valid again: %d keys", self.path, len(self._table))
                else:
                    log.info("API key file %s reloaded: %d keys", self.path, len(self._table))
                self._last_problem = ""
            except (OSError, ValueError) as exc:
                self._reloads.labels("error").inc()
                problem = _problem(exc)
                if problem != self._last_problem:
                    log.warning(
                        "API key file not reloaded, keeping the last good %d keys: %s",
                        len(self._table),
                        problem,
                    )
                    self._last_problem = problem


def _problem(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return f"cannot read {exc.filename or ''}: {exc.strerror or exc}".strip()
    return str(exc)


class RedisApiKeys:
    """Keys stored in Redis hashes, looked up by digest, answers cached for `cache_ttl` seconds."""

    def __init__(
        self,
        client: Any,  # a redis.asyncio.Redis
        *,
        prefix: str = "meshkit:",
        cache_ttl: float = 5.0,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._prefix = prefix + "apikey:"
        self._ttl = cache_ttl
        self._size = cache_size
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, ApiKey | None]] = OrderedDict()
        self._lookups = Counter(
            "meshkit_auth_api_keys_redis_lookups_total", "API key lookups in Redis", ["result"], registry=None
        )

    def collectors(self) -> Iterable[Any]:
        return (self._lookups,)

    async def lookup_digest(self, digest: str) -> ApiKey | None:
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            self._lookups.labels("cached").inc()
            return cached[1]
        try:
            raw = await self._client.hgetall(self._prefix + digest)
        except Exception as exc:  # redis-py raises ConnectionError, TimeoutError, its own errors
            self._lookups.labels("redis_down").inc()
            raise DependencyError("redis", f"API key lookup failed: {type(exc).__name__}") from None
        found = _from_hash(raw, digest)
        self._lookups.labels("found" if found else "unknown").inc()
        self._cache[digest] = (now + self._ttl, found)
        self._cache.move_to_end(digest)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return found


def _from_hash(raw: Mapping[Any, Any], digest: str) -> ApiKey | None:
    if not raw:
        return None
    at = f"redis key {digest[:12]}..."
    try:  # a bad entry (not UTF-8, a rate_limit that is no number, ...) is ignored, never a 500
        fields = {
            (k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else str(v))
            for k, v in raw.items()
        }
        entry: dict[str, Any] = {"sha256": digest, "subject": fields.get("subject")}
        if "scopes" in fields:
            entry["scopes"] = fields["scopes"].split()
        if fields.get("expires_at"):
            entry["expires_at"] = fields["expires_at"]
        if fields.get("rate_limit"):
            rate = fields["rate_limit"]
            entry["rate_limit"] = int(rate) if rate.isascii() and rate.isdigit() else -1
        entry["revoked"] = fields.get("revoked", "0").lower() in ("1", "true", "yes")
        return _entry(entry, at)
    except UnicodeDecodeError:
        log.warning("API key in Redis ignored: %s: a field is not UTF-8", at)
        return None
    except ValueError as exc:
        log.warning("API key in Redis ignored: %s", exc)
        return None
