"""How a viewer's stream is framed on the wire: Server-Sent Events, plain or as OpenAI chunks.

The hub and the viewer deal in token messages (`TokenMessage`) and a few stream events (a reset, a
heartbeat, "reconnect"); a `Framer` turns each into the bytes one transport format sends. Nothing here
does I/O, so a later transport (WebSocket JSON frames) is another framer beside these two.

`SseFramer` (the default, `GET /stream/{id}`):

    retry: 1000                                  first, once: the reconnect delay hint (ms)

    id: 7                                        each token: its `sequence` is the event id, so a
    event: token                                 browser's EventSource resumes with Last-Event-ID
    data: {"conversation_id": "c1", ...}         the message's raw JSON, unchanged (one line: JSON
                                                 has no raw newlines)
    id: 9 / event: done / data: {...}            the `"done": true` message; the response ends
    event: reset / data: {"requested": 3, "available_from": 6}
                                                 tokens 3..5 are gone (aged out of the stream, or
                                                 never stored); no id line: the last id stays the
                                                 last token received
    : hb                                         heartbeat comment
    retry: 250 / event: reconnect / data: {}     the server is shutting down: come back (elsewhere)
    id: 8 / event: blocked / data: {"conversation_id": "c1", "sequence": 8, "reason": "pii"}
                                                 token inspection withheld token 8; the id is kept
                                                 (a resume after it is gap-free), its text is not sent
    event: reauth / data: {"reason": "token_expired", "last_event_id": 12}
                                                 the stream's JWT expired: the response ends; come
                                                 back with a fresh token and Last-Event-ID (no id
                                                 line: the last id stays the last token received)
    event: error / data: {"error": {"message", "type", "code"}}
                                                 a failure once the stream started (`error()`); the
                                                 response ends

`OpenAIFramer` (`?format=openai`): only `data:` lines, read by OpenAI's client stream parser:

    data: {"id": "chatcmpl-c1", "object": "chat.completion.chunk", "created": 1700000000,
           "model": "m", "choices": [{"index": 0, "delta": {"content": "Hel"},
           "finish_reason": null}], "x_sequence": 7}
    ... one chunk per token (a token with an empty text and `done: false` sends nothing)
    data: {... "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": {...}}
    data: [DONE]

Decisions for this format: `id` is `chatcmpl-<conversation_id>` (one id for the whole answer, as
OpenAI's chunks share one); `created` is the first token's `ts` (whole seconds), else the time the
stream opened; `model` is the message's `model`, else `--default-model`. Resume: OpenAI's format has
no event ids, so every chunk carries the token's sequence as an extra field `x_sequence` (OpenAI's
client keeps unknown fields: `chunk.model_extra`); a client resumes with `?last_event_id=<the last
x_sequence>&format=openai`. A reset is a chunk with an empty delta and `x_reset: {"requested",
"available_from"}` (never a silent gap). A done message with an `error` ends with
`data: {"error": {...}}` (the client raises `APIError`) instead of the `stop` chunk. The final chunk
carries the done message's `usage` when it has one. A blocked token is a chunk with an empty delta,
its `x_sequence` and `x_blocked: {"reason"}`. Every early end is an error object, then the end
without `[DONE]`, so OpenAI's client raises `APIError` instead of returning a truncated answer as if
it were whole: a reauth is `data: {"error": {"type": "reauth", "code": "token_expired",
"last_event_id"}}`; on shutdown `data: {"error": {"type": "reconnect", "code": "server_shutdown",
"last_event_id"}}` (the framer remembers the last sequence it framed; null: this response sent
none, resume with the id you had); a failure after the stream started is `data: {"error": ...}`
(`error()`: no `event:` line in this format).

`WsFramer` (`GET /ws/{id}`): one JSON text frame per event (the WebSocket handler sends each line
of what the framer returns as its own frame):

    {"event": "token", "id": 7, "data": {"conversation_id": "c1", "token": "Hel", ...}}
    {"event": "done", "id": 9, "data": {...}}                  then a close with 1000
    {"event": "reset", "data": {"requested": 3, "available_from": 6}}
    {"event": "blocked", "id": 8, "data": {"conversation_id": "c1", "sequence": 8, "reason": "pii"}}
    {"event": "reauth", "data": {"reason": "token_expired", "last_event_id": 12}}   then 1008
    {"event": "reconnect", "data": {"retry_ms": 250}}          then a close with 1012
    {"event": "error", "data": {"error": {...}}}               then a close with 1011

`id` is the token's sequence, as the SSE id: resume with `?last_event_id=<the last id>`. `data` is
the message's JSON as published (the raw bytes; a line break in a pretty-printed one, which JSON
allows only as whitespace, becomes a space). No heartbeat frames: the server's WebSocket pings keep
the connection alive and measure its round trip.
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

from meshkit.edge.token_contract import TokenMessage

__all__ = ["Framer", "OpenAIFramer", "SseFramer", "WsFramer", "framer_for"]

HEARTBEAT = b": hb\n\n"


class Framer(Protocol):
    """The bytes of one viewer's stream, piece by piece (each method returns what to send)."""

    content_type: str

    def preamble(self) -> bytes: ...

    def token(self, message: TokenMessage) -> bytes: ...

    def done(self, message: TokenMessage) -> bytes: ...

    def reset(self, requested: int | None, available_from: int) -> bytes: ...

    def heartbeat(self) -> bytes: ...

    def reconnect(self, retry_ms: int) -> bytes: ...

    def blocked(self, message: TokenMessage) -> bytes: ...

    def reauth(self, last_event_id: int | None) -> bytes: ...

    def error(self, body: bytes) -> bytes:
        """A failure once the stream started (`body`: `{"error": {...}}`, `errors.error_body`)."""
        ...


