"""One purge and its delivery to one Varnish pod: validation (as meshkit.vcl does it), the request, the
bounded retries. `meshkit.sidecars.purge_broadcaster` fans these out; the purge log replays them.

The URL of a path purge is normalised as the ingress normalises what it forwards (`ingress_path`):
Varnish compares it as a string with the URL it stored, which came through Envoy, so a purge of
`//v1/./%65mbeddings` must ban `/v1/embeddings` (banning the literal would answer 200 and purge
nothing anything could have cached).

A `Purge` is what `mesh/varnish/meshkit.vcl` accepts: `PURGE <path>` (a ban on that exact URL), or
`X-Purge-All: true`, or `Surrogate-Key: k1 k2` (keys `[A-Za-z0-9_.-]+`, separated by spaces). The
path is checked against the VCL's RFC 3986 character set whatever the kind (the VCL checks it only
for a path purge: the broadcaster is stricter, it never forwards a URL it would not itself accept).

The request goes out on `PurgeClient`, a keep-alive HTTP/1.1 client made for this one request and
nothing else: it writes `PURGE <path> HTTP/1.1` with Host, the one purge header and
`Content-Length: 0` on a kept connection to the target (at most `idle_per_target` kept each), and
reads the status line, the headers (at most 16 KiB) and a body by Content-Length or chunked (at most
64 KiB kept readable, the first 300 bytes used; a longer or length-less body closes the connection).
Measured here against a real Varnish: 58 us of CPU per request against aiohttp's 162 us, and the
broadcaster's CPU is what bounds a fan-out to 8 pods under concurrent purges. A connection is kept only
when nothing but the answer arrived on it, and taken again only when nothing arrived since: bytes a
target sends beyond its answer (past its Content-Length, a second answer, a 408 before it closes)
must never be read as the answer to the next PURGE. What does not frame an answer unambiguously is a
`BadAnswer` (two different Content-Lengths, a Content-Length or chunk size that is not plain digits,
a chunk without its CRLF). A kept connection the target closed meanwhile (Varnish's `timeout_idle`,
5 s) is seen at EOF before use, or fails at once and the attempt is made again once on a fresh
connection (the target's idle ones are dropped): that costs no retry of the policy. A timeout or an
error closes the connection it happened on; `forget(targets)` closes those of targets that left the
set. At most `busy_per_target` (32) requests are in flight to one target; more wait for a slot within
their attempt's timeout.

A `Purge` is valid by construction, from a request, a purge log entry or code alike: its path and
header value are written into the request as they are.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import deque
from collections.abc import Collection
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger("meshkit.purge_fanout")

# the VCL's own expressions (sub meshkit_purge), matched whole (`fullmatch`: a `$` would also match
# before a trailing newline)
_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*")
_KEYS = re.compile(r" *[A-Za-z0-9_.-]+( +[A-Za-z0-9_.-]+)* *")
_KEY = re.compile(r"[A-Za-z0-9_.-]+")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


class BadPurge(ValueError):
    """A purge the VCL would refuse (400): nothing is sent."""


_UNRESERVED_ESCAPE = re.compile(r"%(2[dDeE]|3[0-9]|[46][1-9a-fA-F]|[57][0-9aA]|5[fF]|7[eE])")
_SLASH_ESCAPE = re.compile(r"%2[fF]")


def ingress_path(url: str) -> str:
    """`url` (path and query) as the ingress hands it to Varnish, so as Varnish stored it: the path
    normalised the way meshkit's rendered Envoy does it (`normalize_path`, `merge_slashes`,
    `path_with_escaped_slashes_action: UNESCAPE_AND_REDIRECT`; checked against Envoy 1.40) -
    percent-encoded unreserved characters decoded (`%65` is `e`; other escapes kept as written),
    `%2F` as `/`, runs of slashes merged, `.` and `..` segments removed (RFC 3986 5.2.4); the query
    as it is."""
    path, mark, query = url.partition("?")
    path = _UNRESERVED_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), path)
    path = re.sub(r"/{2,}", "/", _SLASH_ESCAPE.sub("/", path))
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        elif segment == ".":
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/" + "/".join(out) + mark + query


@dataclass(frozen=True)
class Purge:
    """Valid by construction (`BadPurge` otherwise), however it is made: from a request, from a purge
    log entry (Redis is shared, and written by other versions too), or in code. Its path and header
    value go into the request line and a header as they are, so nothing else may reach them."""

    path: str
    purge_all: bool = False
    keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not _PATH.fullmatch(self.path):
            raise BadPurge("PURGE: the URL has characters outside RFC 3986")
        if self.purge_all and self.keys:
            raise BadPurge("send X-Purge-All or Surrogate-Key, not both")
        if not all(isinstance(k, str) and _KEY.fullmatch(k) for k in self.keys):
            raise BadPurge("Surrogate-Key: space-separated keys of A-Z a-z 0-9 _ . - only")

    @classmethod
    def parse(cls, path: str, purge_all: list[str], keys: list[str]) -> Purge:
        """From the raw (undecoded) path and every `X-Purge-All` / `Surrogate-Key` header value;
        raises `BadPurge` with the VCL's reason. The path is what the ingress makes of it
        (`ingress_path`): `/v1/./%65mbeddings` purges what `/v1/embeddings` cached."""
        if not _PATH.fullmatch(path):
            raise BadPurge("PURGE: the URL has characters outside RFC 3986")
        path = ingress_path(path)
        if purge_all and keys:
            raise BadPurge("send X-Purge-All or Surrogate-Key, not both")
        if purge_all:
            if purge_all != ["true"]:
                raise BadPurge("X-Purge-All must be true")
            return cls(path, purge_all=True)
        if keys:
            joined = " ".join(keys)  # std.collect(req.http.Surrogate-Key, " ")
            if not _KEYS.fullmatch(joined):
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
    def from_json(cls, text: object) -> Purge:
        """From `to_json`'s text (or that JSON, parsed); `BadPurge` for anything else."""
        try:
            doc: Any = json.loads(text) if isinstance(text, str | bytes) else text
            path, purge_all, keys = doc["path"], doc.get("purge_all", False), doc.get("keys", [])
            if not isinstance(purge_all, bool) or not isinstance(keys, list):
                raise TypeError("purge_all must be a boolean, keys a list")
            return cls(path, purge_all, tuple(keys))
        except (ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, BadPurge):
                raise
            raise BadPurge(f"not a purge: {type(exc).__name__}: {exc}"[:200]) from None


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


