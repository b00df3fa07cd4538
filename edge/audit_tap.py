"""The audit tap: a copy of every delivered token on an audit subject, never in delivery's way.

    tap = AuditTap("audit.chat.{conversation_id}.tokens", queue_size=10_000)
    await tap.start(nc)                 # the adapter's own NATS connection
    tap.copy(msg, delivered_bytes)      # no I/O, no await: appends to a bounded queue
    await tap.close()                   # up to `close_timeout` s to publish what is queued

The subject is a template: `{conversation_id}` is replaced by the message's conversation id (already
checked against `^[A-Za-z0-9_-]{1,128}$` by the token contract, so it is one literal subject token).
`validate_template()` refuses a template that would not give a literal subject: `*`, `>`, spaces,
empty tokens, a placeholder that is not a whole token, or any other `{...}`. Without the placeholder
every conversation goes to the one subject.

What travels is the bytes the viewers got (after redaction or an inspector's replacement), as a core
NATS publish: at most once, no JetStream, no acknowledgement. (An audit that must not lose a token
needs a JetStream stream over the audit subjects, which the operator can add: the subjects are
literal and stable.)

How it stays out of delivery's way (the same design as `meshkit.extproc.auth.events`):

- `copy()` appends to a deque of at most `queue_size` messages and wakes one background task. A full
  queue drops the new copy and counts it (`queue_full`); after `close()` began, `closed`.
- The task hands copies to nats-py only while its outbound buffer holds less than half of its 2 MiB
  `pending_size`, so a NATS that accepts the TCP connection but does not read never makes a publish
  block on nats-py's forced flush: copies wait in the bounded queue instead, then drop.
- While the connection is down nats-py buffers publishes itself (bounded, same rule); a publish it
  refuses is counted (`error`).

Counts (`published`, `dropped[reason]`: queue_full | closed | error, `queued`) are exported by
`meshkit.edge.token_inspection` as `meshkit_sse_audit_published_total`,
`meshkit_sse_audit_dropped_total{reason}` and `meshkit_sse_audit_queued`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque

from nats.aio.client import Client
from nats.errors import Error as NatsError

from meshkit.edge.token_contract import TokenMessage
from meshkit.logs import Throttle
from meshkit.nats_flush import flushed

__all__ = ["DEFAULT_AUDIT_SUBJECT", "DROP_REASONS", "PLACEHOLDER", "AuditTap", "validate_template"]

log = logging.getLogger(__name__)

PLACEHOLDER = "{conversation_id}"
DEFAULT_AUDIT_SUBJECT = f"audit.chat.{PLACEHOLDER}.tokens"
DROP_REASONS = ("queue_full", "closed", "error")

_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_PENDING_HIGH = 1024 * 1024  # half of nats-py's default pending_size (2 MiB)
_BATCH = 256
_BACKPRESSURE_POLL = 0.01


def validate_template(template: str) -> str:
    """`template` if it gives a literal NATS subject for every conversation id, else ValueError."""
    tokens = template.split(".") if isinstance(template, str) else [""]
    bad = [t for t in tokens if t != PLACEHOLDER and _TOKEN.fullmatch(t) is None]
    if bad or tokens.count(PLACEHOLDER) > 1:
        raise ValueError(
            f"audit subject {template!r}: expected dot-separated tokens of letters, digits, '_' and '-', "
            f"one of which may be {PLACEHOLDER} (such as {DEFAULT_AUDIT_SUBJECT}); NATS subjects "
            "cannot contain '*', '>', spaces or empty tokens"
        )
    return template


class AuditTap:
    """Copies delivered token messages to the audit subject (see the module docstring)."""

    def __init__(
        self,
        template: str = DEFAULT_AUDIT_SUBJECT,
        *,
        queue_size: int = 10_000,
        close_timeout: float = 1.0,
    ) -> None:
        validate_template(template)
        if queue_size < 1:
            raise ValueError(f"audit queue_size {queue_size!r}: must be at least 1")
        self.template = template
        self.queue_size = queue_size
        self.close_timeout = close_timeout
        self._prefix, _, self._suffix = template.partition(PLACEHOLDER)
        self._has_placeholder = PLACEHOLDER in template
        self._queue: deque[tuple[str, bytes]] = deque()
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()  # set by the task whenever the queue is empty
        self._nc: Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._throttle = Throttle(log, interval=30.0)
        self.published = 0
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def subject_for(self, conversation_id: str) -> str:
        if not self._has_placeholder:
            return self.template
        return f"{self._prefix}{conversation_id}{self._suffix}"

    # -- lifecycle

    async def start(self, nc: Client) -> None:
        self._nc = nc
        self._task = asyncio.create_task(self._run(), name="audit-tap")

    async def close(self) -> None:
        """Publish what is queued for at most `close_timeout` s; the rest is dropped as `closed`."""
        self._closing = True
        self._wakeup.set()
        deadline = time.monotonic() + self.close_timeout
        if self._queue and self._task is not None and not self._task.done():
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), self.close_timeout)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._queue:
            self.dropped["closed"] += len(self._queue)
            self._queue.clear()
        if self._nc is not None and self._nc.is_connected:
            with contextlib.suppress(NatsError, TimeoutError):
                await asyncio.wait_for(flushed(self._nc), max(0.05, deadline - time.monotonic()))

    # -- the delivery path

    def copy(self, msg: TokenMessage, delivered: bytes) -> None:
        """Queue a copy of `delivered` (the bytes the viewers got for `msg`); never blocks."""
        if self._closing:
            self.dropped["closed"] += 1
            return
        if len(self._queue) >= self.queue_size:
            self.dropped["queue_full"] += 1
            return
        self._queue.append((self.subject_for(msg.conversation_id), delivered))
        self._wakeup.set()

    # -- the background task

    async def _run(self) -> None:
        nc = self._nc
        assert nc is not None
        while True:
            if not self._queue:
                self._drained.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if nc.pending_data_size > _PENDING_HIGH:
                await asyncio.sleep(_BACKPRESSURE_POLL)  # NATS is not reading: copies wait in the queue
                continue
            for _ in range(min(_BATCH, len(self._queue))):
                subject, data = self._queue.popleft()
                try:
                    await nc.publish(subject, data)
                except NatsError as exc:
                    self.dropped["error"] += 1
                    self._throttle.warning(
                        "audit-publish", "audit tap: publish to %s failed: %s", subject, exc
                    )
                    continue
                self.published += 1
                if nc.pending_data_size > _PENDING_HIGH:
                    break
            await asyncio.sleep(0)
