"""Per-request budget caps (SPEC §5 Budget; the seed's "LLM Target with Budget Caps").

For an LLM completion (chat/completions, completions, messages) the gateway estimates
the cost before sending: prompt tokens (``providers.pricing.estimate_prompt_tokens``)
× input price + the answer's ``max_tokens`` (or ``max_completion_tokens``; when absent,
``llm.max_tokens``) × output price. Then, in the seed's order:

1. a client ``max_tokens`` above ``llm.max_tokens`` is clamped to it;
2. estimate > hard cap → 400 ``budget_exceeded``, and nothing is sent upstream;
3. estimate > soft cap → ``max_tokens`` is lowered until the estimate fits (never below
   16); the answer carries ``X-ReliAPI-Max-Tokens: <old>-><new>`` and the access log
   ``cost_policy_applied: soft_cap_reduced`` and ``original_max_tokens``.

Caps come from the target's ``llm`` block; a tenant's ``budget_caps`` (for this target,
or ``"*"``) override them. A model without a price is served uncapped (it cannot be
estimated). The body is rewritten only when a limit changes it.

A tenant's spend budget (``budget: {daily_usd, monthly_usd}``, UTC day and month) is
held under concurrency and across instances by a reservation: before the request is
sent, its estimate (with ``max_tokens`` unknown, ``llm.max_tokens``, else 4,096 tokens)
is added to the day's and the month's spend in ONE atomic store step that refuses if
either would go over — 402 ``budget_exhausted`` with the reset time and ``Retry-After``.
When the answer's real cost is known (``policies.usage``: at once, or when a stream
ends, is cut or abandoned) the reservation is settled to it; a failed answer, a cache
hit or a replay costs nothing. Peers check the spend and then charge it, so fifty
concurrent requests overshoot a budget that fits ten; these cannot. A store that is down
fails these requests closed (503) unless ``store.fail_open``.
"""

from __future__ import annotations

import calendar
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.errors import BudgetExceeded, BudgetExhausted, GatewayError, StoreUnavailable
from gateway.events import BudgetEvent, StoreDegraded
from gateway.store import StoreError
from providers.pricing import estimate_prompt_tokens

if TYPE_CHECKING:
    from gateway.exchange import Exchange, Reply
    from gateway.pipeline import Handler, Policy
    from gateway.runtime import Runtime

X_RELIAPI_MAX_TOKENS = "X-ReliAPI-Max-Tokens"
MIN_MAX_TOKENS = 16
ESTIMATED_PATHS = frozenset(("chat/completions", "completions", "messages"))
DEFAULT_RESERVE_TOKENS = 4096  # the answer's size for a reservation when nothing bounds it
_UNBOUNDED = 1e18

log = logging.getLogger("reliapi")


class Settlement:
    """One request's spend reservation; ``settle(cost)`` books the real cost once."""

    __slots__ = ("store", "keys", "ttls", "reserved", "expected", "done", "spawn")

    def __init__(self, store: Any, keys: list[str], ttls: list[float], reserved: float, spawn: Any) -> None:
        self.store, self.keys, self.ttls, self.reserved, self.spawn = store, keys, ttls, reserved, spawn
        self.expected = False  # a stream's usage will settle it when the stream ends
        self.done = False

    def settle(self, cost: float) -> None:
        if self.done:
            return
        self.done = True
        delta = cost - self.reserved
        if abs(delta) > 1e-12:  # one atomic step for every window, as the reservation was
            self.spawn(self.store.reserve(self.keys, delta, [_UNBOUNDED] * len(self.keys), self.ttls), "spend settle")


def windows(tenant: str, budget: Any, now: float) -> tuple[list[str], list[float], list[float], list[tuple[str, float]]]:
    """Store keys, limits and TTLs of the tenant's day/month windows, and (name, reset time)."""
    t = time.gmtime(now)
    keys, limits, ttls, resets = [], [], [], []
    if budget.daily_usd is not None:
        keys.append(f"spend:{tenant}:d:{time.strftime('%Y%m%d', t)}")
        limits.append(budget.daily_usd)
        ttls.append(2 * 86400)
        resets.append(("daily", calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0)) + 86400.0))
    if budget.monthly_usd is not None:
        keys.append(f"spend:{tenant}:m:{time.strftime('%Y%m', t)}")
        limits.append(budget.monthly_usd)
        ttls.append(32 * 86400)
        year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
        resets.append(("monthly", float(calendar.timegm((year, month, 1, 0, 0, 0)))))
    return keys, limits, ttls, resets


def _caps(rt: Runtime, ex: Exchange) -> tuple[float | None, float | None]:
    llm = ex.target.config.llm
    soft = llm.soft_cost_cap_usd if llm else None
    hard = llm.hard_cost_cap_usd if llm else None
    if ex.tenant is not None:
        own = rt.tenants.by_name[ex.tenant].config.budget_caps
        caps = own.get(ex.target.name) or own.get("*")
        if caps is not None:
            soft = caps.soft_cost_cap_usd if caps.soft_cost_cap_usd is not None else soft
            hard = caps.hard_cost_cap_usd if caps.hard_cost_cap_usd is not None else hard
    return soft, hard