MAX_HEAD_BYTES = 16 << 10
MAX_BODY_BYTES = 64 << 10
KEPT_BODY = 300


class BadAnswer(Exception):
    """What the target sent is not an HTTP/1.x answer this client reads."""


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        self.writer.close()

    @property
    def usable(self) -> bool:
        """Open, and nothing arrived on it since its last answer (bytes the target sent unasked would
        be read as the answer to the next request)."""
        return not (self.reader.at_eof() or self.writer.is_closing() or _buffered(self.reader))


def _buffered(reader: asyncio.StreamReader) -> int:
    """Bytes received and not read yet (asyncio's StreamReader keeps them in `_buffer`)."""
    return len(getattr(reader, "_buffer", b""))


def _split(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


class PurgeClient:
    """Keep-alive HTTP/1.1 connections to the targets, for `PURGE` (see the module docstring)."""

    def __init__(self, idle_per_target: int = 16, busy_per_target: int = 32) -> None:
        self._idle: dict[str, deque[_Connection]] = {}
        self._max_idle, self._max_busy = idle_per_target, busy_per_target
        self._slots: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}  # target -> (slots, [users])
        self._closed = False

    async def purge(self, target: str, purge: Purge) -> tuple[int, str]:
        """(status, the body's first 300 bytes); raises OSError, EOFError, BadAnswer. The caller bounds
        it in time, waiting for a slot included (a cancelled request closes its connection)."""
        slots, users = self._slots.setdefault(target, (asyncio.Semaphore(self._max_busy), [0]))
        users[0] += 1
        try:
            async with slots:
                return await self._purge(target, purge)
        finally:
            users[0] -= 1
            if not users[0]:
                del self._slots[target]

    async def _purge(self, target: str, purge: Purge) -> tuple[int, str]:
        request = _request(target, purge)
        conn, reused = self._take(target), True
        while True:
            if conn is None:
                host, port = _split(target)
                reader, writer = await asyncio.open_connection(host, port, limit=MAX_HEAD_BYTES)
                conn, reused = _Connection(reader, writer), False
            try:
                status, body, keep = await _exchange(conn, request)
            except (OSError, EOFError) as exc:
                conn.close()
                if reused:  # closed by the target while kept: once more on a fresh connection
                    self._drop_idle(target)
                    conn = None
                    continue
                raise exc from None
            except BaseException:
                conn.close()
                raise
            if keep and not self._closed:
                self._keep(target, conn)
            else:
                conn.close()
            return status, body

    def _take(self, target: str) -> _Connection | None:
        idle = self._idle.get(target)
        found = None
        while idle and found is None:
            conn = idle.pop()
            if conn.usable:
                found = conn
            else:
                conn.close()
        if idle is not None and not idle:
            del self._idle[target]  # a target that left the set leaves nothing behind
        return found

    def _keep(self, target: str, conn: _Connection) -> None:
        idle = self._idle.setdefault(target, deque())
        if len(idle) >= self._max_idle:
            conn.close()
        else:
            idle.append(conn)

    def _drop_idle(self, target: str) -> None:
        for conn in self._idle.pop(target, ()):
            conn.close()

    def forget(self, targets: Collection[str]) -> None:
        """Close the kept connections of `targets` (they left the set: nothing would take them again,
        and a target that never comes back must leave nothing behind)."""
        for target in targets:
            self._drop_idle(target)

    async def close(self) -> None:
        self._closed = True
        idle = [conn for conns in self._idle.values() for conn in conns]
        self._idle.clear()
        for conn in idle:
            conn.close()
        if idle:
            async with asyncio.timeout(2):
                await asyncio.gather(*(c.writer.wait_closed() for c in idle), return_exceptions=True)


