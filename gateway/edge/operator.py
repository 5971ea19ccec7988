"""Seed 004's operator surfaces under ``/v1`` — answered by the gateway itself, never forwarded upstream.

    GET    /v1/health                 the gateway, its store and each target's circuit (public, like /readyz):
                                      200 "healthy", or 503 "degraded" when the store is down or no circuit
                                      is closed
    GET    /v1/admin/summary          = GET /admin/summary        } the admin API's data and access rules
    GET    /v1/cache/stats            = GET /admin/cache/stats    } (``gateway.edge.admin``: admin key, or
    DELETE /v1/cache/clear[?target=]  = DELETE /admin/cache       }  direct loopback without one)

Every path the gateway answers under ``/v1`` (these, ``/v1/models``, ``/v1/usage/{user}``) answers another
method with 405 in OpenAI's dialect: such a request never reaches the proxy's catch-all route, which would
send it upstream with the target's key. ``GET /v1/rate-limit/{user}`` shows the limits a user's requests count
against (the caller's tenant's, or the per-IP limit) until per-user limits exist (issue #14 point 4).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway import __version__
from gateway.edge import admin
from gateway.edge.ids import named, request_id
from gateway.edge.requests import client_ip
from gateway.edge.writer import error_response
from gateway.errors import GatewayError, MethodNotAllowed
from gateway.flow.exchange import OPENAI
from gateway.headers import X_REQUEST_ID
from gateway.keys import RUNTIME
from gateway.store import StoreError
from policies.rate_limit import Limit, Limits, tenant_limits

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HEALTH_STORE_TIMEOUT_S = 1.0


async def health(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME].current
    problem = await rt.store_problem(HEALTH_STORE_TIMEOUT_S)
    store: dict[str, Any] = {"backend": rt.store.backend, "healthy": problem is None, "error": problem}
    circuits = rt.circuit_states()
    targets = {name: {"kind": target.kind, "provider": target.provider.name, "circuit": circuits[name]}
               for name, target in rt.targets.items()}
    serving = any(t["circuit"] != "open" for t in targets.values())
    healthy = store["healthy"] and serving
    body = {"status": "healthy" if healthy else "degraded", "version": __version__,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "store": store, "redis": store["healthy"] if rt.store.backend == "redis" else None, "targets": targets}
    return web.json_response(body, status=200 if healthy else 503, headers={"Cache-Control": "no-store"})


async def rate_limit_info(request: web.Request) -> web.StreamResponse:
    """The limits a user's requests count against, as they stand (peeked: nothing is taken). With tenants,
    only for a caller with a tenant key, and the caller's tenant's; without, the per-IP limit of the caller's
    address. Per-user limits are not implemented yet (issue #14 point 4): ``per_user`` says so."""
    rt = request.app[RUNTIME].current
    user = request.match_info["user_id"][:128]
    server = rt.config.server
    scope: str | None = None
    limits = None
    if rt.tenants.enabled:
        tenant = rt.tenants.authenticate(request.headers)
        assert tenant is not None
        scope, who = "tenant", "tenant:" + tenant.name
        limits = tenant_limits(rt.config).get(tenant.name)
    elif server.rate_limit_per_ip_rpm:
        scope, who = "ip", "ip:" + (client_ip(request, rt) or "-")
        limits = Limits(Limit("default", server.rate_limit_per_ip_rpm, None), None)
    shown = []
    store_error = None
    for key, limit in (("rl:", limits.requests if limits else None), ("rlt:", limits.tokens if limits else None)):
        if limit is None:
            continue
        entry: dict[str, Any] = {"name": limit.name, "unit": limit.unit, "limit": limit.capacity,
                                 "per_minute": limit.quota, "remaining": None, "reset_s": None}
        try:
            got = await rt.store.take(key + who, rate_per_s=limit.rate_per_s, burst=limit.burst, quantity=0)
            entry["remaining"], entry["reset_s"] = got.remaining, round(got.reset_after_s, 3)
        except StoreError as e:
            store_error = rt.scrub(str(e))
        shown.append(entry)
    body = {"user_id": user, "scope": scope, "limits": shown, "per_user": None, "store_error": store_error,
            "note": "per-user rate limits are not implemented yet: these are the limits this user's requests "
                    "count against"}
    return web.json_response(body, headers={"Cache-Control": "no-store", X_REQUEST_ID: request_id(request.headers)})


def _dialect_errors(handler: Handler) -> Handler:
    """A ``GatewayError`` as the OpenAI dialect's error, with the request id."""
    async def answered(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except GatewayError as e:
            return error_response(e, OPENAI, request_id(request.headers))
    return answered


def _only(method: str) -> Handler:
    async def refuse(request: web.Request) -> web.StreamResponse:
        raise MethodNotAllowed(f"{request.path} answers {method} only", headers={"Allow": method})
    return refuse


ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/v1/health", named(health)),
    ("GET", "/v1/admin/summary", admin.guarded(admin.summary)),
    ("GET", "/v1/cache/stats", admin.guarded(admin.cache_stats)),
    ("DELETE", "/v1/cache/clear", admin.guarded(admin.cache_clear)),
    ("GET", "/v1/rate-limit/{user_id}", _dialect_errors(rate_limit_info)),
)


def add_routes(app: web.Application, fixed: tuple[tuple[str, str, Handler], ...] = ()) -> None:
    """These routes and ``fixed`` (the other ``/v1`` paths the gateway answers), each with a 405 for every
    other method; before the proxy's catch-all route."""
    for method, path, handler in (*ROUTES, *fixed):
        app.router.add_route(method, path, handler)
        app.router.add_route("*", path, _dialect_errors(_only(method)))
