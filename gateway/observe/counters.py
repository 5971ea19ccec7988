"""What the gateway has seen: the numbers behind ``/metrics``, ``/status.json`` and ``/``.

Two feeds, both cheap on the hot path:

- ``record(fields)``: the request's access-log record (``gateway.edge.access``), once per
  request, whether or not the access log is written;
- ``on_event(event)``: the small event objects the policies emit (``gateway.observe.events``).

Both only add to plain dicts keyed by label tuples; ``gateway.observe.metrics`` turns them into
Prometheus series when ``/metrics`` is scraped, so a request never pays for label hashing
or a metrics library. ``gateway.observe.status`` reads them, with the store, for ``/status.json``.
The configured targets' last fifteen minutes and tenants' spend by hour are kept in fixed rings
(``gateway.observe.trends``), fed by the same two calls.

The observatory outlives config reloads (it belongs to the app, like the event bus), so
counters never go backwards while the process runs. Everything here is per process;
spend against tenant budgets is read from the store, where it is fleet-wide.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from gateway.flow.marketplace import TENANT_PREFIX
from gateway.observe.events import (
    AbuseViolation,
    AnomalyDetected,
    Banned,
    Billed,
    BudgetEvent,
    CacheHit,
    CacheMiss,
    CircuitTransition,
    Coalesced,
    Event,
    Events,
    FallbackUsed,
    IdempotentReplay,
    ModelRouted,
    RateLimitRefused,
    RetryScheduled,
    StoreDegraded,
    UpstreamAnswered,
)
from gateway.observe.trends import TargetTrend, TenantSpend
from gateway.observe.views import Hist, ModelView, TargetView, TenantView

# Request latency in seconds: from 5 ms (a cache hit) to two minutes (a long generation).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
COST_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)  # USD per answer
CIRCUIT_STATES = {"closed": 0, "open": 1, "half_open": 2}
KEY_STATES = {"healthy": "active"}  # policies.key_pool's word → the metric's (cooling, disabled: the same)
LAST_ERRORS = 50
MAX_MODELS = 200  # distinct ``model`` label values; later new ones are counted as OTHER_MODEL
OTHER_MODEL = "(other)"



def tenant_label(name: str | None) -> str:
    """A tenant as counted here (metric labels, the status page): marketplace users, who come and go by the
    thousand, are counted together as ``rapidapi/*`` — each one's own numbers are its usage rows."""
    if not name:
        return ""
    return TENANT_PREFIX + "*" if name.startswith(TENANT_PREFIX) else name

def _inc(d: dict[Any, float], key: Any, by: float = 1) -> None:
    d[key] = d.get(key, 0) + by


class Observatory:
    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self.wall = wall
        self.started = wall()
        # target, kind, route, status (int), tenant → [count, duration Hist, TargetView]; see ``requests``
        self._requests: dict[tuple[str, str, str, int, str], list[Any]] = {}
        self.durations: dict[tuple[str, str], Hist] = {}  # target, kind
        self.upstream: dict[str, Hist] = {}
        self.ttft: dict[str, Hist] = {}
        self.cost_per_answer: dict[tuple[str, str], Hist] = {}  # (target, model): USD of each priced answer
        self.errors: dict[tuple[str, str], int] = {}  # target, code
        self.retries: dict[tuple[str, str], int] = {}  # target, reason
        self.cache_hits: dict[str, int] = {}
        self.cache_misses: dict[str, int] = {}
        self.idempotent_hits: dict[str, int] = {}
        self.coalesced: dict[str, int] = {}
        self.transitions: dict[tuple[str, str], int] = {}  # target, to
        self.fallbacks: dict[tuple[str, str], int] = {}  # from, to
        self.rate_limited: dict[str, int] = {}  # tenant
        self.violations: dict[tuple[str, str], int] = {}  # subject kind, reason
        self.bans: dict[str, int] = {}  # subject kind
        self.anomalies: dict[tuple[str, str], int] = {}  # tenant, kind
        self.budget_events: dict[tuple[str, str], int] = {}  # target, event
        self.routed: dict[tuple[str, str, str], int] = {}  # virtual model, rule, concrete model
        self.store_degraded: dict[tuple[str, str], int] = {}  # target, policy
        self._models: dict[tuple[str, str, str], ModelView] = {}  # target, model, tenant (see ``tokens``, ``cost``)
        self.inflight: dict[str, int] = {}
        self.models: set[str] = set()
        self.targets: dict[str, TargetView] = {}
        self.tenants: dict[str, TenantView] = {}
        self.last_errors: deque[dict[str, Any]] = deque(maxlen=LAST_ERRORS)
        self.trends: dict[str, TargetTrend] = {}  # the configured targets' last 15 minutes (``track``)
        self.spend: dict[str, TenantSpend] = {}  # the configured tenants' spend today, by hour
        self._day = ("", -1.0)  # (YYYY-MM-DD, the second it was computed for)
        self._handlers: dict[type[Event], Callable[[Any], None]] = {
            RetryScheduled: self._retry, CacheHit: self._cache_hit, CacheMiss: self._cache_miss,
            IdempotentReplay: self._idempotent, Coalesced: self._coalesced, CircuitTransition: self._transition,
            FallbackUsed: self._fallback, RateLimitRefused: self._rate_limited, BudgetEvent: self._budget,
            UpstreamAnswered: self._upstream, StoreDegraded: self._store_degraded, ModelRouted: self._routed,
            Billed: self._billed,
            AbuseViolation: self._violation, Banned: self._banned, AnomalyDetected: self._anomaly,
        }

    def track(self, targets: list[str], tenants: list[str]) -> None:
        """Keep trends for these (the config's) targets and tenants: each runtime calls it, so a reload
        adds the new ones; memory is fixed per name, and names come only from config."""
        now = self.wall()
        for name in targets:
            if name not in self.trends:
                self.trends[name] = self._view(name).trend = TargetTrend(now)
        for name in tenants:
            if name not in self.spend:
                view = self.tenants.get(name)
                if view is None:
                    view = self.tenants[name] = TenantView()
                self.spend[name] = view.hourly = TenantSpend()

    # -- feeds -----------------------------------------------------------------------

    def record(self, f: dict[str, Any]) -> None:
        """One finished request, from its access-log record (its tokens and spend come as ``Billed``)."""
        target = f["target"] or ""  # "": refused before a target was chosen
        tenant = f["tenant"]
        tenant = tenant_label(tenant) if tenant else ""
        kind = f["kind"] or ""
        status = f["status"]
        latency_ms = f["latency_ms"]
        key = (target, kind, f["route"], status, tenant)
        requests = self._requests
        slot = requests.get(key)
        if slot is None:
            slot = self._slot(key)
        slot[0] += 1  # (count, Hist, TargetView): the label tuple and its objects are found once
        slot[1].observe(latency_ms / 1000)
        view = slot[2]
        view.requests += 1
        view.recent.append(latency_ms)
        ttft = f["ttft_ms"]
        trend = view.trend
        if trend is not None:
            trend.request(self.wall(), latency_ms, ttft)
        if ttft is not None:
            h = self.ttft.get(target)
            if h is None:
                h = self.ttft[target] = Hist(TTFT_BUCKETS)
            h.observe(ttft / 1000)
        outcome = f["outcome"]
        if outcome != "ok":
            code = f["error_code"] or (f"upstream_{status}" if outcome == "upstream_error" else outcome)
            _inc(self.errors, (target, code))
            if status >= 500 or outcome == "stream_error":  # the gateway's own 4xx refusals are not the target's
                view.errors += 1
            if outcome != "client_closed":
                self._error(f, code)
        if tenant:
            tv = self.tenants.get(tenant)
            if tv is None:
                tv = self.tenants[tenant] = TenantView()
            tv.requests += 1

    def _billed(self, e: Billed) -> None:
        """Tokens and spend of one billed answer, from ``policies.usage`` rather than the access record: a stream
        shared with others goes on after its own client left (and was logged), and is counted when it ends."""
        target, model = e.target, e.model
        tenant = tenant_label(e.tenant)
        mv = self._models.get((target, model, tenant))
        if mv is None:
            mv = self._model_view(target, model, tenant)
        mv.prompt += e.prompt_tokens
        mv.completion += e.completion_tokens
        cost = e.cost_usd
        if cost is not None:
            h = mv.per_answer
            if h is None:
                h = mv.per_answer = self._per_answer(target, model)
            h.observe(cost)
        if cost:
            mv.cost += cost
            now = self.wall()
            day = self.today(now)
            view = self._view(target)
            if view.spend_day != day:
                view.spend_day, view.spend_usd = day, 0.0
            view.spend_usd += cost
            if tenant:
                tv = self.tenants.get(tenant)
                if tv is None:
                    tv = self.tenants[tenant] = TenantView()
                if tv.spend_day != day:
                    tv.spend_day, tv.spend_usd = day, 0.0
                tv.spend_usd += cost
                if tv.hourly is not None:
                    tv.hourly.add(now, cost)

    def _model(self, model: str) -> str:
        """The model as a label value: the client names it, so past ``MAX_MODELS`` new ones count as one."""
        if model not in self.models:
            if len(self.models) >= MAX_MODELS:
                return OTHER_MODEL
            self.models.add(model)
        return model

    def _model_view(self, target: str, model: str, tenant: str) -> ModelView:
        label = self._model(model)
        mv = self._models.get((target, label, tenant))
        if mv is None:
            mv = self._models[(target, label, tenant)] = ModelView()
        return mv

    def _per_answer(self, target: str, model: str) -> Hist:
        key = (target, self._model(model))
        h = self.cost_per_answer.get(key)
        if h is None:
            h = self.cost_per_answer[key] = Hist(COST_BUCKETS)
        return h

    @property
    def tokens(self) -> dict[tuple[str, str, str], int]:
        """Tokens answered by (target, model, kind): ``prompt`` and ``completion``, all tenants together."""
        out: dict[tuple[str, str, str], int] = {}
        for (target, model, _), mv in self._models.items():
            for kind, n in (("prompt", mv.prompt), ("completion", mv.completion)):
                out[(target, model, kind)] = out.get((target, model, kind), 0) + n
        return out

    @property
    def cost(self) -> dict[tuple[str, str, str], float]:
        """USD of the priced answers by (target, model, tenant)."""
        return {key: mv.cost for key, mv in self._models.items() if mv.cost}

    def _slot(self, key: tuple[Any, ...]) -> list[Any]:
        target, kind = key[0], key[1]
        hist = self.durations.get((target, kind))
        if hist is None:
            hist = self.durations[(target, kind)] = Hist(DURATION_BUCKETS)
        slot = self._requests[key] = [0, hist, self._view(target)]
        return slot

    @property
    def requests(self) -> dict[tuple[str, str, str, str, str], int]:
        """Requests answered by (target, kind, route, status, tenant), status as text (the metric's label)."""
        return {(t, k, r, str(s), n): slot[0] for (t, k, r, s, n), slot in self._requests.items()}

    def _error(self, f: dict[str, Any], code: str) -> None:
        self.last_errors.appendleft({
            "ts": f["ts"] or _iso(self.wall()), "request_id": f["request_id"], "target": f["target"],
            "tenant": f["tenant"], "route": f["route"], "method": f["method"], "status": f["status"],
            "path": f.get("path"), "code": code, "upstream_status": f["upstream_status"],
            "message": f.get("error_message") or (f"the upstream answered {f['upstream_status']}"
                                                  if f["upstream_status"] else None),
        })

    def listen(self, events: Events) -> None:
        """Hear the events counted here, each kind straight at its handler."""
        for kind, handler in self._handlers.items():
            events.subscribe(handler, kind)

    def on_event(self, event: Event) -> None:
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event)

    def _retry(self, e: RetryScheduled) -> None:
        _inc(self.retries, (e.target, e.reason))
        trend = self.trends.get(e.target)
        if trend is not None:
            trend.retry(self.wall())

    def _cache_hit(self, e: CacheHit) -> None:
        _inc(self.cache_hits, e.target)
        self._view(e.target).cache_hits += 1

    def _cache_miss(self, e: CacheMiss) -> None:
        _inc(self.cache_misses, e.target)
        self._view(e.target).cache_misses += 1

    def _idempotent(self, e: IdempotentReplay) -> None:
        _inc(self.idempotent_hits, e.target)

    def _coalesced(self, e: Coalesced) -> None:
        _inc(self.coalesced, e.target)

    def _transition(self, e: CircuitTransition) -> None:
        _inc(self.transitions, (e.target, e.to_state))
        trend = self.trends.get(e.target)
        if trend is not None:
            trend.transition(self.wall(), e.to_state)

    def _fallback(self, e: FallbackUsed) -> None:
        _inc(self.fallbacks, (e.target, e.to_target))
        trend = self.trends.get(e.target)  # the target that failed and sent the request on
        if trend is not None:
            trend.fallback(self.wall())

    def _violation(self, e: AbuseViolation) -> None:
        _inc(self.violations, (e.subject, e.reason))

    def _banned(self, e: Banned) -> None:
        _inc(self.bans, e.subject)

    def _anomaly(self, e: AnomalyDetected) -> None:
        _inc(self.anomalies, (e.tenant, e.kind))

    def _rate_limited(self, e: RateLimitRefused) -> None:
        tenant = tenant_label(e.tenant)
        _inc(self.rate_limited, tenant)
        if tenant:
            view = self.tenants.get(tenant)
            if view is None:
                view = self.tenants[tenant] = TenantView()
            view.rate_limited += 1

    def _routed(self, e: ModelRouted) -> None:
        _inc(self.routed, (e.route, e.rule, e.model))  # config values only: the label set is bounded

    def _budget(self, e: BudgetEvent) -> None:
        _inc(self.budget_events, (e.target, e.rule))

    def _store_degraded(self, e: StoreDegraded) -> None:
        _inc(self.store_degraded, (e.target, e.policy))

    def _upstream(self, e: UpstreamAnswered) -> None:
        target = e.target
        h = self.upstream.get(target)
        if h is None:
            h = self.upstream[target] = Hist(DURATION_BUCKETS)
        h.observe(e.seconds)
        trend = self.trends.get(target)
        if trend is not None:
            trend.attempt(self.wall(), e.status)

    def _view(self, target: str) -> TargetView:
        view = self.targets.get(target)
        if view is None:
            view = self.targets[target] = TargetView()
        return view

    def today(self, now: float | None = None) -> str:
        if now is None:
            now = self.wall()
        if int(now) != self._day[1]:
            self._day = (time.strftime("%Y-%m-%d", time.gmtime(now)), int(now))
        return self._day[0]

    # -- in flight --------------------------------------------------------------------

    def enter(self, target: str) -> None:
        self.inflight[target] = self.inflight.get(target, 0) + 1

    def leave(self, target: str) -> None:
        self.inflight[target] -= 1


def key_states(pool: Any) -> dict[str, int]:
    """A key pool's keys by state, in the words of ``key_pool_keys``: a healthy key is ``active``."""
    counts = {"active": 0, "cooling": 0, "disabled": 0}
    for state in pool.states().values():
        state = KEY_STATES.get(state, state)
        counts[state] = counts.get(state, 0) + 1
    return counts


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
