"""body-hash: `x-body-hash` = hex digest of the request body, so the mesh can consistent-hash POSTs.

- A request with a non-empty body gets `x-body-hash` (XXH3-128 by default, `--hash sha256`).
- No body, or an empty one: the header is removed. A client never chooses its own cache key.
- `--canonical-json`: a JSON body is hashed in canonical form (sorted keys, compact separators, UTF-8),
  so formatting and key order do not split the cache; `--hash-ignore-fields` first drops top-level
  fields that do not change the answer (`user`, `metadata`, ...). A body that is not JSON is hashed as
  raw bytes, never an error; so is JSON with a duplicate key (parsers disagree on its meaning) and
  JSON over `--canonical-json-max-bytes` (parsing is CPU on the request path). The body is parsed
  by `meshkit.extproc.json_body`, once per request: model-router in the same chain reuses the parse
  (and after a model alias, body-hash hashes the rewritten body the upstream gets).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import xxhash

from meshkit.extproc import json_body
from meshkit.extproc.filter import Exchange, Filter
from meshkit.extproc.headers import BODY_HASH
from meshkit.options import option, parse_size

HASHES: dict[str, Callable[[bytes], str]] = {
    "xxh3-128": lambda data: xxhash.xxh3_128_hexdigest(data),
    "sha256": lambda data: hashlib.sha256(data).hexdigest(),
}


@dataclass(frozen=True)
class BodyHashOptions:
    hash: str = option("xxh3-128", "digest for x-body-hash", choices=tuple(HASHES))
    canonical_json: bool = option(False, "hash JSON bodies in canonical form (sorted keys, compact)")
    canonical_json_max_bytes: int = option(
        256 << 10,
        "with --canonical-json: bigger JSON bodies are hashed raw (parsing blocks the server: ~120 ms/MB)",
        parse=parse_size,
        metavar="BYTES",
    )
    hash_ignore_fields: tuple[str, ...] = option(
        (),
        "with --canonical-json: top-level JSON fields left out of the hash (comma-separated)",
        metavar="FIELD,...",
    )

    def __post_init__(self) -> None:
        if self.hash_ignore_fields and not self.canonical_json:
            raise ValueError("--hash-ignore-fields needs --canonical-json (it applies to the canonical form)")


def canonical_json(body: bytes, ignore: frozenset[str]) -> bytes | None:
    """The canonical form of a JSON body, or None when the body is not (unambiguous) JSON."""
    return canonical_of(json_body.parse(body), ignore)


def canonical_of(doc: Any, ignore: frozenset[str]) -> bytes | None:
    """The canonical form of a parsed body (`json_body`'s strict reading), or None for `NOT_JSON`."""
    if not json_body.is_json(doc):
        return None
    if ignore and isinstance(doc, dict):
        doc = {k: v for k, v in doc.items() if k not in ignore}
    try:
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    except (ValueError, RecursionError):  # lone surrogates from \ud800 escapes cannot be UTF-8
        return None


class BodyHashFilter(Filter):
    name: ClassVar[str] = "body-hash"
    Options: ClassVar[type[BodyHashOptions]] = BodyHashOptions
    sets_headers: ClassVar[frozenset[str]] = frozenset({BODY_HASH})
    hash_header: ClassVar[str | None] = BODY_HASH  # the mesh consistent-hashes the upstream on it
    fail_open: ClassVar[bool] = True  # an optimisation: an unhashed request still gets its answer

    def __init__(self, options: BodyHashOptions) -> None:
        super().__init__(options)
        self.options: BodyHashOptions = options
        self._digest = HASHES[options.hash]
        self._canonical = options.canonical_json
        self._canonical_max = options.canonical_json_max_bytes
        self._ignore = frozenset(options.hash_ignore_fields)

    def on_request_headers(self, exchange: Exchange) -> None:
        # Drop a client-sent value now; a body (if any) brings ours in the next phase.
        exchange.remove_header(BODY_HASH)

    def on_request_body(self, exchange: Exchange) -> None:
        body = exchange.body
        if not body:
            exchange.remove_header(BODY_HASH)
            return
        if self._canonical and len(body) <= self._canonical_max:
            # json_body: parsed once per request, shared with model-router (and its rewritten body)
            body = canonical_of(json_body.document(exchange), self._ignore) or body
        exchange.set_header(BODY_HASH, self._digest(body))

    def digest(self, body: bytes) -> str:
        """The value this filter sets for a non-empty `body`."""
        if self._canonical and len(body) <= self._canonical_max:
            body = canonical_json(body, self._ignore) or body
        return self._digest(body)
