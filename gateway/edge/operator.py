"""Seed 004's operator surfaces under ``/v1`` — answered by the gateway itself, never forwarded upstream.

    GET    /v1/health                 the gateway, its store and each target's circuit (public, like /readyz):
                                      200 "healthy", or 503 "degraded" when the store is down or no circuit
                                      is closed
    GET    /v1/admin/summary          = GET /admin/summary        } the admin API's data and access rules
    GET    /v1/cache/stats            = GET /admin/cache/stats    } (``gateway.edge.admin``: admin key, or
    DELETE /v1/cache/clear[?target=]  = DELETE /admin/cache       }  direct loopback without one)

Every path the gateway answers under ``/v1`` (these, ``/v1/models``, ``/v1/usage/{user}``) answers another
method with 405 in OpenAI's dialect: such a request never reaches the proxy's catch-all route, which would
send it upstream with the target's key. ``GET /v1/rate-limit/{user}`` shows, peeked, every limit that user's
requests count against: the user's own (per-user minute and hour), the tenant's, or the caller's per-IP limit;
with tenants only for a caller with a tenant key, and only that tenant's users.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import msgspec
from aiohttp import web

from gateway import __version__
from gateway.edge import admin
from gateway.edge.access import access_fields
from gateway.edge.answers import Health, LimitView, PerUserView, RateLimitInfo, StoreState, TargetHealth
from gateway.edge.ids import named, request_id
from gateway.edge.requests import client_ip
from gateway.edge.writer import StreamOutcome, error_response
from gateway.errors import GatewayError, MethodNotAllowed
from gateway.flow.exchange import OPENAI
from gateway.headers import X_REQUEST_ID
from gateway.keys import RUNTIME
from gateway.store import StoreError
from policies.rate_limit import Limit, buckets, merge_headers, per_ip_limits, quota_limits

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HEALTH_STORE_TIMEOUT_S = 1.0


async def health(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME].current
    problem = await rt.store_problem(HEALTH_STORE_TIMEOUT_S)
    store = StoreState(rt.store.backend, problem is None, problem)
    circuits = rt.circuit_states()
    targets = {name: TargetHealth(target.kind, target.provider.name, circuits[name])  # type: ignore[arg-type]
               for name, target in rt.targets.items()}
    serving = any(t.circuit != "open" for t in targets.values())
    healthy = store.healthy and serving
    answer = Health("healthy" if healthy else "degraded", __version__, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    store, store.healthy if rt.store.backend == "redis" else None, targets)
    return web.Response(body=msgspec.json.encode(answer), status=200 if healthy else 503,
                        content_type="application/json", headers={"Cache-Control": "no-store"})


async def rate_limit_info(request: web.Request) -> web.StreamResponse:
    """Every limit a user's requests count against, as it stands (peeked: nothing is taken): the user's own
    (per-user minute and hour), the tenant's, or — without tenants — the caller's per-IP limit. With tenants,
    only for a caller with a tenant key, and only that tenant's users."""
    rt = request.app[RUNTIME].current
    user = request.match_info["user_id"][:128]
    tenant: str | None = None
    plan: str | None = None  # whose limits: the tenant's own, or its marketplace tier's
    if rt.tenants.enabled:
        caller = rt.tenants.authenticate(request.headers)
        assert caller is not None
        tenant, plan = caller.name, caller.plan
    which: list[tuple[Limit, str, Literal["user", "tenant", "ip"]]] = []
    quotas = quota_limits(rt.config, rt.tenants.enabled).get(plan)
    if quotas:
        which += [(lim, who, "user" if lim.per_user else "tenant") for lim, who in buckets(quotas, tenant, user)]
    rpm = rt.config.server.rate_limit_per_ip_rpm
    if rpm:  # the door's, with or without tenants
        which += [(lim, "ip:" + (client_ip(request, rt) or "-"), "ip") for lim in per_ip_limits(rpm).limits]
    shown = []
    store_error = None
    for lim, who, applies_to in which:
        entry = LimitView(lim.name, applies_to, lim.unit, lim.capacity, round(lim.quota), lim.window_s, None, None)
        try:
            got = await rt.store.take(lim.key + who, rate_per_s=lim.rate_per_s, burst=lim.burst, quantity=0)
            entry.remaining, entry.reset_s = got.remaining, round(got.reset_after_s, 3)
        except StoreError as e:
            store_error = rt.scrub(str(e))
        shown.append(entry)
    per_user = {lim.name: round(lim.quota) for lim, _, applies_to in which if applies_to == "user"}
    answer = RateLimitInfo(user, tenant, shown,
                           PerUserView(per_user.get("user"), per_user.get("user-hourly")) if per_user else None, store_error)
    return web.Response(body=msgspec.json.encode(answer), content_type="application/json",
                        headers={"Cache-Control": "no-store", X_REQUEST_ID: request_id(request.headers)})


