"""Prometheus exposition (SPEC §7): the observatory's counts as aioprometheus series.

Each Observatory has its own ``Registry`` (tests build many apps). The collectors are
filled from the observatory's dicts on every scrape rather than on every request; state
that lives elsewhere (circuits, key pools, in-flight counts) is read then too, and those
gauges are rebuilt each time, so a target a reload removed disappears.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aioprometheus import Counter, Gauge, Histogram, Registry
from aioprometheus import histogram as prom_histogram
from aioprometheus.metricdict import MetricDict
from aioprometheus.renderer import render

from gateway.keys import OBSERVATORY, RUNTIME
from gateway.observe.counters import (
    CIRCUIT_STATES,
    COST_BUCKETS,
    DURATION_BUCKETS,
    TTFT_BUCKETS,
    Hist,
    Observatory,
    key_states,
)

if TYPE_CHECKING:
    from gateway.runtime import Runtime


class Exposition:
    def __init__(self) -> None:
        self.registry, self._collectors = _collectors()

    def render(self, obs: Observatory, rt: Runtime, accept: list[str]) -> tuple[bytes, dict[str, str]]:
        """Fill the collectors from the counts and render them (text format).

        Label values are escaped here (aioprometheus writes them as given): ``model`` comes
        from the client's request body and must not be able to break or forge a line.
        Gauges are rebuilt on every scrape, so a target a reload removed disappears."""
        c = self._collectors
        by_kind: dict[tuple[str, str, str], int] = {}  # the seed's names (reliapi_{http,llm}_requests_total)
        for (target, kind, route, status, tenant), n in obs.requests.items():
            c["requests"].set({"target": _esc(target), "kind": kind, "route": route, "status": status,
                               "tenant": _esc(tenant)}, n)
            key = (kind, target, status)
            by_kind[key] = by_kind.get(key, 0) + n
        for (kind, target, status), n in by_kind.items():
            if kind in ("http", "llm"):
                c[kind + "_requests"].set({"target": _esc(target), "status": status}, n)
        for (target, kind), h in obs.durations.items():
            c["duration"].set_value({"target": _esc(target), "kind": kind}, _export(h))
            c["latency_ms"].set_value({"target": _esc(target), "kind": kind}, _export(h, 1000.0))
        for target, h in obs.upstream.items():
            c["upstream"].set_value({"target": _esc(target)}, _export(h))
        for target, h in obs.ttft.items():
            c["ttft"].set_value({"target": _esc(target)}, _export(h))
        for (target, model), h in obs.cost_per_answer.items():
            c["cost_per_answer"].set_value({"target": _esc(target), "model": _esc(model)}, _export(h))
        for (target, code), n in obs.errors.items():
            c["errors"].set({"target": _esc(target), "code": _esc(code)}, n)
        for (target, reason), n in obs.retries.items():
            c["retries"].set({"target": _esc(target), "reason": _esc(reason)}, n)
        for name, counts in (("cache_hits", obs.cache_hits), ("cache_misses", obs.cache_misses),
                             ("idempotent_hits", obs.idempotent_hits), ("coalesced", obs.coalesced)):
            for target, n in counts.items():
                c[name].set({"target": _esc(target)}, n)
        for (target, to), n in obs.transitions.items():
            c["transitions"].set({"target": _esc(target), "to": to}, n)
        for (src, dst), n in obs.fallbacks.items():
            c["fallbacks"].set({"from": _esc(src), "to": _esc(dst)}, n)
        for tenant, n in obs.rate_limited.items():
            c["rate_limited"].set({"tenant": _esc(tenant)}, n)
        for (target, event), n in obs.budget_events.items():
            c["budget"].set({"target": _esc(target), "event": event}, n)
        for (route, rule, model), n in obs.routed.items():
            c["routed"].set({"route": _esc(route), "rule": _esc(rule), "model": _esc(model)}, n)
        for (subject, reason), n in obs.violations.items():
            c["violations"].set({"subject": subject, "reason": reason}, n)
        for subject, n in obs.bans.items():
            c["bans"].set({"subject": subject}, n)
        for (tenant, kind), n in obs.anomalies.items():
            c["anomalies"].set({"tenant": _esc(tenant), "kind": kind}, n)
        for (target, policy), n in obs.store_degraded.items():
            c["store_degraded"].set({"target": _esc(target), "policy": policy}, n)
        for (target, model, kind), n in obs.tokens.items():
            c["tokens"].set({"target": _esc(target), "model": _esc(model), "kind": kind}, n)
        for (target, model, tenant), usd in obs.cost.items():
            c["cost"].set({"target": _esc(target), "model": _esc(model), "tenant": _esc(tenant)}, usd)
        spans = rt.spans
        if spans is not None:  # span export (gateway.observe.otel) is on
            for reason, n in spans.dropped.items():
                c["spans_dropped"].set({"reason": reason}, n)
            c["spans_exported"].set({}, spans.exported)
        for name in ("inflight", "circuit", "keys"):
            c[name].values = MetricDict()
        for name in rt.targets:
            c["inflight"].set({"target": _esc(name)}, obs.inflight.get(name, 0))
        for name, circuit in rt.circuits.items():
            c["circuit"].set({"target": _esc(name)}, CIRCUIT_STATES.get(circuit.state, 0))
        for name, pool in rt.key_pools.items():
            for state, n in key_states(pool).items():
                c["keys"].set({"target": _esc(name), "state": state}, n)
        return render(self.registry, accept)


def _export(hist: Hist, scale: float = 1.0) -> prom_histogram.Histogram:
    """``scale``: the same counts in another unit (seconds × 1000: milliseconds)."""
    bounds = hist.bounds if scale == 1.0 else tuple(b * scale for b in hist.bounds)
    h = prom_histogram.Histogram(*bounds)
    running = 0
    for bound, count in zip((*bounds, prom_histogram.POS_INF), hist.counts, strict=True):
        running += count
        h.buckets[bound] = running
    h.observations, h.sum = hist.n, hist.sum * scale
    return h


_LABEL_SPECIAL = re.compile(r'[\\"\n]')


def _esc(value: str) -> str:
    """A label value as the Prometheus text format wants it: backslash, quote and newline escaped."""
    if _LABEL_SPECIAL.search(value) is None:
        return value
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _collectors() -> tuple[Registry, dict[str, Any]]:
    r = Registry()
    p = "reliapi_"
    c: dict[str, Any] = {
        "requests": Counter(p + "requests_total", "Requests answered, by target, kind, route, status and tenant.", registry=r),
        "duration": Histogram(p + "request_duration_seconds", "Time from request to the end of the answer.",
                              registry=r, buckets=DURATION_BUCKETS),
        # the names the ReliAPI wiki (seeds) gives: the same counts, by fewer labels / in milliseconds
        "http_requests": Counter(p + "http_requests_total", "Requests to plain-HTTP targets, by target and status "
                                 "(reliapi_requests_total{kind=\"http\"} summed over route and tenant).", registry=r),
        "llm_requests": Counter(p + "llm_requests_total", "Requests to LLM targets, by target and status "
                                "(reliapi_requests_total{kind=\"llm\"} summed over route and tenant).", registry=r),
        "latency_ms": Histogram(p + "latency_ms", "reliapi_request_duration_seconds in milliseconds.", registry=r,
                                buckets=tuple(b * 1000.0 for b in DURATION_BUCKETS)),
        "upstream": Histogram(p + "upstream_duration_seconds",
                              "Upstream answer time per attempt (to the whole body, or a stream's first byte).",
                              registry=r, buckets=DURATION_BUCKETS),
        "ttft": Histogram(p + "ttft_seconds", "Time to the first streamed byte.", registry=r, buckets=TTFT_BUCKETS),
        "errors": Counter(p + "errors_total", "Requests that did not end well, by error code.", registry=r),
        "retries": Counter(p + "retries_total", "Retries scheduled, by reason (429, 5xx, net, timeout, key).", registry=r),
        "cache_hits": Counter(p + "cache_hits_total", "Answers served from the cache.", registry=r),
        "cache_misses": Counter(p + "cache_misses_total", "Cacheable requests not in the cache.", registry=r),
        "idempotent_hits": Counter(p + "idempotent_hits_total", "Duplicates answered from a stored answer.", registry=r),
        "coalesced": Counter(p + "coalesced_total", "Duplicates that joined a request in flight.", registry=r),
        "circuit": Gauge(p + "circuit_breaker_state", "Circuit state: 0 closed, 1 open, 2 half-open.", registry=r),
        "transitions": Counter(p + "circuit_breaker_transitions_total", "Circuit state changes, by new state.",
                               registry=r),
        "fallbacks": Counter(p + "fallbacks_total", "Requests sent on to a fallback target.", registry=r),
        "rate_limited": Counter(p + "rate_limited_total", "Requests refused by a gateway rate limit.", registry=r),
        "violations": Counter(p + "abuse_violations_total", "Requests refused for the caller's behaviour, by the "
                              "subject they counted against (ip, key, fingerprint) and why.", registry=r),
        "bans": Counter(p + "bans_total", "Subjects banned for too many violations.", registry=r),
        "anomalies": Counter(p + "anomalies_total", "Anomalies detected (key_sharing, rate_jump), by tenant.",
                             registry=r),
        "routed": Counter(p + "routing_decisions_total", "Virtual models resolved (routing:), by the virtual model "
                          "(route), the rule that applied (or default) and the concrete model.", registry=r),
        "budget": Counter(p + "budget_events_total", "Budget rules that acted (soft_cap, hard_cap, exhausted).",
                          registry=r),
        "store_degraded": Counter(p + "store_degraded_total",  # SPEC §8: a store that fails is "logged, metric"
                                  "Requests a policy served degraded because the store failed (cache, "
                                  "idempotency, rate_limit, budget).", registry=r),
        "tokens": Counter(p + "llm_tokens_total", "LLM tokens, by kind (prompt, completion).", registry=r),
        "cost": Counter(p + "llm_cost_usd_total", "LLM spend in USD at list prices.", registry=r),
        "cost_per_answer": Histogram(p + "llm_cost_usd", "USD of each priced LLM answer, at list prices.",
                                     registry=r, buckets=COST_BUCKETS),
        "inflight": Gauge(p + "inflight_requests", "Requests being answered now.", registry=r),
        "spans_dropped": Counter(p + "trace_spans_dropped_total", "Spans not exported, by reason (queue_full: the "
                                 "export queue was full; export_failed: the OTLP endpoint did not take them).", registry=r),
        "spans_exported": Counter(p + "trace_spans_exported_total", "Spans the OTLP endpoint took.", registry=r),
        "keys": Gauge(p + "key_pool_keys", "Pool keys by state (active, cooling, disabled).", registry=r),
    }
    return r, c


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text exposition."""
    rt = request.app[RUNTIME].current
    body, headers = request.app[EXPOSITION].render(request.app[OBSERVATORY], rt, request.headers.getall("Accept", []))
    return web.Response(body=body, headers=headers)


EXPOSITION: web.AppKey[Exposition] = web.AppKey("exposition")  # the app's own Prometheus registry
