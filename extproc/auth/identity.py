"""Who a verified caller is, and why a caller was refused: what every credential check returns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Identity:
    """A caller whose credential checked out.

    `method` is `jwt` or `api-key`; `expires_at` (epoch seconds) bounds how long a cached verification
    may be reused; `rate_limit` is requests per minute for this caller (None: the default, if any).
    """

    subject: str
    method: str
    scopes: frozenset[str] = frozenset()
    expires_at: float | None = None
    rate_limit: int | None = None
    claims: dict[str, object] | None = None  # a JWT's verified claims (e.g. `conv` for the SSE edge)


class AuthFailure(Exception):
    """A credential that does not check out. `reason` is a short machine-readable word for events and
    metrics (`expired`, `bad_signature`, `unknown_kid`, ...); `message` is safe to show the client
    (it never echoes the credential)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
