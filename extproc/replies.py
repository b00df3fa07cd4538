"""Every JSON error reply the server core makes itself (filters make theirs with `Reply.error`).

One home, so the rendered Envoy config (its local-reply mappers), the three adapters and the chain all
answer with the same bodies.
"""

from __future__ import annotations

from meshkit.errors import DependencyError
from meshkit.extproc.filter import Reply

__all__ = [
    "BAD_REQUEST",
    "INCOMPLETE_BODY",
    "INTERNAL_ERROR",
    "REQUEST_TIMEOUT",
    "TIMEOUT",
    "dependency_down",
    "too_large",
]

INTERNAL_ERROR = Reply.error(500, "internal_error", "the request could not be processed")
TIMEOUT = Reply.error(504, "timeout", "a filter did not decide in time")
INCOMPLETE_BODY = Reply.error(400, "incomplete_body", "the request body ended before its Content-Length")
# The ext_authz HTTP port's own faults: a check request that is not valid HTTP/1.1, or whose body stalled.
BAD_REQUEST = Reply.error(400, "bad_request", "the request is not valid HTTP/1.1")
REQUEST_TIMEOUT = Reply.error(408, "request_timeout", "the request body did not arrive in time")


def too_large(limit: int) -> Reply:
    return Reply.error(413, "request_too_large", f"request body exceeds the limit of {limit} bytes")


def dependency_down(exc: DependencyError) -> Reply:
    """503 with Retry-After: a server the filter needs is down; the client may retry. Which one
    (`exc.dependency`) goes to the log and the counter, not to the client."""
    return Reply.error(
        503,
        "service_unavailable",
        "a service needed to decide is unavailable; retry later",
        headers=(("retry-after", str(exc.retry_after)),),
    )
