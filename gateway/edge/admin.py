"""The admin API under ``/admin/`` (SPEC §2): look at the gateway and act on it.

    GET    /admin/summary                   version, uptime, store, per-target and total counts
    GET    /admin/usage?tenant=&user=&since= usage rows summed by day and in total
    GET    /admin/cache/stats               per target: enabled, hits, misses, entries stored
    DELETE /admin/cache[?target=]           drop stored answers (all, or one target's)
    GET    /admin/circuits                  every target's circuit as this instance sees it
    POST   /admin/circuits/{target}/reset   close a circuit, on every instance
    POST   /admin/reload                    read the config again (as SIGHUP does)

Who may call it: with ``server.admin_key_env`` naming a variable that holds a key, a caller
with ``Authorization: Bearer <key>`` (compared in constant time); otherwise loopback peers
only, and only direct ones: a request carrying ``Forwarded``, ``X-Forwarded-For``,
``X-Real-IP``, ``Via`` or another header proxies and CDNs add (any value) came through a
proxy, and behind a proxy on the same host every client's socket is a loopback one. (A proxy
that adds none — nginx's bare ``proxy_pass`` — cannot be told apart: set an admin key behind
one.) Forwarding headers never make a caller local either: any client can write them. Nor is a web page the
operator (``_from_a_web_page``: cross-site, another Origin, a rebound Host). Answers are ``{"success": true, "data": …}``; errors are in the
envelope dialect (SPEC §3). Each endpoint returns its data as a Struct of ``gateway.edge.answers``,
which ``/openapi.json`` describes.
"""

from __future__ import annotations

import datetime
import functools
import hmac
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import hdrs, web
from multidict import istr

from gateway import reload as reloading
from gateway.edge.access import access_fields
from gateway.edge.answers import (
    AdminAnswer,
    AdminMeta,
    BanLifted,
    Bans,
    BanView,
    CacheCleared,
    CacheStats,
    CacheTarget,
    CircuitReset,
    Circuits,
    CircuitView,
    Reloaded,
    StoreState,
    Summary,
    TargetSummary,
    TenantSummary,
    Totals,
    UsageReport,
)
from gateway.edge.ids import request_id as request_id_of
from gateway.edge.reports import since_day
from gateway.edge.writer import EnvelopeError, StreamOutcome, error_body, error_response
from gateway.errors import (
    Forbidden,
    GatewayError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    StoreUnavailable,
    Unauthorized,
    UnknownTarget,
)
from gateway.flow.exchange import ENVELOPE
from gateway.keys import OBSERVATORY, RELOADER, RUNTIME
from gateway.observe.logs import hide_userinfo
from gateway.observe.status import snapshot
from gateway.runtime import Runtime
from gateway.store import StoreError
from policies import cache as cache_policy
from policies.usage import summary as usage_summary

log = logging.getLogger("reliapi")

AdminHandler = Callable[[web.Request, Runtime], Awaitable[msgspec.Struct]]


class ReloadUnavailable(GatewayError):
    """This gateway was built from a config it cannot read again (not started from the CLI)."""

    status, code, type = 409, "reload_unavailable", "client_error"


class InvalidConfig(GatewayError):
    """The config read for a reload does not validate; the running one stays."""

    status, code, type = 422, "invalid_config", "client_error"

    def __init__(self, message: str, errors: list[str]) -> None:
        super().__init__(message)
        self.errors = errors


# ---------------------------------------------------------------- who may call


def _loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        ip = ipaddress.ip_address(remote.split("%", 1)[0])  # an IPv6 zone id is not part of the address
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


# Added by a reverse proxy or a CDN: a loopback peer sending one may be relaying anyone.
_FORWARDING = (hdrs.FORWARDED, hdrs.X_FORWARDED_FOR, istr("X-Real-IP"), hdrs.VIA, hdrs.X_FORWARDED_HOST,
               hdrs.X_FORWARDED_PROTO, istr("X-Forwarded-Port"), istr("X-Client-IP"), istr("True-Client-IP"),
               istr("CF-Connecting-IP"), istr("X-Original-Forwarded-For"), istr("X-Cluster-Client-IP"),
               istr("Fastly-Client-IP"), istr("X-Envoy-External-Address"), istr("X-ProxyUser-Ip"),
               istr("X-Forwarded"), istr("Forwarded-For"), istr("X-Original-Host"), istr("X-Envoy-Original-Dst-Host"))


