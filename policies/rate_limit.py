"""Rate limits: GCRA per client IP, per tenant and per end user (SPEC §5; issue #14 point 4).

Every limit is a GCRA bucket in the store (a Lua script on Redis, reading the Redis
clock), so every instance sharing the store enforces one limit, not one each. All the
limits a request counts against — its tenant's minute, hour and tokens, its user's minute
and hour — are taken in ONE atomic ``Store.take_all``: a request refused by any of them
uses up none of them.

- tenants: ``rate_limit: {rpm, burst, rph, tpm}`` (``rate_limit_rpm: N`` is the seed's
  ``rpm``). ``burst`` is how many may arrive at once (default ``rpm``: a full minute's
  worth, as a token bucket of N refilled at N per minute allows); an hour's bucket holds
  its ``rph``. ``tpm``: estimated tokens per minute on LLM targets — prompt characters / 4
  plus the request's ``max_tokens`` for each of its ``n`` answers — taken before the call.
- users: ``rate_limit: {per_user: {rpm, rph}}`` at the top level (every tenant's users,
  and without tenants everyone's) or in a tenant's ``rate_limit`` (its own users). The
  user is ``X-ReliAPI-User``, else the body's ``user`` / ``user_id``; requests that name no
  user share one bucket, so leaving the user out is not a way around the limit. The user
  is the tenant's word, so a per-user limit shares a tenant's quota fairly among its users;
  the tenant's own limit is what bounds the tenant.
- ``server.rate_limit_per_ip_rpm`` (off by default), with or without tenants: taken at the
  door, before authentication (``gateway.edge.guard``). The IP is the peer's, or with
  ``trust_forwarded_for`` the last ``X-Forwarded-For`` hop.

Tenant and user limits are quotas: they run inside the cache and idempotency policies, so
an answer served from the cache or replayed for an idempotency key uses up none of them.
The per-IP limit guards the door: it runs first (in the edge) and counts every request.

Every response where a limit applies carries ``X-RateLimit-Limit/-Remaining/-Reset``
(the seed's: Reset is an ISO timestamp) of the limit nearest exhaustion, and the IETF
draft's ``RateLimit-Policy`` (every limit) / ``RateLimit``; a refusal is a 429
``rate_limited`` with ``Retry-After`` naming the limit. A refused request never reaches the
upstream, so it can never count against a circuit.

When the store fails, ``store.rate_limit_on_error`` decides: ``local`` (default) keeps
limiting per instance in memory, ``allow`` lets requests through, ``deny`` answers 503.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from gateway.config.tiers import plans
from gateway.errors import GatewayError, RateLimited, StoreUnavailable
from gateway.observe.events import RateLimitRefused, StoreDegraded
from gateway.store import StoreError, Take, TakeResult
from gateway.store.memory import MemoryStore
from policies.usage import user_of

if TYPE_CHECKING:
    from gateway.config.model import Config, UserRateLimit
    from gateway.flow.chain import Handler, Policy
    from gateway.flow.context import Context
    from gateway.flow.exchange import Exchange, Reply
    from gateway.observe.events import Events
    from gateway.state.ahead import Plan
    from gateway.store import Store

log = logging.getLogger("reliapi")
_LOG_EVERY_S = 30.0
_WINDOWS = {1: "second", 60: "minute", 3600: "hour"}
ANONYMOUS = "-"  # the bucket of requests that name no user


class Limit:
    """One GCRA limit: ``quota`` units per ``window_s``, at most ``capacity`` at once; its buckets
    are the store keys ``key + who``."""

    __slots__ = ("name", "key", "quota", "window_s", "capacity", "rate_per_s", "burst", "unit", "per_user")

    def __init__(self, name: str, key: str, quota: float, window_s: int = 60, capacity: int | None = None,
                 unit: str = "requests", *, per_user: bool = False) -> None:
        self.name = name  # the RateLimit-Policy item, the refusal event's ``limit``
        self.key = key
        self.quota = quota
        self.window_s = window_s
        self.capacity = capacity or math.ceil(quota)
        self.rate_per_s = quota / window_s
        self.burst = self.capacity - 1  # redis-cell's max_burst: capacity = burst + 1
        self.unit = unit
        self.per_user = per_user

    def policy_item(self) -> str:
        unit = "" if self.unit == "requests" else f';reliapi-unit="{self.unit}"'
        burst = "" if self.capacity == self.quota else f";reliapi-burst={self.capacity}"
        return f'"{self.name}";q={round(self.quota)};w={self.window_s}{burst}{unit}'

    def describe(self) -> str:
        return f"{self.quota:g} {self.unit} per {_WINDOWS[self.window_s]}{' per user' if self.per_user else ''}"

    def take(self, who: str, quantity: int) -> Take:
        return Take(self.key + who, self.rate_per_s, self.burst, quantity)


class Limits:
    """Every limit one kind of caller counts against, and the ``RateLimit-Policy`` naming them."""

    __slots__ = ("limits", "policy_header", "per_user")

    def __init__(self, limits: Sequence[Limit]) -> None:
        self.limits = tuple(limits)
        self.policy_header = ", ".join(lim.policy_item() for lim in self.limits)
        self.per_user = any(lim.per_user for lim in self.limits)

    def __bool__(self) -> bool:
        return bool(self.limits)


def per_ip_limits(rpm: int) -> Limits:
    return Limits([Limit("ip", "rl:", rpm)])


def user_limits(per_user: UserRateLimit | None) -> list[Limit]:
    if per_user is None:
        return []
    minute = [Limit("user", "rlu:", per_user.rpm, per_user=True)] if per_user.rpm else []
    hour = [Limit("user-hourly", "rluh:", per_user.rph, 3600, per_user=True)] if per_user.rph else []
    return minute + hour


DEFAULT_BURST_SIZE = 5


def qps_limit(qps: float, burst_size: int | None) -> Limit:
    """A client profile's ``max_qps_per_tenant``: per second, or per minute when that is not a whole number
    (the ``RateLimit-Policy`` quota is an integer)."""
    capacity = burst_size or DEFAULT_BURST_SIZE
    if float(qps).is_integer():
        return Limit("qps", "rlq:", int(qps), 1, capacity)
    return Limit("qps", "rlq:", qps * 60, 60, capacity)


def quota_limits(config: Config, tenants_enabled: bool) -> dict[str | None, Limits]:
    """The quotas by tenant plan (``None``: the gateway without tenants); a caller without an entry has none.
    A tenant's: its ``rate_limit`` (its tier's fields filled in, ``gateway.config.tiers``) and its client
    profile's ``max_qps_per_tenant``; its users' per-user limits. A marketplace tier's under ``tier:<name>``."""
    everyone = config.rate_limit.per_user
    if not tenants_enabled:
        found = Limits(user_limits(everyone))
        return {None: found} if found else {}
    out: dict[str | None, Limits] = {}
    for tenant in plans(config):
        rl = tenant.rate_limit
        own: list[Limit] = []
        if rl is not None:
            own += [Limit("default", "rl:", rl.rpm, capacity=rl.burst)] if rl.rpm else []
            own += [Limit("burst", "rlb:", rl.rps, 1)] if rl.rps else []
            own += [Limit("hourly", "rlh:", rl.rph, 3600)] if rl.rph else []
            own += [Limit("tokens", "rlt:", rl.tpm, unit="tokens")] if rl.tpm else []
        profile = config.client_profiles.get(tenant.profile) if tenant.profile is not None else None
        if profile is not None and profile.max_qps_per_tenant is not None:
            own.append(qps_limit(profile.max_qps_per_tenant, profile.burst_size))
        found = Limits(own + user_limits(rl.per_user if rl is not None and rl.per_user is not None else everyone))
        if found:
            out[tenant.name] = found
    return out


