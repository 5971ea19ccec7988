"""The door of the proxied surfaces: what is decided from the caller's address before anything else
(run by ``gateway.edge.serve``, for each proxied request, when configured).

Before authentication and before the body is read (``admit``):

1. bans (``policies.abuse``): a banned IP or fingerprint is refused ``403`` at once;
2. an address that has used up its failed-authentication budget (``server.auth_failures_per_ip_rpm``:
   a GCRA bucket per IP in the store, taken on each 401) is refused ``429`` without its key being
   looked at, until the bucket lets one more try through — key guessing is throttled fleet-wide;
3. the per-IP limit (``server.rate_limit_per_ip_rpm``), with or without tenants: every request
   counts, a cache hit too; its headers go on the answer (``X-RateLimit-*``, ``RateLimit*``).

After authentication (``authenticated``): a banned tenant key is refused, and anomalies are observed.
After the answer (``answered``): a refusal for the caller's behaviour is a violation of its subjects,
and a failed authentication is taken from its address's budget — in the background, never delaying
the answer. A gateway with none of this configured has no guard (``Guard.of`` is None): it costs nothing.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import hdrs

from gateway.errors import GatewayError, InvalidRequest, KeysExhausted, RateLimited, Unauthorized
from gateway.observe.events import RateLimitRefused
from gateway.store import StoreError
from policies.abuse import Anomalies, AnomalyThrottled, BannedError, Bans, fingerprint
from policies.rate_limit import Limiter, per_ip_limits

if TYPE_CHECKING:
    from aiohttp import web

    from gateway.flow.context import Context

log = logging.getLogger("reliapi")


class Call(Protocol):
    """What the door reads and notes of a request (``gateway.edge.call.Call``)."""

    request: web.Request
    tenant: str | None
    ip: str | None  # the client's address, as the edge decided it (``trust_forwarded_for``)
    exempt: bool
    fingerprint: str | None
    limit_headers: dict[str, str] | None


class AuthFailuresLimited(RateLimited):
    """An address over its budget of failed authentications."""


class Guard:
    def __init__(self, ctx: Context) -> None:
        config = ctx.config
        self.store = ctx.store
        self.shared = ctx.shared
        self.clock = ctx.clock
        self.events = ctx.events
        rpm = config.server.rate_limit_per_ip_rpm
        self.per_ip = per_ip_limits(rpm) if rpm else None
        self.limiter = Limiter(ctx.store, config.store.rate_limit_on_error, ctx.clock.time)
        self.auth_rpm = config.server.auth_failures_per_ip_rpm if ctx.tenants.enabled else None
        self.locked: dict[str, float] = {}  # ip → wall time its next authentication may be tried
        abuse = config.abuse
        self.subjects = set(abuse.subjects) if abuse is not None else set()
        self.bans = Bans(abuse, ctx.clock, ctx.events, ctx.shared) if abuse is not None else None
        self.anomalies = Anomalies(abuse.anomalies, ctx.clock, ctx.events) \
            if abuse is not None and abuse.anomalies is not None and ctx.tenants.enabled else None
        if self.auth_rpm is not None:
            ctx.shared.on("auth-failures", self._on_locked, _nothing)

    @classmethod
    def of(cls, ctx: Context) -> Guard | None:
        config = ctx.config
        if not (config.server.rate_limit_per_ip_rpm or config.abuse is not None or ctx.tenants.enabled):
            return None
        return cls(ctx)

    # -- before and after authentication ------------------------------------------------------

    async def admit(self, call: Call) -> None:
        ip = client_block(call.ip)  # (an IPv6 client counts by its /64)
        exempt = self.bans is None or self.bans.allowed(ip)
        call.exempt = exempt
        if not exempt:
            self.bans.check(self._subjects(call, before_auth=True))  # type: ignore[union-attr]
        if self.auth_rpm is not None and call.ip is not None and self.locked:
            until = self.locked.get(ip)
            if until is not None:
                wait = until - self.clock.time()
                if wait > 0:
                    raise AuthFailuresLimited(
                        f"too many failed authentications from this address; retry after {math.ceil(wait)}s",
                        retry_after=wait)
                del self.locked[ip]
        if self.per_ip is not None:
            limits = self.per_ip
            try:
                call.limit_headers = await self.limiter.check(limits, Limiter.choose(None, [(limits.limits[0], "ip:" + ip)]))
            except RateLimited:
                self.events.emit(RateLimitRefused(target="", tenant=None, limit="default"))
                raise

    def authenticated(self, call: Call) -> None:
        if call.tenant is None:
            return
        if not call.exempt and "key" in self.subjects:
            self.bans.check(["key:" + call.tenant])  # type: ignore[union-attr]
        if self.anomalies is not None:
            self.anomalies.observe(call.tenant, self._fingerprint(call))

    def answered(self, call: Call, error: GatewayError | None) -> None:
        if error is None or isinstance(error, (BannedError, KeysExhausted)):
            return
        reason = _violation(error)
        if reason is None:
            return
        if isinstance(error, Unauthorized) and self.auth_rpm is not None and call.ip is not None:
            self.shared.spawn(self._failed_authentication(client_block(call.ip)), "auth failures")
        if self.bans is not None and not call.exempt:
            subjects = self._subjects(call, before_auth=False)
            if subjects:
                self.shared.spawn(self.bans.violation(subjects, reason), "abuse")

    # -- helpers ---------------------------------------------------------------------------------

    def _subjects(self, call: Call, *, before_auth: bool) -> list[str]:
        subjects = self.subjects
        out = []
        if "ip" in subjects and call.ip:
            out.append("ip:" + client_block(call.ip))
        if "fingerprint" in subjects:
            out.append("fp:" + self._fingerprint(call))
        if not before_auth and "key" in subjects and call.tenant is not None:
            out.append("key:" + call.tenant)
        return out

    def _fingerprint(self, call: Call) -> str:
        found = call.fingerprint
        if found is None:
            headers = call.request.headers
            key = headers.get(hdrs.AUTHORIZATION) or headers.get("X-API-Key")
            found = call.fingerprint = fingerprint(call.ip, headers.get(hdrs.USER_AGENT), key)
        return found

    async def _failed_authentication(self, ip: str) -> None:
        rpm = self.auth_rpm
        assert rpm is not None
        try:
            got = await self.store.take("authfail:" + ip, rate_per_s=rpm / 60.0, burst=rpm - 1)
        except StoreError as e:
            log.warning("auth failures: store unavailable, not counted: %s", e)
            return
        if not got.allowed or got.remaining == 0:  # the budget is spent: the next try waits for its token
            interval = 60.0 / rpm
            wait = got.retry_after_s if not got.allowed else max(interval, got.reset_after_s - interval * (rpm - 1))
            until = self.clock.time() + wait
            self.locked[ip] = until
            self.shared.publish("auth-failures", {"ip": ip, "until": until})

    def _on_locked(self, message: dict[str, Any]) -> None:
        ip, until = message.get("ip"), message.get("until")
        if isinstance(ip, str) and isinstance(until, (int, float)) and math.isfinite(until):
            self.locked[ip] = max(self.locked.get(ip, 0.0), until)


_BLOCKS: dict[str | None, str] = {}


def client_block(ip: str | None) -> str:
    """What per-IP limits, bans and the failed-authentication lock count by: an IPv4 address, an IPv6 address's /64
    (one subscriber's network — a client given a /64 has 2^64 addresses to walk round a per-address limit with),
    ``-`` for none. ``ip`` is canonical (``gateway.edge.requests.canonical_ip``)."""
    found = _BLOCKS.get(ip)
    if found is None:
        found = str(ipaddress.IPv6Network(ip + "/64", strict=False)) if ip and ":" in ip else ip or "-"
        if len(_BLOCKS) >= 4096:  # bounded whatever addresses arrive
            _BLOCKS.clear()
        _BLOCKS[ip] = found
    return found


def _violation(error: GatewayError) -> str | None:
    """Why a refusal counts against its caller, or None when it does not (an upstream's failure, a store outage)."""
    if isinstance(error, (RateLimited, AnomalyThrottled)):
        return "rate_limited"
    if isinstance(error, Unauthorized):
        return "unauthorized"
    if isinstance(error, InvalidRequest):
        return "invalid_request"
    return None


async def _nothing() -> None:
    return None