def _dialect_errors(handler: Handler) -> Handler:
    """A ``GatewayError`` as the OpenAI dialect's error, with the request id."""
    async def answered(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except GatewayError as e:
            return error_response(e, OPENAI, request_id(request.headers))
    return answered


class _Visit:
    """A fixed route's request as the door sees it (``policies.door.Call``)."""

    __slots__ = ("request", "tenant", "ip", "exempt", "fingerprint", "limit_headers")

    def __init__(self, request: web.Request, ip: str | None) -> None:
        self.request = request
        self.tenant: str | None = None
        self.ip = ip
        self.exempt = True
        self.fingerprint: str | None = None
        self.limit_headers: dict[str, str] | None = None


def _through_the_door(handler: Handler) -> Handler:
    """A route that takes a tenant key passes the door as the proxied surfaces do: a banned or locked-out
    address is refused before the key is looked at, a wrong key counts against the address's budget of failed
    authentications and as a violation — so no path is a free oracle for guessing keys. Each request is an
    access line and counted in the metrics, refusals too: guessing keys here is as visible as anywhere."""
    async def doored(request: web.Request) -> web.StreamResponse:
        rt = request.app[RUNTIME].current
        started = time.monotonic()
        guard = rt.guard
        visit = _Visit(request, client_ip(request, rt) if guard is not None else None)
        error: GatewayError | None = None
        try:
            if guard is not None:
                await guard.admit(visit)
                tenant = rt.tenants.authenticate(request.headers)
                visit.tenant = tenant.name if tenant is not None else None
                guard.authenticated(visit)
        except GatewayError as e:
            error = e
            guard.answered(visit, e)  # type: ignore[union-attr]
            if visit.limit_headers:
                merge_headers(e.headers, visit.limit_headers)
            response: web.StreamResponse = error_response(e, OPENAI, request_id(request.headers))
        else:
            try:
                response = await handler(request)
            except GatewayError as e:
                error, response = e, error_response(e, OPENAI, request_id(request.headers))
            if visit.limit_headers:
                merge_headers(response.headers, visit.limit_headers)  # type: ignore[arg-type]
        _record(rt, request, visit.tenant, response, error, started)
        return response
    return doored


def _record(rt: Any, request: web.Request, tenant: str | None, response: web.StreamResponse,
            error: GatewayError | None, started: float) -> None:
    rid = response.headers.get(X_REQUEST_ID) or request_id(request.headers)
    fields = access_fields(request, rid, "v1", None, None, response.status, error, StreamOutcome(),
                           (time.monotonic() - started) * 1000)
    fields["tenant"] = tenant
    fields["outcome"] = "ok" if error is None and response.status < 400 else "error"
    fields["path"] = rt.scrub(request.path)[:256]
    if error is not None:
        fields["error_message"] = rt.scrub(error.message)[:1024]
    if rt.access_log.enabled:
        rt.access_log(fields)
    rt.observatory.record(fields)


TENANT_KEYED = frozenset(("/v1/rate-limit/{user_id:[^/]+}", "/v1/models", "/v1/usage/{user_id:[^/]+}"))


def _only(method: str) -> Handler:
    async def refuse(request: web.Request) -> web.StreamResponse:
        raise MethodNotAllowed(f"{request.path} answers {method} only", headers={"Allow": method})
    return refuse


async def get_only(request: web.Request) -> web.StreamResponse:
    """Another method on a path the gateway answers GET (and HEAD) on: 405, in the OpenAI dialect."""
    return error_response(MethodNotAllowed(f"{request.path} answers GET and HEAD only", headers={"Allow": "GET, HEAD"}),
                          OPENAI, request_id(request.headers))


ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/v1/health", named(health)),
    ("GET", "/v1/admin/summary", admin.guarded(admin.summary)),
    ("GET", "/v1/cache/stats", admin.guarded(admin.cache_stats)),
    ("DELETE", "/v1/cache/clear", admin.guarded(admin.cache_clear)),
    ("GET", "/v1/rate-limit/{user_id:[^/]+}", _dialect_errors(rate_limit_info)),  # ({…} too: never proxied)
)


def add_routes(app: web.Application, fixed: tuple[tuple[str, str, Handler], ...] = ()) -> None:
    """These routes and ``fixed`` (the other ``/v1`` paths the gateway answers), each with a 405 for every
    other method; before the proxy's catch-all route."""
    for method, path, handler in (*ROUTES, *fixed):
        app.router.add_route(method, path, _through_the_door(handler) if path in TENANT_KEYED else handler)
        app.router.add_route("*", path, _dialect_errors(_only(method)))
