"""``POST /proxy/http``: the ReliAPI seed's envelope for any configured HTTP API (SPEC §2).

    {target, method?, path?, headers?, query?, body?, idempotency_key?, cache?}
      → {success, data: {status_code, headers, body}, meta: {request_id, target, retries,
         duration_ms, cache_hit, idempotent_hit, fallback_used, fallback_target}}

The envelope is checked (the path like any client path: no escaping the target's base;
header values printable ASCII; a string query percent-encoded as UTF-8 where RFC 3986 needs
it), turned into an upstream request for the named target, and run through the same pipeline
as every surface. The upstream's answer comes back inside ``data`` (its body as JSON when
it is JSON, else as text, else base64 with ``body_encoding``); ``success`` is false for a 4xx/5xx answer, which then also
carries an ``error`` and keeps its status (``HttpAnswer``). The gateway's own errors are
the envelope errors of SPEC §3.
"""

from __future__ import annotations

import base64
import re
import time
from typing import TYPE_CHECKING, Annotated, Any, TypeVar
from urllib.parse import quote, urlencode

import msgspec
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.edge.requests import client_ip, envelope_body_of, header_user, peek_json, with_idempotency_headers
from gateway.edge.writer import EnvelopeErrorDetail
from gateway.errors import InvalidRequest, UpstreamError
from gateway.flow.exchange import ENVELOPE, Exchange, Reply
from gateway.headers import X_CACHE, X_RELIAPI_FALLBACK
from gateway.upstream.paths import validate_header_values, validate_path
from providers.endpoints import endpoint

if TYPE_CHECKING:
    from gateway.edge.call import Call

T = TypeVar("T")
CacheTTL = Annotated[float, msgspec.Meta(ge=0)]  # the envelopes' ``cache``: seconds, 0 or more
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# any case: "get" and "Get" too (a JSON Schema pattern has no flags, so each letter is a class)
_METHOD = "^(" + "|".join("".join(f"[{c}{c.lower()}]" for c in m) for m in _METHODS) + ")$"


_NO_BODY = msgspec.Raw(b"null")


class HttpEnvelope(msgspec.Struct, forbid_unknown_fields=True):
    target: str
    # required (SPEC §2): never a silent GET
    method: Annotated[str, msgspec.Meta(pattern=_METHOD, description=", ".join(_METHODS) + ", in any case")]
    path: str = ""
    headers: dict[str, str] = {}
    query: dict[str, str | int | float | bool | list[str]] | str | None = None
    # any JSON: a string is sent as its text, anything else as the JSON it is (a factory: the schema has no default)
    body: msgspec.Raw = msgspec.field(default_factory=lambda: _NO_BODY)
    idempotency_key: str | None = None
    cache: CacheTTL | None = None  # TTL seconds for this answer


class HttpData(msgspec.Struct, omit_defaults=True):
    status_code: int  # the upstream's
    headers: dict[str, str]  # the upstream's, less the gateway's own; a repeated one's values joined with ", "
    body: Any  # the upstream's body: its JSON when it is JSON, else its text; null when empty
    body_encoding: str | None = None  # "base64": the body is no UTF-8 text (an image, a gzip answer), its bytes so


class HttpMeta(msgspec.Struct):
    request_id: str
    target: str
    retries: int
    duration_ms: float
    cache_hit: bool
    idempotent_hit: bool
    fallback_used: bool
    fallback_target: str | None


class HttpAnswer(msgspec.Struct):
    """The target's answer inside the envelope. For an upstream 4xx/5xx ``success`` is false, ``error`` is
    there and the answer keeps the upstream's status."""

    success: bool
    data: HttpData
    meta: HttpMeta
    error: EnvelopeErrorDetail | msgspec.UnsetType = msgspec.UNSET


def decode_body(raw: bytes, kind: type[T], what: str = "envelope") -> T:
    """A gateway surface's own JSON body as ``kind``; a 400 naming the field otherwise."""
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as e:
        msg = str(e)
        param = msg.split("at `$.")[1].rstrip("`") if "at `$." in msg else None
        if param is None and "`" in msg:  # "Object missing required field `prompt`"
            param = msg.split("`")[1]
        raise InvalidRequest(f"invalid {what}: {msg.replace('`', '')}", param=param) from None
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 field name
_QUERY_CTL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # control characters: a mistake or an injection, never data
# A query character RFC 3986 allows as it is (pchar, '/', '?'), or a well-formed escape; anything else is encoded.
_QUERY_KEEP = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]+|%[0-9A-Fa-f]{2})+")


def _encode_query(query: str) -> str:
    """The envelope's string query as it may go on the wire: characters outside RFC 3986's query
    set are percent-encoded as UTF-8 (space → %20, 'é' → %C3%A9, a stray '%' → %25); existing escapes stay."""
    if _QUERY_CTL.search(query):
        raise InvalidRequest("query: control characters (CR, LF, NUL, …) are not allowed", param="query")
    if not query or _QUERY_KEEP.fullmatch(query):
        return query
    out, end = [], 0
    for m in _QUERY_KEEP.finditer(query):
        out.append(quote(query[end:m.start()], safe=""))
        out.append(m.group())
        end = m.end()
    out.append(quote(query[end:], safe=""))
    return "".join(out)


def parse(raw: bytes) -> HttpEnvelope:
    try:
        return decode_body(raw, HttpEnvelope)
    except InvalidRequest as e:
        if e.param == "method" and "regex" in e.message:  # the methods in words, not as the pattern's letters
            raise InvalidRequest(f"invalid envelope: method must be one of {', '.join(_METHODS)} (in any case)",
                                 param="method") from None
        raise


