"""Client profiles (the wiki's ``client_profiles``; issue #14 point 5): per-tenant constraints, by name.

A tenant with ``profile: NAME`` gets that profile's:

- ``max_parallel_requests``: at most this many of the tenant's requests in flight at once in
  one gateway process (a stream holds its place until it ends). One more is refused at once —
  429 ``too_many_parallel_requests`` with ``Retry-After: 1``, never queued: a queue in front of
  a tenant's own concurrency only adds latency to the requests it already has waiting. Counted
  per process, like the targets' ``max_concurrency`` (with N instances a tenant may have N×).
- ``default_timeout_s``: the tenant's request must have its answer (a stream: its first byte)
  within this, across every retry and fallback; each attempt's own timeout still applies within
  it. Past it, 504 ``deadline_exceeded``: the client's deadline, not the target's failure — it
  neither counts against a circuit nor moves to a fallback.
- ``max_qps_per_tenant`` with ``burst_size``: taken with the tenant's other quotas, in the store
  (every instance shares it): ``policies.rate_limit``.
- ``max_qps_per_provider_key``: the tenant's use of each upstream key, in the store:
  ``policies.key_pool``.

Like the quotas, this runs inside the cache and idempotency: a hit or a replay holds no place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.errors import ParallelLimited
from gateway.observe.events import RateLimitRefused

if TYPE_CHECKING:
    from gateway.config.model import ClientProfile, Config
    from gateway.flow.chain import Handler, Policy
    from gateway.flow.context import Context
    from gateway.flow.exchange import Exchange, Reply


def by_tenant(config: Config) -> dict[str, ClientProfile]:
    """Each tenant's profile, for the tenants that have one."""
    return {t.name: config.client_profiles[t.profile] for t in config.tenants if t.profile is not None}


class InFlight:
    """One tenant's requests in flight in this process."""

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = 0

    def release(self, _error: BaseException | None = None) -> None:
        self.active -= 1


def parallel_limited(ctx: Context) -> frozenset[str]:
    """The tenants whose requests this policy may refuse (a limit on parallel requests): their quota is not taken
    before it has passed them (``gateway.state.ahead``)."""
    if not ctx.tenants.enabled:
        return frozenset()
    return frozenset(name for name, p in by_tenant(ctx.config).items() if p.max_parallel_requests is not None)


def policy(ctx: Context) -> Policy | None:
    profiles = by_tenant(ctx.config) if ctx.tenants.enabled else {}
    limits = {name: (p.max_parallel_requests, p.default_timeout_s) for name, p in profiles.items()}
    if not limits:
        return None
    in_flight = {name: InFlight() for name in limits}
    clock, events = ctx.clock, ctx.events

    async def client_profile(ex: Exchange, call_next: Handler) -> Reply:
        found = limits.get(ex.tenant)  # type: ignore[arg-type]
        if found is None:
            return await call_next(ex)
        most, timeout_s = found
        slots = in_flight[ex.tenant]  # type: ignore[index]
        if slots.active >= most:
            events.emit(RateLimitRefused(target=ex.target.name, tenant=ex.tenant, limit="parallel"))
            raise ParallelLimited(f"too many parallel requests: this client may have {most} in flight at once",
                                  retry_after=1)
        if timeout_s is not None:
            ex.client_deadline = clock.monotonic() + timeout_s
        slots.active += 1
        try:
            reply = await call_next(ex)
        except BaseException:
            slots.active -= 1
            raise
        finally:
            ex.client_deadline = None
        reply.on_close(slots.release)  # a stream keeps its place until it ends
        return reply

    return client_profile
