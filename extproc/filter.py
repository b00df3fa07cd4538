"""What a filter author imports: the `Filter` protocol, the per-request `Exchange` and the `Reply`.

A filter is a plain class with a kebab-case `name`, an `Options` dataclass taken by `__init__`, and any
of the phase hooks below. A hook takes the `Exchange` and returns `None` (carry on) or a `Reply` (answer
the client now; no later hook runs). Hooks may be plain functions or coroutines; the chain finds out
which, once, at start-up.

    on_request_headers(exchange)   request headers arrived (always the first phase)
    on_request_body(exchange)      the whole request body arrived (only for requests with a body)
    on_response_headers(exchange)  the upstream's response headers arrived (ext_proc only): `response_headers`
    on_response_body(exchange)     the upstream's whole response body arrived (ext_proc only): `response_body`

Filters never touch protobuf: they read `headers`/`body` and change the request through
`set_header`, `remove_header` and `clear_route_cache`; the server turns that into Envoy's messages.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from meshkit.errors import ClientError, error_body

__all__ = ["PHASES", "Exchange", "Filter", "Hook", "Phase", "Reply"]


class Phase(enum.Enum):
    REQUEST_HEADERS = "request_headers"
    REQUEST_BODY = "request_body"
    RESPONSE_HEADERS = "response_headers"
    RESPONSE_BODY = "response_body"

    # Members are singletons: identity hashing keeps dict lookups on the request path in C.
    __hash__ = object.__hash__

    @property
    def hook_name(self) -> str:
        return f"on_{self.value}"


PHASES: tuple[Phase, ...] = tuple(Phase)


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer to the client that stops the chain (Envoy's ImmediateResponse / ext_authz denial)."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    details: str = ""

    @classmethod
    def error(cls, status: int, type: str, message: str, code: str | None = None) -> Reply:
        """The JSON error reply: `{"error": {"message", "type", "code"}}` with a content-type."""
        return cls(
            status=status,
            body=error_body(type, message, code),
            headers=(("content-type", "application/json"),),
            details=f"meshkit_{type}",
        )

    @classmethod
    def from_client_error(cls, exc: ClientError) -> Reply:
        return cls.error(exc.status, exc.type, exc.message, exc.code)


# Headers as a mapping, or a function that builds one on first read (most filters never read them).
HeaderSource = Callable[[], Mapping[str, str]] | Mapping[str, str] | None


def _resolve(source: HeaderSource) -> Mapping[str, str]:
    if source is None:
        return {}
    return source() if callable(source) else source


class Exchange:
    """One HTTP request as the chain sees it: one gRPC stream, or one ext_authz `Check`.

    `headers` is built lazily from the message on first read (most filters never read it), lowercase
    names, the last value wins for repeated names. Pending mutations collect per phase; the server
    drains them into the response for that phase with `take_mutations()`.
    """

    __slots__ = (
        "_header_source",
        "_headers",
        "_remove",
        "_request_id",
        "_response_header_source",
        "_response_headers",
        "_set",
        "body",
        "clear_route",
        "end_of_stream",
        "phase",
        "reply",
        "response_body",
        "state",
    )

    def __init__(self, header_source: HeaderSource = None) -> None:
        self._header_source = header_source
        self._headers: Mapping[str, str] | None = None
        self._set: dict[str, str] = {}
        self._remove: set[str] = set()
        self.body: bytes | None = None
        self._response_header_source: HeaderSource = None
        self._response_headers: Mapping[str, str] | None = None
        self.response_body: bytes | None = None
        self.clear_route = False
        self.end_of_stream = False
        self.phase = Phase.REQUEST_HEADERS
        self.reply: Reply | None = None
        self._request_id: str | None = None
        self.state: dict[str, Any] = {}

    def set_header_source(self, source: HeaderSource) -> None:
        """Where `headers` comes from (read lazily, once); the server sets it when headers arrive."""
        self._header_source = source
        self._headers = None

    # -- reading -----------------------------------------------------------------------------------
    @property
    def headers(self) -> Mapping[str, str]:
        if self._headers is None:
            self._headers = _resolve(self._header_source)
        return self._headers

    def set_response_header_source(self, source: HeaderSource) -> None:
        self._response_header_source = source
        self._response_headers = None

    @property
    def response_headers(self) -> Mapping[str, str]:
        """The upstream's response headers (ext_proc response phases; empty before them)."""
        if self._response_headers is None:
            self._response_headers = _resolve(self._response_header_source)
        return self._response_headers

    @property
    def request_id(self) -> str:
        """Envoy's `x-request-id` (for logs), read only when something asks for it."""
        if self._request_id is None:
            self._request_id = self.headers.get("x-request-id", "")
        return self._request_id

    @request_id.setter
    def request_id(self, value: str) -> None:
        self._request_id = value

    def header(self, name: str, default: str | None = None) -> str | None:
        """The request header `name` as a later hook will see it (pending sets and removes applied)."""
        name = name.lower()
        if name in self._set:
            return self._set[name]
        if name in self._remove:
            return default
        return self.headers.get(name, default)

    # -- changing ----------------------------------------------------------------------------------
    def set_header(self, name: str, value: str) -> None:
        """Set (overwrite or add) a request header. The client's own value never survives."""
        name = name.lower()
        self._remove.discard(name)
        self._set[name] = value

    def remove_header(self, name: str) -> None:
        name = name.lower()
        self._set.pop(name, None)
        self._remove.add(name)

    def clear_route_cache(self) -> None:
        """Ask Envoy to pick the route again after this phase (needed when routing headers change)."""
        self.clear_route = True

    def take_mutations(self) -> tuple[dict[str, str], set[str], bool]:
        """Hand the pending (sets, removes, clear_route_cache) to the server and start afresh."""
        sets, removes, clear = self._set, self._remove, self.clear_route
        if sets or removes or clear:
            self._set, self._remove, self.clear_route = {}, set(), False
        return sets, removes, clear


Hook = Callable[[Exchange], "Reply | Awaitable[Reply | None] | None"]


@runtime_checkable
class Filter(Protocol):
    """A filter: `name`, an `Options` dataclass, `__init__(options)`, and any of the phase hooks.

    Optional class attributes `reads_headers` / `sets_headers` (frozensets of lowercase names) declare
    the request headers it reads and sets: ext_authz over HTTP forwards only the ones filters read
    (plus `:method`, `:path`, `:authority` and Envoy's defaults) and copies back only the ones they set.
    """

    name: ClassVar[str]
    Options: ClassVar[type[Any]]
