"""The filter chain: the hook table, resolved once at start-up, and the rules for running it.

- For each phase, the hooks of the filters that have one, in chain order (`hooks_of`: a misspelt
  `on_...` method is a start-up error).
- Hooks run in order on the same `Exchange`; later hooks see earlier pending header changes.
- The first `Reply` stops the chain for good: pending changes are dropped and no later hook runs,
  response phases included. A `ClientError` raised inside a hook becomes that same `Reply`.
- Every round of hooks (one ext_authz check; one ext_proc message) has a deadline, `--filter-timeout`:
  an async hook still running then is cancelled and the client gets a JSON 504, or, for a fail-open
  filter (`fail_open = True`), its changes are undone and the request goes on. Counted per filter.
- `DependencyError` (a server the filter needs is down) becomes a JSON 503 with Retry-After (or, for a
  fail-open filter, the request goes on), one throttled log line without traceback, counted per
  dependency.
- Any other exception is logged with its traceback, the filter and the request id, and the client gets
  a 500 JSON reply: a failing filter is never skipped (fail closed).
- Sync and async hooks are told apart here, once; a chain of sync hooks never suspends, so awaiting it
  costs a coroutine, not a trip through the event loop. Sync hooks cannot be cancelled (they hold
  the loop while they run): keep them to microseconds, and put I/O in async hooks.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from meshkit.errors import ClientError, DependencyError
from meshkit.extproc import replies
from meshkit.extproc.filter import PHASES, Exchange, Phase, Reply, hooks_of
from meshkit.extproc.metrics import Metrics
from meshkit.logs import Throttle

log = logging.getLogger("meshkit.extproc.chain")

DEFAULT_FILTER_TIMEOUT = 0.5
DEFAULT_MAX_BODY_BYTES = 8 << 20


@dataclass(frozen=True, slots=True)
class _Hook:
    filter_name: str
    fn: Callable[[Exchange], Any]
    is_async: bool
    fail_open: bool


class Chain:
    def __init__(
        self,
        filters: Sequence[Any],
        metrics: Metrics | None = None,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        filter_timeout: float = DEFAULT_FILTER_TIMEOUT,
    ) -> None:
        names = [f.name for f in filters]
        if len(set(names)) != len(names):
            raise ValueError(f"a filter appears twice in the chain: {', '.join(names)}")
        self.filters = tuple(filters)
        self._names = tuple(names)
        self.metrics = metrics or Metrics(names)
        self.max_body_bytes = max_body_bytes
        self.filter_timeout = filter_timeout
        self._too_large = replies.too_large(max_body_bytes)
        self._throttled = Throttle(log)
        self._hooks: dict[Phase, tuple[_Hook, ...]] = {phase: () for phase in PHASES}
        for f in filters:
            for phase in hooks_of(type(f)):
                fn = getattr(f, phase.hook_name)
                hook = _Hook(
                    f.name, fn, inspect.iscoroutinefunction(fn), bool(getattr(f, "fail_open", False))
                )
                self._hooks[phase] = (*self._hooks[phase], hook)
        self.phases = frozenset(p for p, hooks in self._hooks.items() if hooks)

    # -- running -----------------------------------------------------------------------------------
    @staticmethod
    def new_round(exchange: Exchange) -> None:
        """Start a new deadline for `exchange`: the next async hook gets `filter_timeout` from then."""
        exchange.deadline = None

    async def run(self, phase: Phase, exchange: Exchange) -> Reply | None:
        """Run one phase's hooks in order. A chain of sync hooks never suspends: awaiting this is a
        plain call, with no trip through the event loop."""
        if exchange.reply is not None:
            return exchange.reply
        exchange.phase = phase
        for hook in self._hooks[phase]:
            try:
                if hook.is_async:
                    reply = await self._run_async(hook, exchange, hook.fn(exchange))
                else:
                    reply = hook.fn(exchange)
                    if reply is not None and not isinstance(reply, Reply):
                        reply = await self._odd_return(hook, exchange, reply)
            except ClientError as exc:
                reply = Reply.from_client_error(exc)
            except DependencyError as exc:
                reply = self._dependency_down(hook, exchange, exc)
            except _Overran:
                reply = self._timed_out(hook, exchange)
            except Exception:
                reply = self._failed(hook, exchange)
            if reply is not None:
                return self.reject(exchange, reply, hook.filter_name)
        return None

    async def _run_async(self, hook: _Hook, exchange: Exchange, pending: Awaitable[Any]) -> Reply | None:
        loop = asyncio.get_running_loop()
        if exchange.deadline is None:
            exchange.deadline = loop.time() + self.filter_timeout
        saved = exchange.snapshot() if hook.fail_open else None
        deadline = asyncio.timeout_at(exchange.deadline)
        try:
            async with deadline:
                reply = await pending
        except Exception:
            # A fail-open filter that did not finish lets the request through without the changes it
            # had made so far, whatever stopped it (our deadline, its DependencyError); any other
            # outcome is a reply, which drops every pending change anyway.
            if saved is not None:
                exchange.restore(saved)
            # Once our deadline has cancelled the hook, whatever it raises is that cancellation: a
            # client library may turn it into its own error (ConnectionError, its TimeoutError). Before
            # that, a TimeoutError is the hook's own (a client's timeout): a failure, not ours.
            if not deadline.expired():
                raise
            raise _Overran from None
        if reply is not None and not isinstance(reply, Reply):
            raise _not_a_reply(hook, reply)
        return reply

    async def _odd_return(self, hook: _Hook, exchange: Exchange, returned: Any) -> Reply | None:
        """A sync hook returned something other than a Reply or None: an awaitable (a decorated async
        hook, `def on_...: return self._check(ex)`, which the hook's type allows) is awaited under
        the deadline like an async hook; anything else is the filter's bug."""
        if inspect.isawaitable(returned):
            return await self._run_async(hook, exchange, returned)
        raise _not_a_reply(hook, returned)

    def _timed_out(self, hook: _Hook, exchange: Exchange) -> Reply | None:
        self.metrics.timeout(hook.filter_name)
        self._throttled.warning(
            f"timeout:{hook.filter_name}",
            "filter %s overran --filter-timeout (%.3g s) in %s: %s",
            hook.filter_name,
            self.filter_timeout,
            exchange.phase.value,
            "request let through (fail-open)" if hook.fail_open else "answered 504",
            request_id=exchange.request_id,
        )
        return None if hook.fail_open else replies.TIMEOUT

    def _dependency_down(self, hook: _Hook, exchange: Exchange, exc: DependencyError) -> Reply | None:
        self.metrics.dependency_error(exc.dependency)
        self._throttled.warning(
            f"dependency:{exc.dependency}",
            "filter %s: %s is unavailable: %s (%s)",
            hook.filter_name,
            exc.dependency,
            exc.message,
            "request let through (fail-open)" if hook.fail_open else "answered 503",
            request_id=exchange.request_id,
        )
        return None if hook.fail_open else replies.dependency_down(exc)

    def _failed(self, hook: _Hook, exchange: Exchange) -> Reply:
        # A bug, with its traceback; throttled per filter and exception type, since a client may be
        # able to trigger it on every request (the counter has every one).
        kind = type(sys.exc_info()[1]).__name__
        self._throttled.exception(
            f"failed:{hook.filter_name}:{kind}",
            "filter %s failed in %s",
            hook.filter_name,
            exchange.phase.value,
            filter=hook.filter_name,
            request_id=exchange.request_id,
        )
        self.metrics.error(f"filter:{hook.filter_name}")
        return replies.INTERNAL_ERROR

    # -- the server core's own decisions ----------------------------------------------------------
    def check_size(self, exchange: Exchange, size: int) -> Reply | None:
        """413 when a body of `size` bytes is over `--max-body-bytes` (every path asks this, once)."""
        if size > self.max_body_bytes:
            return exchange.reply or self.reject(exchange, self._too_large, "max-body-bytes")
        return None

    def finish(self, exchange: Exchange, api: str) -> None:
        """Count the request once it is over: its outcome, and a pass for every filter if none replied."""
        metrics = self.metrics
        if exchange.reply is None:
            metrics.request(api, "continue")
            for name in self._names:
                metrics.passed(name)
        else:
            metrics.request(api, "reply")

    def reject(self, exchange: Exchange, reply: Reply, source: str) -> Reply:
        """Stop the exchange with `reply`, decided by a filter or by the server core itself (`source`:
        the filter's name, or a reason such as max-body-bytes); pending header changes are dropped."""
        exchange.drop_mutations()
        exchange.reply = reply
        self.metrics.replied(source, reply.status)
        return reply


def _not_a_reply(hook: _Hook, value: Any) -> TypeError:
    kind = type(value).__name__
    return TypeError(f"filter {hook.filter_name}: a hook returned {kind}, not a Reply or None")


class _Overran(Exception):
    """An async hook ran past the round's deadline (raised from its cancellation)."""
