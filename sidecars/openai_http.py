"""What the OpenAI-compatible sidecars share on the HTTP side: a JSON answer, and one middleware that
turns whatever a handler raised into OpenAI's error body (`openai_shapes.error_body`), never a traceback.

- `InvalidRequest` (a request that does not parse): its own status and body;
- aiohttp's own 404, 405, 413: OpenAI's wording (`Invalid URL (POST /v1/x)`), `invalid_request_error`;
- anything else: logged with its traceback, answered 500 `server_error`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from meshkit.sidecars.openai_shapes import InvalidRequest, error_body

__all__ = ["json_error", "openai_errors"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    """An error answer whose `body` is already OpenAI's JSON error body."""
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def openai_errors(component: str, log: logging.Logger) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The middleware for `component` (its name leads the log line of an unexpected error)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except InvalidRequest as exc:
            return json_error(exc.status, exc.body())
        except web.HTTPException as exc:  # aiohttp's own: 404, 405, 413
            if exc.status == 404:
                message = f"Invalid URL ({request.method} {request.path})"
            elif exc.status == 405:
                message = f"Method {request.method} is not allowed on {request.path}"
            else:
                message = exc.reason
            return json_error(exc.status, error_body(message, "invalid_request_error"))
        except Exception:
            log.exception("%s: unexpected error answering %s %s", component, request.method, request.path)
            body = error_body("The server had an error processing your request.", "server_error")
            return json_error(500, body)

    return middleware
