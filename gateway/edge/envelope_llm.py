"""``POST /proxy/llm``: the ReliAPI seed's envelope for LLM calls (SPEC §2).

    {target, messages, model?, max_tokens?, temperature?, top_p?, stop?, stream?,
     idempotency_key?, cache?}

The gateway writes a chat completion for the named target and runs it through the whole
pipeline (budget caps included); a target of another dialect gets it translated like any
``/v1/chat/completions`` call (``providers.translators``: for Anthropic, system messages become
its ``system``, ``stop`` becomes ``stop_sequences``; ``max_tokens``, which it requires, defaults to
``llm.max_tokens`` or 1,024).

Complete answer:

    {success: true, data: {id, model, role, content, finish_reason, usage},
     meta: {request_id, target, provider, model, retries, duration_ms, cost_usd,
            cost_estimate_usd, cost_policy_applied, original_max_tokens, idempotent_hit,
            cache_hit, fallback_used, fallback_target}}

``stream: true`` answers SSE: one ``meta`` event, a ``chunk`` event per piece of text
(``{"delta": …}``), then ``done`` (``{finish_reason, usage, cost_usd}``) — or ``error``
(the envelope error) if the stream breaks; never a stream that just stops. The shapes are the
Structs below (``LLMAnswer``, ``LLMMeta``, ``StreamChunk``, ``StreamDone``), described at ``/openapi.json``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.edge import routed
from gateway.edge.envelope import CacheTTL, decode_body
from gateway.edge.generate import upstream_error as _upstream_error
from gateway.edge.requests import client_ip, envelope_body_of, header_user, with_idempotency_headers
from gateway.edge.writer import error_body
from gateway.errors import GatewayError, InvalidRequest, UpstreamError
from gateway.flow.exchange import ENVELOPE, Exchange, Reply
from gateway.headers import X_CACHE, X_RELIAPI_FALLBACK
from gateway.streaming.sse import Aligner, events
from policies.usage import read_usage
from providers.base import Usage as Billed
from providers.translators import translator

if TYPE_CHECKING:
    from gateway.edge.call import Call
    from gateway.runtime import Runtime

Count = Annotated[int, msgspec.Meta(ge=1)]
DEFAULT_MAX_TOKENS = 1024


class Message(msgspec.Struct, omit_defaults=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    tool_calls: list[Any] | None = None  # an assistant turn that called tools (OpenAI's shape)
    tool_call_id: str | None = None  # a tool turn: the call it answers
    name: str | None = None


class LLMEnvelope(msgspec.Struct, forbid_unknown_fields=True):
    target: str
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    model: str | None = None
    max_tokens: Count | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    idempotency_key: str | None = None
    cache: CacheTTL | None = None
    user: str | None = None


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class LLMData(msgspec.Struct):
    id: str | None
    model: str | None
    role: Literal["assistant"]
    content: str
    finish_reason: str | None
    usage: Usage | None


class LLMMeta(msgspec.Struct):
    """How the answer was made; also the first event (``meta``) of a stream."""

    request_id: str
    target: str
    provider: str
    model: str | None
    retries: int
    duration_ms: float
    cost_usd: float | None
    cost_estimate_usd: float | None  # the budget's estimate before the call
    cost_policy_applied: str | None  # soft_cap_reduced: max_tokens was lowered to fit the budget
    original_max_tokens: int | None  # what was asked, when it was lowered
    idempotent_hit: bool
    cache_hit: bool
    fallback_used: bool
    fallback_target: str | None


class LLMAnswer(msgspec.Struct):
    """A complete answer (``stream`` false or left out)."""

    success: Literal[True]
    data: LLMData
    meta: LLMMeta


class StreamChunk(msgspec.Struct):
    """A ``chunk`` event: the next piece of the answer's text."""

    delta: str


class StreamDone(msgspec.Struct):
    """The ``done`` event that ends a complete stream."""

    finish_reason: str | None
    usage: Usage | None
    cost_usd: float | None


def parse(raw: bytes) -> LLMEnvelope:
    return decode_body(raw, LLMEnvelope)


