"""HTTP surfaces: the proxy routes (SPEC §2) and the health probes.

A proxy handler only turns an aiohttp request into an ``Exchange`` (validated
path, bounded body, chosen target), runs the pipeline, and hands the ``Reply``
to ``gateway.writer``. Every ``GatewayError`` raised anywhere on the way is
rendered in the surface's dialect with the request id; anything else is a bug,
logged with its stack and answered as ``internal_error``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import hdrs, web

from gateway import __version__, catalog, envelope, envelope_llm, generate, offload
from gateway.body import decoded, is_json, read_body
from gateway.errors import GatewayError, InternalError, InvalidRequest, UnknownTarget
from gateway.exchange import ANTHROPIC, ENVELOPE, OPENAI, Exchange
from gateway.headers import X_CACHE, X_CACHED, X_RELIAPI_ATTEMPTS, X_RELIAPI_TARGET, X_REQUEST_ID
from gateway.keys import RUNTIME
from gateway.paths import validate_header_values, validate_path, validate_query
from gateway.runtime import Runtime
from gateway.store import StoreError
from gateway.writer import StreamOutcome, complete_response, error_response, write_reply
from policies.usage import summary as usage_summary
from providers.endpoints import endpoint

log = logging.getLogger("reliapi")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


Count = Annotated[int, msgspec.Meta(ge=1)]


class _Peek(msgspec.Struct):
    """The only body fields the gateway needs; everything else is skipped, not decoded.

    ``n`` and ``stream_options.include_usage`` tell when a stream is complete."""

    model: str | None = None
    stream: bool | None = None
    n: Count | None = None
    stream_options: _StreamOptions | None = None
    max_tokens: Count | None = None
    max_completion_tokens: Count | None = None
    idempotency_key: str | None = None
    user: str | None = None
    user_id: str | int | None = None


class _ChatMessage(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]


class _AnthropicMessage(msgspec.Struct):
    role: Literal["user", "assistant"]


class _ChatPeek(_Peek):
    """A chat completion: its messages must be a list of messages with a known role."""

    messages: list[_ChatMessage] | None = None


class _MessagesPeek(_Peek):
    messages: list[_AnthropicMessage] | None = None


_peek = msgspec.json.Decoder(_Peek).decode
_PEEKS = {
    "chat/completions": msgspec.json.Decoder(_ChatPeek).decode,
    "messages": msgspec.json.Decoder(_MessagesPeek).decode,
}


# Request ids: a random per-process prefix and a counter — unique without a syscall per request.
_ids = itertools.count(1)
_id_prefix = "req_" + os.urandom(6).hex()


def _new_id_prefix() -> None:  # forked workers must not repeat each other's ids
    global _id_prefix
    _id_prefix = "req_" + os.urandom(6).hex()


os.register_at_fork(after_in_child=_new_id_prefix)


def _request_id(request: web.Request) -> str:
    rid = request.headers.get(X_REQUEST_ID)
    if rid and _REQUEST_ID.fullmatch(rid):
        return rid
    return f"{_id_prefix}{next(_ids):010x}"


_NO_PEEK = _Peek()


async def _peek_request(
    request: web.Request, headers: Any, body: bytes, *, json_by_default: bool, billed: str | None = None,
) -> tuple[_Peek, bool]:
    """What the body says, and whether the client wants a stream (``"stream": true`` or SSE Accept)."""
    stream = _accepts_sse(request)
    if not body or hdrs.CONTENT_ENCODING in headers or not is_json(request, by_default=json_by_default):
        return _NO_PEEK, stream  # an upload, or compressed in a coding the gateway does not read: never decoded
    if len(body) <= offload.INLINE_MAX_BYTES:
        peek = _peek_body(body, _PEEKS.get(billed, _peek))  # type: ignore[arg-type]
    else:
        peek = await offload.run(peek_body, body, billed)  # off the event loop
    return peek, bool(peek.stream) or stream


def peek_body(body: bytes, billed: str | None) -> _Peek:
    """The fields the gateway routes and shapes by, read from a request body of the ``billed`` endpoint."""
    return _peek_body(body, _PEEKS.get(billed, _peek))  # type: ignore[arg-type]


def _shape(ex: Exchange, peek: _Peek) -> Exchange:
    """What the body tells the policies: choices (``n``), usage in a stream, max tokens, idempotency key."""
    if peek is _NO_PEEK:
        return ex
    if peek.n is not None and peek.n > 1:
        ex.choices = peek.n
    if ex.stream and peek.stream_options is not None and peek.stream_options.include_usage:
        ex.include_usage = True
    ex.max_tokens = peek.max_completion_tokens if peek.max_tokens is None else peek.max_tokens
    ex.idempotency_key = peek.idempotency_key
    user = peek.user if peek.user is not None else peek.user_id
    if user is not None:
        ex.user = str(user)[:128]
    return ex


def _client_ip(request: web.Request, rt: Runtime) -> str | None:
    """The peer, or behind a trusted proxy (``trust_forwarded_for``) the hop it saw: the last
    ``X-Forwarded-For`` entry — the one a client cannot forge past that proxy."""
    if rt.config.server.trust_forwarded_for:
        forwarded = request.headers.get(hdrs.X_FORWARDED_FOR)
        if forwarded:
            last = forwarded.rsplit(",", 1)[-1].strip()
            if last:
                return last
    return request.remote


def _accepts_sse(request: web.Request) -> bool:
    """An SSE client says so in Accept: its response is a stream, timed by first byte and idle gaps."""
    return "text/event-stream" in request.headers.get(hdrs.ACCEPT, "")


def _peek_body(body: bytes, decode: Any = _peek) -> _Peek:
    try:
        return decode(body)
    except msgspec.ValidationError as e:
        msg = str(e)
        param = msg.split("at `$.")[1].rstrip("`") if "at `$." in msg else None
        raise InvalidRequest(f"invalid request body: {msg.replace('`', '')}", param=param) from None
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None


async def _read_body(request: web.Request, rt: Runtime) -> bytes:
    server = rt.config.server
    return await read_body(request, rt.max_body, server.body_timeout_s, server.max_body_mb, server.body_deadline_s)


def _split_raw(raw: str, prefix_len: int) -> tuple[str, str]:
    path, _, query = raw.partition("?")
    return path[prefix_len:], query


async def _exchange_v1(request: web.Request, rt: Runtime, request_id: str, tenant: str | None) -> Exchange:
    rel, query = _split_raw(request.raw_path, 4)  # after "/v1/"
    validate_path(rel)
    if query:
        validate_query(query)
    validate_header_values(request.headers, parsed=True)
    ep = endpoint(rel)
    dialect = ANTHROPIC if ep.path == "messages" or ep.path.startswith("messages/") else OPENAI
    body, headers = await _read_body(request, rt), request.headers
    if hdrs.CONTENT_ENCODING in headers:
        body, headers = await decoded(request, body, rt.max_body, json_by_default=True)
    peek, stream = await _peek_request(request, headers, body, json_by_default=True, billed=ep.billed)
    target = rt.router.for_v1(request.headers.get(X_RELIAPI_TARGET), peek.model)
    return _shape(Exchange(
        request_id=request_id, method=request.method, route="v1", dialect=dialect, rel_path=rel, v1=True,
        query=query, headers=headers, body=body, target=target, model=peek.model, stream=stream,
        client_ip=_client_ip(request, rt), tenant=tenant,
    ), peek)


async def _exchange_t(request: web.Request, rt: Runtime, request_id: str, tenant: str | None) -> Exchange:
    path, _, query = request.raw_path.partition("?")
    _, _, rest = path.partition("/t/")
    name, _, rel = rest.partition("/")
    target = rt.router.by_name(name)
    validate_path(rel)
    if query:
        validate_query(query)
    validate_header_values(request.headers, parsed=True)
    body, headers = await _read_body(request, rt), request.headers
    if target.kind == "llm":
        if hdrs.CONTENT_ENCODING in headers:
            body, headers = await decoded(request, body, rt.max_body, json_by_default=False)
        peek, stream = await _peek_request(request, headers, body, json_by_default=False, billed=endpoint(rel).billed)
    else:
        peek, stream = _NO_PEEK, _accepts_sse(request)
    return _shape(Exchange(
        request_id=request_id, method=request.method, route="t", dialect=ENVELOPE, rel_path=rel, v1=False,
        query=query, headers=headers, body=body, target=target, model=peek.model, stream=stream,
        client_ip=_client_ip(request, rt), tenant=tenant,
    ), peek)


async def _exchange_generate(request: web.Request, rt: Runtime, request_id: str, tenant: str | None) -> Exchange:
    return await generate.exchange(request, rt, request_id, tenant, await _read_body(request, rt))


async def _exchange_proxy_http(request: web.Request, rt: Runtime, request_id: str, tenant: str | None) -> Exchange:
    return await envelope.exchange(request, rt, request_id, tenant, await _read_body(request, rt))


async def _exchange_proxy_llm(request: web.Request, rt: Runtime, request_id: str, tenant: str | None) -> Exchange:
    return await envelope_llm.exchange(request, rt, request_id, tenant, await _read_body(request, rt))


_ENVELOPES = {"/proxy/http": (_exchange_proxy_http, "proxy"), "/proxy/llm": (_exchange_proxy_llm, "proxy_llm")}


async def _no_route(request: web.Request, rt: Runtime, request_id: str, tenant: str | None) -> Exchange:
    raise UnknownTarget(f"no route for {request.method} {request.path}")


async def dispatch(request: web.Request) -> web.StreamResponse:
    """Every path that is not a fixed gateway endpoint lands here: /v1/* and /t/* are proxied."""
    raw = request.raw_path
    if raw.startswith("/v1/"):
        if raw.startswith("/v1/generate") and raw.partition("?")[0] == "/v1/generate" and request.method == "POST":
            make_exchange, route, dialect = _exchange_generate, "generate", OPENAI
        else:
            make_exchange, route = _exchange_v1, "v1"
            dialect = ANTHROPIC if raw.startswith("/v1/messages") else OPENAI
    elif raw.startswith("/proxy/") and raw.partition("?")[0] in _ENVELOPES and request.method == "POST":
        make_exchange, route = _ENVELOPES[raw.partition("?")[0]]
        dialect = ENVELOPE
    elif raw.startswith("/t/"):
        make_exchange, route, dialect = _exchange_t, "t", ENVELOPE
    else:
        make_exchange, route, dialect = _no_route, "none", ENVELOPE
    rt = request.app[RUNTIME].current
    request_id = _request_id(request)
    started = time.monotonic()
    ex: Exchange | None = None
    inflight: str | None = None
    tenant_name: str | None = None
    outcome = StreamOutcome()
    status, error, reply = 0, None, None
    try:
        try:
            if make_exchange is _no_route:  # counted and logged like any refused request
                await _no_route(request, rt, request_id, None)
            if request.version < (1, 0):  # HTTP/0.9 has no headers to carry a key, a type, a length
                raise InvalidRequest("HTTP/1.0 or newer is required")
            tenant = rt.tenants.authenticate(request.headers)  # before the body: an unknown caller costs no upload
            tenant_name = tenant.name if tenant is not None else None
            ex = await make_exchange(request, rt, request_id, tenant_name)
            inflight = ex.target.name
            rt.observatory.enter(inflight)
            reply = await rt.flow(ex)
            if route == "generate":
                reply = generate.reply(rt, ex, reply, (time.monotonic() - started) * 1000)
            elif route == "proxy":
                reply = envelope.reply(ex, await envelope.whole(reply), (time.monotonic() - started) * 1000)
            elif route == "proxy_llm":
                reply = envelope_llm.reply(rt, ex, reply, (time.monotonic() - started) * 1000)
        except GatewayError as e:
            error = e
        except Exception:
            log.exception("internal error", extra={"fields": {"request_id": request_id}})
            error = InternalError("internal error")
        if error is not None:
            status = error.status
            target = ex.target.name if ex is not None else None
            return error_response(
                error, dialect, request_id, target=target, attempts=ex.attempts if ex else 0,
                duration_ms=(time.monotonic() - started) * 1000,
            )
        assert ex is not None and reply is not None
        status = reply.status
        headers = reply.headers
        headers[X_REQUEST_ID] = request_id
        headers[X_RELIAPI_TARGET] = ex.target.name
        headers[X_RELIAPI_ATTEMPTS] = str(ex.attempts)
        headers.setdefault(X_CACHE, "BYPASS")
        headers.setdefault(X_CACHED, "false")
        if reply.chunks is None:
            return complete_response(reply, outcome)
        return await write_reply(request, ex, reply, outcome)
    finally:
        if inflight is not None:
            rt.observatory.leave(inflight)
        fields = _access_fields(request, request_id, route, ex, reply, status, error, outcome, started)
        if ex is None:
            fields["tenant"] = tenant_name  # a known caller whose request was refused before it had a target
        failed = error or outcome.error
        if failed is not None:
            fields["error_message"] = rt.scrub(failed.message)
        if failed is not None or status >= 400:
            fields["path"] = rt.scrub(request.path)[:256]  # the last errors on the status page say where
        if rt.access_log.enabled:
            rt.access_log(fields)  # sets "ts"
        rt.observatory.record(fields)


def _access_fields(
    request: web.Request, request_id: str, route: str, ex: Exchange | None, reply: Any, status: int,
    error: GatewayError | None, outcome: StreamOutcome, started: float,
) -> dict[str, Any]:
    latency_ms = round((time.monotonic() - started) * 1000, 2)
    if ex is None:  # rejected before a target was chosen
        return {
            "ts": None, "level": "info", "request_id": request_id, "tenant": None, "target": None, "kind": None,
            "route": route, "method": request.method, "status": status, "stream": False, "model": None,
            "outcome": "error", "error_code": error.code if error else None, "upstream_status": None,
            "attempts": 0, "latency_ms": latency_ms, "ttft_ms": None, "cost_usd": None, "prompt_tokens": None,
            "completion_tokens": None, "cache_hit": False, "idempotent_hit": False, "fallback_target": None,
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
    }
    if ex.log:
        fields.update(ex.log)
    return fields


# ---------------------------------------------------------------- catalog


async def models(request: web.Request) -> web.StreamResponse:
    """GET /v1/models: the gateway's own catalog (``gateway.catalog``), in the OpenAI dialect."""
    rt = request.app[RUNTIME].current
    request_id = _request_id(request)
    try:
        tenant = rt.tenants.authenticate(request.headers)
    except GatewayError as e:
        return error_response(e, OPENAI, request_id)
    if rt.catalog is None:
        rt.catalog = catalog.build(rt)
    body = {"object": "list", "data": catalog.visible(rt.catalog, tenant)}
    return web.Response(body=msgspec.json.encode(body), content_type="application/json",
                        headers={X_REQUEST_ID: request_id})


async def user_usage(request: web.Request) -> web.StreamResponse:
    """GET /v1/usage/{user_id} (the "LLM Gateway API" seed): a user's usage by day and in total.
    With tenants, a tenant sees only its own users."""
    rt = request.app[RUNTIME].current
    request_id = _request_id(request)
    try:
        tenant = rt.tenants.authenticate(request.headers)
        since = request.query.get("since")
        if since is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", since):
            raise InvalidRequest("since: a date, YYYY-MM-DD", param="since")
        await rt.usage_book_flush()
        found = await usage_summary(rt.store, tenant=tenant.name if tenant else None,
                                    user=request.match_info["user_id"], since_day=since.replace("-", "") if since else None)
    except GatewayError as e:
        return error_response(e, OPENAI, request_id)
    body = {"user_id": request.match_info["user_id"], **found}
    return web.Response(body=msgspec.json.encode(body), content_type="application/json",
                        headers={X_REQUEST_ID: request_id})


# ---------------------------------------------------------------- health


async def liveness(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


READY_STORE_TIMEOUT_S = 1.0  # a store that hangs makes /readyz say so, not hang with it


async def readiness(request: web.Request) -> web.Response:
    """GET /readyz (SPEC §2): 200 when a config is loaded (it is, once the app serves) and the
    store answers within ``READY_STORE_TIMEOUT_S``; 503 naming the store and the reason otherwise."""
    rt = request.app[RUNTIME].current
    store = rt.store
    body: dict[str, Any] = {"config": "loaded", "store": store.backend, "targets": sorted(rt.targets)}
    try:
        async with asyncio.timeout(READY_STORE_TIMEOUT_S):
            await store.ping()
    except (StoreError, TimeoutError) as e:
        why = rt.scrub(str(e)) if isinstance(e, StoreError) else f"no answer within {READY_STORE_TIMEOUT_S:g} s"
        reason = f"store unavailable ({store.url_for_display}): {why}"
        return web.json_response({"status": "not_ready", "reason": reason, **body}, status=503)
    return web.json_response({"status": "ready", **body})
