"""An incremental Server-Sent Events parser (the WHATWG `EventSource` rules), for the load generator.

`SseParser.feed(chunk)` takes bytes as they arrive (any split: mid-line, mid-CRLF, mid-UTF-8) and returns
the events completed by them, as a browser's EventSource would dispatch them:

- lines end with LF, CRLF or a lone CR (a CR at the end of a chunk waits for the next one: it may be
  the first half of a CRLF);
- a line starting with `:` is a comment (nchan's `: hi`, heartbeats): ignored;
- `field: value` (one leading space after the colon removed), `field` alone means an empty value;
- `data` lines of one event are joined with `\\n`; `event` (default `message`), `id` (kept across events,
  as `lastEventId`; an id containing NUL is ignored) and `retry` (digits only) are read; other fields
  are ignored;
- a blank line dispatches the event; one with no `data` line at all is not dispatched (the spec's rule),
  a trailing event without its blank line is never dispatched.

Decision: bytes are decoded per line as UTF-8 with replacement (a stray byte cannot stop a stream), and
the fast path (chunks without CR) splits on LF only, since that is what both nchan and meshkit send.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SseEvent", "SseParser"]

MAX_PENDING_BYTES = 1 << 20  # a "line" longer than this is a broken stream, not an event


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str
    data: str
    id: str
    retry: int | None = None


class SseParser:
    """Bytes in, completed `SseEvent`s out; state kept between chunks."""

    __slots__ = ("_buffer", "_data", "_event", "_has_data", "_last_id", "_retry")

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._has_data = False
        self._event = ""
        self._last_id = ""
        self._retry: int | None = None

    @property
    def last_event_id(self) -> str:
        return self._last_id

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """The events that `chunk` completes (possibly none). A `ValueError` when one line exceeds
        MAX_PENDING_BYTES without ending."""
        buffer = self._buffer + chunk if self._buffer else chunk
        if b"\r" in buffer:
            lines, rest = _split_any(buffer)
        else:
            lines = buffer.split(b"\n")
            rest = lines.pop()
        if len(rest) > MAX_PENDING_BYTES:
            raise ValueError(f"an SSE line over {MAX_PENDING_BYTES} bytes")
        self._buffer = rest
        out: list[SseEvent] = []
        for line in lines:
            if not line:
                if self._has_data:
                    out.append(
                        SseEvent(self._event or "message", "\n".join(self._data), self._last_id, self._retry)
                    )
                self._data = []
                self._has_data = False
                self._event = ""
                self._retry = None
                continue
            if line[0] == 0x3A:  # ":" comment
                continue
            name, sep, value = line.partition(b":")
            if sep and value[:1] == b" ":
                value = value[1:]
            self._field(name, value)
        return out

    def _field(self, name: bytes, value: bytes) -> None:
        if name == b"data":
            self._data.append(value.decode("utf-8", "replace"))
            self._has_data = True
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id":
            if b"\0" not in value:
                self._last_id = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit():
            self._retry = int(value)


def _split_any(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Split on CRLF, LF or CR; the unfinished rest. A CR as the very last byte stays in the rest."""
    lines: list[bytes] = []
    start = 0
    n = len(buffer)
    i = 0
    while i < n:
        byte = buffer[i]
        if byte == 0x0A:
            lines.append(buffer[start:i])
            start = i + 1
        elif byte == 0x0D:
            if i + 1 == n:
                break  # maybe half of a CRLF: wait for the next chunk
            lines.append(buffer[start:i])
            if buffer[i + 1] == 0x0A:
                i += 1
            start = i + 1
        i += 1
    return lines, buffer[start:]
