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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from gateway.errors import BudgetExceeded, GatewayError
from gateway.events import BudgetEvent
from providers.pricing import PriceTable, estimate_prompt_tokens

if TYPE_CHECKING:
    from gateway.exchange import Exchange, Reply
    from gateway.pipeline import Handler, Policy
    from gateway.runtime import Runtime

X_RELIAPI_MAX_TOKENS = "X-ReliAPI-Max-Tokens"
MIN_MAX_TOKENS = 16
ESTIMATED_PATHS = frozenset(("chat/completions", "completions", "messages"))


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
    capped = any(
        t.kind == "llm" and t.config.llm is not None and (
            t.config.llm.max_tokens or t.config.llm.soft_cost_cap_usd is not None
            or t.config.llm.hard_cost_cap_usd is not None)
        for t in rt.targets.values()
    ) or any(t.budget_caps for t in rt.config.tenants)
    if not capped:
        return None
    prices = PriceTable(rt.config.pricing)
    events = rt.events

    async def budget(ex: Exchange, call_next: Handler) -> Reply:
        target = ex.target
        if target.kind != "llm" or ex.method != "POST" or ex.rel_path.removeprefix("v1/") not in ESTIMATED_PATHS:
            return await call_next(ex)
        soft, hard = _caps(rt, ex)
        llm = target.config.llm
        ceiling = llm.max_tokens if llm is not None else None
        if soft is None and hard is None and ceiling is None:
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
        price = prices.price(body.get("model") or (llm.default_model if llm else None))
        if price is not None:
            prompt = estimate_prompt_tokens(body)
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
                    header = f"{max_tokens if max_tokens is not None else 'none'}->{lowered}"
                    ex.log["cost_policy_applied"] = "soft_cap_reduced"
                    ex.log["original_max_tokens"] = max_tokens
                    max_tokens, changed = lowered, True
                    estimate = price.cost(prompt, lowered)
            ex.log["cost_estimate_usd"] = round(estimate, 8)
        if changed:
            body[field] = max_tokens
            ex.body = msgspec.json.encode(body)
            ex.max_tokens = max_tokens
        if header is None:
            return await call_next(ex)
        try:
            reply = await call_next(ex)
        except GatewayError as e:
            e.headers[X_RELIAPI_MAX_TOKENS] = header
            raise
        reply.headers[X_RELIAPI_MAX_TOKENS] = header
        return reply

    return budget
