"""Token inspection for the SSE adapter: one call per token before delivery, off by default.

    inspection = TokenInspection.from_options(options)   # the daemon's resolved option sections
    for c in inspection.collectors(): registry.register(c)   # on the daemon's registry
    await inspection.start(nc)                            # the adapter's NATS connection (or None)
    result = await inspection.check(msg)                  # once per token message, in order
    if result.blocked:  ...                               # result.reason: a short word
    else:               deliver(result.raw)               # msg.raw itself when nothing changed
    await inspection.close()

Three hooks, each off unless configured (`TokenInspectionOptions`):

1. the external inspector (`--inspector-subject S`, `--inspector-timeout`, `--inspector-fail`,
   `--inspector-max-inflight`): NATS request/reply with the raw message, see `meshkit.edge.inspector`;
2. inline redaction (`--redact REGEX|email`, `--redact-replacement`): see `meshkit.edge.redaction`
   (per token, and why);
3. the audit tap (`--audit`, `--audit-subject`, `--audit-queue-size`): a copy of what was delivered,
   see `meshkit.edge.audit_tap`.

Order, and why: the inspector sees the token as the model wrote it (it is the policy engine: it
needs the original text); redaction then runs over whatever will be delivered, the inspector's
replacement included (a replacement cannot reintroduce a redacted pattern); the audit tap copies the
bytes that were delivered. A blocked token is not copied to the audit subject (it was not delivered);
it is counted by reason.

A message whose `token` is empty (typically the final `done` one) is not sent to the inspector nor
redacted: there is nothing to inspect. It is still audited. A `done` message must always reach the
viewers (a blocked `done` would leave every stream open): when the inspector blocks one that has
text, it is delivered with its `token` emptied (`changed`, `reason` set, counted as blocked).

The adapter calls `check()` once per message per conversation (the hub), not once per viewer, and the
result is a pure function of the message for redaction; the inspector's answers are its own. When
`check()` blocks, the adapter sends `event: blocked` with the reason, keeping the `id:` of the blocked
sequence, so a resume stays gap-free. The hub runs several checks at once and logs them in order, so
it calls `check(msg, audit=False)` and copies to `tap` itself what it logs, in that order.

`--redact` takes one pattern per flag value; several patterns come from a YAML list
(`sse: {redact: [email, "\\\\bsk-[A-Za-z0-9]{20,}"]}`) or from one value with one pattern per line
(for `MESHKIT_SSE_REDACT`). A comma never separates patterns (regexes have commas: `{1,3}`).

Metrics (one collector, made here, registered by the adapter on its registry):

    meshkit_sse_tokens_inspected_total                 messages that went through check() while on
    meshkit_sse_tokens_blocked_total{reason}           by the inspector's reason, or inspector_<failure>
    meshkit_sse_tokens_replaced_total{by}              changed by `redaction` or by the `inspector`
    meshkit_sse_inspector_failures_total{kind}         timeout|no_responders|bad_reply|overloaded|error
    meshkit_sse_inspector_inflight                     requests to the inspector in flight
    meshkit_sse_audit_published_total                  copies handed to NATS
    meshkit_sse_audit_dropped_total{reason}            queue_full | closed | error
    meshkit_sse_audit_queued                           copies waiting
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshkit.edge.audit_tap import DEFAULT_AUDIT_SUBJECT, AuditTap, validate_template
from meshkit.edge.inspector import FAILURE_KINDS, Inspector
from meshkit.edge.redaction import REPLACEMENT, Redactor, compile_patterns, with_token
from meshkit.edge.token_contract import TokenMessage
from meshkit.errors import ConfigError
from meshkit.options import option, parse_non_negative_int, parse_seconds

__all__ = ["Inspected", "TokenInspection", "TokenInspectionOptions"]

_SUBJECT_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


def _patterns(value: Any) -> tuple[str, ...]:
    """A YAML list of patterns, or one string holding one pattern per line; each must compile."""
    items = [str(v) for v in value] if isinstance(value, list | tuple) else str(value).splitlines()
    patterns = tuple(p for p in items if p.strip())
    try:
        compile_patterns(patterns)
    except ConfigError as exc:  # as one ValueError line, so resolve() reports it with the others
        raise ValueError("; ".join(exc.problems)) from None
    return patterns


def _literal_subject(value: Any) -> str:
    text = str(value).strip()
    if text and not all(_SUBJECT_TOKEN.fullmatch(t) for t in text.split(".")):
        raise ValueError(
            "expected a literal NATS subject: dot-separated tokens of letters, digits, '_' and '-' "
            "(no '*', '>', spaces or empty tokens), such as inspect.tokens"
        )
    return text


def _positive_seconds(value: Any) -> float:
    seconds = parse_seconds(value)
    if seconds <= 0:
        raise ValueError("must be more than 0 seconds")
    return seconds


def _positive_int(value: Any) -> int:
    number = parse_non_negative_int(value)
    if number < 1:
        raise ValueError("must be 1 or more")
    return number


@dataclass(frozen=True)
class TokenInspectionOptions:
    redact: tuple[str, ...] = option(
        (),
        "redact matches in each token's text: a regex, or the preset `email`",
        parse=_patterns,
        metavar="REGEX",
        repeat=True,
    )
    redact_replacement: str = option(REPLACEMENT, "what a redacted match becomes")
    inspector_subject: str = option(
        "", "NATS subject of an external token inspector (request/reply); empty: off", parse=_literal_subject
    )
    inspector_timeout: float = option(
        0.2, "longest wait for the inspector's answer, per token", parse=_positive_seconds, metavar="SECONDS"
    )
    inspector_fail: str = option(
        "closed", "when the inspector fails: open (deliver) or closed (block)", choices=("open", "closed")
    )
    inspector_max_inflight: int = option(
        256, "inspector requests in flight at most", parse=_positive_int, metavar="N"
    )
    audit: bool = option(False, "copy every delivered token to --audit-subject (core NATS, at most once)")
    audit_subject: str = option(
        DEFAULT_AUDIT_SUBJECT,
        "audit subject; {conversation_id} is replaced by the id",
        parse=validate_template,
    )
    audit_queue_size: int = option(
        10_000, "token copies queued for the audit tap at most (then dropped, counted)", parse=_positive_int
    )


@dataclass(frozen=True, slots=True)
class Inspected:
    """What to deliver for one message: `raw` (the message's own bytes unless `changed`), or nothing
    when `blocked` (then `reason` says why, a short word). `raw` with a `reason`: a blocked `done`
    message, delivered with its text withheld."""

    raw: bytes | None
    changed: bool = False
    reason: str | None = None

    @property
    def blocked(self) -> bool:
        return self.raw is None


class TokenInspection:
    """The inspection hooks the SSE adapter calls per token (see the module docstring)."""

    def __init__(self, options: TokenInspectionOptions | None = None) -> None:
        o = options or TokenInspectionOptions()
        self.options = o
        self.redactor = Redactor(o.redact, replacement=o.redact_replacement) if o.redact else None
        self.inspector = (
            Inspector(
                o.inspector_subject,
                timeout=o.inspector_timeout,
                fail="open" if o.inspector_fail == "open" else "closed",
                max_inflight=o.inspector_max_inflight,
            )
            if o.inspector_subject
            else None
        )
        self.tap = AuditTap(o.audit_subject, queue_size=o.audit_queue_size) if o.audit else None
        self.enabled = bool(self.redactor or self.inspector or self.tap)
        self.needs_nats = self.inspector is not None or self.tap is not None
        self._nc: Client | None = None
        self.inspected = 0
        self.blocked: dict[str, int] = {}
        self.replaced: dict[str, int] = {"redaction": 0, "inspector": 0}

    @classmethod
    def from_options(cls, options: Mapping[type[Any], Any]) -> TokenInspection:
        return cls(options.get(TokenInspectionOptions) or TokenInspectionOptions())

    def summary(self) -> str:
        """What is on, for the start-up log line."""
        o = self.options
        on = []
        if self.inspector is not None:
            on.append(
                f"inspector {o.inspector_subject} (timeout {o.inspector_timeout} s, fail {o.inspector_fail})"
            )
        if self.redactor is not None:
            on.append(f"redaction of {len(o.redact)} pattern(s)")
        if self.tap is not None:
            on.append(f"audit tap to {o.audit_subject}")
        return "; ".join(on) or "token inspection off"

    def collectors(self) -> Iterable[Collector]:
        return (_InspectionCollector(self),)

    async def start(self, nc: Client | None) -> None:
        """Attach the adapter's NATS connection (needed by the inspector and the audit tap)."""
        if self.needs_nats and nc is None:
            raise ValueError("token inspection: the inspector and the audit tap need a NATS connection")
        self._nc = nc
        if self.tap is not None and nc is not None:
            await self.tap.start(nc)

    async def close(self) -> None:
        if self.tap is not None:
            await self.tap.close()

    async def check(self, msg: TokenMessage, *, audit: bool = True) -> Inspected:
        """What to deliver for `msg`. Never raises for a failing inspector (see `Inspector`).
        `audit=False`: no copy to the audit tap here (the caller copies what it delivers, in its
        delivery order: checks run concurrently and finish in any order)."""
        if not self.enabled:
            return Inspected(msg.raw)
        self.inspected += 1
        raw: bytes = msg.raw
        changed = False
        if self.redactor is not None or self.inspector is not None:
            fields = msg.fields()
            text = fields.get("token", "")
            if isinstance(text, str) and text:
                if self.inspector is not None:
                    assert self._nc is not None, "start() first"
                    verdict = await self.inspector.inspect(self._nc, msg)
                    if verdict.action == "block":
                        reason = verdict.reason or "inspector"
                        self.blocked[reason] = self.blocked.get(reason, 0) + 1
                        if not msg.done:
                            return Inspected(None, reason=reason)
                        # the last message must still end the streams: delivered, its text withheld
                        raw = with_token(fields, "")
                        if self.tap is not None and audit:
                            self.tap.copy(msg, raw)
                        return Inspected(raw, changed=True, reason=reason)
                    if verdict.action == "replace" and verdict.token is not None and verdict.token != text:
                        text = verdict.token
                        changed = True
                        self.replaced["inspector"] += 1
                if self.redactor is not None:
                    redacted = self.redactor.redact(text)
                    if redacted is not None:
                        text = redacted
                        changed = True
                        self.replaced["redaction"] += 1
                if changed:
                    raw = with_token(fields, text)
        if self.tap is not None and audit:
            self.tap.copy(msg, raw)
        return Inspected(raw, changed=changed)


class _InspectionCollector(Collector):
    def __init__(self, inspection: TokenInspection) -> None:
        self._i = inspection

    def collect(self) -> Iterator[Metric]:
        i = self._i
        yield CounterMetricFamily(
            "meshkit_sse_tokens_inspected", "Token messages that went through inspection", i.inspected
        )
        blocked = CounterMetricFamily(
            "meshkit_sse_tokens_blocked", "Token messages blocked by inspection, by reason", labels=["reason"]
        )
        for reason, count in sorted(i.blocked.items()):
            blocked.add_metric([reason], count)
        yield blocked
        replaced = CounterMetricFamily(
            "meshkit_sse_tokens_replaced", "Token messages changed before delivery, by what", labels=["by"]
        )
        for by, count in i.replaced.items():
            replaced.add_metric([by], count)
        yield replaced
        failures = CounterMetricFamily(
            "meshkit_sse_inspector_failures",
            "Inspector requests without a usable answer, by kind",
            labels=["kind"],
        )
        for kind in FAILURE_KINDS:
            failures.add_metric([kind], i.inspector.failures[kind] if i.inspector else 0)
        yield failures
        yield GaugeMetricFamily(
            "meshkit_sse_inspector_inflight",
            "Inspector requests in flight",
            i.inspector.inflight if i.inspector else 0,
        )
        tap = i.tap
        yield CounterMetricFamily(
            "meshkit_sse_audit_published",
            "Token copies handed to NATS on the audit subject",
            tap.published if tap else 0,
        )
        dropped = CounterMetricFamily(
            "meshkit_sse_audit_dropped",
            "Token copies not sent to the audit subject, by reason",
            labels=["reason"],
        )
        if tap is not None:
            for reason, count in tap.dropped.items():
                dropped.add_metric([reason], count)
        yield dropped
        yield GaugeMetricFamily(
            "meshkit_sse_audit_queued", "Token copies waiting for the audit tap", tap.queued if tap else 0
        )