def buckets(limits: Limits, tenant: str | None, user: str | None) -> list[tuple[Limit, str]]:
    """Each limit with whose bucket it is: the tenant's, or the user's within the tenant. The braces
    are a Redis Cluster hash tag: one request's buckets share a slot, so one script can take them all."""
    scope = "{tenant:" + tenant + "}" if tenant is not None else "{-}"
    user_scope = f"{scope}:user:{user or ANONYMOUS}"
    return [(lim, user_scope if lim.per_user else scope) for lim in limits.limits]


def estimate_tokens(ex: Exchange) -> int:
    """A cheap upper-ish estimate: prompt characters / 4 plus what the answers may use — each of ``n`` (n=128 is
    128 answers); a request that sets no limit counts the target's ``llm.max_tokens`` when it has one."""
    limit = ex.max_tokens
    if limit is None:
        llm = ex.target.config.llm
        limit = llm.max_tokens if llm is not None and llm.max_tokens else 0
    return len(ex.body) // 4 + limit * ex.choices


def policy(ctx: Context, plan_ahead: Plan) -> Policy | None:
    """The quotas: a tenant's limits and its users' — inside the cache, so a hit or a replay is free. ``plan_ahead``:
    its takes, for a flight outside to send with its claims (``gateway.state.ahead``)."""
    by_tenant = quota_limits(ctx.config, ctx.tenants.enabled)
    if not by_tenant:
        return None
    limiter = Limiter(ctx.store, ctx.config.store.rate_limit_on_error, ctx.clock.time)
    events = ctx.events

    def limits_of(ex: Exchange) -> tuple[Limits, list[tuple[Limit, str]]] | None:
        limits = by_tenant.get(ex.account.plan if ex.account is not None else None)
        if limits is None:
            return None
        return limits, buckets(limits, ex.tenant, user_of(ex) if limits.per_user else None)

    def plan(ex: Exchange) -> tuple[Any, list[Take]] | None:
        found = limits_of(ex)
        if found is None:
            return None
        limits, which = found
        chosen = limiter.choose(ex, which)
        return ((limits, chosen), [lim.take(who, quantity) for lim, who, quantity in chosen]) if chosen else None

    plan_ahead.takes = plan

    async def rate_limit(ex: Exchange, call_next: Handler) -> Reply:
        ahead = ex.ahead
        if ahead is not None and ahead.chosen is not None:  # taken with the claims outside (gateway.state.ahead)
            (limits, chosen), ahead.chosen = ahead.chosen, None
            return await limiter.around(ex, call_next, limits, chosen, events, taken=ahead.taken)
        found = limits_of(ex)
        if found is None:
            return await call_next(ex)
        limits, which = found
        return await limiter.around(ex, call_next, limits, limiter.choose(ex, which), events)

    return rate_limit


