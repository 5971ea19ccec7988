"""CORS for browsers on other origins (``server.cors``; the Fetch standard's CORS protocol).

A preflight — ``OPTIONS`` with ``Access-Control-Request-Method`` — is the gateway's to answer, on every
path: it is never forwarded upstream (where it would go with a target's key), with or without a ``cors``
block. Without one it gets 204 and no ``Access-Control-*`` header, so a browser refuses the real request.
With one, an allowed origin's preflight gets the allowed methods and headers and ``Max-Age``, and every
answer to an allowed origin — complete, streamed, an error — gets ``Access-Control-Allow-Origin`` (the
origin itself unless any origin is allowed without credentials), ``-Expose-Headers`` and ``-Allow-Credentials``.
A request without ``Origin`` pays one header lookup; without a ``cors`` block nothing is installed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from gateway.config.model import CorsConfig

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_preflight(request: web.Request) -> bool:
    return request.method == "OPTIONS" and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers


def no_cors_preflight(request: web.Request) -> web.Response:
    """A preflight where no origin is allowed: answered, never proxied."""
    return web.Response(status=204, headers={"Cache-Control": "no-store"})


class Cors:
    def __init__(self, config: CorsConfig) -> None:
        self.any_origin = "*" in config.allow_origins
        self.origins = frozenset(config.allow_origins)
        self.methods = ", ".join(m.upper() for m in config.allow_methods)
        self.method_set = frozenset(m.upper() for m in config.allow_methods)
        self.any_header = "*" in config.allow_headers
        self.headers = ", ".join(config.allow_headers)
        self.expose = ", ".join(config.expose_headers)
        self.credentials = config.allow_credentials
        self.max_age = str(config.max_age_s)

    def allowed(self, origin: str) -> bool:
        return self.any_origin or origin in self.origins

    def _origin_headers(self, origin: str) -> dict[str, str]:
        echo = self.credentials or not self.any_origin
        out = {hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: origin if echo else "*"}
        if self.credentials:
            out[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
        return out

    def preflight(self, request: web.Request) -> web.Response:
        origin = request.headers.get(hdrs.ORIGIN)
        method = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_METHOD, "").upper()
        headers = {"Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
                   "Cache-Control": "no-store"}
        if origin and self.allowed(origin) and method in self.method_set:
            headers.update(self._origin_headers(origin))
            headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = self.methods
            asked = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS)
            if self.any_header:
                if asked:
                    headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = asked
            else:
                headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = self.headers
            headers[hdrs.ACCESS_CONTROL_MAX_AGE] = self.max_age
        return web.Response(status=204, headers=headers)

    def decorate(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None or not self.allowed(origin):
            return
        response.headers.update(self._origin_headers(origin))
        if self.expose:
            response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = self.expose
        vary = response.headers.get(hdrs.VARY)
        if vary is None:
            response.headers[hdrs.VARY] = "Origin"
        elif "origin" not in vary.lower():
            response.headers[hdrs.VARY] = vary + ", Origin"


def install(app: web.Application, config: CorsConfig) -> None:
    """The preflight answer before every route, and the headers on every answer (streams too: added as the
    response is prepared, before its head is written)."""
    cors = Cors(config)

    @web.middleware
    async def preflights(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS" and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers:
            return cors.preflight(request)
        return await handler(request)

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        if hdrs.ORIGIN in request.headers:
            cors.decorate(request, response)

    app.middlewares.append(preflights)
    app.on_response_prepare.append(on_prepare)
