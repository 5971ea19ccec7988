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

from aiohttp import hdrs

from gateway import jsonbody, offload
from gateway.config.tiers import plans
from gateway.errors import (
    BudgetExceeded,
    BudgetExhausted,
    Forbidden,
    GatewayError,
    InvalidRequest,
    StoreUnavailable,
    UnsupportedMediaType,
)
from gateway.headers import IDEMPOTENCY_KEYS
from gateway.observe.events import BudgetEvent, StoreDegraded
from gateway.store import StoreError
from gateway.store.base import until_sent
from policies.fallback import Chains
from providers import endpoints, estimate, openai
from providers.estimate import OUTPUT_FIELDS, View

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from gateway.flow.chain import Handler, Policy
    from gateway.flow.context import Context
    from gateway.flow.exchange import Exchange, Reply
    from providers.pricing import Price

X_RELIAPI_MAX_TOKENS = "X-ReliAPI-Max-Tokens"
MIN_MAX_TOKENS = 16
DEFAULT_RESERVE_TOKENS = 4096  # the output limit written into a metered request that sets none
LEGACY_COMPLETIONS_DEFAULT = 16  # OpenAI's documented default for /v1/completions
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


def _caps(ctx: Context, ex: Exchange) -> tuple[float | None, float | None]:
    llm = ex.target.config.llm
    soft = llm.soft_cost_cap_usd if llm else None
    hard = llm.hard_cost_cap_usd if llm else None
    if ex.account is not None:
        own = ex.account.config.budget_caps
        caps = own.get(ex.target.name) or own.get("*")
        if caps is not None:
            soft = caps.soft_cost_cap_usd if caps.soft_cost_cap_usd is not None else soft
            hard = caps.hard_cost_cap_usd if caps.hard_cost_cap_usd is not None else hard
    return soft, hard


def _limit_field(billed: str, model: str | None) -> str | None:
    """The output-limit field to write into a request that has none (None: the endpoint has no output)."""
    fields = OUTPUT_FIELDS[billed]
    if billed == endpoints.CHAT and not openai.hides_reasoning(model):  # reasoning models refuse max_tokens
        return "max_tokens"
    return fields[0] if fields else None


async def _read(ex: Exchange, billed: str, why: str) -> View:
    if hdrs.CONTENT_ENCODING in ex.headers:  # a coding the gateway could not decode when the request arrived
        raise UnsupportedMediaType(
            f"Content-Encoding {ex.headers[hdrs.CONTENT_ENCODING]!r} cannot be read, and {why} needs to read this "
            "request: send it uncompressed, or as gzip, deflate, br or zstd", target=ex.target.name)
    try:
        # (a large body off the event loop; the reader falls back to decoding odd shapes whole)
        return await offload.run(estimate.read, ex.body, billed, inline_max=offload.WHOLE_MAX_BYTES)
    except estimate.NotReadable:
        raise InvalidRequest(f"the request body must be a JSON object: {why} needs to read it",
                             target=ex.target.name) from None


