"""The external token inspector: one NATS request/reply per token, bounded in time and in flight.

    inspector = Inspector("inspect.tokens", timeout=0.2, fail="closed", max_inflight=256)
    verdict = await inspector.inspect(nc, msg)   # never raises for a slow, absent or broken inspector

The request is the token message's raw JSON (the contract's bytes, unchanged) on `subject`; the
inspector answers with a JSON object:

    {"action": "allow"}
    {"action": "replace", "token": "the text to deliver instead"}
    {"action": "block", "reason": "pii"}

Anything else is a failure, and so is no answer within `timeout` (`timeout`), no subscriber at all
(`no_responders`: NATS says so at once, there is no need to wait), an answer that is not such an
object (`bad_reply`), every in-flight slot taken for the whole `timeout` (`overloaded`), or any other
NATS error, the connection lost included (`error`). A failure is counted (by kind) and then:

- `fail="open"`: the token is delivered as if the inspector had allowed it;
- `fail="closed"`: it is blocked with reason `inspector_<kind>` (`inspector_timeout`, ...).

Decisions:

- `timeout` bounds the whole inspection, the wait for an in-flight slot included: a token is never
  held longer than that, whatever the inspector or the queue does.
- At most `max_inflight` requests are outstanding per process (a semaphore): the adapter runs one
  inspection per token per conversation, and a burst over many conversations must not open an
  unbounded number of NATS inboxes.
- A block `reason` becomes a metric label, so it is kept only when it is a short word
  (`[a-z0-9_-]{1,32}`) and one of the first `MAX_REASONS` distinct reasons seen; otherwise the label
  is `other`. The reason the adapter gets is the same sanitised word: an inspector's free text never
  reaches a client nor a label.
- A `replace` token is at most `MAX_REPLACEMENT` bytes of UTF-8 (64 KiB, the CHAT stream's message size).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Literal

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from meshkit.edge.token_contract import TokenMessage
from meshkit.logs import Throttle

__all__ = ["FAILURE_KINDS", "Inspector", "Verdict"]

log = logging.getLogger(__name__)

FailMode = Literal["open", "closed"]
FAILURE_KINDS = ("timeout", "no_responders", "bad_reply", "overloaded", "error")
MAX_REPLACEMENT = 64 * 1024
MAX_REASONS = 32
_REASON = re.compile(r"[a-z0-9_-]{1,32}")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the inspector decided: `allow`, `replace` (with `token`) or `block` (with `reason`).
    `failure` is the failure kind when the inspector did not answer usefully (the verdict is then the
    fail mode's)."""

    action: Literal["allow", "replace", "block"]
    token: str | None = None
    reason: str | None = None
    failure: str | None = None


class _Reasons:
    """The bounded set of block reasons used as metric labels."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def label(self, reason: object) -> str:
        if not isinstance(reason, str) or _REASON.fullmatch(reason) is None:
            return "other"
        if reason in self._seen:
            return reason
        if len(self._seen) >= MAX_REASONS:
            return "other"
        self._seen.add(reason)
        return reason


class Inspector:
    """Asks an external inspector about each token over NATS request/reply (see the module docstring)."""

    def __init__(
        self,
        subject: str,
        *,
        timeout: float = 0.2,
        fail: FailMode = "open",
        max_inflight: int = 256,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"inspector timeout {timeout!r}: must be > 0 seconds")
        if fail not in ("open", "closed"):
            raise ValueError(f"inspector fail mode {fail!r}: open or closed")
        if max_inflight < 1:
            raise ValueError(f"inspector max_inflight {max_inflight!r}: must be 1 or more")
        self.subject = subject
        self.timeout = float(timeout)
        self.fail = fail
        self.max_inflight = max_inflight
        self._slots = asyncio.Semaphore(max_inflight)
        self._reasons = _Reasons()
        self._throttle = Throttle(log, interval=30.0)
        self.inflight = 0
        self.failures: dict[str, int] = dict.fromkeys(FAILURE_KINDS, 0)

    async def inspect(self, nc: Client, msg: TokenMessage) -> Verdict:
        """The inspector's verdict on `msg`, or the fail mode's after a failure; never raises (except
        for the caller's own cancellation)."""
        deadline = time.monotonic() + self.timeout
        if self._slots.locked():  # every slot taken: wait for one, within the deadline
            try:
                await asyncio.wait_for(self._slots.acquire(), self.timeout)
            except TimeoutError:
                return self._failed(
                    "overloaded", f"{self.max_inflight} inspections in flight for {self.timeout} s"
                )
        else:
            await self._slots.acquire()  # a free slot: no suspension
        self.inflight += 1
        try:
            left = max(0.001, deadline - time.monotonic())
            try:
                async with asyncio.timeout(left + 0.05):  # also bounds a publish stuck on a full buffer
                    reply = await nc.request(self.subject, msg.raw, timeout=left)
            except NoRespondersError:
                return self._failed("no_responders", f"no inspector subscribes to {self.subject}")
            except (NatsTimeoutError, TimeoutError):
                return self._failed("timeout", f"no answer from {self.subject} within {self.timeout} s")
            except NatsError as exc:
                return self._failed("error", f"{type(exc).__name__}: {exc}")
        finally:
            self.inflight -= 1
            self._slots.release()
        return self._verdict(reply.data)

    def _verdict(self, data: bytes) -> Verdict:
        try:
            value: Any = json.loads(data)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return self._failed("bad_reply", "the reply is not JSON")
        if not isinstance(value, dict):
            return self._failed("bad_reply", "the reply is not a JSON object")
        action = value.get("action")
        if action == "allow":
            return Verdict("allow")
        if action == "replace":
            token = value.get("token")
            if not isinstance(token, str):
                return self._failed("bad_reply", "a replace reply without a string token")
            try:
                size = len(token.encode())
            except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the JSON): no UTF-8 for a client
                return self._failed("bad_reply", "a replacement that is not UTF-8 text")
            if size > MAX_REPLACEMENT:
                return self._failed("bad_reply", f"a replacement over {MAX_REPLACEMENT} bytes")
            return Verdict("replace", token=token)
        if action == "block":
            return Verdict("block", reason=self._reasons.label(value.get("reason", "inspector")))
        return self._failed("bad_reply", "action is not allow, replace or block")

    def _failed(self, kind: str, why: str) -> Verdict:
        self.failures[kind] += 1
        self._throttle.warning(
            f"inspector-{kind}",
            "token inspector %s failed (%s): %s; failing %s",
            self.subject,
            kind,
            why,
            self.fail,
        )
        if self.fail == "open":
            return Verdict("allow", failure=kind)
        return Verdict("block", reason=f"inspector_{kind}", failure=kind)
