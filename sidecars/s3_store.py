"""The `s3://BUCKET/PREFIX` vector store: one object per item, fetched by an async client.

Layout: the vector of item `key` (a hex SHA-256) of `model` is the object
`<PREFIX>/<model-safe>/<key>` (`model_dir()` of `meshkit.sidecars.vector_store`; no prefix: the key
starts at the model folder), holding its float32 little-endian bytes (4 x dimensions). Per-item objects
are the source of truth: nothing else is written. A prefix with an empty, `.` or `..` segment is
refused (`s3_location`): the URL is normalised after signing, so every request would be a 403.

The client (measured, see the README numbers): boto3 in a thread pool fetched the 16 items of one
request in 43 ms p50 on loopback SeaweedFS (37 ms in the field notes; no faster than one after the
other, the GIL), aiohttp with 16 concurrent GETs in 8 ms. So the requests are aiohttp's, signed with
botocore's own S3 SigV4 signer (`S3SigV4Auth`), and boto3 is still what reads the configuration:
credentials and region come from boto3's default chain (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/
`AWS_SESSION_TOKEN`, `AWS_PROFILE` and the shared files, web identity, container and instance roles;
region `AWS_REGION`/`AWS_DEFAULT_REGION`/the profile, else `us-east-1`). Refreshable credentials (roles)
are refreshed in a thread every minute, never on the event loop; requests are signed with the last
frozen copy. boto3 not installed: `--store s3://...` is refused with one line naming `meshkit[s3]`.

Addressing: with `--s3-endpoint URL` (MinIO, SeaweedFS; else boto3's own variables
`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`) path style `URL/BUCKET/KEY`; without any of them AWS,
virtual-hosted `https://BUCKET.s3.REGION.amazonaws.com/KEY` (path style for a bucket name with dots,
which TLS cannot cover).

Deadlines and connections: every read (and the readiness probe) is bounded by `timeout`, every write by
`write_timeout` (aiohttp's total timeout; the caller adds its own deadline over a request's whole
lookup); connecting by at most 1 s of it. Writes get longer because nobody waits for them and a first
PUT can be slow (SeaweedFS grows a volume on a bucket's first write: over 0.5 s here). No retries inside: a
failed GET is a miss the upstream answers, a failed PUT leaves the item uncached until it is missed
again (the embedding cache counts both). One aiohttp connector holds up to `connections` keep-alive
connections (the cache's store concurrency), so 16 concurrent GETs reuse 16 sockets.

Errors: `StoreError` (an `OSError`) with one line: `S3 GetObject 503 SlowDown`, `S3 unreachable: ...`,
`S3 did not answer within 0.5 s`. A missing object is `None`, not an error.

Start (`start()`), decided for a demanding operator: a misconfiguration refuses to start with one line
(`DependencyError`, exit 1): the bucket does not exist (`NoSuchBucket`), the credentials are refused
(`InvalidAccessKeyId`, `SignatureDoesNotMatch`, `AccessDenied`), the bucket is in another region, or no
credentials are found at all. An outage (S3 unreachable, timing out, 5xx) does not stop the start: the
daemon serves from the upstream, says so in the log and in `/readyz`, and uses S3 once it answers. The
start check is a `ListObjectsV2` of at most one key (its error body names the cause; HEAD has none); the
readiness probe is `HeadBucket`. Permissions needed: `s3:ListBucket` on the bucket, `s3:GetObject` and
`s3:PutObject` on the prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp

from meshkit.errors import DependencyError
from meshkit.sidecars.vector_store import StoreError, model_dir

log = logging.getLogger("meshkit.embedding_cache.s3")

DEFAULT_REGION = "us-east-1"
CREDENTIALS_REFRESH = 60.0  # seconds between refreshes of role credentials (in a thread)
START_CHECK_TIMEOUT = 5.0  # the start's ListObjectsV2 may take this long before it counts as an outage
REFUSED_CODES = frozenset(
    {
        "NoSuchBucket",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "PermanentRedirect",
        "AuthorizationHeaderMalformed",
        "InvalidBucketName",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidToken",
        "ExpiredToken",
    }
)
_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]{1,300})</Message>")
_DNS_BUCKET = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_UNSIGNED_KEY_CHARS = "/-_.~"


def boto3_missing() -> str | None:
    """One line naming the extra when boto3 cannot be imported, else None."""
    try:
        import boto3  # noqa: F401
    except ImportError:
        return "s3:// stores need boto3: pip install 'meshkit[s3]'"
    return None


class S3Store:
    """`s3://bucket/prefix` (see the module docstring). `start()` before use, `close()` after."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        endpoint: str | None = None,
        timeout: float = 0.5,
        write_timeout: float = 5.0,
        connections: int = 64,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self.timeout = timeout
        self.write_timeout = write_timeout
        self.connections = connections
        self.observe = observe  # (operation, seconds) of every S3 call: the cache's latency histogram
        self.region = DEFAULT_REGION
        self.session: aiohttp.ClientSession | None = None
        self._credentials: Any = None  # botocore Credentials (maybe refreshable)
        self._signer: Any = None  # botocore S3SigV4Auth over the last frozen credentials
        self._refresher: asyncio.Task[None] | None = None
        self._base = ""

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def object_key(self, model: str, key: str) -> str:
        name = f"{model_dir(model)}/{key}"
        return f"{self.prefix}/{name}" if self.prefix else name

    # -- start and close -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Resolve region and credentials (boto3's chain, in a thread), open the client, check the
        bucket: a misconfiguration raises `DependencyError`, an outage only logs (module docstring)."""
        await asyncio.to_thread(self._configure)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.connections, limit_per_host=self.connections),
            auto_decompress=False,
        )
        self._refresher = asyncio.create_task(self._refresh_credentials())
        try:
            status, body = await self._request(
                "ListObjectsV2", "GET", "", query="list-type=2&max-keys=1", deadline=START_CHECK_TIMEOUT
            )
        except StoreError as exc:
            log.warning("%s: %s at start; serving from the upstream until it answers", self.url, exc)
            return
        if status == 200:
            return
        code, message = _error_code(body)
        if status in (301, 400, 403, 404) or code in REFUSED_CODES:
            where = self.endpoint or f"AWS region {self.region}"
            raise DependencyError(
                "s3", f"{self.url} at {where}: {code or status}{': ' + message if message else ''}"
            )
        log.warning("%s: S3 answered %s %s at start; serving from the upstream", self.url, status, code)

    def _configure(self) -> None:
        import boto3
        from botocore.auth import S3SigV4Auth

        session = boto3.session.Session()
        self.region = session.region_name or DEFAULT_REGION
        if not self.endpoint:
            env = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            self.endpoint = env.rstrip("/") if env else None
        credentials = session.get_credentials()
        if credentials is None:
            raise DependencyError(
                "s3",
                "no AWS credentials found (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                "or a pod/instance role)",
            )
        self._credentials = credentials
        self._signer = S3SigV4Auth(credentials.get_frozen_credentials(), "s3", self.region)
        if self.endpoint:
            self._base = f"{self.endpoint}/{quote(self.bucket)}"
        elif _DNS_BUCKET.match(self.bucket):
            self._base = f"https://{self.bucket}.s3.{self.region}.amazonaws.com"
        else:
            self._base = f"https://s3.{self.region}.amazonaws.com/{quote(self.bucket)}"

    async def _refresh_credentials(self) -> None:
        from botocore.auth import S3SigV4Auth

        while True:
            await asyncio.sleep(CREDENTIALS_REFRESH)
            try:
                frozen = await asyncio.to_thread(self._credentials.get_frozen_credentials)
            except Exception as exc:  # keep the last good ones; S3 will say when they expire
                log.warning("refreshing the AWS credentials failed: %s", exc)
                continue
            self._signer = S3SigV4Auth(frozen, "s3", self.region)

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self.session is not None:
            await self.session.close()

    # -- the store's calls -----------------------------------------------------------------------------
    async def get_many(self, model: str, keys: Sequence[str]) -> list[bytes | StoreError | None]:
        """Every key's vector (None: not stored), fetched concurrently; a failed GET is its error."""
        results = await asyncio.gather(*(self.get(model, key) for key in keys), return_exceptions=True)
        out: list[bytes | StoreError | None] = []
        for result in results:
            if isinstance(result, StoreError) or result is None or isinstance(result, bytes):
                out.append(result)
            elif isinstance(result, BaseException):
                raise result
        return out

    async def get(self, model: str, key: str) -> bytes | None:
        status, body = await self._request("GetObject", "GET", self.object_key(model, key))
        if status == 200:
            return body if body and not len(body) % 4 else None
        if status == 404:
            return None
        raise _answer_error("GetObject", status, body)

    async def write(self, model: str, key: str, data: bytes) -> int:
        status, body = await self._request(
            "PutObject", "PUT", self.object_key(model, key), data=data, deadline=self.write_timeout
        )
        if status != 200:
            raise _answer_error("PutObject", status, body)
        return len(data)

    async def probe(self) -> None:
        """`HeadBucket`: raises `StoreError` unless the bucket answers 200."""
        status, body = await self._request("HeadBucket", "HEAD", "")
        if status != 200:
            raise _answer_error("HeadBucket", status, body)

    async def _request(
        self,
        op: str,
        method: str,
        key: str,
        *,
        query: str = "",
        data: bytes = b"",
        deadline: float | None = None,
    ) -> tuple[int, bytes]:
        from botocore.awsrequest import AWSRequest

        if self.session is None or self._signer is None:
            raise StoreError("the S3 store is not started")
        url = f"{self._base}/{quote(key, safe=_UNSIGNED_KEY_CHARS)}" if key else f"{self._base}/"
        if query:
            url = f"{url}?{query}"
        signed = AWSRequest(method=method, url=url, data=data)
        self._signer.add_auth(signed)
        headers = dict(signed.headers.items())
        limit = self.timeout if deadline is None else deadline
        began = time.monotonic()
        try:
            async with self.session.request(
                method,
                url,
                data=data or None,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=limit, sock_connect=min(limit, 1.0)),
                allow_redirects=False,
            ) as resp:
                return resp.status, await resp.read()
        except TimeoutError:
            raise StoreError(f"S3 did not answer within {limit:g} s") from None
        except aiohttp.ClientError as exc:
            raise StoreError(f"S3 unreachable: {exc or type(exc).__name__}") from None
        finally:
            if self.observe is not None:
                self.observe(op, time.monotonic() - began)


def _error_code(body: bytes) -> tuple[str, str]:
    code = _CODE.search(body)
    message = _MESSAGE.search(body)
    return (
        code.group(1).decode("utf-8", "replace") if code else "",
        message.group(1).decode("utf-8", "replace") if message else "",
    )


def _answer_error(op: str, status: int, body: bytes) -> StoreError:
    code, _ = _error_code(body)
    return StoreError(f"S3 {op} {status}{' ' + code if code else ''}")
