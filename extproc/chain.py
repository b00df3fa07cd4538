"""The filter chain: the hook table, resolved once at start-up, and the rules for running it.

- For each phase, the hooks of the filters that have one, in chain order.
- Hooks run in order on the same `Exchange`; later hooks see earlier pending header changes.
- The first `Reply` stops the chain for good: pending changes are dropped and no later hook runs,
  response phases included. A `ClientError` raised inside a hook becomes that same `Reply`.
- Any other exception is logged with its traceback, the filter and the request id, and the client gets
  a 500 JSON reply: a failing filter is never skipped (fail closed).
- Sync and async hooks are told apart here, once; a chain of sync hooks never suspends, so awaiting it
  costs a coroutine, not a trip through the event loop.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from meshkit.errors import ClientError
from meshkit.extproc.filter import PHASES, Exchange, Phase, Reply
from meshkit.extproc.metrics import Metrics

log = logging.getLogger("meshkit.extproc.chain")

INTERNAL_ERROR = Reply.error(500, "internal_error", "the request could not be processed")


@dataclass(frozen=True, slots=True)
class _Hook:
    filter_name: str
    fn: Callable[[Exchange], Any]
    is_async: bool


class Chain:
    def __init__(self, filters: Sequence[Any], metrics: Metrics | None = None) -> None:
        names = [f.name for f in filters]
        if len(set(names)) != len(names):
            raise ValueError(f"a filter appears twice in the chain: {', '.join(names)}")
        self.filters = tuple(filters)
        self._names = tuple(names)
        self.metrics = metrics or Metrics(names)
        self._hooks: dict[Phase, tuple[_Hook, ...]] = {}
        for phase in PHASES:
            hooks = []
            for f in filters:
                fn = getattr(f, phase.hook_name, None)
                if fn is not None:
                    hooks.append(_Hook(f.name, fn, inspect.iscoroutinefunction(fn)))
            self._hooks[phase] = tuple(hooks)
        self.phases = frozenset(p for p, hooks in self._hooks.items() if hooks)

    async def run(self, phase: Phase, exchange: Exchange) -> Reply | None:
        """Run one phase's hooks in order. A chain of sync hooks never suspends: awaiting this is a
        plain call, with no trip through the event loop."""
        if exchange.reply is not None:
            return exchange.reply
        exchange.phase = phase
        for hook in self._hooks[phase]:
            try:
                result = hook.fn(exchange)
                if hook.is_async:
                    result = await cast(Awaitable[Reply | None], result)
                reply = cast(Reply | None, result)
            except ClientError as exc:
                reply = Reply.from_client_error(exc)
            except Exception:
                reply = self._failed(hook, exchange)
            if reply is not None:
                return self.reject(exchange, reply, hook.filter_name)
        return None

    def _failed(self, hook: _Hook, exchange: Exchange) -> Reply:
        log.exception(
            "filter %s failed in %s",
            hook.filter_name,
            exchange.phase.value,
            extra={"filter": hook.filter_name, "request_id": exchange.request_id},
        )
        self.metrics.error(f"filter:{hook.filter_name}")
        return INTERNAL_ERROR

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
        exchange.take_mutations()
        exchange.reply = reply
        self.metrics.replied(source, reply.status)
        return reply