def check_access(request: web.Request, rt: Runtime) -> None:
    """Raise ``Unauthorized`` / ``Forbidden`` unless this caller may use the admin API. The peer
    address is the socket's (``request.remote``): ``trust_forwarded_for`` does not apply here."""
    name = rt.config.server.admin_key_env
    key = rt.env.get(name) if name else None
    if key:
        scheme, _, given = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8", "surrogateescape"), key.encode("utf-8", "surrogateescape")
        ):
            raise Unauthorized("the admin API needs Authorization: Bearer <admin key>")
        return
    why = f"{name} is empty" if name else "server.admin_key_env is not set"
    if not _loopback(request.remote):
        raise Forbidden(f"the admin API answers loopback clients only ({why})")
    forwarded = next((h for h in _FORWARDING if h in request.headers), None)
    if forwarded is not None:
        raise Forbidden(f"the admin API answers direct loopback clients only ({why}); this request carries "
                        f"{forwarded}, so it came through a proxy: set server.admin_key_env to a variable "
                        "holding a key to use the admin API through one")
    browser = _from_a_web_page(request)
    if browser is not None:  # any page the operator's browser opens can reach loopback: it is not the operator
        raise Forbidden(f"the admin API answers direct loopback clients only ({why}); {browser}: set "
                        "server.admin_key_env to a variable holding a key to use it from a browser")


def _from_a_web_page(request: web.Request) -> str | None:
    """Why a loopback request was sent by a web page rather than a tool on this host, or None: a cross-site
    request (``Sec-Fetch-Site``, or an ``Origin`` that is not this host), or a ``Host`` that is not a loopback
    name — a DNS-rebinding page reaches 127.0.0.1 under its own name."""
    site = request.headers.get("Sec-Fetch-Site", "").lower()
    if site in ("cross-site", "same-site"):
        return f"this request came from another site's page (Sec-Fetch-Site: {site})"
    host = request.headers.get(hdrs.HOST, "")
    name = host.rpartition("]")[0].lstrip("[") if host.startswith("[") else host.rpartition(":")[0] or host
    if name and name.lower() != "localhost" and not _loopback(name):
        return f"it names the host {host!r}, not a loopback address (a page that rebound a name to 127.0.0.1)"
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is not None and origin.partition("://")[2] != host:
        return f"it was sent by a page of {origin!r}"
    return None