async def exchange(call: Call) -> Exchange:
    """The envelope's request for its LLM target (the surface's parser)."""
    rt = call.rt
    env = parse(await envelope_body_of(call))
    messages = [{k: v for k, v in msgspec.structs.asdict(m).items() if v is not None or k == "content"}
                for m in env.messages]
    decision = await routed.decide_messages(call, messages, env.model)  # a virtual model: its concrete one
    target = rt.router.by_name(env.target) if decision is None else routed.target_of(rt, decision, env.target)
    llm = target.config.llm
    model = decision.model if decision is not None else env.model or (llm.default_model if llm is not None else None)
    if target.kind != "llm":
        raise InvalidRequest(f"target: {env.target!r} is not an LLM target; use /proxy/http", param="target")
    if model is None:
        raise InvalidRequest("model: no model given and the target has no llm.default_model", param="model")
    # a chat completion, translated for a target of another dialect (providers.translators)
    body: dict[str, Any] = {"model": model, "messages": messages}
    if env.max_tokens is not None or target.provider.requires_max_tokens:
        body["max_tokens"] = env.max_tokens or (llm.max_tokens if llm and llm.max_tokens else DEFAULT_MAX_TOKENS)
    if env.stop is not None:
        body["stop"] = env.stop
    if env.user is not None and not target.provider.strict_fields:  # (Mistral refuses it; usage still names it)
        body["user"] = env.user
    for field in ("temperature", "top_p"):
        value = getattr(env, field)
        if value is not None:
            body[field] = value
    usage_chunk = env.stream and (target.provider.reports_stream_usage or target.provider.speaks == "messages")
    if env.stream:
        body["stream"] = True
        if target.provider.reports_stream_usage:  # the usage chunk is the envelope's to read: relayed to it (and
            body["stream_options"] = {"include_usage": True}  # kept in a cached stream), not read and dropped
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json"})
    if env.stream:
        headers["Accept"] = "text/event-stream"
    with_idempotency_headers(call.request, headers)
    ex = Exchange(
        request_id=call.request_id, method="POST", route="proxy_llm", dialect=ENVELOPE,
        rel_path="chat/completions", v1=True, query="",
        headers=CIMultiDictProxy(headers), body=msgspec.json.encode(body), target=target, model=model,
        stream=env.stream, tenant=call.tenant, client_ip=client_ip(call.request, rt),
    )
    ex.max_tokens = body.get("max_tokens")
    ex.include_usage = usage_chunk  # (a Claude stream translated for the envelope: with its usage chunk too)
    ex.idempotency_key = env.idempotency_key
    ex.cache_ttl = float(env.cache) if env.cache is not None else None
    ex.user = header_user(call.request) or (env.user[:128] if env.user is not None else None)
    if decision is not None:
        routed.report(rt, ex, decision)
    return ex


def _meta(rt: Runtime, ex: Exchange, upstream: Reply, duration_ms: float) -> LLMMeta:
    fallback = upstream.headers.get(X_RELIAPI_FALLBACK)
    log = ex.log
    hit = upstream.headers.get(X_CACHE) == "HIT"
    # a replay or a cache hit costs nothing: the first answer's cost is not said (nor charged) twice
    cost = 0.0 if log.get("idempotent_hit") or hit else log.get("cost_usd")
    return LLMMeta(
        request_id=ex.request_id, target=ex.target.name, provider=ex.target.provider.name, model=ex.model,
        retries=max(0, ex.attempts - 1), duration_ms=round(duration_ms, 1),
        cost_usd=round(cost, 10) if cost is not None else None, cost_estimate_usd=log.get("cost_estimate_usd"),
        cost_policy_applied=log.get("cost_policy_applied"), original_max_tokens=log.get("original_max_tokens"),
        idempotent_hit=bool(log.get("idempotent_hit")), cache_hit=hit,
        fallback_used=fallback is not None, fallback_target=fallback,
    )


class _Answer(msgspec.Struct):
    id: str | None = None
    model: str | None = None
    choices: list[dict[str, Any]] | None = None


async def finish(call: Call, upstream: Reply) -> Reply:
    """The envelope around the answer, complete or streamed (the surface's finisher)."""
    assert call.ex is not None
    return reply(call.rt, call.ex, upstream, call.elapsed_ms(time.monotonic()))


