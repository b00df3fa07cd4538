"""One purge and its delivery to one Varnish pod: validation (as meshkit.vcl does it), the request, the
bounded retries. `meshkit.sidecars.purge_broadcaster` fans these out; the purge log replays them.

A `Purge` is what `mesh/varnish/meshkit.vcl` accepts: `PURGE <path>` (a ban on that exact URL), or
`X-Purge-All: true`, or `Surrogate-Key: k1 k2` (keys `[A-Za-z0-9_.-]+`, separated by spaces). The
path is checked against the VCL's RFC 3986 character set whatever the kind (the VCL checks it only
for a path purge: the broadcaster is stricter, it never forwards a URL it would not itself accept).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
from yarl import URL

# the VCL's own expressions (sub meshkit_purge)
_PATH = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*$")
_KEYS = re.compile(r"^ *[A-Za-z0-9_.-]+( +[A-Za-z0-9_.-]+)* *$")


class BadPurge(ValueError):
    """A purge the VCL would refuse (400): nothing is sent."""


@dataclass(frozen=True)
class Purge:
    path: str
    purge_all: bool = False
    keys: tuple[str, ...] = ()

    @classmethod
    def parse(cls, path: str, purge_all: list[str], keys: list[str]) -> Purge:
        """From the raw (undecoded) path and every `X-Purge-All` / `Surrogate-Key` header value;
        raises `BadPurge` with the VCL's reason."""
        if not _PATH.match(path):
            raise BadPurge("PURGE: the URL has characters outside RFC 3986")
        if purge_all and keys:
            raise BadPurge("send X-Purge-All or Surrogate-Key, not both")
        if purge_all:
            if purge_all != ["true"]:
                raise BadPurge("X-Purge-All must be true")
            return cls(path, purge_all=True)
        if keys:
            joined = " ".join(keys)  # std.collect(req.http.Surrogate-Key, " ")
            if not _KEYS.match(joined):
                raise BadPurge("Surrogate-Key: space-separated keys of A-Z a-z 0-9 _ . - only")
            return cls(path, keys=tuple(joined.split()))
        return cls(path)

    def headers(self) -> dict[str, str]:
        if self.purge_all:
            return {"X-Purge-All": "true"}
        if self.keys:
            return {"Surrogate-Key": " ".join(self.keys)}
        return {}

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Purge:
        doc = json.loads(text)
        return cls(str(doc["path"]), bool(doc.get("purge_all")), tuple(str(k) for k in doc.get("keys", ())))


@dataclass(frozen=True)
class Delivery:
    """How sending one purge to one target went: its last HTTP status (None: no answer), the total
    time over every attempt, the attempts made, and why it failed."""

    target: str
    status: int | None
    ms: float
    attempts: int = 1
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"target": self.target, "status": self.status, "ms": round(self.ms, 1)}
        if self.attempts > 1:
            doc["attempts"] = self.attempts
        if self.error is not None:
            doc["error"] = self.error
        return doc


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    timeout: float = 1.0  # per attempt
    backoff: float = 0.05  # before the 2nd attempt; doubled before each next one


def _retryable(status: int) -> bool:
    """No answer or a 5xx is tried again; a 4xx (400 bad purge, 403 not in the ACL) will not change."""
    return status >= 500


async def _attempt(
    session: aiohttp.ClientSession, target: str, purge: Purge, seconds: float
) -> tuple[int, str]:
    url = URL(f"http://{target}{purge.path}", encoded=True)
    async with session.request(
        "PURGE",
        url,
        headers=purge.headers(),
        timeout=aiohttp.ClientTimeout(total=seconds),
        allow_redirects=False,
    ) as resp:
        body = await resp.read()
        return resp.status, body[:300].decode("utf-8", "replace")


def _reason(status: int, body: str) -> str:
    try:
        doc = json.loads(body)
        return str(doc["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}"


async def deliver(session: aiohttp.ClientSession, target: str, purge: Purge, policy: RetryPolicy) -> Delivery:
    """Send `purge` to `target`, retrying an unanswered attempt or a 5xx with backoff."""
    began = time.monotonic()
    status: int | None = None
    error: str | None = None
    attempt = 0
    for attempt in range(1, policy.attempts + 1):
        if attempt > 1:
            await asyncio.sleep(policy.backoff * 2 ** (attempt - 2))
        try:
            status, body = await _attempt(session, target, purge, policy.timeout)
        except TimeoutError:
            status, error = None, f"no answer within {policy.timeout:g} s"
            continue
        except aiohttp.ClientError as exc:
            status, error = None, f"{type(exc).__name__}: {exc}"[:300]
            continue
        error = None if status == 200 else _reason(status, body)
        if not _retryable(status):
            break
    return Delivery(target, status, (time.monotonic() - began) * 1000, attempt, error)
