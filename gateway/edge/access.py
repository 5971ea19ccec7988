"""The access record of one request: the JSON log line and what the status page and metrics count.

Every field SPEC §7 names is on every line, ``None`` where it does not apply, and the request's
``trace_id`` / ``span_id`` (``gateway.observe.trace``); policies add theirs to ``Exchange.log`` (cost,
tokens, cache and idempotency hits, the fallback target).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.observe.trace import NO_TRACE, Trace

if TYPE_CHECKING:
    from aiohttp import web

    from gateway.edge.writer import StreamOutcome
    from gateway.errors import GatewayError
    from gateway.flow.exchange import Exchange, Reply


# Every field of a line, in its order, with its value when it does not apply. A line is a copy of this with its
# own values stored in: a dict display of 25 keys costs three times a copy and those stores (≈ 12 k instructions).
_LINE: dict[str, Any] = {
    "ts": None, "level": "info", "request_id": None, "tenant": None, "target": None, "kind": None,
    "route": None, "method": None, "status": None, "stream": False, "model": None,
    "outcome": None, "error_code": None, "upstream_status": None,
    "attempts": 0, "latency_ms": None, "ttft_ms": None, "cost_usd": None, "prompt_tokens": None,
    "completion_tokens": None, "cache_hit": False, "idempotent_hit": False, "fallback_target": None,
    "trace_id": None, "span_id": None,
}


def access_fields(
    request: web.Request, request_id: str, route: str, ex: Exchange | None, reply: Reply | None, status: int,
    error: GatewayError | None, outcome: StreamOutcome, latency_ms: float, trace: Trace = NO_TRACE,
) -> dict[str, Any]:
    fields = _LINE.copy()
    fields["request_id"] = request_id
    fields["route"] = route
    fields["status"] = status
    fields["latency_ms"] = round(latency_ms, 2)
    fields["trace_id"] = trace.trace_id
    fields["span_id"] = trace.span_id
    if ex is None:  # rejected before a target was chosen
        fields["method"] = request.method
        fields["outcome"] = "error"
        fields["error_code"] = error.code if error else None
        return fields
    if error is not None:
        result, code = "error", error.code
    elif outcome.ok:
        result, code = ("ok" if status < 400 else "upstream_error"), None
    elif outcome.client_gone:
        result, code = "client_closed", None
    elif outcome.error is not None:
        result, code = "stream_error", outcome.error.code
    else:
        result, code = "cancelled", None
    target = ex.target
    fields["tenant"] = ex.tenant
    fields["target"] = target.name
    fields["kind"] = target.kind
    fields["method"] = ex.method
    fields["stream"] = ex.stream
    fields["model"] = ex.model
    fields["outcome"] = result
    fields["error_code"] = code
    fields["attempts"] = ex.attempts
    if reply is not None:
        fields["upstream_status"] = reply.upstream_status
        ttft = reply.ttft_ms
        if ttft is not None:
            fields["ttft_ms"] = round(ttft, 2)
    elif error is not None:
        fields["upstream_status"] = error.upstream_status
    if ex.log:
        fields.update(ex.log)
    return fields