def _reauth_data(last_event_id: int | None) -> bytes:
    return json.dumps({"reason": "token_expired", "last_event_id": last_event_id}).encode()


def _data_line(raw: bytes) -> bytes:
    """`data: <raw>` as SSE lines: JSON from `json.dumps` has no newline, but a publisher's may (a
    pretty-printed message): each line of it becomes its own `data:` line, which the client joins
    back with newlines, so the JSON reads the same."""
    if b"\n" not in raw and b"\r" not in raw:
        return b"data: " + raw + b"\n"
    lines = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return b"".join(b"data: " + line + b"\n" for line in lines)


class SseFramer:
    """`id`/`event`/`data` events (see the module docstring)."""

    content_type = "text/event-stream"

    def __init__(self, retry_ms: int) -> None:
        self._retry_ms = retry_ms

    def preamble(self) -> bytes:
        return b"retry: %d\n\n" % self._retry_ms

    def token(self, message: TokenMessage) -> bytes:
        return b"id: %d\nevent: token\n%s\n" % (message.sequence, _data_line(message.raw))

    def done(self, message: TokenMessage) -> bytes:
        return b"id: %d\nevent: done\n%s\n" % (message.sequence, _data_line(message.raw))

    def reset(self, requested: int | None, available_from: int) -> bytes:
        data = json.dumps({"requested": requested, "available_from": available_from}).encode()
        return b"event: reset\ndata: " + data + b"\n\n"

    def heartbeat(self) -> bytes:
        return HEARTBEAT

    def reconnect(self, retry_ms: int) -> bytes:
        return b"retry: %d\nevent: reconnect\ndata: {}\n\n" % retry_ms

    def blocked(self, message: TokenMessage) -> bytes:
        return b"id: %d\nevent: blocked\n%s\n" % (message.sequence, _data_line(message.raw))

    def reauth(self, last_event_id: int | None) -> bytes:
        return b"event: reauth\ndata: " + _reauth_data(last_event_id) + b"\n\n"

    def error(self, body: bytes) -> bytes:
        return b"event: error\n" + _data_line(body) + b"\n"


