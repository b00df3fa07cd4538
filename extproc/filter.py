"""What a filter author imports: the `Filter` base, the per-request `Exchange` and the `Reply`.

A filter is a class with a kebab-case `name`, an `Options` dataclass taken by `__init__`, and any of
the phase hooks below (subclass `Filter` to get them typed and the optional parts defaulted; a plain
class with the same members works too). A hook takes the `Exchange` and returns `None` (carry on) or a
`Reply` (answer the client now; no later hook runs). Hooks may be plain functions or coroutines; the
chain finds out which, once, at start-up. A method named `on_...` that is not one of these is a
start-up error (a misspelt hook would otherwise never run).

    on_request_headers(exchange)   request headers arrived (always the first phase)
    on_request_body(exchange)      the whole request body arrived (only for requests with a body)
    on_response_headers(exchange)  the upstream's response headers arrived (ext_proc only): `response_headers`
    on_response_body(exchange)     the upstream's whole response body arrived (ext_proc only): `response_body`

Optional `async start()` / `close()` hold the filter's clients (Redis, NATS, a JWKS fetch): the daemon is
ready only after every filter started, and closes them in reverse order.

Filters never touch protobuf: they read `headers`/`body` and change the request through `set_header`,
`remove_header` and `clear_route_cache` (request phases) and `replace_body` (request-body phase, ext_proc
only), the response through `set_response_header` and `remove_response_header` (response phases); the
server turns that into Envoy's messages.
"""

from __future__ import annotations

import enum
import inspect
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from meshkit.errors import ClientError, FilterDefinitionError, error_body

__all__ = ["HOOK_PHASES", "PHASES", "Exchange", "Filter", "Hook", "Phase", "Reply", "hooks_of"]


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

    @property
    def is_response(self) -> bool:
        return self in _RESPONSE_PHASES


