"""Retry (SPEC §5): the same target again, for failures that may pass — within a deadline and a budget.

What is retried is decided by the attempt's ``Failure`` (``gateway.failures``): its class
picks the rule in the target's ``retry_matrix`` (``attempts`` = retries after the first
try, per class; the largest of them also bounds the total), other 4xx never, and the
upstream's ``x-should-retry`` wins over both. A spent quota (``insufficient_quota``) is
never retried. Nothing is retried once a response byte reached the client: this policy
only ever sees an attempt up to its first body byte.

When:
- the first retry after a broken connection is immediate (a pooled keep-alive connection the
  upstream had just closed is the usual cause); later ones back off;
- ``Retry-After`` (seconds, HTTP-date, or ``retry-after-ms``) is honoured as given; one
  longer than the rule's ``max_s`` or than what is left of ``total_timeout_ms`` ends the
  retries (the caller falls back, or the client gets the answer with its Retry-After);
- otherwise exponential backoff with full jitter: uniform in [0, min(max_s, base_s·2^n))
  for the n-th retry of that class (AWS "Exponential Backoff and Jitter");
- ``total_timeout_ms`` bounds every attempt and every wait; no attempt starts after it.

Whether:
- plain-HTTP targets retry POST and PATCH only when the request provably never left
  (the connection failed), when it carries an idempotency key (header, or the envelope's field), or with
  ``retry_non_idempotent: true`` (RFC 9110 §9.2.2); LLM targets retry POST;
- a retry budget per target (Envoy's): requests in their retry phase may be at most
  ``retry_budget.percent`` of the target's active requests (never fewer than
  ``min_concurrent``), so a failing upstream is not stormed; a skipped retry is an event;
- an open circuit stops the retries: the answer of the last attempt stands.

Request bodies are always read whole (bounded by ``server.max_body_mb``), so every
accepted request can be replayed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.config.model import RetryRule
from gateway.errors import CircuitOpen, GatewayError
from gateway.failures import Failure, failure_of
from gateway.flow.exchange import Exchange, Reply
from gateway.headers import IDEMPOTENCY_KEYS
from gateway.observe.events import RetryBudgetExhausted, RetryScheduled

if TYPE_CHECKING:
    from gateway.flow.chain import Handler, Policy
    from gateway.flow.context import Context
    from gateway.upstream.targets import Target
    from policies.circuit_breaker import SharedCircuit

_NON_IDEMPOTENT = frozenset({"POST", "PATCH"})


def backoff_s(rule: RetryRule, n: int, random: Callable[[], float]) -> float:
    """The wait before the ``n``-th retry (0-based) of a class, without a Retry-After."""
    if rule.backoff == "exp-jitter":
        return random() * min(rule.max_s, rule.base_s * 2**n)
    if rule.backoff == "exp":
        return min(rule.max_s, rule.base_s * 2**n)
    if rule.backoff == "linear":
        return min(rule.max_s, rule.base_s * (n + 1))
    return min(rule.max_s, rule.base_s)


class RetryBudget:
    """Envoy's retry budget: concurrent retrying requests ≤ max(min_concurrent, percent of active)."""

    __slots__ = ("percent", "min_concurrent", "active", "retrying")

    def __init__(self, percent: float, min_concurrent: int) -> None:
        self.percent = percent
        self.min_concurrent = min_concurrent
        self.active = 0  # requests inside this target's retry policy
        self.retrying = 0  # of those, the ones past their first attempt

    def allows_another(self) -> bool:
        return self.retrying < max(self.min_concurrent, self.active * self.percent / 100)


def resend_unsafe(ex: Exchange, target: Target) -> bool:
    """A plain-HTTP POST/PATCH with no idempotency key (and no ``retry_non_idempotent``): the upstream may have
    acted on it, so it is sent again — retried, or to a fallback target — only if it never left."""
    return (target.kind == "http" and ex.method in _NON_IDEMPOTENT and not target.config.retry_non_idempotent
            and ex.idempotency_key is None and not any(k in ex.headers for k in IDEMPOTENCY_KEYS))


