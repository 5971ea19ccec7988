"""Small event objects the policies emit, and the bus that hands them to whoever listens.

Policies never call a metrics library or format a log line for their state changes:
they ``emit`` one of these, and sinks subscribe (the JSON log below; Prometheus series
in ``gateway.observe.counters``; tests that assert a transition happened). Emitting
with nobody listening costs one attribute check. (stamina's instrumentation hooks,
pybreaker's listeners.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec

log = logging.getLogger("reliapi")


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


class Event(msgspec.Struct, frozen=True, tag_field="event", tag=lambda name: _snake(name)):
    target: str


class CircuitTransition(Event, frozen=True):
    """A target's circuit changed state (``closed``, ``open``, ``half_open``)."""

    from_state: str
    to_state: str
    reason: str  # why: "5 consecutive failures", "probe succeeded", "shared by another instance", …


class RetryScheduled(Event, frozen=True):
    reason: str  # the retry class: "429", "5xx", "net", "timeout", or "key" (another pool key at once)
    attempt: int  # the attempt about to be made (2 = first retry)
    delay_s: float


class RetryBudgetExhausted(Event, frozen=True):
    """A retry was skipped because too many of the target's active requests are already retries."""

    reason: str


class FallbackUsed(Event, frozen=True):
    to_target: str
    reason: str  # the failure of ``target`` that sent the request on: "server_error", "circuit_open", …


class StreamRecovered(Event, frozen=True):
    """A cut or stalled stream was continued (``stream_recovery: continue``)."""

    to_target: str
    reason: str


class KeyCooldown(Event, frozen=True):
    key_id: str  # the key's configured id or env var name — never the key
    cooldown_s: float


class KeyDisabled(Event, frozen=True):
    key_id: str
    reason: str


class BulkheadRejected(Event, frozen=True):
    limit: int


class RateLimitRefused(Event, frozen=True):
    """A request over a gateway rate limit got 429 (``target`` is where it was going)."""

    tenant: str | None
    limit: str  # the limit's name: "default" / "hourly" / "tokens" (a tenant's or per IP), "user" / "user-hourly"


class AbuseViolation(Event, frozen=True):
    """A request the gateway refused for its caller's behaviour, counted against a subject (``policies.abuse``)."""

    subject: str  # ip | key | fingerprint
    reason: str  # rate_limited | unauthorized | invalid_request | …


class Banned(Event, frozen=True):
    """A subject collected ``abuse.ban_after`` violations and is refused for ``ban_s``."""

    subject: str  # ip | key | fingerprint
    ban_s: float


class AnomalyDetected(Event, frozen=True):
    """A tenant looks wrong without breaking a limit: ``key_sharing`` or ``rate_jump``."""

    tenant: str
    kind: str


class CacheHit(Event, frozen=True):
    pass


class CacheMiss(Event, frozen=True):
    pass


class IdempotentReplay(Event, frozen=True):
    """A duplicate got the stored answer of its idempotency key."""


class Coalesced(Event, frozen=True):
    """A duplicate got the answer of a request still running (idempotency or the cache's single flight)."""

    policy: str  # "idempotency" | "cache"


class StoreDegraded(Event, frozen=True):
    """A policy met a store that failed and degraded (cache: pass-through; rate limit: its on-error mode;
    idempotency: 503, or pass-through with ``fail_open``)."""

    policy: str
    error: str


class UpstreamAnswered(Event, frozen=True):
    """One attempt ended: its answer came (the whole body, or a stream's first byte; ``status``), or it
    timed out or could not connect (``status`` 0)."""

    seconds: float
    status: int


class Billed(Event, frozen=True):
    """An answer's usage as the upstream billed it (``policies.usage``), counted once, when it is known: for a stream,
    at its end — which may come after the client that asked for it left (an answer others still shared)."""

    model: str  # as the client named it ("" when it did not)
    tenant: str | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None  # None: the model has no price


class BudgetEvent(Event, frozen=True):
    """A budget rule acted (metrics: ``budget_events_total{target,event}``)."""

    rule: str  # soft_cap (max_tokens lowered), hard_cap (refused), exhausted (tenant spend)


class ModelRouted(Event, frozen=True):
    """A virtual model was resolved (``routing:``; metrics: ``routing_decisions_total{route,rule,model}``)."""

    route: str  # the virtual model the client named
    rule: str  # the rule that applied, or "default"
    model: str  # the concrete model it became


Listener = Callable[[Event], None]

# Events worth a line in the gateway's own log (the rest are counted, not logged).
_LOGGED = {
    CircuitTransition: logging.WARNING, KeyDisabled: logging.ERROR, KeyCooldown: logging.INFO,
    StreamRecovered: logging.WARNING, RetryBudgetExhausted: logging.WARNING,
    FallbackUsed: logging.DEBUG,  # each is in its request's access line (primary_target, fallback_target)
}


class Events:
    def __init__(self) -> None:
        self._listeners: list[tuple[Listener, frozenset[type[Event]] | None]] = [(log_event, frozenset(_LOGGED))]
        # by event type, who hears it (made at its first emit): an event reaches only the listeners that
        # asked for its kind — one per request (UpstreamAnswered) goes straight to its counter
        self._routes: dict[type[Event], tuple[Listener, ...]] = {}

    def subscribe(self, listener: Listener, *kinds: type[Event]) -> Callable[[], None]:
        """Add a listener, for every event or only those of ``kinds``; returns a function that removes it."""
        entry = (listener, frozenset(kinds) or None)
        self._listeners.append(entry)
        self._routes.clear()

        def remove() -> None:
            self._listeners.remove(entry)
            self._routes.clear()
        return remove

    def emit(self, event: Event) -> None:
        listeners = self._routes.get(type(event))
        if listeners is None:
            kind = type(event)
            listeners = self._routes[kind] = tuple(
                listener for listener, kinds in self._listeners if kinds is None or kind in kinds)
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # a broken sink must never break a request
                log.exception("event listener failed")


def log_event(event: Event) -> None:
    level = _LOGGED.get(type(event))
    if level is not None and log.isEnabledFor(level):
        fields = msgspec.to_builtins(event)
        log.log(level, fields["event"].replace("_", " "), extra={"fields": fields})