async def exchange(call: Call) -> Exchange:
    """The envelope's request for its target (the surface's parser)."""
    env = parse(await envelope_body_of(call))
    rt = call.rt
    target = rt.router.by_name(env.target)
    rel = validate_path(env.path[1:] if env.path.startswith("/") else env.path)  # "/users/1" or "users/1"
    if isinstance(env.query, str):
        query = _encode_query(env.query.lstrip("?"))
    elif env.query:
        query = urlencode(env.query, doseq=True)  # keys and values percent-encoded as UTF-8
    else:
        query = ""
    for name in env.headers:
        if not _TOKEN.fullmatch(name):
            raise InvalidRequest(f"headers: {name[:64]!r} is not a valid header name", param="headers")
    validate_header_values(env.headers)
    headers: CIMultiDict[str] = CIMultiDict(env.headers)
    with_idempotency_headers(call.request, headers)
    # the body is kept as the JSON it came as (never decoded into objects: a 10 MB body costs a copy)
    data = bytes(env.body).strip()
    if data == b"null":
        data = b""
    elif data[:1] == b'"':
        data = msgspec.json.decode(data, type=str).encode()
    else:
        headers.setdefault("Content-Type", "application/json")
    ex = Exchange(
        request_id=call.request_id, method=env.method.upper(), route="proxy", dialect=ENVELOPE, rel_path=rel,
        v1=False, query=query, headers=CIMultiDictProxy(headers), body=data, target=target, tenant=call.tenant,
        client_ip=client_ip(call.request, rt),
    )
    if target.kind == "llm" and env.method.upper() == "POST":  # an LLM call in HTTP clothes: its model is checked
        peek = await peek_json(data, endpoint(rel).billed)  # (allowed_models, tiers) as on /v1
        ex.model = peek.model
        user = peek.user if peek.user is not None else peek.user_id
        ex.user = str(user)[:128] if user is not None else None
    ex.user = header_user(call.request) or ex.user
    ex.idempotency_key = env.idempotency_key
    ex.cache_ttl = float(env.cache) if env.cache is not None else None
    return ex


ENVELOPE_MAX_BYTES = 32 << 20  # a streamed answer read whole into the envelope's data.body, at most


async def whole(upstream: Reply) -> Reply:
    """A streamed answer (SSE, NDJSON, chunked, large) read to its end: the envelope is one JSON document
    that carries the whole body — never a ``null`` in its place."""
    if upstream.chunks is None:
        return upstream
    parts, size = [], 0
    try:
        async for chunk in upstream.chunks:
            size += len(chunk)
            if size > ENVELOPE_MAX_BYTES:
                raise UpstreamError(f"the answer is larger than /proxy/http carries ({ENVELOPE_MAX_BYTES >> 20} MB); "
                                    "call the target through /t/<target>/… to stream it", upstream_status=upstream.status)
            parts.append(chunk)
    finally:
        await upstream.aclose()
    done = Reply(upstream.status, upstream.headers, body=b"".join(parts), upstream_status=upstream.upstream_status)
    done.failure, done.ttft_ms = upstream.failure, upstream.ttft_ms
    return done


def _shown(headers: CIMultiDict[str]) -> dict[str, str]:
    """The upstream's headers less the gateway's own, one entry per name: a repeated header's values joined with
    ", " as fetch's ``Headers.get`` and requests do (two ``Set-Cookie`` lines are both there, not the last)."""
    shown: dict[str, str] = {}
    names: dict[str, str] = {}  # lower case → the spelling first seen
    for k, v in headers.items():
        low = k.lower()
        if low.startswith(("x-reliapi-", "x-cache", "x-request-id", "idempotent-")):
            continue
        first = names.setdefault(low, k)
        shown[first] = f"{shown[first]}, {v}" if first in shown else v
    return shown


async def finish(call: Call, upstream: Reply) -> Reply:
    """The envelope around the target's whole answer (the surface's finisher)."""
    assert call.ex is not None
    whole_answer = await whole(upstream)
    return reply(call.ex, whole_answer, call.elapsed_ms(time.monotonic()))


def reply(ex: Exchange, upstream: Reply, duration_ms: float) -> Reply:
    body = upstream.body or b""
    encoding = None
    try:
        data: Any = msgspec.json.decode(body) if body else None
    except msgspec.DecodeError:
        try:
            data = body.decode()
        except UnicodeDecodeError:  # bytes, not text: every one of them, base64 (never U+FFFD in their place)
            data, encoding = base64.b64encode(body).decode(), "base64"
    status = upstream.status
    headers = upstream.headers
    fallback = headers.get(X_RELIAPI_FALLBACK)
    out = HttpAnswer(
        success=status < 400,
        data=HttpData(status, _shown(headers), data, encoding),
        meta=HttpMeta(
            request_id=ex.request_id, target=ex.target.name, retries=max(0, ex.attempts - 1),
            duration_ms=round(duration_ms, 1), cache_hit=headers.get(X_CACHE) == "HIT",
            idempotent_hit=bool(ex.log.get("idempotent_hit")), fallback_used=fallback is not None,
            fallback_target=fallback,
        ),
    )
    if status >= 400:
        out.error = EnvelopeErrorDetail(
            type="upstream_error" if status >= 500 else "client_error", code="upstream_error",
            message=f"upstream answered {status}", retryable=status >= 500 or status == 429,
            target=ex.target.name, status_code=status,
        )
    keep = CIMultiDict((k, v) for k, v in headers.items() if k.lower().startswith(("x-", "idempotent-", "ratelimit")))
    keep["Content-Type"] = "application/json"
    return Reply(status if status >= 400 else 200, keep, body=msgspec.json.encode(out), upstream_status=status)
