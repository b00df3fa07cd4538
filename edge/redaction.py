"""Inline redaction of token text: configured regexes replaced by `[redacted]`, in the `token` field only.

    redactor = Redactor(["email", r"\\bsk-[A-Za-z0-9]{20,}"])   # a preset name or a regex
    redactor.redact_message(msg)    # None: nothing matched, deliver msg.raw as is; else the new bytes

Decisions:

- Only the `token` field is looked at and changed (not `error`, `model`, `usage`). When nothing
  matches, the message's raw bytes pass unchanged (no JSON work beyond the search); when something
  matches, the message is parsed, its `token` replaced and re-encoded (compact, UTF-8, the other
  fields and their order kept). The message is parsed to read its `token` either way (a search over
  the raw JSON could miss a match hidden behind a `\\u0040` escape).
- Per token, no carry-over window. A tokenizer splits an e-mail address into several tokens
  (`john`, `.doe`, `@`, `example`, `.com`), and this redactor does NOT catch an address split like
  that: it catches what one token holds. A window would have to hold tokens back (latency) and would
  make a token's output depend on which earlier tokens this process happened to see: the adapter's
  live hub and a viewer resuming from JetStream at sequence N would then deliver different bytes for
  the same `id:`, and a resume could show half an address the live stream redacted. Per token, the
  output is a pure function of the message: every viewer, live or replaying, on any adapter, gets the
  same bytes for the same sequence. Policies that need the whole text belong in the external
  inspector (`meshkit.edge.inspector`), which sees every message of a conversation in order (or in
  the model's output filter, before the tokens are published).
- Presets: `email`. Anything else is a Python regex. Every problem is collected into one
  `ConfigError`: a regex that does not compile (with the error and position), and a regex that
  matches the empty string (it would insert the replacement between every character).
- Patterns are applied one after another, each to the text the previous one produced. Python's `re`
  has no time limit: a pathological regex (nested quantifiers) is the operator's to avoid; a token
  is small (the contract bounds a message to 1 MiB, the CHAT stream to 64 KiB), which bounds the harm.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from meshkit.edge.token_contract import TokenMessage
from meshkit.errors import ConfigError

__all__ = ["PRESETS", "REPLACEMENT", "Redactor", "compile_patterns"]

REPLACEMENT = "[redacted]"
PRESETS: dict[str, str] = {
    # local part @ domain with at least one dot; the common shape, not RFC 5322's every corner. `\w`
    # is Unicode: an ASCII-only class would leave `jü` of `jürgen@mail.de` in the clear.
    "email": r"[\w.%+-]+@\w(?:[\w-]*\w)?(?:\.[\w-]+)+",
}


def compile_patterns(patterns: Iterable[str], *, flag: str = "--redact") -> tuple[re.Pattern[str], ...]:
    """Each of `patterns` (a preset name or a regex) compiled; one `ConfigError` listing every bad one."""
    compiled: list[re.Pattern[str]] = []
    problems: list[str] = []
    for given in patterns:
        source = PRESETS.get(given, given)
        if not source:
            problems.append(f"{flag} {given!r}: empty pattern")
            continue
        try:
            pattern = re.compile(source)
        except re.error as exc:
            where = f" at position {exc.pos}" if exc.pos is not None else ""
            problems.append(f"{flag} {given!r}: not a valid regex: {exc.msg}{where}")
            continue
        if pattern.fullmatch("") is not None:
            problems.append(
                f"{flag} {given!r}: matches the empty string (it would redact between every character)"
            )
            continue
        compiled.append(pattern)
    if problems:
        raise ConfigError(problems)
    return tuple(compiled)


class Redactor:
    """Replaces every match of its patterns in a token's text (see the module docstring)."""

    def __init__(self, patterns: Iterable[str], *, replacement: str = REPLACEMENT) -> None:
        self.patterns = compile_patterns(patterns)
        self.replacement = replacement

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def redact(self, text: str) -> str | None:
        """`text` with every match replaced, or None when nothing matched."""
        changed = False
        for pattern in self.patterns:
            if pattern.search(text) is None:
                continue
            text = pattern.sub(self.replacement, text)
            changed = True
        return text if changed else None

    def redact_message(self, msg: TokenMessage) -> bytes | None:
        """The message re-encoded with its `token` redacted, or None when nothing matched (deliver
        `msg.raw` as is)."""
        fields = msg.fields()
        token = fields.get("token", "")
        if not isinstance(token, str) or not token:
            return None
        redacted = self.redact(token)
        if redacted is None:
            return None
        return with_token(fields, redacted)


def with_token(fields: dict[str, object], token: str) -> bytes:
    """The message `fields` with `token` replaced, as compact UTF-8 JSON (key order kept)."""
    fields = dict(fields)
    fields["token"] = token
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()
