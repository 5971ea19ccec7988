"""What went wrong with one attempt, in the terms retry, circuit breaker and fallback decide on.

A provider adapter classifies an upstream answer (status, headers, error body, the first
SSE event) into a ``Failure``; a transport or policy exception maps to one through
``failure_of``. Each policy then asks only its own question:

- retry: ``retry_class`` (``429``, ``5xx``, ``net``, ``timeout``; None = never on this
  target), ``retry_after_s``, ``should_retry`` (the upstream's ``x-should-retry``),
  ``sent`` (could the request have reached the upstream?);
- circuit breaker: ``trips_breaker`` (5xx, timeouts, connection failures — never 4xx,
  429 or the gateway's own rejections);
- fallback: ``reason`` against the target's ``fallback_on`` list.

    reason                     retry class   breaker   fallback_on names that match it
    rate_limited               429           no        retryable, rate_limited
    quota_exhausted            —             no        retryable, rate_limited
    server_error               5xx           yes       retryable, server_error
    upstream_overloaded        5xx           yes       retryable, server_error, overloaded
    network                    net           yes       retryable, network
    timeout                    timeout       yes       retryable, timeout
    overloaded (bulkhead)      —             no        retryable
    circuit_open               —             —         circuit_open
    context_length_exceeded    —             no        context_length_exceeded
    content_policy_violation   —             no        content_policy_violation
    auth, client_error         —             no        (never)

"retryable" in ``fallback_on`` thus means "may succeed if sent again, elsewhere or later";
a spent quota is not retried on the same account, but another target may well answer.
"""

from __future__ import annotations

from gateway.errors import GatewayError

_TAGS: dict[str, frozenset[str]] = {
    "rate_limited": frozenset({"retryable", "rate_limited"}),
    "quota_exhausted": frozenset({"retryable", "rate_limited"}),
    "server_error": frozenset({"retryable", "server_error"}),
    "upstream_overloaded": frozenset({"retryable", "server_error", "overloaded"}),  # 529, overloaded_error
    "network": frozenset({"retryable", "network"}),
    "timeout": frozenset({"retryable", "timeout"}),
    "overloaded": frozenset({"retryable"}),
    "circuit_open": frozenset({"circuit_open"}),
    "context_length_exceeded": frozenset({"context_length_exceeded"}),
    "content_policy_violation": frozenset({"content_policy_violation"}),
    "auth": frozenset(),
    "client_error": frozenset(),
}

REASONS = frozenset(_TAGS)


class Failure:
    __slots__ = ("reason", "retry_class", "trips_breaker", "retry_after_s", "should_retry", "sent")

    def __init__(
        self,
        reason: str,
        retry_class: str | None = None,
        *,
        trips_breaker: bool = False,
        retry_after_s: float | None = None,
        should_retry: bool | None = None,
        sent: bool = True,
    ) -> None:
        self.reason = reason
        self.retry_class = retry_class
        self.trips_breaker = trips_breaker
        self.retry_after_s = retry_after_s
        self.should_retry = should_retry
        self.sent = sent

    def falls_back_on(self, fallback_on: frozenset[str]) -> bool:
        return not _TAGS[self.reason].isdisjoint(fallback_on)

    def __repr__(self) -> str:
        return f"Failure({self.reason!r}, {self.retry_class!r})"


def failure_of(err: GatewayError) -> Failure:
    """The Failure a gateway error stands for (timeouts, connection errors, local rejections)."""
    return Failure(
        err.reason, err.retry_class, trips_breaker=err.trips_breaker, retry_after_s=err.retry_after,
        sent=getattr(err, "sent", True),
    )


def for_status(status: int, *, retry_after_s: float | None = None, should_retry: bool | None = None) -> Failure | None:
    """The protocol-level classification every provider starts from (plain HTTP uses only this)."""
    if status < 400:
        return None
    if status == 429:
        f = Failure("rate_limited", "429", retry_after_s=retry_after_s)
    elif status >= 500 and status not in (501, 505):  # not implemented / version: permanent
        f = Failure("server_error", "5xx", trips_breaker=True, retry_after_s=retry_after_s)
    elif status in (401, 403):
        f = Failure("auth")
    else:
        f = Failure("client_error")
    if should_retry is not None:
        f.should_retry = should_retry
    return f
