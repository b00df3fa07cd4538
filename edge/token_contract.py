"""The token message contract shared by the bridge (`meshkit bridge`) and the edge (`meshkit sse`).

One LLM answer is a *conversation*; each token of it is one JSON message on the NATS subject
`chat.<conversation_id>.tokens`:

    {"conversation_id": "c1", "token": "Hello", "sequence": 1, "done": false}

with optional `usage`, `error`, `model` and `ts` (seconds since the epoch, a number), passed through
unchanged: the raw bytes travel, never a re-encoded copy. Sequences are integers increasing by one per
conversation, starting at 0 or 1. The message with `"done": true` is the last one.

The bytes must be JSON in UTF-8 without a BOM and without lone surrogate escapes (what an EventSource and
`JSON.parse` read).

`conversation_id` must match `^[A-Za-z0-9_-]{1,128}$` wherever it is read from a user or a message:
NATS treats `.`, `*` and `>` specially, so an id such as `a.>` must never reach a subject (it would
subscribe to every conversation). `tokens_subject()` refuses such an id; `parse_token()` refuses a
message whose id is one.

JetStream: the stream (default `CHAT`) holds the subjects `chat.*.tokens`; every message is published
with `Nats-Msg-Id: <conversation_id>:<sequence>` (`message_id()`), so two bridges side by side store
each token once. A message that breaks the contract goes to `chat.deadletter` (not part of the
stream's subjects) with the reason.

Live copies: the stream republishes every message it stored (after dedup) on `chat.<id>.live`
(`live_subject()`, JetStream RePublish, headers `Nats-Stream`, `Nats-Sequence`, `Nats-Last-Sequence`):
an edge subscribes to that with a plain core subscription per conversation, and reads the stream
itself only for what was stored before it subscribed or what a cut link lost (`conversation_hub.py`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = [
    "CONVERSATION_ID",
    "DEADLETTER_SUBJECT",
    "DEFAULT_STREAM",
    "LIVE_REPUBLISH_DEST",
    "LIVE_SUBJECTS",
    "STREAM_SUBJECTS",
    "MalformedToken",
    "TokenMessage",
    "conversation_of_subject",
    "is_conversation_id",
    "live_subject",
    "message_id",
    "parse_token",
    "tokens_subject",
]

CONVERSATION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
STREAM_SUBJECTS = "chat.*.tokens"
LIVE_SUBJECTS = "chat.*.live"  # what the stream republishes stored tokens on (see the docstring)
LIVE_REPUBLISH_DEST = "chat.{{wildcard(1)}}.live"  # the RePublish destination that maps one onto the other
DEADLETTER_SUBJECT = "chat.deadletter"
DEFAULT_STREAM = "CHAT"
_SUBJECT = re.compile(r"chat\.([A-Za-z0-9_-]{1,128})\.tokens")
MAX_MESSAGE_BYTES = 1 << 20  # NATS's default max_payload


class MalformedToken(ValueError):
    """A message that breaks the contract; `reason` says how, in a few words (for the dead letter)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_conversation_id(value: object) -> bool:
    """True for a string matching `^[A-Za-z0-9_-]{1,128}$` (no `.`, `*`, `>`, whitespace, ...)."""
    return isinstance(value, str) and CONVERSATION_ID.fullmatch(value) is not None


def tokens_subject(conversation_id: str) -> str:
    """`chat.<conversation_id>.tokens`; a `ValueError` for an id that is not one (see the docstring)."""
    if not is_conversation_id(conversation_id):
        raise ValueError(f"not a conversation id (expected {CONVERSATION_ID.pattern}): {conversation_id!r}")
    return f"chat.{conversation_id}.tokens"


def live_subject(conversation_id: str) -> str:
    """`chat.<conversation_id>.live`, where the stream republishes what it stored of `tokens_subject()`;
    a `ValueError` for an id that is not one."""
    tokens_subject(conversation_id)  # the same check
    return f"chat.{conversation_id}.live"


def conversation_of_subject(subject: str) -> str | None:
    """The id in `chat.<id>.tokens`, or None when `subject` is not exactly that shape."""
    match = _SUBJECT.fullmatch(subject)
    return match.group(1) if match else None


def message_id(conversation_id: str, sequence: int) -> str:
    """The `Nats-Msg-Id` JetStream deduplicates on."""
    return f"{conversation_id}:{sequence}"


@dataclass(frozen=True, slots=True)
class TokenMessage:
    """One token message: the fields every reader needs, and the exact bytes it came as (`raw`)."""

    conversation_id: str
    sequence: int
    done: bool
    raw: bytes
    ts: float | None = None

    @property
    def subject(self) -> str:
        return f"chat.{self.conversation_id}.tokens"

    @property
    def message_id(self) -> str:
        return message_id(self.conversation_id, self.sequence)

    def fields(self) -> dict[str, Any]:
        """The whole JSON object (parsed again; for the rare reader that needs more than the above)."""
        value: dict[str, Any] = orjson.loads(self.raw)
        return value


def parse_token(raw: bytes, *, subject: str | None = None) -> TokenMessage:
    """Check `raw` against the contract; `MalformedToken(reason)` when it breaks it.

    With `subject`, the message must also name the conversation of that subject (a publisher that
    writes conversation b's token onto a's subject would otherwise inject it into a's stream).
    """
    if len(raw) > MAX_MESSAGE_BYTES:
        raise MalformedToken(f"message over {MAX_MESSAGE_BYTES} bytes")
    try:
        # orjson: UTF-8 only, no BOM (`json.loads(bytes)` would guess UTF-16/32 and skip a BOM: bytes
        # passed on unchanged would be mojibake to an EventSource and to JSON.parse), no lone
        # surrogates (no browser could decode them either), no NaN/Infinity; about 4x json's speed.
        value = orjson.loads(raw)
    except ValueError:  # orjson.JSONDecodeError
        raise MalformedToken("not JSON") from None
    if not isinstance(value, dict):
        raise MalformedToken("not a JSON object")
    cid = value.get("conversation_id")
    if not is_conversation_id(cid):
        raise MalformedToken(f"conversation_id missing or not {CONVERSATION_ID.pattern}")
    assert isinstance(cid, str)
    sequence = value.get("sequence")
    if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 0:
        raise MalformedToken("sequence missing or not a non-negative integer")
    done = value.get("done", False)
    if not isinstance(done, bool):
        raise MalformedToken("done is not true or false")
    token = value.get("token", "")
    if not isinstance(token, str):
        raise MalformedToken("token is not a string")
    ts = value.get("ts")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts)):
        raise MalformedToken("ts is not a number")
    if subject is not None:
        named = conversation_of_subject(subject)
        if named is None:
            raise MalformedToken(f"subject {subject!r} is not chat.<conversation_id>.tokens")
        if named != cid:
            raise MalformedToken("conversation_id does not match the subject")
    return TokenMessage(cid, sequence, done, bytes(raw), None if ts is None else float(ts))
