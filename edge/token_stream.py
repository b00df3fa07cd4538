"""The JetStream stream that holds every conversation's tokens (default `CHAT`), as one shared config.

The bridge creates it when it is missing (`ensure_stream`); the SSE adapter only reads it (replay from a
sequence, then live). Its limits, and why:

- subjects `chat.*.tokens` (one per conversation; `chat.deadletter` is deliberately outside it);
- file storage, one replica by default (a supercluster raises `replicas`);
- `max_age` 24 h: a conversation can be resumed for a day; after that `event: reset` says what is left;
- `max_bytes` 1 GiB, discard old: a full stream drops its oldest tokens (resumes then get `reset`),
  never refuses new ones;
- `max_msgs_per_subject` 100,000: one runaway conversation cannot push every other out;
- `max_msg_size` 64 KiB: a token message is small; a bigger one is a bug upstream;
- `duplicate_window` 2 min: two bridges (or one retrying) publishing the same
  `Nats-Msg-Id = <conversation_id>:<sequence>` store it once;
- republish `chat.*.tokens` -> `chat.<id>.live` (`chat.{{wildcard(1)}}.live`): every stored message,
  deduplicated, is also published once on its conversation's live subject, so an edge follows a
  conversation with a plain core subscription (one hop, no consumer on the origin per conversation)
  and reads the stream only to catch up (`conversation_hub.py`). Measured at the issue's load
  (10,000 streams, 2,000 conversations, 1,000 tokens/s, 2 shared cores; bench/streaming.py): p99
  publish->viewer 5.1 ms and 20 % of a core with it, 10.1 ms and 24 % with one ordered consumer per
  conversation, which is what `meshkit sse` falls back to for a stream without it
  (`republishes_live`).

`ensure_stream` never weakens an existing stream an operator tuned: when the stream exists it is left
as is (its subjects are checked, since a stream without `chat.*.tokens` would silently store nothing;
one without the republish still works, with per-conversation consumers at the edge: add it with
`nats stream edit` or recreate the stream).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RePublish, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from meshkit.edge.token_contract import DEFAULT_STREAM, LIVE_REPUBLISH_DEST, STREAM_SUBJECTS

__all__ = ["StreamLimits", "ensure_stream", "limit_settings", "republishes_live", "stream_config"]


@dataclass(frozen=True)
class StreamLimits:
    max_age: float = 24 * 3600.0
    max_bytes: int = 1 << 30
    max_msgs_per_subject: int = 100_000
    max_msg_size: int = 64 * 1024
    duplicate_window: float = 120.0
    replicas: int = 1


def limit_settings(limits: StreamLimits | None = None) -> dict[str, Any]:
    """The storage and limits of a token stream as StreamConfig fields (the stream and its edge
    mirrors keep the same ones)."""
    limits = limits or StreamLimits()
    return {
        "storage": StorageType.FILE,
        "num_replicas": limits.replicas,
        "max_age": limits.max_age,
        "max_bytes": limits.max_bytes,
        "max_msgs_per_subject": limits.max_msgs_per_subject,
        "max_msg_size": limits.max_msg_size,
        "discard": DiscardPolicy.OLD,
    }


def stream_config(name: str = DEFAULT_STREAM, limits: StreamLimits | None = None) -> StreamConfig:
    """The config `ensure_stream` creates (see the module docstring)."""
    return StreamConfig(
        name=name,
        subjects=[STREAM_SUBJECTS],
        duplicate_window=(limits or StreamLimits()).duplicate_window,
        republish=RePublish(src=STREAM_SUBJECTS, dest=LIVE_REPUBLISH_DEST),
        **limit_settings(limits),
    )


def republishes_live(config: StreamConfig) -> bool:
    """Whether a stream republishes its tokens on `chat.<id>.live` (what `stream_config` sets up)."""
    rp = config.republish
    return (
        rp is not None
        and rp.src == STREAM_SUBJECTS
        and rp.dest == LIVE_REPUBLISH_DEST
        and not rp.headers_only
    )


async def ensure_stream(
    js: JetStreamContext, name: str = DEFAULT_STREAM, limits: StreamLimits | None = None
) -> StreamConfig:
    """The stream's config, creating it first when it does not exist.

    A `ValueError` when a stream of that name exists without the subjects `chat.*.tokens`.
    """
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        info = await js.add_stream(stream_config(name, limits))
    subjects = info.config.subjects or []
    if STREAM_SUBJECTS not in subjects:
        raise ValueError(
            f"JetStream stream {name!r} exists with subjects {subjects}, not {STREAM_SUBJECTS!r}: "
            "it would store no tokens (use another --stream name or fix the stream)"
        )
    return info.config
