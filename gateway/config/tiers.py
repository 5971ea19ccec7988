"""A tenant's settings with its tier's filled in (``tiers:``, ``tenants[].tier``), and the settings of
marketplace tenants, who have nothing but a tier.

A tenant's own settings win field by field: each ``rate_limit`` field it sets (``per_user`` as a
whole), each ``budget`` field, and ``allowed_models`` when it sets them. ``max_tokens`` and
``features`` are the tier's alone (``policies.tiers``, ``policies.budget``).

Marketplace tenants (``gateway.flow.tenants``) are made per request; what their limits, budget and
models are depends only on their tier, so the policies keep those under one *plan* name per tier,
``tier:<name>`` (``plans``), next to each configured tenant's own name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import msgspec

from gateway.config.model import TenantConfig

if TYPE_CHECKING:
    from gateway.config.model import Config, TierConfig

S = TypeVar("S", bound=msgspec.Struct)
PLAN_PREFIX = "tier:"  # a marketplace tier's plan name; configured tenant names may not start with it


def _merge(own: S | None, tier: S | None) -> S | None:
    """The tier's struct with every field the tenant set taken from the tenant's."""
    if own is None or tier is None:
        return own if own is not None else tier
    changes = {f: getattr(own, f) for f in own.__struct_fields__ if getattr(own, f) is not None}
    return msgspec.structs.replace(tier, **changes)


def effective(tenant: TenantConfig, tiers: dict[str, TierConfig]) -> TenantConfig:
    """The tenant's settings with its tier's filled in (unchanged without a tier)."""
    tier = tiers.get(tenant.tier) if tenant.tier is not None else None
    if tier is None:
        return tenant
    return msgspec.structs.replace(
        tenant,
        rate_limit=_merge(tenant.rate_limit, tier.rate_limit),
        budget=_merge(tenant.budget, tier.budget),
        allowed_models=tenant.allowed_models if tenant.allowed_models is not None else tier.allowed_models,
    )


def plan_name(tier: str) -> str:
    return PLAN_PREFIX + tier


def template(name: str, tier: TierConfig) -> TenantConfig:
    """The settings of a tenant with nothing of its own on tier ``name`` (a marketplace's users)."""
    return TenantConfig(name=plan_name(name), tier=name, rate_limit=tier.rate_limit, budget=tier.budget,
                        allowed_models=tier.allowed_models)


def plans(config: Config) -> list[TenantConfig]:
    """Every set of tenant settings a policy may be asked about, by plan name: each configured tenant's
    (its tier filled in), and each tier's own for marketplace tenants."""
    own = [effective(t, config.tiers) for t in config.tenants]
    return own + [template(name, tier) for name, tier in config.tiers.items()]