def guarded(handler: AdminHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Access check, the ``{"success": true, "data": …}`` answer, errors in the envelope dialect."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        rt = request.app[RUNTIME].current
        request_id = request_id_of(request.headers)
        started = time.monotonic()
        error: GatewayError | None = None
        try:
            check_access(request, rt)
            data = await handler(request, rt)
        except GatewayError as e:
            error = e
            resp = _error(e, request_id, rt)
        except Exception:
            log.exception("admin API: internal error", extra={"fields": {"request_id": request_id}})
            error = InternalError("internal error")
            resp = error_response(error, ENVELOPE, request_id)
        else:
            answer = AdminAnswer(True, data, AdminMeta(request_id))
            resp = web.Response(body=msgspec.json.encode(answer), content_type="application/json",
                                headers={"X-Request-Id": request_id, "Cache-Control": "no-store"})
        if rt.access_log.enabled:  # who used the admin API, and who was refused, is on record
            fields = access_fields(request, request_id, "admin", None, None, resp.status, error, StreamOutcome(),
                                   (time.monotonic() - started) * 1000)
            fields["outcome"] = "ok" if error is None else "error"
            fields["path"] = request.path
            if error is not None:
                fields["error_message"] = error.message
            rt.access_log(fields)
        return resp

    return wrapped




def _clean(rt: Runtime, text: str) -> str:
    return hide_userinfo(rt.scrub(text))  # a URL's user:password, as a config error may quote it


def _error(err: GatewayError, request_id: str, rt: Runtime) -> web.Response:
    err.message = _clean(rt, err.message)
    if not isinstance(err, InvalidConfig):
        return error_response(err, ENVELOPE, request_id)
    body = error_body(err, ENVELOPE, request_id, target=None, attempts=0, duration_ms=0.0)
    assert isinstance(body, EnvelopeError)
    body.error.errors = [_clean(rt, line) for line in err.errors]
    return web.Response(status=err.status, body=msgspec.json.encode(body), content_type="application/json",
                        headers={"X-Request-Id": request_id})


# ---------------------------------------------------------------- endpoints


async def summary(request: web.Request, rt: Runtime) -> Summary:
    observatory = request.app[OBSERVATORY]
    snap = await snapshot(observatory, rt)
    targets = msgspec.convert(snap["targets"], list[TargetSummary])  # the status page's fields these name
    totals = Totals(
        requests=sum(observatory.requests.values()),  # refusals before a target was chosen too
        errors=sum(view.errors for view in observatory.targets.values()),
        inflight=sum(observatory.inflight.values()),
        spend_today_usd=round(sum(t.spend_today_usd for t in targets), 8),
        targets=len(targets),
        open_circuits=sum(1 for t in targets if t.circuit != "closed"),
    )
    return Summary(snap["version"], snap["started_at"], snap["uptime_s"], msgspec.convert(snap["store"], StoreState),
                   totals, targets, msgspec.convert(snap["tenants"], list[TenantSummary]))


async def usage(request: web.Request, rt: Runtime) -> UsageReport:
    tenant = request.query.get("tenant") or None
    user = request.query.get("user") or None
    since = since_day(request.query.get("since"))
    await rt.usage_book_flush()  # the counts of the last moments are written first
    found = await usage_summary(rt.store, tenant=tenant, user=user,
                                since_day=since.replace("-", "") if since else None)
    return msgspec.convert({**found, "tenant": tenant, "user": user, "since": since}, UsageReport)


async def cache_stats(request: web.Request, rt: Runtime) -> CacheStats:
    observatory = request.app[OBSERVATORY]
    store_error = None
    try:
        entries, truncated = await cache_policy.count_entries(rt.store)
    except StoreError as e:
        entries, truncated, store_error = {}, False, rt.scrub(str(e))
    targets = []
    for name, target in rt.targets.items():
        cfg = target.config.cache
        hits, misses = observatory.cache_hits.get(name, 0), observatory.cache_misses.get(name, 0)
        targets.append(CacheTarget(
            target=name, enabled=cfg is not None and cfg.enabled, ttl_s=cfg.ttl_s if cfg is not None else None,
            hits=hits, misses=misses, hit_ratio=round(hits / (hits + misses), 4) if hits + misses else None,
            entries=entries.get(name, 0) if store_error is None else None,
        ))
    return CacheStats(targets, sum(entries.values()) if store_error is None else None, truncated, store_error)


async def cache_clear(request: web.Request, rt: Runtime) -> CacheCleared:
    target = request.query.get("target")
    if target is not None:
        if not target:
            raise InvalidRequest("target: name a target, or leave the parameter out to clear every target",
                                 param="target")
        if target not in rt.targets:
            raise UnknownTarget(f"no target named {target!r}", target=None)
    deleted = await cache_policy.clear_entries(rt.store, target)
    log.info("admin: cache cleared (%s): %d entries", target or "all targets", deleted)
    return CacheCleared(target, deleted)


def _circuit_view(name: str, circuit: Any, rt: Runtime) -> CircuitView:
    breaker = circuit.breaker
    view = CircuitView(
        target=name, state=breaker.shown(), failures=breaker.failures, error_threshold=breaker.threshold,
        cooldown_s=breaker.cooldown_s, half_open_max_calls=breaker.half_open_max, probes_in_flight=breaker.probes,
        retry_after_s=None, reopens_at=None,
    )
    if view.state == "open":
        left = breaker.retry_after_s()
        view.retry_after_s = round(left, 3)
        view.reopens_at = datetime.datetime.fromtimestamp(
            rt.clock.time() + left, datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return view


async def circuits(request: web.Request, rt: Runtime) -> Circuits:
    return Circuits([_circuit_view(name, circuit, rt) for name, circuit in rt.circuits.items()])


async def circuit_reset(request: web.Request, rt: Runtime) -> CircuitReset:
    name = request.match_info["target"]
    circuit = rt.circuits.get(name)
    if circuit is None:
        raise UnknownTarget(f"no target named {name!r}")
    was = circuit.state
    shared = await circuit.reset()
    log.info("admin: circuit for target %s reset (was %s)", name, was)
    return CircuitReset(**msgspec.structs.asdict(_circuit_view(name, circuit, rt)), was=was, shared=shared)


async def bans(request: web.Request, rt: Runtime) -> Bans:
    door = rt.guard
    found = door.bans.active() if door is not None and door.bans is not None else []
    now = rt.clock.time()
    return Bans(door is not None and door.bans is not None, [
        BanView(b.subject, datetime.datetime.fromtimestamp(b.until, datetime.UTC).isoformat(timespec="seconds")
                .replace("+00:00", "Z"), round(b.until - now, 1), b.reason) for b in found])


async def ban_lift(request: web.Request, rt: Runtime) -> BanLifted:
    subject = request.match_info["id"]
    door = rt.guard
    if door is None or door.bans is None:
        raise UnknownTarget("no abuse block is configured, so nothing is banned")
    try:
        lifted = await door.bans.lift(subject)
    except StoreError as e:
        raise StoreUnavailable(f"the ban could not be lifted everywhere: {_clean(rt, str(e))}") from None
    if lifted:
        log.info("admin: ban of %s lifted", subject)
    return BanLifted(subject, lifted)


async def reload(request: web.Request, rt: Runtime) -> Reloaded:
    if request.app[RELOADER] is None:
        raise ReloadUnavailable("this gateway was not started from a config it can read again; restart it instead")
    result = await reloading.reload_config(request.app)
    if not result["reloaded"]:
        raise InvalidConfig("the new config is invalid, the running one stays: " + "; ".join(result["errors"]),
                            result["errors"])
    # Under --workers N this process is one of N: it reloads itself here, and its parent sends SIGHUP to every other worker.
    return msgspec.convert({**result, "all_workers": reloading.reload_all_workers()}, Reloaded)


async def _unknown(request: web.Request, rt: Runtime) -> msgspec.Struct:
    raise UnknownTarget(f"no admin endpoint {request.method} {request.path}")


def _wrong_method(allowed: str) -> AdminHandler:
    async def refuse(request: web.Request, rt: Runtime) -> msgspec.Struct:
        raise MethodNotAllowed(f"{request.path} answers {allowed} only", headers={"Allow": allowed})

    return refuse


ROUTES: tuple[tuple[str, str, AdminHandler], ...] = (
    ("GET", "/admin/summary", summary),
    ("GET", "/admin/usage", usage),
    ("GET", "/admin/cache/stats", cache_stats),
    ("DELETE", "/admin/cache", cache_clear),
    ("GET", "/admin/circuits", circuits),
    ("POST", "/admin/circuits/{target}/reset", circuit_reset),
    ("POST", "/admin/reload", reload),
    ("GET", "/admin/bans", bans),
    ("DELETE", "/admin/bans/{id}", ban_lift),
)


def add_routes(app: web.Application) -> None:
    """Before the proxy's catch-all route: every ``/admin`` path is answered here."""
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, guarded(handler))
        app.router.add_route("*", path, guarded(_wrong_method(method)))  # same resource: other methods
    app.router.add_route("*", r"/admin{tail:(/.*)?}", guarded(_unknown))