Chosen = list[tuple[Limit, str, int]]  # the limits a request takes from: (limit, whose bucket, quantity)


class Limiter:
    def __init__(self, store: Store, on_error: str, now: Callable[[], float] = time.time) -> None:
        self.store = store
        self.now = now
        self.on_error = on_error
        self.local = MemoryStore(clock=now)  # per-instance limits while the shared store is down
        self._logged_at = -_LOG_EVERY_S
        self.failed: str | None = None  # the last store error, for the policy to report once

    async def around(self, ex: Exchange, call_next: Handler, limits: Limits, chosen: Chosen,
                     events: Events, *, taken: list[TakeResult] | None = None) -> Reply:
        """Take (or judge what was ``taken`` already), run the rest of the flow, and put the limit headers on
        whatever it answers."""
        try:
            headers = self.judge(limits, chosen, taken) if taken is not None else await self.check(limits, chosen)
        except RateLimited as refused:
            events.emit(RateLimitRefused(target=ex.target.name, tenant=ex.tenant,
                                         limit=getattr(refused, "limit_name", "default")))
            raise
        if self.failed is not None:
            events.emit(StoreDegraded(target=ex.target.name, policy="rate_limit", error=self.failed))
            self.failed = None
        try:
            reply = await call_next(ex)
        except GatewayError as e:
            merge_headers(e.headers, headers)
            raise
        merge_headers(reply.headers, headers)
        return reply

    @staticmethod
    def choose(ex: Exchange | None, which: list[tuple[Limit, str]]) -> Chosen:
        """What to take from each limit. ``ex`` None: before the request was read (the per-IP limit at the
        door), so no token limits."""
        return [(lim, who, estimate_tokens(ex) if lim.unit == "tokens" else 1) for lim, who in which  # type: ignore[arg-type]
                if lim.unit != "tokens" or (ex is not None and ex.target.kind == "llm")]

    async def check(self, limits: Limits, chosen: Chosen) -> dict[str, str]:
        """Take from every limit at once; the headers describing the tightest, or raise ``RateLimited``."""
        if not chosen:
            return {}
        results = await self._take_all([lim.take(who, quantity) for lim, who, quantity in chosen])
        if results is None:
            return {}
        return self.judge(limits, chosen, results)

    def judge(self, limits: Limits, chosen: Chosen, results: list[TakeResult]) -> dict[str, str]:
        """The headers of the limit nearest exhaustion, or ``RateLimited`` for the one refused longest."""
        refused = [(r.retry_after_s, i) for i, r in enumerate(results) if not r.allowed]
        if refused:
            _, i = max(refused)  # the one that keeps it waiting longest
            raise self._refusal(limits, chosen[i], results[i])
        # show whichever limit is nearest exhaustion (as a share: the units differ)
        i = 0 if len(results) == 1 else min(range(len(results)), key=lambda i: results[i].remaining / results[i].limit)
        return _headers(limits, chosen[i][0], results[i], self.now())

    async def _take_all(self, takes: list[Take]) -> list[TakeResult] | None:
        try:
            return await self.store.take_all(takes)
        except StoreError as e:
            self.failed = str(e)
            now = time.monotonic()
            if now - self._logged_at >= _LOG_EVERY_S:
                self._logged_at = now
                log.warning("rate limit: store unavailable, %s: %s", {
                    "local": "limiting per instance", "allow": "not limiting", "deny": "refusing"}[self.on_error], e)
            if self.on_error == "allow":
                return None
            if self.on_error == "deny":
                raise StoreUnavailable("rate limit store unavailable; try again shortly", retry_after=1.0) from None
            return await self.local.take_all(takes)

    def _refusal(self, limits: Limits, chosen: tuple[Limit, str, int], result: TakeResult) -> RateLimited:
        limit, _, quantity = chosen
        headers = _headers(limits, limit, result, self.now())
        if math.isinf(result.retry_after_s):
            what = f"tokens ({quantity} estimated)" if limit.unit == "tokens" else limit.unit
            refused = RateLimited(
                f"rate limit exceeded: this request's {what} is larger than the limit of {limit.capacity} "
                f"{limit.unit} and can never be allowed", headers=headers)
        else:
            refused = RateLimited(
                f"rate limit exceeded ({limit.describe()}); retry after {math.ceil(result.retry_after_s)}s",
                retry_after=result.retry_after_s, headers=headers)
        refused.limit_name = limit.name  # type: ignore[attr-defined]
        return refused


