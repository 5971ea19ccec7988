"""The policy pipeline: the whole request flow, outermost first, in one place (SPEC §5).

    request id → auth/tenant → rate limit → budget → idempotency → cache
    → fallback chain → per target: circuit breaker → bulkhead → key pool → retry
    → (per attempt) timeout → provider adapter → upstream

A policy is ``async def __call__(ex, call_next) -> Reply``: it may answer early,
change the exchange, or wrap what comes back. Request ids are assigned before
the pipeline runs (errors need one even when the request never gets this far).
The per-target part runs once for each target a fallback chain tries, so the
fallback policy is the last request policy and its ``call_next`` is the
per-target chain.

Policies are added to ``request_policies`` / ``target_policies`` below — never to
the handlers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Protocol

from gateway.exchange import Exchange, Reply
from gateway.headers import X_RELIAPI_ATTEMPT, X_REQUEST_ID, upstream_request_headers

if TYPE_CHECKING:
    from gateway.runtime import Runtime

Handler = Callable[[Exchange], Awaitable[Reply]]


class Policy(Protocol):
    async def __call__(self, ex: Exchange, call_next: Handler) -> Reply: ...


def request_policies(rt: Runtime) -> list[Policy]:
    """Run once per client request, outermost first."""
    return []


def target_policies(rt: Runtime) -> list[Policy]:
    """Run for each target tried, outermost first."""
    return []


def build_pipeline(rt: Runtime) -> Handler:
    per_target = compose(target_policies(rt), upstream_sender(rt))
    return compose(request_policies(rt), per_target)


def compose(policies: Sequence[Policy], innermost: Handler) -> Handler:
    handler = innermost
    for policy in reversed(policies):
        handler = partial(policy, call_next=handler)
    return handler


def upstream_sender(rt: Runtime) -> Handler:
    """The innermost step: one attempt against ``ex.target``."""
    scrub = rt.scrub

    async def send_upstream(ex: Exchange) -> Reply:
        target = ex.target
        ex.attempts += 1
        credential = target.credential
        headers = upstream_request_headers(ex.headers, drop_credentials=credential.drops_client_credentials)
        credential.apply(headers)
        headers[X_REQUEST_ID] = ex.request_id
        headers[X_RELIAPI_ATTEMPT] = str(ex.attempts)
        reply = await target.transport.send(
            ex.method, ex.url(), headers, ex.body,
            timeout_s=target.ttft_timeout_s if ex.stream else target.timeout_s,
            idle_timeout_s=target.idle_timeout_s, stream=ex.stream,
        )
        if reply.status >= 400 and reply.body and scrub.secrets:
            reply.body = scrub.bytes(reply.body)  # an upstream error that echoes a configured key
        return reply

    return send_upstream
