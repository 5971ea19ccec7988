"""``POST /v1/generate``: the "LLM Gateway API" seed's convenience surface (SPEC §2).

    {prompt, model?, temperature?, max_tokens?, user_id?}
      → {completion, model, prompt_tokens, completion_tokens, total_tokens, cost_usd,
         request_id, cached, latency_ms}

The model routes like any /v1 request (``models`` globs, else the default target, whose
``llm.default_model`` is used when no model is given). The gateway writes the provider's
own request — a chat completion for OpenAI-dialect targets, a Messages request for
Anthropic — and the whole pipeline applies to it (tenants, rate limit, budget,
idempotency, cache, retries, fallback, usage). Errors are in the OpenAI dialect; an
upstream refusal keeps its status and message. ``GenerateRequest`` and ``GenerateAnswer`` are
what ``/openapi.json`` describes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.edge import routed
from gateway.edge.envelope import decode_body
from gateway.edge.requests import client_ip, envelope_body_of
from gateway.errors import GatewayError, InvalidRequest, UpstreamError
from gateway.flow.exchange import OPENAI, Exchange, Reply
from gateway.headers import X_CACHE, X_CACHED
from policies.usage import read_usage
from providers.base import Usage

if TYPE_CHECKING:
    from gateway.edge.call import Call
    from gateway.runtime import Runtime

Count = Annotated[int, msgspec.Meta(ge=1)]
DEFAULT_MAX_TOKENS = 1024  # Anthropic requires one; used when neither the request nor llm.max_tokens gives it


class GenerateRequest(msgspec.Struct, forbid_unknown_fields=True):
    prompt: Annotated[str, msgspec.Meta(min_length=1)]
    model: str | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    max_tokens: Count | None = None
    user_id: str | int | None = None
    idempotency_key: str | None = None


class GenerateAnswer(msgspec.Struct):
    """The completion, its token counts and cost (``null`` for an unpriced model)."""

    completion: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float | None
    request_id: str
    cached: bool  # answered from the cache
    latency_ms: float


def parse(body: bytes) -> GenerateRequest:
    return decode_body(body, GenerateRequest, "request body")


async def exchange(call: Call) -> Exchange:
    """The seed's request as the target's own (the surface's parser)."""
    request, rt = call.request, call.rt
    req = parse(await envelope_body_of(call))
    named = request.headers.get("X-ReliAPI-Target")
    decision = await routed.decide_messages(call, [{"role": "user", "content": req.prompt}], req.model)
    target = rt.router.for_v1(named, req.model) if decision is None else routed.target_of(rt, decision, named)
    llm = target.config.llm
    model = decision.model if decision is not None else req.model or (llm.default_model if llm is not None else None)
    if target.kind != "llm" or model is None:
        raise InvalidRequest("model: no model given and the target has no llm.default_model", param="model")
    # a chat completion, translated for a target of another dialect (providers.translators)
    upstream: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": req.prompt}]}
    if req.temperature is not None:
        upstream["temperature"] = req.temperature
    if req.max_tokens is not None or target.provider.requires_max_tokens:
        upstream["max_tokens"] = req.max_tokens or (llm.max_tokens if llm and llm.max_tokens else DEFAULT_MAX_TOKENS)
    if req.user_id is not None and not target.provider.strict_fields:  # (Mistral refuses it; usage still names it)
        upstream["user"] = str(req.user_id)
    headers = request.headers
    if hdrs.CONTENT_ENCODING in headers:  # (the body sent is the gateway's own, uncompressed)
        headers = CIMultiDictProxy(CIMultiDict((k, v) for k, v in headers.items() if k.lower() != "content-encoding"))
    ex = Exchange(
        request_id=call.request_id, method="POST", route="generate", dialect=OPENAI,
        rel_path="chat/completions", v1=True, query="", headers=headers,
        body=msgspec.json.encode(upstream), target=target, model=model, tenant=call.tenant,
        client_ip=client_ip(request, rt),
    )
    ex.max_tokens = upstream.get("max_tokens")
    ex.user = str(req.user_id)[:128] if req.user_id is not None else None
    ex.idempotency_key = req.idempotency_key
    if decision is not None:
        routed.report(rt, ex, decision)
    return ex


class _Answer(msgspec.Struct):
    choices: list[dict[str, Any]] | None = None
    model: str | None = None


async def finish(call: Call, upstream: Reply) -> Reply:
    """The provider's answer as the seed's response (the surface's finisher)."""
    assert call.ex is not None
    return reply(call.rt, call.ex, upstream, call.elapsed_ms(time.monotonic()))


def reply(rt: Runtime, ex: Exchange, upstream: Reply, latency_ms: float) -> Reply:
    """The provider's answer as the seed's response."""
    body = upstream.body or b""
    if upstream.status >= 400:
        raise upstream_error(ex, upstream.status, body)
    try:
        answer = msgspec.json.decode(body, type=_Answer)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise UpstreamError("the upstream's answer is not valid JSON", target=ex.target.name) from None
    if not answer.choices or not isinstance(answer.choices[0].get("message"), dict):
        raise UpstreamError("the upstream's answer is not a chat completion (no choice with a message)",
                            target=ex.target.name)
    text = answer.choices[0]["message"].get("content") or ""
    usage = read_usage(body, ex.endpoint.dialect) or Usage(0, 0)
    prompt, completion = usage.prompt, usage.completion
    price = rt.prices.price(ex.model)
    cached = upstream.headers.get(X_CACHE) == "HIT" or upstream.headers.get(X_CACHED) == "true"
    assert ex.model is not None  # the parser always sets one
    out = GenerateAnswer(
        completion=text, model=ex.model, prompt_tokens=prompt, completion_tokens=completion,
        total_tokens=prompt + completion, cost_usd=round(price.charge(usage), 8) if price else None,
        request_id=ex.request_id, cached=cached, latency_ms=round(latency_ms, 1),
    )
    headers = upstream.headers
    headers["Content-Type"] = "application/json"
    headers.pop("Content-Encoding", None)
    return Reply(200, headers, body=msgspec.json.encode(out), upstream_status=upstream.status)


def upstream_error(ex: Exchange, status: int, body: bytes) -> GatewayError:
    """A provider's refusal on a gateway-written request: its message, and for a 4xx its status."""
    message = ""
    try:
        doc = msgspec.json.decode(body)
        error = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(error, dict):
            message = str(error.get("message") or "")
    except msgspec.DecodeError:
        pass
    err = UpstreamError(f"upstream answered {status}" + (f": {message}" if message else ""),
                        target=ex.target.name, upstream_status=status)
    if 400 <= status < 500:  # the caller's mistake, as the provider saw it: same status
        err.status, err.code, err.type, err.retryable = status, "upstream_client_error", "client_error", status == 429
    return err
