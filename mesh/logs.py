"""Structured logs: `text` for people, `json` (one object per line) for machines.

Fields passed with `extra={...}` become JSON keys (or `key=value` in text). Values of sensitive keys
(authorization, cookies, API keys) are replaced by `***` wherever they appear, also inside a `headers`
mapping, so a secret never reaches a log line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from aiohttp.http_exceptions import HttpProcessingError

SENSITIVE = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",  # Azure OpenAI
        "x-goog-api-key",  # Gemini
        "cookie",
        "set-cookie",
        "api_key",
        "token",
        "secret",
        "password",
    }
)
# Also any key that ends in one of these (`-` and `_` alike): `redis_password`, `client_secret`,
# `x-auth-token`, `openai_api_key`.
_SENSITIVE_ENDINGS = ("-api-key", "-token", "-secret", "-password", "-credentials")


def is_sensitive(key: str) -> bool:
    name = key.lower()
    if name in SENSITIVE:
        return True
    return name.replace("_", "-").endswith(_SENSITIVE_ENDINGS)


_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def redact(value: Any, key: str = "") -> Any:
    """`value` with the values of sensitive keys masked: in mappings, and in lists of them or of
    `(name, value)` pairs (headers as a list)."""
    if is_sensitive(key):
        return "***"
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        if len(value) == 2 and isinstance(value[0], str) and is_sensitive(value[0]):
            return (value[0], "***")
        return [redact(item) for item in value]
    return value


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: redact(v, k) for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_extras(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        # One event, one line: a newline in a message or a value (an error text that quotes a client)
        # is written as \n, so nothing can forge a line of its own. Tracebacks keep their lines.
        saved = record.msg, record.args
        record.msg, record.args = _one_line(record.getMessage()), None
        try:
            line = super().format(record)
        finally:
            record.msg, record.args = saved
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={_one_line(_text_value(v))}" for k, v in extras.items())
        return line


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _text_value(value: Any) -> str:
    """A structured value (the ready line's addresses) as JSON, so it reads back; others as str()."""
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, default=str, separators=(",", ":"))
    return str(value)


class WithoutPeerData(logging.Filter):
    """aiohttp's server logs a malformed request (HttpProcessingError) with a traceback that quotes the
    request, Authorization headers included: keep the event and the exception's type, drop the rest.
    Other exceptions (bugs) keep their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.exc_info
            and record.exc_info[0] is not None
            and issubclass(record.exc_info[0], HttpProcessingError)
        ):
            record.msg = f"{record.getMessage()}: {record.exc_info[0].__name__}"
            record.args = None
            record.exc_info = record.exc_text = None
        return True


class Throttle:
    """At most one line per `interval` seconds for each key (a fault that repeats under load: malformed
    requests, a dependency that is down); the next line says how many were left out in between. The
    counters, not the log, are where such events are counted."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, tuple[float, int]] = {}  # key -> (time of the last line, suppressed since)

    def warning(self, key: str, msg: str, *args: Any, **extra: Any) -> bool:
        """Log `msg % args` at WARNING unless `key` was logged less than `interval` s ago; True if logged."""
        return self.log(logging.WARNING, key, msg, *args, **extra)

    def exception(self, key: str, msg: str, *args: Any, **extra: Any) -> bool:
        """The same at ERROR with the current exception's traceback (a bug that a client can trigger
        on every request: its traceback once per `interval`, its count in the metrics)."""
        return self.log(logging.ERROR, key, msg, *args, exc_info=True, **extra)

    def log(self, level: int, key: str, msg: str, *args: Any, exc_info: bool = False, **extra: Any) -> bool:
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-self._interval, 0))
        if now - last < self._interval:
            self._last[key] = (last, suppressed + 1)
            return False
        if len(self._last) > 1024:  # bounded: keys are filter and dependency names, faults by kind
            self._last.clear()
        self._last[key] = (now, 0)
        if suppressed:
            extra["suppressed"] = suppressed
        self._logger.log(level, msg, *args, exc_info=exc_info or None, extra=extra)
        return True


def setup(fmt: str = "text", level: str = "info", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    for name in ("aiohttp.server", "aiohttp.web"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, WithoutPeerData) for f in logger.filters):
            logger.addFilter(WithoutPeerData())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
