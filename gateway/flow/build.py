"""The request flow, put together once per config: every policy built exactly once.

    (the door, policies.door: bans, per-IP limit, failed authentications — in the edge, before the body)
    client request ─▶ tenant access ▶ tier ▶ budget ▶ idempotency ▶ cache ▶ profile ▶ quotas ▶ usage ▶ router
                                                                                                              │
                 ┌──────────────── for the target, then each fallback ──────────────────────────────────────┘
                 ▼
        bulkhead ▶ retry (total deadline) ▶ ┊ circuit breaker ▶ key pool ▶ send (upstream)
                                            ┊ └──────────── once per attempt ───────────┘

``request_policies`` run once per client request, outermost first; the router
(``policies.fallback``) ends that chain: it runs the chain of whichever target the
exchange points at, and on a failure the next target of its fallback chain.
``target_policies`` run for each target tried; everything after ``retry`` runs per
attempt, so the circuit breaker gates and counts each attempt (an open circuit stops the
retries too) and the key pool picks a key for each. This is the order of .NET's standard
resilience pipeline (bulkhead → total timeout → retry → circuit breaker → attempt timeout)
and how Envoy counts outlier failures — per upstream answer, not per client request.

A factory returns None when it has nothing to do (no ``max_concurrency``, a single key, no
cache), so a request pays only for what its target uses. What a factory owns — a circuit, a
key pool, something to close or flush — it returns, and ``Owned`` keeps it for the runtime
(admin API, metrics, status page, shutdown). Add a policy to one of the two lists below; the
request id, authentication, errors and the access log are the HTTP edge's
(``gateway.edge``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from gateway.flow.chain import Handler, Policy, compose
from gateway.flow.send import upstream_sender
from gateway.state.ahead import Plan
from policies import (
    budget,
    bulkhead,
    cache,
    circuit_breaker,
    fallback,
    idempotency,
    key_pool,
    profiles,
    rate_limit,
    retry,
    tenants,
    tiers,
    usage,
)

if TYPE_CHECKING:
    from gateway.flow.context import Context
    from gateway.scrub import Scrubber
    from gateway.upstream.targets import Target
    from policies.circuit_breaker import SharedCircuit
    from policies.key_pool import KeyPool
    from policies.usage import UsageBook

T = TypeVar("T")


async def _nothing() -> None:
    return None


class Owned:
    """What the policies of one runtime own, by kind."""

    def __init__(self) -> None:
        self.circuits: dict[str, SharedCircuit] = {}  # by target
        self.key_pools: dict[str, KeyPool] = {}  # by target, for targets with a pool or QPS limits
        self.closers: list[Callable[[], Awaitable[None]]] = []  # last writes, in order, when the runtime closes
        self.usage_flush: Callable[[], Awaitable[None]] = _nothing  # write the usage counts now (reports)

    def closing(self, built: tuple[Policy, Any] | None) -> Policy | None:
        """A policy whose state (``built[1]``) has a ``close()`` to run when the runtime closes."""
        if built is None:
            return None
        policy, state = built
        self.closers.append(state.close)
        return policy

    def usage(self, built: tuple[Policy, UsageBook] | None) -> Policy | None:
        if built is None:
            return None
        policy, book = built
        self.usage_flush = book.flush
        self.closers.append(book.close)
        return policy

    def circuit(self, target: Target, built: tuple[Policy, SharedCircuit]) -> tuple[Policy, SharedCircuit]:
        self.circuits[target.name] = built[1]
        return built

    def key_pool(self, target: Target, built: tuple[Policy, KeyPool] | None) -> Policy | None:
        if built is None:
            return None
        self.key_pools[target.name] = built[1]
        return built[0]


def request_policies(ctx: Context, owned: Owned) -> list[Policy | None]:
    """Once per client request, outermost first (the router follows the last). ``ahead``: how the cache and the
    quotas ask the store, for the flights outside them to ask with their own claim (one round trip)."""
    ahead = Plan(ctx.store)
    ahead.parallel = profiles.parallel_limited(ctx)
    return [
        tenants.policy(ctx),
        tiers.policy(ctx),  # what the tenant's tier does not allow: refused before the store or upstream
        budget.policy(ctx),
        owned.closing(idempotency.policy(ctx, ahead)),  # a no-op step for a request without a key
        owned.closing(cache.policy(ctx, ahead)),
        budget.guard(ctx),  # the budget's refusal of a request neither a replay nor a cache hit answered
        profiles.policy(ctx),  # a tenant's requests in flight and its deadline (a refusal here takes no quota)
        rate_limit.policy(ctx, ahead),  # a tenant's and its users' quotas: inside the cache, a hit or a replay is free
        tenants.provider_limits(ctx),  # inside the quotas: it drops the provider's x-ratelimit-*, not ours
        owned.usage(usage.policy(ctx)),  # inside the cache: a hit or a replay is not usage
    ]


def target_policies(ctx: Context, target: Target, owned: Owned) -> list[Policy | None]:
    """For each target tried, outermost first; everything after ``retry`` runs per attempt."""
    breaker, circuit = owned.circuit(target, circuit_breaker.policy(ctx, target))
    return [
        bulkhead.policy(ctx, target),
        retry.policy(ctx, target, circuit),  # a retry the open circuit would refuse is not made
        breaker,
        owned.key_pool(target, key_pool.policy(ctx, target)),
    ]


def build(ctx: Context, scrub: Scrubber) -> tuple[Handler, Owned]:
    """The whole flow for one config: the handler a parsed request is run through, and what its
    policies own."""
    owned = Owned()
    send = upstream_sender(ctx, scrub)
    chains = {name: compose(target_policies(ctx, t, owned), send) for name, t in ctx.targets.items()}
    return compose(request_policies(ctx, owned), fallback.router(ctx, chains)), owned
