"""`meshkit dev-upstream`: an OpenAI-compatible stand-in for the provider this machine cannot reach.

    meshkit dev-upstream --listen 127.0.0.1:8090 --admin-listen 127.0.0.1:9091
    curl -s localhost:8090/v1/embeddings -d '{"model": "text-embedding-3-small", "input": "hi"}'
    curl -sN localhost:8090/v1/chat/completions -d '{"model": "gpt-4o-mini", "stream": true,
        "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "hi"}]}'
    curl -s localhost:8090/control -d '{"fail": {"status": 429, "count": 2}}'   # the next 2 calls: 429
    curl -s localhost:8090/stats

The official `openai` client works against it: `OpenAI(base_url="http://127.0.0.1:8090/v1",
api_key="anything")` (no key is checked). A daemon like every other (`meshkit.daemon`): admin port with
`/healthz`, `/readyz`, `/metrics`, the ready line, SIGTERM drain (a stream in flight may finish within
`--drain-timeout`).

Endpoints
- `POST /v1/embeddings`: OpenAI's request (`input` as a string, a list of strings, a token array or a
  list of token arrays; `model`; `encoding_format` float|base64; `dimensions`, default 1536, 3072 for
  `text-embedding-3-large`, at most 4096; `user` ignored) and response
  (`{"object": "list", "data": [{"object": "embedding", "index", "embedding"}], "model", "usage"}`).
  Vectors are deterministic, unit length, float32 (`meshkit.sidecars.fake_model.vector`), so a cache
  in front can be checked for exactness; usage counts whitespace words (a token array: its length).
- `POST /v1/chat/completions`: "You said: " and the first words of the last user message
  (`fake_model.chat_answer`); `max_tokens` / `max_completion_tokens` cut it (`finish_reason: length`).
  `stream: true`: `text/event-stream` of `data: {chat.completion.chunk}` events: the role, one word per
  chunk, an empty delta with `finish_reason`, then, only when `stream_options.include_usage` is true
  (as OpenAI does: a proxy that needs usage must ask for it), a chunk with `choices: []` and `usage`
  (every chunk before it then carries `"usage": null`), then `data: [DONE]`. Not streamed: a
  `chat.completion` with `usage`. Each answer's `id` carries the call number (`chatcmpl-dev000001`), so
  a replay from a cache is told apart from a fresh answer; the content is deterministic.
- `GET /v1/models`: the `--models` names. Other models are answered too, unless
  `--reject-unknown-models` (then 404 `model_not_found`, as OpenAI).
- `GET /stats`: `calls`, `rejected` (400/404/413 answered) and `injected_failures` per endpoint
  (`embeddings`, `chat_completions`, `models`), `embedding_items` (items answered), `embedding_batches`
  (the item count of each answered embedding call, the last 1000), `embedding_calls` (the last 100
  answered embedding calls as `{"model", "dimensions", "input": [items]}`, strings cut at 256
  characters and token arrays at 64 tokens: what a cache in front asked for), `prompt_tokens`,
  `completion_tokens` (chat: the words of every message; the answer's tokens), `streams_completed`,
  `streams_abandoned` (the client left mid-stream).
  `POST /stats/reset` zeroes them and answers with the zeroed stats.
- `GET /control`: the switches now; `POST /control` with a JSON object changes them (all-or-nothing:
  one bad key, 400 and nothing changed) and answers with the switches:
  - `{"fail": {"status": 429, "count": 2, "retry_after": 1, "message": "..."}}`: the next `count`
    (default 1) model calls answer `status` (400-599) with an OpenAI error body (429: type
    `requests`, code `rate_limit_exceeded`; 5xx: `server_error`) and `retry-after: retry_after`
    (seconds, default 1); `{"fail": null}` clears it;
  - `{"delay_ms": 200}`: every model call waits that long before answering (a failed one too);
  - `{"stream_delay_ms": 20}`: the wait between two SSE events;
  - `{"fail_rate": 0.1}`: that fraction of model calls answer 500 (random, `--seed`);
  - `{"reset": true}`: every switch back to its flag's value (applied first, so
    `{"reset": true, "delay_ms": 5}` is a reset then a delay).
  "Model calls" are `/v1/embeddings` and `/v1/chat/completions`; `/v1/models`, `/stats` and
  `/control` are never failed or delayed. Flags set the starting switches: `--delay-ms`,
  `--stream-delay-ms`, `--fail-rate`, `--seed`.

Errors are OpenAI's body `{"error": {"message", "type", "param", "code"}}`: bad JSON or shapes 400
(`invalid_request_error`, `param` names the field), a body over `--max-body-bytes` 413, an unknown path
404 ("Invalid URL (POST /v1/x)"), a wrong method 405; never a traceback (a bug: 500 `server_error`, its
traceback in the log).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from meshkit.daemon import Daemon, Lifecycle, Resolved
from meshkit.options import option, parse_host_port, parse_non_negative_int, parse_size
from meshkit.sidecars.fake_model import chat_answer, count_tokens, vector
from meshkit.sidecars.openai_http import json_error, openai_errors
from meshkit.sidecars.openai_shapes import (
    MAX_DIMENSIONS,
    ChatRequest,
    InvalidRequest,
    error_body,
    float32_base64,
    parse_chat_request,
    parse_embedding_request,
    read_json_object,
)

log = logging.getLogger("meshkit.dev_upstream")

DEFAULT_DIMENSIONS = 1536
MODEL_DIMENSIONS = {"text-embedding-3-large": 3072}
DEFAULT_MODELS = (
    "text-embedding-3-small",
    "text-embedding-3-large",
    "text-embedding-ada-002",
    "gpt-4o-mini",
    "gpt-4o",
)
ENDPOINTS = ("embeddings", "chat_completions", "models")
BATCHES_KEPT = 1000
CALLS_KEPT = 100
KEPT_CHARS, KEPT_TOKENS = 256, 64  # of each item in /stats embedding_calls
FINGERPRINT = "fp_meshkit_dev"


def _fraction(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("expected a fraction from 0 to 1, for example 0.1") from None
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise ValueError("expected a fraction from 0 to 1, for example 0.1")
    return number


@dataclass(frozen=True)
class DevUpstreamOptions:
    listen: str = option(
        "127.0.0.1:8090",
        "HOST:PORT to answer on (port 0: any free port)",
        parse=parse_host_port,
        metavar="HOST:PORT",
    )
    max_body_bytes: int = option(
        32 << 20, "largest request body read (bigger: 413)", parse=parse_size, metavar="BYTES"
    )
    models: tuple[str, ...] = option(DEFAULT_MODELS, "model names listed by GET /v1/models", metavar="A,B")
    reject_unknown_models: bool = option(False, "answer 404 model_not_found for a model not in --models")
    delay_ms: int = option(
        0, "milliseconds every model call waits", parse=parse_non_negative_int, metavar="MS"
    )
    stream_delay_ms: int = option(
        0,
        "milliseconds between two SSE events of a streamed answer",
        parse=parse_non_negative_int,
        metavar="MS",
    )
    fail_rate: float = option(
        0.0, "fraction of model calls that answer 500 (0 to 1)", parse=_fraction, metavar="FRACTION"
    )
    seed: int = option(0, "seed of the random --fail-rate draws", metavar="N")


# -- the switches ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fail:
    status: int
    count: int
    retry_after: int = 1
    message: str | None = None


@dataclass(frozen=True)
class Switches:
    fail: Fail | None = None
    delay_ms: int = 0
    stream_delay_ms: int = 0
    fail_rate: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        doc["fail"] = (
            None if self.fail is None else {f.name: getattr(self.fail, f.name) for f in fields(Fail)}
        )
        return doc


def _control_int(doc: dict[str, Any], key: str, low: int, high: int, default: int | None = None) -> int:
    value = doc.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidRequest(f"'{key}' must be an integer from {low} to {high}, not {value!r}.", key)
    return value


def apply_control(current: Switches, initial: Switches, doc: dict[str, Any]) -> Switches:
    """The switches after a `POST /control` body, or `InvalidRequest` (nothing changed)."""
    known = {"fail", "delay_ms", "stream_delay_ms", "fail_rate", "reset"}
    for key in doc:
        if key not in known:
            raise InvalidRequest(f"unknown switch {key!r} (known: {', '.join(sorted(known))}).", key)
    reset = doc.get("reset", False)
    if not isinstance(reset, bool):
        raise InvalidRequest("'reset' must be true or false.", "reset")
    switches = initial if reset else current
    if "fail" in doc:
        fail = doc["fail"]
        if fail is None:
            switches = replace(switches, fail=None)
        elif not isinstance(fail, dict) or not set(fail) <= {"status", "count", "retry_after", "message"}:
            raise InvalidRequest(
                '\'fail\' must be null or {"status", "count", "retry_after", "message"}.', "fail"
            )
        else:
            message = fail.get("message")
            if message is not None and not isinstance(message, str):
                raise InvalidRequest("'message' must be a string.", "message")
            count = _control_int(fail, "count", 0, 1 << 30, 1)
            made = Fail(
                _control_int(fail, "status", 400, 599),
                count,
                _control_int(fail, "retry_after", 0, 3600, 1),
                message,
            )
            switches = replace(switches, fail=made if count else None)
    if "delay_ms" in doc:
        switches = replace(switches, delay_ms=_control_int(doc, "delay_ms", 0, 600_000))
    if "stream_delay_ms" in doc:
        switches = replace(switches, stream_delay_ms=_control_int(doc, "stream_delay_ms", 0, 600_000))
    if "fail_rate" in doc:
        rate = doc["fail_rate"]
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
            raise InvalidRequest(f"'fail_rate' must be a number from 0 to 1, not {rate!r}.", "fail_rate")
        switches = replace(switches, fail_rate=float(rate))
    return switches


# -- the stats -------------------------------------------------------------------------------------
@dataclass
class Stats:
    calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ENDPOINTS, 0))
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ENDPOINTS, 0))
    injected_failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ENDPOINTS, 0))
    embedding_items: int = 0
    embedding_batches: deque[int] = field(default_factory=lambda: deque(maxlen=BATCHES_KEPT))
    embedding_calls: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=CALLS_KEPT))
    prompt_tokens: int = 0
    completion_tokens: int = 0
    streams_completed: int = 0
    streams_abandoned: int = 0

    def as_dict(self) -> dict[str, Any]:
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        doc["embedding_batches"] = list(self.embedding_batches)
        doc["embedding_calls"] = list(self.embedding_calls)
        return doc


# -- the server state, one per app -------------------------------------------------------------------
class Upstream:
    def __init__(self, options: DevUpstreamOptions, registry: CollectorRegistry) -> None:
        self.options = options
        self.initial = Switches(None, options.delay_ms, options.stream_delay_ms, options.fail_rate)
        self.switches = self.initial
        self.stats = Stats()
        self.random = random.Random(options.seed)  # noqa: S311 - fault injection, not secrets
        self.answers = 0  # numbers the chat answers' ids
        self.requests = Counter(
            "meshkit_dev_upstream_requests",
            "Requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=registry,
        )
        self.injected = Counter(
            "meshkit_dev_upstream_injected_failures",
            "Model calls failed on purpose (fail switch, --fail-rate), by endpoint and status",
            ["endpoint", "status"],
            registry=registry,
        )
        self.items = Counter(
            "meshkit_dev_upstream_embedding_items", "Embedding items answered", registry=registry
        )
        self.streams = Counter(
            "meshkit_dev_upstream_streams",
            "Streamed chat answers, by outcome (completed, abandoned)",
            ["outcome"],
            registry=registry,
        )

    def injected_failure(self) -> tuple[int, str | None, int | None] | None:
        """(status, message, retry_after) when this model call is to fail; consumes one of `count`."""
        fail = self.switches.fail
        if fail is not None:
            left = fail.count - 1
            self.switches = replace(self.switches, fail=replace(fail, count=left) if left else None)
            return fail.status, fail.message, fail.retry_after
        if self.switches.fail_rate and self.random.random() < self.switches.fail_rate:
            return 500, "The server had an error while processing your request (--fail-rate).", None
        return None

    def dimensions(self, model: str) -> int:
        return MODEL_DIMENSIONS.get(model, DEFAULT_DIMENSIONS)

    def check_model(self, model: str) -> None:
        if self.options.reject_unknown_models and model not in self.options.models:
            raise InvalidRequest(
                f"The model `{model}` does not exist or you do not have access to it.",
                "model",
                "model_not_found",
                status=404,
            )


UPSTREAM = web.AppKey("upstream", Upstream)


def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(doc).encode(), content_type="application/json", headers=headers
    )


def _failure_response(status: int, message: str | None, retry_after: int | None) -> web.Response:
    if status == 429:
        kind, code = "requests", "rate_limit_exceeded"
        message = message or "Rate limit reached for requests (meshkit dev-upstream fail switch)."
    elif status >= 500:
        kind, code = "server_error", None
        message = message or "The server had an error while processing your request (fail switch)."
    else:
        kind, code = "invalid_request_error", None
        message = message or f"Failed on purpose with {status} (meshkit dev-upstream fail switch)."
    headers = {} if retry_after is None else {"retry-after": str(retry_after)}
    return json_error(status, error_body(message, kind, None, code), headers)


Handler = Callable[[web.Request, Upstream], Awaitable[web.StreamResponse]]


def _model_call(endpoint: str, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Count the call, apply the switches (fail, delay), answer, count the status."""

    async def handle(request: web.Request) -> web.StreamResponse:
        upstream = request.app[UPSTREAM]
        upstream.stats.calls[endpoint] += 1
        failure = upstream.injected_failure()
        if upstream.switches.delay_ms:
            await asyncio.sleep(upstream.switches.delay_ms / 1000)
        if failure is not None:
            upstream.stats.injected_failures[endpoint] += 1
            upstream.injected.labels(endpoint, str(failure[0])).inc()
            response: web.StreamResponse = _failure_response(*failure)
        else:
            try:
                response = await handler(request, upstream)
            except InvalidRequest as exc:
                upstream.stats.rejected[endpoint] += 1
                response = json_error(exc.status, exc.body())
        upstream.requests.labels(endpoint, str(response.status)).inc()
        return response

    return handle


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[UPSTREAM].options.max_body_bytes
        raise InvalidRequest(f"Request body too large: at most {limit} bytes.", status=413) from None
    return read_json_object(body)


