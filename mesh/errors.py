"""The errors meshkit raises, as one tree.

MeshkitError
├── ConfigError        bad options: collected, printed once, the CLI exits 2
├── ListenError        an address cannot be bound (taken, not ours): one line, the CLI exits 1
├── StartError         a daemon's resource did not start (in time): one line, the CLI exits 1
│   └── FilterDefinitionError  a filter class that cannot run as written (a misspelt on_... hook);
│                      also a TypeError
├── ClientError        a request a client must fix: an HTTP status + JSON error body
├── DependencyError    a server meshkit needs (Redis, NATS, S3, a JWKS URL) is down or too slow:
│                      a JSON 503 with Retry-After, one log line, counted by `dependency`
└── HarnessError       a real server of the test/stack harness failed to start or stop
"""

from __future__ import annotations

import json
from collections.abc import Sequence


class MeshkitError(Exception):
    """Base of every error meshkit raises on purpose."""


class ConfigError(MeshkitError):
    """One or more invalid options; `problems` holds one line per bad key."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))

    def __str__(self) -> str:
        return "invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems)


class ListenError(MeshkitError):
    """An address the daemon must listen on cannot be bound."""


class StartError(MeshkitError):
    """A resource the daemon declared (a filter's `start()`, a client) failed or overran its deadline."""


class FilterDefinitionError(StartError, TypeError):
    """A filter class that cannot run as written: a method `on_...` that is not a phase hook, a hook
    with the wrong signature. Found when the chain is built (start-up, `meshkit render`): one line."""


class ClientError(MeshkitError):
    """A request error the client may see, as `{"error": {"message", "type", "code"}}` with `status`."""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        code: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.status = status
        self.type = type
        self.message = message
        self.code = code
        self.headers = tuple(headers)
        super().__init__(f"{status} {type}: {message}")

    def body(self) -> bytes:
        return error_body(self.type, self.message, self.code)


class DependencyError(MeshkitError):
    """A server needed to decide is down or too slow. `dependency` names it (`redis`, `jwks`, ...) for
    the log line and the counter; the client gets 503 with `Retry-After: retry_after`."""

    def __init__(self, dependency: str, message: str, *, retry_after: int = 1) -> None:
        self.dependency = dependency
        self.message = message
        self.retry_after = max(1, int(retry_after))
        super().__init__(f"{dependency}: {message}")


class HarnessError(MeshkitError):
    """A real server started by the harness failed; the message carries its log tail."""


def error_body(type: str, message: str, code: str | None = None) -> bytes:
    """The one JSON error shape of every HTTP-facing part of meshkit (OpenAI-compatible)."""
    return json.dumps({"error": {"message": message, "type": type, "code": code}}).encode()
