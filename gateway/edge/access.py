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


def access_fields(
    request: web.Request, request_id: str, route: str, ex: Exchange | None, reply: Reply | None, status: int,
    error: GatewayError | None, outcome: StreamOutcome, latency_ms: float, trace: Trace = NO_TRACE,
) -> dict[str, Any]:
    latency_ms = round(latency_ms, 2)
    if ex is None:  # rejected before a target was chosen
        return {
            "ts": None, "level": "info", "request_id": request_id, "tenant": None, "target": None, "kind": None,
            "route": route, "method": request.method, "status": status, "stream": False, "model": None,
            "outcome": "error", "error_code": error.code if error else None, "upstream_status": None,
            "attempts": 0, "latency_ms": latency_ms, "ttft_ms": None, "cost_usd": None, "prompt_tokens": None,
            "completion_tokens": None, "cache_hit": False, "idempotent_hit": False, "fallback_target": None,
            "trace_id": trace.trace_id, "span_id": trace.span_id,
        }
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
    ttft = reply.ttft_ms if reply is not None else None
    target = ex.target
    fields = {
        "ts": None, "level": "info", "request_id": request_id, "tenant": ex.tenant, "target": target.name,
        "kind": target.kind, "route": route, "method": ex.method, "status": status, "stream": ex.stream,
        "model": ex.model, "outcome": result, "error_code": code,
        "upstream_status": reply.upstream_status if reply is not None else error.upstream_status if error else None,
        "attempts": ex.attempts, "latency_ms": latency_ms, "ttft_ms": round(ttft, 2) if ttft is not None else None,
        "cost_usd": None, "prompt_tokens": None, "completion_tokens": None,
        "cache_hit": False, "idempotent_hit": False, "fallback_target": None,
        "trace_id": trace.trace_id, "span_id": trace.span_id,
    }
    if ex.log:
        fields.update(ex.log)
    return fields
