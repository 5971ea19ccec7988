"""Errors the gateway itself produces (SPEC §3).

Every failure a policy, the router or a backend can raise is a ``GatewayError``;
foreign exceptions (aiohttp, redis, msgspec) are translated at the boundary that
meets them. ``gateway.edge.writer`` renders one (``error_body`` / ``error_response``), in
the dialect of the surface the client called; ``gateway.edge.serve`` is where every error of
a request ends up, and a stream's in-band error events use the same bodies.

    GatewayError                      status code
    ├── InvalidRequest                400    invalid_request
    ├── Unauthorized                  401    unauthorized
    ├── Forbidden                     403    forbidden
    ├── UnknownTarget                 404    unknown_target
    ├── MethodNotAllowed              405    method_not_allowed
    ├── RequestTimeout                408    request_timeout       (a client too slow sending its request)
    ├── PayloadTooLarge               413    payload_too_large
    ├── UnsupportedMediaType          415    unsupported_media_type (a body the gateway must read and cannot)
    ├── IdempotencyKeyReused          422    idempotency_key_reused
    ├── IdempotencyInProgress         409    idempotency_in_progress
    ├── BudgetExceeded                400    budget_exceeded
    ├── BudgetExhausted               402    budget_exhausted
    ├── RateLimited                   429    rate_limited          (+ Retry-After)
    │   └── KeysExhausted             429    rate_limited          (every pool key cooling down)
    ├── CircuitOpen                   503    circuit_open          (+ Retry-After)
    ├── Overloaded                    503    overloaded            (bulkhead full)
    │   ├── ShuttingDown              503    overloaded            (unanswered when the shutdown's grace ran out)
    │   └── TooManyConnections        503    too_many_connections  (server.max_connections reached)
    ├── UpstreamError                 502    upstream_error        (base of the two below)
    │   ├── UpstreamTimeout           504    upstream_timeout
    │   ├── UpstreamUnavailable       502    upstream_unavailable
    │   └── StreamBroken              —      stream_interrupted    (after the first byte:
    │       │                                                       only ever an in-band event)
    │       └── StreamCutAtShutdown   —      stream_interrupted    (still open when the shutdown grace ran out)
    ├── StoreUnavailable              503    store_unavailable
    └── InternalError                 500    internal_error

``type`` is the seed envelope's coarse class (client_error, upstream_error,
budget_error, internal_error); ``retryable`` tells a client whether sending the
same request again later may succeed. ``reason``, ``retry_class`` and
``trips_breaker`` say how the policies treat the error when a target raises it
(see ``gateway.failures``): only a timeout or a failed connection counts against a
circuit; the gateway's own rejections never do.
"""

from __future__ import annotations


class GatewayError(Exception):
    status: int = 500
    code: str = "internal_error"
    type: str = "internal_error"
    retryable: bool = False
    reason: str = "client_error"  # see gateway.failures
    retry_class: str | None = None
    trips_breaker: bool = False
    answered: bool = False  # an upstream answered 2xx, and it was no use: billed like an answer of unknown cost

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        target: str | None = None,
        upstream_status: int | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.target = target
        self.upstream_status = upstream_status
        self.param = param
        self.headers = headers or {}


class InvalidRequest(GatewayError):
    status, code, type = 400, "invalid_request", "client_error"


class Unauthorized(GatewayError):
    status, code, type = 401, "unauthorized", "client_error"


class Forbidden(GatewayError):
    status, code, type = 403, "forbidden", "client_error"


class UnknownTarget(GatewayError):
    status, code, type = 404, "unknown_target", "client_error"


class MethodNotAllowed(GatewayError):
    status, code, type = 405, "method_not_allowed", "client_error"


class RequestTimeout(GatewayError):
    status, code, type = 408, "request_timeout", "client_error"


class PayloadTooLarge(GatewayError):
    status, code, type = 413, "payload_too_large", "client_error"


class UnsupportedMediaType(GatewayError):
    status, code, type = 415, "unsupported_media_type", "client_error"


