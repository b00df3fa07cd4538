"""OpenAI's wire shapes, read strictly: embedding and chat requests, the error body, base64 vectors.

Pure functions, no I/O: `meshkit dev-upstream` answers with them, and the embedding cache can read its
requests the same way. A request that OpenAI would refuse raises `InvalidRequest` (status, message,
`param`, `code`), which `error_body()` turns into OpenAI's JSON:
`{"error": {"message", "type": "invalid_request_error", "param", "code"}}`.

Embeddings (`POST /v1/embeddings`): `input` is a string, a list of strings, a token array (a list of
ints) or a list of token arrays (at most `MAX_EMBEDDING_ITEMS` items, none empty); `model` a string;
a string (an item or `model`) holding a lone UTF-16 surrogate (JSON `"\ud800"`, which no UTF-8 text can
carry) is refused with 400 naming it;
`encoding_format` `float` (the default) or `base64`; `dimensions` a positive integer; `user` a string
(ignored). Any other field is refused, as OpenAI does ("Unrecognized request argument supplied").

Chat (`POST /v1/chat/completions`): `model`; `messages` a non-empty list of `{role, content}` (content a
string, a list of parts, or null); `stream` a boolean; `stream_options` (only with `stream: true`) with
`include_usage`; `max_tokens` / `max_completion_tokens`; `n` (only 1). Other fields (temperature,
tools, ...) are accepted and not used.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAX_EMBEDDING_ITEMS = 2048  # OpenAI's limit on the items of one request
MAX_DIMENSIONS = 4096
ENCODING_FORMATS = ("float", "base64")
EMBEDDING_FIELDS = frozenset({"input", "model", "encoding_format", "dimensions", "user"})
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

# One input item: a string or a token array (a tuple, so it can be hashed and compared).
Item = str | tuple[int, ...]


class InvalidRequest(Exception):
    """A request OpenAI would refuse: `status` (400, 404 for an unknown model), and the error fields."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status
        self.type = type

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> bytes:
    """OpenAI's error body, with all four fields (meshkit.errors.error_body has no `param`)."""
    return json.dumps({"error": {"message": message, "type": type, "param": param, "code": code}}).encode()