def _headers(limits: Limits, limit: Limit, result: TakeResult, now: float) -> dict[str, str]:
    wait = result.reset_after_s if result.allowed else result.retry_after_s
    t = 0 if math.isinf(wait) else math.ceil(wait)
    return {
        "X-RateLimit-Limit": str(result.limit),
        "X-RateLimit-Remaining": str(result.remaining),
        "X-RateLimit-Reset": _reset_at(int(round(now + result.reset_after_s, 6))),  # (to the µs first, as datetime does)
        "RateLimit-Policy": limits.policy_header,
        "RateLimit": f'"{limit.name}";r={result.remaining};t={t}',
    }


@functools.lru_cache(maxsize=64)
def _reset_at(second: int) -> str:
    """ISO 8601 UTC to the second (``X-RateLimit-Reset``): every request in one second gets the same
    few values, so they are formatted once (datetime formatting is most of what a header costs)."""
    return datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def merge_headers(into: dict[str, str], ours: dict[str, str]) -> None:
    """Put a limit's headers on an answer that may carry another's already (the per-IP limit outside a
    gateway-wide per-user one): the policies are joined, the limit nearer exhaustion is the one shown."""
    if not ours:
        return
    theirs = into.get("RateLimit-Policy")
    if theirs is None:
        into.update(ours)
        return
    policy_header = f"{theirs}, {ours['RateLimit-Policy']}"
    if _share(ours) < _share(into):
        into.update(ours)
    into["RateLimit-Policy"] = policy_header


def _share(headers: dict[str, str]) -> float:
    try:
        return int(headers["X-RateLimit-Remaining"]) / int(headers["X-RateLimit-Limit"])
    except (KeyError, ValueError, ZeroDivisionError):
        return 1.0