class IdempotencyKeyReused(GatewayError):
    status, code, type = 422, "idempotency_key_reused", "client_error"


class IdempotencyInProgress(GatewayError):
    status, code, type, retryable = 409, "idempotency_in_progress", "client_error", True


class BudgetExceeded(GatewayError):
    status, code, type = 400, "budget_exceeded", "budget_error"


class BudgetExhausted(GatewayError):
    status, code, type = 402, "budget_exhausted", "budget_error"


class RateLimited(GatewayError):
    status, code, type, retryable = 429, "rate_limited", "client_error", True


class KeysExhausted(RateLimited):
    """Every key of a target's pool is cooling down after a 429 (or at its QPS limit)."""

    reason, retry_class = "rate_limited", "429"


class CircuitOpen(GatewayError):
    status, code, type, retryable = 503, "circuit_open", "upstream_error", True
    reason = "circuit_open"


class Overloaded(GatewayError):
    status, code, type, retryable = 503, "overloaded", "upstream_error", True
    reason = "overloaded"


class ShuttingDown(Overloaded):
    """Still unanswered when the shutdown's grace period ran out: a 503 the client may retry elsewhere, not a
    dropped connection (``gateway.cli``)."""

    def __init__(self) -> None:
        super().__init__("the gateway is shutting down and this request did not finish in time; send it again",
                         retry_after=1.0)


class TooManyConnections(Overloaded):
    """A connection over ``server.max_connections``, refused by the listener (``gateway.edge.server``)."""

    code = "too_many_connections"


class UpstreamError(GatewayError):
    status, code, type, retryable = 502, "upstream_error", "upstream_error", True


class UpstreamTimeout(UpstreamError):
    status, code = 504, "upstream_timeout"
    reason, retry_class, trips_breaker = "timeout", "timeout", True


class DeadlineExceeded(GatewayError):
    """No answer within the tenant's ``default_timeout_s`` (its client profile). The deadline is the
    client's, not the target's failure: it neither trips a circuit nor moves to a fallback."""

    status, code, type, retryable = 504, "deadline_exceeded", "upstream_error", True


class ParallelLimited(RateLimited):
    """A tenant already has its profile's ``max_parallel_requests`` in flight."""

    code = "too_many_parallel_requests"


class UpstreamUnavailable(UpstreamError):
    status, code = 502, "upstream_unavailable"
    reason, retry_class, trips_breaker = "network", "net", True

    def __init__(self, message: str, *, sent: bool = True, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.sent = sent  # False: the connection failed, so the request never left the gateway


class StreamBroken(UpstreamError):
    """The upstream cut or stalled a stream after bytes reached the client.

    ``reported``: the upstream already sent its own in-band error event, relayed as is,
    so the gateway must not add a second one. ``stalled``: it went silent for the idle
    timeout (rather than being cut or failing) — asking it again would likely wait as long.
    """

    code = "stream_interrupted"
    reason, trips_breaker = "network", True

    def __init__(self, message: str, *, reported: bool = False, stalled: bool = False, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.reported = reported
        self.stalled = stalled


SHUTDOWN = "reliapi: the shutdown's grace period is over"  # the message of a task cancelled then (``Runtime.cut``)


class StreamCutAtShutdown(StreamBroken):
    """The gateway stopped while this stream was still relayed (past ``server.shutdown_grace_s``): not the
    upstream's failure (no circuit counts it), and not continued elsewhere (``stream_recovery``)."""

    reason, trips_breaker = "shutdown", False

    def __init__(self, message: str = "the gateway is shutting down: this stream was cut before its end; send the "
                 "request again", **kwargs: object) -> None:  # (re-made with its message by the SSE watcher)
        super().__init__(message, **kwargs)  # type: ignore[arg-type]


class StoreUnavailable(GatewayError):
    status, code, type, retryable = 503, "store_unavailable", "internal_error", True


class InternalError(GatewayError):
    status, code, type = 500, "internal_error", "internal_error"
