"""CORS for the adapter's streams (`--cors-origin`, `--cors-credentials`): off by default.

A page on another origin reads `/stream/{id}` with `EventSource` or `fetch` only when the response
says it may. With `--cors-origin ORIGIN` (repeatable):

- every response of the stream app to a request whose `Origin` is allowed (the stream, and its 4xx/5xx
  JSON errors, so the page can read why) carries `Access-Control-Allow-Origin`: `*` when `*` is
  allowed and credentials are off, else the request's origin itself, with `Vary: Origin` (a cache
  must not give one origin's answer to another). With `--cors-credentials` also
  `Access-Control-Allow-Credentials: true` (an `EventSource` with `withCredentials`); `*` cannot go
  with credentials (the CORS rules forbid it: refused at start-up);
- a preflight `OPTIONS /stream/{id}` (what `fetch` with an `Authorization` or `Last-Event-ID`
  header sends first) from an allowed origin asking for GET: 204 with `Access-Control-Allow-Methods:
  GET`, `Access-Control-Allow-Headers: Authorization, Last-Event-ID, Cache-Control`, `Max-Age` 600;
  from another origin or for another method: 403 JSON, without CORS headers;
- an origin that is not allowed gets the same responses without the headers (the browser then
  refuses to hand them to the page): CORS is the browser's rule, not access control;
- `/ws/{id}`: browsers do not apply CORS to WebSockets but do send `Origin`; with `--cors-origin` set
  (and not `*`) an upgrade from another origin is refused with 403 before the upgrade (cross-site
  WebSocket hijacking: a cookie-authenticated page elsewhere must not open the stream).

Comparison is on the lowercased `scheme://host[:port]` as browsers send it.
"""

from __future__ import annotations

from aiohttp import web

from meshkit.errors import error_body

__all__ = ["CORS", "Cors"]

ALLOW_HEADERS = "Authorization, Last-Event-ID, Cache-Control"
MAX_AGE = "600"


class Cors:
    def __init__(self, origins: tuple[str, ...], *, credentials: bool = False) -> None:
        self.origins = frozenset(o.lower() for o in origins)
        self.any = "*" in self.origins
        self.credentials = credentials
        self.enabled = bool(self.origins)

    def allows(self, origin: str | None) -> bool:
        return self.enabled and origin is not None and (self.any or origin.lower() in self.origins)

    def ws_allows(self, origin: str | None) -> bool:
        """A WebSocket upgrade from `origin` (no `Origin`: not a browser, allowed)."""
        return not self.enabled or self.any or origin is None or origin.lower() in self.origins

    def _headers(self, origin: str) -> dict[str, str]:
        if self.any and not self.credentials:
            return {"Access-Control-Allow-Origin": "*"}
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if self.credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        return headers

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if request.method != "OPTIONS" and self.allows(origin) and request.path.startswith("/stream/"):
            assert origin is not None
            for name, value in self._headers(origin).items():
                if name == "Vary" and "Vary" in response.headers:
                    response.headers["Vary"] = response.headers["Vary"] + ", Origin"
                else:
                    response.headers[name] = value

    async def preflight(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin")
        method = request.headers.get("Access-Control-Request-Method", "")
        if not self.allows(origin) or method.upper() != "GET":
            why = "origin not allowed (--cors-origin)" if not self.allows(origin) else "only GET"
            return web.Response(
                status=403,
                body=error_body("forbidden", f"CORS preflight: {why}"),
                content_type="application/json",
            )
        assert origin is not None
        headers = {
            **self._headers(origin),
            "Access-Control-Allow-Methods": "GET",
            "Access-Control-Allow-Headers": ALLOW_HEADERS,
            "Access-Control-Max-Age": MAX_AGE,
        }
        return web.Response(status=204, headers=headers)


CORS = web.AppKey("cors", Cors)
