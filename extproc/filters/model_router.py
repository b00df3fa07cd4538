"""model-router: route by the request body's `model` (`x-model`, `x-stream`), with aliases and an allow-list.

For a request whose body is a JSON object with a top-level `model` (OpenAI Chat/Completions/Embeddings,
Anthropic Messages):

- `model` must be a string matching `MODEL_NAME` (`[A-Za-z0-9._:/-]{1,128}`), else 400
  `invalid_request_error` / `invalid_model`; `stream`, when present, a boolean, else 400 `invalid_stream`;
- an alias from `--routes-file` (`models.aliases`, `fast: gpt-4o-mini`) replaces the name, in the header
  and in the body the upstream gets (`Exchange.replace_body`: the body is re-serialized compactly, key
  order kept; ext_proc only, see below);
- with an allow-list (`models.allow`) any other model gets 404 `invalid_request_error` /
  `model_not_found`, OpenAI's answer for an unknown model;
- `x-model: <model>` and `x-stream: true|false` are set and Envoy picks the route again
  (`clear_route_cache`), so a route matching `x-model` sends the request to that model's upstream.

A body that is not a JSON object (no body, not JSON, an array), or an object without `model`, passes
untouched; `x-model` and `x-stream` are removed from every request (a client never sets them; the
rendered Envoy already strips them before meshkit's filter runs) and the route is picked again in the
headers phase too: Envoy's header_mutation filter looks the route up (caching it) before it removes a
client's `x-model`, so a request that model-router does not route would otherwise still follow the
client's header.

Strictness (the body is parsed by `meshkit.extproc.json_body`, once per request, shared with
body-hash): an object-shaped body with a duplicate key gets 400 `duplicate_key` (`{"model": "a",
"model": "b"}`: the router would read one model and the upstream's parser possibly the other). With an
allow-list, an object-shaped body that is not strict JSON (invalid UTF-8, NaN, a syntax error) gets 400
`invalid_json`: a lenient upstream parser might read a model from it that was never checked; so does
a JSON object in another encoding than plain UTF-8 (a BOM, UTF-16/32: Python's `json.loads(bytes)`
reads them), and a body with a `content-encoding` (meshkit sees the compressed bytes, an upstream that
inflates them a model) gets 415 `unsupported_content_encoding`. A top-level key that is `model` but
for case (`MODEL`: Go's encoding/json reads it as `model`) is a `duplicate_key` next to `model`, and
400 `invalid_model` alone with an allow-list. Without an allow-list such bodies pass untouched (to the
default route), like any other body that is not JSON.

Fails closed (`fail_open = False`): the allow-list is a guard. Were meshkit down and the request let
through, it would go to the default route with no model check at all; the rendered config answers 500
instead.

Aliases need ext_proc: ext_authz (gRPC and HTTP) can change headers but not the body, and an aliased
request whose body still names the alias would reach the upstream as a different request than the one
routed. So:

- `meshkit extproc` with aliases and `--http-listen` does not start: a ConfigError saying to drop one
  (the HTTP check port serves ext_authz only, so every aliased request there would fail);
- on the gRPC port, which serves ext_proc and ext_authz alike, an aliased request that arrives over
  ext_authz is refused with a 500 JSON `body_rewrite_needs_ext_proc` (the server core refuses any check
  whose chain replaced the body). A request naming the target model directly works on every path.

Large bodies: a body of `json_body.THREAD_BYTES` (1 MiB) or more is parsed (and an aliased one
re-serialized) in a worker thread, so the event loop keeps serving other requests; about 53 ms for
20 MiB of small chat messages.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from meshkit.errors import ConfigError
from meshkit.extproc import json_body
from meshkit.extproc.filter import Exchange, Filter, Reply
from meshkit.extproc.routes_file import MODEL_NAME, ModelRules, RoutesOptions, load_routes

__all__ = ["X_MODEL", "X_STREAM", "ModelRouterFilter", "ModelRouterOptions", "rewritten"]

X_MODEL = "x-model"
X_STREAM = "x-stream"
CONTENT_ENCODING = "content-encoding"
_OBJECT_START = ord("{")
_WHITESPACE = b" \t\r\n"


@dataclass(frozen=True)
class ModelRouterOptions:
    """model-router's rules live in `--routes-file` (`models:`), shared with auth's scope rules."""


def _invalid(code: str, message: str, status: int = 400) -> Reply:
    return Reply.error(status, "invalid_request_error", message, code)


def rewritten(doc: dict[str, Any]) -> bytes:
    """`doc` as the body the upstream gets after an alias: compact JSON, keys in their order, UTF-8
    (escaped ASCII only when the body holds a lone surrogate `\\ud800`, which UTF-8 cannot carry)."""
    try:
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        return json.dumps(doc, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class _Route:
    model: str  # after the alias
    stream: bool
    aliased: bool


class ModelRouterFilter(Filter):
    name: ClassVar[str] = "model-router"
    Options: ClassVar[type[ModelRouterOptions]] = ModelRouterOptions
    reads_headers: ClassVar[frozenset[str]] = frozenset({CONTENT_ENCODING})  # with an allow-list
    sets_headers: ClassVar[frozenset[str]] = frozenset({X_MODEL, X_STREAM})
    reroutes: ClassVar[bool] = True
    fail_open: ClassVar[bool] = False  # the allow-list is a guard (see the module docstring)
    extra_sections: ClassVar[tuple[type[Any], ...]] = (RoutesOptions,)

    def __init__(self, options: ModelRouterOptions | None = None, rules: ModelRules | None = None) -> None:
        super().__init__(options or ModelRouterOptions())
        self.rules = rules or ModelRules()
        self._aliases = dict(self.rules.aliases)
        self._allow = self.rules.allow

    @classmethod
    def from_options(cls, options: Mapping[type[Any], Any]) -> ModelRouterFilter:
        routes = options.get(RoutesOptions) or RoutesOptions()
        rules = load_routes(routes.routes_file).models
        if rules.aliases:
            _refuse_aliases_over_http(options, routes.routes_file)
        return cls(options.get(ModelRouterOptions) or ModelRouterOptions(), rules)

    # -- hooks ---------------------------------------------------------------------------------------
    def on_request_headers(self, exchange: Exchange) -> None:
        exchange.remove_header(X_MODEL)
        exchange.remove_header(X_STREAM)
        # Envoy may have picked (and cached) the route while the client's x-model was still there: the
        # rendered header_mutation filter looks the route up before it removes the header. Measured:
        # without this, a body with no model went to the client's chosen x-model route.
        exchange.clear_route_cache()

    def on_request_body(self, exchange: Exchange) -> Reply | Awaitable[Reply | None] | None:
        body = exchange.body
        if not body:
            return None
        if self._allow is not None and (refused := _unchecked(exchange, body)) is not None:
            return refused
        if body.lstrip(_WHITESPACE)[:1] != b"{":
            return None  # not a JSON object: nothing to route on (no parse at all)
        if len(body) >= json_body.THREAD_BYTES and not json_body.is_cached(exchange):
            return self._route_large(exchange)
        route = self.decide(json_body.document(exchange))
        if not isinstance(route, _Route):
            return route
        if route.aliased:
            self._rewrite(exchange, rewritten(self._aliased_doc(exchange, route)))
        self._set(exchange, route)
        return None

    async def _route_large(self, exchange: Exchange) -> Reply | None:
        """A big body: parsed (and re-serialized for an alias) in a worker thread."""
        route = self.decide(await json_body.document_async(exchange))
        if not isinstance(route, _Route):
            return route
        if route.aliased:
            doc = self._aliased_doc(exchange, route)
            self._rewrite(exchange, await asyncio.to_thread(rewritten, doc))
        self._set(exchange, route)
        return None

    # -- the decision --------------------------------------------------------------------------------
    def decide(self, doc: Any) -> _Route | Reply | None:
        """What to do with a parsed body (`json_body.parse`): route it, refuse it, or leave it alone."""
        if not json_body.is_json(doc):
            return self._not_json(doc)
        if not isinstance(doc, dict):
            return None
        if len(doc) > 1 or "model" not in doc:
            # Go's encoding/json (and other case-insensitive binders) read `MODEL`/`Model` as `model`,
            # the last one winning: the router would route one model and the upstream serve another.
            variant = next((k for k in doc if k != "model" and k.casefold() == "model"), None)
            if variant is not None:
                return self._case_variant(variant, "model" in doc)
        if "model" not in doc:
            return None
        model = doc["model"]
        if not isinstance(model, str):
            return _invalid("invalid_model", f"`model` must be a string, not {_json_type(model)}")
        if not MODEL_NAME.fullmatch(model):
            return _invalid(
                "invalid_model", f"`model` must be 1 to 128 of A-Z a-z 0-9 . _ : / - (got {_shown(model)})"
            )
        stream = doc.get("stream", False)
        if not isinstance(stream, bool):
            return _invalid("invalid_stream", f"`stream` must be true or false, not {_json_type(stream)}")
        target = self._aliases.get(model, model)
        if self._allow is not None and target not in self._allow:
            return _invalid(
                "model_not_found",
                f"The model `{target}` does not exist or you do not have access to it.",
                status=404,
            )
        return _Route(target, stream, target != model)

    def _not_json(self, doc: json_body.NotJson) -> Reply | None:
        if doc.duplicate is not None:
            return _invalid(
                "duplicate_key",
                f"the body has the key {_shown(doc.duplicate)} twice: parsers disagree on which one counts",
            )
        if self._allow is not None:
            return _invalid("invalid_json", f"the body is not strict JSON ({doc.reason})")
        return None

    def _case_variant(self, key: str, with_model: bool) -> Reply | None:
        if with_model:
            return _invalid(
                "duplicate_key",
                f"the body has the keys 'model' and {_shown(key)}: parsers that ignore case disagree "
                "on which one counts",
            )
        if self._allow is not None:
            return _invalid("invalid_model", f"the model is named by the key 'model', not {_shown(key)}")
        return None

    # -- applying it ---------------------------------------------------------------------------------
    @staticmethod
    def _aliased_doc(exchange: Exchange, route: _Route) -> dict[str, Any]:
        doc: dict[str, Any] = json_body.document(exchange)  # cached: decide() had it
        doc["model"] = route.model  # same key, same place
        return doc

    @staticmethod
    def _rewrite(exchange: Exchange, body: bytes) -> None:
        doc = json_body.document(exchange)
        exchange.replace_body(body)
        json_body.remember(exchange, body, doc)  # body-hash after us hashes what the upstream gets

    @staticmethod
    def _set(exchange: Exchange, route: _Route) -> None:
        exchange.set_header(X_MODEL, route.model)
        exchange.set_header(X_STREAM, "true" if route.stream else "false")
        exchange.clear_route_cache()


def _unchecked(exchange: Exchange, body: bytes) -> Reply | None:
    """With an allow-list: a body meshkit cannot read as it is but an upstream may. A compressed one
    (Envoy hands over the bytes as sent; an upstream that inflates request bodies reads its model), or
    JSON in another encoding than plain UTF-8 (a BOM, UTF-16/32: Python's `json.loads(bytes)`, so
    Starlette/FastAPI, and the parsers that skip a BOM read a model the strict UTF-8 parse never saw)."""
    encoding = (exchange.header(CONTENT_ENCODING) or "").strip().lower()
    if encoding and encoding != "identity":
        return _invalid(
            "unsupported_content_encoding",
            f"a request body with content-encoding {_shown(encoding)} cannot be checked against the "
            "allowed models: send it uncompressed",
            status=415,
        )
    encoding = json.detect_encoding(body[:4])  # what json.loads(bytes) goes by: BOMs, then NULs
    if encoding != "utf-8" and body[:64].decode(encoding, "ignore").lstrip(" \t\r\n\ufeff")[:1] == "{":
        return _invalid(
            "invalid_json", f"the body is not strict JSON (a JSON object in {encoding}, not plain UTF-8)"
        )
    return None


def _refuse_aliases_over_http(options: Mapping[type[Any], Any], routes_file: str) -> None:
    from meshkit.extproc.daemon import ExtprocOptions  # the daemon imports the filters: not at load

    extproc = options.get(ExtprocOptions)
    if extproc is not None and extproc.http_listen:
        raise ConfigError(
            [
                f"model-router: the model aliases in {routes_file} rewrite the request body, which the "
                f"ext_authz HTTP service (--http-listen {extproc.http_listen}) cannot do: serve "
                "model-router over ext_proc (drop --http-listen), or remove models.aliases"
            ]
        )


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), "a number")


def _shown(value: str) -> str:
    """A client's string, bounded and printable, for an error message."""
    return ascii(value[:64]) + ("..." if len(value) > 64 else "")
