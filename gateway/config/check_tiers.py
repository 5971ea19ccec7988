"""Cross-checks of ``tiers:``, ``tenants[].tier`` and ``marketplaces:`` (``gateway.config.check``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from gateway.config.tiers import PLAN_PREFIX
from gateway.scrub import MIN_SECRET

if TYPE_CHECKING:
    from gateway.config.model import Config, TenantRateLimit

MARKETPLACE_PREFIX = "rapidapi/"  # (gateway.flow.marketplace.TENANT_PREFIX: the names marketplace users get)


def tier_errors(config: Config) -> list[str]:
    errors: list[str] = []
    tiers = config.tiers
    known = ", ".join(sorted(tiers)) or "none are configured"
    for name, tier in tiers.items():
        if not name or ":" in name or "/" in name:
            errors.append(f"tiers.{name}: tier names may not be empty or hold ':' or '/'")
        if tier.rate_limit is not None:
            errors.extend(_rate_limit(tier.rate_limit, f"tiers.{name}.rate_limit"))
    for i, tenant in enumerate(config.tenants):
        if tenant.tier is not None and tenant.tier not in tiers:
            errors.append(f"tenants[{i}].tier: no tier named {tenant.tier!r} (tiers: {known})")
        if tenant.name.startswith((PLAN_PREFIX, MARKETPLACE_PREFIX)):
            errors.append(f"tenants[{i}].name: names starting with {PLAN_PREFIX!r} or {MARKETPLACE_PREFIX!r} are the "
                          "gateway's own (a tier's settings, a marketplace's users)")
    rapidapi = config.marketplaces.rapidapi
    if rapidapi is not None:
        p = "marketplaces.rapidapi"
        if not rapidapi.proxy_secret_env:
            errors.append(f"{p}.proxy_secret_env: required — the environment variable holding the "
                          "X-RapidAPI-Proxy-Secret that proves a request came through RapidAPI")
        for subscription, tier in rapidapi.tier_map.items():
            if tier not in tiers:
                errors.append(f"{p}.tier_map.{subscription}: no tier named {tier!r} (tiers: {known})")
        if rapidapi.default_tier is not None and rapidapi.default_tier not in tiers:
            errors.append(f"{p}.default_tier: no tier named {rapidapi.default_tier!r} (tiers: {known})")
        if not rapidapi.tier_map and rapidapi.default_tier is None:
            errors.append(f"{p}.tier_map: map the RapidAPI subscriptions (BASIC, PRO, …) to tiers, or set default_tier; "
                          "without either every RapidAPI request is refused")
    return errors


def tier_warnings(config: Config, env: Mapping[str, str]) -> list[str]:
    rapidapi = config.marketplaces.rapidapi
    if rapidapi is None or not rapidapi.proxy_secret_env:
        return []
    secret = env.get(rapidapi.proxy_secret_env, "")
    where = f"marketplaces.rapidapi.proxy_secret_env: {rapidapi.proxy_secret_env}"
    if not secret:
        return [f"{where} is not set: every request with X-RapidAPI-* headers is refused (401)"]
    if len(secret) < MIN_SECRET:
        return [f"{where}: the secret is shorter than {MIN_SECRET} characters, so it is not scrubbed from answers and logs"]
    return []


def _rate_limit(rl: TenantRateLimit, path: str) -> list[str]:
    errors = []
    if rl.burst is not None and rl.rpm is None:
        errors.append(f"{path}.burst: is the burst of rpm; set rpm too")
    if rl.per_user is not None and rl.per_user.rpm is None and rl.per_user.rph is None:
        errors.append(f"{path}.per_user: give rpm and/or rph")
    return errors
