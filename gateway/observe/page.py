"""The status page ``GET /`` and its data ``GET /status.json`` (``gateway.observe.status``).

The page is rendered whole on the server (aiohttp-jinja2, autoescaped), so it is useful
without JavaScript; a small inline script then fetches ``/status.json`` every two seconds
and updates the same elements in place (``textContent``, and the trend charts' inline SVG, which
``gateway.observe.charts`` draws and the script redraws from the same series). Everything it needs is in
the one response — no CDN, no fonts, no images — and a Content-Security-Policy holds the
browser to that. The formatting helpers below are mirrored by the script's ``fmt``: change
one, change both.

It is served by the process that proxies, so a render is one snapshot and one compiled
template (templates are not re-read from disk), and a hidden browser tab stops polling.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
import msgspec
from aiohttp import web

from gateway.keys import OBSERVATORY, RUNTIME
from gateway.observe import charts
from gateway.observe.status import snapshot
from gateway.observe.trends import POINTS, SERIES

TEMPLATES = Path(__file__).parent / "templates"
ERRORS_SHOWN = 20  # of the observatory's last 50; /status.json has them all
DASH = "\u2014"

# Targets and tenants added by a config reload get their rows from these blank ones.
BLANK_TARGET: dict[str, Any] = {
    "name": "", "kind": "", "provider": "", "origin": "", "circuit": "closed", "requests": 0, "errors": 0,
    "error_rate": 0.0, "latency_ms": {"p50": None, "p99": None}, "cache": {"hits": 0, "misses": 0, "hit_ratio": None},
    "key_pool": None, "inflight": 0, "spend_today_usd": 0.0,
    "trend": {**{name: [None] * POINTS for name in SERIES}, "circuit_marks": []},
}
BLANK_TENANT: dict[str, Any] = {"name": "", "requests": 0, "rate_limited": 0, "spend_today_usd": 0.0,
                                "spend_month_usd": None, "budget": None, "spend_by_hour_usd": [None] * 24}
BLANK_ERROR: dict[str, Any] = {"ts": "", "request_id": "", "target": None, "tenant": None, "route": "", "method": "",
                               "status": 0, "code": "", "message": None, "upstream_status": None}


async def status_json(request: web.Request) -> web.Response:
    data = await snapshot(request.app[OBSERVATORY], request.app[RUNTIME].current)
    return web.Response(body=msgspec.json.encode(data), content_type="application/json",
                        headers={"Cache-Control": "no-store"})


async def page(request: web.Request) -> web.Response:
    data = await snapshot(request.app[OBSERVATORY], request.app[RUNTIME].current)
    nonce = secrets.token_urlsafe(16)
    context = {
        "s": data, "summary": summary(data), "errors": data["errors"][:ERRORS_SHOWN], "errors_shown": ERRORS_SHOWN,
        "nonce": nonce, "blank_target": BLANK_TARGET, "blank_tenant": BLANK_TENANT, "blank_error": BLANK_ERROR,
        "charts": charts.CHARTS, "geometry": {"w": charts.W, "h": charts.H, "pad": charts.PAD},
    }
    response = aiohttp_jinja2.render_template("status.html", request, context)
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    # Only this response's own script, its inline styles and same-origin fetches: no external asset can load.
    response.headers["Content-Security-Policy"] = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; img-src data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return response


def add_routes(app: web.Application, wrap: Callable[[Any], Any] = lambda handler: handler) -> None:
    aiohttp_jinja2.setup(
        app, loader=jinja2.FileSystemLoader(TEMPLATES), auto_reload=False, trim_blocks=True, lstrip_blocks=True,
        filters=FILTERS, default_helpers=False,
    )
    app.router.add_get("/", wrap(page))
    app.router.add_get("/status.json", wrap(status_json))


# -- what the page shows (mirrored in the template's script) ---------------------------------


def summary(data: dict[str, Any]) -> dict[str, int]:
    targets = data["targets"]
    circuits = [t["circuit"] for t in targets]
    return {
        "requests": sum(t["requests"] for t in targets), "inflight": sum(t["inflight"] for t in targets),
        "targets": len(targets), "open": circuits.count("open"), "half_open": circuits.count("half_open"),
    }


def fmt_count(n: int | None) -> str:
    return DASH if n is None else f"{n:,}"


def fmt_pct(ratio: float | None) -> str:
    return DASH if ratio is None else f"{ratio * 100:.1f}%"


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return DASH
    if ms < 100:
        return f"{ms:.1f} ms"
    return f"{ms:.0f} ms" if ms < 10_000 else f"{ms / 1000:.1f} s"


def fmt_usd(usd: float | None) -> str:
    if usd is None:
        return DASH
    if usd == 0:
        return "$0.00"
    if abs(usd) < 0.01:  # LLM calls cost fractions of a cent: show them, not $0.0000
        return f"${usd:.6f}"
    return f"${usd:.4f}" if abs(usd) < 1 else f"${usd:,.2f}"


def fmt_rate(per_s: float | None) -> str:
    if per_s is None:
        return DASH
    return f"{per_s:.2f}/s" if per_s < 10 else f"{per_s:.1f}/s"


def fmt_value(value: float | None, unit: str) -> str:
    """A chart's number in its unit: ``rate``, ``pct``, ``count``, ``ms`` or ``usd``."""
    return UNITS[unit](value)