def read_json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or `InvalidRequest` with OpenAI's wording (also for JSON
    nested too deeply to parse, a `RecursionError` that was a 500 with a traceback)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
            "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was "
            "not valid JSON.)"
        ) from None
    except RecursionError:  # arrays or objects nested deeper than the parser's recursion limit
        raise InvalidRequest("The JSON body of your request is nested too deeply.") from None
    if not isinstance(doc, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return doc


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _utf8(text: str, param: str) -> str:
    """`text` unless it holds a lone surrogate (JSON's `\\ud800` escapes allow them; UTF-8 does not)."""
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            raise InvalidRequest(
                f"'{param}' is not valid Unicode: it holds a lone surrogate (a broken \\u escape).", param
            ) from None
    return text


def _model(doc: dict[str, Any]) -> str:
    model = doc.get("model")
    if model is None:
        raise InvalidRequest("you must provide a model parameter", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise InvalidRequest(f"Invalid type for 'model': expected a string, got {model!r}.", "model")
    return _utf8(model, "model")


# -- embeddings -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    items: tuple[Item, ...]
    encoding_format: str  # float | base64
    dimensions: int | None  # None: the model's default

    def dimensions_or(self, default: int) -> int:
        return default if self.dimensions is None else self.dimensions


def _token_array(value: list[Any], param: str) -> tuple[int, ...]:
    if not value:
        raise InvalidRequest(f"'{param}' cannot be an empty array of tokens.", param)
    if not all(_is_int(t) and t >= 0 for t in value):
        raise InvalidRequest(f"'{param}' must be an array of non-negative integers (tokens).", param)
    return tuple(value)


def _items(value: Any) -> tuple[Item, ...]:
    """`input` in its four forms -> the items, in order."""
    if isinstance(value, str):
        if not value:
            raise InvalidRequest("'input' cannot be an empty string.", "input")
        return (_utf8(value, "input"),)
    if not isinstance(value, list):
        raise InvalidRequest(
            "'input' must be a string, an array of strings, an array of tokens or an array of token arrays.",
            "input",
        )
    if not value:
        raise InvalidRequest("'input' cannot be an empty array.", "input")
    if all(_is_int(t) for t in value):
        return (_token_array(value, "input"),)
    if len(value) > MAX_EMBEDDING_ITEMS:
        raise InvalidRequest(
            f"'input' has {len(value)} items: at most {MAX_EMBEDDING_ITEMS} are allowed.", "input"
        )
    if all(isinstance(v, str) for v in value):
        for i, text in enumerate(value):
            if not text:
                raise InvalidRequest(f"'input[{i}]' cannot be an empty string.", f"input[{i}]")
            _utf8(text, f"input[{i}]")
        return tuple(value)
    if all(isinstance(v, list) for v in value):
        return tuple(_token_array(v, f"input[{i}]") for i, v in enumerate(value))
    raise InvalidRequest(
        "'input' must be all strings, all tokens or all token arrays, not a mix of them.", "input"
    )


def parse_embedding_request(doc: dict[str, Any], *, max_dimensions: int = MAX_DIMENSIONS) -> EmbeddingRequest:
    """An embedding request as OpenAI reads it, or `InvalidRequest` naming the field at fault."""
    for key in doc:
        if key not in EMBEDDING_FIELDS:
            raise InvalidRequest(f"Unrecognized request argument supplied: {key}", key)
    model = _model(doc)
    if "input" not in doc:
        raise InvalidRequest("you must provide an input parameter", "input", "missing_required_parameter")
    items = _items(doc["input"])
    encoding_format = doc.get("encoding_format")
    if encoding_format is None:
        encoding_format = "float"
    if encoding_format not in ENCODING_FORMATS:
        raise InvalidRequest(
            f"Invalid value for 'encoding_format': {encoding_format!r}; expected 'float' or 'base64'.",
            "encoding_format",
        )
    dimensions = doc.get("dimensions")
    if dimensions is not None and (not _is_int(dimensions) or not 1 <= dimensions <= max_dimensions):
        raise InvalidRequest(
            f"Invalid value for 'dimensions': {dimensions!r}; expected an integer from 1 to "
            f"{max_dimensions}.",
            "dimensions",
        )
    user = doc.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidRequest(f"Invalid type for 'user': expected a string, got {user!r}.", "user")
    return EmbeddingRequest(model, items, str(encoding_format), dimensions)


def float32_base64(vector: Sequence[float]) -> str:
    """The vector as OpenAI's `base64` encoding: float32 little-endian bytes, base64 (standard alphabet)."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def from_float32_base64(text: str) -> list[float]:
    raw = base64.b64decode(text)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


# -- chat ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[tuple[str, str], ...]  # (role, the text of its content)
    stream: bool
    include_usage: bool
    max_tokens: int | None

    def last_user_text(self) -> str:
        return next((text for role, text in reversed(self.messages) if role == "user"), "")


def _content_text(content: Any, param: str) -> str:
    """A message's text: a string, the `text` of its parts (other parts skipped), or null."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise InvalidRequest(f"'{param}[{i}]' must be an object with a 'type'.", f"{param}[{i}]")
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise InvalidRequest(f"'{param}[{i}].text' must be a string.", f"{param}[{i}].text")
                texts.append(part["text"])
        return " ".join(texts)
    raise InvalidRequest(f"'{param}' must be a string, an array of content parts or null.", param)


def _positive_int(doc: dict[str, Any], key: str) -> int | None:
    value = doc.get(key)
    if value is not None and (not _is_int(value) or value < 1):
        raise InvalidRequest(f"Invalid value for '{key}': {value!r}; expected an integer of 1 or more.", key)
    return value


def parse_chat_request(doc: dict[str, Any]) -> ChatRequest:
    """A chat completion request, read as far as the stand-in answers it, or `InvalidRequest`."""
    model = _model(doc)
    messages = doc.get("messages")
    if messages is None:
        raise InvalidRequest(
            "you must provide a messages parameter", "messages", "missing_required_parameter"
        )
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array of messages.", "messages")
    read: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"'messages[{i}]' must be an object.", f"messages[{i}]")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise InvalidRequest(
                f"Invalid value for 'messages[{i}].role': {role!r}; expected one of "
                f"{', '.join(sorted(CHAT_ROLES))}.",
                f"messages[{i}].role",
            )
        read.append((str(role), _content_text(message.get("content"), f"messages[{i}].content")))
    stream = doc.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest(f"Invalid type for 'stream': expected a boolean, got {stream!r}.", "stream")
    options = doc.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise InvalidRequest(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options"
            )
        if not isinstance(options, dict):
            raise InvalidRequest("'stream_options' must be an object.", "stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise InvalidRequest(
                "'stream_options.include_usage' must be a boolean.", "stream_options.include_usage"
            )
    n = doc.get("n")
    if n is not None and n != 1:
        raise InvalidRequest("meshkit dev-upstream answers with one choice only: 'n' must be 1.", "n")
    max_completion_tokens, max_tokens = (
        _positive_int(doc, k) for k in ("max_completion_tokens", "max_tokens")
    )
    max_tokens = max_completion_tokens if max_completion_tokens is not None else max_tokens
    return ChatRequest(model, tuple(read), bool(stream), include_usage, max_tokens)