def policy(ctx: Context, target: Target, circuit: SharedCircuit | None = None) -> Policy | None:
    """``circuit``: the target's own (when open, a due retry is not made: it would be refused)."""
    cfg = target.config
    rules: dict[str, RetryRule] = dict(cfg.retry_matrix)
    max_retries = max((r.attempts for r in rules.values()), default=0)
    total_s = cfg.total_timeout_ms / 1000 if cfg.total_timeout_ms else None
    if max_retries == 0 and total_s is None:
        return None
    name, clock, events = target.name, ctx.clock, ctx.events
    budget = RetryBudget(cfg.retry_budget.percent, cfg.retry_budget.min_concurrent)

    def rule_for(failure: Failure, used: dict[str, int], retries: int, unsafe: bool) -> tuple[str, RetryRule] | None:
        if failure.should_retry is False:
            return None
        cls = failure.retry_class
        if cls is None:
            if not failure.should_retry:
                return None
            cls = "429" if failure.reason in ("rate_limited", "quota_exhausted") else "5xx"  # forced by the upstream
        rule = rules[cls]
        if used.get(cls, 0) >= rule.attempts or retries >= max_retries:
            return None
        if unsafe and not (cls == "net" and not failure.sent):
            return None  # the upstream may have acted on it: only a connection that never came up is safe
        return cls, rule

    async def retry(ex: Exchange, call_next: Handler) -> Reply:
        outer_deadline = ex.deadline
        deadline = clock.monotonic() + total_s if total_s is not None else None
        client = ex.client_deadline  # a tenant's default_timeout_s: no wait or attempt past it either
        ex.deadline = client if deadline is None else deadline if client is None else min(deadline, client)
        reply: Reply | None = None
        error: GatewayError | None = None
        budget.active += 1
        try:
            try:
                reply = await call_next(ex)  # the first attempt: the common case ends here
                if reply.failure is None:
                    return reply
            except GatewayError as e:
                if e.retry_class is None:  # the gateway's own refusal (open circuit, bulkhead): not retried
                    raise
                error = e
            return await retrying(ex, call_next, reply, error)
        finally:
            budget.active -= 1
            ex.deadline = outer_deadline

    async def retrying(ex: Exchange, call_next: Handler, reply: Reply | None, error: GatewayError | None) -> Reply:
        """After a failed first attempt: retry while the rules, the deadline and the budget allow."""
        unsafe = resend_unsafe(ex, target)
        used: dict[str, int] = {}
        retries = 0
        try:
            while True:
                failure = reply.failure if reply is not None else failure_of(error)  # type: ignore[arg-type]
                assert failure is not None
                chosen = rule_for(failure, used, retries, unsafe)
                if chosen is None:
                    return _last(reply, error)
                cls, rule = chosen
                wait = failure.retry_after_s
                if wait is None:
                    # the first retry after a broken connection is immediate: usually the upstream had
                    # just closed a pooled keep-alive connection; later ones back off
                    n = used.get(cls, 0)
                    wait = 0.0 if cls == "net" and n == 0 else backoff_s(rule, n - (cls == "net"), clock.random)
                elif wait > rule.max_s:
                    return _last(reply, error)  # the upstream wants longer than we may wait
                if ex.deadline is not None and clock.monotonic() + wait >= ex.deadline:
                    return _last(reply, error)
                if circuit is not None and circuit.state == "open":
                    return _last(reply, error)  # opened by this failure or a concurrent one: a retry would be refused
                if not retries:
                    if not budget.allows_another():
                        events.emit(RetryBudgetExhausted(target=name, reason=cls))
                        return _last(reply, error)
                    budget.retrying += 1
                used[cls] = used.get(cls, 0) + 1
                retries += 1
                if reply is not None:
                    reply = await reply.settled()  # kept whole: it is the answer if no later attempt gives one
                events.emit(RetryScheduled(target=name, reason=cls, attempt=ex.attempts + 1, delay_s=wait))
                if wait > 0:
                    await clock.sleep(wait)
                try:
                    reply, error = await call_next(ex), None
                except CircuitOpen:
                    return _last(reply, error)  # opened during our retries: the last real answer stands
                except GatewayError as e:
                    if e.retry_class is None:
                        raise
                    reply, error = None, e
                    continue
                if reply.failure is None:
                    return reply
        finally:
            if retries:
                budget.retrying -= 1

    retry.budget = budget  # type: ignore[attr-defined]
    return retry


def _last(reply: Reply | None, error: GatewayError | None) -> Reply:
    if reply is not None:
        return reply
    assert error is not None
    raise error
