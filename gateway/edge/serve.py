"""The outermost step of every proxied request (``gateway.edge.surfaces``).

It names the request (``X-Request-Id``), runs its surface's steps — checks, parser, the
request flow (``gateway.flow``), finisher —, writes the reply — complete, or relayed as a stream (``gateway.edge.writer``) — and renders every
``GatewayError`` raised anywhere on the way, writing included, in the surface's dialect with
the request id. Anything else is a bug: logged once with its stack and the request id, and
answered ``500 internal_error`` (in-band, once a stream has started). Last, whatever
happened, the access record is written and counted.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from aiohttp.hdrs import ACCESS_CONTROL_REQUEST_METHOD

from gateway.edge.access import access_fields
from gateway.edge.call import Call
from gateway.edge.cors import no_cors_preflight
from gateway.edge.ids import request_id as new_request_id
from gateway.edge.requests import client_ip
from gateway.edge.routed import routed_model
from gateway.edge.surfaces import surface_for
from gateway.edge.writer import StreamOutcome, check_sendable, complete_response, error_response, write_reply
from gateway.errors import GatewayError, InternalError, ShuttingDown
from gateway.flow.exchange import Reply
from gateway.headers import (
    X_CACHE,
    X_CACHED,
    X_RELIAPI_ATTEMPTS,
    X_RELIAPI_ROUTED_MODEL,
    X_RELIAPI_TARGET,
    X_REQUEST_ID,
)
from gateway.keys import RUNTIME
from gateway.observe.trace import CURRENT, TRACERESPONSE, X_RELIAPI_TRACE_ID
from policies.rate_limit import merge_headers

log = logging.getLogger("reliapi")


async def serve(request: web.Request) -> web.StreamResponse:
    """The aiohttp handler of every path that is not a fixed gateway endpoint."""
    if request.method == "OPTIONS" and ACCESS_CONTROL_REQUEST_METHOD in request.headers:
        return no_cors_preflight(request)  # a browser's preflight is never proxied (with a target's key)
    surface = surface_for(request.method, request.raw_path)
    slot = request.app[RUNTIME]
    rt = slot.current
    trace = rt.tracing.start(request.headers)  # the caller's trace continued, or a new one
    # (a client's id that holds a key is replaced: never logged, echoed or forwarded upstream as one)
    call = Call(request, rt, surface, new_request_id(request.headers, trace.span_id, rt.scrub.holds), time.monotonic(),
                trace)
    outcome = StreamOutcome()
    status, error, reply = 0, None, None
    guard = rt.guard
    # every log line made while it runs names its trace (aiohttp runs each request in a task of its own, with
    # its own copy of the context: nothing to reset)
    CURRENT.set(trace)
    call.task = asyncio.current_task()
    rt.calls.add(call)  # (ended in the finally below: a reload retires this runtime once none runs on it)
    try:
        try:
            if guard is not None:  # bans, the failed-authentication budget, the per-IP limit
                call.ip = client_ip(request, rt)
                await guard.admit(call)
            for check in surface.checks:  # before the body is read
                check(call)
            if guard is not None:
                guard.authenticated(call)
            ex = call.ex = await surface.parser(call)
            if ex.model and rt.scrub.holds(ex.model):
                ex.model = rt.scrub(ex.model)  # a key sent as the model: never a log field or a metric label
            ex.account = call.account
            ex.trace = trace
            call.inflight = ex.target.name
            rt.observatory.enter(call.inflight)  # (left in _record, once the reply is written)
            reply = await rt.flow(ex)
            finish = surface.finish
            if finish is not None:
                reply = await finish(call, reply)
            status = reply.status
            headers = reply.headers
            headers[X_REQUEST_ID] = call.request_id
            headers[X_RELIAPI_TARGET] = ex.target.name
            headers[X_RELIAPI_ATTEMPTS] = str(ex.attempts)
            routed_to = ex.log.get("routed_model")  # a virtual model's concrete one (routed_model, inline: hot path)
            if routed_to is not None:
                headers[X_RELIAPI_ROUTED_MODEL] = routed_to
            headers.setdefault(X_CACHE, "BYPASS")
            headers.setdefault(X_CACHED, "false")
            tracing = rt.tracing  # (tracing.name, inline: every answer)
            if tracing.trace_id_header:
                headers[X_RELIAPI_TRACE_ID] = trace.trace_id
            if tracing.traceresponse:
                headers[TRACERESPONSE] = trace.traceresponse()
            if call.limit_headers:
                merge_headers(headers, call.limit_headers)
            check_sendable(headers)
            if reply.chunks is None:
                answer = complete_response(reply, outcome)
                if slot.stopping:
                    answer.force_close()
                return answer
            call.relaying = True
            # the client's wait for its first byte, retries, fallbacks and a cache or a flight included — not the
            # last attempt's own (the access line's ttft_ms, the ttft metric, the span)
            reply.ttft_ms = (time.monotonic() - call.started) * 1000
            return await write_reply(request, ex, reply, outcome)  # (an error once it has started is in-band)
        except GatewayError as e:
            error = e
        except asyncio.CancelledError:
            if not rt.cutting or call.relaying:
                raise
            call.task.uncancel()  # (cancelled by ``Runtime.cut``: the shutdown's grace period is over)
            error = ShuttingDown()
        except Exception:
            log.exception("internal error", extra={"fields": {"request_id": call.request_id}})
            error = InternalError("internal error")
        outcome.ok = False
        status = error.status
        if rt.scrub.plain:  # a message that quotes the client's input may quote a configured key it sent
            error.message = rt.scrub(error.message)
        if call.limit_headers:
            merge_headers(error.headers, call.limit_headers)
        rt.tracing.name(trace, error.headers)
        ex = call.ex
        routed_to = routed_model(ex)
        if routed_to is not None:
            error.headers[X_RELIAPI_ROUTED_MODEL] = routed_to
        answer = error_response(
            error, surface.dialect_of(request.raw_path), call.request_id, target=ex.target.name if ex else None,
            attempts=ex.attempts if ex else 0, duration_ms=(time.monotonic() - call.started) * 1000,
        )
        if ex is not None:  # routed: said like every proxied answer's (SPEC §2)
            answer.headers.setdefault(X_CACHE, ex.cache_status or "BYPASS")
            answer.headers.setdefault(X_CACHED, "false")
        if slot.stopping:
            answer.force_close()
        return answer
    finally:
        rt.request_ended(call)
        _record(call, reply, status, error, outcome)
        if guard is not None:
            guard.answered(call, error)


def _record(call: Call, reply: Reply | None, status: int, error: GatewayError | None, outcome: StreamOutcome) -> None:
    if call.inflight is not None:
        call.rt.observatory.leave(call.inflight)
    duration_ms = (time.monotonic() - call.started) * 1000
    ex = call.ex
    running = ex.running if ex is not None else None
    if running is not None and outcome.client_gone and not running.done():
        # its client left a stream whose upstream call a flight still ends (cancelled now, or read on for
        # followers): the line waits for what that call is billed, as a line of an unshared stream has it
        running.add_done_callback(lambda _: _write_record(call, reply, status, error, outcome, duration_ms))
        return
    _write_record(call, reply, status, error, outcome, duration_ms)


def _write_record(call: Call, reply: Reply | None, status: int, error: GatewayError | None, outcome: StreamOutcome,
                  duration_ms: float) -> None:
    rt, request = call.rt, call.request
    ex = call.ex
    trace = call.trace
    fields = access_fields(request, call.request_id, call.surface.name, ex, reply if error is None else None, status,
                           error, outcome, duration_ms, trace)
    if ex is None:
        fields["tenant"] = call.tenant  # a known caller whose request was refused before it had a target
    failed = error or outcome.error
    if failed is not None:
        fields["error_message"] = rt.scrub(failed.message)[:1024]  # (a line stays one write a pipe keeps whole)
    if failed is not None or status >= 400:
        fields["path"] = rt.scrub(request.path)[:256]  # the last errors on the status page say where
    if rt.access_log.enabled:
        rt.access_log(fields)  # sets "ts"
    rt.observatory.record(fields)
    if trace.recording:  # the request's span ends here: after a stream's last byte, or its cut
        rt.spans.finish(trace, fields, reply.headers.get(X_CACHE) if reply is not None else None, request.method)