# -- the endpoints ---------------------------------------------------------------------------------
async def embeddings(request: web.Request, upstream: Upstream) -> web.Response:
    req = parse_embedding_request(await _body(request), max_dimensions=MAX_DIMENSIONS)
    upstream.check_model(req.model)
    dimensions = req.dimensions_or(upstream.dimensions(req.model))
    data = []
    for index, item in enumerate(req.items):
        values = vector(req.model, dimensions, item)
        embedding: list[float] | str = float32_base64(values) if req.encoding_format == "base64" else values
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = sum(count_tokens(item) for item in req.items)
    upstream.stats.embedding_items += len(req.items)
    upstream.stats.embedding_batches.append(len(req.items))
    kept = [item[:KEPT_CHARS] if isinstance(item, str) else list(item[:KEPT_TOKENS]) for item in req.items]
    upstream.stats.embedding_calls.append({"model": req.model, "dimensions": dimensions, "input": kept})
    upstream.stats.prompt_tokens += tokens
    upstream.items.inc(len(req.items))
    return _json(
        {
            "object": "list",
            "data": data,
            "model": req.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def chat_completions(request: web.Request, upstream: Upstream) -> web.StreamResponse:
    req = parse_chat_request(await _body(request))
    upstream.check_model(req.model)
    tokens = chat_answer(req.last_user_text())
    finish = "stop"
    if req.max_tokens is not None and len(tokens) > req.max_tokens:
        tokens, finish = tokens[: req.max_tokens], "length"
    prompt = sum(len(text.split()) for _, text in req.messages)
    upstream.answers += 1
    upstream.stats.prompt_tokens += prompt
    upstream.stats.completion_tokens += len(tokens)
    head = {
        "id": f"chatcmpl-dev{upstream.answers:06d}",
        "created": int(time.time()),
        "model": req.model,
        "system_fingerprint": FINGERPRINT,
    }
    if req.stream:
        return await _stream(request, upstream, req, head, tokens, finish, _usage(prompt, len(tokens)))
    message = {"role": "assistant", "content": "".join(tokens), "refusal": None}
    return _json(
        {
            "id": head["id"],
            "object": "chat.completion",
            **head,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": _usage(prompt, len(tokens)),
        }
    )


async def _stream(
    request: web.Request,
    upstream: Upstream,
    req: ChatRequest,
    head: dict[str, Any],
    tokens: list[str],
    finish: str,
    usage: dict[str, int],
) -> web.StreamResponse:
    def chunk(delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        doc = {"id": head["id"], "object": "chat.completion.chunk", **head, "choices": [choice]}
        if req.include_usage:
            doc["usage"] = None
        return doc

    events: list[Any] = [chunk({"role": "assistant", "content": ""}, None)]
    events.extend(chunk({"content": token}, None) for token in tokens)
    events.append(chunk({}, finish))
    if req.include_usage:
        events.append(
            {"id": head["id"], "object": "chat.completion.chunk", **head, "choices": [], "usage": usage}
        )
    response = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
    await response.prepare(request)
    try:
        for i, event in enumerate([*events, "[DONE]"]):
            if i and upstream.switches.stream_delay_ms:
                await asyncio.sleep(upstream.switches.stream_delay_ms / 1000)
            data = event if isinstance(event, str) else json.dumps(event)
            await response.write(f"data: {data}\n\n".encode())
        await response.write_eof()
    except ConnectionError:  # the client left mid-stream
        upstream.stats.streams_abandoned += 1
        upstream.streams.labels("abandoned").inc()
        return response
    upstream.stats.streams_completed += 1
    upstream.streams.labels("completed").inc()
    return response


async def models(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM]
    upstream.stats.calls["models"] += 1
    upstream.requests.labels("models", "200").inc()
    data = [
        {"id": m, "object": "model", "created": 0, "owned_by": "meshkit"} for m in upstream.options.models
    ]
    return _json({"object": "list", "data": data})


async def stats(request: web.Request) -> web.Response:
    return _json(request.app[UPSTREAM].stats.as_dict())


async def stats_reset(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM]
    upstream.stats = Stats()
    return _json(upstream.stats.as_dict())


async def control(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM]
    if request.method == "POST":
        upstream.switches = apply_control(upstream.switches, upstream.initial, await _body(request))
        log.info("switches now %s", upstream.switches.as_dict())
    return _json(upstream.switches.as_dict())


def dev_upstream_app(
    options: DevUpstreamOptions | None = None, *, registry: CollectorRegistry | None = None
) -> web.Application:
    options = options or DevUpstreamOptions()
    app = web.Application(
        client_max_size=options.max_body_bytes, middlewares=[openai_errors("dev-upstream", log)]
    )
    app[UPSTREAM] = Upstream(options, registry or CollectorRegistry())
    app.router.add_post("/v1/embeddings", _model_call("embeddings", embeddings))
    app.router.add_post("/v1/chat/completions", _model_call("chat_completions", chat_completions))
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stats", stats)
    app.router.add_post("/stats/reset", stats_reset)
    app.router.add_route("GET", "/control", control)
    app.router.add_route("POST", "/control", control)
    return app


async def serve(options: Resolved, life: Lifecycle) -> None:
    opts: DevUpstreamOptions = options[DevUpstreamOptions]
    await life.serve_app("http", opts.listen, dev_upstream_app(opts, registry=life.registry))


def _sections() -> list[type[Any]]:
    return [DevUpstreamOptions]


DAEMON = Daemon(
    name="dev-upstream",
    help="an OpenAI-compatible stand-in provider: embeddings, chat (SSE), /stats, fail/slow switches",
    sections=_sections,
    serve=serve,
)