class OpenAIFramer:
    """OpenAI Chat Completions chunks (see the module docstring)."""

    content_type = "text/event-stream"

    def __init__(self, conversation_id: str, default_model: str) -> None:
        self._id = f"chatcmpl-{conversation_id}"
        self._default_model = default_model
        self._created: int | None = None
        self._model: str | None = None
        self._last_sequence: int | None = None  # of the last token framed (what a resume is after)

    def preamble(self) -> bytes:
        return b""

    def _chunk(self, fields: dict[str, Any], choice: dict[str, Any], **extra: Any) -> bytes:
        if self._created is None:
            ts = fields.get("ts")
            self._created = int(ts) if isinstance(ts, int | float) and not isinstance(ts, bool) else None
            if self._created is None:
                self._created = int(time.time())
        model = fields.get("model")
        if isinstance(model, str) and model:
            self._model = model
        doc = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model or self._default_model,
            "choices": [choice],
            **extra,
        }
        return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"

    def token(self, message: TokenMessage) -> bytes:
        self._last_sequence = message.sequence
        fields = message.fields()
        text = fields.get("token", "")
        if not text:
            return b""
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
        return self._chunk(fields, choice, x_sequence=message.sequence)

    def done(self, message: TokenMessage) -> bytes:
        fields = message.fields()
        head = self.token(message)
        error = fields.get("error")
        if error:
            shown = error if isinstance(error, dict) else {"message": str(error), "type": "upstream_error"}
            body = json.dumps({"error": shown}, separators=(",", ":")).encode()
            return head + b"data: " + body + b"\n\ndata: [DONE]\n\n"
        extra: dict[str, Any] = {"x_sequence": message.sequence}
        if isinstance(fields.get("usage"), dict):
            extra["usage"] = fields["usage"]
        choice = {"index": 0, "delta": {}, "finish_reason": "stop"}
        return head + self._chunk(fields, choice, **extra) + b"data: [DONE]\n\n"

    def reset(self, requested: int | None, available_from: int) -> bytes:
        choice = {"index": 0, "delta": {}, "finish_reason": None}
        return self._chunk({}, choice, x_reset={"requested": requested, "available_from": available_from})

    def heartbeat(self) -> bytes:
        return HEARTBEAT

    def reconnect(self, retry_ms: int) -> bytes:
        error = {
            "message": "the server is shutting down: reconnect with ?last_event_id=",
            "type": "reconnect",
            "code": "server_shutdown",
            "last_event_id": self._last_sequence,
            "retry_ms": retry_ms,
        }
        return self.error(json.dumps({"error": error}, separators=(",", ":")).encode())

    def blocked(self, message: TokenMessage) -> bytes:
        self._last_sequence = message.sequence
        reason = getattr(message, "reason", "blocked")
        choice = {"index": 0, "delta": {}, "finish_reason": None}
        return self._chunk({}, choice, x_sequence=message.sequence, x_blocked={"reason": reason})

    def reauth(self, last_event_id: int | None) -> bytes:
        error = {
            "message": "the stream's token expired: reconnect with a fresh one and ?last_event_id=",
            "type": "reauth",
            "code": "token_expired",
            "last_event_id": last_event_id,
        }
        return self.error(json.dumps({"error": error}, separators=(",", ":")).encode())

    def error(self, body: bytes) -> bytes:
        return _data_line(body) + b"\n"


def _one_line(raw: bytes) -> bytes:
    """JSON on one line: a raw line break in valid JSON is whitespace (never inside a string)."""
    if b"\n" not in raw and b"\r" not in raw:
        return raw
    return raw.replace(b"\r", b" ").replace(b"\n", b" ")


class WsFramer:
    """JSON frames for the WebSocket transport, one per line (see the module docstring)."""

    content_type = "application/json"

    def preamble(self) -> bytes:
        return b""

    def _event(self, event: bytes, message: TokenMessage) -> bytes:
        return b'{"event":"%s","id":%d,"data":%s}\n' % (event, message.sequence, _one_line(message.raw))

    def token(self, message: TokenMessage) -> bytes:
        return self._event(b"token", message)

    def done(self, message: TokenMessage) -> bytes:
        return self._event(b"done", message)

    def blocked(self, message: TokenMessage) -> bytes:
        return self._event(b"blocked", message)

    def reset(self, requested: int | None, available_from: int) -> bytes:
        data = json.dumps({"requested": requested, "available_from": available_from}).encode()
        return b'{"event":"reset","data":%s}\n' % data

    def heartbeat(self) -> bytes:
        return b""  # the WebSocket pings instead

    def reconnect(self, retry_ms: int) -> bytes:
        return b'{"event":"reconnect","data":{"retry_ms":%d}}\n' % retry_ms

    def reauth(self, last_event_id: int | None) -> bytes:
        return b'{"event":"reauth","data":%s}\n' % _reauth_data(last_event_id)

    @staticmethod
    def error(body: bytes) -> bytes:
        return b'{"event":"error","data":%s}\n' % body


def framer_for(fmt: str, conversation_id: str, *, retry_ms: int, default_model: str) -> Framer:
    """The framer of `?format=` (`sse`, the default, or `openai`); a `ValueError` for another."""
    if fmt in ("", "sse"):
        return SseFramer(retry_ms)
    if fmt == "openai":
        return OpenAIFramer(conversation_id, default_model)
    raise ValueError(f"format must be sse or openai, not {fmt!r}")
