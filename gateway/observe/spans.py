"""What an upstream attempt's span says (``gateway.flow.send`` records one per attempt of a recording trace).

A client span per attempt: the target, the attempt number, the pool key's id (never the key), the
status and, when the attempt failed, its error class; on an LLM call the OpenTelemetry GenAI
conventions (``gen_ai.operation.name``, ``gen_ai.provider.name``, ``gen_ai.request.model``,
``gen_ai.response.model``, ``gen_ai.usage.*``, ``gen_ai.response.finish_reasons``,
``gen_ai.response.time_to_first_chunk``). The answer is read for these fields only: prompts and
answers are never recorded. A streamed attempt's span ends when its stream does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec

from gateway.observe.trace import Span

if TYPE_CHECKING:
    from gateway.errors import GatewayError

# The endpoint an LLM request is for (``Endpoint.billed``) → gen_ai.operation.name.
_OPERATIONS = {"chat/completions": "chat", "messages": "chat", "responses": "chat", "completions": "text_completion",
               "fim/completions": "text_completion", "embeddings": "embeddings"}


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None


class _Choice(msgspec.Struct):
    finish_reason: str | None = None


class _Answer(msgspec.Struct):
    """The few fields of a chat, completions, messages or responses answer a span reports."""

    model: str | None = None
    choices: list[_Choice] | None = None
    stop_reason: str | None = None  # Anthropic
    status: str | None = None  # the Responses API
    usage: _Usage | None = None


_decode_answer = msgspec.json.Decoder(_Answer).decode


def attempt_span(ex: Any, span_id: str) -> Span:
    target = ex.target
    attrs: dict[str, Any] = {"reliapi.target": target.name, "reliapi.attempt": ex.attempts,
                             "reliapi.retry": ex.attempts - 1, "http.request.method": ex.method}
    address = _server_of(target)
    if address is not None:
        attrs["server.address"], attrs["server.port"] = address
    if ex.key is not None:
        attrs["reliapi.key_id"] = ex.key.id
    provider = target.provider.otel_name
    name = ex.method
    if target.kind == "llm" and provider is not None:
        operation = _OPERATIONS.get(ex.endpoint.billed or "", "chat")
        attrs["gen_ai.operation.name"] = operation
        attrs["gen_ai.provider.name"] = provider
        if ex.model:
            attrs["gen_ai.request.model"] = ex.model
            name = f"{operation} {ex.model}"
        else:
            name = operation
        if ex.max_tokens is not None:
            attrs["gen_ai.request.max_tokens"] = ex.max_tokens
        attrs["gen_ai.request.stream"] = ex.stream  # (not a GenAI attribute yet: the gateway's own)
    return Span(span_id, name, attrs)


def _server_of(target: Any) -> tuple[str, int] | None:
    parts = urlsplit(target.config.base_url)
    if not parts.hostname:
        return None
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def attempt_failed(span: Span, error: GatewayError) -> None:
    """No answer: a timeout, a refused or cut connection."""
    span.error = error.code
    span.attrs["error.type"] = error.code
    span.end()


def attempt_answered(span: Span, ex: Any, reply: Any) -> None:
    """An answer came: a complete one ends the span now, a stream when it ends (``Reply.on_close``)."""
    attrs = span.attrs
    attrs["http.response.status_code"] = reply.status
    if reply.failure is not None:
        span.error = attrs["error.type"] = reply.failure.reason
    elif reply.status >= 500:
        span.error = attrs["error.type"] = str(reply.status)
    if "gen_ai.operation.name" not in attrs:
        if reply.chunks is None:
            span.end()
        else:
            reply.on_close(lambda error: _stream_ended(span, None, error))
        return
    if reply.chunks is None:
        if 200 <= reply.status < 300 and reply.body:
            _read_answer(attrs, reply.body)
        span.end()
        return
    if reply.ttft_ms is not None:
        attrs["gen_ai.response.time_to_first_chunk"] = round(reply.ttft_ms / 1000, 6)
    reply.on_close(lambda error: _stream_ended(span, reply, error))


def _stream_ended(span: Span, reply: Any, error: BaseException | None) -> None:
    attrs = span.attrs
    reader = reply.reader if reply is not None else None
    if reader is not None:
        model = getattr(reader, "model", None)
        if model:
            attrs["gen_ai.response.model"] = model
        if reader.prompt_tokens is not None:
            attrs["gen_ai.usage.input_tokens"] = reader.prompt_tokens
        if reader.completion_tokens is not None:
            attrs["gen_ai.usage.output_tokens"] = reader.completion_tokens
        if reader.finish_reasons:
            attrs["gen_ai.response.finish_reasons"] = list(reader.finish_reasons)
    if error is not None and span.error is None:
        # cut (a StreamBroken: its code) or abandoned (the client left, or a policy let it go)
        span.error = attrs["error.type"] = getattr(error, "code", None) or "cancelled"
    span.end()


def _read_answer(attrs: dict[str, Any], body: bytes) -> None:
    try:
        answer = _decode_answer(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return
    if answer.model:
        attrs["gen_ai.response.model"] = answer.model
    reasons = [c.finish_reason for c in answer.choices or () if c.finish_reason]
    if answer.stop_reason:
        reasons.append(answer.stop_reason)
    if reasons:
        attrs["gen_ai.response.finish_reasons"] = reasons
    usage = answer.usage
    if usage is not None:
        prompt = usage.prompt_tokens if usage.prompt_tokens is not None else usage.input_tokens
        completion = usage.completion_tokens if usage.completion_tokens is not None else usage.output_tokens
        if prompt is not None:
            attrs["gen_ai.usage.input_tokens"] = prompt
        if completion is not None:
            attrs["gen_ai.usage.output_tokens"] = completion
