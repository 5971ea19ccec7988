"""Rate limits: GCRA per tenant, or per client IP when there are no tenants (SPEC §5).

One atomic ``Store.take`` per limit and request (a Lua script on Redis, reading the
Redis clock), so every instance sharing the store enforces one limit, not one each.

- ``rate_limit_rpm: N`` / ``rate_limit: {rpm: N}``: N requests per minute. ``burst``
  is how many may arrive at once (default N: a full minute's worth, as a token bucket
  of N refilled at N per minute would allow).
- ``tpm``: estimated tokens per minute on LLM targets — prompt characters / 4 plus the
  request's ``max_tokens`` — taken before the call.
- ``server.rate_limit_per_ip_rpm`` when no tenants are configured (off by default). The
  IP is the peer's, or with ``trust_forwarded_for`` the last ``X-Forwarded-For`` hop.

Every response where a limit applies carries ``X-RateLimit-Limit/-Remaining/-Reset``
(the seed's: Reset is an ISO timestamp) and the IETF draft's ``RateLimit-Policy`` /
``RateLimit``; a refusal is a 429 ``rate_limited`` with ``Retry-After``. A refused
request never reaches the upstream, so it can never count against a circuit.

When the store fails, ``store.rate_limit_on_error`` decides: ``local`` (default) keeps
limiting per instance in memory, ``allow`` lets requests through, ``deny`` answers 503.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from gateway.errors import GatewayError, RateLimited, StoreUnavailable
from gateway.observe.events import RateLimitRefused, StoreDegraded
from gateway.store import StoreError, TakeResult
from gateway.store.memory import MemoryStore

if TYPE_CHECKING:
    from gateway.config.model import Config
    from gateway.flow.chain import Handler, Policy
    from gateway.flow.context import Context
    from gateway.flow.exchange import Exchange, Reply
    from gateway.store import Store

log = logging.getLogger("reliapi")
_LOG_EVERY_S = 30.0


class Limit:
    """One GCRA limit: ``quota`` units per ``window_s``, at most ``capacity`` at once."""

    __slots__ = ("name", "quota", "capacity", "rate_per_s", "burst", "unit")

    def __init__(self, name: str, per_minute: int, capacity: int | None, unit: str = "requests") -> None:
        self.name = name
        self.quota = per_minute
        self.capacity = capacity or per_minute
        self.rate_per_s = per_minute / 60.0
        self.burst = self.capacity - 1  # redis-cell's max_burst: capacity = burst + 1
        self.unit = unit

    def policy_item(self) -> str:
        unit = "" if self.unit == "requests" else f';reliapi-unit="{self.unit}"'
        burst = "" if self.capacity == self.quota else f";reliapi-burst={self.capacity}"
        return f'"{self.name}";q={self.quota};w=60{burst}{unit}'


class Limits:
    __slots__ = ("requests", "tokens", "policy_header")

    def __init__(self, requests: Limit | None, tokens: Limit | None) -> None:
        self.requests = requests
        self.tokens = tokens
        self.policy_header = ", ".join(lim.policy_item() for lim in (requests, tokens) if lim is not None)


def tenant_limits(config: Config) -> dict[str, Limits]:
    out = {}
    for tenant in config.tenants:
        rl = tenant.rate_limit
        if rl is None or (rl.rpm is None and rl.tpm is None):
            continue
        requests = Limit("default", rl.rpm, rl.burst) if rl.rpm else None
        tokens = Limit("tokens", rl.tpm, None, unit="tokens") if rl.tpm else None
        out[tenant.name] = Limits(requests, tokens)
    return out


def estimate_tokens(ex: Exchange) -> int:
    """A cheap upper-ish estimate: prompt characters / 4 plus what the answer may use."""
    return len(ex.body) // 4 + (ex.max_tokens or 0)


def policy(ctx: Context) -> Policy | None:
    server = ctx.config.server
    per_tenant = tenant_limits(ctx.config) if ctx.tenants.enabled else {}
    per_ip = Limits(Limit("default", server.rate_limit_per_ip_rpm, None), None) \
        if not ctx.tenants.enabled and server.rate_limit_per_ip_rpm else None
    if not per_tenant and per_ip is None:
        return None
    limiter = Limiter(ctx.store, ctx.config.store.rate_limit_on_error, ctx.clock.time)
    events = ctx.events

    async def rate_limit(ex: Exchange, call_next: Handler) -> Reply:
        if per_ip is not None:
            limits, who = per_ip, "ip:" + (ex.client_ip or "-")
        else:
            limits = per_tenant.get(ex.tenant)  # type: ignore[arg-type]
            if limits is None:
                return await call_next(ex)
            who = "tenant:" + ex.tenant  # type: ignore[operator]
        try:
            headers = await limiter.check(ex, limits, who)
        except RateLimited as refused:
            events.emit(RateLimitRefused(target=ex.target.name, tenant=ex.tenant, limit=getattr(refused, "limit_name", "default")))
            raise
        if limiter.failed is not None:
            events.emit(StoreDegraded(target=ex.target.name, policy="rate_limit", error=limiter.failed))
            limiter.failed = None
        try:
            reply = await call_next(ex)
        except GatewayError as e:
            e.headers.update(headers)
            raise
        reply.headers.update(headers)
        return reply

    return rate_limit


class Limiter:
    def __init__(self, store: Store, on_error: str, now: Callable[[], float] = time.time) -> None:
        self.store = store
        self.now = now
        self.on_error = on_error
        self.local = MemoryStore(clock=now)  # per-instance limits while the shared store is down
        self._logged_at = -_LOG_EVERY_S
        self.failed: str | None = None  # the last store error, for the policy to report once

    async def check(self, ex: Exchange, limits: Limits, who: str) -> dict[str, str]:
        """Take from each limit; the headers describing the tightest, or raise ``RateLimited``."""
        shown: tuple[Limit, TakeResult] | None = None
        if limits.requests is not None:
            result = await self._take("rl:" + who, limits.requests, 1)
            if result is not None:
                shown = (limits.requests, result)
                if not result.allowed:
                    raise self._refusal(limits, shown, "requests")
        if limits.tokens is not None and ex.target.kind == "llm":
            quantity = estimate_tokens(ex)
            result = await self._take("rlt:" + who, limits.tokens, quantity)
            if result is not None:
                # show whichever limit is nearer exhaustion (as a share: the units differ)
                if shown is None or not result.allowed or \
                        result.remaining / result.limit < shown[1].remaining / shown[1].limit:
                    shown = (limits.tokens, result)
                if not result.allowed:
                    raise self._refusal(limits, shown, f"tokens ({quantity} estimated)")
        return _headers(limits, *shown, self.now()) if shown is not None else {}

    async def _take(self, key: str, limit: Limit, quantity: int) -> TakeResult | None:
        try:
            return await self.store.take(key, rate_per_s=limit.rate_per_s, burst=limit.burst, quantity=quantity)
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
            return await self.local.take(key, rate_per_s=limit.rate_per_s, burst=limit.burst, quantity=quantity)

    def _refusal(self, limits: Limits, shown: tuple[Limit, TakeResult], what: str) -> RateLimited:
        limit, result = shown
        headers = _headers(limits, limit, result, self.now())
        if math.isinf(result.retry_after_s):
            refused = RateLimited(
                f"rate limit exceeded: this request's {what} is larger than the limit of {limit.capacity} "
                f"{limit.unit} and can never be allowed", headers=headers)
        else:
            refused = RateLimited(
                f"rate limit exceeded ({limit.quota} {limit.unit} per minute); retry after "
                f"{math.ceil(result.retry_after_s)}s", retry_after=result.retry_after_s, headers=headers)
        refused.limit_name = limit.name  # type: ignore[attr-defined]
        return refused


def _headers(limits: Limits, limit: Limit, result: TakeResult, now: float) -> dict[str, str]:
    wait = result.reset_after_s if result.allowed else result.retry_after_s
    t = 0 if math.isinf(wait) else math.ceil(wait)
    reset_at = datetime.fromtimestamp(now + result.reset_after_s, UTC)
    return {
        "X-RateLimit-Limit": str(result.limit),
        "X-RateLimit-Remaining": str(result.remaining),
        "X-RateLimit-Reset": reset_at.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "RateLimit-Policy": limits.policy_header,
        "RateLimit": f'"{limit.name}";r={result.remaining};t={t}',
    }
