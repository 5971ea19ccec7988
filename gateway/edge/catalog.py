"""``GET /v1/models``: the gateway's model catalog (SPEC §2), in OpenAI's list format.

Every model a client can reach: each LLM target's literal ``models`` entries and its
``llm.default_model``, plus every priced model (built-in table and ``pricing:``) that one
of the target's ``models`` globs routes — ``owned_by`` is the target, and a ``pricing``
object gives USD per 1M input/output tokens (absent for an unpriced model). With
tenants, the caller must authenticate and sees only what it may use. Built once per
config; a request only filters it.
"""

from __future__ import annotations

import fnmatch
import re
from typing import TYPE_CHECKING

from msgspec import UNSET

from gateway.edge.answers import Model, Pricing

if TYPE_CHECKING:
    from gateway.flow.tenants import Tenant
    from gateway.runtime import Runtime

_GLOB = re.compile(r"[*?\[]")


def build(rt: Runtime) -> list[Model]:
    prices = rt.prices
    entries: dict[tuple[str, str], Model] = {}
    for name, target in rt.targets.items():
        if target.kind != "llm":
            continue
        globs = list(target.config.models)
        literal = [g for g in globs if not _GLOB.search(g)]
        llm = target.config.llm
        if llm is not None and llm.default_model:
            literal.append(llm.default_model)
        patterns = [re.compile(fnmatch.translate(g)) for g in globs if _GLOB.search(g)]
        priced = [m for m in prices.per_million if any(p.match(m) for p in patterns)]
        for model in [*literal, *priced]:
            if (model, name) in entries:
                continue
            price = prices.price(model)
            pricing = UNSET if price is None else Pricing(round(price.input * 1e6, 6), round(price.output * 1e6, 6))
            entries[(model, name)] = Model(model, "model", 0, name, pricing)
    return sorted(entries.values(), key=lambda e: (e.owned_by, e.id))


def visible(catalog: list[Model], tenant: Tenant | None) -> list[Model]:
    if tenant is None:
        return catalog
    out = []
    for entry in catalog:
        try:
            tenant.check(entry.owned_by, entry.id)
        except Exception:  # Forbidden: not this tenant's to see
            continue
        out.append(entry)
    return out
