"""The status page's data (``GET /status.json``, rendered by ``GET /``): the observatory's counts
(``gateway.observe.counters``) with what only the runtime and the store know — the store's health,
circuit states, key pools, tenants' spend against their budgets (fleet-wide, from the store) —
and the trends: each target's last fifteen minutes and each tenant's spend today by hour
(``gateway.observe.trends``; this process's, like the counts).
Never a secret: targets show only their origin, key pools only key ids and states."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway import __version__
from gateway.observe import trends
from gateway.observe.counters import KEY_STATES, Observatory, _iso, _quantile, key_states
from gateway.observe.logs import hide_userinfo
from gateway.observe.trends import TargetTrend, TenantSpend
from gateway.observe.views import TargetView, TenantView
from gateway.store import StoreError

if TYPE_CHECKING:
    from gateway.runtime import Runtime


async def snapshot(observatory: Observatory, rt: Runtime) -> dict[str, Any]:
    """Everything ``/status.json`` serves (and ``/`` renders). Never a secret: targets show
    only their origin, key pools only key ids and states."""
    now = observatory.wall()
    problem = await rt.store_problem(1.0)
    store = {"backend": rt.store.backend, "url": rt.store.url_for_display,  # every password masked
             "healthy": problem is None, "error": problem}
    today = observatory.today()
    targets = []
    for name, target in rt.targets.items():
        view = observatory.targets.get(name) or TargetView()
        recent = sorted(view.recent)
        hits, misses = view.cache_hits, view.cache_misses
        circuit = rt.circuits.get(name)
        pool = rt.key_pools.get(name)
        keys = None
        if pool is not None:
            counts = key_states(pool)
            keys = {"total": sum(counts.values()), **counts,  # each key by its id (an env var's name), never its value
                    "keys": {key: KEY_STATES.get(state, state) for key, state in pool.states().items()}}
        targets.append({
            "name": name, "kind": target.kind, "provider": target.provider.name,
            "origin": hide_userinfo(target.base.origin),
            "circuit": circuit.state if circuit is not None else "closed",
            "requests": view.requests, "errors": view.errors,
            "error_rate": round(view.errors / view.requests, 4) if view.requests else 0.0,
            "latency_ms": {"p50": _quantile(recent, 0.50), "p99": _quantile(recent, 0.99)},
            "cache": {"hits": hits, "misses": misses,
                      "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None},
            "key_pool": keys,
            "inflight": observatory.inflight.get(name, 0),
            "spend_today_usd": round(view.spend_usd, 8) if view.spend_day == today else 0.0,
            "trend": (observatory.trends.get(name) or TargetTrend(now)).series(now),
        })
    tenants = []
    budgets = await _tenant_spend(rt, now) if store["healthy"] else {}
    for tenant in rt.config.tenants:
        name = tenant.name
        view = observatory.tenants.get(name) or TenantView()
        budget = tenant.budget
        spent = budgets.get(name, {})
        tenants.append({
            "name": name, "requests": view.requests, "rate_limited": view.rate_limited,
            "spend_today_usd": round(spent.get("daily", view.spend_usd if view.spend_day == today else 0.0), 8),
            "spend_month_usd": round(spent["monthly"], 8) if "monthly" in spent else None,
            "budget": None if budget is None else {"daily_usd": budget.daily_usd, "monthly_usd": budget.monthly_usd},
            "spend_by_hour_usd": (observatory.spend.get(name) or TenantSpend()).cumulative(now),
        })
    door = rt.guard
    bans = door.bans.active() if door is not None and door.bans is not None else []
    return {
        "version": __version__, "started_at": _iso(observatory.started), "now": _iso(now),
        "uptime_s": round(now - observatory.started, 1), "store": store, "trend_window": trends.window(now),
        "targets": targets, "tenants": tenants, "errors": list(observatory.last_errors),
        "bans": [{"id": _masked(b.subject), "until": _iso(b.until), "remaining_s": round(b.until - now, 1),
                  "reason": b.reason} for b in bans],
    }


async def _tenant_spend(rt: Runtime, now: float) -> dict[str, dict[str, float]]:
    """Each budgeted tenant's spend in its current day and month windows, from the store
    (reserved and settled: what the budget policy checks against)."""
    from policies.budget import windows

    out: dict[str, dict[str, float]] = {}
    for tenant in rt.config.tenants:
        name = tenant.name
        if tenant.budget is None:
            continue
        keys, _, _, resets = windows(name, tenant.budget, now)
        spent: dict[str, float] = {}
        for key, (window, _) in zip(keys, resets, strict=True):
            try:
                raw = await rt.store.get(key)
            except StoreError:
                continue
            spent[window] = float(raw) if raw else 0.0
        out[name] = spent
    return out


def _masked(subject: str) -> str:
    """A banned address as the public page shows it — ``ip:203.0.113.x``, ``ip:2001:db8:1::x`` — so the page does
    not publish who was banned; the admin API (``GET /admin/bans``) has the whole id, to lift it."""
    kind, _, value = subject.partition(":")
    if kind != "ip":
        return subject
    if "." in value:
        return f"ip:{value.rsplit('.', 1)[0]}.x"
    return "ip:" + ":".join(value.split(":")[:3]) + "::x"

