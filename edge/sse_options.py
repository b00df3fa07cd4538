"""The options of `meshkit sse` (`SseOptions`): one dataclass, flags/env/YAML generated from it.

The JWT options are `stream_auth.StreamAuthOptions`, the inspection ones
`token_inspection.TokenInspectionOptions`: sections of the same daemon.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from meshkit.edge.edge_mirror import parse_mirror_of
from meshkit.edge.token_contract import DEFAULT_STREAM
from meshkit.options import option, parse_host_port, parse_non_negative_int, parse_seconds

__all__ = ["SseOptions"]


def _origins(value: Any) -> tuple[str, ...]:
    """`*` or `scheme://host[:port]` origins (a YAML list, repeated flags, or one per line)."""
    items = [str(v) for v in value] if isinstance(value, list | tuple) else str(value).splitlines()
    origins = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        if item != "*":
            parts = urlsplit(item)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
                raise ValueError(f"{item!r}: an origin is `*` or scheme://host[:port] (no path)")
            item = item.lower()
        origins.append(item)
    return tuple(origins)


@dataclass(frozen=True)
class SseOptions:
    listen: str = option(
        "127.0.0.1:8080",
        "HOST:PORT for GET /stream/{id} (port 0: any free port)",
        parse=parse_host_port,
        metavar="HOST:PORT",
    )
    nats: str = option(
        "nats://127.0.0.1:4222",
        "NATS server URL(s), comma-separated (the edge leaf; may hold credentials: never logged)",
        metavar="URL",
        secret=True,
    )
    js_domain: str = option("", "JetStream domain of the origin (a leaf's clients reach it only so)")
    stream: str = option(DEFAULT_STREAM, "JetStream stream holding chat.*.tokens")
    mirror_of: str = option(
        "",
        "STREAM@DOMAIN: --stream is an edge-local mirror of that stream on the leaf's own JetStream "
        "(--js-domain), created when missing, so the edge replays while its link is down",
        metavar="STREAM@DOMAIN",
    )
    heartbeat: float = option(
        15.0, "seconds without an event before a `: hb` comment", parse=parse_seconds, metavar="SECONDS"
    )
    max_connections: int = option(10_000, "open streams at most (beyond: 503)", parse=parse_non_negative_int)
    client_queue: int = option(
        1024, "live tokens a viewer may be behind before it is cut off", parse=parse_non_negative_int
    )
    history: int = option(
        1024,
        "tokens kept in memory per subscribed conversation (older ones are replayed from JetStream)",
        parse=parse_non_negative_int,
    )
    gap_timeout: float = option(
        1.0,
        "seconds a gap in sequences may stay open before JetStream is asked and it is skipped (reset)",
        parse=parse_seconds,
        metavar="SECONDS",
    )
    consumer_heartbeat: float = option(
        2.0,
        "idle heartbeat of each conversation's ordered consumer, when the stream has no live republish or "
        "with --mirror-of (a dead one is re-created after 2 missed)",
        parse=parse_seconds,
        metavar="SECONDS",
    )
    nats_timeout: float = option(
        5.0,
        "seconds one JetStream request (subscribe, replay) may take",
        parse=parse_seconds,
        metavar="SECONDS",
    )
    retry_ms: int = option(
        1000, "the `retry:` hint sent first on every stream (ms)", parse=parse_non_negative_int
    )
    reconnect_retry_ms: int = option(
        250, "the `retry:` sent with `event: reconnect` at shutdown (ms)", parse=parse_non_negative_int
    )
    default_model: str = option("meshkit", "`model` of ?format=openai chunks when the message has none")
    ready_interval: float = option(
        2.0,
        "seconds between two checks that the stream answers through NATS (/readyz)",
        parse=parse_seconds,
        metavar="SECONDS",
    )
    write_timeout: float = option(
        30.0,
        "seconds one write to a client may block (a client that stopped reading) before it is cut off",
        parse=parse_seconds,
        metavar="SECONDS",
    )
    ws_ping: float = option(
        15.0,
        "seconds between two WebSocket pings (their round trip: meshkit_sse_ws_rtt_seconds)",
        parse=parse_seconds,
        metavar="SECONDS",
    )
    ws_pong_timeout: float = option(
        0.0,
        "seconds a WebSocket ping may wait for its pong before the client is closed (0: --ws-ping)",
        parse=parse_seconds,
        metavar="SECONDS",
    )
    cors_origin: tuple[str, ...] = option(
        (),
        "allowed browser Origin for /stream and /ws (repeatable; `*`: any, only without credentials)",
        parse=_origins,
        metavar="ORIGIN",
        repeat=True,
    )
    cors_credentials: bool = option(
        False, "answer CORS with Access-Control-Allow-Credentials: true (cookies; not with `*`)"
    )

    @property
    def pong_timeout(self) -> float:
        return self.ws_pong_timeout or self.ws_ping

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_connections", "client_queue", "history"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')}: must be at least 1")
        for name in (
            "heartbeat",
            "consumer_heartbeat",
            "nats_timeout",
            "write_timeout",
            "ready_interval",
            "ws_ping",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')}: must be more than 0 seconds")
        if not self.stream or any(c in self.stream for c in ".*> "):
            problems.append(f"--stream {self.stream!r}: a JetStream stream name (no dots, *, > or spaces)")
        if self.mirror_of:
            try:
                source = parse_mirror_of(self.mirror_of)
            except ValueError as exc:
                problems.append(f"--mirror-of: {exc}")
            else:
                if source.domain == self.js_domain:
                    problems.append(
                        f"--mirror-of {self.mirror_of}: --js-domain must be the edge's own JetStream "
                        f"domain, not {source.domain!r} (the mirror lives beside the adapter)"
                    )
        if not [u for u in self.nats.split(",") if u.strip()]:
            problems.append("--nats: at least one URL")
        if self.cors_credentials and "*" in self.cors_origin:
            problems.append("--cors-origin '*' cannot go with --cors-credentials: name the origins")
        if problems:
            raise ValueError("; ".join(problems))
