"""The hub's stand-in for nats-py's per-subscription flow-control poller (`sse_flow_control`), on a
stand-in for nats-py's subscription state (the real one: the integration tests' ordered consumers)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from meshkit.edge import sse_flow_control


@dataclass
class Conn:
    published: list[str] = field(default_factory=list)

    async def publish(self, subject: str) -> None:
        self.published.append(subject)


@dataclass
class Jsi:
    _conn: Conn
    delivered: int = 0
    _fcr: str | None = None
    _fcd: int = 0
    _fctask: Any = None

    def get_js_delivered(self) -> int:
        return self.delivered


@dataclass
class Sub:
    _jsi: Jsi


@dataclass
class PushSub:
    _sub: Sub


def push_sub() -> tuple[PushSub, Jsi]:
    jsi = Jsi(Conn())
    return PushSub(Sub(jsi)), jsi


async def test_the_poller_is_cancelled() -> None:
    sub, jsi = push_sub()
    assert sse_flow_control.stop_poller(sub) is False  # none
    jsi._fctask = asyncio.ensure_future(asyncio.sleep(3600))
    assert sse_flow_control.stop_poller(sub) is True
    await asyncio.gather(jsi._fctask, return_exceptions=True)
    assert jsi._fctask.cancelled()
    assert sse_flow_control.stop_poller(object()) is False  # not a nats-py subscription: nothing


async def test_a_scheduled_answer_goes_out_once_the_messages_before_it_were_handled() -> None:
    sub, jsi = push_sub()
    await sse_flow_control.answer(sub)
    assert jsi._conn.published == []  # nothing scheduled
    jsi._fcr, jsi._fcd, jsi.delivered = "$JS.FC.reply", 5, 4
    await sse_flow_control.answer(sub)
    assert jsi._conn.published == []  # message 5 not handled yet
    jsi.delivered = 5
    await sse_flow_control.answer(sub)
    await sse_flow_control.answer(sub)
    assert jsi._conn.published == ["$JS.FC.reply"]  # once
    assert jsi._fcr is None
    assert jsi._fcd == 0