def policy(rt: Runtime) -> Policy | None:
    budgets = {t.name: t.budget for t in rt.config.tenants
               if t.budget is not None and (t.budget.daily_usd is not None or t.budget.monthly_usd is not None)}
    capped = any(
        t.kind == "llm" and t.config.llm is not None and (
            t.config.llm.max_tokens or t.config.llm.soft_cost_cap_usd is not None
            or t.config.llm.hard_cost_cap_usd is not None)
        for t in rt.targets.values()
    ) or any(t.budget_caps for t in rt.config.tenants)
    if not capped and not budgets:
        return None
    prices = rt.prices
    events = rt.events
    store, clock, fail_open = rt.store, rt.clock, rt.config.store.fail_open
    spawn = rt.shared.spawn

    async def spend(ex: Exchange, call_next: Handler, amount: float) -> Reply:
        keys, limits, ttls, resets = windows(ex.tenant, budgets[ex.tenant], clock.time())  # type: ignore[arg-type,index]
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
            window, reset = resets[over]
            events.emit(BudgetEvent(target=ex.target.name, rule="exhausted"))
            at = datetime.fromtimestamp(reset, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
            raise BudgetExhausted(
                f"tenant {ex.tenant!r} has used up its {window} budget of ${limits[over]:g}; it resets at {at}",
                retry_after=max(1.0, reset - clock.time()), target=ex.target.name,
            )
        settlement = ex.settlement = Settlement(store, keys, ttls, amount, spawn)
        try:
            reply = await call_next(ex)
        except BaseException:
            settlement.settle(ex.log.get("cost_usd", 0.0) if settlement.expected else 0.0)
            raise
        if not settlement.expected:  # answered without usage to wait for (a hit, a replay, an error)
            settlement.settle(ex.log.get("cost_usd", 0.0))
        return reply

    async def budget(ex: Exchange, call_next: Handler) -> Reply:
        target = ex.target
        if target.kind != "llm" or ex.method != "POST" or ex.rel_path.removeprefix("v1/") not in ESTIMATED_PATHS:
            return await call_next(ex)
        soft, hard = _caps(rt, ex)
        llm = target.config.llm
        ceiling = llm.max_tokens if llm is not None else None
        metered = ex.tenant in budgets
        if soft is None and hard is None and ceiling is None and not metered:
            return await call_next(ex)
        try:
            body: Any = msgspec.json.decode(ex.body)
        except msgspec.DecodeError:
            return await call_next(ex)  # not ours to judge: the upstream answers it
        if not isinstance(body, dict):
            return await call_next(ex)
        field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        asked = body.get(field)
        asked = asked if isinstance(asked, int) and not isinstance(asked, bool) else None
        max_tokens, changed = asked, False
        if ceiling is not None and (asked is None or asked > ceiling):
            max_tokens = ceiling  # the estimate uses it when absent; a larger ask is clamped
            changed = asked is not None
        header = None
        reservation = 0.0
        price = prices.price(body.get("model") or (llm.default_model if llm else None))
        if price is not None:
            prompt = estimate_prompt_tokens(body)
            if max_tokens is None and (soft is not None or hard is not None) and price.output > 0:
                # Caps need a bound on the answer: one that asks for none gets the largest that fits
                # the hard cap (at most DEFAULT_RESERVE_TOKENS), written into the request.
                bound = DEFAULT_RESERVE_TOKENS
                if hard is not None:
                    bound = min(bound, max(MIN_MAX_TOKENS, int((hard - price.cost(prompt, 0)) / price.output)))
                max_tokens, changed = bound, True
            estimate = price.cost(prompt, max_tokens or 0)
            if hard is not None and estimate > hard:
                events.emit(BudgetEvent(target=target.name, rule="hard_cap"))
                raise BudgetExceeded(
                    f"estimated cost ${estimate:.6f} is over the hard cap of ${hard:g} for this request; "
                    f"send a shorter prompt or a lower {field}", param=field, target=target.name,
                )
            if soft is not None and estimate > soft and price.output > 0:
                fits = int((soft - price.cost(prompt, 0)) / price.output)
                lowered = max(MIN_MAX_TOKENS, fits)
                if max_tokens is None or lowered < max_tokens:
                    events.emit(BudgetEvent(target=target.name, rule="soft_cap"))
                    header = f"{asked if asked is not None else 'none'}->{lowered}"  # what the client asked for
                    ex.log["cost_policy_applied"] = "soft_cap_reduced"
                    ex.log["original_max_tokens"] = asked
                    max_tokens, changed = lowered, True
                    estimate = price.cost(prompt, lowered)
            ex.log["cost_estimate_usd"] = round(estimate, 8)
            reservation = estimate if max_tokens is not None else price.cost(prompt, DEFAULT_RESERVE_TOKENS)
        if changed:
            body[field] = max_tokens
            ex.body = msgspec.json.encode(body)
            ex.max_tokens = max_tokens
        if header is None:
            return await (spend(ex, call_next, reservation) if metered else call_next(ex))
        try:
            reply = await (spend(ex, call_next, reservation) if metered else call_next(ex))
        except GatewayError as e:
            e.headers[X_RELIAPI_MAX_TOKENS] = header
            raise
        reply.headers[X_RELIAPI_MAX_TOKENS] = header
        return reply

    return budget