PHASES: tuple[Phase, ...] = tuple(Phase)
_RESPONSE_PHASES = frozenset({Phase.RESPONSE_HEADERS, Phase.RESPONSE_BODY})
HOOK_PHASES: dict[str, Phase] = {p.hook_name: p for p in PHASES}


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer to the client that stops the chain (Envoy's ImmediateResponse / ext_authz denial)."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    details: str = ""

    @classmethod
    def error(
        cls,
        status: int,
        type: str,
        message: str,
        code: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> Reply:
        """The JSON error reply: `{"error": {"message", "type", "code"}}` with a content-type."""
        return cls(
            status=status,
            body=error_body(type, message, code),
            headers=(("content-type", "application/json"), *headers),
            details=f"meshkit_{type}",
        )

    @classmethod
    def from_client_error(cls, exc: ClientError) -> Reply:
        return cls.error(exc.status, exc.type, exc.message, exc.code, exc.headers)


# Headers as a mapping, or a function that builds one on first read (most filters never read them).
HeaderSource = Callable[[], Mapping[str, str]] | Mapping[str, str] | None

# A pending set of header changes: (sets, removes, clear_route_cache).
Mutation = tuple[dict[str, str], set[str], bool]
# Everything pending: request-side and response-side mutations, the answer headers, and the body
# (a replacement, if any, and the body as hooks see it).
Snapshot = tuple[Mutation, Mutation, dict[str, str], tuple["bytes | None", "bytes | None"]]


def _resolve(source: HeaderSource) -> Mapping[str, str]:
    if source is None:
        return {}
    return source() if callable(source) else source


class Exchange:
    """One HTTP request as the chain sees it: one gRPC stream, or one ext_authz `Check`.

    `headers` is built lazily from the message on first read (most filters never read it), lowercase
    names, the last value wins for repeated names. Pending mutations collect per phase; the server
    drains them into the response for that phase with `take_mutations()`: request-header changes in
    request phases, response-header changes in response phases.
    """

    __slots__ = (
        "_answer",
        "_header_source",
        "_headers",
        "_new_body",
        "_remove",
        "_request_id",
        "_response_header_source",
        "_response_headers",
        "_response_remove",
        "_response_set",
        "_set",
        "body",
        "clear_route",
        "deadline",
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
        self._response_set: dict[str, str] = {}
        self._response_remove: set[str] = set()
        self._answer: dict[str, str] = {}
        self.body: bytes | None = None
        self._new_body: bytes | None = None
        self._response_header_source: HeaderSource = None
        self._response_headers: Mapping[str, str] | None = None
        self.response_body: bytes | None = None
        self.clear_route = False
        self.end_of_stream = False
        self.phase = Phase.REQUEST_HEADERS
        self.reply: Reply | None = None
        self._request_id: str | None = None
        self.state: dict[str, Any] = {}
        # The event-loop time by which this round of hooks must be done (set by the server per round).
        self.deadline: float | None = None

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
        """Envoy's `x-request-id` (for logs), read only when something asks for it; a client-chosen
        value is cut to 64 characters of `[A-Za-z0-9._:-]` so it cannot forge or flood a log line."""
        if self._request_id is None:
            self._request_id = safe_request_id(self.headers.get("x-request-id", ""))
        return self._request_id

    @request_id.setter
    def request_id(self, value: str) -> None:
        self._request_id = safe_request_id(value)

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
        """Set (overwrite or add) a request header. The client's own value never survives.
        Request phases only: in a response phase the request has already gone upstream."""
        if self.phase.is_response:
            raise RuntimeError(f"set_header({name!r}) in {self.phase.value}: use set_response_header")
        name = _checked(name, value)
        self._remove.discard(name)
        self._set[name] = value

    def remove_header(self, name: str) -> None:
        """Remove a request header (request phases only)."""
        if self.phase.is_response:
            raise RuntimeError(f"remove_header({name!r}) in {self.phase.value}: use remove_response_header")
        name = name.lower()
        self._set.pop(name, None)
        self._remove.add(name)

    def set_response_header(self, name: str, value: str) -> None:
        """Set (overwrite or add) a header of the upstream's response (response phases, ext_proc)."""
        if not self.phase.is_response:
            raise RuntimeError(f"set_response_header({name!r}) in {self.phase.value}: use set_header")
        name = _checked(name, value)
        self._response_remove.discard(name)
        self._response_set[name] = value

    def remove_response_header(self, name: str) -> None:
        """Remove a header of the upstream's response (response phases, ext_proc)."""
        if not self.phase.is_response:
            raise RuntimeError(f"remove_response_header({name!r}) in {self.phase.value}: use remove_header")
        name = name.lower()
        self._response_set.pop(name, None)
        self._response_remove.add(name)

    def set_answer_header(self, name: str, value: str) -> None:
        """A header for the client's answer if the request goes on (x-ratelimit-remaining), decided in the
        request-headers phase. A filter that calls it lists the name in `answer_headers`: over ext_authz it
        rides on the OK answer, over ext_proc it is added in the response-headers phase (which the
        rendered config then sends). A `Reply` carries its own headers instead."""
        if self.phase is not Phase.REQUEST_HEADERS:
            # Over ext_proc the answer's headers are skipped unless asked for in the first answer.
            raise RuntimeError(f"set_answer_header({name!r}) in {self.phase.value}: request headers only")
        name = _checked(name, value)
        self._answer[name] = value

    @property
    def answer_headers(self) -> Mapping[str, str]:
        """The headers `set_answer_header` collected (what the servers add to a successful answer)."""
        return self._answer

    def replace_body(self, data: bytes) -> None:
        """Send `data` upstream instead of the request body (request-body phase only). Later hooks see
        it as `body`. Only ext_proc can carry it (the server also sets `content-length` to match);
        ext_authz cannot change a body, so a check whose chain replaced the body is refused (500 JSON,
        `body_rewrite_needs_ext_proc`) instead of going upstream with the old body."""
        if self.phase is not Phase.REQUEST_BODY:
            raise RuntimeError(f"replace_body() in {self.phase.value}: only in request_body")
        if not isinstance(data, bytes):
            raise TypeError(f"replace_body() takes bytes, not {type(data).__name__}")
        self.body = data
        self._new_body = data

    @property
    def body_replaced(self) -> bool:
        """Whether a hook called `replace_body` and the server has not taken the new body yet."""
        return self._new_body is not None

    def take_body(self) -> bytes | None:
        """Hand the replaced body (None: unchanged) to the server, once."""
        data, self._new_body = self._new_body, None
        return data

    def clear_route_cache(self) -> None:
        """Ask Envoy to pick the route again after this phase (needed when routing headers change).
        Over ext_authz this works only when the rendered filter config says so: a filter that calls it
        declares `reroutes = True`, and `meshkit render` sets `clear_route_cache: true`."""
        self.clear_route = True

    def take_mutations(self) -> Mutation:
        """Hand the pending (sets, removes, clear_route_cache) of the current phase's side (request or
        response headers) to the server and start afresh."""
        if self.phase.is_response:
            sets, removes = self._response_set, self._response_remove
            if sets or removes:
                self._response_set, self._response_remove = {}, set()
            if self._answer and self.phase is Phase.RESPONSE_HEADERS:
                sets = {**self._answer, **sets}
                self._answer = {}
            return sets, removes, False
        sets, removes, clear = self._set, self._remove, self.clear_route
        if sets or removes or clear:
            self._set, self._remove, self.clear_route = {}, set(), False
        return sets, removes, clear

    def drop_mutations(self) -> None:
        """Forget every pending change (the chain replied, so none of them may apply)."""
        self._set, self._remove, self.clear_route = {}, set(), False
        self._response_set, self._response_remove = {}, set()
        self._answer = {}
        self._new_body = None

    def snapshot(self) -> Snapshot:
        """The pending changes now, to `restore()` if a hook that made more of them is abandoned."""
        return (
            (dict(self._set), set(self._remove), self.clear_route),
            (dict(self._response_set), set(self._response_remove), False),
            dict(self._answer),
            (self._new_body, self.body),
        )

    def restore(self, snapshot: Snapshot) -> None:
        request, response, self._answer, (self._new_body, self.body) = snapshot
        (self._set, self._remove, self.clear_route), (self._response_set, self._response_remove, _) = (
            request,
            response,
        )


# RFC 9110 field names (tokens) and values without control characters but HTAB (Envoy refuses CR, LF
# and NUL, aiohttp the others): what every path can carry. A
# filter that copies client data (a body field) into a header gets a ValueError, i.e. its own 500
# JSON, instead of Envoy's bare reply that differs per path.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
UNSAFE_HEADER_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # the HTTP check server checks replies too


def _checked(name: str, value: str) -> str:
    lowered = name.lower()
    if not _TOKEN.fullmatch(lowered):
        raise ValueError(f"not a valid header name: {name!r}")
    if UNSAFE_HEADER_CHARS.search(value):
        raise ValueError(f"header {lowered}: the value holds a control character")
    return lowered


_REQUEST_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-")
MAX_REQUEST_ID = 64


def safe_request_id(value: str) -> str:
    """`value` if it is a plausible request id (at most 64 of `[A-Za-z0-9._:-]`), else a bounded,
    printable stand-in: a client can send any x-request-id, and it goes into every log line."""
    if len(value) <= MAX_REQUEST_ID and _REQUEST_ID_CHARS.issuperset(value):
        return value
    cleaned = "".join(c if c in _REQUEST_ID_CHARS else "_" for c in value[:MAX_REQUEST_ID])
    return cleaned + ("~" if len(value) > MAX_REQUEST_ID else "")


Hook = Callable[[Exchange], "Reply | Awaitable[Reply | None] | None"]


class Filter:
    """Base class of a filter: subclass it, set `name` and `Options`, override the hooks you need.

    Class attributes tell the rendered Envoy config what the filter needs (`meshkit render`):

    - `reads_headers` / `sets_headers`: request headers it reads and sets (lowercase). ext_authz over
      HTTP forwards only the ones filters read and copies back only the ones they set; every config
      removes the set ones from the client's request before meshkit's filter runs.
    - `fail_open`: True when letting a request through unprocessed is acceptable (body-hash: an
      optimisation). The rendered config fails closed (`failure_mode_allow: false`) as soon as one
      filter of the chain does not, and a hook of a fail-open filter that overruns `--filter-timeout`
      lets the request through instead of answering 504.
    - `reroutes`: True when it calls `clear_route_cache()`; over ext_authz the rendered config then sets
      `clear_route_cache: true` (ext_authz ignores the per-request call).
    - `hash_header`: a request header the upstream cluster is consistent-hashed on (body-hash:
      `x-body-hash`); the rendered route gets a `hash_policy` for it and echoes it on the response.
    - `reads_header_prefixes`: header-name prefixes it reads (auth: `x-auth-`, to remove every one a
      client sent); ext_authz over HTTP forwards headers with these prefixes too.
    - `answer_headers`: headers it may add to a successful answer with `set_answer_header`
      (x-ratelimit-*); over ext_proc the rendered config then sends the response headers.
    - `extra_sections`: option dataclasses it shares with other filters (`--routes-file`); the
      default `from_options` ignores them, a filter that uses them overrides it.
    """

    name: ClassVar[str]
    Options: ClassVar[type[Any]]
    reads_headers: ClassVar[frozenset[str]] = frozenset()
    sets_headers: ClassVar[frozenset[str]] = frozenset()
    fail_open: ClassVar[bool] = False
    reroutes: ClassVar[bool] = False
    hash_header: ClassVar[str | None] = None
    reads_header_prefixes: ClassVar[frozenset[str]] = frozenset()
    answer_headers: ClassVar[frozenset[str]] = frozenset()
    extra_sections: ClassVar[tuple[type[Any], ...]] = ()

    def __init__(self, options: Any) -> None:
        self.options = options

    @classmethod
    def from_options(cls, options: Mapping[type[Any], Any]) -> Any:
        """The filter, built from the daemon's resolved options (its own `Options` section, and the
        `extra_sections` it declares)."""
        return cls(options.get(cls.Options) or cls.Options())

    async def start(self) -> None:
        """Connect, load keys, fetch a JWKS: the daemon is ready only once every filter has started.
        Raise `DependencyError` when a server it needs cannot be reached."""

    async def close(self) -> None:
        """Release what `start()` opened (called in reverse chain order at shutdown)."""

    def collectors(self) -> Iterable[Any]:
        """The filter's own Prometheus collectors, made with `registry=None`: the daemon registers
        them on its registry (served on `/metrics`), so two chains in one process never collide."""
        return ()

    def on_request_headers(self, exchange: Exchange) -> Reply | Awaitable[Reply | None] | None:
        return None

    def on_request_body(self, exchange: Exchange) -> Reply | Awaitable[Reply | None] | None:
        return None

    def on_response_headers(self, exchange: Exchange) -> Reply | Awaitable[Reply | None] | None:
        return None

    def on_response_body(self, exchange: Exchange) -> Reply | Awaitable[Reply | None] | None:
        return None


def _overrides(kind: type[Any], name: str) -> Any:
    """`kind`'s own `name` attribute, or None when it is missing or is `Filter`'s default."""
    fn = getattr(kind, name, None)
    if fn is None or fn is getattr(Filter, name, None):
        return None
    return fn


def hooks_of(kind: type[Any]) -> dict[Phase, Any]:
    """The phase hooks a filter class defines (not `Filter`'s no-op defaults), after checking them:
    a method named `on_...` that is not a phase, or a hook that does not take one exchange, raises
    `FilterDefinitionError` (a TypeError; the CLI prints one line) at start-up instead of silently
    never running."""
    label = getattr(kind, "name", kind.__name__)
    for attr in dir(kind):
        if attr.startswith("on_") and attr not in HOOK_PHASES and callable(getattr(kind, attr)):
            raise FilterDefinitionError(
                f"filter {label!r}: {attr}() is not a phase hook (hooks: {', '.join(HOOK_PHASES)})"
            )
    hooks: dict[Phase, Any] = {}
    for name, phase in HOOK_PHASES.items():
        fn = _overrides(kind, name)
        if fn is None:
            continue
        if not callable(fn):
            raise FilterDefinitionError(f"filter {label!r}: {name} is not a method")
        # (self, exchange); a staticmethod or classmethod takes just the exchange
        bound_already = isinstance(inspect.getattr_static(kind, name), staticmethod | classmethod)
        try:
            inspect.signature(fn).bind(*([None] if bound_already else [None, None]))
        except TypeError:
            wrong = f"filter {label!r}: {name}(self, exchange) takes one exchange"
            raise FilterDefinitionError(wrong) from None
        hooks[phase] = fn
    return hooks


def lifecycle_of(
    instance: Any,
) -> tuple[Callable[[], Awaitable[None]] | None, Callable[[], Awaitable[None]] | None]:
    """The filter's own `start` and `close` coroutines (None where it has none)."""
    kind = type(instance)
    start = instance.start if _overrides(kind, "start") else None
    close = instance.close if _overrides(kind, "close") else None
    return start, close
