"""The hub's one idle-heartbeat check for every subscription (`sse_heartbeat_check`), on stand-ins for
nats-py's subscription state (the real ordered consumers: tests/integration/test_sse_resilience.py,
test_sse_partition.py, the leaf restarted or cut off)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from meshkit.edge.sse_heartbeat_check import HeartbeatCheck


@dataclass
class Conn:
    is_closed: bool = False


@dataclass
class Jsi:
    _conn: Conn = field(default_factory=Conn)
    _active: bool = True
    _ordered: bool = True
    _sseq: int = 41
    _hbtask: Any = None
    resets: list[int] = field(default_factory=list)

    async def reset_ordered_consumer(self, sseq: int) -> bool:
        self.resets.append(sseq)
        return True


@dataclass
class Sub:
    _jsi: Jsi


@dataclass
class PushSub:
    _sub: Sub


async def test_a_subscription_silent_for_a_round_is_reset_from_the_next_stream_sequence() -> None:
    jsis = [Jsi(), Jsi(), Jsi(_conn=Conn(is_closed=True)), Jsi(_ordered=False)]
    check = HeartbeatCheck(4.0, lambda: [PushSub(Sub(j)) for j in jsis])
    assert check.check() == 0  # every one starts active: judged over the next round
    jsis[0]._active = True  # a message or a heartbeat came for the first
    assert check.check() == 1
    await asyncio.sleep(0)
    assert [j.resets for j in jsis] == [[], [42], [], []]
    assert jsis[0]._active is False  # cleared for the next round
    await check.close()


async def test_nats_pys_own_check_is_cancelled_and_the_rounds_run_until_closed() -> None:
    jsi = Jsi(_active=False)
    jsi._hbtask = asyncio.ensure_future(asyncio.sleep(3600))
    sub = PushSub(Sub(jsi))
    assert HeartbeatCheck.stop(sub) is True
    await asyncio.gather(jsi._hbtask, return_exceptions=True)
    assert jsi._hbtask.cancelled()
    assert HeartbeatCheck.stop(sub) is False  # nothing running any more
    check = HeartbeatCheck(0.01, lambda: [sub])
    check.start()
    check.start()  # idempotent: one task
    await asyncio.sleep(0.1)
    await check.close()
    assert jsi.resets and set(jsi.resets) == {42}
    count = len(jsi.resets)
    await asyncio.sleep(0.05)
    assert len(jsi.resets) == count  # closed: no more rounds
