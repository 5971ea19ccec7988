"""Virtual models at the edge: the surfaces' parsers resolve one (``gateway.upstream.routing``) before they
choose a target, so every policy — tenant checks, rate limits, budget, idempotency, cache, retries,
fallback — sees the concrete model and the body sent upstream carries it (the cache and idempotency keys
are digests of that body: two requests resolved to different models never share an entry).

The decision is reported three ways: the ``X-ReliAPI-Routed-Model`` answer header (``gateway.edge.serve``),
the access line (``virtual_model``, ``routing_rule``; ``model`` is the concrete one) and the
``ModelRouted`` event behind ``reliapi_routing_decisions_total``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from gateway import jsonbody, offload
from gateway.errors import InvalidRequest
from gateway.observe.events import ModelRouted
from gateway.upstream.routing import Decision, read_facts
from providers import endpoints

if TYPE_CHECKING:
    from gateway.edge.call import Call
    from gateway.flow.exchange import Exchange
    from gateway.runtime import Runtime
    from gateway.upstream.targets import Target


_ROUTED = frozenset((endpoints.CHAT, endpoints.MESSAGES, endpoints.RESPONSES))  # what the rules read


async def decide(call: Call, body: bytes, billed: str | None, model: str | None) -> Decision | None:
    """The decision for a request naming a virtual ``model``; None for any other (one dict lookup)."""
    route = call.rt.routes.get(model)
    if route is None or billed not in _ROUTED:
        return None  # (a virtual model named on embeddings or legacy completions is no model at all: 404)
    facts = await offload.run(read_facts, body, billed, route.tokens, inline_max=offload.WHOLE_MAX_BYTES)
    return route.decide(facts, call.request.headers, tier_of(call))


async def decide_messages(call: Call, messages: list[Any], model: str | None) -> Decision | None:
    """``decide`` for a surface that writes the upstream body itself (``/v1/generate``, ``/proxy/llm``): the
    rules read its chat ``messages``."""
    if call.rt.routes.get(model) is None:
        return None
    return await decide(call, msgspec.json.encode({"messages": messages}), endpoints.CHAT, model)


async def resolve(call: Call, body: bytes, billed: str | None, model: str | None) -> tuple[bytes, Decision | None]:
    """``decide``, and the body with the concrete model in it (every other value as sent)."""
    decision = await decide(call, body, billed, model)
    if decision is None:
        return body, None
    try:
        return await jsonbody.edited(body, {"model": decision.model}), decision
    except jsonbody.NotAnObject:
        raise InvalidRequest("request body is not a JSON object") from None


def target_of(rt: Runtime, decision: Decision, named: str | None) -> Target:
    """The rule's target; else the one the client named (``X-ReliAPI-Target``, an envelope's ``target``), else the
    concrete model's usual route. A rule's target wins: only there is its model known to be served."""
    if decision.target is not None:
        return rt.router.by_name(decision.target)
    return rt.router.for_v1(named, decision.model)


def report(rt: Runtime, ex: Exchange, decision: Decision) -> None:
    """The decision on the access line and as an event (the metric)."""
    ex.log["virtual_model"] = decision.virtual
    ex.log["routing_rule"] = decision.rule
    ex.log["routed_model"] = decision.model
    rt.events.emit(ModelRouted(target=ex.target.name, route=decision.virtual, rule=decision.rule,
                               model=decision.model))


def tier_of(call: Call) -> str | None:
    """The caller's tier (``tenants[].tier``, a marketplace user's mapped one); None without a tenant or tier."""
    account = getattr(call, "account", None)  # the authenticated tenant, a marketplace user's included
    if account is None and call.tenant is not None:
        account = call.rt.tenants.by_name.get(call.tenant)
    tier = getattr(account, "tier", None)
    return str(tier) if tier is not None else None


def routed_model(ex: Exchange | None) -> str | None:
    """The concrete model a virtual one became, for the answer's ``X-ReliAPI-Routed-Model``."""
    return ex.log.get("routed_model") if ex is not None and ex.log else None
