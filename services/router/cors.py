"""Cross-origin access to the OpenAI-compatible API, for clients that run in a browser.

Off unless `--allowed-origins` names the origins (or `*`): a model server on a
laptop's localhost should not answer every web page its user opens. Credentials
(cookies) are never allowed; an API key travels in the Authorization header, which
a preflight may ask for like any other.
"""

from __future__ import annotations

from aiohttp import web

from pdserve.router.openai_errors import error_body

METHODS = "GET, POST, OPTIONS"
PREFLIGHT_MAX_AGE_S = 600  # a browser asks again for the same call after this long
EXPOSED = "X-Request-Id, Retry-After"  # headers a page may read: the reply's id, when to try again
_DEFAULT_PORTS = {"https": ":443", "http": ":80"}


def normalized(origin: str) -> str:
    """An origin as a browser sends it: lower case, no trailing slash, no default port."""
    origin = origin.lower().rstrip("/")
    port = _DEFAULT_PORTS.get(origin.split("://", 1)[0])
    return origin.removesuffix(port) if port else origin


class Cors:
    def __init__(self, origins: list[str]) -> None:
        self.any = "*" in origins
        self.origins = frozenset(normalized(o) for o in origins)

    def allows(self, origin: str | None) -> bool:
        return origin is not None and (self.any or origin in self.origins)

    def install(self, app: web.Application) -> None:
        """Preflights answered first (before the API key check: a browser sends them without one), and
        the allowing headers on every reply to an allowed origin, streamed ones too (at prepare)."""
        app.middlewares.insert(0, self._preflight)
        app.on_response_prepare.append(self._allow)

    @web.middleware
    async def _preflight(self, request: web.Request, handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if request.method != "OPTIONS" or origin is None or "Access-Control-Request-Method" not in request.headers:
            return await handler(request)
        if not self.allows(origin):
            message = f"origin {origin!r} is not allowed (the router's --allowed-origins)"
            return web.json_response(error_body(message, "invalid_request_error"), status=403)
        headers = {"Access-Control-Allow-Methods": METHODS, "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S)}
        if "Access-Control-Request-Headers" in request.headers:
            headers["Access-Control-Allow-Headers"] = request.headers["Access-Control-Request-Headers"]
        return web.Response(status=204, headers=headers)

    async def _allow(self, request: web.Request, response: web.StreamResponse) -> None:
        if not self.any:  # every answer depends on the Origin: a cache must keep one per origin
            response.headers.add("Vary", "Origin")
        origin = request.headers.get("Origin")
        if self.any or self.allows(origin):
            response.headers["Access-Control-Allow-Origin"] = "*" if self.any else origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSED
