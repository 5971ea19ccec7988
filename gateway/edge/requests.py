"""Turning a ``/v1`` or ``/t`` request into an ``Exchange`` (the surfaces' parsers).

The path, query and header values are checked before the body is read (``gateway.upstream.paths``);
the body is read bounded (``gateway.edge.body``), decoded when compressed and an LLM target will
read it, and peeked at for the few fields the gateway routes and shapes by — decoded into a
typed struct that skips everything else (off the event loop for a large one).
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from aiohttp import hdrs, web

from gateway import offload
from gateway.edge import routed
from gateway.edge.body import decoded, is_json, read_body
from gateway.errors import InvalidRequest, UnknownTarget, UnsupportedMediaType
from gateway.flow.exchange import ANTHROPIC, ENVELOPE, OPENAI, Exchange
from gateway.headers import IDEMPOTENCY_KEYS, X_RELIAPI_TARGET, X_RELIAPI_USER
from gateway.upstream.paths import validate_header_values, validate_path, validate_query
from providers.endpoints import MESSAGES, Endpoint, endpoint
from providers.responses import INPUT_ITEM_TYPES, ROLES

if TYPE_CHECKING:
    from multidict import CIMultiDict

    from gateway.edge.call import Call
    from gateway.runtime import Runtime


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


class _ResponsesItem(msgspec.Struct):
    type: Literal[INPUT_ITEM_TYPES] | None = None  # type: ignore[valid-type]  # a message may leave it out
    role: Literal[ROLES] | None = None  # type: ignore[valid-type]


class _ResponsesPeek(_Peek):
    """A Responses API request: its ``input`` text or a list of input items of known types, its
    ``max_output_tokens`` a positive count — a bad one is the client's 400, naming the field."""

    input: str | list[_ResponsesItem] | None = None
    max_output_tokens: Count | None = None


_Text = Annotated[str, msgspec.Meta(min_length=1)]
_TokenId = Annotated[int, msgspec.Meta(ge=0)]
_Tokens = Annotated[list[_TokenId], msgspec.Meta(min_length=1)]
EMBEDDINGS_INPUT = ("input must be a non-empty string, a non-empty list of non-empty strings, a non-empty list of "
                    "token ids (integers >= 0), or a non-empty list of such lists")


class _EmbeddingsPeek(_Peek):
    """An embeddings request: what it embeds must be text or token ids, and not empty — checked here so that a
    bad one is the client's 400, not a reservation and an upstream call. A missing ``input`` is one too, unless
    the body has a ``prompt`` instead (legacy servers such as Ollama's ``api/embeddings`` take that)."""

    input: _Text | Annotated[list[_Text | _TokenId | _Tokens], msgspec.Meta(min_length=1)] | None = None
    prompt: msgspec.Raw = msgspec.Raw(b"")  # (left unread: only whether it is there)

    def __post_init__(self) -> None:
        if self.input is None and not self.prompt:
            raise ValueError("Object missing required field `input` - at `$.input`")
        if isinstance(self.input, list) and len({type(item) for item in self.input}) > 1:
            raise ValueError("Expected items of one kind, got a mix of strings and token ids - at `$.input`")


def _decode_embeddings(body: bytes) -> _Peek:
    try:
        return _decode_embeddings_peek(body)
    except msgspec.ValidationError as e:
        if "$.input" in str(e):  # say what input may be, not only what it may not
            raise msgspec.ValidationError(f"{e}: {EMBEDDINGS_INPUT}") from None
        raise


_decode_embeddings_peek = msgspec.json.Decoder(_EmbeddingsPeek).decode


_peek = msgspec.json.Decoder(_Peek).decode
_PEEKS = {
    "chat/completions": msgspec.json.Decoder(_ChatPeek).decode,
    "messages": msgspec.json.Decoder(_MessagesPeek).decode,
    "responses": msgspec.json.Decoder(_ResponsesPeek).decode,
    "embeddings": _decode_embeddings,
}


_NO_PEEK = _Peek()


async def peek_json(body: bytes, billed: str | None) -> _Peek:
    """What a JSON body says (its model, user, …): for a surface that carries an LLM request of its own shape
    inside (``/proxy/http`` to an LLM target)."""
    if not body:
        return _NO_PEEK
    if len(body) <= offload.INLINE_MAX_BYTES:
        return _peek_body(body, _PEEKS.get(billed, _peek))  # type: ignore[arg-type]
    return await offload.run(peek_body, body, billed)


def header_user(request: web.Request) -> str | None:
    """The client's ``X-ReliAPI-User`` (first 128 characters), for surfaces whose upstream headers are not the
    client's (the envelopes): it names the user as on ``/v1``, and wins over the body's."""
    user = request.headers.get(X_RELIAPI_USER)
    return user[:128] if user else None


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
    if isinstance(peek, _ResponsesPeek):
        ex.max_tokens = peek.max_output_tokens
    ex.idempotency_key = peek.idempotency_key
    user = peek.user if peek.user is not None else peek.user_id
    if user is not None:
        ex.user = str(user)[:128]
    return ex


