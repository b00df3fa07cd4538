"""`flushed(nc)`: return once the NATS server has processed everything `nc` sent so far.

nats-py's `Client.flush()` writes its PING straight to the socket, while commands such as a SUB or a
PUB wait in the client's pending buffer for its flusher task: the PING can overtake them, and the
PONG then proves nothing (seen with nats-py 2.16: a request right after `subscribe(); flush()` on
another connection answered "no responders", an audit copy published after it was not received).
`flushed()` flushes twice: during the first round trip the flusher task writes the buffer, and the
second PING follows it on the wire.
"""

from __future__ import annotations

from nats.aio.client import Client

__all__ = ["flushed"]


async def flushed(nc: Client, within: float = 2.0) -> None:
    """Everything `nc` sent before this call has reached the server (nats FlushTimeoutError after
    `within` s per round trip)."""
    await nc.flush(within)  # type: ignore[arg-type]  # nats-py annotates int; a float works
    await nc.flush(within)  # type: ignore[arg-type]
