"""nats-py's ordered push consumer without its flow-control poller: one task fewer per conversation.

nats-py (2.x) starts a task for every ordered push consumer (`_JSI.check_flow_control_response`) that
wakes every 0.25 s to answer a flow-control request once the data messages before it were handed to
the subscription's callback. With one subscription per conversation (2,000 in the issue's benchmark)
that is 8,000 wake-ups a second; py-spy put 13-16 % of the adapter's CPU samples in it and the
`asyncio.sleep` it loops on, under that load.

It never has anything to send for a subscription with a callback: nats-py's read loop decides between
"answer now" and "leave it to the poller" by comparing the data messages queued so far with
`Subscription.delivered`, which counts every message *received* (data, heartbeats, the flow-control
request itself), so it is always ahead and the read loop answers every request at once. The hub
therefore cancels the poller right after subscribing (`stop_poller`) and, so that a flow-control
request is never left unanswered should a nats-py version schedule one after all, calls `answer()`
after each message its callback handled: it sends a scheduled answer, as the poller would have.

The idle-heartbeat check (`_JSI.activity_check`, every 2 heartbeat intervals: missed heartbeats make the
ordered consumer re-create itself, the leaf restart and partition cases) is left as it is.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("meshkit.edge.hub")

__all__ = ["answer", "jetstream_state", "stop_poller"]


def jetstream_state(subscription: Any) -> Any:
    """nats-py's per-subscription JetStream state (`Subscription._jsi`), or None (also used by
    sse_heartbeat_check)."""
    return getattr(getattr(subscription, "_sub", None), "_jsi", None)


def stop_poller(subscription: Any) -> bool:
    """Cancel the flow-control poller of `subscription` (a `JetStreamContext.PushSubscription`);
    whether there was one to cancel."""
    task = getattr(jetstream_state(subscription), "_fctask", None)
    if task is None or task.done():
        return False
    task.cancel()
    return True


async def answer(subscription: Any) -> None:
    """Send the flow-control answer nats-py scheduled for after the messages handled so far, if any."""
    jsi = jetstream_state(subscription)
    reply = getattr(jsi, "_fcr", None)
    if not reply or jsi.get_js_delivered() < jsi._fcd:
        return
    jsi._fcr, jsi._fcd = None, 0
    try:
        await jsi._conn.publish(reply)
    except Exception as exc:  # the poller ignored these too; the server asks again
        log.debug("flow-control answer not sent: %r", exc)
