"""The innermost step of every target's chain: one attempt against the upstream.

It builds the upstream request (headers as they may go, the attempt's key or the target's
credential, the attempt's timeout within the total deadline, the body as the attempt's
translator prepares it: ``providers.translators``), sends it over the target's transport, and
classifies what comes back: an error answer scrubbed of configured keys and read by the
provider (``Reply.failure``), a compressed LLM answer decoded, an SSE stream put under its
dialect's reader (``gateway.streaming.streams``), the answer turned into the client's dialect.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aiohttp.hdrs import CONTENT_ENCODING

from gateway.encoding import decode_answer
from gateway.errors import DeadlineExceeded, GatewayError, StreamBroken, UpstreamTimeout, UpstreamUnavailable
from gateway.flow.exchange import Exchange, Reply
from gateway.headers import X_RELIAPI_ATTEMPT, X_REQUEST_ID, is_event_stream, upstream_request_headers
from gateway.observe.events import UpstreamAnswered
from gateway.observe.spans import attempt_answered, attempt_failed, attempt_span
from gateway.observe.trace import TRACEPARENT, TRACESTATE, new_span_id
from gateway.scrub import scrub_error, scrub_headers, scrub_text_stream
from gateway.streaming.sse import Aligner
from gateway.streaming.streams import has_event, read_head, read_preamble, strip_usage_chunks, watch, whole_events
from providers.translators import Prepared, Translator, translator

if TYPE_CHECKING:
    from gateway.flow.chain import Handler
    from gateway.flow.context import Context
    from gateway.scrub import Scrubber
    from gateway.upstream.targets import Target


log = logging.getLogger("reliapi")

def upstream_sender(ctx: Context, scrub: Scrubber) -> Handler:
    """The innermost step: one attempt against ``ex.target``, its answer classified."""
    clock = ctx.clock
    events = ctx.events
    tenant_keys = ctx.tenants.enabled  # a tenant's own key never goes upstream
    # targets that refused the stream_options the gateway adds to ask for a stream's usage (an OpenAI-compatible
    # server without it: older Azure API versions, some local servers): not asked again
    no_stream_options: set[str] = set()

    async def send_upstream(ex: Exchange) -> Reply:
        target = ex.target
        if ex.ask_usage and target.name in no_stream_options:
            ex.ask_usage = False
        # the request as this target takes it (per attempt: a fallback may go to another dialect); one it
        # cannot take is refused before anything is sent, and is no attempt
        tr = translator(ex, target)
        prepared = tr.ready(ex, target) or await tr.prepare(ex, target)
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
        trace, span = ex.trace, None
        if trace is not None:  # each attempt is a child span of the request's, with its own traceparent
            span_id = trace.spare if ex.attempts == 1 else new_span_id()
            headers[TRACEPARENT] = f"00-{trace.trace_id}-{span_id}{trace.flags}"  # (the client's is replaced)
            if trace.state:
                headers[TRACESTATE] = trace.state
            elif TRACESTATE in headers:  # a caller's that came without a valid traceparent
                del headers[TRACESTATE]
            if trace.recording:
                span = attempt_span(ex, span_id)
                trace.spans.append(span)
        timeout = target.ttft_timeout_s if ex.stream else target.timeout_s
        by_client = False  # the attempt's time is what is left of the client's deadline
        if ex.client_deadline is not None or ex.deadline is not None:
            now = clock.monotonic()
            client = ex.client_deadline  # the tenant's default_timeout_s: checked first, it is the client's
            if client is not None:
                if client <= now:
                    raise _past_deadline(ex)
                if client - now < timeout:
                    timeout, by_client = client - now, True
            if ex.deadline is not None:  # total_timeout_ms (the retry policy's; at most the client's)
                if ex.deadline <= now:
                    raise UpstreamTimeout(f"target {target.name} did not answer within its total timeout", target=target.name)
                if ex.deadline - now < timeout:
                    timeout, by_client = ex.deadline - now, False
        if tr.crosses:
            tr.headers(headers)
        path, body = prepared.path, prepared.body
        sent_at = clock.monotonic()
        ex.unanswered += 1  # on its way: billed if it is answered, and perhaps if it is not (a timeout, a reset)
        try:
            reply = await target.transport.send(
                ex.method, ex.url() if path is None else target.base.url(path, ex.query, v1=True), headers,
                ex.body if body is None else body,
                timeout_s=timeout, idle_timeout_s=target.idle_timeout_s, stream=ex.stream,
            )
        except GatewayError as e:  # a timeout or a refused connection is an attempt too (status 0): p99 must show it
            events.emit(UpstreamAnswered(target=target.name, seconds=clock.monotonic() - sent_at, status=0))
            if span is not None:
                attempt_failed(span, e)
            if by_client and isinstance(e, UpstreamTimeout):
                raise _past_deadline(ex) from None  # cut short by the client's deadline: not the target's failure
            raise
        events.emit(UpstreamAnswered(target=target.name, seconds=clock.monotonic() - sent_at, status=reply.status))
        if reply.status >= 400:
            ex.unanswered -= 1  # an error answer: nothing the provider bills
        if reply.status == 400 and prepared.asked_usage and reply.body is not None and b"stream_options" in reply.body:
            # it refused the field the gateway added, not the client's request: asked again as the client sent it
            no_stream_options.add(target.name)
            log.warning("target %s refuses stream_options: its streams are no longer asked for usage (estimated)",
                        target.name)
            ex.ask_usage = False
            return await send_upstream(ex)
        if reply.status >= 400:
            scrub_error(reply, scrub)  # an upstream error that echoes a configured key, complete or streamed
        elif scrub.plain:
            scrub_headers(reply, scrub)
        if reply.body is not None:
            if reply.status >= 400:
                reply.failure = target.provider.classify(reply.status, reply.headers, reply.body, clock.time())
            elif target.kind == "llm" and CONTENT_ENCODING in reply.headers:
                decode_answer(reply)  # compressed although identity was asked for
        elif reply.chunks is not None:
            if reply.status < 400 and scrub.secrets:
                scrub_text_stream(reply, scrub)
            try:
                await _watch_stream(ex, reply, target, tr, prepared, timeout - (clock.monotonic() - sent_at))
            except GatewayError as e:
                if span is not None:
                    attempt_failed(span, e)
                raise
            if reply.failure is None and reply.status >= 400:
                reply.failure = target.provider.classify(reply.status, reply.headers, b"", clock.time())
            elif reply.failure is not None and reply.status < 400:
                ex.unanswered -= 1  # a stream that opened with an error event: nothing billed either
        if tr.crosses:
            if reply.chunks is None:
                tr.answer(reply, ex)
            elif is_event_stream(reply.headers):
                reply.chunks = tr.stream(ex, reply.chunks)
        if span is not None:
            attempt_answered(span, ex, reply)
        return reply

    return send_upstream


def _past_deadline(ex: Exchange) -> DeadlineExceeded:
    return DeadlineExceeded("no answer within this client's default_timeout_s", target=ex.target.name)


async def _watch_stream(ex: Exchange, reply: Reply, target: Target, tr: Translator, prepared: Prepared,
                        first_byte_s: float) -> None:
    """Put an SSE stream of a known dialect under ``gateway.streaming.streams.watch``; an error event
    in its head makes the reply a failure the policies can still retry or fall back from. A head of
    lifecycle events only (``StreamReader.preamble``) is read on within ``first_byte_s``."""
    if not is_event_stream(reply.headers):
        return
    reader = tr.reader(ex, prepared)  # the upstream's dialect
    if reader is None:  # not read, but still relayed in whole events (an in-band error is never glued onto half one)
        if reply.chunks is not None:
            reply.chunks = whole_events(reply.chunks)
        return
    strip_usage = prepared.strip_usage
    aligner = Aligner()
    first = read_head(reader, aligner, reply.head)
    skip_head = bool(reply.head)
    if (reader.preamble or not has_event(first)) and reply.status < 400 and reply.chunks is not None:
        reply.chunks = reply.chunks.__aiter__()
        try:
            if skip_head:
                await reply.chunks.__anext__()  # the head, read above
            skip_head = False
            first = await read_preamble(reader, aligner, reply.chunks, first, max(0.0, first_byte_s))
        except (TimeoutError, StreamBroken) as e:
            await reply.aclose()
            if isinstance(e, StreamBroken) and not e.stalled:
                raise UpstreamUnavailable(f"target {target.name} cut its stream before answering", target=target.name) from None
            raise UpstreamTimeout(f"target {target.name} did not start answering in time", target=target.name) from None
        if (reader.preamble or not has_event(first)) and reader.error is None and not reader.done:  # nothing answered
            await reply.aclose()
            raise UpstreamUnavailable(f"target {target.name} closed its stream before answering", target=target.name)
        reply.head = first  # what a failed answer set aside still says (``Reply.settled``)
    if strip_usage:
        first = strip_usage_chunks(first)
    if reader.error_failure is not None:
        reply.failure = reader.error_failure
    reply.chunks = watch(
        reply.chunks, reader, aligner, first, skip_head=skip_head, ex=ex, target=target.name,  # type: ignore[arg-type]
        hold_errors=ex.continuation or target.config.stream_recovery == "continue", strip_usage=strip_usage,
    )
    reply.reader = reader