def _request(target: str, purge: Purge) -> bytes:
    # the path and the header values are validated (Purge.parse): no spaces, no CR/LF
    headers = "".join(f"{name}: {value}\r\n" for name, value in purge.headers().items())
    return f"PURGE {purge.path} HTTP/1.1\r\nHost: {target}\r\n{headers}Content-Length: 0\r\n\r\n".encode()


async def _exchange(conn: _Connection, request: bytes) -> tuple[int, str, bool]:
    """Send `request`, read the answer: (status, first bytes of the body, whether to keep the
    connection)."""
    conn.writer.write(request)
    await conn.writer.drain()
    while True:
        try:
            head = await conn.reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise BadAnswer(f"headers over {MAX_HEAD_BYTES} bytes") from None
        version, status, headers = _parse_head(head)
        if status >= 200:
            break  # a 1xx (100 Continue) is followed by the real answer
    keep = headers.get("connection", "").lower() != "close" and (
        version == b"HTTP/1.1" or headers.get("connection", "").lower() == "keep-alive"
    )
    if status in (204, 304):
        return status, "", keep
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(conn.reader)
    elif (length := headers.get("content-length")) is not None:
        if not (length.isascii() and length.isdigit()):  # isdigit alone takes "²" (Latin-1 0xB2)
            raise BadAnswer(f"Content-Length {length[:20]!r}")
        size = int(length)
        if size > MAX_BODY_BYTES:
            body, keep = await conn.reader.readexactly(KEPT_BODY) if size >= KEPT_BODY else b"", False
        else:
            body = await conn.reader.readexactly(size)
    else:  # to the end of the connection
        body, keep = await conn.reader.read(MAX_BODY_BYTES), False
    if _buffered(conn.reader):  # more than the answer: not a connection to read the next one from
        keep = False
    return status, body[:KEPT_BODY].decode("utf-8", "replace"), keep


def _parse_head(head: bytes) -> tuple[bytes, int, dict[str, str]]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise BadAnswer(f"not an HTTP/1.x status line: {lines[0][:60]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            key, text = name.strip().lower().decode("latin-1"), value.strip().decode("latin-1")
            if key == "content-length" and headers.get(key, text) != text:  # which one frames it?
                raise BadAnswer("two different Content-Length headers")
            headers[key] = text
    return parts[0], int(parts[1]), headers


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = b""
    while True:
        line = await reader.readuntil(b"\r\n")
        digits = line.split(b";", 1)[0].strip()
        if not _HEX.fullmatch(digits):  # int(x, 16) also takes "-5", "0x10" and "1_0"
            raise BadAnswer("a chunk size that is not hexadecimal")
        size = int(digits, 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return body
        if len(body) + size > MAX_BODY_BYTES:
            raise BadAnswer(f"a chunked body over {MAX_BODY_BYTES} bytes")
        chunk = await reader.readexactly(size + 2)
        if chunk[-2:] != b"\r\n":
            raise BadAnswer("a chunk not followed by CRLF")
        body += chunk[:-2]


def _reason(status: int, body: str) -> str:
    try:
        doc = json.loads(body)
        return str(doc["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}"


async def deliver(client: PurgeClient, target: str, purge: Purge, policy: RetryPolicy) -> Delivery:
    """Send `purge` to `target`, retrying an unanswered attempt or a 5xx with backoff."""
    began = time.monotonic()
    status: int | None = None
    error: str | None = None
    attempt = 0
    for attempt in range(1, policy.attempts + 1):
        if attempt > 1:
            await asyncio.sleep(policy.backoff * 2 ** (attempt - 2))
        try:
            async with asyncio.timeout(policy.timeout):
                status, body = await client.purge(target, purge)
        except TimeoutError:
            status, error = None, f"no answer within {policy.timeout:g} s"
            continue
        except (OSError, EOFError, BadAnswer) as exc:
            status, error = None, f"{type(exc).__name__}: {exc}"[:300]
            continue
        except Exception as exc:  # a bug here must fail this target's attempt, not the whole fan-out
            log.error("purge %s to %s: unexpected %r", purge.path, target, exc, exc_info=exc)
            status, error = None, f"{type(exc).__name__}: {exc}"[:300]
            continue
        error = None if status == 200 else _reason(status, body)
        if not _retryable(status):
            break
    return Delivery(target, status, (time.monotonic() - began) * 1000, attempt, error)
