"""The set-up check before a row is loaded: real requests that show the chain ran (else the row is
FAILED, not measured).

Every row: the request wrk will send gets 200, and the front Envoy echoes `x-body-hash` equal to
XXH3-128 of the body (absent for Envoy alone). An auth chain also: no credential -> 401 `unauthorized`;
for a JWT chain a tampered token -> 401 (the signature is checked); with model-router an invalid
`model` -> 400 (the body was parsed); with the Redis rate limit the answer carries `x-ratelimit-limit`
and Redis holds the subject's key (the limit was kept in Redis, not in memory).
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

import xxhash
from chains import NEVER_TRIPS, Chain
from credentials import Credentials, tampered

HASH_HEADER = "x-body-hash"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
BAD_MODEL_BODY = b'{"model": "not a model!", "input": "x"}'


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes


def post(url: str, body: bytes, headers: Mapping[str, str] | None = None) -> Answer | str:
    """POST once; the answer (any status), or why there was none."""
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url, data=body, method="POST", headers=all_headers)
    try:
        with _OPENER.open(request, timeout=10) as resp:
            return Answer(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())
    except OSError as exc:
        return f"check request failed: {exc}"


def check_hash(
    url: str, body: bytes, expect_hash: bool, headers: Mapping[str, str] | None = None
) -> str | None:
    """POST `body` once; None if it got 200 and the echoed x-body-hash is right, else why not."""
    answer = post(url, body, headers)
    if isinstance(answer, str):
        return answer
    if answer.status != 200:
        return f"check request got HTTP {answer.status}: {answer.body[:120]!r}"
    got = answer.headers.get(HASH_HEADER)
    want = xxhash.xxh3_128_hexdigest(body) if expect_hash else None
    if got != want:
        return f"{HASH_HEADER} on the response is {got!r}, expected {want!r}"
    return None


def _expect(answer: Answer | str, status: int, what: str, error_type: str | None = None) -> str | None:
    if isinstance(answer, str):
        return f"{what}: {answer}"
    if answer.status != status:
        return f"{what}: got HTTP {answer.status}, expected {status}: {answer.body[:120]!r}"
    if error_type is not None:
        try:
            got = json.loads(answer.body)["error"]["type"]
        except (ValueError, KeyError, TypeError):
            got = None
        if got != error_type:
            return f"{what}: the {status} body is not a JSON error of type {error_type!r}"
    return None


def redis_dbsize(url: str, timeout: float = 2.0) -> int | None:
    """DBSIZE of the Redis at `url` (redis://host:port/0), or None if it does not answer."""
    host, _, port = url.removeprefix("redis://").partition("/")[0].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$6\r\nDBSIZE\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(64)
                if not chunk:
                    break
                reply += chunk
    except (OSError, ValueError):
        return None
    return int(reply[1:-2]) if reply.startswith(b":") else None


def check_chain(url: str, body: bytes, chain: Chain, creds: Credentials, redis_url: str | None) -> str | None:
    """The checks of an auth chain after the hash check; None if all passed, else the first failure."""
    headers = chain.headers(creds)
    reason = _expect(post(url, body), 401, "no credential", "unauthorized")
    if reason is None and chain.credential in ("hs256", "es256"):
        bad = {"authorization": "Bearer " + tampered(headers["authorization"].removeprefix("Bearer "))}
        reason = _expect(post(url, body, bad), 401, "tampered JWT", "unauthorized")
    if reason is None and "model-router" in chain.filters:
        reason = _expect(post(url, BAD_MODEL_BODY, headers), 400, "invalid model (model-router)")
    if reason is None and chain.redis:
        answer = post(url, body, headers)
        limit = answer.headers.get("x-ratelimit-limit") if isinstance(answer, Answer) else None
        if limit != str(NEVER_TRIPS):
            reason = f"rate limit: x-ratelimit-limit is {limit!r}, expected {NEVER_TRIPS}"
        elif redis_url is not None and not redis_dbsize(redis_url):
            reason = "rate limit: Redis holds no key after the check requests (limit not kept in Redis)"
    return reason
