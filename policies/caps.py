"""Per-request caps (SPEC §5 Budget, steps 1-3 of ``policies.budget``): the output ceiling (``llm.max_tokens``, a
tier's ``max_tokens``), the estimate against the hard cap (400 ``budget_exceeded``, nothing sent) and the soft cap
(the output limit lowered). Applied to the target asked for, and again to each fallback target at its own model's
price before it is sent the request (``Exchange.caps``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import hdrs

from gateway import jsonbody, offload
from gateway.errors import BudgetExceeded, InvalidRequest, UnsupportedMediaType
from gateway.observe.events import BudgetEvent
from providers import endpoints, estimate, openai
from providers.estimate import OUTPUT_FIELDS, View

if TYPE_CHECKING:
    from gateway.flow.context import Context
    from gateway.flow.exchange import Exchange
    from providers.pricing import Price

X_RELIAPI_MAX_TOKENS = "X-ReliAPI-Max-Tokens"
MIN_MAX_TOKENS = 16
DEFAULT_RESERVE_TOKENS = 4096  # the output limit written into a metered request that sets none
LEGACY_COMPLETIONS_DEFAULT = 16  # OpenAI's documented default for /v1/completions


def caps_of(ex: Exchange) -> tuple[float | None, float | None]:
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


def limit_field(billed: str, model: str | None) -> str | None:
    """The output-limit field to write into a request that has none (None: the endpoint has no output)."""
    fields = OUTPUT_FIELDS[billed]
    if billed == endpoints.CHAT and not openai.hides_reasoning(model):  # reasoning models refuse max_tokens
        return "max_tokens"
    return fields[0] if fields else None


async def read_view(ex: Exchange, billed: str, why: str) -> View:
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


class Answer:
    """What the caps decided for one request: the output limit, and what to tell the client."""

    __slots__ = ("limit", "changed", "header", "estimate")

    def __init__(self, limit: int | None, changed: bool) -> None:
        self.limit, self.changed = limit, changed
        self.header: str | None = None
        self.estimate: float | None = None


class Caps:
    """The caps of one runtime's targets and tenants."""

    def __init__(self, ctx: Context) -> None:
        self.prices = ctx.prices
        self.events = ctx.events

    def capped(self, ex: Exchange) -> bool:
        soft, hard = caps_of(ex)
        llm = ex.target.config.llm
        return not (soft is None and hard is None and (llm is None or llm.max_tokens is None)
                    and (ex.account is None or ex.account.max_tokens is None))

    async def again(self, ex: Exchange, billed: str, metered: bool) -> str | None:
        """``apply`` for a fallback target; its ``X-ReliAPI-Max-Tokens`` (None: the limit stands)."""
        if metered or self.capped(ex):
            return (await self.apply(ex, billed, metered))[0].header
        return None

    async def apply(self, ex: Exchange, billed: str, metered: bool) -> tuple[Answer, View]:
        """The caps and output ceiling of ``ex.target`` applied to the request as it now is: its output limit
        clamped or lowered in the body, or ``BudgetExceeded`` over a hard cap — for the target asked for, and again
        for each fallback target (``ex.caps``, called by ``policies.fallback``) at its own model's price."""
        target, account = ex.target, ex.account
        soft, hard = caps_of(ex)
        llm = target.config.llm
        ceiling = llm.max_tokens if llm is not None else None
        tier_cap = account.max_tokens if account is not None else None
        if tier_cap is not None and (ceiling is None or tier_cap < ceiling):
            ceiling = tier_cap
        else:
            tier_cap = None  # the target's own is the lower: clamped as always
        view = await read_view(ex, billed, f"the budget of tenant {ex.tenant!r}" if metered else f"target {target.name}'s caps")
        model = view.model or (llm.default_model if llm else None)
        if ex.model is None:  # (a body the router did not read): usage prices the answer by this name
            ex.model = model
        answer = self._decide(ex, view, billed, self.prices.price(model), soft, hard, ceiling, metered, tier_cap)
        if answer.changed and answer.limit is not None:
            fields = [f for f in OUTPUT_FIELDS[billed] if f in view.limits] or [limit_field(billed, model)]
            ex.body = await jsonbody.edited(ex.body, dict.fromkeys(fields, answer.limit))  # type: ignore[arg-type]
            ex.max_tokens = answer.limit
        return answer, view

    def _decide(self, ex: Exchange, view: View, billed: str, price: Price | None, soft: float | None,
                hard: float | None, ceiling: int | None, metered: bool, tier_cap: int | None) -> Answer:
        """Clamp to the ceiling, apply the caps to the estimate, and make sure a metered request has a limit.
        ``tier_cap``: the ceiling is the tenant's tier's, which binds a request that sets no limit too."""
        has_output = bool(OUTPUT_FIELDS[billed])
        present = [v for v in view.limits.values() if v is not None]
        asked = max(present) if present else None
        answer = Answer(asked, bool(view.limits) and asked is None)  # a limit that is no number is replaced
        if has_output and ceiling is not None and (asked is None or asked > ceiling):
            answer.limit = ceiling  # the estimate uses it when absent; a larger ask is clamped
            answer.changed = answer.changed or asked is not None or metered or tier_cap is not None
            if tier_cap is not None:
                answer.header = f"{asked if asked is not None else 'none'}->{tier_cap}"
                ex.log["cost_policy_applied"] = "tier_max_tokens"
                ex.log["original_max_tokens"] = asked
        if price is not None:
            self._apply_caps(ex, view, billed, price, soft, hard, asked, answer)
        if metered and has_output and answer.limit is None:
            answer.limit = LEGACY_COMPLETIONS_DEFAULT if billed == endpoints.COMPLETIONS else DEFAULT_RESERVE_TOKENS
            answer.changed = True
        return answer

    def _apply_caps(self, ex: Exchange, view: View, billed: str, price: Price, soft: float | None, hard: float | None,
                    asked: int | None, answer: Answer) -> None:
        target = ex.target
        prompt = view.estimate_prompt()
        has_output = bool(OUTPUT_FIELDS[billed])
        field = next(iter(view.limits), None) or limit_field(billed, view.model)
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
            self.events.emit(BudgetEvent(target=target.name, rule="hard_cap"))
            raise BudgetExceeded(
                f"estimated cost ${estimate:.6f} is over the hard cap of ${hard:g} for this request; "
                f"send a shorter prompt" + (f" or a lower {field}" if has_output else ""),
                param=field if has_output else None, target=target.name,
            )
        if has_output and soft is not None and estimate > soft and price.output > 0:
            lowered = max(MIN_MAX_TOKENS, int((soft / rate - price.cost(prompt, 0)) / (price.output * fan)))
            if answer.limit is None or lowered < answer.limit:
                self.events.emit(BudgetEvent(target=target.name, rule="soft_cap"))
                answer.header = f"{asked if asked is not None else 'none'}->{lowered}"  # what the client asked for
                ex.log["cost_policy_applied"] = "soft_cap_reduced"
                ex.log["original_max_tokens"] = asked
                answer.limit, answer.changed = lowered, True
                estimate = price.cost(prompt, lowered * fan) * rate
        answer.estimate = estimate