def fmt_latest(values: list[float | None], unit: str) -> str:
    """A chart's newest values, one per series: ``12.0 ms · 40.0 ms``."""
    return " · ".join(fmt_value(v, unit) for v in values)


def fmt_uptime(seconds: float) -> str:
    s = int(seconds)
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m}m"
    return f"{m}m {s % 60}s" if m else f"{s}s"


def fmt_clock(iso: str | None) -> str:
    """``2025-01-02T03:04:05.678Z`` → ``03:04:05`` (UTC, as the data says)."""
    return iso[11:19] if iso and len(iso) >= 19 else (iso or "")


def fmt_state(state: str) -> str:
    return state.replace("_", "-")


def error_level(t: dict[str, Any]) -> str:
    if not t["requests"] or not t["errors"]:
        return ""
    return "bad" if t["error_rate"] >= 0.05 else "warn"


def keys_view(pool: dict[str, int] | None) -> dict[str, str]:
    """A key pool's health as ``2/3`` (active of all) plus what the others are doing."""
    if pool is None:
        return {"text": DASH, "detail": "", "level": ""}
    ok = pool["active"]
    ids = pool.get("keys") or {}
    parts = [f"{pool[s]} {s} ({', '.join(k for k, v in ids.items() if v == s)})" if ids else f"{pool[s]} {s}"
             for s in ("cooling", "disabled") if pool[s]]
    level = "bad" if pool["disabled"] or ok <= 0 else "warn" if pool["cooling"] else "ok"
    return {"text": f"{ok}/{pool['total']}", "detail": " · ".join(parts) or "healthy", "level": level}


def spend_view(spent: float | None, limit: float | None) -> dict[str, Any]:
    """Spend against an optional limit: the text, and the bar's fill (percent) and level."""
    if spent is None:
        return {"text": DASH, "bar": None, "level": ""}
    if limit is None:
        return {"text": fmt_usd(spent), "bar": None, "level": ""}
    ratio = spent / limit if limit > 0 else (1.0 if spent > 0 else 0.0)
    level = "bad" if ratio >= 1 else "warn" if ratio >= 0.8 else "ok"
    return {"text": f"{fmt_usd(spent)} of {fmt_usd(limit)}", "bar": round(min(ratio, 1.0) * 100, 1), "level": level}


def status_level(status: int) -> str:
    return "bad" if status >= 500 or status == 0 else "warn"


UNITS: dict[str, Callable[[Any], str]] = {"rate": fmt_rate, "pct": fmt_pct, "count": fmt_count, "ms": fmt_ms,
                                          "usd": fmt_usd}
FILTERS = {
    "num": fmt_count, "pct": fmt_pct, "ms": fmt_ms, "usd": fmt_usd, "uptime": fmt_uptime, "clock": fmt_clock,
    "state": fmt_state, "error_level": error_level, "keys_view": keys_view, "spend_view": spend_view,
    "status_level": status_level, "value": fmt_value, "latest": fmt_latest, "charts": charts.target_charts,
    "spend_chart": charts.spend_chart,
}
