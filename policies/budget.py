"""Per-request budget caps and tenant spend budgets (SPEC §5 Budget; the seed's "LLM Target with Budget Caps").

Every POST to an LLM target for an endpoint that bills tokens (``providers.endpoints``:
chat/completions, completions, messages, responses, embeddings, … however the path is
spelled) is read before it is sent (``providers.estimate``). Then, in the seed's order:

1. a client output limit (``max_tokens``, ``max_completion_tokens``, ``max_output_tokens``)
   above ``llm.max_tokens`` is clamped to it; so is one above the tenant's tier's ``max_tokens``
   (``tiers:``) — clamped, not refused, as SDKs send their own defaults —, and a request that sets
   none gets the tier's written into it; ``X-ReliAPI-Max-Tokens: <asked>-><cap>`` says so;
2. the **estimate** (prompt characters / 4 + per-message overhead, × input price, + the
   output limit, else ``llm.max_tokens``, × output price) over the hard cap → 400
   ``budget_exceeded``, and nothing is sent upstream;
3. estimate > soft cap → the output limit is lowered until the estimate fits (never below
   16); the answer carries ``X-ReliAPI-Max-Tokens: <old>-><new>`` and the access log
   ``cost_policy_applied: soft_cap_reduced`` and ``original_max_tokens``.

Caps come from the target's ``llm`` block; a tenant's ``budget_caps`` (for this target, or
``"*"``) override them. A tenant's spend budget is its own, else its tier's (field by field); a
marketplace user's is its tier's, spent per user. A model without a price is served uncapped (it cannot be estimated).

A tenant's **spend budget** (``budget: {daily_usd, monthly_usd}``, UTC day and month) can
never be overshot, whatever runs concurrently on however many instances: before a request
is sent, an upper *bound* of what it can cost is added to the day's and the month's spend
in ONE atomic store step that refuses if either would go over — 402 ``budget_exhausted``
with the reset time and ``Retry-After``. The bound (``providers.estimate``) is the prompt's
UTF-8 bytes (images and files accounted for, never more than the context window) and the
output limit × ``n`` — taken over every target and model the fallback chain may answer with
(twice over with ``stream_recovery: continue``); a model without a price cannot be held to a
budget and is refused (403), as is a POST to an endpoint that is neither billed nor known free. A request that sets no output limit gets
one written into it (``llm.max_tokens``, else 4,096; 16 for legacy completions, OpenAI's
default). When the answer's real cost is known (``policies.usage``) the reservation is
settled to it — at most the reservation, so recorded spend never passes the budget; a
failed answer, a cache hit or a replay costs nothing. POSTs to endpoints whose cost nothing
in the request bounds (batches, images, audio, fine-tuning, realtime, runs) are refused
(403) for a tenant with a budget. A store that is down fails these requests closed (503)
unless ``store.fail_open``.

A body the gateway must read and cannot is refused: not a JSON object (400), still
compressed in a coding the gateway does not read (415; gzip, deflate, br and zstd are
decoded when the request arrives, ``gateway.handlers``).
"""

from __future__ import annotations

import calendar
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from gateway.config.tiers import plans
from gateway.errors import (
    BudgetExhausted,
    Forbidden,
    GatewayError,
    StoreUnavailable,
)
from gateway.headers import IDEMPOTENCY_KEYS
from gateway.observe.events import BudgetEvent, StoreDegraded
from gateway.store import StoreError
from gateway.store.base import until_sent
from policies.caps import DEFAULT_RESERVE_TOKENS, X_RELIAPI_MAX_TOKENS, Caps, limit_field
from policies.fallback import Chains
from providers.estimate import View

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from gateway.flow.chain import Handler, Policy
    from gateway.flow.context import Context
    from gateway.flow.exchange import Exchange, Reply

_UNBOUNDED = 1e18
SETTLE_WITHIN_S = 120.0  # how long a settlement the store could not be reached for is tried again
# Methods that never start a generation; any other (POST, PUT, PATCH, …) is read as one would be.
_READ_METHODS = frozenset(("GET", "HEAD", "OPTIONS", "DELETE"))

log = logging.getLogger("reliapi")