class _Answer:
    """What the caps decided for one request: the output limit, and what to tell the client."""

    __slots__ = ("limit", "changed", "header", "estimate")

    def __init__(self, limit: int | None, changed: bool) -> None:
        self.limit, self.changed = limit, changed
        self.header: str | None = None
        self.estimate: float | None = None


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
        if chains.any:  # a fallback target is held to its own caps and ceiling, at its own model's price
            ex.caps = lambda attempt: _recap(attempt, billed, metered)
        if not _capped(ex) and not metered:
            return await call_next(ex)
        answer, view = await _capping(ex, billed, metered)
        if answer.estimate is not None:
            ex.log["cost_estimate_usd"] = round(answer.estimate, 8)
        try:
            if metered:
                field = next(iter(view.limits), None) or _limit_field(billed, view.model or ex.model)
                reply = await spend(ex, call_next, reservation(ex, view, answer.limit or 0), view.multiplier, field)
            else:
                reply = await call_next(ex)
        except GatewayError as e:
            if answer.header is not None:
                e.headers[X_RELIAPI_MAX_TOKENS] = answer.header
            raise
        if answer.header is not None:
            reply.headers[X_RELIAPI_MAX_TOKENS] = answer.header
        return reply

    def _capped(ex: Exchange) -> bool:
        soft, hard = _caps(ctx, ex)
        llm = ex.target.config.llm
        return not (soft is None and hard is None and (llm is None or llm.max_tokens is None)
                    and (ex.account is None or ex.account.max_tokens is None))

    async def _recap(ex: Exchange, billed: str, metered: bool) -> None:
        if metered or _capped(ex):
            await _capping(ex, billed, metered)

    async def _capping(ex: Exchange, billed: str, metered: bool) -> tuple[_Answer, View]:
        """The caps and output ceiling of ``ex.target`` applied to the request as it now is: its output limit
        clamped or lowered in the body, or ``BudgetExceeded`` over a hard cap — for the target asked for, and again
        for each fallback target (``ex.caps``, called by ``policies.fallback``) at its own model's price."""
        target, account = ex.target, ex.account
        soft, hard = _caps(ctx, ex)
        llm = target.config.llm
        ceiling = llm.max_tokens if llm is not None else None
        tier_cap = account.max_tokens if account is not None else None
        if tier_cap is not None and (ceiling is None or tier_cap < ceiling):
            ceiling = tier_cap
        else:
            tier_cap = None  # the target's own is the lower: clamped as always
        view = await _read(ex, billed, f"the budget of tenant {ex.tenant!r}" if metered else f"target {target.name}'s caps")
        model = view.model or (llm.default_model if llm else None)
        if ex.model is None:  # (a body the router did not read): usage prices the answer by this name
            ex.model = model
        answer = _decide(ex, view, billed, prices.price(model), soft, hard, ceiling, metered, tier_cap)
        if answer.changed and answer.limit is not None:
            fields = [f for f in OUTPUT_FIELDS[billed] if f in view.limits] or [_limit_field(billed, model)]
            ex.body = await jsonbody.edited(ex.body, dict.fromkeys(fields, answer.limit))  # type: ignore[arg-type]
            ex.max_tokens = answer.limit
        return answer, view

    def _decide(ex: Exchange, view: View, billed: str, price: Price | None, soft: float | None,
                hard: float | None, ceiling: int | None, metered: bool, tier_cap: int | None) -> _Answer:
        """Clamp to the ceiling, apply the caps to the estimate, and make sure a metered request has a limit.
        ``tier_cap``: the ceiling is the tenant's tier's, which binds a request that sets no limit too."""
        has_output = bool(OUTPUT_FIELDS[billed])
        present = [v for v in view.limits.values() if v is not None]
        asked = max(present) if present else None
        answer = _Answer(asked, bool(view.limits) and asked is None)  # a limit that is no number is replaced
        if has_output and ceiling is not None and (asked is None or asked > ceiling):
            answer.limit = ceiling  # the estimate uses it when absent; a larger ask is clamped
            answer.changed = answer.changed or asked is not None or metered or tier_cap is not None
            if tier_cap is not None:
                answer.header = f"{asked if asked is not None else 'none'}->{tier_cap}"
                ex.log["cost_policy_applied"] = "tier_max_tokens"
                ex.log["original_max_tokens"] = asked
        if price is not None:
            _apply_caps(ex, view, billed, price, soft, hard, asked, answer)
        if metered and has_output and answer.limit is None:
            answer.limit = LEGACY_COMPLETIONS_DEFAULT if billed == endpoints.COMPLETIONS else DEFAULT_RESERVE_TOKENS
            answer.changed = True
        return answer

    def _apply_caps(ex: Exchange, view: View, billed: str, price: Price, soft: float | None, hard: float | None,
                    asked: int | None, answer: _Answer) -> None:
        target = ex.target
        prompt = view.estimate_prompt()
        has_output = bool(OUTPUT_FIELDS[billed])
        field = next(iter(view.limits), None) or _limit_field(billed, view.model)
        # every answer the request asks for (n, best_of, a batch of prompts) at the rate it is billed at: a cap holds
        # for the request, not for one of its answers (as the budget's reservation)
        fan, rate = view.choices * view.prompts, view.multiplier
        if has_output and answer.limit is None and (soft is not None or hard is not None) and price.output > 0:
            # Caps need a bound on the answer: one that asks for none gets the largest that fits the hard cap
            # (at most DEFAULT_RESERVE_TOKENS), written into the request.
            bound = DEFAULT_RESERVE_TOKENS
            if hard is not None:
                bound = min(bound, max(MIN_MAX_TOKENS, int((hard / rate - price.cost(prompt, 0)) / (price.output * fan))))
            answer.limit, answer.changed = bound, True
        estimate = price.cost(prompt, (answer.limit or 0) * fan) * rate
        if hard is not None and estimate > hard:
            events.emit(BudgetEvent(target=target.name, rule="hard_cap"))
            raise BudgetExceeded(
                f"estimated cost ${estimate:.6f} is over the hard cap of ${hard:g} for this request; "
                f"send a shorter prompt" + (f" or a lower {field}" if has_output else ""),
                param=field if has_output else None, target=target.name,
            )
        if has_output and soft is not None and estimate > soft and price.output > 0:
            lowered = max(MIN_MAX_TOKENS, int((soft / rate - price.cost(prompt, 0)) / (price.output * fan)))
            if answer.limit is None or lowered < answer.limit:
                events.emit(BudgetEvent(target=target.name, rule="soft_cap"))
                answer.header = f"{asked if asked is not None else 'none'}->{lowered}"  # what the client asked for
                ex.log["cost_policy_applied"] = "soft_cap_reduced"
                ex.log["original_max_tokens"] = asked
                answer.limit, answer.changed = lowered, True
                estimate = price.cost(prompt, lowered * fan) * rate
        answer.estimate = estimate

    return budget


__all__ = ["DEFAULT_RESERVE_TOKENS", "Settlement", "policy", "windows"]
