"""Dead letters: what the bridge does with a message it cannot store, and the bounded set of reasons.

A malformed message is never dropped silently and never stops the bridge: it is counted
(`meshkit_bridge_deadlettered_total{reason}`), logged (at most one line per reason every 10 s) and
published (core NATS, at most once) to `chat.deadletter` as JSON:

    {"reason": "channel_mismatch", "detail": "conversation_id does not match the subject",
     "source": "pubsub", "channel": "chat.a.tokens", "data": "{\\"conversation_id\\": \\"b\\", ...}"}

- `reason`: one of `REASONS` (a metric label, so a fixed set); `detail`: the human sentence;
- `source`: `pubsub` (with `channel`) or `stream` (with `entry_id`);
- `data`: the original bytes as a string when they are UTF-8, else base64 with `"encoding": "base64"`;
  `null` for a Streams entry without a `data` field.
  Data over `MAX_DATA_BYTES` is cut there and `"truncated": true` is set. The whole letter is kept
  under `max_bytes` (the bridge passes NATS's `max_payload`, 1 MiB by default): JSON escaping can
  make it six times the data (a control character is `\\u0001`), and a letter the client refuses
  would leave its Streams entry pending, read and refused again after every reconnect; the data is
  cut shorter until the letter fits. `chat.deadletter` is outside the CHAT stream's subjects on
  purpose: store it with a stream of its own if it must be kept.

A Streams entry is acknowledged once its dead letter has been handed to the NATS client.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from meshkit.edge.token_contract import MalformedToken

__all__ = ["MAX_LETTER_BYTES", "REASONS", "dead_letter", "reason_label"]

MAX_DATA_BYTES = 256 * 1024
MAX_LETTER_BYTES = 1 << 20  # NATS's default max_payload

# parse_token()'s reasons (meshkit.edge.token_contract), by how they start, and the bridge's own.
_PREFIXES = (
    ("message over", "too_large"),
    ("not JSON", "not_json"),
    ("not a JSON object", "not_object"),
    ("conversation_id missing", "bad_conversation_id"),
    ("conversation_id does not match", "channel_mismatch"),
    ("sequence", "bad_sequence"),
    ("done", "bad_done"),
    ("token", "bad_token"),
    ("ts ", "bad_ts"),
    ("subject", "bad_channel"),
)
MISSING_DATA = "missing_data"  # a Streams entry without a `data` field
REJECTED = "rejected"  # JetStream refused it (too big for the stream, ...) after the retries
REASONS = (*dict.fromkeys(label for _, label in _PREFIXES), MISSING_DATA, REJECTED, "other")


def reason_label(error: MalformedToken | str) -> str:
    """The metric label of a `MalformedToken` (or a reason sentence): one of `REASONS`."""
    text = error.reason if isinstance(error, MalformedToken) else error
    for prefix, label in _PREFIXES:
        if text.startswith(prefix):
            return label
    return "other"


def dead_letter(
    reason: str,
    detail: str,
    *,
    source: str,
    data: bytes | None,
    channel: str | None = None,
    entry_id: bytes | None = None,
    max_bytes: int = MAX_LETTER_BYTES,
) -> bytes:
    """The JSON payload published to `chat.deadletter` (see the module docstring), at most
    `max_bytes` long (the data cut shorter until it fits)."""
    doc: dict[str, Any] = {"reason": reason, "detail": detail[:1000], "source": source}
    if channel is not None:
        doc["channel"] = channel[:1000]
    if entry_id is not None:
        doc["entry_id"] = entry_id.decode("ascii", "replace")
    if data is None:
        doc["data"] = None
        return _encode(doc)
    cut = min(len(data), MAX_DATA_BYTES)
    while True:
        letter = _encode(_with_data(doc, data, cut))
        if len(letter) <= max_bytes or cut == 0:
            return letter
        cut //= 2


def _with_data(doc: dict[str, Any], data: bytes, cut: int) -> dict[str, Any]:
    doc = dict(doc)
    if cut < len(data):
        data = data[:cut]
        doc["truncated"] = True
    try:
        doc["data"] = data.decode("utf-8")
    except UnicodeDecodeError:
        doc["data"] = base64.b64encode(data).decode("ascii")
        doc["encoding"] = "base64"
    return doc


def _encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()