class Settlement:
    """One request's spend reservation; ``settle(cost)`` books the real cost once — never more than
    was reserved, so the budget's counter cannot pass its limit. Whoever holds the request when its
    cost is known settles: the usage policy once it took the request (``owned``), else the budget."""

    __slots__ = ("store", "keys", "ttls", "reserved", "done", "spawn", "owned", "factor")

    def __init__(self, store: Any, keys: list[str], ttls: list[float], reserved: float, spawn: Any) -> None:
        self.store, self.keys, self.ttls, self.reserved, self.spawn = store, keys, ttls, reserved, spawn
        self.owned = False  # the usage policy has the request: it settles it, however it ends
        self.factor = 1.0  # a price above the text rate the usage is counted at (priority, audio)
        self.done = False

    def settle(self, cost: float) -> None:
        if self.done:
            return
        self.done = True
        cost = max(0.0, cost) * self.factor  # an upstream reporting negative usage refills nothing
        if cost > self.reserved + 1e-12:
            log.warning("spend: an answer cost $%.8f, more than its reservation of $%.8f; the budget is charged "
                        "the reservation", cost, self.reserved)
            cost = self.reserved
        delta = cost - self.reserved
        if abs(delta) > 1e-12:  # one atomic step for every window, as the reservation was
            self.spawn(self._settle(delta), "spend settle")

    async def _settle(self, delta: float) -> None:
        """Give back what the answer did not cost — again while the store cannot be reached (a restart, a
        failover), for up to ``SETTLE_WITHIN_S``: a blip must not leave the tenant charged its whole reservation."""
        try:
            await until_sent(lambda: self.store.reserve(self.keys, delta, [_UNBOUNDED] * len(self.keys), self.ttls),
                             SETTLE_WITHIN_S)
        except StoreError as e:
            log.warning("spend: $%.6f of a reservation could not be given back (%s); the tenant stays charged it",
                        -delta, e)


def windows(tenant: str, budget: Any, now: float) -> tuple[list[str], list[float], list[float], list[tuple[str, float]]]:
    """Store keys, limits and TTLs of the tenant's day/month windows, and (name, reset time)."""
    t = time.gmtime(now)
    keys, limits, ttls, resets = [], [], [], []
    if budget.daily_usd is not None:
        keys.append(f"spend:{{tenant:{tenant}}}:d:{time.strftime('%Y%m%d', t)}")
        limits.append(budget.daily_usd)
        ttls.append(2 * 86400)
        resets.append(("daily", calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0)) + 86400.0))
    if budget.monthly_usd is not None:
        keys.append(f"spend:{{tenant:{tenant}}}:m:{time.strftime('%Y%m', t)}")
        limits.append(budget.monthly_usd)
        ttls.append(32 * 86400)
        year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
        resets.append(("monthly", float(calendar.timegm((year, month, 1, 0, 0, 0)))))
    return keys, limits, ttls, resets


def _budgets(ctx: Context) -> dict[str, Any]:
    return {t.name: t.budget for t in plans(ctx.config)  # by plan: a marketplace tier's too
            if t.budget is not None and (t.budget.daily_usd is not None or t.budget.monthly_usd is not None)}


def _may_be_stored(ex: Exchange) -> bool:
    """Its answer may already be stored or running — an idempotent replay or a cache hit, which cost nothing."""
    cache = ex.target.config.cache
    return (ex.idempotency_key is not None or (cache is not None and cache.enabled)
            or any(name in ex.headers for name in IDEMPOTENCY_KEYS))


def guard(ctx: Context) -> Policy | None:
    """Inside idempotency and the cache: a request the budget refused that neither answered from a stored or
    running answer is refused now, before it takes a quota or reaches an upstream (``policies.budget.spend``)."""
    if not _budgets(ctx):
        return None
    emit = ctx.events.emit

    def refused_unless_replayed(ex: Exchange, call_next: Handler) -> Awaitable[Reply]:
        refusal = ex.refused
        if refusal is not None:
            emit(BudgetEvent(target=ex.target.name, rule="exhausted"))
            raise refusal
        return call_next(ex)

    return refused_unless_replayed


