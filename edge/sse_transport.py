"""The SSE response's transport as a `viewer.DirectSink`: what the hub writes for a parked viewer.

aiohttp's `StreamResponse.write()` is a coroutine (chunk framing, a drain check) awaited by the viewer's
own task; the hub instead writes the framed bytes to the connection's transport at once, in HTTP/1.1
chunked framing (`<hex length>\\r\\n<data>\\r\\n`, what aiohttp would have written; an HTTP/1.0 response
has no chunks). aiohttp's end of the body (`write_eof()`, the `0\\r\\n\\r\\n` chunk) stays the handler's.

- `armed` only once the response's headers went out (aiohttp sends them with the first non-empty
  write, which the viewer's pump makes: the preamble, or for the OpenAI format its first chunk);
- `ready()` is False for a closing transport and for one holding more than `DIRECT_WRITE_LIMIT`
  unsent bytes (`get_write_buffer_size()`): the pump's awaited write then takes over, with drain and
  `--write-timeout`, so a client that stops reading is never written to without bound.
"""

from __future__ import annotations

import asyncio

from meshkit.edge.viewer import DIRECT_WRITE_LIMIT

__all__ = ["TransportSink"]


class TransportSink:
    __slots__ = ("armed", "chunked", "transport")

    def __init__(self, transport: asyncio.Transport, chunked: bool) -> None:
        self.transport = transport
        self.chunked = chunked
        self.armed = False

    def ready(self) -> bool:
        t = self.transport
        return self.armed and not t.is_closing() and t.get_write_buffer_size() <= DIRECT_WRITE_LIMIT

    def write(self, data: bytes) -> None:
        if self.chunked:
            self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.transport.write(data)