def client_ip(request: web.Request, rt: Runtime) -> str | None:
    """The peer, or behind a trusted proxy (``trust_forwarded_for``) the hop it saw: the last
    ``X-Forwarded-For`` entry — the one a client cannot forge past that proxy. Several header lines are one
    list (RFC 9110 §5.3), so the last entry is the last line's: a client's own extra line cannot come after
    the one its proxy added. Canonical (``canonical_ip``): per-IP limits and bans hold whatever the spelling."""
    remote = request.remote
    if rt.config.server.trust_forwarded_for:
        lines = request.headers.getall(hdrs.X_FORWARDED_FOR, ())
        if lines:
            last = lines[-1].rsplit(",", 1)[-1].strip()
            if last:
                return canonical_ip(last) or canonical_ip(remote)  # (not an address: the proxy's own)
    return canonical_ip(remote)


_CANONICAL: dict[str | None, str | None] = {}  # spelling → address: the few a gateway sees, parsed once


def canonical_ip(text: str | None) -> str | None:
    """One spelling per address: without a port (``1.2.3.4:5678``, ``[::1]:80``, as some proxies write it) or an
    IPv6 zone, an IPv4-mapped IPv6 address as the IPv4 one, IPv6 compressed and in lower case; None when it
    is no address (leading zeros included: ``010.1.1.1`` is octal to some and decimal to others)."""
    found = _CANONICAL.get(text, _CANONICAL)
    if found is not _CANONICAL:
        return found  # type: ignore[return-value]
    out = None
    if text:
        t = text.strip()
        if t.startswith("["):  # [v6] or [v6]:port
            t = t[1:t.find("]")] if "]" in t else ""
        elif t.count(":") == 1:  # v4:port
            t = t.split(":", 1)[0]
        try:
            ip = ipaddress.ip_address(t.split("%", 1)[0])
        except ValueError:
            ip = None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        out = str(ip) if ip is not None else None
    if len(_CANONICAL) >= 4096:  # bounded whatever spellings arrive
        _CANONICAL.clear()
    _CANONICAL[text] = out
    return out


def _accepts_sse(request: web.Request) -> bool:
    """An SSE client says so in Accept: its response is a stream, timed by first byte and idle gaps."""
    return "text/event-stream" in request.headers.get(hdrs.ACCEPT, "")


_AT = re.compile(r"at `\$\.([^`]*)`")  # where a msgspec.ValidationError says the bad field is


def _peek_body(body: bytes, decode: Any = _peek) -> _Peek:
    if not body.isascii():  # (the peek skips what it does not read, unchecked: JSON is UTF-8, all of it)
        try:
            body.decode()
        except UnicodeDecodeError as e:
            raise InvalidRequest(f"request body is not valid JSON: not UTF-8 at byte {e.start}") from None
    try:
        return decode(body)
    except msgspec.ValidationError as e:
        msg = str(e)
        at = _AT.search(msg)
        param = at.group(1) if at else None
        raise InvalidRequest(f"invalid request body: {msg.replace('`', '')}", param=param) from None
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None


def with_idempotency_headers(request: web.Request, headers: CIMultiDict[str]) -> None:
    """An envelope's own request headers: the client's ``Idempotency-Key`` / ``X-Idempotency-Key`` count as on
    every other surface (the envelope's ``idempotency_key`` field too; the header wins, as on ``/v1``)."""
    for name in IDEMPOTENCY_KEYS:
        value = request.headers.get(name)
        if value is not None and name not in headers:
            headers[name] = value


async def body_of(call: Call) -> bytes:
    """The request's body, bounded in size and time (``gateway.edge.body``)."""
    rt = call.rt
    server = rt.config.server
    return await read_body(call.request, rt.max_body, server.body_timeout_s, server.max_body_mb, server.body_deadline_s)


async def envelope_body_of(call: Call) -> bytes:
    """An envelope's JSON body (``/proxy/*``, ``/v1/generate``), decoded from its ``Content-Encoding`` as on ``/v1``:
    one the gateway cannot read is a 415, never parsed as it came (nor sent on)."""
    body = await body_of(call)
    request = call.request
    if hdrs.CONTENT_ENCODING in request.headers and body:
        body, headers = await decoded(request, body, call.rt.max_body, json_by_default=True)
        if hdrs.CONTENT_ENCODING in headers:
            raise UnsupportedMediaType(
                f"Content-Encoding {headers[hdrs.CONTENT_ENCODING]!r} cannot be read: send the envelope uncompressed "
                "or as gzip, deflate, br or zstd")
    return body