def reply(rt: Runtime, ex: Exchange, upstream: Reply, duration_ms: float) -> Reply:
    if upstream.chunks is not None:
        return _stream_reply(rt, ex, upstream, duration_ms)
    body = upstream.body or b""
    status = upstream.status
    if status >= 400:
        raise _upstream_error(ex, status, body)
    try:
        answer = msgspec.json.decode(body, type=_Answer)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise UpstreamError("the upstream's answer is not valid JSON", target=ex.target.name) from None
    if not answer.choices or not isinstance(answer.choices[0].get("message"), dict):
        raise UpstreamError("the upstream's answer is not a chat completion (no choice with a message)",
                            target=ex.target.name)
    choice = answer.choices[0]  # the chat completion (translated back from another dialect)
    text = choice["message"].get("content") or ""
    finish = choice.get("finish_reason")
    usage = read_usage(body, ex.endpoint.dialect)
    meta = _meta(rt, ex, upstream, duration_ms)
    if meta.cost_usd is None and usage is not None:  # a cache hit or a replay: priced from its usage
        price = rt.prices.price(ex.model)
        meta.cost_usd = round(price.charge(usage), 8) if price else None
    out = LLMAnswer(True, LLMData(translator(ex, ex.target).upstream_id(answer.id), answer.model or ex.model,
                                  "assistant", text, finish, _usage(usage)), meta)
    headers = _headers(upstream)
    headers["Content-Type"] = "application/json"
    return Reply(200, headers, body=msgspec.json.encode(out), upstream_status=status)


def _usage(usage: Billed | None) -> Usage | None:
    if usage is None:
        return None
    return Usage(usage[0], usage[1], usage[0] + usage[1])


def _headers(upstream: Reply) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in upstream.headers.items()
                       if k.lower().startswith(("x-", "idempotent-", "ratelimit")))


def _event(name: str, data: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"


def _stream_reply(rt: Runtime, ex: Exchange, upstream: Reply, duration_ms: float) -> Reply:
    if upstream.status >= 400:
        raise _upstream_error(ex, upstream.status, upstream.head)
    headers = _headers(upstream)
    headers["Content-Type"] = "text/event-stream"
    headers["Cache-Control"] = "no-cache"
    out = Reply(200, headers, chunks=_translate(rt, ex, upstream, _meta(rt, ex, upstream, duration_ms)),
                upstream_status=upstream.status)
    out.ttft_ms = upstream.ttft_ms
    return out


async def _translate(rt: Runtime, ex: Exchange, upstream: Reply, meta: LLMMeta) -> AsyncIterator[bytes]:
    """The provider's SSE as the envelope's events: meta, chunk…, done — or error."""
    yield _event("meta", meta)
    aligner = Aligner()
    finish: str | None = None
    prompt = completion = None
    assert upstream.chunks is not None
    try:
        async for raw in upstream.chunks:
            for name, data in events(aligner.feed(raw)):
                if data == b"[DONE]" or not data.startswith(b"{"):
                    continue
                doc = msgspec.json.decode(data)
                if not isinstance(doc, dict):
                    continue
                if "error" in doc and name in (b"", b"error"):
                    raise UpstreamError(str((doc.get("error") or {}).get("message") or "upstream stream error"),
                                        target=ex.target.name)
                for choice in doc.get("choices") or ():  # chat chunks (translated from another dialect)
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield _event("chunk", StreamChunk(text))
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
                usage = doc.get("usage")
                if usage:
                    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    except GatewayError as e:
        yield _event("error", error_body(e, ENVELOPE, ex.request_id, target=ex.target.name, attempts=ex.attempts,
                                         duration_ms=0.0))
        return
    finally:
        await upstream.aclose()
    if prompt is None:  # an OpenAI usage chunk the gateway asked for is read, not relayed (policies.usage)
        prompt = ex.log.get("prompt_tokens")
    if completion is None:
        completion = ex.log.get("completion_tokens")
    usage = None
    if prompt is not None or completion is not None:
        usage = Usage(prompt or 0, completion or 0, (prompt or 0) + (completion or 0))
    price = rt.prices.price(ex.model)
    cost = ex.log.get("cost_usd")
    if cost is None and usage is not None and price is not None:
        cost = round(price.cost(usage.prompt_tokens, usage.completion_tokens), 8)
    yield _event("done", StreamDone(finish, usage, round(cost, 10) if cost is not None else None))  # as the meta's
