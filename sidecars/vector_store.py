"""Where the embedding cache keeps its vectors: `file:///DIR` (one machine). `s3://` comes later.

`parse_store(url)` reads `--store`; an `s3://` URL (or any other scheme) is refused with one line.

`FileStore(root)`: each vector is the float32 little-endian bytes of one embedding, in the file
`<root>/<model-safe>/<key[:2]>/<key>` (`key` a hex SHA-256). `model-safe` is the model name with every
character outside `[A-Za-z0-9._-]` (and a leading dot) replaced by `_` and, when that changed anything,
`-` and the first 8 hex digits of the name's SHA-256, so two models never share a folder
and no name escapes `root`. A write goes to a temporary file in the same folder, then `os.replace`:
a reader sees the old file, the new one or none, never half a vector.

The methods are blocking (the cache calls them in a thread); `get` answers None for a vector that is
not there (or whose length is not a whole number of float32 components) and raises `OSError` for a
store that cannot be read; `put` raises `OSError` for one that cannot be written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def model_dir(model: str) -> str:
    """`model` as one path-safe folder name (see the module docstring)."""
    safe = _UNSAFE.sub("_", model)
    if safe.startswith("."):  # never ".", ".." or a hidden folder
        safe = "_" + safe[1:]
    if safe != model:
        safe = f"{safe}-{hashlib.sha256(model.encode()).hexdigest()[:8]}"
    return safe


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


def parse_store_url(value: Any) -> str:
    """`--store` checked: a `file:///DIR` URL as given; anything else is a `ValueError` (one line)."""
    text = str(value).strip()
    open_store(text)
    return text


def open_store(value: Any) -> FileStore:
    """`--store file:///DIR` -> a `FileStore`; anything else is a `ValueError` (one line)."""
    text = str(value).strip()
    parts = urlsplit(text)
    if parts.scheme == "s3":
        raise ValueError("s3:// stores are not supported yet: use file:///DIR")
    if parts.scheme != "file" or parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        raise ValueError(
            "expected file:///DIR (an absolute folder), for example file:///var/cache/embeddings"
        )
    return FileStore(Path(unquote(parts.path)))