def _split_raw(raw: str, prefix_len: int) -> tuple[str, str]:
    path, _, query = raw.partition("?")
    return path[prefix_len:], query


def v1_dialect(asked: Endpoint) -> str:
    """The dialect of ``/v1`` errors: Anthropic's for the Messages endpoints (``messages``, ``messages/…``,
    however spelled), else OpenAI's — one rule, for a request's own errors and those before it was read."""
    path = asked.path
    return ANTHROPIC if path == MESSAGES or path.startswith("messages/") else OPENAI


# Spellings of paths the gateway answers itself (``gateway.edge.operator``) that its routes did not match —
# ``/v1/health/``, ``/v1/rate-limit/%7Bx%7D`` —: refused, so that they never reach an upstream with its key.
_OWNED = frozenset(("health", "cache/stats", "cache/clear", "admin/summary"))
_OWNED_PREFIXES = ("rate-limit/", "usage/")
_OWNED_MEMO: dict[object, bool] = {}


async def v1(call: Call) -> Exchange:
    """``/v1/{path}``: the path and query checked, the body read (decoded when compressed) and
    peeked at, the target chosen by ``X-ReliAPI-Target``, the body's model, or the default."""
    request, rt = call.request, call.rt
    raw = request.raw_path
    rel, query = _split_raw(raw, 4)  # after "/v1/"
    validate_path(rel)
    if query:
        validate_query(query)
    validate_header_values(request.headers, parsed=True)
    asked = endpoint(rel)
    owned = _OWNED_MEMO.get(asked)  # (endpoints are memoized: so is this, per endpoint)
    if owned is None:
        path = asked.path
        owned = path in _OWNED or path.startswith(_OWNED_PREFIXES) or path in ("rate-limit", "usage")
        if len(_OWNED_MEMO) < 4096:
            _OWNED_MEMO[asked] = owned
    if owned:
        raise UnknownTarget(f"/v1/{asked.path} is answered by the gateway itself, at exactly that path (no trailing "
                            "slash or escaped characters); it is never sent upstream")
    body, headers = await body_of(call), request.headers
    if hdrs.CONTENT_ENCODING in headers:
        body, headers = await decoded(request, body, rt.max_body, json_by_default=True)
    peek, stream = await _peek_request(request, headers, body, json_by_default=True, billed=asked.billed)
    model, named = peek.model, request.headers.get(X_RELIAPI_TARGET)
    decision = None
    if model in rt.routes.names:  # a virtual model: its concrete one
        body, decision = await routed.resolve(call, body, asked.billed, model)
    if decision is None:
        try:
            target = rt.router.for_v1(named, model)
        except UnknownTarget:
            if peek is _NO_PEEK and hdrs.CONTENT_ENCODING in headers and not named:  # unread, so unrouted: said so
                raise UnsupportedMediaType(
                    f"Content-Encoding {headers[hdrs.CONTENT_ENCODING]!r} cannot be read, and the request is routed "
                    "by its model: send it uncompressed or as gzip, deflate, br or zstd, or name its target in "
                    "X-ReliAPI-Target") from None
            raise
    else:
        model, target = decision.model, routed.target_of(rt, decision, named)
    ex = _shape(Exchange(
        request_id=call.request_id, method=request.method, route="v1", dialect=v1_dialect(asked),
        rel_path=rel, v1=True, query=query, headers=headers, body=body, target=target, model=model,
        stream=stream, client_ip=client_ip(request, rt), tenant=call.tenant,
    ), peek)
    if decision is not None:
        routed.report(rt, ex, decision)
    return ex


async def t(call: Call) -> Exchange:
    """``/t/{target}/{path}``: the named target; an LLM target's body is decoded and peeked at
    like ``/v1``'s, a plain-HTTP target's is relayed unread."""
    request, rt = call.request, call.rt
    path, _, query = request.raw_path.partition("?")
    _, _, rest = path.partition("/t/")
    name, _, rel = rest.partition("/")
    target = rt.router.by_name(name)
    validate_path(rel)
    if query:
        validate_query(query)
    validate_header_values(request.headers, parsed=True)
    body, headers = await body_of(call), request.headers
    if target.kind == "llm":
        if hdrs.CONTENT_ENCODING in headers:
            body, headers = await decoded(request, body, rt.max_body, json_by_default=False)
        peek, stream = await _peek_request(request, headers, body, json_by_default=False, billed=endpoint(rel).billed)
    else:
        peek, stream = _NO_PEEK, _accepts_sse(request)
    return _shape(Exchange(
        request_id=call.request_id, method=request.method, route="t", dialect=ENVELOPE, rel_path=rel, v1=False,
        query=query, headers=headers, body=body, target=target, model=peek.model, stream=stream,
        client_ip=client_ip(request, rt), tenant=call.tenant,
    ), peek)
