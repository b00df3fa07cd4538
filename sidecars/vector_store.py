"""Where the embedding cache keeps its vectors: `file:///DIR` (one machine) or `s3://BUCKET/PREFIX`.

`parse_store_url(url)` checks `--store` (one line for anything else, or for `s3://` without boto3);
`open_store(url, ...)` makes the store. Both kinds are a `VectorStore`: async `start()`/`close()`,
`get_many(model, keys)` (each key's vector, None when absent, or the `OSError` that key's read raised:
one bad read does not fail the others), `write(model, key, data)` and `probe()` (the readiness check:
raises `OSError` when the store cannot be used). `StoreError` is the `OSError` a store raises in one
line. The S3 store is `meshkit.sidecars.s3_store`.

`FileStore(root)`: each vector is the float32 little-endian bytes of one embedding, in the file
`<root>/<model-safe>/<key[:2]>/<key>` (`key` a hex SHA-256). `model-safe` is the model name with every
character outside `[A-Za-z0-9._-]` (and a leading dot) replaced by `_` and, when that changed anything,
`-` and the first 8 hex digits of the name's SHA-256, so two models never share a folder
and no name escapes `root`. A name longer than `MODEL_DIR_MAX` (200) characters is cut to 191 and gets
the same digest: an item of a longer name could be neither read nor written (a file name holds 255
bytes), and a lookup whose every item failed marks the store down for every request. A write goes to
a temporary file in the same folder, then `os.replace`: a reader sees the old file, the new one or
none, never half a vector.

`FileStore.get`/`put`/`open` are blocking; its `VectorStore` methods run them in a thread (one thread
for a whole `get_many`). `get` answers None for a vector that is not there (or whose length is not a
whole number of float32 components) and raises `OSError` for a store that cannot be read; `put` raises
`OSError` for one that cannot be written; `probe()` creates and removes a temporary file in the root.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from meshkit.sidecars.s3_store import S3Store

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
MODEL_DIR_MAX = 200  # characters: one file name may have 255 bytes, an S3 key 1024 (the prefix too)


def model_dir(model: str) -> str:
    """`model` as one path-safe folder name of at most `MODEL_DIR_MAX` characters (module docstring)."""
    safe = _UNSAFE.sub("_", model)
    if safe.startswith("."):  # never ".", ".." or a hidden folder
        safe = "_" + safe[1:]
    if safe != model or len(safe) > MODEL_DIR_MAX:
        safe = f"{safe[: MODEL_DIR_MAX - 9]}-{hashlib.sha256(model.encode()).hexdigest()[:8]}"
    return safe


class StoreError(OSError):
    """A store that could not be read or written, in one line (`S3 GET 503 SlowDown`)."""


class VectorStore(Protocol):
    """What the embedding cache needs from a store (see the module docstring)."""

    @property
    def url(self) -> str: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def get_many(self, model: str, keys: Sequence[str]) -> Sequence[bytes | OSError | None]: ...

    async def write(self, model: str, key: str, data: bytes) -> int: ...

    async def probe(self) -> None: ...


class FileStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def url(self) -> str:
        return self.root.as_uri()

    def open(self) -> None:
        """Create the root folder and check it can be written (the daemon's start)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-"):
            pass

    def path(self, model: str, key: str) -> Path:
        return self.root / model_dir(model) / key[:2] / key

    def get(self, model: str, key: str) -> bytes | None:
        try:
            data = self.path(model, key).read_bytes()
        except FileNotFoundError:
            return None
        if not data or len(data) % 4:
            return None
        return data

    def put(self, model: str, key: str, data: bytes) -> int:
        """Store `data` under `key`; the bytes written."""
        target = self.path(model, key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{key[:8]}-")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return len(data)

    # -- VectorStore ---------------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self.open)

    async def close(self) -> None:
        return None

    def _get_all(self, model: str, keys: Sequence[str]) -> list[bytes | OSError | None]:
        found: list[bytes | OSError | None] = []
        for key in keys:
            try:
                found.append(self.get(model, key))
            except OSError as exc:
                found.append(exc)
        return found

    async def get_many(self, model: str, keys: Sequence[str]) -> list[bytes | OSError | None]:
        return await asyncio.to_thread(self._get_all, model, keys)

    async def write(self, model: str, key: str, data: bytes) -> int:
        return await asyncio.to_thread(self.put, model, key, data)

    def _probe(self) -> None:
        with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-"):
            pass

    async def probe(self) -> None:
        await asyncio.to_thread(self._probe)


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def parse_store_url(value: Any) -> str:
    """`--store` checked: `file:///DIR` or `s3://BUCKET/PREFIX` as given; anything else (or s3:// without
    boto3) is a `ValueError` (one line)."""
    text = str(value).strip()
    open_store(text)
    if text.startswith("s3:"):
        from meshkit.sidecars.s3_store import boto3_missing

        if missing := boto3_missing():
            raise ValueError(missing)
    return text


def s3_location(text: str) -> tuple[str, str]:
    """`s3://BUCKET/PREFIX` -> (bucket, prefix without slashes at either end), or `ValueError` (also
    for a prefix with an empty, `.` or `..` segment: see the message)."""
    parts = urlsplit(text)
    bucket, prefix = parts.netloc, unquote(parts.path).strip("/")
    if not _BUCKET.match(bucket) or ".." in bucket or parts.query or parts.fragment:
        raise ValueError(
            "expected s3://BUCKET/PREFIX with an S3 bucket name (3-63 of a-z 0-9 . -), "
            "for example s3://embeddings/cache"
        )
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ValueError(
            f"the prefix {prefix!r} has an empty, '.' or '..' segment: HTTP clients and S3 servers "
            "normalise those away after the request is signed (every read and write refused); "
            "for example s3://embeddings/cache/v1"
        )
    return bucket, prefix


def open_store(
    value: Any,
    *,
    s3_endpoint: str | None = None,
    timeout: float = 0.5,
    write_timeout: float = 5.0,
    connections: int = 64,
    observe: Callable[[str, float], None] | None = None,
) -> FileStore | S3Store:
    """`--store file:///DIR` -> a `FileStore`, `s3://BUCKET/PREFIX` -> an `S3Store` (the other arguments
    are the S3 store's); anything else is a `ValueError` (one line)."""
    text = str(value).strip()
    parts = urlsplit(text)
    if parts.scheme == "s3":
        from meshkit.sidecars.s3_store import S3Store

        bucket, prefix = s3_location(text)
        return S3Store(
            bucket,
            prefix,
            endpoint=s3_endpoint,
            timeout=timeout,
            write_timeout=write_timeout,
            connections=connections,
            observe=observe,
        )
    if parts.scheme != "file" or parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        raise ValueError(
            "expected file:///DIR (an absolute folder) or s3://BUCKET/PREFIX, "
            "for example file:///var/cache/embeddings"
        )
    return FileStore(Path(unquote(parts.path)))
