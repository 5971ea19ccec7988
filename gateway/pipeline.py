"""The policy pipeline: the whole request flow, outermost first, in one place (SPEC §5).

    request id → authentication → rate limit → tenant access → budget → idempotency → cache
    → fallback chain
    → per target: bulkhead → total deadline + retry
      → per attempt: circuit breaker → key pool → timeout → provider adapter → upstream

A policy is ``async def __call__(ex, call_next) -> Reply``: it may answer early,
change the exchange, or wrap what comes back. Request ids are assigned before
the pipeline runs (errors need one even when the request never gets this far).

Each target gets its own chain, built once: a policy that does nothing for a target
(no ``max_concurrency``, a single key) is simply not in that target's chain. The
fallback policy is the last request policy: it runs the chain of whichever target the
exchange points at (``rt.target_chains``; its ``call_next`` would do the same, one call
deeper), so it can try several in turn. ``retry``
calls its ``call_next`` once per attempt, so every policy after it acts per attempt:
the circuit breaker gates and counts each attempt (an open circuit stops the retries
too) and the key pool picks a key for each. This is the order of .NET's standard
resilience pipeline (bulkhead → total timeout → retry → circuit breaker → attempt
timeout) and how Envoy counts outlier failures — per upstream answer, not per
client request.

Policies are added to ``request_policies`` / ``target_policies`` below — never to
the handlers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from aiohttp.hdrs import CONTENT_ENCODING

from gateway.crossing import Crossing, crossing
from gateway.encoding import decode_answer
from gateway.errors import GatewayError, UpstreamTimeout
from gateway.events import UpstreamAnswered
from gateway.exchange import Exchange, Reply
from gateway.headers import X_RELIAPI_ATTEMPT, X_REQUEST_ID, is_event_stream, upstream_request_headers
from gateway.scrub import scrub_error, scrub_text_stream
from gateway.sse import Aligner
from gateway.streams import read_head, strip_usage_chunks, watch
from policies import (
    budget,
    bulkhead,
    cache,
    circuit_breaker,
    fallback,
    idempotency,
    key_pool,
    rate_limit,
    retry,
    tenants,
    usage,
)
from providers import stream_format

if TYPE_CHECKING:
    from gateway.runtime import Runtime
    from gateway.targets import Target

Handler = Callable[[Exchange], Awaitable[Reply]]


class Policy(Protocol):
    async def __call__(self, ex: Exchange, call_next: Handler) -> Reply: ...


def request_policies(rt: Runtime, *, keyed: bool = False) -> list[Policy | None]:
    """Run once per client request, outermost first; the fallback chain is always last.
    ``keyed``: the chain for requests that carry an idempotency key (``Runtime.keyed_pipeline``)
    — the only ones the idempotency policy has anything to do for, so the others skip it."""
    return [
        rate_limit.policy(rt),
        tenants.policy(rt),  # inside rate_limit: it drops the provider's x-ratelimit-*, not ours
        budget.policy(rt),
        idempotency.policy(rt) if keyed else None,
        cache.policy(rt),
        usage.policy(rt),  # inside the cache: a hit or a replay is not usage
        fallback.policy(rt),
    ]


def target_policies(rt: Runtime, target: Target) -> list[Policy | None]:
    """Run for each target tried, outermost first; everything after ``retry`` runs per attempt.
    A factory returns None when it has nothing to do for this target."""
    return [
        bulkhead.policy(rt, target),
        retry.policy(rt, target),
        circuit_breaker.policy(rt, target),
        key_pool.policy(rt, target),
    ]


def build_pipeline(rt: Runtime) -> Handler:
    send = upstream_sender(rt)
    rt.target_chains = {name: compose(target_policies(rt, t), send) for name, t in rt.targets.items()}
    chains = rt.target_chains

    async def to_target(ex: Exchange) -> Reply:
        return await chains[ex.target.name](ex)

    rt.keyed_pipeline = compose(request_policies(rt, keyed=True), to_target)
    return compose(request_policies(rt), to_target)


def compose(policies: Sequence[Policy | None], innermost: Handler) -> Handler:
    handler = innermost
    for policy in reversed(policies):
        if policy is not None:
            handler = _bind(policy, handler)
    return handler


def _bind(policy: Policy, call_next: Handler) -> Handler:
    """``policy`` with its ``call_next``: a closure, cheaper per call than a keyword ``partial``."""
    def step(ex: Exchange) -> Awaitable[Reply]:
        return policy(ex, call_next)
    return step


def upstream_sender(rt: Runtime) -> Handler:
    """The innermost step: one attempt against ``ex.target``, its answer classified."""
    scrub = rt.scrub
    clock = rt.clock
    events = rt.events
    tenant_keys = rt.tenants.enabled  # a tenant's own key never goes upstream

    async def send_upstream(ex: Exchange) -> Reply:
        target = ex.target
        ex.attempts += 1
        credential = target.credential
        headers = upstream_request_headers(  # the gateway reads LLM answers (usage, translation): uncompressed
            ex.headers, drop_credentials=credential.drops_client_credentials or tenant_keys,
            llm=target.kind == "llm",
        )
        key = ex.key
        if key is not None:
            headers[key.header] = key.value
        else:
            credential.apply(headers)
        headers[X_REQUEST_ID] = ex.request_id
        headers[X_RELIAPI_ATTEMPT] = str(ex.attempts)
        timeout = target.ttft_timeout_s if ex.stream else target.timeout_s
        if ex.deadline is not None:  # total_timeout_ms: this attempt gets what is left of it
            left = ex.deadline - clock.monotonic()
            if left <= 0:
                raise UpstreamTimeout(f"target {target.name} did not answer within its total timeout", target=target.name)
            timeout = min(timeout, left)
        body, strip_usage, url = ex.body, False, None
        cross = crossing(ex, target)  # the other LLM dialect: translated both ways
        if cross is not None:
            body, url = await cross.body(ex, target), target.base.url(cross.rel, ex.query, v1=True)
            cross.headers(headers)
        elif ex.usage_body is not None and target.provider.name == "openai":
            asked = await usage.asking_usage(ex)  # per attempt: a fallback may have changed the body
            if asked is not None:
                body, strip_usage = asked, True
        sent_at = clock.monotonic()
        try:
            reply = await target.transport.send(
                ex.method, url or ex.url(), headers, body,
                timeout_s=timeout, idle_timeout_s=target.idle_timeout_s, stream=ex.stream,
            )
        except GatewayError:  # a timeout or a refused connection is an attempt too (status 0): p99 must show it
            events.emit(UpstreamAnswered(target=target.name, seconds=clock.monotonic() - sent_at, status=0))
            raise
        events.emit(UpstreamAnswered(target=target.name, seconds=clock.monotonic() - sent_at, status=reply.status))
        if reply.status >= 400:
            scrub_error(reply, scrub)  # an upstream error that echoes a configured key, complete or streamed
        if reply.body is not None:
            if reply.status >= 400:
                reply.failure = target.provider.classify(reply.status, reply.headers, reply.body, clock.time())
            elif target.kind == "llm" and CONTENT_ENCODING in reply.headers:
                decode_answer(reply)  # compressed although identity was asked for
        elif reply.chunks is not None:
            if reply.status < 400 and scrub.secrets:
                scrub_text_stream(reply, scrub)
            _watch_stream(ex, reply, target, strip_usage=strip_usage, cross=cross)
            if reply.failure is None and reply.status >= 400:
                reply.failure = target.provider.classify(reply.status, reply.headers, b"", clock.time())
        if cross is not None:
            if reply.chunks is None:
                cross.answer(reply)
            elif is_event_stream(reply.headers):
                reply.chunks = cross.stream(ex, reply.chunks)
        return reply

    return send_upstream


def _watch_stream(
    ex: Exchange, reply: Reply, target: Target, *, strip_usage: bool = False, cross: Crossing | None = None,
) -> None:
    """Put an SSE stream of a known format under ``gateway.streams.watch``; an error event in
    its head makes the reply a failure the policies can still retry or fall back from."""
    if not is_event_stream(reply.headers):
        return
    fmt = stream_format(cross.rel if cross is not None else ex.endpoint.billed or ex.endpoint.path)  # what the target sends
    if fmt is None:
        return
    asked_usage = cross is not None and cross.to == "openai"  # the translated request asks for it
    reader = fmt(choices=ex.choices, include_usage=ex.include_usage or strip_usage or asked_usage)
    aligner = Aligner()
    first = read_head(reader, aligner, reply.head)
    if strip_usage:
        first = strip_usage_chunks(first)
    if reader.error_failure is not None:
        reply.failure = reader.error_failure
    reply.chunks = watch(
        reply.chunks, reader, aligner, first, skip_head=bool(reply.head), ex=ex, target=target.name,  # type: ignore[arg-type]
        hold_errors=target.config.stream_recovery == "continue", strip_usage=strip_usage,
    )
    reply.reader = reader
