"""The nats-server (2.9) config text the harness runs: an origin with JetStream, or a leaf.

Every listener binds `host` with port `-1` (any free port; the harness reads the bound ports back from
the server's log). What each part is for:

- `jetstream { domain }`: an origin needs a JetStream domain, or its JetStream cannot be reached from a
  leaf at all (a leaf's clients use `nc.jetstream(domain=...)`).
- `ping_interval` / `ping_max`: with NATS's 2-minute default a cut leaf link goes unnoticed and TCP later
  delivers a stale backlog; 1 s x 3 drops it within about 4 s.
- `leafnodes { listen }` on every server; `remotes` on a leaf. No `reconnect` key: `reconnect: 1s` breaks
  parsing on 2.9.10 and inside a remote it is an unknown field.

Strings are JSON-quoted, which the NATS config format reads as quoted strings. `nats-server -t -c FILE`
checks the result (tests/mesh).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["nats_server_config"]

_DURATION = re.compile(r"[0-9]+(ms|s|m|h)")


def nats_server_config(
    *,
    name: str,
    store_dir: Path | None,
    domain: str | None,
    leaf_remote: str | None,
    ping_interval: str = "1s",
    ping_max: int = 3,
    host: str = "127.0.0.1",
) -> str:
    """The config text; JetStream is on when `store_dir` is given (`domain` applies only then)."""
    if not _DURATION.fullmatch(ping_interval):
        raise ValueError(f"ping_interval {ping_interval!r}: a NATS duration such as 1s or 500ms")
    q = json.dumps
    lines = [
        f"server_name: {q(name)}",
        f"listen: {q(f'{host}:-1')}",
        f"http: {q(f'{host}:-1')}",
        f"ping_interval: {q(ping_interval)}",
        f"ping_max: {int(ping_max)}",
    ]
    if store_dir is not None:
        lines.append("jetstream {")
        lines.append(f"  store_dir: {q(str(store_dir))}")
        if domain is not None:
            lines.append(f"  domain: {q(domain)}")
        lines.append("}")
    lines.append("leafnodes {")
    lines.append(f"  listen: {q(f'{host}:-1')}")
    if leaf_remote is not None:
        lines.append(f"  remotes: [ {{ url: {q(leaf_remote)} }} ]")
    lines.append("}")
    return "\n".join(lines) + "\n"