def policy(ctx: Context) -> Policy | None:
    budgets = _budgets(ctx)
    capped = any(
        t.kind == "llm" and t.config.llm is not None and (
            t.config.llm.max_tokens or t.config.llm.soft_cost_cap_usd is not None
            or t.config.llm.hard_cost_cap_usd is not None)
        for t in ctx.targets.values()
    ) or any(t.budget_caps for t in ctx.config.tenants) or any(t.max_tokens for t in ctx.config.tiers.values())
    if not capped and not budgets:
        return None
    prices = ctx.prices
    events = ctx.events
    store, clock, fail_open = ctx.store, ctx.clock, ctx.config.store.fail_open
    spawn = ctx.shared.spawn
    chains = Chains(ctx)
    caps = Caps(ctx)

    async def exhausted(ex: Exchange, amount: float, field: str | None, limit: float, key: str, window: str,
                        reset: float) -> BudgetExhausted:
        """The 402 of a request whose reservation ``amount`` does not fit the ``window`` budget (counted at ``key``)."""
        lower = f"a shorter prompt or a lower {field}" if field else "a shorter input"
        bound = "its prompt at a token per byte" + (", and its output limit" if field else "")  # (embeddings: none)
        if amount > limit:  # it would not fit an unspent budget either: waiting does not help
            return BudgetExhausted(
                f"this request may cost up to ${amount:.6f} ({bound}), more than the whole {window} budget of "
                f"${limit:g} of tenant {ex.tenant!r}; send {lower}",
                param=field or None, target=ex.target.name)
        try:
            left = max(0.0, limit - float(await store.get(key) or 0))
            have = f"has ${left:.6f} of its {window} budget of ${limit:g} left"
        except (StoreError, ValueError):
            have = f"has too little of its {window} budget of ${limit:g} left"
        at = datetime.fromtimestamp(reset, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        return BudgetExhausted(
            f"tenant {ex.tenant!r} {have}, and this request may cost up to ${amount:.6f} ({bound}): send {lower}, "
            f"or wait until it resets at {at}",
            retry_after=max(1.0, reset - clock.time()), target=ex.target.name,
        )

    async def spend(ex: Exchange, call_next: Handler, amount: float, factor: float, field: str | None) -> Reply:
        """Reserve ``amount`` of the tenant's budget, run, and settle (``field``: the output limit it sets)."""
        keys, limits, ttls, resets = windows(ex.tenant, budgets[ex.account.plan], clock.time())  # type: ignore[arg-type]
        try:
            over = await store.reserve(keys, amount, limits, ttls)
        except StoreError as e:
            events.emit(StoreDegraded(target=ex.target.name, policy="budget", error=str(e)))
            if fail_open:
                log.warning("budget: store unavailable, not enforcing budgets (store.fail_open): %s", e)
                return await call_next(ex)
            raise StoreUnavailable("budget store unavailable: cannot check this tenant's spend; retry shortly",
                                   retry_after=1.0) from None
        if over >= 0:
            refusal = await exhausted(ex, amount, field, limits[over], keys[over], *resets[over])
            if _may_be_stored(ex):  # a replay or a cache hit costs nothing: refused only if it would run (``guard``)
                ex.refused = refusal
                return await call_next(ex)
            events.emit(BudgetEvent(target=ex.target.name, rule="exhausted"))
            raise refusal
        settlement = ex.settlement = Settlement(store, keys, ttls, amount, spawn)
        settlement.factor = factor
        try:
            reply = await call_next(ex)
        except BaseException:
            if not settlement.owned:  # refused before the usage policy had it: nothing was sent
                settlement.settle(0.0)
            raise
        if not settlement.owned:  # answered without reaching the usage policy (a hit, a replay)
            settlement.settle(0.0)
        return reply

    def reservation(ex: Exchange, view: View, limit: int) -> float:
        """The most this request can cost on any target and model that may answer it."""
        most = 0.0
        output = limit * view.choices * view.prompts
        for target, model in chains.candidates(ex):
            price = prices.price(model)
            if price is None:  # unmetered would be free of the budget: refused, not waved through
                raise Forbidden(
                    f"model {model or '(none given)'!r} on target {target.name} has no price, so the spend budget of "
                    f"tenant {ex.tenant!r} cannot be held to it; add it under pricing: (USD per 1M input/output tokens, "
                    "0 for a model that costs nothing)", param="model", target=target.name)
            prompt = view.bound_prompt(len(ex.body), price)
            if target.name in chains.recovering:  # a continuation resends the prompt and the partial answer
                cost = price.cost(2 * prompt + limit * view.choices, 2 * output)
            else:
                cost = price.cost(prompt, output)
            most = max(most, cost * view.multiplier)
        return most

    async def budget(ex: Exchange, call_next: Handler) -> Reply:
        target = ex.target
        if target.kind != "llm" or ex.method in _READ_METHODS:
            return await call_next(ex)
        account = ex.account
        metered = account is not None and account.plan in budgets
        billed = ex.endpoint.billed
        if billed is None:
            if metered and not ex.endpoint.free:
                raise Forbidden(
                    f"{ex.method} /{ex.endpoint.path}: tenant {ex.tenant!r} has a spend budget, and this endpoint is not one "
                    "whose cost the gateway can bound before it runs, so it is not allowed for this tenant",
                    target=target.name)
            return await call_next(ex)
        said: list[str | None] = []  # X-ReliAPI-Max-Tokens for each fallback target the request went on to
        if chains.any:  # a fallback target is held to its own caps and ceiling, at its own model's price

            async def recap(attempt: Exchange) -> None:
                said.append(await caps.again(attempt, billed, metered))

            ex.caps = recap
        header: str | None = None
        try:
            if not caps.capped(ex) and not metered:
                reply = await call_next(ex)
            else:
                answer, view = await caps.apply(ex, billed, metered)
                header = answer.header
                if answer.estimate is not None:
                    ex.log["cost_estimate_usd"] = round(answer.estimate, 8)
                if metered:
                    field = next(iter(view.limits), None) or limit_field(billed, view.model or ex.model)
                    reply = await spend(ex, call_next, reservation(ex, view, answer.limit or 0), view.multiplier, field)
                else:
                    reply = await call_next(ex)
        except GatewayError as e:
            header = said[-1] if said else header  # (the last target tried answered it)
            if header is not None:
                e.headers[X_RELIAPI_MAX_TOKENS] = header
            raise
        header = said[-1] if said else header
        if header is not None:
            reply.headers[X_RELIAPI_MAX_TOKENS] = header
        return reply

    return budget


__all__ = ["DEFAULT_RESERVE_TOKENS", "Settlement", "policy", "windows"]
